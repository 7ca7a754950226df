"""The KPIs: pure queries over `funnel_rollups` (never the raw log), so a dashboard's cost
grows with the number of buckets, not with the number of events.

Rules (docs/metrics.md has every formula, denominator and window):
- A `Scope` is an organization plus, optionally, one event, drop and/or partner and a
  time window `[since, until)`. A bucket belongs to the window when its start does; the
  hour rollups are read when both ends are whole hours (or absent), the minute rollups
  otherwise, so the window is exact to the minute.
- Every ratio is a `Ratio` (numerator, denominator, value); its value is None when the
  denominator is 0, never a division error and never a made-up 0.
- Money is never summed across currencies: each money figure is a list, one per currency.
- Counts are of events in the window (a period view), not of a cohort of people: the
  per-person view (who went on to do what within a window) is `funnels`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.core.db import table_of
from popdrop.core.errors import PopdropError
from popdrop.metrics.kinds import Kind
from popdrop.metrics.models import FunnelRollup

funnel_rollups = table_of(FunnelRollup)

# An RSVP came from chat when its writer says so: label "chat" (a chat flow, whatever its
# transport) or channel "chat" (the web chat widget).
CHAT = "chat"
NPS_CLASSES = ("promoter", "passive", "detractor")
Z_95 = 1.959964  # two-sided 95 % normal quantile
Dimension = Literal["hour", "channel", "segment", "variant", "lane"]
DIMENSIONS: tuple[Dimension, ...] = ("hour", "channel", "segment", "variant", "lane")
_COLUMN_OF = {"channel": "channel", "segment": "segment", "variant": "variant", "lane": "lane_id"}


@dataclass(frozen=True, slots=True)
class Scope:
    """What a KPI counts: one organization's rollups, narrowed by any of the tags and a
    time window `[since, until)` (UTC-aware)."""

    org_id: int
    event_id: int | None = None
    drop_id: int | None = None
    partner_id: int | None = None
    since: datetime | None = None
    until: datetime | None = None


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class Ratio(_Out):
    numerator: int
    denominator: int
    value: float | None  # numerator / denominator; None when the denominator is 0


class MoneyRatio(_Out):
    """A money figure per something (minor units of `currency` per unit)."""

    currency: str
    numerator: int  # minor units
    denominator: int
    value: float | None  # minor units per unit


class Revenue(_Out):
    currency: str
    paid: int  # order_paid values (minor units)
    pos: int  # pos_sale values
    refunded: int  # order_refunded + pos_refund values
    value: int  # paid + pos - refunded


class Nps(_Out):
    promoters: int
    passives: int
    detractors: int
    n: int
    score: float | None  # 100 * (promoters - detractors) / n, in [-100, 100]
    ci_low: float | None  # the 95 % confidence interval, clipped to [-100, 100]
    ci_high: float | None


class Kpis(_Out):
    counts: dict[str, int]
    message_click: Ratio
    chat_rsvp: Ratio
    click_rsvp: Ratio
    rsvp_visit: Ratio
    visit_purchase: Ratio
    sample_purchase: Ratio
    average_checkout: list[MoneyRatio]
    revenue: list[Revenue]
    cost_per_visit: list[MoneyRatio]
    nps: Nps


class BreakdownRow(_Out):
    """One value of a dimension (an hour 0-23, a channel, a segment, a variant, a lane id;
    '' when the events carried none) with its counts and conversions."""

    key: str
    counts: dict[str, int]
    message_click: Ratio
    chat_rsvp: Ratio
    click_rsvp: Ratio
    rsvp_visit: Ratio
    visit_purchase: Ratio


# ---------------------------------------------------------------- arithmetic


def ratio(numerator: int, denominator: int) -> Ratio:
    return Ratio(
        numerator=numerator,
        denominator=denominator,
        value=numerator / denominator if denominator else None,
    )


def money_ratio(currency: str, numerator: int, denominator: int) -> MoneyRatio:
    return MoneyRatio(
        currency=currency,
        numerator=numerator,
        denominator=denominator,
        value=numerator / denominator if denominator else None,
    )


def nps_of(promoters: int, passives: int, detractors: int) -> Nps:
    """NPS with its 95 % interval, the one way popdrop computes it (KPIs, the survey page).
    Each answer scores +1 (promoter), 0 or -1 (detractor); NPS is 100 * their mean. The
    interval is the adjusted Wald one (Rocks 2016): three pseudo-answers (0.75 promoter,
    0.75 detractor, 1.5 passive) are added, then centre +/- 1.96 * sqrt(p_P + p_D -
    (p_P - p_D)^2) / sqrt(n + 3), so a handful of answers gets a wide interval instead of
    the plain one's "+100 to +100" for one promoter. It is widened to hold the observed
    NPS when the shifted centre would leave it out, and clipped to [-100, 100]."""
    n = promoters + passives + detractors
    if n == 0:
        return Nps(
            promoters=0, passives=0, detractors=0, n=0, score=None, ci_low=None, ci_high=None
        )
    score = 100 * (promoters - detractors) / n
    n_adj = n + 3
    p_p, p_d = (promoters + 0.75) / n_adj, (detractors + 0.75) / n_adj
    centre = 100 * (p_p - p_d)
    margin = 100 * Z_95 * math.sqrt(max(0.0, p_p + p_d - (p_p - p_d) ** 2) / n_adj)
    return Nps(
        promoters=promoters,
        passives=passives,
        detractors=detractors,
        n=n,
        score=score,
        ci_low=max(-100.0, min(centre - margin, score)),
        ci_high=min(100.0, max(centre + margin, score)),
    )


# ---------------------------------------------------------------- reading the rollups


@dataclass(frozen=True, slots=True)
class _Cell:
    """One group of rollup rows: a breakdown key and the parts of the key KPIs need."""

    key: Any
    kind: str
    label: str
    channel: str
    currency: str
    n: int
    value: int


def _whole_hour(moment: datetime | None) -> bool:
    return moment is None or (moment.minute, moment.second, moment.microsecond) == (0, 0, 0)


def grain_for(scope: Scope) -> int:
    """Hour rollups when the window's ends are whole hours, minute rollups otherwise."""
    return 60 if _whole_hour(scope.since) and _whole_hour(scope.until) else 1


