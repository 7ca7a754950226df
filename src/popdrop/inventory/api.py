"""Inventory REST API, holds, and the public live-availability stream (SSE)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.core.errors import not_found
from popdrop.core.schemas import error_responses
from popdrop.events.models import Event
from popdrop.inventory import service
from popdrop.inventory.schemas import (
    Availability,
    HoldCreate,
    HoldOut,
    ProductCreate,
    ProductOut,
    StockOut,
    StockSet,
)
from popdrop.web.auth import ApiPrincipal
from popdrop.web.idempotent import respond_once
from popdrop.web.params import Ctx, IdempotencyKey, ItemId

router = APIRouter(prefix="/api/v1", tags=["inventory"])
public_router = APIRouter(include_in_schema=False)
HOLD_REFUSALS = error_responses(401, 403, 404, 409, 410, 422)
STREAM_EVERY_SECONDS = 1.0


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
async def set_stock(body: StockSet, principal: ApiPrincipal, ctx: Ctx) -> StockOut:
    async with ctx.db.transaction() as session:
        return await service.set_stock(session, principal, body, now=ctx.clock.now())


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
    if idempotency_key is None:  # the burst path: no answer to store with the hold
        hold = await service.take_hold(ctx.db, principal, body, now=now)
        return JSONResponse(hold.model_dump(mode="json"), status_code=201)

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        hold = await service.create_hold(session, principal, body, now=now)
        return 201, hold.model_dump(mode="json")

    return await respond_once(ctx, request, principal, idempotency_key, body, operation)


@router.get("/holds/{hold_id}", response_model=HoldOut, responses=error_responses(401, 403, 404))
async def get_hold(hold_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> HoldOut:
    async with ctx.db.reader() as session:
        return await service.get_hold(session, principal, hold_id)


@router.post("/holds/{hold_id}/extend", response_model=HoldOut, responses=HOLD_REFUSALS)
async def extend_hold(hold_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> HoldOut:
    async with ctx.db.transaction() as session:
        return await service.extend_hold(session, principal, hold_id, now=ctx.clock.now())


@router.post("/holds/{hold_id}/release", response_model=HoldOut, responses=HOLD_REFUSALS)
async def release_hold(hold_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> HoldOut:
    async with ctx.db.transaction() as session:
        return await service.end_hold(
            session, principal, hold_id, convert=False, now=ctx.clock.now()
        )


@router.post("/holds/{hold_id}/convert", response_model=HoldOut, responses=HOLD_REFUSALS)
async def convert_hold(hold_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> HoldOut:
    async with ctx.db.transaction() as session:
        return await service.end_hold(
            session, principal, hold_id, convert=True, now=ctx.clock.now()
        )


@public_router.get("/e/{event_id}/availability/stream")
async def availability_stream(event_id: ItemId, request: Request, ctx: Ctx) -> Response:
    """Server-sent events: the live stock of a published event, sent when it changes."""
    async with ctx.db.reader() as session:
        status = await session.scalar(select(Event.status).where(Event.id == event_id))
    if status not in service.OPEN_STATUSES:
        raise not_found("event")

    async def events() -> AsyncIterator[str]:
        last = ""
        yield "retry: 2000\n\n"
        while not await request.is_disconnected():
            async with ctx.db.reader() as session:
                rows = await service.availability(session, event_id, ctx.clock.now())
            data = json.dumps([r.model_dump() for r in rows])
            if data != last:
                last = data
                yield f"event: availability\ndata: {data}\n\n"
            await asyncio.sleep(STREAM_EVERY_SECONDS)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
