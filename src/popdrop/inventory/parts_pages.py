"""Edit and remove pages for an event's parts: `/events/{event_id}/{kind}/{id}/edit`
(GET shows the form and a remove button; POST saves) and `…/remove` (POST), for `kind`
in slots, lanes, windows and products. The workspace `/events/{event_id}` links each row
here.

The rules are `inventory.parts`' (never below what is taken, never removing what is
used); a refusal is shown on this page next to the form with its status (409 for
`capacity_below_taken` and `in_use`, 422 for a form that does not validate). Every POST
checks the CSRF field first, then the scope (events:write for slots, lanes and windows,
inventory:write for products); looking needs events:read. A part of another event or
organization is a 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.core.errors import PopdropError
from popdrop.core.localtime import zone_of
from popdrop.core.money import Money
from popdrop.core.tenancy import owned
from popdrop.events import service
from popdrop.events.models import Event, Lane, PickupWindow, TimeSlot
from popdrop.inventory import parts
from popdrop.inventory.models import Product
from popdrop.inventory.pages import card_fields, slot_fields
from popdrop.inventory.schemas import LaneUpdate, ProductUpdate, SlotUpdate, WindowUpdate
from popdrop.web.auth import check_csrf
from popdrop.web.context import AppContext
from popdrop.web.forms import Form, form_of
from popdrop.web.pagekit import Operator, PageRoute
from popdrop.web.params import Ctx, ItemId
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False, route_class=PageRoute)
SHOWN_REFUSALS = frozenset({"capacity_below_taken", "in_use", "invalid_request"})


def _wall(value: datetime, timezone: str) -> str:
    return value.astimezone(zone_of(timezone)).strftime("%Y-%m-%dT%H:%M")


# ---------------------------------------------------------------- the four kinds


def _loader(
    model: Any, what: str, in_event: Callable[[int], Any]
) -> Callable[[AsyncSession, int, int, int], Awaitable[Any]]:
    """The part `part_id` of the organization's event `event_id`, or a 404."""

    async def load(session: AsyncSession, org_id: int, event_id: int, part_id: int) -> Any:
        return await owned(session, model, part_id, org_id, what=what, where=(in_event(event_id),))

    return load


def _slot_values(slot: TimeSlot, event: Event) -> dict[str, str]:
    return {
        "label": slot.label,
        "starts_at": _wall(slot.starts_at, event.timezone),
        "ends_at": _wall(slot.ends_at, event.timezone),
        "capacity": str(slot.capacity),
    }


def _parse_slot(form: Form, event: Event) -> BaseModel | None:
    data = slot_fields(form, zone_of(event.timezone))
    for name in ("starts_at", "ends_at", "capacity"):
        if data[name] is None:
            form.errors.setdefault(name, "required")
    return form.build(SlotUpdate, data)


def _parse_lane(form: Form, event: Event) -> BaseModel | None:
    data = {"name": form.values.get("name", ""), "pickup_point": form.values.get("pickup_point")}
    return form.build(LaneUpdate, data)


def _parse_window(form: Form, event: Event) -> BaseModel | None:
    capacity = form.integer("capacity")
    if capacity is None:
        form.errors.setdefault("capacity", "required")
    return form.build(WindowUpdate, {"capacity": capacity})


def _product_values(product: Product, event: Event) -> dict[str, str]:
    price = Money(product.price_minor, product.currency).format().rsplit(" ", 1)[0]
    return {
        "title": product.title,
        "price": price,
        "currency": product.currency,
        "highlights": product.highlights,
        "image_url": product.image_url,
    }


def _parse_product(form: Form, event: Event) -> BaseModel | None:
    return form.build(ProductUpdate, card_fields(form), {"price_minor": "price"})


Update = Callable[[AsyncSession, Principal, int, Any], Awaitable[object]]


def _untimed(update: Update) -> Callable[..., Awaitable[object]]:
    return lambda session, principal, part_id, spec, _now: update(session, principal, part_id, spec)


def _timed(update: Callable[..., Awaitable[object]]) -> Callable[..., Awaitable[object]]:
    return lambda session, principal, part_id, spec, now: update(
        session, principal, part_id, spec, now=now
    )


@dataclass(frozen=True)
class Kind:
    noun: str
    scope: str
    load: Callable[[AsyncSession, int, int, int], Awaitable[Any]]
    values: Callable[[Any, Event], dict[str, str]]
    parse: Callable[[Form, Event], BaseModel | None]
    # (session, principal, id, spec, now): the app's clock times a change (a new price).
    update: Callable[[AsyncSession, Principal, int, Any, datetime], Awaitable[object]]
    remove: Callable[[AsyncSession, Principal, int], Awaitable[object]]
    anchor: str  # the workspace section to go back to


