"""Event pages: the public event page `/e/{event_id}` and the operator pages `/events`.

They live in `inventory` (above `events`) because every one of them shows or edits stock:
slots, lanes, products and live availability sit on top of the event, so the event
workspace is assembled where both are visible. Templates stay under `events/`.

Handlers stay thin: read the form, build the pydantic schema, call the events and
inventory services, render. The rules of the voucher pages hold here too (`PageRoute`):
- every operator page needs a session and checks its scope (events:read to look,
  events:write / inventory:write to change), so a volunteer gets a 403 page;
- every POST carries the double-submit CSRF field and calls `check_csrf` first;
- a form that does not validate is shown again with its errors next to it (422).
The public page reads published/live events only (404 otherwise); its stock numbers
update from the SSE stream `/e/{event_id}/availability/stream`, its RSVP form posts JSON
to `POST /api/v1/public/events/{event_id}/rsvps`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.models import User
from popdrop.accounts.service import Principal
from popdrop.core import links
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.localtime import slot_label, zone_of
from popdrop.core.tenancy import owned
from popdrop.events import service
from popdrop.events.lifecycle import EVENT_LIFECYCLE, OPEN_EVENT_STATUSES, EventStatus
from popdrop.events.models import Event, Lane, Partner, PickupWindow, StaffAssignment, TimeSlot
from popdrop.events.schemas import (
    EventCreate,
    EventUpdate,
    LaneCreate,
    PartnerCreate,
    PickupWindowCreate,
    SlotCreate,
    StaffCreate,
)
from popdrop.inventory import service as inventory
from popdrop.inventory.models import Product, Variant
from popdrop.inventory.schemas import Availability, ProductCreate, StockSet
from popdrop.web.auth import check_csrf
from popdrop.web.clicks import remember_click
from popdrop.web.context import AppContext
from popdrop.web.forms import Form, M, form_of
from popdrop.web.pagekit import Operator, PageRoute
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False, route_class=PageRoute)

CONSENT_TEXT = (
    "I agree that the host may contact me about this RSVP and this event by email or SMS. "
    "I can opt out at any time."
)
EVENT_DEFAULTS = {"timezone": "Europe/Berlin", "hold_ttl_seconds": "900"}
_NOTICES = {
    "created": "The event is created. Add slots, lanes and products below.",
    "status": "The event's status changed.",
    "details": "The event's details are saved.",
    "slot": "The slot is added.",
    "lane": "The lane is added.",
    "window": "The pickup window is added.",
    "partner": "The partner is added.",
    "staff": "They are on the staff now; volunteers scan at /scan/ with their login.",
    "product": "The product is added. Set its stock per lane below.",
    "stock": "Stock saved.",
    "edited": "Saved.",  # an edit of a slot, lane, window or product (inventory.parts_pages)
    "removed": "Removed.",
}


def slot_name(slot: TimeSlot, timezone: str) -> str:
    return slot_label(slot.starts_at, slot.ends_at, timezone, slot.label)


# ---------------------------------------------------------------- forms


def _zone(form: Form, name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(form.values.get(name) or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        form.errors[name] = "an IANA time zone such as Europe/Berlin"
        return None


def _event_fields(form: Form) -> dict[str, Any]:
    """The fields the create and the edit form share; times are wall time in the zone."""
    zone = _zone(form, "timezone")
    v = form.values
    return {
        "title": v.get("title", ""),
        "description": v.get("description", ""),
        "venue_name": v.get("venue_name", ""),
        "venue_address": v.get("venue_address", ""),
        "timezone": v.get("timezone") or "UTC",
        "starts_at": form.moment("starts_at", zone),
        "ends_at": form.moment("ends_at", zone),
        "opens_at": form.moment("opens_at", zone),
    }


def parse_event(form: Form) -> EventCreate | None:
    data = {
        **_event_fields(form),
        "slug": form.values.get("slug", ""),
        "hold_ttl_seconds": form.integer("hold_ttl_seconds"),
    }
    return form.build(EventCreate, data)


def parse_details(form: Form) -> EventUpdate | None:
    return form.build(EventUpdate, _event_fields(form))


def details_form(event: Event) -> Form:
    """The edit form, filled with the event as it is (times as wall time in its zone)."""
    zone = ZoneInfo(event.timezone)

    def wall(value: datetime | None) -> str:
        if value is None:
            return ""
        try:
            return value.astimezone(zone).strftime("%Y-%m-%dT%H:%M")
        except OverflowError:  # an instant at the calendar's edge: show it as UTC
            return value.strftime("%Y-%m-%dT%H:%M")

    return Form(
        values={
            "title": event.title,
            "description": event.description,
            "venue_name": event.venue_name,
            "venue_address": event.venue_address,
            "timezone": event.timezone,
            "starts_at": wall(event.starts_at),
            "ends_at": wall(event.ends_at),
            "opens_at": wall(event.opens_at),
        }
    )


def slot_fields(form: Form, zone: ZoneInfo) -> dict[str, Any]:
    """The slot form's fields (add and edit); times are wall time in the event's zone."""
    return {
        "label": form.values.get("label", ""),
        "starts_at": form.moment("starts_at", zone),
        "ends_at": form.moment("ends_at", zone),
        "capacity": form.integer("capacity"),
    }


def parse_slot(form: Form, zone: ZoneInfo) -> SlotCreate | None:
    return form.build(SlotCreate, slot_fields(form, zone))


def card_fields(form: Form) -> dict[str, Any]:
    """The product card's own fields (add and edit): title, text, image, price."""
    v = form.values
    currency = (v.get("currency") or "EUR").upper()
    data: dict[str, Any] = {
        "title": v.get("title", ""),
        "highlights": v.get("highlights", ""),
        "image_url": v.get("image_url", ""),
        "price_minor": form.amount("price", currency),
        "currency": currency,
    }
    if "price" not in form.errors and data["price_minor"] is None:
        form.errors["price"] = "a price such as 15.00 (0 for free)"
    return data


