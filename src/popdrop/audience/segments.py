"""Segments: saved rules over contacts (labels, recency, distance, attendance, consent),
counted and iterated as SQL conditions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    exists,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.audience.consent import CHANNEL_POINT, CONSENT_COLUMN
from popdrop.audience.models import (
    Contact,
    ContactActivity,
    ContactLabel,
    Segment,
)
from popdrop.audience.schemas import (
    Bucket,
    SegmentCount,
    SegmentIn,
    SegmentOut,
    SegmentRules,
)
from popdrop.audience.settings import bucket_condition, get_settings
from popdrop.checkin.models import Visit
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.tenancy import owned
from popdrop.events.models import Event
from popdrop.rsvp.models import Rsvp

KM_PER_DEGREE = 111.32


# ---------------------------------------------------------------- segments


def has_label(kind: str, values: Sequence[str]) -> ColumnElement[bool]:
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
        conditions.append(has_label("tag", rules.tags_any))
    for tag in rules.tags_all:
        conditions.append(has_label("tag", [tag]))
    if rules.tags_none:
        conditions.append(~has_label("tag", rules.tags_none))
    if rules.interests_any:
        conditions.append(has_label("interest", rules.interests_any))
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
    return await owned(session, Segment, segment_id, principal.org_id)


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
