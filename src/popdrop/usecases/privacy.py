"""GDPR: what we hold about a person (export), forgetting them (erase), and retention.

Erase removes the person's email and phone from every table that can hold them in clear
(contacts, RSVPs, tickets, holds, orders, voucher contact refs, stored idempotent
answers), keeps
their activity and consent ledger attached to an anonymous contact row (so funnels still
add up), and keeps keyed hashes on the suppression list so a later import cannot bring
them back. The audit ledger is append-only and never holds contact points (the vault
writes a keyed digest of a contact ref), so nothing there needs rewriting.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.audience import consent, contact_points, contacts, settings
from popdrop.audience.models import Contact, ContactActivity, ContactLabel
from popdrop.audience.schemas import ConsentChange, EraseResult, PurgeResult
from popdrop.chat import console
from popdrop.checkin.models import Ticket
from popdrop.commerce.models import Order
from popdrop.core import audit
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.idempotency import IdempotencyRecord
from popdrop.core.signing import Signer
from popdrop.inventory.models import Hold
from popdrop.metrics import log as funnel
from popdrop.outbound import outbox
from popdrop.outbound.models import MailboxMessage
from popdrop.rsvp.models import Rsvp
from popdrop.rsvp.notices import CHAT_SOURCE
from popdrop.usecases import surveys
from popdrop.vouchers.models import Redemption, VoucherBatch, VoucherContactUse

PURGE_BATCH = 500
FUNNEL_PURGE_BATCH = 10_000


async def find_by_point(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    *,
    email: str | None = None,
    phone: str | None = None,
) -> Contact:
    principal.require("audience:read")
    contact = await contact_points.find_contact(
        session, principal.org_id, contact_points.contact_points(signer, email, phone)
    )
    if contact is None:
        raise not_found("contact")
    return contact


def _row(obj: Any, *names: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(obj, name)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    return out


async def export_contact(
    session: AsyncSession, principal: Principal, contact_id: int, *, now: datetime
) -> dict[str, Any]:
    """Everything held about one person, as JSON-ready data (the right of access)."""
    contact = await contact_points.get_contact(session, principal, contact_id)
    view = await contacts.contact_view(session, contact, now)
    consents = await consent.consent_history(session, principal, contact_id)
    activity = (
        await session.scalars(
            select(ContactActivity)
            .where(ContactActivity.contact_id == contact.id)
            .order_by(ContactActivity.at)
        )
    ).all()
    suppressed = await contact_points.suppressed_channels(
        session, principal.org_id, contact_points.points_of(contact)
    )
    rsvps: list[dict[str, Any]] = []
    tickets: list[dict[str, Any]] = []
    orders: list[dict[str, Any]] = []
    points = [p for p in (contact.email, contact.phone) if p]
    if points:
        for order in await session.scalars(
            select(Order).where(
                Order.org_id == principal.org_id,
                or_(
                    Order.receipt_email.in_(points),
                    Order.receipt_phone.in_(points),
                    Order.contact_ref.in_(points),
                ),
            )
        ):
            orders.append(
                _row(order, "id", "event_id", "status", "currency", "total_minor", "created_at")
            )
        for rsvp in await session.scalars(
            select(Rsvp).where(
                Rsvp.org_id == principal.org_id,
                or_(Rsvp.email.in_(points), Rsvp.phone.in_(points)),
            )
        ):
            rsvps.append(
                _row(rsvp, "id", "event_id", "slot_id", "places", "status", "created_at")
                | {"consent_text": rsvp.consent_text}
            )
        for ticket in await session.scalars(
            select(Ticket).where(Ticket.org_id == principal.org_id, Ticket.holder_ref.in_(points))
        ):
            tickets.append(_row(ticket, "id", "event_id", "status", "created_at", "checked_in_at"))
    return {
        "exported_at": now.isoformat(),
        "contact": view.model_dump(mode="json"),
        "consent_ledger": [consent.consent_event_out(e).model_dump(mode="json") for e in consents],
        "activity": [_row(a, "kind", "event_id", "ref", "at") for a in activity],
        "suppressed_channels": suppressed,
        "rsvps": rsvps,
        "tickets": tickets,
        "orders": orders,
    }


async def erase_contact(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    contact_id: int,
    *,
    now: datetime,
) -> EraseResult:
    """Forget a person: PII gone everywhere, activity kept anonymous, suppression kept."""
    principal.require("audience:write")
    contact = await contact_points.get_contact(session, principal, contact_id)
    if contact.erased_at is not None:
        raise PopdropError("conflict", "this contact is already erased")
    org_id = principal.org_id
    points = contact_points.points_of(contact)
    clear = [p for p in (contact.email, contact.phone) if p]
    scrubbed: dict[str, int] = {}
    for channel, column in consent.CONSENT_COLUMN.items():
        if getattr(contact, column) in ("granted", "pending"):
            await consent.change_consent(
                session,
                signer,
                contact,
                ConsentChange(channel=channel, action="revoke", wording="Erased on request"),
                now=now,
                source="erase",
            )
    await consent.suppress(session, org_id, points, "all", "erased", now)
    if clear:
        # An opaque stand-in keeps per-person counters (voucher limits) working.
        stand_in = f"erased:{signer.keyed_hash(f'erased:{contact.id}').hex()[:16]}"
        scrubbed["rsvps"] = await _count(
            session,
            update(Rsvp).where(Rsvp.org_id == org_id, Rsvp.email.in_(clear)).values(email=None),
        ) + await _count(
            session,
            update(Rsvp).where(Rsvp.org_id == org_id, Rsvp.phone.in_(clear)).values(phone=None),
        )
        scrubbed["tickets"] = await _count(
            session,
            update(Ticket)
            .where(Ticket.org_id == org_id, Ticket.holder_ref.in_(clear))
            .values(holder_ref=None),
        )
        scrubbed["holds"] = await _count(
            session,
            update(Hold)
            .where(Hold.org_id == org_id, Hold.contact_ref.in_(clear))
            .values(contact_ref=stand_in),
        )
        scrubbed["orders"] = (
            await _count(
                session,
                update(Order)
                .where(Order.org_id == org_id, Order.receipt_email.in_(clear))
                .values(receipt_email=None),
            )
            + await _count(
                session,
                update(Order)
                .where(Order.org_id == org_id, Order.receipt_phone.in_(clear))
                .values(receipt_phone=None),
            )
            + await _count(
                session,
                update(Order)
                .where(Order.org_id == org_id, Order.contact_ref.in_(clear))
                .values(contact_ref=stand_in),
            )
        )
        scrubbed["redemptions"] = await _count(
            session,
            update(Redemption)
            .where(Redemption.org_id == org_id, Redemption.contact_ref.in_(clear))
            .values(contact_ref=stand_in),
        )
        scrubbed["voucher_contact_uses"] = await _scrub_contact_uses(
            session, org_id, clear, stand_in
        )
        # Stored answers of idempotent calls may quote the person (an RSVP answer does).
        scrubbed["idempotency_records"] = await _count(
            session,
            delete(IdempotencyRecord).where(
                IdempotencyRecord.org_id == org_id,
                or_(*[IdempotencyRecord.body.contains(p, autoescape=True) for p in clear]),
            ),
        )
    if clear:
        # The development mailbox keeps what would have gone out, addressed in clear.
        scrubbed["mailbox_messages"] = await _count(
            session,
            delete(MailboxMessage).where(
                MailboxMessage.org_id == org_id, MailboxMessage.recipient.in_(clear)
            ),
        )
        # Notifications to the person: unsent ones must never go out, sent ones name them.
        scrubbed["notifications"] = await outbox.forget(session, org_id, clear)
    # Chats: the conversation's address, transcript and typed contact details.
    chats = await console.erase_person(
        session,
        signer,
        org_id,
        contact_id=contact.id,
        email=contact.email,
        phone=contact.phone,
        now=now,
    )
    scrubbed["chat_conversations"] = len(chats)
    # Waiting-list notices queued for those conversations (the offer's code) go too.
    chat_notices = [f"{CHAT_SOURCE}{conversation_id}" for conversation_id in chats]
    scrubbed["notifications"] = scrubbed.get("notifications", 0) + await outbox.forget(
        session, org_id, chat_notices
    )
    scrubbed["labels"] = await _count(
        session, delete(ContactLabel).where(ContactLabel.contact_id == contact.id)
    )
    # The funnel log keeps the events (counts still add up) but no longer says whose.
    people = [funnel.contact_person(contact.id)]
    people += [
        person
        for person in (
            funnel.point_person(contact.email_hash),
            funnel.point_person(contact.phone_hash),
        )
        if person is not None
    ]
    scrubbed["funnel_events"] = await _count(
        session,
        update(funnel.funnel_events)
        .where(funnel.funnel_events.c.org_id == org_id, funnel.funnel_events.c.person.in_(people))
        .values(person=None),
    )
    # Day+1 surveys: the score stays (anonymous); the comment and the link to the person go.
    scrubbed["survey_invitations"] = await surveys.forget_contact(session, org_id, contact.id)
    await session.execute(
        update(Contact)
        .where(Contact.id == contact.id)
        .values(
            email=None,
            phone=None,
            email_hash=None,
            phone_hash=None,
            first_name=None,
            locale=None,
            time_zone=None,
            source=None,
            lat=None,
            lon=None,
            erased_at=now,
            updated_at=now,
        )
    )
    await audit.append(
        session,
        org_id=org_id,
        actor=principal.actor,
        action="contact.erase",
        subject=f"contact:{contact.id}",
        payload={"contact": contact.id, "scrubbed": scrubbed},
        at=now,
    )
    await session.flush()
    return EraseResult(contact_id=contact.id, scrubbed=scrubbed)


async def _count(session: AsyncSession, statement: Any) -> int:
    result = await session.execute(statement)
    return int(getattr(result, "rowcount", 0) or 0)


async def _scrub_contact_uses(
    session: AsyncSession, org_id: int, clear: list[str], stand_in: str
) -> int:
    """The contact ref is part of the key: move each counter to the stand-in, adding up."""
    rows = (
        await session.execute(
            select(
                VoucherContactUse.batch_id, VoucherContactUse.contact_ref, VoucherContactUse.uses
            )
            .join(VoucherBatch, VoucherBatch.id == VoucherContactUse.batch_id)
            .where(VoucherBatch.org_id == org_id, VoucherContactUse.contact_ref.in_(clear))
            .distinct()
        )
    ).all()
    for batch_id, ref, uses in rows:
        await session.execute(
            delete(VoucherContactUse).where(
                VoucherContactUse.batch_id == batch_id, VoucherContactUse.contact_ref == ref
            )
        )
        existing = await session.get(VoucherContactUse, (batch_id, stand_in))
        if existing is None:
            session.add(VoucherContactUse(batch_id=batch_id, contact_ref=stand_in, uses=uses))
        else:
            existing.uses += uses
        await session.flush()
    return len(rows)


async def purge_inactive(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    *,
    now: datetime,
    months: int | None,
) -> PurgeResult:
    """Retention: erase contacts with no activity (or, never engaged, no change) for `months`
    (default: the organization's retention rule)."""
    principal.require("audience:write")
    if months is None:
        months = (await settings.get_settings(session, principal.org_id)).retention_months
    if months is None:
        raise PopdropError("invalid_request", "months: no retention rule is set for this audience")
    cutoff = now - timedelta(days=30 * months)
    last_seen = func.coalesce(Contact.last_engaged_at, Contact.updated_at)
    erased = 0
    while True:
        ids = list(
            (
                await session.scalars(
                    select(Contact.id)
                    .where(
                        Contact.org_id == principal.org_id,
                        Contact.erased_at.is_(None),
                        last_seen < cutoff,
                    )
                    .order_by(Contact.id)
                    .limit(PURGE_BATCH)
                )
            ).all()
        )
        if not ids:
            break
        for contact_id in ids:
            await erase_contact(session, signer, principal, contact_id, now=now)
            erased += 1
    deleted = await purge_funnel(session, principal.org_id, cutoff)
    return PurgeResult(erased=erased, cutoff=cutoff, funnel_events_deleted=deleted)


async def purge_funnel(session: AsyncSession, org_id: int, cutoff: datetime) -> int:
    """Retention of the funnel log: its events before `cutoff` go, in batches. Only events
    already folded into the rollups (`metrics.rollups`), which keep their counts; an event
    not folded yet goes at the next purge. A rebuild of the rollups then covers only what
    the log still holds."""
    events = funnel.funnel_events
    deleted = 0
    while True:
        batch = (
            select(events.c.id)
            .where(events.c.org_id == org_id, events.c.at < cutoff, events.c.rolled)
            .limit(FUNNEL_PURGE_BATCH)
        )
        done = await _count(session, delete(events).where(events.c.id.in_(batch)))
        deleted += done
        if done < FUNNEL_PURGE_BATCH:
            return deleted