def parse_product(form: Form) -> ProductCreate | None:
    variants = [n.strip() for n in form.values.get("variants", "").split(",") if n.strip()]
    data = {
        **card_fields(form),
        "limit_per_contact": form.integer("limit_per_contact"),
        "variants": variants or None,
    }
    return form.build(ProductCreate, data, {"price_minor": "price"})


# ---------------------------------------------------------------- reads


@dataclass
class ProductCard:
    product: Product
    variants: list[Variant]


@dataclass
class EventView:
    event: Event
    slots: list[TimeSlot]
    lanes: list[Lane]
    windows: list[PickupWindow]
    partners: list[Partner]
    products: list[ProductCard]
    stock: dict[tuple[int, int], Availability]
    staff: list[tuple[StaffAssignment, User]]
    people: list[User]  # the organization's accounts that can be put on the staff

    def lanes_of(self, variant_id: int) -> list[tuple[Lane, Availability]]:
        return [
            (lane, self.stock[(variant_id, lane.id)])
            for lane in self.lanes
            if (variant_id, lane.id) in self.stock
        ]


async def load_event(ctx: AppContext, event: Event) -> EventView:
    """Everything the pages show of one event (its org already checked by the caller)."""
    async with ctx.db.reader() as session:
        slots = list(
            await session.scalars(
                select(TimeSlot).where(TimeSlot.event_id == event.id).order_by(TimeSlot.starts_at)
            )
        )
        lanes = list(
            await session.scalars(select(Lane).where(Lane.event_id == event.id).order_by(Lane.id))
        )
        windows = list(
            await session.scalars(
                select(PickupWindow)
                .where(PickupWindow.lane_id.in_([lane.id for lane in lanes]))
                .order_by(PickupWindow.id)
            )
        )
        partners = list(
            await session.scalars(
                select(Partner).where(Partner.event_id == event.id).order_by(Partner.id)
            )
        )
        staff = [
            (assignment, user)
            for assignment, user in (
                await session.execute(
                    select(StaffAssignment, User)
                    .join(User, User.id == StaffAssignment.user_id)
                    .where(StaffAssignment.event_id == event.id)
                    .order_by(StaffAssignment.gate, User.email)
                )
            ).tuples()
        ]
        people = list(
            await session.scalars(
                select(User)
                .where(User.org_id == event.org_id, User.disabled_at.is_(None))
                .order_by(User.email)
            )
        )
        products = list(
            await session.scalars(
                select(Product).where(Product.event_id == event.id).order_by(Product.id)
            )
        )
        variants = list(
            await session.scalars(
                select(Variant)
                .where(Variant.product_id.in_([p.id for p in products]))
                .order_by(Variant.id)
            )
        )
        rows = await inventory.availability(session, event.id, ctx.clock.now())
    return EventView(
        event=event,
        slots=slots,
        lanes=lanes,
        windows=windows,
        partners=partners,
        products=[ProductCard(p, [v for v in variants if v.product_id == p.id]) for p in products],
        stock={(r.variant_id, r.lane_id): r for r in rows},
        staff=staff,
        people=people,
    )


