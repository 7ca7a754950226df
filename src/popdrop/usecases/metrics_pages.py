"""The insights pages: `/insights/events/{event_id}` and `/insights/drops/{drop_id}` — KPI
tiles (value with numerator / denominator), the funnel as horizontal bars, breakdown
tables with bars, and CSV downloads of each (`…/kpis.csv`, `…/funnel.csv`,
`…/by-{dimension}.csv`).

Rules:
- Every page needs a session and `metrics:read`; another organization's event or drop is
  a 404 page (`usecases.insights.resolve`).
- The page folds the log first, so it shows what was just written, then reads rollups
  (the KPIs and breakdowns) and, for the funnel and repeat rate, one event's or drop's log.
- Everything is drawn on the server (CSS widths), readable without script and on a
  390 px screen (tables scroll inside their card).
- Query parameters narrow the view: `since` / `until` (ISO 8601; UTC without an offset),
  `steps` (comma-separated kinds), `window_hours`; a bad one is a 422 page saying which.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.core.csvsafe import csv_text
from popdrop.core.errors import PopdropError
from popdrop.metrics import funnels, kpis, rollups
from popdrop.metrics.kpis import Dimension
from popdrop.usecases import insights
from popdrop.web.context import AppContext
from popdrop.web.pagekit import Operator, PageRoute
from popdrop.web.params import Ctx, ItemId
from popdrop.web.streaming import csv_download
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False, route_class=PageRoute)
Of = Literal["events", "drops"]
_CSV = ("kpis", "funnel", *(f"by-{by}" for by in kpis.DIMENSIONS))


def _moment(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise PopdropError(
            "invalid_request",
            f"{name}: a date and time such as 2026-12-05T14:00",
            detail={"field": name},
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _window_hours(request: Request) -> int:
    raw = request.query_params.get("window_hours", "72").strip()
    if not raw.isdigit() or len(raw) > 6:
        raise PopdropError(
            "invalid_request",
            "window_hours: a whole number of hours",
            detail={"field": "window_hours"},
        )
    return int(raw)


def _steps(request: Request) -> list[str]:
    raw = request.query_params.get("steps", "").strip()
    if not raw:
        return list(funnels.DEFAULT_STEPS)
    return [k.value for k in funnels.parse_steps(raw[:400])]


async def _resolve(
    session: AsyncSession, principal: Principal, of: Of, item_id: int, request: Request
) -> insights.Resolved:
    return await insights.resolve(
        session,
        principal,
        event_id=item_id if of == "events" else None,
        drop_id=item_id if of == "drops" else None,
        since=_moment(request, "since"),
        until=_moment(request, "until"),
    )


def _query(request: Request) -> str:
    names = ("since", "until", "steps", "window_hours")
    kept = {k: v for k, v in request.query_params.items() if k in names and v}
    return "?" + urlencode(kept) if kept else ""


async def _page(
    request: Request, ctx: AppContext, principal: Principal, of: Of, item_id: int
) -> Response:
    await rollups.fold_pending(ctx.db)
    async with ctx.db.reader() as session:
        found = await _resolve(session, principal, of, item_id, request)
        view = await insights.overview(
            session, found, steps=_steps(request), window_hours=_window_hours(request)
        )
    base = f"/insights/{of}/{item_id}"
    subject = found.event.title if found.event else (found.drop.name if found.drop else "")
    context: dict[str, Any] = {
        "principal": principal,
        "view": view,
        "of": of,
        "item_id": item_id,
        "subject": subject,
        "event": found.event,
        "drop": found.drop,
        "base": base,
        "query": _query(request),
        "since": request.query_params.get("since", ""),
        "until": request.query_params.get("until", ""),
        "steps": ",".join(_steps(request)),
        "window_hours": view.funnel.window_hours,
        "ratio_labels": [label for _, label in insights.BREAKDOWN_RATIOS],
        "median": _duration(view.funnel.median_seconds_to_convert),
    }
    return render(request, "insights/overview.html", context)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes = round(seconds / 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


async def _csv(
    request: Request, ctx: AppContext, principal: Principal, of: Of, item_id: int, what: str
) -> Response:
    if what not in _CSV:
        raise PopdropError("not_found", "page not found")
    await rollups.fold_pending(ctx.db)
    steps, window = _steps(request), _window_hours(request)

    async def open_export(session: AsyncSession) -> Any:
        found = await _resolve(session, principal, of, item_id, request)
        scope = found.scope
        if what == "kpis":
            rows = list(insights.kpi_rows(await kpis.kpis(session, scope)))
        elif what == "funnel":
            result = await funnels.funnel(
                session,
                scope.org_id,
                steps,
                event_id=scope.event_id,
                drop_id=scope.drop_id,
                window_hours=window,
                since=scope.since,
                until=scope.until,
            )
            rows = list(insights.funnel_rows(result))
        else:
            by: Dimension = what.removeprefix("by-")  # type: ignore[assignment]
            found_rows = await kpis.breakdown(session, scope, by, tz=found.timezone)
            rows = list(insights.breakdown_rows(by, found_rows))

        async def chunks() -> Any:
            yield csv_text(rows)

        return chunks()

    return await csv_download(ctx, open_export, f"{of[:-1]}-{item_id}_{what}.csv")


@router.get("/insights/events/{event_id}")
async def event_insights(
    request: Request, event_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    return await _page(request, ctx, principal, "events", event_id)


@router.get("/insights/drops/{drop_id}")
async def drop_insights(
    request: Request, drop_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    return await _page(request, ctx, principal, "drops", drop_id)


@router.get("/insights/events/{event_id}/{what}.csv")
async def event_csv(
    request: Request, event_id: ItemId, what: str, principal: Operator, ctx: Ctx
) -> Response:
    return await _csv(request, ctx, principal, "events", event_id, what)


@router.get("/insights/drops/{drop_id}/{what}.csv")
async def drop_csv(
    request: Request, drop_id: ItemId, what: str, principal: Operator, ctx: Ctx
) -> Response:
    return await _csv(request, ctx, principal, "drops", drop_id, what)
