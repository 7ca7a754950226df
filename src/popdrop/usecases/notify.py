"""The drainer of the notification outbox (`outbound.outbox`): it renders each due row,
checks consent at the last moment and hands the message to the email or SMS transport.

Rules:
- One row at a time, each in three steps: claim a batch under a lease (one transaction);
  per row, render it and read consent in a short transaction right before the provider
  call; then record the outcome (sent, skipped, back to pending with a backoff, failed).
  No transaction is open during a provider call.
- Consent lives in audience, above `outbound`, which is why this drainer is a use case.
  A notice is a reply to something the person asked for (joining a waiting list), not
  marketing: it goes out unless the address is suppressed for its channel (an opt-out,
  STOP, a hard bounce, an erase) or the known contact revoked that channel's consent.
- A row whose reason is gone (the offer was claimed, withdrawn or has lapsed) is skipped,
  not sent: the renderer says so by returning None.
- Transient provider failures (and a transport that raises) retry with backoff up to the
  outbox's attempt bound; a permanent refusal fails the row at once. A drainer killed
  mid-send leaves its rows `sending`; once their lease is over the next drain takes them
  again (at least once: the email keeps one Message-ID across attempts).
- Channel `chat` (an offer for an RSVP made in a chat conversation; the recipient is
  `chat:<conversation id>`): "sending" queues the text in that conversation
  (`chat.host.queue_reply`, the way a host's console reply is queued), so it is in the
  transcript at once and the chat tick (`chat.tasks.deliver_due`) delivers it on the
  conversation's channel (web inbox/socket, SMS, Telegram) with the chat's own consent
  checks: an opted-out (STOP) conversation is skipped here and again by that tick.
- Kinds: `waitlist_offer` (the offer, with its claim link and its deadline in the event's
  time zone); `order_receipt` (`commerce.receipts.render`: lines, total, lane, window,
  pickup code and confirmation link). A kind without a renderer fails its row (a
  deployment mismatch, not a reason to retry forever).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.audience import consent, contact_points
from popdrop.chat import host
from popdrop.chat.models import Conversation
from popdrop.commerce import receipts
from popdrop.core import links
from popdrop.core.clock import Clock
from popdrop.core.db import Database
from popdrop.core.errors import PopdropError
from popdrop.core.localtime import local, slot_label
from popdrop.core.logging import log
from popdrop.core.signing import Signer
from popdrop.events.models import Event, TimeSlot
from popdrop.outbound import outbox
from popdrop.outbound.outbox import Channel, Notification, NotificationStatus
from popdrop.outbound.transports import (
    EmailTransport,
    OutboundEmail,
    OutboundSms,
    SendResult,
    SmsTransport,
)
from popdrop.rsvp.lifecycle import OfferStatus
from popdrop.rsvp.models import WaitlistOffer
from popdrop.rsvp.notices import OFFER_NOTICE, chat_conversation_of

DEADLINE_FORMAT = "%a %d %b, %H:%M"


@dataclass(frozen=True)
class Message:
    """A notice rendered for one channel (`subject` is unused by SMS)."""

    subject: str
    text: str


@dataclass(frozen=True)
class RenderContext:
    signer: Signer
    base_url: str
    now: datetime


# A renderer reads what it needs in the send-time transaction; None: nothing to send.
Renderer = Callable[
    [AsyncSession, Notification, dict[str, Any], RenderContext], Awaitable[Message | None]
]


async def render_waitlist_offer(
    session: AsyncSession, row: Notification, payload: dict[str, Any], ctx: RenderContext
) -> Message | None:
    """The offer's message: the places, the slot, the claim link and the deadline, all in
    the event's time zone. None once the offer is no longer open."""
    found = (
        await session.execute(
            select(WaitlistOffer, Event, TimeSlot)
            .join(Event, Event.id == WaitlistOffer.event_id)
            .join(TimeSlot, TimeSlot.id == WaitlistOffer.slot_id)
            .where(WaitlistOffer.id == payload["offer"], WaitlistOffer.org_id == row.org_id)
        )
    ).first()
    if found is None:
        return None
    offer, event, slot = found
    if offer.status != OfferStatus.OPEN or offer.expires_at <= ctx.now:
        return None
    link = links.waitlist_offer_url(ctx.signer, ctx.base_url, event.id, str(payload["code"]))
    deadline = local(offer.expires_at, event.timezone, DEADLINE_FORMAT)
    when = slot_label(slot.starts_at, slot.ends_at, event.timezone, slot.label)
    places = f"{offer.places} place{'s' if offer.places != 1 else ''}"
    if row.channel in (Channel.SMS, Channel.CHAT):
        text = f"{event.title}: {places} freed up for you ({when}). Claim by {deadline}: {link}"
        return Message(subject="", text=text)
    text = (
        f"Good news: {places} at {event.title} ({when}) freed up, and you are next on the "
        f"waiting list.\n\n"
        f"Claim {'them' if offer.places != 1 else 'it'} before {deadline}:\n{link}\n\n"
        f"Your code, if you are asked for it: {payload['code']}\n\n"
        f"If you don't claim by then, the place goes to the next person on the list.\n"
    )
    return Message(subject=f"A place is free for you: {event.title}", text=text)


