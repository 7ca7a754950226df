"""RSVP and waiting-list REST API (thin: parse, call the service, shape the answer).

Public routes (no token; guarded against guessing like voucher redemption):
  POST /api/v1/public/events/{event_id}/rsvps     RSVP or join the waiting list
                                                  (in `usecases.public_rsvp`: it also
                                                  moves the contact's engagement)
  POST /api/v1/public/rsvps/cancel                cancel with the signed cancel token
  POST /api/v1/public/waitlist/claim              claim an offer with its voucher code
Operator routes (token; scopes rsvps:read / rsvps:write; vouchers:* tokens imply them):
  GET  /api/v1/events/{event_id}/rsvps, GET /api/v1/events/{event_id}/waitlist,
  GET  /api/v1/rsvps/{rsvp_id}, POST /api/v1/rsvps/{rsvp_id}/cancel
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.core import links
from popdrop.core.errors import PopdropError
from popdrop.core.ratelimit import GUESSING_REASONS
from popdrop.core.schemas import error_responses
from popdrop.rsvp import service
from popdrop.rsvp.lifecycle import RsvpStatus
from popdrop.rsvp.schemas import (
    CancelByToken,
    CancelRequest,
    ClaimRequest,
    RsvpCreated,
    RsvpOut,
    WaitlistOut,
)
from popdrop.web.auth import ApiPrincipal
from popdrop.web.context import AppContext, client_address, route_of
from popdrop.web.idempotent import respond_once
from popdrop.web.params import Before, Ctx, IdempotencyKey, ItemId, Limit


def created(ctx: AppContext, result: service.RsvpResult) -> RsvpCreated:
    ticket_url = None
    if result.ticket_secret is not None:
        ticket_url = links.ticket_url(ctx.settings.base_url, result.ticket_secret)
    return RsvpCreated(
        rsvp=service.rsvp_out(result.rsvp), cancel_token=result.cancel_token, ticket_url=ticket_url
    )


router = APIRouter(prefix="/api/v1", tags=["rsvps"])
# Failures that look like guessing (codes, tokens) count against the client.
_GUESSES = GUESSING_REASONS | {"link_invalid"}
T = TypeVar("T")


async def public_guarded(
    ctx: AppContext, request: Request, org_id: int, call: Callable[[], Awaitable[T]]
) -> T:
    # Public callers are counted per address and per route, apart from authenticated ones.
    address, route = client_address(request), route_of(request)
    await ctx.guard.check(org_id, address, route=route)
    try:
        return await call()
    except PopdropError as error:
        if error.reason in _GUESSES:
            await ctx.guard.failed(org_id, address, route=route)
        raise


async def event_org(ctx: AppContext, event_id: int) -> int:
    async with ctx.db.reader() as session:
        return await service.event_org(session, event_id)


# ---------------------------------------------------------------- public


@router.post(
    "/public/rsvps/cancel",
    response_model=RsvpOut,
    responses=error_responses(400, 404, 409, 410, 422, 429),
    summary="Cancel an RSVP (or leave the waiting list) with its signed cancel token",
)
async def cancel_by_token(body: CancelByToken, request: Request, ctx: Ctx) -> RsvpOut:
    try:
        _rsvp_id, org_id = links.read_rsvp_cancel(ctx.signer, body.token)
    except PopdropError:
        # A forged token names no organization, but it is a guess all the same: it goes
        # through the guard (refused, then counted against the address) like any other.
        org_id = service.NO_ORG

    async def call() -> service.CancelResult:
        async def work(session: AsyncSession) -> Any:
            return await service.cancel_by_token(
                session,
                ctx.signer,
                token=body.token,
                now=ctx.clock.now(),
            )

        return await ctx.db.in_transaction(work)  # retried on a PostgreSQL deadlock

    result = await public_guarded(ctx, request, org_id, call)
    return service.rsvp_out(result.rsvp)


@router.post(
    "/public/waitlist/claim",
    response_model=RsvpCreated,
    responses=error_responses(404, 409, 410, 422, 429),
    summary="Claim a waiting-list offer with its voucher code: the RSVP is confirmed",
)
async def claim(body: ClaimRequest, request: Request, ctx: Ctx) -> RsvpCreated:
    org_id = await event_org(ctx, body.event_id)

    async def call() -> service.RsvpResult:
        async def work(session: AsyncSession) -> Any:
            return await service.claim_offer(
                session,
                ctx.signer,
                event_id=body.event_id,
                code=body.code,
                now=ctx.clock.now(),
            )

        return await ctx.db.in_transaction(work)  # retried on a PostgreSQL deadlock

    result = await public_guarded(ctx, request, org_id, call)
    return created(ctx, result)


# ---------------------------------------------------------------- operator


@router.get(
    "/events/{event_id}/rsvps",
    response_model=list[RsvpOut],
    responses=error_responses(401, 403, 404, 422),
)
async def list_rsvps(
    event_id: ItemId,
    principal: ApiPrincipal,
    ctx: Ctx,
    status: RsvpStatus | None = None,
    limit: Limit = 100,
    before: Before = None,
) -> list[RsvpOut]:
    async with ctx.db.reader() as session:
        rows = await service.list_rsvps(
            session, principal, event_id, status=status, limit=limit, before_id=before
        )
    return [service.rsvp_out(r) for r in rows]


@router.get(
    "/events/{event_id}/waitlist",
    response_model=WaitlistOut,
    responses=error_responses(401, 403, 404, 422),
    summary="The waiting list in order, with each offer's state (never its code)",
)
async def get_waitlist(event_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> WaitlistOut:
    async with ctx.db.reader() as session:
        return await service.waitlist(session, principal, event_id)


@router.get(
    "/rsvps/{rsvp_id}", response_model=RsvpOut, responses=error_responses(401, 403, 404, 422)
)
async def get_rsvp(rsvp_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> RsvpOut:
    async with ctx.db.reader() as session:
        return service.rsvp_out(await service.get_rsvp(session, principal, rsvp_id))


@router.post(
    "/rsvps/{rsvp_id}/cancel",
    response_model=RsvpOut,
    responses=error_responses(401, 403, 404, 409, 422),
    summary="Cancel an RSVP: its places go to the waiting list",
)
async def cancel_rsvp(
    rsvp_id: ItemId,
    body: CancelRequest,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    now = ctx.clock.now()

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        result = await service.cancel_rsvp(
            session,
            ctx.signer,
            principal,
            rsvp_id=rsvp_id,
            reason=body.reason,
            now=now,
        )
        return 200, service.rsvp_out(result.rsvp).model_dump(mode="json")

    return await respond_once(
        ctx, request, principal, idempotency_key, body, operation, scope="rsvps:write"
    )
