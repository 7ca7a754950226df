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

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.core.errors import PopdropError
from popdrop.core.tenancy import owned
from popdrop.drops.models import Drop
from popdrop.events.models import Event, Partner
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


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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
    since, until = _utc(since), _utc(until)
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
