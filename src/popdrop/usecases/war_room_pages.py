"""The war room pages: `/war-room/drops/{drop_id}` and `/war-room/events/{event_id}`, their
live streams (`…/stream`, server-sent events) and the pause / resume buttons.

Rules:
- Every page and stream needs a session and `metrics:read` (`drops:write` to pause or
  resume); another organization's drop or event is a 404, answered before a stream starts.
- The figures are `usecases.war_room`'s snapshot; the page renders it (tiles readable
  without script) and hands it to `static/war-room.js` as a JSON data block, which draws
  the uPlot charts and then follows the stream.
- A stream sends the snapshot once at once, then every `TICK_SECONDS`; it ends after the
  settings' stream lifetime (EventSource reconnects) and is admitted under the same kind
  of per-address and overall caps as the public stock stream, refused before it starts.
- Pause and resume are the drops service's `set_state` (the same transitions and reasons
  as the drop page); every POST carries the CSRF field and is checked first; a refusal is
  shown on the war room with its 4xx status.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from popdrop.accounts.service import Principal
from popdrop.core.errors import PopdropError
from popdrop.drops import service as drops
from popdrop.usecases import war_room
from popdrop.web.auth import check_csrf
from popdrop.web.context import AppContext, client_address
from popdrop.web.pagekit import Operator, PageRoute
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE
from popdrop.web.streaming import (
    ConnectionCaps,
    EventStream,
    StreamLimits,
    StreamTimer,
    connection_caps,
    sse_end,
    sse_event,
)
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False, route_class=PageRoute)

TICK_SECONDS = 2.0
RETRY_MS = 3000  # how long EventSource waits before reconnecting after a stream ends
_NOTICES = {
    "paused": ("warn", "Paused: no new message goes out until you resume."),
    "resumed": ("good", "Resumed."),
}

Read = Callable[[], Awaitable[war_room.Snapshot]]


def _reader(ctx: AppContext, principal: Principal, scope: str, item_id: int) -> Read:
    async def read() -> war_room.Snapshot:
        now = ctx.clock.now()
        if scope == "drop":
            return await war_room.snapshot_of_drop(ctx.db, principal, item_id, now=now)
        return await war_room.snapshot_of_event(ctx.db, principal, item_id, now=now)

    return read


async def _page(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    scope: str,
    item_id: int,
    *,
    error: PopdropError | None = None,
) -> Response:
    snapshot = await _reader(ctx, principal, scope, item_id)()
    base = f"/war-room/{scope}s/{item_id}"
    context = {
        "principal": principal,
        "room": snapshot,
        "data": snapshot.as_json(),  # the page's JSON data block (`tojson` escapes it)
        "groups": war_room.GROUPS,
        "stream": f"{base}/stream",
        "back": f"/drops/{item_id}" if scope == "drop" else f"/events/{item_id}",
        "can_write": "drops:write" in principal.scopes,
        "error": error,
        "notice": _NOTICES.get(request.query_params.get("done", "")),
    }
    response = render(
        request, "war_room/war_room.html", context, status=error.status if error else 200
    )
    response.headers.update(NO_STORE)
    return response


@router.get("/war-room/drops/{drop_id}")
async def drop_room(request: Request, drop_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    return await _page(request, ctx, principal, "drop", drop_id)


@router.get("/war-room/events/{event_id}")
async def event_room(request: Request, event_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    return await _page(request, ctx, principal, "event", event_id)


# ---------------------------------------------------------------- the live stream


def _caps(request: Request, ctx: AppContext) -> ConnectionCaps:
    return connection_caps(
        request.app,
        "war_room_stream",
        "war room streams",
        per_address=ctx.settings.stream_max_per_address,
        total=ctx.settings.stream_max_total,
    )


async def _frames(first: war_room.Snapshot, read: Read, limits: StreamLimits) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    timer = StreamTimer(limits)
    snapshot = first
    while True:
        yield sse_event("snapshot", json.dumps(snapshot.as_json(), separators=(",", ":")))
        timer.sent()
        await asyncio.sleep(min(TICK_SECONDS, timer.timeout()))
        if (reason := timer.expired()) is not None:
            yield sse_end(reason)
            return
        try:
            snapshot = await read()
        except PopdropError as gone:  # the drop or event went away, or the access did
            yield sse_end(gone.reason)
            return


async def _stream(
    request: Request, ctx: AppContext, principal: Principal, scope: str, item_id: int
) -> Response:
    read = _reader(ctx, principal, scope, item_id)
    lease = _caps(request, ctx).admit(client_address(request))
    try:
        first = await read()  # a refusal (404, 403) comes before the stream starts
    except BaseException:
        lease.release()
        raise
    settings = ctx.settings
    # Pushed every tick whether or not anything changed, so it never goes idle; the
    # lifetime bounds it.
    limits = StreamLimits(
        idle_seconds=settings.stream_max_seconds + TICK_SECONDS,
        max_seconds=settings.stream_max_seconds,
        keepalive_seconds=settings.stream_keepalive_seconds,
    )
    return EventStream(_frames(first, read, limits), on_close=(lease.release,))


@router.get("/war-room/drops/{drop_id}/stream")
async def drop_stream(request: Request, drop_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    return await _stream(request, ctx, principal, "drop", drop_id)


@router.get("/war-room/events/{event_id}/stream")
async def event_stream(
    request: Request, event_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    return await _stream(request, ctx, principal, "event", event_id)


# ---------------------------------------------------------------- pause / resume


def _shown(error: PopdropError) -> bool:
    """Refusals shown on the war room; a missing drop or permission gets the error page."""
    return error.status < 500 and error.reason not in ("not_found", "forbidden", "csrf_failed")


@router.post("/war-room/drops/{drop_id}/{action}")
async def drop_state(
    request: Request,
    drop_id: ItemId,
    action: Literal["pause", "resume"],
    principal: Operator,
    ctx: Ctx,
) -> Response:
    form = await request.form()
    check_csrf(request, ctx, form)
    who = principal.actor.split(":", 1)[-1]
    # The event's war room lists its drops: its buttons lead back to it.
    back_event = str(form.get("event", ""))[:18]
    scope, item_id = ("event", int(back_event)) if back_event.isdecimal() else ("drop", drop_id)
    try:
        async with ctx.db.transaction() as session:
            drop = await drops.set_state(
                session,
                principal,
                drop_id,
                action,
                now=ctx.clock.now(),
                reason=f"paused by {who}" if action == "pause" else None,
            )
            if scope == "event" and drop.event_id != item_id:
                scope, item_id = "drop", drop_id
    except PopdropError as error:
        if not _shown(error):
            raise
        return await _page(request, ctx, principal, scope, item_id, error=error)
    done = "paused" if action == "pause" else "resumed"
    return RedirectResponse(f"/war-room/{scope}s/{item_id}?done={done}", status_code=303)
