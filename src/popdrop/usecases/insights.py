"""KPIs and funnels for an operator: the scope a request names (this organization's event,
drop or partner, or 404), its figures, and the same figures as CSV rows.

Rules:
- Reading needs `metrics:read`; an id of another organization answers 404 like one that
  does not exist (`core.tenancy.owned`).
- Hours of day are on the clock of the event (a drop's event); without one, the zone the
  caller names, UTC by default.
- The CSV rows are the JSON figures, one row per figure: what a spreadsheet gets is what
  the page and the API show.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.core.errors import PopdropError
from popdrop.core.tenancy import owned
from popdrop.drops.models import Drop
from popdrop.events.models import Event, Lane, Partner
from popdrop.metrics import funnels, kpis
from popdrop.metrics.kpis import BreakdownRow, Dimension, Kpis, Ratio, Scope

READ_SCOPE = "metrics:read"
RATIOS = (
    ("message_click", "Message → Click"),
    ("chat_rsvp", "Chat → RSVP"),
    ("click_rsvp", "Click → RSVP"),
    ("rsvp_visit", "RSVP → Visit"),
    ("visit_purchase", "Visit → Purchase"),
    ("sample_purchase", "Sample → Purchase"),
)
BREAKDOWN_RATIOS = RATIOS[:5]


@dataclass(frozen=True)
class Resolved:
    scope: Scope
    timezone: str
    event: Event | None
    drop: Drop | None
    partner: Partner | None


def _utc(moment: datetime | None, field: str) -> datetime | None:
    if moment is None:
        return None
    try:
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except OverflowError:  # year 1 with a positive offset: before the calendar starts
        raise PopdropError(
            "invalid_request", f"{field}: outside the calendar", detail={"field": field}
        ) from None


async def resolve(
    session: AsyncSession,
    principal: Principal,
    *,
    event_id: int | None = None,
    drop_id: int | None = None,
    partner_id: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    tz: str | None = None,
) -> Resolved:
    """The scope asked for, every id checked to be this organization's."""
    principal.require(READ_SCOPE)
    org = principal.org_id
    event = await owned(session, Event, event_id, org) if event_id is not None else None
    drop = await owned(session, Drop, drop_id, org) if drop_id is not None else None
    partner = await owned(session, Partner, partner_id, org) if partner_id is not None else None
    since, until = _utc(since, "since"), _utc(until, "until")
    if since is not None and until is not None and since >= until:
        raise PopdropError(
            "invalid_request", "since must be before until", detail={"field": "since"}
        )
    zone_event = event
    if zone_event is None and drop is not None and drop.event_id is not None:
        zone_event = await session.get(Event, drop.event_id)
    timezone = zone_event.timezone if zone_event is not None else (tz or "UTC")
    kpis.zone(timezone)  # a 422 for a zone we cannot read, before any figure
    scope = Scope(org, event_id, drop_id, partner_id, since, until)
    return Resolved(scope, timezone, event, drop, partner)


# ---------------------------------------------------------------- CSV rows


def _ratio_row(name: str, found: Ratio, currency: str = "") -> list[Any]:
    return [name, currency, found.numerator, found.denominator, found.value]


KPI_HEADER = ["metric", "currency", "numerator", "denominator", "value"]


def kpi_rows(found: Kpis) -> Iterable[list[Any]]:
    yield KPI_HEADER
    for kind, n in found.counts.items():
        yield [f"count:{kind}", "", n, "", n]
    for name, _ in RATIOS:
        yield _ratio_row(name, getattr(found, name))
    for m in found.average_checkout:
        yield ["average_checkout", m.currency, m.numerator, m.denominator, m.value]
    for r in found.revenue:
        yield ["revenue", r.currency, r.paid + r.pos, r.refunded, r.value]
    for m in found.cost_per_visit:
        yield ["cost_per_visit", m.currency, m.numerator, m.denominator, m.value]
    nps = found.nps
    yield ["nps", "", nps.promoters - nps.detractors, nps.n, nps.score]
    yield ["nps_ci_low", "", "", nps.n, nps.ci_low]
    yield ["nps_ci_high", "", "", nps.n, nps.ci_high]


def breakdown_rows(by: Dimension, rows: list[BreakdownRow]) -> Iterable[list[Any]]:
    yield [by, "metric", "numerator", "denominator", "value"]
    for row in rows:
        for name, _ in BREAKDOWN_RATIOS:
            found: Ratio = getattr(row, name)
            yield [row.key, name, found.numerator, found.denominator, found.value]


def funnel_rows(found: funnels.Funnel) -> Iterable[list[Any]]:
    yield ["group", "step", "kind", "persons", "from_previous", "from_first"]
    groups = [("", found.steps), *((g.key or "(none)", g.steps) for g in found.groups)]
    for key, steps in groups:
        for i, step in enumerate(steps, start=1):
            yield [
                key,
                i,
                step.kind,
                step.persons,
                step.from_previous.value,
                step.from_first.value,
            ]


# ---------------------------------------------------------------- the insights page

PAGE_DIMENSIONS: tuple[Dimension, ...] = ("hour", "channel", "segment", "variant", "lane")
DIMENSION_TITLES = {
    "hour": "By hour of day",
    "channel": "By channel",
    "segment": "By segment",
    "variant": "By A/B variant",
    "lane": "By lane",
}
REPEAT_DAYS = 30


@dataclass(frozen=True)
class Tile:
    id: str
    label: str
    value: str
    detail: str  # numerator / denominator, or what the figure is made of


