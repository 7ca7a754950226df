"""Inventory REST API, holds, and the public live-availability stream (SSE).

The stream (`GET /e/{event_id}/availability/stream`) is public, so it is built to be cheap
and bounded: every stream of an event listens to the one publisher of that event in this
process (`inventory.live`: one database read per tick or change, not per stream); a
stream is admitted under a per-address and an overall cap (429/503 with a reason and
Retry-After, before the stream starts); it ends after its idle time or lifetime and the
browser's EventSource reconnects. Stock edits and holds made here wake the publisher.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.core.schemas import error_responses
from popdrop.events.schemas import LaneOut, PickupWindowOut, SlotOut
from popdrop.inventory import live, parts, service
from popdrop.inventory.schemas import (
    Availability,
    HoldCreate,
    HoldOut,
    LaneUpdate,
    ProductCreate,
    ProductOut,
    ProductUpdate,
    SlotUpdate,
    StockOut,
    StockSet,
    WindowUpdate,
)
from popdrop.web.auth import ApiPrincipal
from popdrop.web.context import AppContext, client_address
from popdrop.web.idempotent import respond_once
from popdrop.web.params import Ctx, IdempotencyKey, ItemId
from popdrop.web.streaming import (
    SSE_KEEPALIVE,
    ConnectionCaps,
    EventStream,
    StreamLimits,
    StreamTimer,
    connection_caps,
    sse_end,
    sse_event,
)

router = APIRouter(prefix="/api/v1", tags=["inventory"])
public_router = APIRouter(include_in_schema=False)
HOLD_REFUSALS = error_responses(401, 403, 404, 409, 410, 422)
EDIT_REFUSALS = error_responses(401, 403, 404, 409, 422)
REMOVAL_REFUSALS = error_responses(401, 403, 404, 409)
RETRY_MS = 2000  # how long EventSource waits before reconnecting after a stream ends


@router.post(
    "/events/{event_id}/products",
    status_code=201,
    response_model=ProductOut,
    responses=error_responses(401, 403, 404, 422),
)
async def create_product(
    event_id: ItemId, body: ProductCreate, principal: ApiPrincipal, ctx: Ctx
) -> ProductOut:
    async with ctx.db.transaction() as session:
        return await service.create_product(session, principal, event_id, body)


@router.get(
    "/events/{event_id}/products",
    response_model=list[ProductOut],
    responses=error_responses(401, 403, 404),
)
async def list_products(event_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> list[ProductOut]:
    async with ctx.db.reader() as session:
        return await service.list_products(session, principal, event_id)


@router.put("/stock", response_model=StockOut, responses=error_responses(401, 403, 404, 409, 422))
async def set_stock(
    body: StockSet, request: Request, principal: ApiPrincipal, ctx: Ctx
) -> StockOut:
    async with ctx.db.transaction() as session:
        stock = await service.set_stock(session, principal, body, now=ctx.clock.now())
    _stock_hub(request, ctx).changed(lanes=(stock.lane_id,))
    return stock


@router.get(
    "/events/{event_id}/availability",
    response_model=list[Availability],
    responses=error_responses(401, 403, 404),
)
async def get_availability(
    event_id: ItemId, principal: ApiPrincipal, ctx: Ctx
) -> list[Availability]:
    async with ctx.db.reader() as session:
        await service.list_products(session, principal, event_id)  # 404 across tenants
        return await service.availability(
            session, event_id, ctx.clock.now(), org_id=principal.org_id
        )


@router.post(
    "/holds",
    status_code=201,
    response_model=HoldOut,
    responses=HOLD_REFUSALS,
    summary="Hold units for a while (TTL per event); safe to retry with Idempotency-Key",
)
async def create_hold(
    body: HoldCreate,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    now = ctx.clock.now()
    hub = _stock_hub(request, ctx)
    if idempotency_key is None:  # the burst path: no answer to store with the hold
        hold = await service.take_hold(ctx.db, principal, body, now=now)
        hub.changed(event_id=hold.event_id)
        return JSONResponse(hold.model_dump(mode="json"), status_code=201)

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        hold = await service.create_hold(session, principal, body, now=now)
        return 201, hold.model_dump(mode="json")

    response = await respond_once(
        ctx, request, principal, idempotency_key, body, operation, scope="holds:write"
    )
    hub.changed(lanes=(body.lane_id,))
    return response


@router.get("/holds/{hold_id}", response_model=HoldOut, responses=error_responses(401, 403, 404))
async def get_hold(hold_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> HoldOut:
    async with ctx.db.reader() as session:
        return await service.get_hold(session, principal, hold_id)


@router.post("/holds/{hold_id}/extend", response_model=HoldOut, responses=HOLD_REFUSALS)
async def extend_hold(hold_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> HoldOut:
    async with ctx.db.transaction() as session:
        return await service.extend_hold(session, principal, hold_id, now=ctx.clock.now())


@router.post("/holds/{hold_id}/release", response_model=HoldOut, responses=HOLD_REFUSALS)
async def release_hold(
    hold_id: ItemId, request: Request, principal: ApiPrincipal, ctx: Ctx
) -> HoldOut:
    async with ctx.db.transaction() as session:
        hold = await service.end_hold(
            session, principal, hold_id, convert=False, now=ctx.clock.now()
        )
    _stock_hub(request, ctx).changed(event_id=hold.event_id)
    return hold


@router.post("/holds/{hold_id}/convert", response_model=HoldOut, responses=HOLD_REFUSALS)
async def convert_hold(
    hold_id: ItemId, request: Request, principal: ApiPrincipal, ctx: Ctx
) -> HoldOut:
    async with ctx.db.transaction() as session:
        hold = await service.end_hold(
            session, principal, hold_id, convert=True, now=ctx.clock.now()
        )
    _stock_hub(request, ctx).changed(event_id=hold.event_id)
    return hold


# ---------------------------------------------------------------- editing an event's parts
# Never below what is taken (409 capacity_below_taken), never removing what is used (409
# in_use): inventory.parts.


@router.patch("/slots/{slot_id}", response_model=SlotOut, responses=EDIT_REFUSALS)
async def update_slot(
    slot_id: ItemId, body: SlotUpdate, principal: ApiPrincipal, ctx: Ctx
) -> SlotOut:
    async with ctx.db.transaction() as session:
        slot = await parts.update_slot(session, principal, slot_id, body)
        return SlotOut.model_validate(slot, from_attributes=True)


@router.delete("/slots/{slot_id}", status_code=204, responses=REMOVAL_REFUSALS)
async def remove_slot(slot_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> Response:
    async with ctx.db.transaction() as session:
        await parts.remove_slot(session, principal, slot_id)
    return Response(status_code=204)


@router.patch("/lanes/{lane_id}", response_model=LaneOut, responses=EDIT_REFUSALS)
async def update_lane(
    lane_id: ItemId, body: LaneUpdate, principal: ApiPrincipal, ctx: Ctx
) -> LaneOut:
    async with ctx.db.transaction() as session:
        lane = await parts.update_lane(session, principal, lane_id, body)
        return LaneOut.model_validate(lane, from_attributes=True)


@router.delete("/lanes/{lane_id}", status_code=204, responses=REMOVAL_REFUSALS)
async def remove_lane(
    lane_id: ItemId, request: Request, principal: ApiPrincipal, ctx: Ctx
) -> Response:
    async with ctx.db.transaction() as session:
        event_id = await parts.remove_lane(session, principal, lane_id)
    _stock_hub(request, ctx).changed(event_id=event_id)
    return Response(status_code=204)


@router.patch("/windows/{window_id}", response_model=PickupWindowOut, responses=EDIT_REFUSALS)
async def update_window(
    window_id: ItemId, body: WindowUpdate, principal: ApiPrincipal, ctx: Ctx
) -> PickupWindowOut:
    async with ctx.db.transaction() as session:
        window = await parts.update_window(session, principal, window_id, body)
        return PickupWindowOut.model_validate(window, from_attributes=True)


@router.delete("/windows/{window_id}", status_code=204, responses=REMOVAL_REFUSALS)
async def remove_window(window_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> Response:
    async with ctx.db.transaction() as session:
        await parts.remove_window(session, principal, window_id)
    return Response(status_code=204)


@router.patch("/products/{product_id}", response_model=ProductOut, responses=EDIT_REFUSALS)
async def update_product(
    product_id: ItemId, body: ProductUpdate, principal: ApiPrincipal, ctx: Ctx
) -> ProductOut:
    async with ctx.db.transaction() as session:
        return await parts.update_product(session, principal, product_id, body, now=ctx.clock.now())


@router.delete("/products/{product_id}", status_code=204, responses=REMOVAL_REFUSALS)
async def remove_product(
    product_id: ItemId, request: Request, principal: ApiPrincipal, ctx: Ctx
) -> Response:
    async with ctx.db.transaction() as session:
        event_id = await parts.remove_product(session, principal, product_id)
    _stock_hub(request, ctx).changed(event_id=event_id)
    return Response(status_code=204)


# ---------------------------------------------------------------- the public stream


def _stock_hub(request: Request, ctx: AppContext) -> live.StockHub:
    """This app's stock publishers, made on first use; on `app.state` because they hold
    what this process's streams listen to."""
    hub: live.StockHub | None = getattr(request.app.state, "stock_hub", None)
    if hub is None:
        hub = live.StockHub(ctx.db, ctx.clock, tick_seconds=ctx.settings.stream_tick_seconds)
        request.app.state.stock_hub = hub
    return hub


