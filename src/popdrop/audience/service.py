"""Contacts, consent, opt-outs, activity and segments. Every function takes the caller's
session and `now`; tenancy is applied here (`org_id = principal.org_id`).

Rules:
- A contact is recognised by the keyed hash of its normalised email or phone
  (`core.identity`); a request that names two existing contacts is refused (`conflict`).
- Consent per channel is a state on the contact (none, pending, granted, revoked) with
  every change in `consent_events`. A revoke also puts the contact point on the
  suppression list, so "granted" always means "not suppressed" and segments only read the
  state column.
- A suppressed identifier is only re-subscribed by the person themselves (a form, START,
  a double opt-in confirmation); an import or an operator never lifts it, and an erased
  identifier is never re-subscribed at all (`suppressed`).
- Opt-out keywords take effect in the same transaction as the inbound message, before
  anything else reads the contact: a send that re-checks consent right before the provider
  call (messaging) sees it at once.
- An opt-out is an UPDATE of the contact's row, acknowledged (the one-click 200, the STOP
  reply) only after its commit. A sender reads consent with `hold_consent` right before a
  provider call and, on PostgreSQL, keeps that row share-locked until the call returned:
  the opt-out's UPDATE waits for it, so no provider call for that person starts after the
  acknowledgement (docs/audience.md, "When an opt-out takes effect").
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    case,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.models import Organization
from popdrop.accounts.service import Principal
from popdrop.audience.models import (
    AudienceSettings,
    ConsentEvent,
    Contact,
    ContactActivity,
    ContactLabel,
    Segment,
    Suppression,
)
from popdrop.audience.schemas import (
    ActivityIn,
    AudienceSettingsIn,
    AudienceSettingsOut,
    Bucket,
    ConsentChange,
    ConsentEventOut,
    ContactIn,
    ContactOut,
    ContactPatch,
    InboundResult,
    PreferencesIn,
    SegmentCount,
    SegmentIn,
    SegmentOut,
    SegmentRules,
)
from popdrop.checkin.models import Visit
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.identity import (
    identity_hash,
    normalize_email,
    normalize_phone,
    phone_time_zone,
)
from popdrop.core.schemas import require_clean_text
from popdrop.core.signing import Signer
from popdrop.events.models import Event
from popdrop.rsvp.models import Rsvp

CONSENT_COLUMN = {"email": "consent_email", "sms": "consent_sms", "chat": "consent_chat"}
# The contact point a channel's opt-out suppresses (chat identities belong to the chat work).
CHANNEL_POINT = {"email": "email", "sms": "phone", "chat": "phone"}
# Sources that are the person's own fresh act: only these lift an opt-out suppression.
SELF_SOURCES = frozenset({"form", "double_opt_in", "sms_keyword", "chat_keyword", "preferences"})
STOP_WORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
)
START_WORDS = frozenset({"START", "UNSTOP"})
HELP_WORDS = frozenset({"HELP", "INFO"})
YES_WORDS = frozenset({"YES", "Y"})
DOUBLE_OPT_IN_PURPOSE = "consent-confirm"
PREFERENCES_PURPOSE = "preferences"
DOUBLE_OPT_IN_MAX_AGE = 7 * 24 * 3600
DEFAULT_HELP = "{org}: you get event news and offers. Reply STOP to opt out, START to opt back in."
STOP_REPLY = (
    "{org}: you are unsubscribed and will get no more messages. Reply START to resubscribe."
)
START_REPLY = "{org}: you are subscribed again. Reply STOP to opt out at any time."
YES_REPLY = "{org}: thanks, your subscription is confirmed. Reply STOP to opt out."
_TRIM = (
    string.whitespace
    + string.punctuation
    + "\u00a1\u00bf\u00ab\u00bb\u201c\u201d\u2018\u2019\u2026"
)
KM_PER_DEGREE = 111.32


# ---------------------------------------------------------------- contact points


@dataclass(frozen=True)
class ContactPoints:
    email: str | None
    phone: str | None
    email_hash: bytes | None
    phone_hash: bytes | None

    @property
    def hashes(self) -> list[bytes]:
        return [h for h in (self.email_hash, self.phone_hash) if h is not None]


def contact_points(
    signer: Signer, email: str | None, phone: str | None, region: str | None = None
) -> ContactPoints:
    """Validate and normalise; refuse with `invalid_request` (detail `field`) when neither
    is given or one is malformed."""
    if not (email and email.strip()) and not (phone and phone.strip()):
        raise PopdropError(
            "invalid_request",
            "contact: give an email or a phone number",
            detail={"field": "contact"},
        )
    clean_email = normalize_email(email) if email and email.strip() else None
    clean_phone = normalize_phone(phone, region) if phone and phone.strip() else None
    return ContactPoints(
        clean_email,
        clean_phone,
        identity_hash(signer, "email", clean_email) if clean_email else None,
        identity_hash(signer, "phone", clean_phone) if clean_phone else None,
    )


# ---------------------------------------------------------------- settings


async def get_settings(session: AsyncSession, org_id: int) -> AudienceSettingsOut:
    row = await session.get(AudienceSettings, org_id)
    if row is None:
        return AudienceSettingsOut(hot_days=7, warm_days=60, help_text="", retention_months=None)
    return AudienceSettingsOut(
        hot_days=row.hot_days,
        warm_days=row.warm_days,
        help_text=row.help_text,
        retention_months=row.retention_months,
    )


async def update_settings(
    session: AsyncSession, principal: Principal, spec: AudienceSettingsIn
) -> AudienceSettingsOut:
    principal.require("audience:write")
    if spec.warm_days <= spec.hot_days:
        raise PopdropError("invalid_request", "warm_days: must be more than hot_days")
    row = await session.get(AudienceSettings, principal.org_id)
    if row is None:
        row = AudienceSettings(org_id=principal.org_id)
        session.add(row)
    row.hot_days = spec.hot_days
    row.warm_days = spec.warm_days
    row.help_text = spec.help_text
    row.retention_months = spec.retention_months
    await session.flush()
    return await get_settings(session, principal.org_id)


# ---------------------------------------------------------------- recency


def bucket_of(
    last_engaged_at: datetime | None, now: datetime, hot_days: int, warm_days: int
) -> Bucket:
    """hot: engaged within `hot_days` (the boundary itself is hot); warm: within `warm_days`
    (boundary warm); cold: longer ago; never: no activity recorded."""
    if last_engaged_at is None:
        return "never"
    age = now - last_engaged_at
    if age <= timedelta(days=hot_days):
        return "hot"
    if age <= timedelta(days=warm_days):
        return "warm"
    return "cold"


def bucket_condition(
    bucket: Bucket, now: datetime, hot_days: int, warm_days: int
) -> ColumnElement[bool]:
    """The same buckets as `bucket_of`, as a SQL condition on `contacts.last_engaged_at`."""
    column = Contact.last_engaged_at
    hot_from = now - timedelta(days=hot_days)
    warm_from = now - timedelta(days=warm_days)
    if bucket == "never":
        return column.is_(None)
    if bucket == "hot":
        return column >= hot_from
    if bucket == "warm":
        return and_(column >= warm_from, column < hot_from)
    return column < warm_from


# ---------------------------------------------------------------- contacts


async def _labels(
    session: AsyncSession, contact_ids: Sequence[int]
) -> dict[int, dict[str, list[str]]]:
    found: dict[int, dict[str, list[str]]] = {
        cid: {"tag": [], "interest": []} for cid in contact_ids
    }
    if not contact_ids:
        return found
    rows = await session.execute(
        select(ContactLabel.contact_id, ContactLabel.kind, ContactLabel.value)
        .where(ContactLabel.contact_id.in_(contact_ids))
        .order_by(ContactLabel.value)
    )
    for contact_id, kind, value in rows:
        found[contact_id][kind].append(value)
    return found


def contact_out(
    contact: Contact, labels: dict[str, list[str]], now: datetime, settings: AudienceSettingsOut
) -> ContactOut:
    return ContactOut(
        id=contact.id,
        email=contact.email,
        phone=contact.phone,
        first_name=contact.first_name,
        locale=contact.locale,
        time_zone=contact.time_zone,
        source=contact.source,
        lat=contact.lat,
        lon=contact.lon,
        tags=labels.get("tag", []),
        interests=labels.get("interest", []),
        consent={ch: getattr(contact, col) for ch, col in CONSENT_COLUMN.items()},
        frequency=contact.frequency,
        bucket=bucket_of(contact.last_engaged_at, now, settings.hot_days, settings.warm_days),
        created_at=contact.created_at,
        last_engaged_at=contact.last_engaged_at,
        erased_at=contact.erased_at,
    )


async def contacts_out(
    session: AsyncSession, org_id: int, contacts: Sequence[Contact], now: datetime
) -> list[ContactOut]:
    settings = await get_settings(session, org_id)
    labels = await _labels(session, [c.id for c in contacts])
    return [contact_out(c, labels[c.id], now, settings) for c in contacts]


async def contact_view(session: AsyncSession, contact: Contact, now: datetime) -> ContactOut:
    return (await contacts_out(session, contact.org_id, [contact], now))[0]


async def get_contact(session: AsyncSession, principal: Principal, contact_id: int) -> Contact:
    principal.require("audience:read")
    contact = await session.scalar(
        select(Contact)
        .where(Contact.id == contact_id, Contact.org_id == principal.org_id)
        .execution_options(populate_existing=True)
    )
    if contact is None:
        raise not_found("contact")
    return contact


async def find_contact(session: AsyncSession, org_id: int, points: ContactPoints) -> Contact | None:
    """The one contact these points name; `conflict` if they name two."""
    if not points.hashes:
        return None
    conditions = []
    if points.email_hash is not None:
        conditions.append(Contact.email_hash == points.email_hash)
    if points.phone_hash is not None:
        conditions.append(Contact.phone_hash == points.phone_hash)
    found = list(
        (
            await session.scalars(
                select(Contact)
                .where(Contact.org_id == org_id, or_(*conditions))
                .execution_options(populate_existing=True)
            )
        ).all()
    )
    if len(found) > 1:
        raise PopdropError("conflict", "this email and this phone belong to two different contacts")
    return found[0] if found else None


async def suppressed_channels(
    session: AsyncSession, org_id: int, points: ContactPoints
) -> dict[str, str]:
    """{channel: reason} of every suppression on these points (`all` when erased)."""
    if not points.hashes:
        return {}
    rows = await session.execute(
        select(Suppression.channel, Suppression.reason).where(
            Suppression.org_id == org_id, Suppression.identifier_hash.in_(points.hashes)
        )
    )
    return {channel: reason for channel, reason in rows}


def _is_erased(suppressions: dict[str, str]) -> bool:
    return suppressions.get("all") == "erased"


async def upsert_contact(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    spec: ContactIn,
    *,
    now: datetime,
) -> tuple[Contact, bool]:
    """Create a contact or merge into the one its email/phone names; (contact, created)."""
    principal.require("audience:write")
    points = contact_points(signer, spec.email, spec.phone, spec.phone_region)
    suppressions = await suppressed_channels(session, principal.org_id, points)
    if _is_erased(suppressions):
        raise PopdropError(
            "suppressed", "this person asked to be erased; they cannot be added again"
        )
    contact = await find_contact(session, principal.org_id, points)
    created = contact is None
    if contact is None:
        contact = Contact(
            org_id=principal.org_id,
            consent_email="none",
            consent_sms="none",
            consent_chat="none",
            frequency="all",
            created_at=now,
        )
        session.add(contact)
    if points.email and contact.email is None:
        contact.email, contact.email_hash = points.email, points.email_hash
    if points.phone and contact.phone is None:
        contact.phone, contact.phone_hash = points.phone, points.phone_hash
    for name in ("first_name", "locale", "source", "lat", "lon"):
        value = getattr(spec, name)
        if value is not None:
            setattr(contact, name, value)
    contact.time_zone = (
        spec.time_zone
        or contact.time_zone
        or (phone_time_zone(contact.phone) if contact.phone else None)
    )
    contact.updated_at = now
    try:
        async with session.begin_nested():
            await session.flush()
    except IntegrityError as exc:  # a concurrent insert of the same person
        raise PopdropError("conflict", "this contact was just added by another request") from exc
    await add_labels(session, contact, "tag", spec.tags)
    await add_labels(session, contact, "interest", spec.interests)
    for grant in spec.consents:
        await change_consent(
            session,
            signer,
            contact,
            ConsentChange(
                channel=grant.channel,
                action="grant",
                wording=grant.wording,
                source=grant.source,
                proof=grant.proof,
            ),
            now=now,
        )
    return contact, created


async def add_labels(
    session: AsyncSession, contact: Contact, kind: str, values: Sequence[str]
) -> int:
    if not values:
        return 0
    have = set(
        (
            await session.scalars(
                select(ContactLabel.value).where(
                    ContactLabel.contact_id == contact.id, ContactLabel.kind == kind
                )
            )
        ).all()
    )
    new = [v for v in values if v not in have]
    for value in new:
        session.add(
            ContactLabel(contact_id=contact.id, kind=kind, value=value, org_id=contact.org_id)
        )
    await session.flush()
    return len(new)


async def patch_contact(
    session: AsyncSession,
    principal: Principal,
    contact_id: int,
    spec: ContactPatch,
    *,
    now: datetime,
) -> Contact:
    principal.require("audience:write")
    contact = await get_contact(session, principal, contact_id)
    if contact.erased_at is not None:
        raise PopdropError("conflict", "this contact was erased")
    for name in ("first_name", "locale", "time_zone"):
        value = getattr(spec, name)
        if value is not None:
            setattr(contact, name, value)
    await add_labels(session, contact, "tag", spec.add_tags)
    if spec.remove_tags:
        await session.execute(
            delete(ContactLabel).where(
                ContactLabel.contact_id == contact.id,
                ContactLabel.kind == "tag",
                ContactLabel.value.in_(spec.remove_tags),
            )
        )
    contact.updated_at = now
    await session.flush()
    return contact


async def list_contacts(
    session: AsyncSession,
    principal: Principal,
    *,
    query: str | None = None,
    tag: str | None = None,
    limit: int = 50,
    before: int | None = None,
) -> list[Contact]:
    principal.require("audience:read")
    for name, value in (("q", query), ("tag", tag)):
        if value is not None:
            require_clean_text(value, name)  # a NUL would reach the database otherwise
    stmt = select(Contact).where(Contact.org_id == principal.org_id, Contact.erased_at.is_(None))
    if before is not None:
        stmt = stmt.where(Contact.id < before)
    if query:
        needle = query.strip().lower()
        stmt = stmt.where(
            or_(
                Contact.email.contains(needle, autoescape=True),
                Contact.phone.contains(needle, autoescape=True),
                func.lower(Contact.first_name).contains(needle, autoescape=True),
            )
        )
    if tag:
        stmt = stmt.where(_has_label("tag", [tag.strip().lower()]))
    return list((await session.scalars(stmt.order_by(Contact.id.desc()).limit(limit))).all())


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


def points_of(contact: Contact) -> ContactPoints:
    return ContactPoints(contact.email, contact.phone, contact.email_hash, contact.phone_hash)


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
            if source not in SELF_SOURCES or _is_erased(suppressed):
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


def double_opt_in_token(signer: Signer, contact: Contact, channel: str) -> str:
    return signer.sign(DOUBLE_OPT_IN_PURPOSE, {"o": contact.org_id, "c": contact.id, "ch": channel})


async def confirm_double_opt_in(
    session: AsyncSession, signer: Signer, token: str, *, now: datetime
) -> Contact:
    """The person clicked the confirmation link: pending → granted (source double_opt_in)."""
    payload: Any = signer.unsign(DOUBLE_OPT_IN_PURPOSE, token, max_age=DOUBLE_OPT_IN_MAX_AGE)
    contact = await _contact_from_payload(session, payload)
    channel = payload.get("ch")
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


async def _contact_from_payload(session: AsyncSession, payload: Any) -> Contact:
    if not isinstance(payload, dict) or not isinstance(payload.get("c"), int):
        raise PopdropError("link_invalid", "this link is not valid")
    contact = await session.scalar(
        select(Contact)
        .where(Contact.id == payload["c"], Contact.org_id == payload.get("o"))
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


# ---------------------------------------------------------------- email unsubscribe


def preferences_token(signer: Signer, contact: Contact) -> str:
    """A signed, non-expiring token naming one contact: the one-click unsubscribe URL and the
    preferences page both take it (an unsubscribe link must work months later)."""
    return signer.sign_text(PREFERENCES_PURPOSE, f"{contact.org_id}:{contact.id}")


def unsubscribe_headers(signer: Signer, base_url: str, contact: Contact) -> dict[str, str]:
    """RFC 8058 headers for an email to this contact (RFC 2369 List-Unsubscribe + one-click)."""
    return unsubscribe_headers_for(f"{base_url.rstrip('/')}/u/{preferences_token(signer, contact)}")


def unsubscribe_headers_for(url: str | None) -> dict[str, str]:
    if url is None:
        return {}
    return {
        "List-Unsubscribe": f"<{url}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


async def contact_from_token(session: AsyncSession, signer: Signer, token: str) -> Contact:
    payload: Any
    try:
        org, _sep, contact = signer.unsign_text(PREFERENCES_PURPOSE, token).partition(":")
        payload = {"o": int(org), "c": int(contact)}
    except (PopdropError, ValueError):
        # Links in mail sent before the short token still work.
        payload = signer.unsign(PREFERENCES_PURPOSE, token)
    return await _contact_from_payload(session, payload)


async def one_click_unsubscribe(
    session: AsyncSession, signer: Signer, token: str, *, now: datetime
) -> Contact:
    """RFC 8058: the POST needs no body and no confirmation; email consent is revoked at once."""
    contact = await contact_from_token(session, signer, token)
    await change_consent(
        session,
        signer,
        contact,
        ConsentChange(channel="email", action="revoke", wording="List-Unsubscribe one-click"),
        now=now,
        source="unsubscribe",
    )
    return contact


async def save_preferences(
    session: AsyncSession, signer: Signer, token: str, prefs: PreferencesIn, *, now: datetime
) -> Contact:
    contact = await contact_from_token(session, signer, token)
    for channel, wanted in (("email", prefs.email), ("sms", prefs.sms)):
        state = getattr(contact, CONSENT_COLUMN[channel])
        if wanted and state != "granted":
            await change_consent(
                session,
                signer,
                contact,
                ConsentChange(channel=channel, action="grant", wording="Preferences page: yes"),
                now=now,
                source="preferences",
            )
        elif not wanted and state in ("granted", "pending"):
            await change_consent(
                session,
                signer,
                contact,
                ConsentChange(channel=channel, action="revoke", wording="Preferences page: no"),
                now=now,
                source="preferences",
            )
    await session.execute(
        delete(ContactLabel).where(
            ContactLabel.contact_id == contact.id, ContactLabel.kind == "interest"
        )
    )
    await add_labels(session, contact, "interest", prefs.topics)
    contact.frequency = prefs.frequency
    contact.updated_at = now
    await session.flush()
    return contact


# ---------------------------------------------------------------- keywords


def parse_keyword(text: str) -> str | None:
    """STOP-family → `stop` (`stopall` for STOPALL), START/UNSTOP → `start`, HELP → `help`,
    YES → `yes`; any case, surrounding whitespace or punctuation; the whole message only."""
    word = text.strip(_TRIM).upper()
    if word == "STOPALL":
        return "stopall"
    if word in STOP_WORDS:
        return "stop"
    if word in START_WORDS:
        return "start"
    if word in HELP_WORDS:
        return "help"
    if word in YES_WORDS:
        return "yes"
    return None


async def _org_name(session: AsyncSession, org_id: int) -> str:
    return str(
        await session.scalar(select(Organization.name).where(Organization.id == org_id)) or ""
    )


async def handle_inbound(
    session: AsyncSession,
    signer: Signer,
    *,
    org_id: int,
    channel: str,
    sender: str,
    text: str,
    now: datetime,
    contact_id: int | None = None,
) -> InboundResult:
    """STOP / START / HELP / YES before any flow, on every channel. An opt-out from a number
    we do not know still lands on the suppression list, so a later import cannot add it."""
    keyword = parse_keyword(text)
    if keyword is None:
        return InboundResult(keyword=None, action=None, reply=None, contact_id=contact_id)
    points = ContactPoints(None, None, None, None)
    if channel == "sms":
        points = contact_points(signer, None, sender)
    contact: Contact | None = None
    if contact_id is not None:
        contact = await session.get(Contact, contact_id, populate_existing=True)
        if contact is not None and contact.org_id != org_id:
            contact = None
    elif points.hashes:
        contact = await find_contact(session, org_id, points)
    org = await _org_name(session, org_id)
    found_id = contact.id if contact else None
    if keyword == "help":
        settings = await get_settings(session, org_id)
        reply = settings.help_text or DEFAULT_HELP.format(org=org)
        return InboundResult(keyword=keyword, action="help", reply=reply, contact_id=found_id)
    source = "sms_keyword" if channel == "sms" else "chat_keyword"
    wording = f"Replied {text.strip(_TRIM).upper()}"
    if keyword in ("stop", "stopall"):
        channels = list(CONSENT_COLUMN) if keyword == "stopall" else [channel]
        if contact is not None:
            for ch in channels:
                await change_consent(
                    session,
                    signer,
                    contact,
                    ConsentChange(channel=ch, action="revoke", wording=wording),
                    now=now,
                    source=source,
                )
        else:
            for ch in channels:
                await suppress(session, org_id, points, ch, "opt_out", now)
        return InboundResult(
            keyword=keyword,
            action="opted_out",
            reply=STOP_REPLY.format(org=org),
            contact_id=found_id,
        )
    if contact is None:  # START / YES from a stranger: lift their opt-out, nothing to confirm
        if keyword == "start" and points.hashes:
            await session.execute(
                delete(Suppression).where(
                    Suppression.org_id == org_id,
                    Suppression.identifier_hash.in_(points.hashes),
                    Suppression.channel == channel,
                    Suppression.reason == "opt_out",
                )
            )
            return InboundResult(
                keyword=keyword,
                action="opted_in",
                reply=START_REPLY.format(org=org),
                contact_id=None,
            )
        return InboundResult(keyword=keyword, action=None, reply=None, contact_id=None)
    if keyword == "yes" and getattr(contact, CONSENT_COLUMN[channel]) != "pending":
        return InboundResult(keyword=keyword, action=None, reply=None, contact_id=found_id)
    await change_consent(
        session,
        signer,
        contact,
        ConsentChange(channel=channel, action="grant", wording=wording),
        now=now,
        source="double_opt_in" if keyword == "yes" else source,
    )
    if keyword == "yes":
        return InboundResult(
            keyword=keyword,
            action="confirmed",
            reply=YES_REPLY.format(org=org),
            contact_id=found_id,
        )
    return InboundResult(
        keyword=keyword, action="opted_in", reply=START_REPLY.format(org=org), contact_id=found_id
    )


# ---------------------------------------------------------------- activity


async def record_activity(
    session: AsyncSession,
    signer: Signer,
    org_id: int,
    spec: ActivityIn,
    *,
    now: datetime,
    at: datetime | None = None,
) -> int | None:
    """Record what a contact did; their `last_engaged_at` moves forward (never back). Returns
    the contact id, or None when no contact matches (nothing is recorded)."""
    when = at or now
    contact_id = spec.contact_id
    if contact_id is None:
        points = contact_points(signer, spec.email, spec.phone)
        # Email first, then phone: activity never fails on two half-matching contacts.
        for digest, column in (
            (points.email_hash, Contact.email_hash),
            (points.phone_hash, Contact.phone_hash),
        ):
            if digest is not None and contact_id is None:
                contact_id = await session.scalar(
                    select(Contact.id).where(Contact.org_id == org_id, column == digest)
                )
        if contact_id is None:
            return None
    elif (
        await session.scalar(
            select(Contact.id).where(Contact.id == contact_id, Contact.org_id == org_id)
        )
        is None
    ):
        raise not_found("contact")
    session.add(
        ContactActivity(
            org_id=org_id,
            contact_id=contact_id,
            kind=spec.kind,
            event_id=spec.event_id,
            ref=spec.ref,
            at=when,
        )
    )
    await session.execute(
        update(Contact)
        .where(
            Contact.id == contact_id,
            or_(Contact.last_engaged_at.is_(None), Contact.last_engaged_at < when),
        )
        .values(last_engaged_at=when)
    )
    await session.flush()
    return contact_id


# ---------------------------------------------------------------- segments


def _has_label(kind: str, values: Sequence[str]) -> ColumnElement[bool]:
    return exists(
        select(literal(1)).where(
            ContactLabel.contact_id == Contact.id,
            ContactLabel.kind == kind,
            ContactLabel.value.in_(list(values)),
        )
    )


def sendable_condition(channel: str) -> ColumnElement[bool]:
    """Granted consent and a contact point for the channel (revoke ⇒ suppression, so a
    granted state is never suppressed)."""
    point = Contact.email if CHANNEL_POINT[channel] == "email" else Contact.phone
    return and_(getattr(Contact, CONSENT_COLUMN[channel]) == "granted", point.is_not(None))


async def _venue(session: AsyncSession, org_id: int, event_id: int) -> tuple[float, float]:
    row = (
        await session.execute(
            select(Event.latitude, Event.longitude).where(
                Event.id == event_id, Event.org_id == org_id
            )
        )
    ).first()
    if row is None:
        raise not_found("event")
    if row[0] is None or row[1] is None:
        raise PopdropError("invalid_request", "near: this event's venue has no coordinates")
    return float(row[0]), float(row[1])


async def segment_conditions(
    session: AsyncSession, org_id: int, rules: SegmentRules, *, now: datetime
) -> list[ColumnElement[bool]]:
    settings = await get_settings(session, org_id)
    conditions: list[ColumnElement[bool]] = [
        Contact.org_id == org_id,
        Contact.erased_at.is_(None),
        or_(*[sendable_condition(ch) for ch in rules.channels]),
    ]
    if rules.recency:
        conditions.append(
            or_(
                *[
                    bucket_condition(b, now, settings.hot_days, settings.warm_days)
                    for b in rules.recency
                ]
            )
        )
    if rules.tags_any:
        conditions.append(_has_label("tag", rules.tags_any))
    for tag in rules.tags_all:
        conditions.append(_has_label("tag", [tag]))
    if rules.tags_none:
        conditions.append(~_has_label("tag", rules.tags_none))
    if rules.interests_any:
        conditions.append(_has_label("interest", rules.interests_any))
    if rules.locales:
        lowered = [loc.lower() for loc in rules.locales]
        prefixes = [
            func.lower(Contact.locale).like(f"{loc}-%") for loc in lowered if "-" not in loc
        ]
        conditions.append(or_(func.lower(Contact.locale).in_(lowered), *prefixes))
    if rules.near is not None:
        lat0, lon0 = await _venue(session, org_id, rules.near.event_id)
        # Equirectangular distance: plain arithmetic, so it runs on SQLite too; within 0.5 %
        # of the great-circle distance at pop-up scales (a few hundred km).
        scale = math.cos(math.radians(lat0))
        dlat = (Contact.lat - lat0) * KM_PER_DEGREE
        dlon = (Contact.lon - lon0) * (KM_PER_DEGREE * scale)
        conditions.append(
            and_(
                Contact.lat.is_not(None),
                Contact.lon.is_not(None),
                dlat * dlat + dlon * dlon <= rules.near.km * rules.near.km,
            )
        )
    if rules.attended is not None:
        conditions.append(_attended(org_id, rules.attended.event_ids, now))
    return conditions


def _attended(org_id: int, event_ids: Sequence[int], now: datetime) -> ColumnElement[bool]:
    """Checked in at a past event: a visit activity, or a visit of an RSVP of theirs."""
    activity = select(literal(1)).where(
        ContactActivity.contact_id == Contact.id, ContactActivity.kind == "visit"
    )
    by_rsvp = (
        select(literal(1))
        .select_from(Visit)
        .join(Rsvp, and_(Visit.subject_kind == "rsvp", Rsvp.id == Visit.subject_id))
        .where(
            Visit.org_id == org_id,
            or_(
                and_(Rsvp.email.is_not(None), Rsvp.email == Contact.email),
                and_(Rsvp.phone.is_not(None), Rsvp.phone == Contact.phone),
            ),
        )
    )
    if event_ids:
        activity = activity.where(ContactActivity.event_id.in_(list(event_ids)))
        by_rsvp = by_rsvp.where(Visit.event_id.in_(list(event_ids)))
    else:
        activity = activity.where(ContactActivity.at <= now)
        by_rsvp = by_rsvp.where(Visit.at <= now)
    return or_(exists(activity), exists(by_rsvp))


async def count_segment(
    session: AsyncSession, principal: Principal, rules: SegmentRules, *, now: datetime
) -> SegmentCount:
    """One pass: the total, sendable per channel, and per recency bucket."""
    principal.require("audience:read")
    settings = await get_settings(session, principal.org_id)
    conditions = await segment_conditions(session, principal.org_id, rules, now=now)

    def tally(condition: ColumnElement[bool]) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    buckets: list[Bucket] = ["hot", "warm", "cold", "never"]
    columns = [func.count()]
    columns += [tally(sendable_condition(ch)) for ch in rules.channels]
    columns += [
        tally(bucket_condition(b, now, settings.hot_days, settings.warm_days)) for b in buckets
    ]
    row = (await session.execute(select(*columns).where(*conditions))).one()
    values = [int(v or 0) for v in row]
    channel_counts = dict(zip(rules.channels, values[1 : 1 + len(rules.channels)], strict=True))
    bucket_counts = dict(zip(buckets, values[1 + len(rules.channels) :], strict=True))
    return SegmentCount(total=values[0], by_channel=channel_counts, by_bucket=bucket_counts)


async def segment_query(
    session: AsyncSession, principal: Principal, rules: SegmentRules, *, now: datetime
) -> Select[Any]:
    principal.require("audience:read")
    conditions = await segment_conditions(session, principal.org_id, rules, now=now)
    return select(Contact).where(*conditions).order_by(Contact.id)


async def iter_segment(
    session: AsyncSession,
    principal: Principal,
    rules: SegmentRules,
    *,
    now: datetime,
    batch_size: int = 2000,
) -> AsyncIterator[list[Contact]]:
    """The segment's contacts in id order, a page at a time (keyset paging, bounded memory)."""
    base = await segment_query(session, principal, rules, now=now)
    after = 0
    while True:
        page = list((await session.scalars(base.where(Contact.id > after).limit(batch_size))).all())
        if not page:
            return
        yield page
        after = page[-1].id


