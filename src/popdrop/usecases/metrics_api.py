"""The metrics API (`metrics:read`): KPIs, breakdowns, funnels and repeat purchases, as
JSON or CSV (`?format=csv` or `Accept: text/csv`; the same figures either way).

  GET /api/v1/metrics/kpis?event_id=&drop_id=&partner_id=&since=&until=
  GET /api/v1/metrics/breakdowns?by=hour|channel|segment|variant|lane&(the same scope)&tz=
  GET /api/v1/metrics/funnel?event_id=|drop_id=&steps=a,b,c&window_hours=&breakdown=
  GET /api/v1/metrics/repeat?event_id=|drop_id=&days=

Each call first folds what the log holds and the rollups do not yet (so an answer
includes what was just written), then reads. Another organization's event, drop or
partner is 404; a bad step, window, zone or breakdown is 422 with the field at fault.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.core.csvsafe import csv_text
from popdrop.core.schemas import error_responses
from popdrop.metrics import funnels, kpis, rollups
from popdrop.metrics.funnels import Funnel, FunnelBreakdown, Repeat
from popdrop.metrics.kpis import BreakdownRow, Dimension, Kpis
from popdrop.usecases import insights
from popdrop.web.auth import ApiPrincipal
from popdrop.web.context import AppContext
from popdrop.web.params import Ctx
from popdrop.web.streaming import csv_download

router = APIRouter(prefix="/api/v1/metrics", tags=["metrics"])
READ_ERRORS = error_responses(401, 403, 404, 422)
CSV_CONTENT: dict[int | str, dict[str, Any]] = {200: {"content": {"text/csv": {}}}}
OptionalId = Annotated[int | None, Query(ge=1, le=2**62)]
Format = Annotated[Literal["json", "csv"] | None, Query(description="csv: the same as CSV")]
Since = Annotated[datetime | None, Query(description="From this moment (UTC if no offset)")]
Until = Annotated[datetime | None, Query(description="Up to, not including, this moment")]
Zone = Annotated[
    str | None,
    Query(max_length=64, description="Hours of day on this zone's clock when no event names one"),
]


class ScopeOut(BaseModel):
    event_id: int | None
    drop_id: int | None
    partner_id: int | None
    since: datetime | None
    until: datetime | None
    timezone: str


class KpisOut(BaseModel):
    scope: ScopeOut
    kpis: Kpis


class BreakdownOut(BaseModel):
    scope: ScopeOut
    by: Dimension
    rows: list[BreakdownRow]


class FunnelOut(BaseModel):
    scope: ScopeOut
    funnel: Funnel


class RepeatOut(BaseModel):
    scope: ScopeOut
    repeat: Repeat


def _scope_out(found: insights.Resolved) -> ScopeOut:
    s = found.scope
    return ScopeOut(
        event_id=s.event_id,
        drop_id=s.drop_id,
        partner_id=s.partner_id,
        since=s.since,
        until=s.until,
        timezone=found.timezone,
    )


def _wants_csv(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "csv"
    return "text/csv" in request.headers.get("accept", "")


async def _answer(
    ctx: AppContext,
    request: Request,
    fmt: str | None,
    filename: str,
    compute: Callable[[AsyncSession], Awaitable[BaseModel]],
    rows: Callable[[Any], Iterable[list[Any]]],
) -> Any:
    """Fold, then answer JSON (the model) or CSV (its rows). The figures are computed
    before the response starts, so a refusal is a proper 4xx either way."""
    await rollups.fold_pending(ctx.db)
    if not _wants_csv(request, fmt):
        async with ctx.db.reader() as session:
            return await compute(session)

    async def open_export(session: AsyncSession) -> AsyncIterator[str]:
        found = await compute(session)

        async def chunks() -> AsyncIterator[str]:
            yield csv_text(rows(found))

        return chunks()

    return await csv_download(ctx, open_export, filename)


@router.get(
    "/kpis",
    response_model=KpisOut,
    responses={**READ_ERRORS, **CSV_CONTENT},
    summary="Every KPI of an event, drop, partner or the organization, in a time window",
)
async def get_kpis(
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    event_id: OptionalId = None,
    drop_id: OptionalId = None,
    partner_id: OptionalId = None,
    since: Since = None,
    until: Until = None,
    format: Format = None,
) -> Any:

    async def compute(session: AsyncSession) -> KpisOut:
        found = await insights.resolve(
            session,
            principal,
            event_id=event_id,
            drop_id=drop_id,
            partner_id=partner_id,
            since=since,
            until=until,
        )
        return KpisOut(scope=_scope_out(found), kpis=await kpis.kpis(session, found.scope))

    return await _answer(
        ctx,
        request,
        format,
        _file_name("kpis", event_id, drop_id, partner_id),
        compute,
        lambda out: insights.kpi_rows(out.kpis),
    )


def _file_name(prefix: str, event_id: int | None, drop_id: int | None, partner: int | None) -> str:
    parts = [prefix]
    for label, value in (("event", event_id), ("drop", drop_id), ("partner", partner)):
        if value is not None:
            parts.append(f"{label}-{value}")
    return "_".join(parts) + ".csv"


@router.get(
    "/breakdowns",
    response_model=BreakdownOut,
    responses={**READ_ERRORS, **CSV_CONTENT},
    summary="Counts and conversions by hour of day (event's zone), channel, segment, variant "
    "or lane",
)
async def get_breakdowns(
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    by: Dimension,
    event_id: OptionalId = None,
    drop_id: OptionalId = None,
    partner_id: OptionalId = None,
    since: Since = None,
    until: Until = None,
    tz: Zone = None,
    format: Format = None,
) -> Any:
    async def compute(session: AsyncSession) -> BreakdownOut:
        found = await insights.resolve(
            session,
            principal,
            event_id=event_id,
            drop_id=drop_id,
            partner_id=partner_id,
            since=since,
            until=until,
            tz=tz,
        )
        rows = await kpis.breakdown(session, found.scope, by, tz=found.timezone)
        return BreakdownOut(scope=_scope_out(found), by=by, rows=rows)

    return await _answer(
        ctx,
        request,
        format,
        _file_name(f"by-{by}", event_id, drop_id, partner_id),
        compute,
        lambda out: insights.breakdown_rows(out.by, out.rows),
    )


@router.get(
    "/funnel",
    response_model=FunnelOut,
    responses={**READ_ERRORS, **CSV_CONTENT},
    summary="An ordered funnel of one event or drop: persons per step within the window",
)
async def get_funnel(
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    event_id: OptionalId = None,
    drop_id: OptionalId = None,
    steps: Annotated[
        str,
        Query(max_length=400, description="Event kinds in order, comma-separated (2 to 8)"),
    ] = ",".join(funnels.DEFAULT_STEPS),
    window_hours: Annotated[
        int, Query(description="Each step within this many hours of the person's first")
    ] = 72,
    breakdown: FunnelBreakdown | None = None,
    since: Since = None,
    until: Until = None,
    format: Format = None,
) -> Any:
    async def compute(session: AsyncSession) -> FunnelOut:
        found = await insights.resolve(
            session, principal, event_id=event_id, drop_id=drop_id, since=since, until=until
        )
        result = await funnels.funnel(
            session,
            principal.org_id,
            funnels.parse_steps(steps),
            event_id=event_id,
            drop_id=drop_id,
            window_hours=window_hours,
            breakdown=breakdown,
            since=found.scope.since,
            until=found.scope.until,
        )
        return FunnelOut(scope=_scope_out(found), funnel=result)

    return await _answer(
        ctx,
        request,
        format,
        _file_name("funnel", event_id, drop_id, None),
        compute,
        lambda out: insights.funnel_rows(out.funnel),
    )


@router.get(
    "/repeat",
    response_model=RepeatOut,
    responses={**READ_ERRORS, **CSV_CONTENT},
    summary="Repeat rate of an event's or drop's buyers, and repeat purchases led by chat",
)
async def get_repeat(
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    event_id: OptionalId = None,
    drop_id: OptionalId = None,
    days: Annotated[int, Query(description="A second purchase within this many days")] = 30,
    format: Format = None,
) -> Any:
    async def compute(session: AsyncSession) -> RepeatOut:
        found = await insights.resolve(session, principal, event_id=event_id, drop_id=drop_id)
        result = await funnels.repeat_rate(
            session, principal.org_id, event_id=event_id, drop_id=drop_id, days=days
        )
        return RepeatOut(scope=_scope_out(found), repeat=result)

    def rows(out: RepeatOut) -> Iterable[list[Any]]:
        yield ["metric", "numerator", "denominator", "value"]
        for name in ("rate", "chat_repeats"):
            r = getattr(out.repeat, name)
            yield [name, r.numerator, r.denominator, r.value]

    return await _answer(
        ctx, request, format, _file_name("repeat", event_id, drop_id, None), compute, rows
    )