# ---------------------------------------------------------------- public event page


def countdown_target(event: Event, now: datetime) -> tuple[str, datetime | None]:
    """What the countdown counts to: opening, then start; None once it has started."""
    if event.opens_at is not None and event.opens_at > now:
        return "Opens in", event.opens_at
    if event.starts_at > now:
        return "Starts in", event.starts_at
    return ("Ended" if event.ends_at <= now else "Happening now"), None


@router.get("/e/{event_id}")
async def public_event(request: Request, event_id: ItemId, ctx: Ctx) -> Response:
    async with ctx.db.reader() as session:
        event = await session.scalar(
            select(Event).where(Event.id == event_id, Event.status.in_(OPEN_EVENT_STATUSES))
        )
    if event is None:
        raise not_found("event")
    view = await load_event(ctx, event)
    now = ctx.clock.now()
    label, target = countdown_target(event, now)
    context = {
        "view": view,
        "event": event,
        "countdown_label": label,
        "countdown_target": target,
        "open_slots": [s for s in view.slots if s.ends_at > now],
        "consent_text": CONSENT_TEXT,
    }
    response = render(request, "events/public.html", context)
    response.headers.update(NO_STORE)  # its URL may carry a voucher code (?code=)
    remember_click(request, response, secure=ctx.settings.base_url.startswith("https://"))
    return response


# ---------------------------------------------------------------- operator pages


async def _events_page(
    request: Request, ctx: AppContext, principal: Principal, form: Form | None = None
) -> Response:
    async with ctx.db.reader() as session:
        events = await service.list_events(session, principal)
    context = {
        "principal": principal,
        "events": events,
        "form": form or Form(values=dict(EVENT_DEFAULTS)),
        "can_write": "events:write" in principal.scopes,
    }
    return render(request, "events/list.html", context, status=422 if form else 200)


@router.get("/events")
async def events_list(request: Request, principal: Operator, ctx: Ctx) -> Response:
    principal.require("events:read")
    return await _events_page(request, ctx, principal)


@router.post("/events")
async def event_create(request: Request, principal: Operator, ctx: Ctx) -> Response:
    data = await request.form()
    check_csrf(request, ctx, data)
    principal.require("events:write")
    form = form_of(data)
    spec = parse_event(form)
    if spec is not None:
        try:
            async with ctx.db.transaction() as session:
                event = await service.create_event(session, principal, spec, now=ctx.clock.now())
                event_id = event.id
        except PopdropError as error:
            if error.reason not in ("conflict", "invalid_request"):
                raise
            form.errors["slug"] = error.message
        else:
            return RedirectResponse(f"/events/{event_id}?done=created", status_code=303)
    return await _events_page(request, ctx, principal, form)


