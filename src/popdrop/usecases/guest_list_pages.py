"""The guest list page `/events/{event_id}/guests` and its CSV `…/guests.csv`: the same
rows (`usecases.guest_list`), the same search (`q`) and kind filter, every CSV cell
neutralised by `core.csvsafe`. Needs a session with `rsvps:read`; another
organization's event is a 404."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.core.csvsafe import csv_text
from popdrop.usecases import guest_list as guests
from popdrop.web.pagekit import Operator, PageRoute
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE
from popdrop.web.streaming import csv_download
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False, route_class=PageRoute)
CHUNK = 500  # rows per CSV chunk


def _filters(request: Request) -> tuple[str, str]:
    q = request.query_params.get("q", "")[:200]
    kind = request.query_params.get("kind", "")
    return q, kind if kind in guests.KINDS else ""


@router.get("/events/{event_id}/guests")
async def guest_page(request: Request, event_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    q, kind = _filters(request)
    async with ctx.db.reader() as session:
        found = await guests.guest_list(
            session, principal, event_id, now=ctx.clock.now(), q=q, kind=kind
        )
    context = {
        "principal": principal,
        "list": found,
        "event": found.event,
        "q": q,
        "kind": kind,
        "max_rows": guests.MAX_ROWS,
    }
    response = render(request, "usecases/guests.html", context)
    response.headers.update(NO_STORE)  # contact points of people
    return response


@router.get("/events/{event_id}/guests.csv")
async def guest_csv(request: Request, event_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    q, kind = _filters(request)

    async def open_export(session: AsyncSession) -> AsyncIterator[str]:
        found = await guests.guest_list(
            session, principal, event_id, now=ctx.clock.now(), q=q, kind=kind
        )

        async def chunks() -> AsyncIterator[str]:
            yield csv_text([guests.CSV_HEADER])
            zone = found.event.timezone
            for start in range(0, len(found.rows), CHUNK):
                rows = found.rows[start : start + CHUNK]
                yield csv_text(guests.csv_row(row, zone) for row in rows)

        return chunks()

    return await csv_download(ctx, open_export, f"guests-event-{event_id}.csv")
