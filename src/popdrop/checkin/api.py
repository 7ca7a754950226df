"""Check-in REST API (thin: parse, call the service, shape the answer)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.checkin import service, tickets
from popdrop.checkin.models import Ticket
from popdrop.checkin.schemas import (
    BatchAnswer,
    CheckinKey,
    Counts,
    IssuedTicket,
    ScanAnswer,
    ScanBatch,
    ScanRequest,
    TicketCreate,
)
from popdrop.core import links
from popdrop.core.errors import PopdropError
from popdrop.core.schemas import error_responses
from popdrop.web.auth import ApiPrincipal
from popdrop.web.context import AppContext, client_address
from popdrop.web.idempotent import respond_once
from popdrop.web.params import Ctx, IdempotencyKey, ItemId

router = APIRouter(prefix="/api/v1", tags=["checkin"])

SCANS = Counter("popdrop_checkin_scans_total", "Check-in scans", ["result"])
SCAN_REFUSALS = (401, 403, 409, 410, 422, 429)


def issued(ctx: AppContext, ticket: Ticket, secret: str, created: bool) -> IssuedTicket:
    return IssuedTicket(
        ticket=service.ticket_out(ticket),
        secret=secret,
        short_code=tickets.format_short_code(tickets.short_code(secret)),
        url=links.ticket_url(ctx.settings.base_url, secret),
        created=created,
    )


async def scan_once(
    ctx: AppContext,
    request: Request,
    principal: Principal,
    scan: ScanRequest,
    *,
    bound_event_id: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """One scan. A typed short code (40 bits) counts as a guess when it names no ticket or
    has a typo, per token or operator like voucher codes (429 `rate_limited` past the
    limit), so nobody walks the code space through a scanner login; QR secrets skip this."""
    now, bound = ctx.clock.now(), bound_event_id
    if not tickets.looks_like_short_code(scan.secret):
        return await service.checkin(ctx.db, principal, scan, now=now, bound_event_id=bound)
    address = client_address(request)
    await ctx.guard.check(principal.org_id, address, principal=principal.actor)
    try:
        status, payload = await service.checkin(
            ctx.db, principal, scan, now=now, bound_event_id=bound
        )
    except PopdropError as error:
        if error.reason == "short_code_invalid":
            await ctx.guard.failed(principal.org_id, address, principal=principal.actor)
        raise
    if payload.get("result") == "invalid":
        await ctx.guard.failed(principal.org_id, address, principal=principal.actor)
    return status, payload


# ---------------------------------------------------------------- tickets


@router.post(
    "/tickets",
    status_code=201,
    response_model=IssuedTicket,
    responses=error_responses(401, 403, 404, 422),
    summary="Issue a ticket for a subject (201), or return its valid one (200)",
)
async def issue_ticket(
    body: TicketCreate,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    now = ctx.clock.now()

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        ticket, secret, created = await service.issue_ticket(session, principal, body, now=now)
        answer = issued(ctx, ticket, secret, created)
        return (201 if created else 200), answer.model_dump(mode="json")

    return await respond_once(
        ctx, request, principal, idempotency_key, body, operation, scope=service.ISSUE_SCOPE
    )


@router.get(
    "/tickets/{ticket_id}", response_model=IssuedTicket, responses=error_responses(401, 403, 404)
)
async def get_ticket(ticket_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> IssuedTicket:
    principal.require(service.ISSUE_SCOPE)
    async with ctx.db.transaction() as session:  # may make the event's key on first use
        ticket = await service.get_ticket(session, principal, ticket_id)
        secret = await service.ticket_secret(session, ticket, ctx.clock.now())
    return issued(ctx, ticket, secret, False)


async def _change(ctx: AppContext, principal: Principal, ticket_id: int, action: str) -> Any:
    async with ctx.db.transaction() as session:
        ticket, secret = await service.change_ticket(
            session,
            principal,
            ticket_id,
            action,
            now=ctx.clock.now(),
        )
    return issued(ctx, ticket, secret, False)


_CHANGE_ERRORS = error_responses(401, 403, 404, 409)


@router.post("/tickets/{ticket_id}/cancel", response_model=IssuedTicket, responses=_CHANGE_ERRORS)
async def cancel_ticket(ticket_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> IssuedTicket:
    result: IssuedTicket = await _change(ctx, principal, ticket_id, "cancel")
    return result


@router.post("/tickets/{ticket_id}/revoke", response_model=IssuedTicket, responses=_CHANGE_ERRORS)
async def revoke_ticket(ticket_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> IssuedTicket:
    result: IssuedTicket = await _change(ctx, principal, ticket_id, "revoke")
    return result


@router.post(
    "/tickets/{ticket_id}/reissue",
    response_model=IssuedTicket,
    responses=_CHANGE_ERRORS,
    summary="A new secret for the ticket; the previous one stops working",
)
async def reissue_ticket(ticket_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> IssuedTicket:
    result: IssuedTicket = await _change(ctx, principal, ticket_id, "reissue")
    return result


# ---------------------------------------------------------------- scanners


@router.get(
    "/events/{event_id}/checkin-key",
    response_model=CheckinKey,
    responses=error_responses(401, 403, 404),
    summary="The event's public key and revocation list, for offline scanners",
)
async def checkin_key(event_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> CheckinKey:
    async with ctx.db.transaction() as session:  # may make the key on first use
        return await service.checkin_key(session, principal, event_id, ctx.clock.now())


@router.get(
    "/events/{event_id}/checkin-counts",
    response_model=Counts,
    responses=error_responses(401, 403, 404),
)
async def checkin_counts(event_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> Counts:
    async with ctx.db.reader() as session:
        return await service.counts(session, principal, event_id)


@router.post(
    "/checkins",
    response_model=ScanAnswer,
    responses=error_responses(*SCAN_REFUSALS),
    summary="Check a ticket in; the same nonce always gets the same answer",
)
async def checkin(
    body: ScanRequest, request: Request, principal: ApiPrincipal, ctx: Ctx
) -> Response:
    status, payload = await scan_once(ctx, request, principal, body)
    SCANS.labels(payload.get("result", "error")).inc()
    # The door's hot path: orjson writes the same compact UTF-8 JSON as JSONResponse.
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


@router.post(
    "/checkins/batch",
    response_model=BatchAnswer,
    responses=error_responses(401, 403, 422),
    summary="Upload offline scans; each keeps its scanned_at and gets its own answer",
)
async def checkin_batch(body: ScanBatch, principal: ApiPrincipal, ctx: Ctx) -> BatchAnswer:
    answers = await service.checkin_batch(ctx.db, principal, body.scans, now=ctx.clock.now())
    for _, payload in answers:
        SCANS.labels(payload.get("result", "error")).inc()
    return BatchAnswer.model_validate(
        {"results": [{"status": status, "body": payload} for status, payload in answers]}
    )
