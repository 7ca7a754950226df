"""Events REST API and the organization's iCal feed (thin)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy import select

from popdrop.accounts.models import Organization
from popdrop.core import links
from popdrop.core.errors import PopdropError
from popdrop.core.schemas import error_responses
from popdrop.events import ical, service
from popdrop.events.models import Event, Lane, Partner, PickupWindow, StaffAssignment, TimeSlot
from popdrop.events.schemas import (
    EventCreate,
    EventOut,
    EventUpdate,
    LaneCreate,
    LaneOut,
    PartnerCreate,
    PartnerOut,
    PickupWindowCreate,
    PickupWindowOut,
    SlotCreate,
    SlotOut,
    StaffCreate,
    StaffOut,
    StatusChange,
)
from popdrop.web.auth import ApiPrincipal
from popdrop.web.params import Ctx, ItemId

router = APIRouter(prefix="/api/v1", tags=["events"])
public_router = APIRouter(include_in_schema=False)
WRITE_ERRORS = error_responses(401, 403, 404, 409, 422)


def event_out(event: Event) -> EventOut:
    return EventOut.model_validate(event, from_attributes=True)


@router.post("/events", status_code=201, response_model=EventOut, responses=WRITE_ERRORS)
async def create_event(body: EventCreate, principal: ApiPrincipal, ctx: Ctx) -> EventOut:
    async with ctx.db.transaction() as session:
        event = await service.create_event(session, principal, body, now=ctx.clock.now())
        return event_out(event)


@router.get("/events", response_model=list[EventOut], responses=error_responses(401, 403))
async def list_events(principal: ApiPrincipal, ctx: Ctx) -> list[EventOut]:
    async with ctx.db.reader() as session:
        return [event_out(e) for e in await service.list_events(session, principal)]


@router.get("/events/{event_id}", response_model=EventOut, responses=error_responses(401, 403, 404))
async def get_event(event_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> EventOut:
    async with ctx.db.reader() as session:
        return event_out(await service.get_event(session, principal, event_id))


@router.patch("/events/{event_id}", response_model=EventOut, responses=WRITE_ERRORS)
async def update_event(
    event_id: ItemId, body: EventUpdate, principal: ApiPrincipal, ctx: Ctx
) -> EventOut:
    async with ctx.db.transaction() as session:
        return event_out(await service.update_event(session, principal, event_id, body))


@router.post("/events/{event_id}/status", response_model=EventOut, responses=WRITE_ERRORS)
async def change_status(
    event_id: ItemId, body: StatusChange, principal: ApiPrincipal, ctx: Ctx
) -> EventOut:
    async with ctx.db.transaction() as session:
        return event_out(await service.set_status(session, principal, event_id, body.status))


@router.post(
    "/events/{event_id}/slots", status_code=201, response_model=SlotOut, responses=WRITE_ERRORS
)
async def add_slot(
    event_id: ItemId, body: SlotCreate, principal: ApiPrincipal, ctx: Ctx
) -> SlotOut:
    async with ctx.db.transaction() as session:
        slot: TimeSlot = await service.add_slot(session, principal, event_id, body)
        return SlotOut.model_validate(slot, from_attributes=True)


@router.get(
    "/events/{event_id}/slots", response_model=list[SlotOut], responses=error_responses(401, 404)
)
async def list_slots(event_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> list[SlotOut]:
    async with ctx.db.reader() as session:
        slots = await service.list_slots(session, principal, event_id)
        return [SlotOut.model_validate(s, from_attributes=True) for s in slots]


@router.post(
    "/events/{event_id}/lanes", status_code=201, response_model=LaneOut, responses=WRITE_ERRORS
)
async def add_lane(
    event_id: ItemId, body: LaneCreate, principal: ApiPrincipal, ctx: Ctx
) -> LaneOut:
    async with ctx.db.transaction() as session:
        lane: Lane = await service.add_lane(session, principal, event_id, body)
        return LaneOut.model_validate(lane, from_attributes=True)


@router.get(
    "/events/{event_id}/lanes", response_model=list[LaneOut], responses=error_responses(401, 404)
)
async def list_lanes(event_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> list[LaneOut]:
    async with ctx.db.reader() as session:
        lanes = await service.list_lanes(session, principal, event_id)
        return [LaneOut.model_validate(lane, from_attributes=True) for lane in lanes]


@router.post(
    "/lanes/{lane_id}/windows",
    status_code=201,
    response_model=PickupWindowOut,
    responses=WRITE_ERRORS,
)
async def add_window(
    lane_id: ItemId, body: PickupWindowCreate, principal: ApiPrincipal, ctx: Ctx
) -> PickupWindowOut:
    async with ctx.db.transaction() as session:
        window: PickupWindow = await service.add_pickup_window(session, principal, lane_id, body)
        return PickupWindowOut.model_validate(window, from_attributes=True)


@router.post(
    "/events/{event_id}/partners",
    status_code=201,
    response_model=PartnerOut,
    responses=WRITE_ERRORS,
)
async def add_partner(
    event_id: ItemId, body: PartnerCreate, principal: ApiPrincipal, ctx: Ctx
) -> PartnerOut:
    async with ctx.db.transaction() as session:
        partner: Partner = await service.add_partner(session, principal, event_id, body)
        return PartnerOut.model_validate(partner, from_attributes=True)


@router.post(
    "/events/{event_id}/staff", status_code=201, response_model=StaffOut, responses=WRITE_ERRORS
)
async def assign_staff(
    event_id: ItemId, body: StaffCreate, principal: ApiPrincipal, ctx: Ctx
) -> StaffOut:
    async with ctx.db.transaction() as session:
        staff: StaffAssignment = await service.assign_staff(session, principal, event_id, body)
        return StaffOut.model_validate(staff, from_attributes=True)


class IcalLink(BaseModel):
    url: str


@router.get("/ical-link", response_model=IcalLink, responses=error_responses(401, 403))
async def ical_link(principal: ApiPrincipal, ctx: Ctx) -> IcalLink:
    """A secret URL for calendar apps (they cannot send tokens)."""
    principal.require("events:read")
    return IcalLink(url=links.ical_url(ctx.signer, ctx.settings.base_url, principal.org_id))


@public_router.get("/ical/{token}.ics")
async def ical_feed(token: str, ctx: Ctx) -> Response:
    org_id = links.read_ical(ctx.signer, token)
    async with ctx.db.reader() as session:
        org = await session.get(Organization, org_id)
        if org is None:
            raise PopdropError("not_found", "this calendar no longer exists")
        events = list(
            await session.scalars(
                select(Event).where(Event.org_id == org_id).order_by(Event.starts_at)
            )
        )
    body = ical.feed(events, name=org.name, base_url=ctx.settings.base_url, now=ctx.clock.now())
    return Response(body, media_type=ical.MEDIA_TYPE)
