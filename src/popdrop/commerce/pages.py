"""Host pages for orders: the event's orders `/events/{event_id}/orders` (status filter,
CSV), one order `/orders/{order_id}` (lines, breakdown, payments with their failure codes,
refunds; Mark paid, Cancel, Refund), the lane view `/events/{event_id}/lanes/{lane_id}`
(orders to hand out per pickup window, refreshed every few seconds) and the pickup
scanner `/pickup/{event_id}?lane=` (camera or typed code, `commerce.pickup.hand_out`).

Rules these pages keep (the operator page kit's, `web.pagekit`):
- every page needs a session; reading needs `orders:read`, changing `orders:write`,
  handing out `orders:pickup`, checked by the services (a volunteer gets a 403 page);
- a partner sees only the orders of the events it partners: `orders.list_orders` and
  `orders.get_order` filter, these pages add nothing of their own;
- every POST carries the CSRF field and calls `check_csrf` first; a refusal (a refund
  larger than what is left, a transition the order's lifecycle does not allow) shows the
  order again with the reason, nothing changed;
- times are shown on the event's clock.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.commerce import orders, pickup, settlement
from popdrop.commerce.api import stripe_provider
from popdrop.commerce.lifecycle import ORDER_LIFECYCLE, SOLD_STATUSES, OrderStatus
from popdrop.commerce.models import Order
from popdrop.commerce.schemas import OrderOut
from popdrop.core.csvsafe import csv_text
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.localtime import local
from popdrop.core.money import Money
from popdrop.events.models import Event, Lane, TimeSlot
from popdrop.web.auth import check_csrf
from popdrop.web.context import AppContext
from popdrop.web.pagekit import Operator, PageRoute, is_htmx
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE
from popdrop.web.streaming import csv_download
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False, route_class=PageRoute)

LANE_REFRESH_SECONDS = 5
EXPORT_PAGE = 500
_NOTICES = {
    "paid": "Marked paid.",
    "ready": "Set aside: ready to hand over at its lane.",
    "cancelled": "The order is cancelled; its items are back on sale.",
    "refunded": "The refund is recorded.",
}
CSV_HEADER = (
    "order_id", "created_at", "status", "source", "lane", "window", "pickup_code",
    "items", "subtotal", "discount", "total", "refunded", "currency", "payment_method",
    "codes", "receipt_email", "paid_at", "picked_up_at",
)  # fmt: skip


# ---------------------------------------------------------------- reads


async def _event(session: AsyncSession, principal: Principal, event_id: int) -> Event:
    """The event of the caller's organization (its orders are filtered by the service)."""
    event = await session.scalar(
        select(Event).where(Event.id == event_id, Event.org_id == principal.org_id)
    )
    if event is None:
        raise not_found("event")
    return event


async def _places(
    session: AsyncSession, event_id: int
) -> tuple[dict[int, Lane], dict[int, TimeSlot]]:
    lanes = {
        lane.id: lane
        for lane in await session.scalars(select(Lane).where(Lane.event_id == event_id))
    }
    slots = {
        slot.id: slot
        for slot in await session.scalars(select(TimeSlot).where(TimeSlot.event_id == event_id))
    }
    return lanes, slots


def _window(order: OrderOut, slots: dict[int, TimeSlot], event: Event) -> str:
    # The same words as the receipt, the confirmation and the scanner's window check.
    slot = slots.get(order.slot_id) if order.slot_id is not None else None
    return pickup.window_label(event, slot)


def _items(order: OrderOut) -> str:
    return ", ".join(f"{line.qty} x {line.title}" for line in order.lines)