async def _detail_page(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    event_id: int,
    *,
    failed: tuple[str, Form] | None = None,
    status: int = 422,
) -> Response:
    async with ctx.db.reader() as session:
        event = await service.get_event(session, principal, event_id)
    view = await load_event(ctx, event)
    forms = {
        name: Form() for name in ("slot", "lane", "window", "partner", "staff", "product", "stock")
    }
    forms["details"] = details_form(event)
    forms["product"].values.update({"currency": "EUR", "variants": "one size"})
    if failed:
        forms[failed[0]] = failed[1]
    context = {
        "principal": principal,
        "view": view,
        "event": event,
        "forms": forms,
        "failed": failed[0] if failed else None,
        "lane_options": [(lane.id, lane.name) for lane in view.lanes],
        "person_options": [(u.id, f"{u.email} ({u.role})") for u in view.people],
        "slot_options": [(s.id, slot_name(s, event.timezone)) for s in view.slots],
        "next_statuses": [
            status
            for status in EventStatus  # in the life's order
            if EVENT_LIFECYCLE.allows(EventStatus(event.status), status)
        ],
        "public_url": links.event_url(ctx.settings.base_url, event.id),
        "ical_url": links.ical_url(ctx.signer, ctx.settings.base_url, principal.org_id),
        "notice": _NOTICES.get(request.query_params.get("done", "")),
        "can_write": "events:write" in principal.scopes,
        "can_stock": "inventory:write" in principal.scopes,
        "can_guests": "rsvps:read" in principal.scopes,  # the guest list (usecases)
        "live": event.status in OPEN_EVENT_STATUSES,
    }
    return render(request, "events/detail.html", context, status=status if failed else 200)