def _filters(scope: Scope, grain: int) -> list[ColumnElement[bool]]:
    c = funnel_rollups.c
    where = [c.org_id == scope.org_id, c.grain == grain]
    if scope.event_id is not None:
        where.append(c.event_id == scope.event_id)
    if scope.drop_id is not None:
        where.append(c.drop_id == scope.drop_id)
    if scope.partner_id is not None:
        where.append(c.partner_id == scope.partner_id)
    if scope.since is not None:
        where.append(c.bucket >= scope.since)
    if scope.until is not None:
        where.append(c.bucket < scope.until)
    return where


async def _cells(
    session: AsyncSession, scope: Scope, key: str | None, grain: int | None = None
) -> list[_Cell]:
    c = funnel_rollups.c
    grain = grain or grain_for(scope)
    keyed = [c[key]] if key is not None else []
    parts = [*keyed, c.kind, c.label, c.channel, c.currency]
    rows = await session.execute(
        select(*parts, func.sum(c.n), func.sum(c.value))
        .where(*_filters(scope, grain))
        .group_by(*parts)
    )
    cells = []
    for row in rows:
        k = row[0] if key is not None else None
        rest = row[1:] if key is not None else row
        cells.append(_Cell(k, rest[0], rest[1], rest[2], rest[3], int(rest[4]), int(rest[5])))
    return cells


def _is_chat_rsvp(cell: _Cell) -> bool:
    return cell.kind == Kind.RSVP and (cell.label == CHAT or cell.channel == CHAT)


@dataclass
class _Totals:
    counts: dict[str, int]
    chat_rsvps: int
    values: dict[tuple[str, str], int]  # (kind, currency) -> value sum
    ns: dict[tuple[str, str], int]  # (kind, currency) -> count
    nps: dict[str, int]  # NPS class -> answers

    def n(self, kind: Kind) -> int:
        return self.counts.get(kind.value, 0)


def _totals(cells: Iterable[_Cell]) -> _Totals:
    counts: dict[str, int] = defaultdict(int)
    values: dict[tuple[str, str], int] = defaultdict(int)
    ns: dict[tuple[str, str], int] = defaultdict(int)
    nps: dict[str, int] = defaultdict(int)
    chat = 0
    for cell in cells:
        counts[cell.kind] += cell.n
        values[(cell.kind, cell.currency)] += cell.value
        ns[(cell.kind, cell.currency)] += cell.n
        if _is_chat_rsvp(cell):
            chat += cell.n
        if cell.kind == Kind.SURVEY_ANSWERED and cell.label in NPS_CLASSES:
            nps[cell.label] += cell.n
    return _Totals(dict(counts), chat, dict(values), dict(ns), dict(nps))


def _conversions(t: _Totals) -> dict[str, Ratio]:
    purchases = t.n(Kind.ORDER_PAID) + t.n(Kind.POS_SALE)
    return {
        "message_click": ratio(t.n(Kind.MESSAGE_CLICKED), t.n(Kind.MESSAGE_SENT)),
        "chat_rsvp": ratio(t.chat_rsvps, t.n(Kind.CHAT_STARTED)),
        "click_rsvp": ratio(t.n(Kind.RSVP) - t.chat_rsvps, t.n(Kind.MESSAGE_CLICKED)),
        "rsvp_visit": ratio(t.n(Kind.VISIT), t.n(Kind.RSVP)),
        "visit_purchase": ratio(purchases, t.n(Kind.VISIT)),
    }


def _currencies(t: _Totals, kinds: Iterable[Kind]) -> list[str]:
    wanted = {k.value for k in kinds}
    return sorted({cur for (kind, cur) in t.ns if kind in wanted and cur})


