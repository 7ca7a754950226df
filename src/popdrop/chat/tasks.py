"""Scheduled chat work, run by the worker tick: wake the conversations that are due
(countdown reminders, the day-after survey, input timeouts) and hand host messages
(console replies, pinned cards, broadcasts) to their channels.

The messages are taken in one transaction (the conversations step on, outbox rows are
marked sent, web messages are kept in the visitor's inbox) and sent after its commit,
each conversation on its own channel: SMS through the drops' SMS transport from
`POPDROP_CHAT_SMS_FROM`, Telegram through the Bot API, web to the visitor's socket in
this process, through the Redis relay in another one, or when they come back
(`chat.inbox`). A crash between the commit and an SMS or Telegram send loses that one
message rather than sending it twice, as a reminder should; web messages wait in the
inbox. Opted-out conversations were left out when the messages were taken.

Consent at the last moment: right before each SMS or Telegram call the conversation's STOP
(`opted_out_at`), the contact's consent on that channel, erasure and, for SMS, the
number's suppression are read again (`_refusal`); on PostgreSQL the conversation and
contact rows stay share-locked until the call returned, so a STOP (which updates them) is
confirmed only after it: no reminder, survey or broadcast starts after a STOP's reply.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.audience import consent, contact_points
from popdrop.chat import conversations, host, inbox, live, turn
from popdrop.chat import telegram as tg
from popdrop.chat.messages import capabilities_of, degrade, to_json
from popdrop.chat.models import Conversation
from popdrop.chat.sms import as_text
from popdrop.core.db import Database
from popdrop.core.errors import PopdropError
from popdrop.core.logging import log
from popdrop.outbound.transports import OutboundSms, SmsTransport

# A conversation or contact row another transaction is changing right now (a STOP being
# handled) is asked about again after these pauses; past them the message is not sent.
_BUSY_PAUSES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
_BUSY = "consent_busy"


@dataclass
class ChatChannels:
    """How scheduled and host messages leave: what is not configured is not sent."""

    sms: SmsTransport | None = None
    sms_from: str = ""
    telegram: tg.TelegramBot | None = None
    web_relay: live.Relay | None = None  # reaches sockets open in other processes


async def _to_web(
    db: Database,
    deps: conversations.ChatDeps,
    channels: ChatChannels,
    delivery: turn.Delivery,
    kept: int,
) -> str:
    """Hand a kept inbox row to the visitor's socket, here or through the relay. A failure
    of the database or Redis leaves the row kept for the visitor's next connect, and the
    other deliveries of the tick go on."""
    try:
        if await inbox.hand_over(db, deps.signer, delivery.org_id, delivery.address, kept):
            return "sent"
        relay = channels.web_relay
        if relay is not None and await relay.publish(delivery.org_id, delivery.address, kept):
            return "relayed"
    except (SQLAlchemyError, RedisError, OSError) as exc:
        log.warning("web chat hand-over failed; kept", inbox_id=kept, error=repr(exc))
    return "kept"


async def _send(channels: ChatChannels, delivery: turn.Delivery, now: datetime) -> str:
    """Send one conversation's SMS or Telegram messages; the outcome, for the log."""
    messages = degrade(delivery.messages, capabilities_of(delivery.channel), now=now)
    if not messages:
        return "empty"
    if delivery.channel == "sms":
        if channels.sms is None or not channels.sms_from:
            return "no_sms_sender"
        body = "\n\n".join(text for text in (as_text(m) for m in messages) if text)
        result = await channels.sms.send(
            OutboundSms(
                to=delivery.address,
                from_number=channels.sms_from,
                body=body,
                org_id=delivery.org_id,
            )
        )
        return "sent" if result.ok else "failed"
    if delivery.channel == "telegram":
        if channels.telegram is None:
            return "no_telegram_bot"
        try:
            await tg.deliver(channels.telegram, delivery.address, messages)
        except tg.TelegramError:
            return "failed"
        return "sent"
    return "unknown_channel"


