"""Pickup REST API: scan an order at a lane, a lane's queue, and the order's QR image.

Thin: parse, call `commerce.pickup`, shape the answer. A scan answers with the status of
its result (`pickup.PICKUP_STATUS`: 200 ok, 409/410/422 refusals, each with `reason`);
typed short codes that name no order count as guesses (the voucher guessing guard, 429
`rate_limited` past the limit), QR scans do not. The QR image is public behind the
confirmation page's token (`links.read_order_view`) and shown only while the order can
be picked up.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, model_validator
from sqlalchemy import select

from popdrop.checkin import tickets
from popdrop.commerce import pickup
from popdrop.commerce.models import Order
from popdrop.core import links, qr
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.schemas import StrictInput, error_responses
from popdrop.web.auth import ApiPrincipal
from popdrop.web.context import client_address
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE

router = APIRouter(prefix="/api/v1", tags=["pickup"])
public_router = APIRouter(include_in_schema=False)


class PickupScan(StrictInput):
    """One scan at a lane: the QR's `secret`, or the `code` typed from under it."""

    secret: str | None = Field(default=None, min_length=1, max_length=512)
    code: str | None = Field(default=None, min_length=1, max_length=40)
    lane_id: int = Field(ge=1, le=2**62)

    @model_validator(mode="after")
    def _one(self) -> PickupScan:
        if (self.secret is None) == (self.code is None):
            raise ValueError("give the QR's secret or the typed code (one of them)")
        return self


@router.post(
    "/pickup/scan",
    response_model=pickup.PickupResult,
    responses={
        409: {"model": pickup.PickupResult, "description": "refused: see `reason`"},
        410: {"model": pickup.PickupResult, "description": "refunded, cancelled, expired"},
        **error_responses(401, 403, 404, 422, 429),
    },
    summary="Hand an order out at a lane (ok, invalid, wrong_event, wrong_lane, "
    "outside_window, already_picked_up, not_paid, refunded, cancelled, expired)",
)
async def scan(
    body: PickupScan, request: Request, principal: ApiPrincipal, ctx: Ctx
) -> JSONResponse:
    principal.require(pickup.SCOPE)
    text = body.secret if body.secret is not None else body.code
    assert text is not None
    typed = body.code is not None or tickets.looks_like_short_code(text)
    address = client_address(request)
    if typed:
        await ctx.guard.check(principal.org_id, address, principal=principal.actor)
    async with ctx.db.transaction() as session:
        result = await pickup.hand_out(
            session, principal, secret_or_code=text, lane_id=body.lane_id,
            now=ctx.clock.now(), signer=ctx.signer,
        )  # fmt: skip
    if typed and result.result == "invalid":
        await ctx.guard.failed(principal.org_id, address, principal=principal.actor)
    return JSONResponse(
        result.model_dump(mode="json"), status_code=result.http_status, headers=NO_STORE
    )


@router.get(
    "/events/{event_id}/pickup/lanes/{lane_id}/queue",
    response_model=pickup.LaneQueue,
    responses=error_responses(401, 403, 404),
    summary="The orders a lane has to hand out, per pickup window, with their lines",
)
async def lane_queue(
    event_id: ItemId, lane_id: ItemId, principal: ApiPrincipal, ctx: Ctx
) -> pickup.LaneQueue:
    async with ctx.db.reader() as session:
        return await pickup.lane_queue(session, principal, event_id, lane_id)


async def _qr_secret(ctx: Ctx, token: str) -> tuple[str, str | None]:
    order_id, org_id = links.read_order_view(ctx.signer, token)
    async with ctx.db.reader() as session:
        order = await session.scalar(
            select(Order).where(Order.id == order_id, Order.org_id == org_id)
        )
        if order is None or not pickup.pickable(order):
            raise not_found("pickup code")
        secret = await pickup.order_secret(session, order, now=ctx.clock.now())
    return secret, pickup.format_code(order.short_code)


@public_router.get("/orders/view/{token}/qr.{fmt}")
async def order_qr(token: str, fmt: Literal["svg", "png"], ctx: Ctx) -> Response:
    """The order's pickup QR (the short code printed under the SVG one)."""
    if len(token) > 300:
        raise PopdropError("link_invalid", "this link is not valid")
    secret, code = await _qr_secret(ctx, token)
    if fmt == "png":
        return Response(qr.png_bytes(secret), media_type="image/png", headers=NO_STORE)
    image = qr.svg_bytes(secret, scale=6, border=2, caption=code)
    return Response(image, media_type="image/svg+xml", headers=NO_STORE)