KINDS = {
    "slots": Kind(
        "slot", parts.EVENTS_WRITE,
        _loader(TimeSlot, "slot of this event", lambda e: TimeSlot.event_id == e),
        _slot_values, _parse_slot,
        _untimed(parts.update_slot), parts.remove_slot, "slots",
    ),
    "lanes": Kind(
        "lane", parts.EVENTS_WRITE,
        _loader(Lane, "lane of this event", lambda e: Lane.event_id == e),
        lambda lane, _e: {"name": lane.name, "pickup_point": lane.pickup_point},
        _parse_lane, _untimed(parts.update_lane), parts.remove_lane, "lanes",
    ),
    "windows": Kind(
        "pickup window", parts.EVENTS_WRITE,
        _loader(PickupWindow, "pickup window of this event", lambda e: PickupWindow.lane_id.in_(
            select(Lane.id).where(Lane.event_id == e))),
        lambda window, _e: {"capacity": str(window.capacity)},
        _parse_window, _untimed(parts.update_window), parts.remove_window, "lanes",
    ),
    "products": Kind(
        "product", parts.INVENTORY_WRITE,
        _loader(Product, "product of this event", lambda e: Product.event_id == e),
        _product_values, _parse_product,
        _timed(parts.update_product), parts.remove_product, "products",
    ),
}  # fmt: skip


def _kind(name: str) -> Kind:
    kind = KINDS.get(name)
    if kind is None:
        raise PopdropError("not_found", "page not found")
    return kind


# ---------------------------------------------------------------- routes


async def _page(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    event_id: int,
    kind_name: str,
    part_id: int,
    *,
    form: Form | None = None,
    status: int = 200,
) -> Response:
    principal.require("events:read")
    kind = _kind(kind_name)
    async with ctx.db.reader() as session:
        event = await service.get_event(session, principal, event_id)
        part = await kind.load(session, principal.org_id, event.id, part_id)
        taken = getattr(part, "taken", None)
    if form is None or not form.values:  # as it is, with any refusal above the form
        form = Form(values=kind.values(part, event), problems=form.problems if form else [])
    context = {
        "principal": principal,
        "event": event,
        "kind": kind,
        "kind_name": kind_name,
        "part": part,
        "taken": taken,
        "form": form,
        "can_write": kind.scope in principal.scopes,
    }
    return render(request, "events/part_edit.html", context, status=status)


@router.get("/events/{event_id}/{kind_name}/{part_id}/edit")
async def part_edit_page(
    request: Request, event_id: ItemId, kind_name: str, part_id: ItemId,
    principal: Operator, ctx: Ctx,
) -> Response:  # fmt: skip
    return await _page(request, ctx, principal, event_id, kind_name, part_id)


async def _checked(
    request: Request, ctx: AppContext, principal: Principal, event_id: int, name: str, part_id: int
) -> tuple[Kind, Form, Event]:
    """CSRF, scope, and the part of this event (404 otherwise)."""
    data = await request.form()
    check_csrf(request, ctx, data)
    kind = _kind(name)
    principal.require(kind.scope)
    async with ctx.db.reader() as session:
        event = await service.get_event(session, principal, event_id)
        await kind.load(session, principal.org_id, event.id, part_id)
    return kind, form_of(data), event


async def _apply(
    request: Request, ctx: AppContext, principal: Principal, event_id: int, name: str,
    part_id: int, form: Form | None, change: Callable[[AsyncSession], Awaitable[object]],
    done: str,
) -> Response:  # fmt: skip
    """Run the change in one transaction; a refusal shows the page again with why."""
    kind = _kind(name)
    try:
        async with ctx.db.transaction() as session:
            await change(session)
    except PopdropError as error:
        if error.reason not in SHOWN_REFUSALS:
            raise
        form = form or Form()
        form.problems.append(error.message)
        return await _page(
            request, ctx, principal, event_id, name, part_id, form=form, status=error.status
        )
    return RedirectResponse(f"/events/{event_id}?done={done}#{kind.anchor}", status_code=303)


@router.post("/events/{event_id}/{kind_name}/{part_id}/edit")
async def part_edit(
    request: Request, event_id: ItemId, kind_name: str, part_id: ItemId,
    principal: Operator, ctx: Ctx,
) -> Response:  # fmt: skip
    kind, form, event = await _checked(request, ctx, principal, event_id, kind_name, part_id)
    spec = kind.parse(form, event)
    if spec is None:
        return await _page(
            request, ctx, principal, event_id, kind_name, part_id, form=form, status=422
        )
    return await _apply(
        request, ctx, principal, event_id, kind_name, part_id, form,
        lambda session: kind.update(session, principal, part_id, spec, ctx.clock.now()),
        "edited",
    )  # fmt: skip


@router.post("/events/{event_id}/{kind_name}/{part_id}/remove")
async def part_remove(
    request: Request, event_id: ItemId, kind_name: str, part_id: ItemId,
    principal: Operator, ctx: Ctx,
) -> Response:  # fmt: skip
    kind, _form, _event = await _checked(request, ctx, principal, event_id, kind_name, part_id)
    return await _apply(
        request, ctx, principal, event_id, kind_name, part_id, None,
        lambda session: kind.remove(session, principal, part_id), "removed",
    )  # fmt: skip
