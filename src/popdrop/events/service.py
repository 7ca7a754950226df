"""Event operations. Tenancy: every query carries the caller's org_id."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.models import User
from popdrop.accounts.service import Principal, partner_email
from popdrop.core.errors import PopdropError
from popdrop.core.tenancy import owned
from popdrop.events.lifecycle import EVENT_LIFECYCLE, EventStatus
from popdrop.events.models import (
    Event,
    Lane,
    Partner,
    PickupWindow,
    StaffAssignment,
    TimeSlot,
)
from popdrop.events.schemas import (
    EventCreate,
    EventUpdate,
    LaneCreate,
    PartnerCreate,
    PickupWindowCreate,
    SlotCreate,
    StaffCreate,
)


async def create_event(
    session: AsyncSession, principal: Principal, spec: EventCreate, *, now: datetime
) -> Event:
    principal.require("events:write")
    event = Event(
        org_id=principal.org_id, created_at=now, status=EventStatus.DRAFT, **spec.model_dump()
    )
    session.add(event)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise PopdropError("conflict", f"an event with slug {spec.slug!r} exists") from exc
    return event


async def get_event(session: AsyncSession, principal: Principal, event_id: int) -> Event:
    principal.require("events:read")
    return await owned(session, Event, event_id, principal.org_id)


async def list_events(session: AsyncSession, principal: Principal) -> list[Event]:
    principal.require("events:read")
    rows = await session.scalars(
        select(Event).where(Event.org_id == principal.org_id).order_by(Event.starts_at)
    )
    return list(rows)


async def update_event(
    session: AsyncSession, principal: Principal, event_id: int, spec: EventUpdate
) -> Event:
    """Change the details given. The hold TTL is not among them: holds cache it."""
    principal.require("events:write")
    event = await owned(session, Event, event_id, principal.org_id)
    for name, value in spec.model_dump(exclude_unset=True).items():
        setattr(event, name, value)
    if event.ends_at <= event.starts_at:
        raise PopdropError("invalid_request", "ends_at must be after starts_at")
    await session.flush()
    return event


async def set_status(
    session: AsyncSession, principal: Principal, event_id: int, status: EventStatus | str
) -> Event:
    """The one writer of an event's status: asking for the status it has is a no-op; a
    move `EVENT_LIFECYCLE` does not allow is refused (`invalid_transition`)."""
    principal.require("events:write")
    event = await owned(session, Event, event_id, principal.org_id)
    target, current = EventStatus(status), EventStatus(event.status)
    if target != current:
        event.status = EVENT_LIFECYCLE.check(current, target)
    return event


async def add_slot(
    session: AsyncSession, principal: Principal, event_id: int, spec: SlotCreate
) -> TimeSlot:
    principal.require("events:write")
    event = await owned(session, Event, event_id, principal.org_id)
    slot = TimeSlot(org_id=principal.org_id, event_id=event.id, taken=0, **spec.model_dump())
    session.add(slot)
    await session.flush()
    return slot


async def list_slots(session: AsyncSession, principal: Principal, event_id: int) -> list[TimeSlot]:
    await get_event(session, principal, event_id)
    rows = await session.scalars(
        select(TimeSlot)
        .where(TimeSlot.event_id == event_id, TimeSlot.org_id == principal.org_id)
        .order_by(TimeSlot.starts_at)
    )
    return list(rows)


async def add_lane(
    session: AsyncSession, principal: Principal, event_id: int, spec: LaneCreate
) -> Lane:
    principal.require("events:write")
    event = await owned(session, Event, event_id, principal.org_id)
    lane = Lane(org_id=principal.org_id, event_id=event.id, **spec.model_dump())
    session.add(lane)
    await session.flush()
    return lane


async def list_lanes(session: AsyncSession, principal: Principal, event_id: int) -> list[Lane]:
    await get_event(session, principal, event_id)
    rows = await session.scalars(
        select(Lane)
        .where(Lane.event_id == event_id, Lane.org_id == principal.org_id)
        .order_by(Lane.id)
    )
    return list(rows)


async def add_pickup_window(
    session: AsyncSession, principal: Principal, lane_id: int, spec: PickupWindowCreate
) -> PickupWindow:
    principal.require("events:write")
    lane = await owned(session, Lane, lane_id, principal.org_id)
    slot = await owned(session, TimeSlot, spec.slot_id, principal.org_id)
    if slot.event_id != lane.event_id:
        raise PopdropError("invalid_request", "the slot belongs to another event")
    window = PickupWindow(
        org_id=principal.org_id, lane_id=lane.id, slot_id=slot.id, capacity=spec.capacity, taken=0
    )
    session.add(window)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise PopdropError("conflict", "this lane already has a window for that slot") from exc
    return window


async def add_partner(
    session: AsyncSession, principal: Principal, event_id: int, spec: PartnerCreate
) -> Partner:
    principal.require("events:write")
    event = await owned(session, Event, event_id, principal.org_id)
    partner = Partner(org_id=principal.org_id, event_id=event.id, **spec.model_dump())
    session.add(partner)
    await session.flush()
    return partner


async def assign_staff(
    session: AsyncSession, principal: Principal, event_id: int, spec: StaffCreate
) -> StaffAssignment:
    principal.require("events:write")
    event = await owned(session, Event, event_id, principal.org_id)
    await owned(session, User, spec.user_id, principal.org_id)
    staff = StaffAssignment(
        org_id=principal.org_id, event_id=event.id, user_id=spec.user_id, gate=spec.gate
    )
    session.add(staff)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise PopdropError("conflict", "this person is already on the event's staff") from exc
    return staff


def partners_of(principal: Principal) -> Select[int]:
    """The ids of the partner rows a partner login stands for: those naming its email.

    One rule for every domain that shows a partner its own data (orders, POS sales,
    codes, links, reports); a subquery, so callers filter with `.in_(partners_of(p))`.
    """
    email = partner_email(principal)
    return select(Partner.id).where(
        Partner.org_id == principal.org_id, func.lower(Partner.contact_email) == email.lower()
    )