def _stream_caps(request: Request, ctx: AppContext) -> ConnectionCaps:
    settings = ctx.settings
    return connection_caps(
        request.app,
        "stock_stream",
        "live stock streams",
        per_address=settings.stream_max_per_address,
        total=settings.stream_max_total,
    )


def _limits(ctx: AppContext) -> StreamLimits:
    settings = ctx.settings
    return StreamLimits(
        idle_seconds=settings.stream_idle_seconds,
        max_seconds=settings.stream_max_seconds,
        keepalive_seconds=settings.stream_keepalive_seconds,
    )


async def _frames(subscription: live.Subscription, limits: StreamLimits) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    timer = StreamTimer(limits)
    while True:
        try:
            data = await subscription.next(timer.timeout())
        except live.Gone as gone:
            yield sse_end(gone.reason)
            return
        if data is not None:
            timer.sent()
            yield sse_event("availability", data)
        elif (reason := timer.expired()) is not None:
            yield sse_end(reason)
            return
        elif timer.ping_due():
            yield SSE_KEEPALIVE


@public_router.get("/e/{event_id}/availability/stream")
async def availability_stream(event_id: ItemId, request: Request, ctx: Ctx) -> Response:
    """Server-sent events: the live stock of a published event, sent when it changes.

    Refusals come before the stream starts: 404 for an event that is not public, 429
    `too_many_connections` / 503 `server_busy` over the caps, 503 `unavailable` when the
    first read failed. The stream ends with `event: end` (`idle_timeout`, `max_lifetime`,
    `event_closed`); EventSource reconnects after `retry` ms."""
    lease = _stream_caps(request, ctx).admit(client_address(request))
    try:
        subscription = await _stock_hub(request, ctx).subscribe(event_id)
    except BaseException:
        lease.release()
        raise
    return EventStream(
        _frames(subscription, _limits(ctx)), on_close=(subscription.close, lease.release)
    )