@dataclass(frozen=True)
class Cell:
    text: str  # "40 %" or "—"
    detail: str  # "2 / 5"
    pct: int  # bar width, 0-100


@dataclass(frozen=True)
class TableRow:
    key: str
    label: str
    cells: list[Cell]


@dataclass(frozen=True)
class Table:
    by: Dimension
    title: str
    rows: list[TableRow]


@dataclass(frozen=True)
class Bar:
    kind: str
    persons: int
    pct: int  # of step 1
    from_previous: str


@dataclass(frozen=True)
class Overview:
    resolved: Resolved
    tiles: list[Tile]
    funnel: funnels.Funnel
    bars: list[Bar]
    tables: list[Table]


def percent(found: Ratio) -> str:
    return "—" if found.value is None else f"{100 * found.value:.1f} %"


def _cell(found: Ratio) -> Cell:
    pct = 0 if found.value is None else max(0, min(100, round(100 * found.value)))
    return Cell(percent(found), f"{found.numerator} / {found.denominator}", pct)


def _money(minor: float | None, currency: str) -> str:
    return "—" if minor is None else f"{minor / 100:,.2f} {currency}"


def tiles_of(found: Kpis, repeat: funnels.Repeat | None) -> list[Tile]:
    tiles = [
        Tile(name, label, percent(r), f"{r.numerator} / {r.denominator}")
        for name, label in RATIOS
        for r in [getattr(found, name)]
    ]
    for m in found.average_checkout:
        tiles.append(
            Tile(
                f"average_checkout_{m.currency}",
                f"Average checkout ({m.currency})",
                _money(m.value, m.currency),
                f"{_money(m.numerator, m.currency)} / {m.denominator} orders",
            )
        )
    for r in found.revenue:
        tiles.append(
            Tile(
                f"revenue_{r.currency}",
                f"Revenue ({r.currency})",
                _money(r.value, r.currency),
                f"paid {_money(r.paid, r.currency)} + POS {_money(r.pos, r.currency)}"
                f" - refunds {_money(r.refunded, r.currency)}",
            )
        )
    for m in found.cost_per_visit:
        tiles.append(
            Tile(
                f"cost_per_visit_{m.currency}",
                f"Sample cost per visit ({m.currency})",
                _money(m.value, m.currency),
                f"{_money(m.numerator, m.currency)} / {m.denominator} visits",
            )
        )
    nps = found.nps
    if nps.score is None:
        tiles.append(Tile("nps", "NPS", "—", "no answers yet"))
    else:
        tiles.append(
            Tile(
                "nps",
                "NPS",
                f"{nps.score:+.0f}",
                f"n = {nps.n} · 95 % CI {nps.ci_low:+.0f} to {nps.ci_high:+.0f}",
            )
        )
    if repeat is not None:
        tiles.append(
            Tile(
                "repeat_rate",
                f"Repeat within {repeat.days} d",
                percent(repeat.rate),
                f"{repeat.rate.numerator} / {repeat.rate.denominator} buyers"
                f" · {repeat.chat_repeats.numerator} after a chat",
            )
        )
    return tiles


def _bars(found: funnels.Funnel) -> list[Bar]:
    return [
        Bar(
            step.kind,
            step.persons,
            0 if step.from_first.value is None else round(100 * step.from_first.value),
            percent(step.from_previous),
        )
        for step in found.steps
    ]


async def _lane_names(session: AsyncSession, org_id: int, ids: Iterable[str]) -> dict[str, str]:
    wanted = [int(i) for i in ids if i.isdigit() and i != "0"]
    if not wanted:
        return {}
    rows = await session.execute(
        select(Lane.id, Lane.name).where(Lane.org_id == org_id, Lane.id.in_(wanted))
    )
    return {str(lane_id): name for lane_id, name in rows}


def _label(by: Dimension, key: str, lanes: dict[str, str]) -> str:
    if by == "hour":
        return f"{int(key):02d}:00"
    if by == "lane":
        return lanes.get(key, "no lane" if key == "0" else f"lane {key}")
    return key or "(none)"


async def overview(
    session: AsyncSession,
    found: Resolved,
    *,
    steps: Sequence[str] = funnels.DEFAULT_STEPS,
    window_hours: int = 72,
) -> Overview:
    """Everything the insights page shows for one event or drop."""
    scope = found.scope
    figures = await kpis.kpis(session, scope)
    on = {"event_id": scope.event_id} if scope.event_id else {"drop_id": scope.drop_id}
    repeat = await funnels.repeat_rate(session, scope.org_id, days=REPEAT_DAYS, **on)
    funnel = await funnels.funnel(
        session,
        scope.org_id,
        steps,
        window_hours=window_hours,
        since=scope.since,
        until=scope.until,
        **on,
    )
    tables = []
    for by in PAGE_DIMENSIONS:
        rows = await kpis.breakdown(session, scope, by, tz=found.timezone)
        if by == "hour":
            rows = [r for r in rows if r.counts]
        lanes = (
            await _lane_names(session, scope.org_id, (r.key for r in rows)) if by == "lane" else {}
        )
        tables.append(
            Table(
                by,
                DIMENSION_TITLES[by],
                [
                    TableRow(
                        r.key,
                        _label(by, r.key, lanes),
                        [_cell(getattr(r, name)) for name, _ in BREAKDOWN_RATIOS],
                    )
                    for r in rows
                ],
            )
        )
    return Overview(found, tiles_of(figures, repeat), funnel, _bars(funnel), tables)
