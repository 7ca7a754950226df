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
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from popdrop.chat import host, inbox, live
from popdrop.chat import service as chat
from popdrop.chat import telegram as tg
from popdrop.chat.messages import capabilities_of, degrade, to_json
from popdrop.chat.sms import as_text
from popdrop.core.db import Database
from popdrop.core.logging import log
from popdrop.messaging.transports import OutboundSms, SmsTransport


@dataclass
class ChatChannels:
    """How scheduled and host messages leave: what is not configured is not sent."""

    sms: SmsTransport | None = None
    sms_from: str = ""
    telegram: tg.TelegramBot | None = None
    web_relay: live.Relay | None = None  # reaches sockets open in other processes


async def _to_web(
    db: Database, deps: chat.ChatDeps, channels: ChatChannels, delivery: chat.Delivery, kept: int
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


async def _send(channels: ChatChannels, delivery: chat.Delivery, now: datetime) -> str:
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


async def deliver_due(
    db: Database,
    deps: chat.ChatDeps,
    channels: ChatChannels,
    *,
    now: datetime,
    org_id: int | None = None,
) -> Counter[str]:
    """Wake what is due and empty the host outbox (of every organization, or one);
    outcomes counted per channel and kind (`sms:sent`, `web:relayed`, `web:kept`…)."""
    kept: dict[int, int] = {}  # delivery index -> its web inbox row
    async with db.transaction() as session:
        deliveries = await chat.wake_due(session, deps, now=now, org_id=org_id)
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
            outcome = await _send(channels, delivery, now)
        outcomes[f"{delivery.channel}:{outcome}"] += 1
        if outcome not in ("sent", "relayed", "kept", "empty"):
            log.warning(
                "chat message not delivered",
                conversation=delivery.conversation_id,
                channel=delivery.channel,
                outcome=outcome,
            )
    return outcomes


__all__ = ["ChatChannels", "deliver_due"]
