"""Contacts: create or merge (`upsert_contact`), labels, edits, listing, and the activity
that keeps recency up to date. Every function takes the caller's session and `now`;
tenancy is applied here (`org_id = principal.org_id`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import (
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.audience.consent import CONSENT_COLUMN, change_consent
from popdrop.audience.contact_points import (
    contact_points,
    find_contact,
    get_contact,
    is_erased,
    suppressed_channels,
)
from popdrop.audience.models import (
    Contact,
    ContactActivity,
    ContactLabel,
)
from popdrop.audience.schemas import (
    ActivityIn,
    AudienceSettingsOut,
    ConsentChange,
    ContactIn,
    ContactOut,
    ContactPatch,
)
from popdrop.audience.segments import has_label
from popdrop.audience.settings import bucket_of, get_settings
from popdrop.core.errors import PopdropError
from popdrop.core.identity import (
    phone_time_zone,
)
from popdrop.core.schemas import require_clean_text
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned

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
    if is_erased(suppressions):
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
        stmt = stmt.where(has_label("tag", [tag.strip().lower()]))
    return list((await session.scalars(stmt.order_by(Contact.id.desc()).limit(limit))).all())


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
    else:
        await owned(session, Contact, contact_id, org_id)
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