def segment_out(segment: Segment) -> SegmentOut:
    return SegmentOut(
        id=segment.id,
        name=segment.name,
        rules=SegmentRules.model_validate(json.loads(segment.rules)),
        created_at=segment.created_at,
        updated_at=segment.updated_at,
    )


async def save_segment(
    session: AsyncSession,
    principal: Principal,
    spec: SegmentIn,
    *,
    now: datetime,
    segment_id: int | None = None,
) -> Segment:
    principal.require("audience:write")
    if spec.rules.near is not None:
        await _venue(session, principal.org_id, spec.rules.near.event_id)
    if segment_id is None:
        segment = Segment(org_id=principal.org_id, created_at=now)
        session.add(segment)
    else:
        segment = await get_segment(session, principal, segment_id)
    segment.name = spec.name.strip()
    segment.rules = json.dumps(spec.rules.model_dump(mode="json"), sort_keys=True)
    segment.updated_at = now
    try:
        async with session.begin_nested():
            await session.flush()
    except IntegrityError as exc:
        raise PopdropError("conflict", f"a segment named {spec.name!r} exists") from exc
    return segment


async def get_segment(session: AsyncSession, principal: Principal, segment_id: int) -> Segment:
    principal.require("audience:read")
    segment = await session.scalar(
        select(Segment).where(Segment.id == segment_id, Segment.org_id == principal.org_id)
    )
    if segment is None:
        raise not_found("segment")
    return segment


async def list_segments(session: AsyncSession, principal: Principal) -> list[Segment]:
    principal.require("audience:read")
    return list(
        (
            await session.scalars(
                select(Segment).where(Segment.org_id == principal.org_id).order_by(Segment.name)
            )
        ).all()
    )


async def delete_segment(session: AsyncSession, principal: Principal, segment_id: int) -> None:
    principal.require("audience:write")
    segment = await get_segment(session, principal, segment_id)
    await session.delete(segment)
    await session.flush()