async def render_order_receipt(
    session: AsyncSession, row: Notification, payload: dict[str, Any], ctx: RenderContext
) -> Message | None:
    """An order's receipt (`commerce.receipts`); None once the order ended."""
    receipt = await receipts.render(
        session,
        row.org_id,
        int(payload["order"]),
        sms=row.channel != Channel.EMAIL,
        signer=ctx.signer,
        base_url=ctx.base_url,
        now=ctx.now,
    )
    return None if receipt is None else Message(subject=receipt.subject, text=receipt.text)


RENDERERS: dict[str, Renderer] = {
    OFFER_NOTICE: render_waitlist_offer,
    receipts.RECEIPT_NOTICE: render_order_receipt,
}


async def refusal(session: AsyncSession, signer: Signer, row: Notification) -> str | None:
    """Why this row may not go out now (read at the last moment), or None."""
    if row.channel == Channel.CHAT:
        return await _chat_refusal(session, row)
    try:
        if row.channel == Channel.EMAIL:
            points = contact_points.contact_points(signer, row.recipient, None)
        else:
            points = contact_points.contact_points(signer, None, row.recipient)
    except PopdropError:
        # An address no provider would take: fail this row, never the whole drain.
        return "invalid_address"
    suppressed = await contact_points.suppressed_channels(session, row.org_id, points)
    if str(row.channel) in suppressed or "all" in suppressed:
        return "suppressed"
    contact = await contact_points.find_contact(session, row.org_id, points)
    if contact is not None:
        if contact.erased_at is not None:
            return "erased"
        if getattr(contact, consent.CONSENT_COLUMN[row.channel]) == "revoked":
            return "no_consent"
    return None


async def _chat_refusal(session: AsyncSession, row: Notification) -> str | None:
    """A chat notice goes to a conversation that still exists (not erased) and has not
    opted out (STOP); the chat tick checks the contact's consent again before the call."""
    conversation_id = chat_conversation_of(row.recipient)
    if conversation_id is None:
        return "erased"
    found = (
        await session.execute(
            select(Conversation.opted_out_at, Conversation.address).where(
                Conversation.id == conversation_id, Conversation.org_id == row.org_id
            )
        )
    ).first()
    if found is None or found.address is None:
        return "erased"
    if found.opted_out_at is not None:
        return "opted_out"
    return None