async def _send_if_wanted(
    db: Database,
    deps: conversations.ChatDeps,
    channels: ChatChannels,
    delivery: turn.Delivery,
    now: datetime,
) -> str:
    """`_send`, unless the person opted out since the message was taken: the check and the
    call share one transaction, whose row locks (PostgreSQL) outlast the call."""
    for pause in (*_BUSY_PAUSES, None):
        try:
            async with db.reader() as session:
                refusal = await _refusal(session, deps, delivery)
                if refusal is None:
                    return await _send(channels, delivery, now)
        except SQLAlchemyError as exc:  # not checked, not sent: this message is lost
            log.warning("chat consent check failed", error=repr(exc))
            return "consent_unchecked"
        if refusal != _BUSY or pause is None:
            return refusal
        await asyncio.sleep(pause)
    raise AssertionError("unreachable")


async def _refusal(
    session: AsyncSession, deps: conversations.ChatDeps, delivery: turn.Delivery
) -> str | None:
    """Why this delivery may not go out now (None: it may). On PostgreSQL the rows read
    stay share-locked (`SKIP LOCKED`: one being changed answers `_BUSY`, never a wait)."""
    locking = (await session.connection()).dialect.name == "postgresql"
    query = select(Conversation.opted_out_at).where(Conversation.id == delivery.conversation_id)
    if locking:
        query = query.with_for_update(read=True, skip_locked=True)
    found = (await session.execute(query)).first()
    if found is None:
        if locking and await session.scalar(
            select(Conversation.id).where(Conversation.id == delivery.conversation_id)
        ):
            return _BUSY
        return "erased"
    if found.opted_out_at is not None:
        return "opted_out"
    consent_channel = conversations.consent_channel(delivery.channel)
    if delivery.contact_id is not None:
        contacts, busy = await consent.hold_consent(session, [delivery.contact_id])
        if busy:
            return _BUSY
        contact = contacts.get(delivery.contact_id)
        if contact is None or contact.erased_at is not None:
            return "erased"
        if contact.consent(consent_channel) == "revoked":
            return "opted_out"
    if delivery.channel == "sms":
        try:
            points = contact_points.contact_points(deps.signer, None, delivery.address)
        except PopdropError:
            return None  # a short code or alphanumeric sender: no suppression to find
        suppressed = await contact_points.suppressed_channels(session, delivery.org_id, points)
        if "sms" in suppressed or "all" in suppressed:
            return "opted_out"
    return None


async def deliver_due(
    db: Database,
    deps: conversations.ChatDeps,
    channels: ChatChannels,
    *,
    now: datetime,
    org_id: int | None = None,
) -> Counter[str]:
    """Wake what is due and empty the host outbox (of every organization, or one);
    outcomes counted per channel and kind (`sms:sent`, `web:relayed`, `web:kept`…)."""
    kept: dict[int, int] = {}  # delivery index -> its web inbox row
    async with db.transaction() as session:
        deliveries = await turn.wake_due(session, deps, now=now, org_id=org_id)
        deliveries += await host.take_outbox(session, org_id=org_id)
        for index, delivery in enumerate(deliveries):
            if delivery.channel != live.CHANNEL:
                continue
            messages = degrade(delivery.messages, capabilities_of(live.CHANNEL), now=now)
            if messages:
                kept[index] = await inbox.keep(
                    session, delivery.org_id, delivery.conversation_id, to_json(messages), now
                )
        await inbox.purge(session, now=now)
    outcomes: Counter[str] = Counter()
    for index, delivery in enumerate(deliveries):
        if delivery.channel == live.CHANNEL:
            outcome = "empty"
            if index in kept:
                outcome = await _to_web(db, deps, channels, delivery, kept[index])
        else:
            outcome = await _send_if_wanted(db, deps, channels, delivery, now)
        outcomes[f"{delivery.channel}:{outcome}"] += 1
        if outcome not in ("sent", "relayed", "kept", "empty", "opted_out", "erased"):
            log.warning(
                "chat message not delivered",
                conversation=delivery.conversation_id,
                channel=delivery.channel,
                outcome=outcome,
            )
    return outcomes


__all__ = ["ChatChannels", "deliver_due"]