@router.get("/events/{event_id}")
async def event_detail(
    request: Request, event_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    principal.require("events:read")
    return await _detail_page(request, ctx, principal, event_id)


def _done(event_id: int, what: str) -> Response:
    return RedirectResponse(f"/events/{event_id}?done={what}", status_code=303)


async def _posted(request: Request, ctx: AppContext, principal: Principal, scope: str) -> Form:
    data = await request.form()
    check_csrf(request, ctx, data)
    principal.require(scope)
    return form_of(data)


_SHOWN_REFUSALS = frozenset({"conflict", "invalid_request", "not_found"})


async def _refused(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    event_id: int,
    name: str,
    form: Form,
    error: PopdropError | None = None,
) -> Response:
    """The detail page again, the failed form showing what was typed and why."""
    if error is not None:
        if error.reason not in _SHOWN_REFUSALS:
            raise error
        form.problems.append(error.message)
    status = error.status if error is not None and error.status != 404 else 422
    return await _detail_page(request, ctx, principal, event_id, failed=(name, form), status=status)


async def _save(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    event_id: int,
    name: str,
    form: Form,
    spec: M | None,
    change: Callable[[AsyncSession, M], Awaitable[object]],
) -> Response:
    """One add/edit form: refuse what did not parse, else apply it in a transaction, and
    show a refusal next to the form or go back to the page with a notice."""
    if spec is None:
        return await _refused(request, ctx, principal, event_id, name, form)
    try:
        async with ctx.db.transaction() as session:
            await change(session, spec)
    except PopdropError as error:
        return await _refused(request, ctx, principal, event_id, name, form, error)
    return _done(event_id, name)


@router.post("/events/{event_id}/details")
async def event_details(
    request: Request, event_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    form = await _posted(request, ctx, principal, "events:write")
    return await _save(
        request, ctx, principal, event_id, "details", form, parse_details(form),
        lambda session, spec: service.update_event(session, principal, event_id, spec),
    )  # fmt: skip


@router.post("/events/{event_id}/status")
async def event_status(
    request: Request, event_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    form = await _posted(request, ctx, principal, "events:write")
    target = form.values.get("status", "")
    if target not in EVENT_LIFECYCLE.moves:
        raise PopdropError("invalid_request", "status: one of draft, published, live, closed")
    async with ctx.db.transaction() as session:
        await service.set_status(session, principal, event_id, target)
    return _done(event_id, "status")


@router.post("/events/{event_id}/slots")
async def slot_add(request: Request, event_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    form = await _posted(request, ctx, principal, "events:write")
    async with ctx.db.reader() as session:
        event = await service.get_event(session, principal, event_id)
    return await _save(
        request, ctx, principal, event_id, "slot", form, parse_slot(form, zone_of(event.timezone)),
        lambda session, spec: service.add_slot(session, principal, event_id, spec),
    )  # fmt: skip


@router.post("/events/{event_id}/lanes")
async def lane_add(request: Request, event_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    form = await _posted(request, ctx, principal, "events:write")
    data = {"name": form.values.get("name", ""), "pickup_point": form.values.get("pickup_point")}
    return await _save(
        request, ctx, principal, event_id, "lane", form, form.build(LaneCreate, data),
        lambda session, spec: service.add_lane(session, principal, event_id, spec),
    )  # fmt: skip


@router.post("/events/{event_id}/windows")
async def window_add(request: Request, event_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    form = await _posted(request, ctx, principal, "events:write")
    lane_id = form.integer("lane_id")
    spec = form.build(
        PickupWindowCreate,
        {"slot_id": form.integer("slot_id"), "capacity": form.integer("capacity")},
    )
    if lane_id is None:
        form.errors.setdefault("lane_id", "pick a lane")
    if spec is None or lane_id is None:
        return await _refused(request, ctx, principal, event_id, "window", form)
    try:
        async with ctx.db.transaction() as session:
            lane = await owned(
                session,
                Lane,
                lane_id,
                principal.org_id,
                what="lane of this event",
                where=(Lane.event_id == event_id,),
            )
            await service.add_pickup_window(session, principal, lane.id, spec)
    except PopdropError as error:
        return await _refused(request, ctx, principal, event_id, "window", form, error)
    return _done(event_id, "window")


@router.post("/events/{event_id}/partners")
async def partner_add(
    request: Request, event_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    form = await _posted(request, ctx, principal, "events:write")
    data = {"name": form.values.get("name", ""), "contact_email": form.values.get("contact_email")}
    return await _save(
        request, ctx, principal, event_id, "partner", form, form.build(PartnerCreate, data),
        lambda session, spec: service.add_partner(session, principal, event_id, spec),
    )  # fmt: skip


@router.post("/events/{event_id}/staff")
async def staff_add(request: Request, event_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    form = await _posted(request, ctx, principal, "events:write")
    data = {"user_id": form.integer("user_id"), "gate": form.values.get("gate") or "main"}
    return await _save(
        request, ctx, principal, event_id, "staff", form, form.build(StaffCreate, data),
        lambda session, spec: service.assign_staff(session, principal, event_id, spec),
    )  # fmt: skip


@router.post("/events/{event_id}/products")
async def product_add(
    request: Request, event_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    form = await _posted(request, ctx, principal, "inventory:write")
    return await _save(
        request, ctx, principal, event_id, "product", form, parse_product(form),
        lambda session, spec: inventory.create_product(session, principal, event_id, spec),
    )  # fmt: skip


def stock_cells(form: Form) -> list[StockSet]:
    """The stock table: one `stock-{variant}-{lane}` field per cell; blank cells are left."""
    cells: list[StockSet] = []
    for name in sorted(form.values):
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "stock" or not form.values[name]:
            continue
        total = form.integer(name)
        if total is None:
            continue
        data = {"variant_id": parts[1], "lane_id": parts[2], "total": total}
        spec = form.build(StockSet, data, {"total": name, "variant_id": name, "lane_id": name})
        if spec is not None:
            cells.append(spec)
    return cells


@router.post("/events/{event_id}/stock")
async def stock_set(request: Request, event_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    form = await _posted(request, ctx, principal, "inventory:write")
    cells = stock_cells(form)
    if not form.ok:
        return await _refused(request, ctx, principal, event_id, "stock", form)
    try:
        async with ctx.db.transaction() as session:
            await service.get_event(session, principal, event_id)
            for spec in cells:
                lane = await session.get(Lane, spec.lane_id)
                if lane is None or lane.event_id != event_id:
                    raise PopdropError("invalid_request", "that lane belongs to another event")
                await inventory.set_stock(session, principal, spec, now=ctx.clock.now())
    except PopdropError as error:
        return await _refused(request, ctx, principal, event_id, "stock", form, error)
    return _done(event_id, "stock")
