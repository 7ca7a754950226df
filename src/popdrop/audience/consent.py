"""Consent per channel, and reading it at send time.

Rules:
- Consent per channel is a state on the contact (none, pending, granted, revoked) with
  every change in `consent_events`. A revoke also puts the contact point on the
  suppression list, so "granted" always means "not suppressed" and segments only read the
  state column.
- A suppressed identifier is only re-subscribed by the person themselves (a form, START,
  a double opt-in confirmation); an import or an operator never lifts it, and an erased
  identifier is never re-subscribed at all (`suppressed`).
- An opt-out is an UPDATE of the contact's row, acknowledged (the one-click 200, the STOP
  reply) only after its commit. A sender reads consent with `hold_consent` right before a
  provider call and, on PostgreSQL, keeps that row share-locked until the call returned:
  the opt-out's UPDATE waits for it, so no provider call for that person starts after the
  acknowledgement (docs/audience.md, "When an opt-out takes effect").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    delete,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.audience.contact_points import (
    ContactPoints,
    get_contact,
    is_erased,
    points_of,
    suppressed_channels,
)
from popdrop.audience.models import (
    ConsentEvent,
    Contact,
    Suppression,
)
from popdrop.audience.schemas import (
    ConsentChange,
    ConsentEventOut,
)
from popdrop.core import links
from popdrop.core.errors import PopdropError
from popdrop.core.signing import Signer

CONSENT_COLUMN = {"email": "consent_email", "sms": "consent_sms", "chat": "consent_chat"}
# The contact point a channel's opt-out suppresses (chat identities belong to the chat work).
CHANNEL_POINT = {"email": "email", "sms": "phone", "chat": "phone"}
# Sources that are the person's own fresh act: only these lift an opt-out suppression.
SELF_SOURCES = frozenset({"form", "double_opt_in", "sms_keyword", "chat_keyword", "preferences"})


# ---------------------------------------------------------------- consent


async def suppress(
    session: AsyncSession,
    org_id: int,
    points: ContactPoints,
    channel: str,
    reason: str,
    now: datetime,
) -> None:
    point = CHANNEL_POINT.get(channel)
    targets: list[tuple[str, bytes]] = []
    if channel == "all":
        targets = [
            (k, h) for k, h in (("email", points.email_hash), ("phone", points.phone_hash)) if h
        ]
    elif point == "email" and points.email_hash:
        targets = [("email", points.email_hash)]
    elif point == "phone" and points.phone_hash:
        targets = [("phone", points.phone_hash)]
    for kind, digest in targets:
        existing = await session.get(Suppression, (org_id, digest, channel))
        if existing is None:
            session.add(
                Suppression(
                    org_id=org_id,
                    identifier_hash=digest,
                    channel=channel,
                    kind=kind,
                    reason=reason,
                    created_at=now,
                )
            )
        elif reason == "erased":
            existing.reason = reason
    await session.flush()


async def change_consent(
    session: AsyncSession,
    signer: Signer,
    contact: Contact,
    change: ConsentChange,
    *,
    now: datetime,
    source: str | None = None,
) -> ConsentEvent | None:
    """Apply one grant / request / revoke; None when it changes nothing (idempotent)."""
    column = CONSENT_COLUMN[change.channel]
    state = getattr(contact, column)
    source = source or change.source
    points = points_of(contact)
    if contact.erased_at is not None:
        raise PopdropError("suppressed", "this contact was erased")
    if change.action in ("grant", "request"):
        if CHANNEL_POINT[change.channel] == "email" and contact.email is None:
            raise PopdropError("invalid_request", "this contact has no email address")
        if change.channel == "sms" and contact.phone is None:
            raise PopdropError("invalid_request", "this contact has no phone number")
        suppressed = await suppressed_channels(session, contact.org_id, points)
        if change.channel in suppressed or "all" in suppressed:
            if source not in SELF_SOURCES or is_erased(suppressed):
                raise PopdropError(
                    "suppressed",
                    f"this person opted out of {change.channel}; only they can opt back in",
                )
            await session.execute(
                delete(Suppression).where(
                    Suppression.org_id == contact.org_id,
                    Suppression.identifier_hash.in_(points.hashes),
                    Suppression.channel == change.channel,
                    Suppression.reason == "opt_out",
                )
            )
        target = "granted" if change.action == "grant" else "pending"
        if state == target or (target == "pending" and state == "granted"):
            return None
    else:
        target = "revoked"
        if state == "revoked":
            await suppress(session, contact.org_id, points, change.channel, "opt_out", now)
            return None
    setattr(contact, column, target)
    contact.updated_at = now
    event = ConsentEvent(
        org_id=contact.org_id,
        contact_id=contact.id,
        channel=change.channel,
        action=change.action,
        source=source,
        wording=change.wording,
        proof=change.proof,
        at=now,
    )
    session.add(event)
    if target == "revoked":
        await suppress(session, contact.org_id, points, change.channel, "opt_out", now)
    await session.flush()
    return event


async def set_consent(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    contact_id: int,
    change: ConsentChange,
    *,
    now: datetime,
) -> ConsentEvent | None:
    principal.require("audience:write")
    contact = await get_contact(session, principal, contact_id)
    return await change_consent(session, signer, contact, change, now=now)


def consent_event_out(event: ConsentEvent) -> ConsentEventOut:
    return ConsentEventOut(
        id=event.id,
        contact_id=event.contact_id,
        channel=event.channel,
        action=event.action,
        source=event.source,
        wording=event.wording,
        proof=event.proof,
        at=event.at,
    )


async def consent_history(
    session: AsyncSession, principal: Principal, contact_id: int
) -> list[ConsentEvent]:
    contact = await get_contact(session, principal, contact_id)
    return list(
        (
            await session.scalars(
                select(ConsentEvent)
                .where(ConsentEvent.contact_id == contact.id)
                .order_by(ConsentEvent.at, ConsentEvent.id)
            )
        ).all()
    )


async def confirm_double_opt_in(
    session: AsyncSession, signer: Signer, token: str, *, now: datetime
) -> Contact:
    """The person clicked the confirmation link: pending → granted (source double_opt_in)."""
    ref, channel = links.read_consent_confirm(signer, token)  # `link_expired` after a week
    contact = await contact_of_link(session, ref)
    if channel not in CONSENT_COLUMN:
        raise PopdropError("link_invalid", "this link is not valid")
    state = getattr(contact, CONSENT_COLUMN[channel])
    if state not in ("pending", "granted"):
        raise PopdropError("link_invalid", "this confirmation was withdrawn; subscribe again")
    wording = await _pending_wording(session, contact.id, channel)
    await change_consent(
        session,
        signer,
        contact,
        ConsentChange(channel=channel, action="grant", wording=wording, source="form"),
        now=now,
        source="double_opt_in",
    )
    return contact


async def _pending_wording(session: AsyncSession, contact_id: int, channel: str) -> str:
    wording = await session.scalar(
        select(ConsentEvent.wording)
        .where(ConsentEvent.contact_id == contact_id, ConsentEvent.channel == channel)
        .order_by(ConsentEvent.at.desc(), ConsentEvent.id.desc())
        .limit(1)
    )
    return wording or ""


async def contact_of_link(session: AsyncSession, ref: links.ContactRef) -> Contact:
    """The live contact a signed link names (`core.links`), or `link_invalid`."""
    contact = await session.scalar(
        select(Contact)
        .where(Contact.id == ref.contact_id, Contact.org_id == ref.org_id)
        .execution_options(populate_existing=True)
    )
    if contact is None or contact.erased_at is not None:
        raise PopdropError("link_invalid", "this link is no longer valid")
    return contact


# ---------------------------------------------------------------- consent at send time


@dataclass(frozen=True)
class ConsentNow:
    """What a sender needs to know about a contact right before a provider call."""

    id: int
    erased_at: datetime | None
    email: str | None
    phone: str | None
    consent_email: str
    consent_sms: str
    consent_chat: str

    def consent(self, channel: str) -> str:
        return str(getattr(self, CONSENT_COLUMN[channel]))


async def hold_consent(
    session: AsyncSession, contact_ids: Sequence[int]
) -> tuple[dict[int, ConsentNow], set[int]]:
    """The contacts' consent as committed now, and the ids that are `busy`.

    On PostgreSQL every returned row stays share-locked (`FOR SHARE`) until the caller's
    transaction ends: an opt-out of that contact (an UPDATE of its row) waits until then,
    so it cannot commit, nor be acknowledged, while the caller's provider call runs. Rows
    that another transaction is changing right now are skipped rather than waited for
    (`SKIP LOCKED`: the caller never waits on a lock while holding others, so it takes
    part in no deadlock) and come back in `busy`: ask again a moment later. A contact that
    no longer exists is simply absent from both. SQLite has no row locks: there the read
    is a fresh snapshot and nothing is held.
    """
    ids = sorted(set(contact_ids))
    if not ids:
        return {}, set()
    query = (
        select(
            Contact.id,
            Contact.erased_at,
            Contact.email,
            Contact.phone,
            Contact.consent_email,
            Contact.consent_sms,
            Contact.consent_chat,
        )
        .where(Contact.id.in_(ids))
        .order_by(Contact.id)
    )
    locking = (await session.connection()).dialect.name == "postgresql"
    if locking:
        query = query.with_for_update(read=True, skip_locked=True)
    found = {int(row[0]): ConsentNow(*row) for row in (await session.execute(query)).all()}
    busy: set[int] = set()
    missing = [i for i in ids if i not in found]
    if locking and missing:
        busy = set((await session.scalars(select(Contact.id).where(Contact.id.in_(missing)))).all())
    return found, busy