class Notifier:
    """Drains the outbox through the configured transports; one per worker process."""

    def __init__(
        self,
        db: Database,
        signer: Signer,
        clock: Clock,
        base_url: str,
        *,
        email: EmailTransport,
        sms: SmsTransport,
        sms_from: str,
        email_from: str | None = None,
        from_name: str = "",
        batch_size: int = 50,
        lease_seconds: float = outbox.LEASE_SECONDS,
        max_attempts: int = outbox.MAX_ATTEMPTS,
    ) -> None:
        self.db = db
        self.signer = signer
        self.clock = clock
        self.base_url = base_url
        self.email = email
        self.sms = sms
        self.sms_from = sms_from
        host = urlsplit(base_url).hostname or "localhost"
        self.email_from = email_from or f"no-reply@{host}"
        self.message_host = host
        self.from_name = from_name
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        # One drain at a time in this process; a second caller waits and drains what is left.
        self._lock = asyncio.Lock()

    async def drain(self) -> dict[str, int]:
        """Send every due row; the number of rows per outcome."""
        async with self._lock:
            counts: dict[str, int] = {}
            while True:
                async with self.db.transaction() as session:
                    rows = await outbox.claim(
                        session,
                        now=self.clock.now(),
                        limit=self.batch_size,
                        lease_seconds=self.lease_seconds,
                    )
                if not rows:
                    return counts
                for row in rows:
                    outcome = await self._deliver(row)
                    counts[outcome] = counts.get(outcome, 0) + 1

    async def _deliver(self, row: Notification) -> str:
        payload: dict[str, Any] = json.loads(row.payload)
        renderer = RENDERERS.get(row.kind)
        async with self.db.reader() as session:
            why = await refusal(session, self.signer, row)
            message = None
            if why is None and renderer is not None:
                context = RenderContext(self.signer, self.base_url, self.clock.now())
                message = await renderer(session, row, payload, context)
        if renderer is None:
            return await self._close(
                row, NotificationStatus.FAILED, error=f"no renderer: {row.kind}"
            )
        if why is not None:
            return await self._close(row, NotificationStatus.SKIPPED, error=why)
        if message is None:
            return await self._close(row, NotificationStatus.SKIPPED, error="no longer relevant")
        try:
            result = await self._send(row, message)
        except Exception as exc:  # a transport bug or outage must not lose the row
            result = SendResult(ok=False, error=f"{type(exc).__name__}: {exc}")
        if result.ok:
            return await self._close(row, NotificationStatus.SENT, provider_id=result.provider_id)
        if result.permanent:
            return await self._close(row, NotificationStatus.FAILED, error=result.error)
        async with self.db.transaction() as session:
            status = await outbox.retry(
                session,
                row,
                now=self.clock.now(),
                error=result.error or "provider refused",
                retry_after=result.retry_after,
                max_attempts=self.max_attempts,
            )
        log.info("notification not sent", id=row.id, error=result.error, then=str(status))
        return "retry" if status == NotificationStatus.PENDING else str(status)

    async def _to_chat(self, row: Notification, message: Message) -> SendResult:
        """Queue the text in the conversation; the chat tick delivers it on its channel."""
        conversation_id = chat_conversation_of(row.recipient)
        if conversation_id is None:
            return SendResult(ok=False, permanent=True, error="not a chat conversation")
        try:
            async with self.db.transaction() as session:
                await host.queue_reply(
                    session, row.org_id, conversation_id, text=message.text, now=self.clock.now()
                )
        except PopdropError as exc:  # erased meanwhile: no conversation to queue in
            return SendResult(ok=False, permanent=True, error=exc.reason)
        return SendResult(ok=True, provider_id=row.recipient)

    async def _send(self, row: Notification, message: Message) -> SendResult:
        if row.channel == Channel.CHAT:
            return await self._to_chat(row, message)
        if row.channel == Channel.EMAIL:
            return await self.email.send(
                OutboundEmail(
                    # The same on every attempt: a resend after a crash is recognisable.
                    message_id=f"<notification-{row.id}@{self.message_host}>",
                    to=row.recipient,
                    from_address=self.email_from,
                    from_name=self.from_name,
                    subject=message.subject,
                    text=message.text,
                    headers={"X-Popdrop-Notification": f"{row.kind}:{row.id}"},
                    org_id=row.org_id,
                )
            )
        return await self.sms.send(
            OutboundSms(
                to=row.recipient, from_number=self.sms_from, body=message.text, org_id=row.org_id
            )
        )

    async def _close(
        self,
        row: Notification,
        status: NotificationStatus,
        *,
        provider_id: str | None = None,
        error: str | None = None,
    ) -> str:
        async with self.db.transaction() as session:
            await outbox.finish(
                session, row.id, status, now=self.clock.now(), provider_id=provider_id, error=error
            )
        return str(status)