@router.get("/events/{event_id}/orders")
async def orders_page(
    request: Request, event_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    principal.require("orders:read")  # lane staff (orders:pickup) use the lane view
    status = request.query_params.get("status", "")
    if status and status not in {s.value for s in OrderStatus}:
        status = ""
    async with ctx.db.reader() as session:
        event = await _event(session, principal, event_id)
        rows = await orders.list_orders(
            session, principal, event_id=event_id, status=OrderStatus(status) if status else None
        )
        lanes, slots = await _places(session, event_id)
        summary = await orders.sales_summary(session, principal, event_id)
    context = {
        "principal": principal,
        "event": event,
        "orders": rows,
        "lanes": lanes,
        "windows": {o.id: _window(o, slots, event) for o in rows},
        "items": {o.id: _items(o) for o in rows},
        "summary": summary,
        "status": status,
        "statuses": [s.value for s in OrderStatus],
        "can_lanes": "orders:pickup" in principal.scopes,
    }
    return render(request, "commerce/orders.html", context)


@router.get("/events/{event_id}/orders.csv")
async def orders_csv(request: Request, event_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    """The event's orders as the page shows them (lane and window by name, amounts in
    major units), every cell neutralised (`core.csvsafe`), read page by page."""
    principal.require("orders:read")

    async def open_export(session: AsyncSession) -> AsyncIterator[str]:
        event = await _event(session, principal, event_id)
        first = await orders.list_orders(
            session, principal, event_id=event_id, limit=EXPORT_PAGE
        )  # refusals (scope, partner) come before the response starts
        lanes, slots = await _places(session, event_id)

        async def chunks() -> AsyncIterator[str]:
            yield csv_text([CSV_HEADER])
            page = first
            while page:
                yield csv_text(_csv_row(o, event, lanes, slots) for o in page)
                if len(page) < EXPORT_PAGE:
                    return
                page = await orders.list_orders(
                    session, principal, event_id=event_id, limit=EXPORT_PAGE,
                    before_id=page[-1].id,
                )  # fmt: skip

        return chunks()

    return await csv_download(ctx, open_export, f"orders-event-{event_id}.csv")


def _csv_row(
    order: OrderOut, event: Event, lanes: dict[int, Lane], slots: dict[int, TimeSlot]
) -> tuple[Any, ...]:
    lane = lanes.get(order.lane_id)
    return (
        order.id,
        local(order.created_at, event.timezone, "%Y-%m-%d %H:%M"),
        order.status,
        order.source,
        lane.name if lane else order.lane_id,
        _window(order, slots, event),
        order.short_code or "",
        _items(order),
        _minor(order.subtotal_minor, order.currency),
        _minor(order.discount_minor, order.currency),
        _minor(order.total_minor, order.currency),
        _minor(order.refunded_minor, order.currency),
        order.currency,
        order.payment_method or "",
        " ".join(order.codes),
        order.receipt_email or "",
        local(order.paid_at, event.timezone, "%Y-%m-%d %H:%M") if order.paid_at else "",
        local(order.picked_up_at, event.timezone, "%Y-%m-%d %H:%M") if order.picked_up_at else "",
    )


def _minor(amount_minor: int, currency: str) -> str:
    """Major units as a spreadsheet reads them ("15.50"), exactly."""
    digits = Money(0, currency).exponent
    sign = "-" if amount_minor < 0 else ""
    whole, part = divmod(abs(amount_minor), 10**digits)
    return f"{sign}{whole}.{part:0{digits}d}" if digits else f"{sign}{whole}"


# ---------------------------------------------------------------- one order


def _lane_staff(principal: Principal) -> None:
    """Orders are read by the host (`orders:read`) and by staff at the lane
    (`orders:pickup`: they collect the money of orders paid at pickup)."""
    if "orders:pickup" not in principal.scopes:
        principal.require("orders:read")


@dataclass
class ActionForms:
    """What was typed in the order page's forms and the refusal to show next to them."""

    refund_amount: str = ""
    refund_reason: str = "requested_by_customer"
    errors: dict[str, str] = field(default_factory=dict)
    problem: PopdropError | None = None


async def _order_page(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    order_id: int,
    forms: ActionForms | None = None,
    status: int = 200,
) -> Response:
    async with ctx.db.reader() as session:
        order = await orders.get_order(session, principal, order_id)
        event = await _event(session, principal, order.event_id)
        lanes, slots = await _places(session, order.event_id)
    current = OrderStatus(order.status)
    refundable = order.total_minor - order.refunded_minor
    context = {
        "principal": principal,
        "order": order,
        "event": event,
        "lane": lanes.get(order.lane_id),
        "window": _window(order, slots, event),
        "breakdown": order.breakdown,
        "forms": forms or ActionForms(),
        "notice": _NOTICES.get(request.query_params.get("done", "")),
        "can_write": "orders:write" in principal.scopes,
        "can_collect": bool({"orders:write", "orders:pickup"} & principal.scopes),
        "can_mark_paid": current == OrderStatus.PENDING,
        "can_set_aside": current == OrderStatus.PAID,
        "can_cancel": ORDER_LIFECYCLE.allows(current, OrderStatus.CANCELLED),
        "can_refund": current in SOLD_STATUSES and refundable > 0,
        "refundable": refundable,
        "codes_text": ", ".join(order.codes),
    }
    return render(request, "commerce/order.html", context, status=status)


@router.get("/orders/{order_id}")
async def order_page(request: Request, order_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    _lane_staff(principal)
    return await _order_page(request, ctx, principal, order_id)


async def _act(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    order_id: int,
    done: str,
    change: Callable[[AsyncSession], Awaitable[object]] | None,
    *,
    forms: ActionForms | None = None,
    outside: Callable[[], Awaitable[object]] | None = None,
) -> Response:
    """Run one order action; back to the order with a notice, or the order again with
    the refusal (nothing changed)."""
    forms = forms or ActionForms()
    try:
        if change is not None:
            async with ctx.db.transaction() as session:
                await change(session)
        if outside is not None:
            await outside()
    except PopdropError as error:
        if error.reason in ("forbidden", "not_found", "csrf_failed"):
            raise
        forms.problem = error
        return await _order_page(request, ctx, principal, order_id, forms, status=error.status)
    return RedirectResponse(f"/orders/{order_id}?done={done}", status_code=303)


@router.post("/orders/{order_id}/mark-paid")
async def order_mark_paid(
    request: Request, order_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    data = await request.form()
    check_csrf(request, ctx, data)
    tender = "card" if data.get("tender") == "card" else "cash"
    now = ctx.clock.now()

    async def change(session: AsyncSession) -> object:
        return await settlement.mark_paid_at_lane(
            session, principal, order_id, tender=tender, now=now, signer=ctx.signer
        )

    return await _act(request, ctx, principal, order_id, "paid", change)


@router.post("/orders/{order_id}/ready")
async def order_set_aside(
    request: Request, order_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    check_csrf(request, ctx, await request.form())
    now = ctx.clock.now()

    async def change(session: AsyncSession) -> object:
        await pickup.set_aside(session, principal, order_id, now=now)
        return None

    return await _act(request, ctx, principal, order_id, "ready", change)


@router.post("/orders/{order_id}/cancel")
async def order_cancel(
    request: Request, order_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    check_csrf(request, ctx, await request.form())
    now = ctx.clock.now()

    async def change(session: AsyncSession) -> object:
        return await settlement.cancel_order(session, principal, order_id, now=now)

    return await _act(request, ctx, principal, order_id, "cancelled", change)


@router.post("/orders/{order_id}/refund")
async def order_refund(
    request: Request, order_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    data = await request.form()
    check_csrf(request, ctx, data)
    forms = ActionForms(
        refund_amount=str(data.get("amount", "")).strip(),
        refund_reason=str(data.get("reason", "")).strip() or "requested_by_customer",
    )
    async with ctx.db.reader() as session:
        order = await orders.get_order(session, principal, order_id)
    amount: int | None = None
    if forms.refund_amount:
        try:
            amount = Money.parse(forms.refund_amount, order.currency).amount_minor
        except PopdropError as error:
            forms.errors["amount"] = error.message
            return await _order_page(request, ctx, principal, order_id, forms, status=422)
    left = order.total_minor - order.refunded_minor
    if amount is not None and amount > left:  # said in money, next to the field
        forms.errors["amount"] = f"at most {Money(left, order.currency).format()} is left to refund"
        return await _order_page(request, ctx, principal, order_id, forms, status=422)
    if len(forms.refund_reason) > 64:
        forms.errors["reason"] = "at most 64 characters"
        return await _order_page(request, ctx, principal, order_id, forms, status=422)
    now = ctx.clock.now()
    to_send: list[int] = []

    async def change(session: AsyncSession) -> object:
        _order, refund_ids = await settlement.refund_order(
            session, principal, order_id, amount_minor=amount, reason=forms.refund_reason,
            now=now, signer=ctx.signer,
        )  # fmt: skip
        to_send.extend(refund_ids)
        return _order

    async def outside() -> object:
        # After the commit, as the settlement rules want; a provider that cannot be
        # reached leaves the refund pending for the worker's next tick.
        provider = stripe_provider(ctx)
        if provider is not None and to_send:
            await settlement.send_pending_refunds(ctx.db, provider, now=now, refund_ids=to_send)
        return None

    return await _act(
        request, ctx, principal, order_id, "refunded", change, forms=forms, outside=outside
    )


# ---------------------------------------------------------------- lane view


@dataclass
class WindowGroup:
    label: str
    starts_at: Any
    orders: list[OrderOut]


async def _lane_groups(
    ctx: AppContext, principal: Principal, event_id: int, lane_id: int
) -> tuple[Event, Lane, list[WindowGroup], int]:
    async with ctx.db.reader() as session:
        event = await _event(session, principal, event_id)
        lane = await session.scalar(
            select(Lane).where(Lane.id == lane_id, Lane.event_id == event_id)
        )
        if lane is None:
            raise not_found("lane")
        rows = await orders.list_orders(session, principal, event_id=event_id, lane_id=lane_id)
        _lanes, slots = await _places(session, event_id)
    waiting = [
        o for o in rows if o.status in (OrderStatus.PAID, OrderStatus.READY, OrderStatus.PENDING)
    ]
    handed = sum(1 for o in rows if o.status == OrderStatus.PICKED_UP)
    groups: dict[int | None, WindowGroup] = {}
    for order in sorted(waiting, key=lambda o: o.created_at):
        slot = slots.get(order.slot_id) if order.slot_id is not None else None
        if order.slot_id not in groups:
            label = pickup.window_label(event, slot)
            groups[order.slot_id] = WindowGroup(label, slot.starts_at if slot else None, [])
        groups[order.slot_id].orders.append(order)
    ordered = sorted(groups.values(), key=lambda g: (g.starts_at is None, g.starts_at or 0))
    return event, lane, ordered, handed


@router.get("/events/{event_id}/lanes/{lane_id}")
async def lane_page(
    request: Request, event_id: ItemId, lane_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    _lane_staff(principal)
    event, lane, groups, handed = await _lane_groups(ctx, principal, event_id, lane_id)
    context = {
        "principal": principal,
        "event": event,
        "lane": lane,
        "groups": groups,
        "handed": handed,
        "refresh": LANE_REFRESH_SECONDS,
        "can_pickup": "orders:pickup" in principal.scopes,
    }
    name = "commerce/_lane_queue.html" if is_htmx(request) else "commerce/lane.html"
    response = render(request, name, context)
    response.headers.update(NO_STORE)
    return response


# ---------------------------------------------------------------- pickup scanner


@router.get("/pickup/{event_id}")
async def pickup_page(
    request: Request, event_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    principal.require("orders:pickup")
    async with ctx.db.reader() as session:
        event = await _event(session, principal, event_id)
        lanes, _slots = await _places(session, event_id)
    raw = request.query_params.get("lane", "")
    lane = lanes.get(int(raw)) if raw.isdecimal() and len(raw) < 19 else None
    if lane is None and len(lanes) == 1:
        lane = next(iter(lanes.values()))
    context = {
        "principal": principal,
        "event": event,
        "lane": lane,
        "lanes": sorted(lanes.values(), key=lambda item: item.id),
    }
    response = render(request, "commerce/pickup.html", context)
    response.headers.update(NO_STORE)
    return response


@router.post("/pickup/{event_id}/scan")
async def pickup_scan(
    request: Request, event_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    """One scan from the pickup page (JSON like the door scanner's): 200 with
    `result: ok` when handed out, else 409 with the refusal's reason."""
    try:
        raw = await request.body()
        if len(raw) > 4096:
            raise PopdropError("payload_too_large", "a scan is a few hundred bytes")
        try:
            data = json.loads(raw or b"{}")
        except ValueError as exc:
            raise PopdropError("invalid_request", "body: not JSON") from exc
        if not isinstance(data, dict):
            raise PopdropError("invalid_request", "body: a JSON object")
        check_csrf(request, ctx, {"csrf": request.headers.get("x-csrf-token", "")})
        principal.require("orders:pickup")
        secret = str(data.get("secret", "")).strip()[:512]
        lane = request.query_params.get("lane", "")
        if not secret or not lane.isdecimal() or len(lane) > 18:
            raise PopdropError("invalid_request", "scan a code at a lane")
        async with ctx.db.transaction() as session:
            await _event(session, principal, event_id)
            at_event = await session.scalar(
                select(Lane.id).where(Lane.id == int(lane), Lane.event_id == event_id)
            )
            if at_event is None:
                raise not_found("lane of this event")
            result = await pickup.hand_out(
                session, principal, secret_or_code=secret, lane_id=int(lane),
                now=ctx.clock.now(), signer=ctx.signer,
            )  # fmt: skip
    except PopdropError as error:
        return JSONResponse(error.to_dict(), status_code=error.status, headers=NO_STORE)
    async with ctx.db.reader() as session:
        handed = await _handed_at(session, int(lane))
    # The door scanner's script reads `result`, `reason`, `message`, `holder_ref` and
    # `counts`; the rest is the pickup answer as the API gives it.
    body = {
        **result.model_dump(mode="json"),
        "holder_ref": result.summary,
        "counts": {"checked_in": handed, "expected": 0},
    }
    return JSONResponse(body, status_code=result.http_status, headers=NO_STORE)


async def _handed_at(session: AsyncSession, lane_id: int) -> int:
    count = await session.scalar(
        select(func.count())
        .select_from(Order)
        .where(Order.lane_id == lane_id, Order.status == OrderStatus.PICKED_UP)
    )
    return int(count or 0)