def kpis_of(t: _Totals) -> Kpis:
    def value(kind: Kind, currency: str) -> int:
        return t.values.get((kind.value, currency), 0)

    purchases = t.n(Kind.ORDER_PAID) + t.n(Kind.POS_SALE)
    sales = (Kind.ORDER_PAID, Kind.POS_SALE, Kind.ORDER_REFUNDED, Kind.POS_REFUND)
    revenue = []
    for cur in _currencies(t, sales):
        paid, pos = value(Kind.ORDER_PAID, cur), value(Kind.POS_SALE, cur)
        refunded = value(Kind.ORDER_REFUNDED, cur) + value(Kind.POS_REFUND, cur)
        revenue.append(
            Revenue(
                currency=cur, paid=paid, pos=pos, refunded=refunded, value=paid + pos - refunded
            )
        )
    return Kpis(
        counts=dict(sorted(t.counts.items())),
        **_conversions(t),
        sample_purchase=ratio(purchases, t.n(Kind.SAMPLE_GIVEN)),
        average_checkout=[
            money_ratio(cur, value(Kind.ORDER_PAID, cur), t.ns[(Kind.ORDER_PAID.value, cur)])
            for cur in _currencies(t, (Kind.ORDER_PAID,))
        ],
        revenue=revenue,
        cost_per_visit=[
            money_ratio(cur, value(Kind.SAMPLE_GIVEN, cur), t.n(Kind.VISIT))
            for cur in _currencies(t, (Kind.SAMPLE_GIVEN,))
        ],
        nps=nps_of(t.nps.get("promoter", 0), t.nps.get("passive", 0), t.nps.get("detractor", 0)),
    )


async def kpis(session: AsyncSession, scope: Scope) -> Kpis:
    """Every KPI of the scope, from one grouped read of the rollups."""
    return kpis_of(_totals(await _cells(session, scope, None)))


async def counts(session: AsyncSession, scope: Scope) -> dict[str, int]:
    """How many events of each kind the scope holds."""
    return kpis_of(_totals(await _cells(session, scope, None))).counts


def zone(tz: str) -> ZoneInfo:
    """A time zone by IANA name, or a 422 naming it."""
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory, e.g. "Europe"
        raise PopdropError(
            "invalid_request", f"unknown time zone {tz[:64]!r}", detail={"field": "tz"}
        ) from None


def _local_hour(bucket: datetime, tzinfo: ZoneInfo) -> tuple[int, bool]:
    """The bucket's hour of day on the zone's clock, and whether the zone's offset is a
    whole number of hours then (if not, an hour bucket spans two local hours)."""
    local = bucket.astimezone(tzinfo)
    offset = local.utcoffset()
    return local.hour, offset is None or offset.total_seconds() % 3600 == 0


async def _hour_cells(session: AsyncSession, scope: Scope, tzinfo: ZoneInfo) -> list[_Cell]:
    grain = grain_for(scope)
    cells = await _cells(session, scope, "bucket", grain)
    hourly: list[_Cell] = []
    for cell in cells:
        bucket = cell.key if cell.key.tzinfo else cell.key.replace(tzinfo=UTC)
        hour, whole = _local_hour(bucket, tzinfo)
        if grain == 60 and not whole:
            # A half-hour zone (e.g. Asia/Kolkata): read the minute rollups instead.
            return await _minute_hours(session, scope, tzinfo)
        hourly.append(_with_key(cell, hour))
    return hourly


async def _minute_hours(session: AsyncSession, scope: Scope, tzinfo: ZoneInfo) -> list[_Cell]:
    cells = await _cells(session, scope, "bucket", 1)
    out = []
    for cell in cells:
        bucket = cell.key if cell.key.tzinfo else cell.key.replace(tzinfo=UTC)
        out.append(_with_key(cell, _local_hour(bucket, tzinfo)[0]))
    return out


def _with_key(cell: _Cell, key: Any) -> _Cell:
    return _Cell(key, cell.kind, cell.label, cell.channel, cell.currency, cell.n, cell.value)


def _rows(cells: Sequence[_Cell], keys: Iterable[Any]) -> list[BreakdownRow]:
    grouped: dict[Any, list[_Cell]] = defaultdict(list)
    for cell in cells:
        grouped[cell.key].append(cell)
    rows = []
    for key in keys:
        t = _totals(grouped.get(key, ()))
        rows.append(
            BreakdownRow(key=str(key), counts=dict(sorted(t.counts.items())), **_conversions(t))
        )
    return rows


async def breakdown(
    session: AsyncSession, scope: Scope, by: Dimension, *, tz: str = "UTC"
) -> list[BreakdownRow]:
    """The scope's counts and conversions by one dimension. By hour: the 24 hours of the
    day on the clock of `tz` (the event's zone), every hour listed even when empty; by
    lane: the lane id ('0' for events without a lane); else the tag ('' for none)."""
    if by == "hour":
        cells = await _hour_cells(session, scope, zone(tz))
        return _rows(cells, range(24))
    if by not in _COLUMN_OF:
        raise PopdropError(
            "invalid_request",
            f"breakdown must be one of {', '.join(DIMENSIONS)}",
            detail={"field": "by"},
        )
    cells = await _cells(session, scope, _COLUMN_OF[by])
    return _rows(cells, sorted({cell.key for cell in cells}, key=lambda k: (str(k) == "", k)))
