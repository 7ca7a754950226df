"""Check-in pages: the public ticket page `/t/{secret}` (QR + .ics) and the scanner page
`/scan/{event_id}` for the volunteer role.

The scanner posts each scan to `/scan/{event_id}/check` with the page session and the
CSRF token in the `X-CSRF-Token` header (or a `csrf` form field); the REST API keeps
token auth. The answer is the same JSON as `POST /api/v1/checkins`, plus the counts.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from popdrop.accounts.service import Principal
from popdrop.checkin import service, tickets
from popdrop.checkin.api import scan_once
from popdrop.checkin.schemas import ScanRequest
from popdrop.core import links, qr
from popdrop.core.errors import PopdropError
from popdrop.core.localtime import local
from popdrop.events import ical
from popdrop.events.models import DEFAULT_GATE
from popdrop.web.auth import PagePrincipal, check_csrf
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE
from popdrop.web.templating import render

MAX_SCAN_BODY = 4096

router = APIRouter(include_in_schema=False)


# ---------------------------------------------------------------- public ticket page


def _trouble(request: Request, error: PopdropError) -> Response:
    response = render(request, "checkin/ticket_trouble.html", {"error": error}, error.status)
    response.headers.update(NO_STORE)
    return response


@router.get("/t/{secret}")
async def ticket_page(request: Request, secret: str, ctx: Ctx) -> Response:
    try:
        async with ctx.db.reader() as session:
            view = await service.open_ticket(session, secret)
    except PopdropError as error:
        return _trouble(request, error)
    event = view.event
    context = {
        "view": view,
        "ticket": view.ticket,
        "event": event,
        "secret": secret,
        "short_code": tickets.format_short_code(tickets.short_code(secret)),
        "qr": qr.svg_inline(secret) if view.current and view.ticket.status == "valid" else None,
        "starts": local(event.starts_at, event.timezone),
        "ends": local(event.ends_at, event.timezone),
    }
    response = render(request, "checkin/ticket.html", context)
    response.headers.update(NO_STORE)
    return response


@router.get("/t/{secret}/event.ics")
async def ticket_calendar(request: Request, secret: str, ctx: Ctx) -> Response:
    try:
        async with ctx.db.reader() as session:
            view = await service.open_ticket(session, secret)
    except PopdropError as error:
        return _trouble(request, error)
    base_url = ctx.settings.base_url
    body = ical.ticket_file(
        view.event,
        ticket_id=view.ticket.id,
        ticket_url=links.ticket_url(base_url, secret),
        base_url=base_url,
        now=ctx.clock.now(),
    )
    return Response(
        body,
        media_type=ical.MEDIA_TYPE,
        headers={"Content-Disposition": 'attachment; filename="event.ics"', **NO_STORE},
    )


# ---------------------------------------------------------------- scanner


def _scanner(principal: Principal) -> Principal:
    principal.require(service.SCAN_SCOPE)
    return principal


@router.get("/scan/{event_id}")
async def scanner(
    request: Request, event_id: ItemId, principal: PagePrincipal, ctx: Ctx
) -> Response:
    try:
        _scanner(principal)
        async with ctx.db.reader() as session:
            event = await service.get_event(session, principal, event_id)
            counts = await service.counts(session, principal, event_id)
    except PopdropError as error:
        response = render(
            request, "error.html", {"error": error, "principal": principal}, error.status
        )
        return response
    # The home page's Scanner button names the volunteer's gate; typed by hand it is only
    # a default the volunteer can still change on the page.
    gate = request.query_params.get("gate", "").strip()[:64] or DEFAULT_GATE
    context = {"principal": principal, "event": event, "counts": counts, "gate": gate}
    response = render(request, "checkin/scan.html", context)
    response.headers.update(NO_STORE)
    return response


async def _scan_fields(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_SCAN_BODY:
        raise PopdropError("payload_too_large", "a scan is a few hundred bytes")
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = json.loads(raw or b"{}")
        except ValueError as exc:
            raise PopdropError("invalid_request", "body: not JSON") from exc
        if not isinstance(data, dict):
            raise PopdropError("invalid_request", "body: a JSON object")
        return data
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


@router.post("/scan/{event_id}/check")
async def scanner_check(
    request: Request, event_id: ItemId, principal: PagePrincipal, ctx: Ctx
) -> Response:
    try:
        fields = await _scan_fields(request)
        csrf = request.headers.get("x-csrf-token") or str(fields.pop("csrf", ""))
        fields.pop("csrf", None)
        check_csrf(request, ctx, {"csrf": csrf})
        _scanner(principal)
        async with ctx.db.reader() as session:
            await service.get_event(session, principal, event_id)
        try:
            scan = ScanRequest.model_validate({**fields, "event_id": event_id})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise PopdropError("invalid_request", f"{where}: {first.get('msg')}") from exc
        status, payload = await scan_once(ctx, request, principal, scan, bound_event_id=event_id)
        async with ctx.db.reader() as session:
            counts = await service.counts(session, principal, event_id)
    except PopdropError as error:
        return JSONResponse(error.to_dict(), status_code=error.status, headers=error.headers)
    body = {**payload, "counts": counts.model_dump()}
    return JSONResponse(body, status_code=status, headers=NO_STORE)
