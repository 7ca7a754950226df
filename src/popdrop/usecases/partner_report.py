"""The partner ROI report: what one partner of one event brought and cost, read from the
funnel rollups and the attribution ledger (docs/reports.md defines every figure).

Rules:
- Figures come from `funnel_rollups` (hour grain) rows tagged with the event and the
  partner, never from the raw log; codes and link clicks from the partner's promo codes,
  short links and `sale_touches`. The caller folds pending log rows first
  (`rollups.fold_pending`), so a sale committed before the request is in the report.
- No contact detail is read or shown: no person, email, phone or customer reference, not
  even the partner's own contact email.
- Small counts are suppressed so no person can be singled out: a count from 1 to K - 1
  shows as "< K" (0 is shown: it singles nobody out), and so does every figure derived
  from it (revenue, average basket, costs, ROI). Where parts add up to a shown total
  (online + POS sales, sales per hour, per code, per link), a single hidden part would be
  the total minus the others, so the smallest other non-zero part is hidden too.
- Money is never added across currencies: money figures are per currency.
- Who reads it: `roi:read`; a partner login only a partner row naming its login
  (`events.service.partners_of`), anyone else's report is `not_found` like a missing one;
  a signed link (`core.links.partner_report_url`) opens exactly one report until it
  expires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.attribution.models import BEARER_KINDS, PromoCode, SaleTouch, ShortLink, Via
from popdrop.core import links
from popdrop.core.csvsafe import csv_text
from popdrop.core.db import table_of
from popdrop.core.localtime import in_zone
from popdrop.core.money import Money
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned
from popdrop.events.models import Event, Partner
from popdrop.events.service import partners_of
from popdrop.metrics.kinds import Kind
from popdrop.metrics.models import FunnelRollup

SCOPE = "roi:read"
K = 5  # the smallest count shown as a number (besides 0); 1 to K - 1 shows as "< K"
SUPPRESSED = f"< {K}"  # a small count
# A figure hidden because it derives from a small count, or would reveal one.
HIDDEN = "hidden"
LINK_DAYS = 30  # a share link's default lifetime
MAX_LINK_DAYS = 365
MAX_GAP_FILLED_HOURS = 72  # a longer span charts only the hours with sales
HOUR = 60  # the rollup grain read (minutes)
CODE_SHOWN = 4  # characters of a printed code the report shows

_rollups = table_of(FunnelRollup)
_KINDS = (
    Kind.ORDER_PAID,
    Kind.POS_SALE,
    Kind.ORDER_REFUNDED,
    Kind.POS_REFUND,
    Kind.SAMPLE_GIVEN,
)
_SALE_KINDS = (Kind.ORDER_PAID.value, Kind.POS_SALE.value)

Unit = Literal["count", "money", "ratio"]


# ---------------------------------------------------------------- shapes


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class Figure(_Out):
    """One number of the report. `value` is a count, minor units of `currency`, or a ratio
    (ROI 1.5 = +150 %); None when it is suppressed or undefined (no denominator)."""

    key: str
    label: str
    unit: Unit
    currency: str | None = None
    value: int | float | None
    suppressed: bool = False
    display: str


class HourBar(_Out):
    hour: datetime  # the hour's start, UTC
    label: str  # on the event's clock, e.g. "Sat 14:00"
    sales: int | None  # None when suppressed
    suppressed: bool = False
    display: str


class CodeLine(_Out):
    label: str
    code_hint: str  # the first characters of the printed code
    uses: Figure


class LinkLine(_Out):
    label: str
    clicks: Figure


class PartnerReport(_Out):
    event_id: int
    event_title: str
    timezone: str
    partner_id: int
    partner_name: str
    generated_at: datetime
    threshold: int = Field(description="counts from 1 to threshold - 1 are suppressed")
    figures: list[Figure] = Field(description="counts, then money figures per currency")
    sales_by_hour: list[HourBar]
    codes: list[CodeLine]
    links: list[LinkLine]

    def figure(self, key: str, currency: str | None = None) -> Figure:
        return next(f for f in self.figures if f.key == key and f.currency == currency)

    @property
    def currencies(self) -> list[str]:
        return sorted({f.currency for f in self.figures if f.currency})


class ShareLink(_Out):
    url: str
    expires_at: datetime


class ShareLinkIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    days: int = Field(default=LINK_DAYS, ge=1, le=MAX_LINK_DAYS)


# ---------------------------------------------------------------- suppression


def hidden(count: int) -> bool:
    """A count that could single a person out: 1 to K - 1."""
    return 0 < count < K


def hidden_parts(parts: Sequence[int], total_shown: bool) -> list[bool]:
    """Which parts of a shown total are suppressed: the small ones and, when only one is,
    the smallest other non-zero part too (else it would be the total minus the rest)."""
    flags = [hidden(n) for n in parts]
    if total_shown and sum(flags) == 1:
        others = [i for i, n in enumerate(parts) if not flags[i] and n > 0]
        if others:
            flags[min(others, key=lambda i: (parts[i], i))] = True
    return flags


def _shown(n: int, suppressed: bool) -> str:
    if not suppressed:
        return f"{n:,}"
    return SUPPRESSED if hidden(n) else HIDDEN


def _count(key: str, label: str, n: int, *, hide: bool = False) -> Figure:
    suppressed = hide or hidden(n)
    return Figure(
        key=key,
        label=label,
        unit="count",
        value=None if suppressed else n,
        suppressed=suppressed,
        display=_shown(n, suppressed),
    )


def _money(key: str, label: str, currency: str, minor: int | None, hide: bool) -> Figure:
    if hide:
        display = HIDDEN
    elif minor is None:
        display = "—"
    else:
        display = Money(minor, currency).format()
    return Figure(
        key=key,
        label=label,
        unit="money",
        currency=currency,
        value=None if hide else minor,
        suppressed=hide,
        display=display,
    )


def _ratio(key: str, label: str, currency: str, ratio: float | None, hide: bool) -> Figure:
    if hide:
        display = HIDDEN
    elif ratio is None:
        display = "—"
    else:
        display = f"{ratio * 100:+,.1f} %"
    return Figure(
        key=key,
        label=label,
        unit="ratio",
        currency=currency,
        value=None if hide else ratio,
        suppressed=hide,
        display=display,
    )


def _divide(numerator: int, denominator: int) -> int:
    """Minor units, rounded half up (exact: no floats)."""
    return int((Decimal(numerator) / Decimal(denominator)).to_integral_value(ROUND_HALF_UP))


# ---------------------------------------------------------------- access


@dataclass(frozen=True, slots=True)
class Target:
    """The report one reader may open: an event and one of its partners."""

    org_id: int
    event: Event
    partner: Partner


async def target_for(
    session: AsyncSession, principal: Principal, event_id: int, partner_id: int
) -> Target:
    """The report a principal asked for, or `not_found` (also for another partner's)."""
    principal.require(SCOPE)
    event = await owned(session, Event, event_id, principal.org_id, what="report")
    where: tuple[Any, ...] = (Partner.event_id == event.id,)
    if principal.role == "partner":
        where = (*where, Partner.id.in_(partners_of(principal)))
    partner = await owned(
        session, Partner, partner_id, principal.org_id, what="report", where=where
    )
    return Target(principal.org_id, event, partner)


async def target_of_link(session: AsyncSession, link: links.PartnerReportLink) -> Target:
    """The report a valid link opens (`not_found` when its partner or event is gone)."""
    event = await owned(session, Event, link.event_id, link.org_id, what="report")
    partner = await owned(
        session, Partner, link.partner_id, link.org_id, what="report",
        where=(Partner.event_id == event.id,),
    )  # fmt: skip
    return Target(link.org_id, event, partner)


def share_link(
    signer: Signer, base_url: str, target: Target, *, now: datetime, days: int = LINK_DAYS
) -> ShareLink:
    """A signed link to the report, readable without a login for `days` days. The expiry
    is whole seconds (the token carries it so), so the answer says exactly when."""
    expires_at = (now + timedelta(days=days)).replace(microsecond=0)
    url = links.partner_report_url(
        signer,
        base_url,
        links.PartnerReportLink(target.org_id, target.event.id, target.partner.id, expires_at),
    )
    return ShareLink(url=url, expires_at=expires_at)


# ---------------------------------------------------------------- reads


@dataclass(frozen=True, slots=True)
class _Sums:
    n: int = 0
    value: int = 0


_NONE = _Sums()
Sums = dict[tuple[str, str], _Sums]  # per (kind, currency)


def _of(sums: Sums, kind: Kind, currency: str) -> _Sums:
    return sums.get((kind.value, currency), _NONE)


async def _rollup_sums(session: AsyncSession, target: Target) -> tuple[Sums, int]:
    """Per (kind, currency): the partner's counts and sums; and the event's visits."""
    r = _rollups.c
    base = (r.org_id == target.org_id, r.grain == HOUR, r.event_id == target.event.id)
    rows = await session.execute(
        select(r.kind, r.currency, func.sum(r.n), func.sum(r.value))
        .where(*base, r.partner_id == target.partner.id, r.kind.in_([k.value for k in _KINDS]))
        .group_by(r.kind, r.currency)
    )
    sums = {
        (kind, currency): _Sums(int(n or 0), int(value or 0)) for kind, currency, n, value in rows
    }
    visits = await session.scalar(select(func.sum(r.n)).where(*base, r.kind == Kind.VISIT.value))
    return sums, int(visits or 0)


async def _hourly_sales(session: AsyncSession, target: Target) -> list[tuple[datetime, int]]:
    r = _rollups.c
    rows = await session.execute(
        select(r.bucket, func.sum(r.n))
        .where(
            r.org_id == target.org_id,
            r.grain == HOUR,
            r.event_id == target.event.id,
            r.partner_id == target.partner.id,
            r.kind.in_(_SALE_KINDS),
        )
        .group_by(r.bucket)
        .order_by(r.bucket)
    )
    return [(bucket, int(n or 0)) for bucket, n in rows]


async def _code_uses(
    session: AsyncSession, target: Target
) -> tuple[list[PromoCode], dict[int, int], int]:
    """The partner's promo codes; per code, the sales it was used on; and the sales any
    of them was used on (a sale with two of its codes counts once there)."""
    codes = list(
        await session.scalars(
            select(PromoCode)
            .where(PromoCode.org_id == target.org_id, PromoCode.partner_id == target.partner.id)
            .order_by(PromoCode.id)
        )
    )
    where = (
        SaleTouch.org_id == target.org_id,
        SaleTouch.partner_id == target.partner.id,
        SaleTouch.via == Via.CODE.value,
        SaleTouch.promo_code_id.is_not(None),
    )
    pairs = (
        select(SaleTouch.promo_code_id, SaleTouch.sale_kind, SaleTouch.sale_id)
        .where(*where)
        .distinct()
        .subquery()
    )
    per_code = {
        int(code_id): int(n)
        for code_id, n in await session.execute(
            select(pairs.c.promo_code_id, func.count()).group_by(pairs.c.promo_code_id)
        )
    }
    sales = select(SaleTouch.sale_kind, SaleTouch.sale_id).where(*where).distinct().subquery()
    total = await session.scalar(select(func.count()).select_from(sales))
    return codes, per_code, int(total or 0)


async def _link_clicks(session: AsyncSession, target: Target) -> list[ShortLink]:
    return list(
        await session.scalars(
            select(ShortLink)
            .where(ShortLink.org_id == target.org_id, ShortLink.partner_id == target.partner.id)
            .order_by(ShortLink.id)
        )
    )


def _link_label(link: ShortLink) -> str:
    parts = [p for p in (link.channel, link.utm_campaign, link.utm_content) if p]
    if link.target_kind not in BEARER_KINDS:  # a bearer link's slug is a credential
        parts.append(f"/s/{link.slug}")
    return " · ".join(parts) or f"link {link.id}"


def _code_hint(promo: PromoCode) -> str:
    return f"{promo.code[:CODE_SHOWN]}…" if promo.code else "batch"


# ---------------------------------------------------------------- the report


def _hours(series: list[tuple[datetime, int]], sales_shown: bool, timezone: str) -> list[HourBar]:
    if not series:
        return []
    first, last = series[0][0], series[-1][0]
    by_hour = dict(series)
    if (last - first) <= timedelta(hours=MAX_GAP_FILLED_HOURS):
        span = int((last - first) / timedelta(hours=1))
        hours = [first + timedelta(hours=i) for i in range(span + 1)]
    else:
        hours = [hour for hour, _ in series]
    counts = [by_hour.get(hour, 0) for hour in hours]
    flags = hidden_parts(counts, sales_shown)
    return [
        HourBar(
            hour=hour,
            label=in_zone(hour, timezone).strftime("%a %H:%M"),
            sales=None if hide else n,
            suppressed=hide,
            display=_shown(n, hide),
        )
        for hour, n, hide in zip(hours, counts, flags, strict=True)
    ]


def _money_figures(sums: Sums, online_hidden: bool, pos_hidden: bool) -> list[Figure]:
    currencies = sorted({c for (_, c) in sums if c})
    out: list[Figure] = []
    for c in currencies:
        online, pos = _of(sums, Kind.ORDER_PAID, c), _of(sums, Kind.POS_SALE, c)
        refunds = [_of(sums, Kind.ORDER_REFUNDED, c), _of(sums, Kind.POS_REFUND, c)]
        samples = _of(sums, Kind.SAMPLE_GIVEN, c)
        sales_n, revenue = online.n + pos.n, online.value + pos.value
        refunds_n, refunded = sum(r.n for r in refunds), sum(r.value for r in refunds)
        revenue_hidden = hidden(sales_n)
        online_part, pos_part = hidden_parts([online.n, pos.n], not revenue_hidden)
        refunds_hidden = hidden(refunds_n)
        net_hidden = revenue_hidden or refunds_hidden
        costs_hidden = hidden(samples.n)
        net = revenue - refunded
        basket = _divide(revenue, sales_n) if sales_n else None
        roi = (net - samples.value) / samples.value if samples.value > 0 else None
        out += [
            _money("revenue", "Sales revenue", c, revenue, revenue_hidden),
            _money(
                "online_revenue", "Online orders", c, online.value,
                revenue_hidden or online_hidden or online_part,
            ),
            _money(
                "pos_revenue", "Till (POS) sales", c, pos.value,
                revenue_hidden or pos_hidden or pos_part,
            ),
            _money("refunded", "Refunded", c, refunded, refunds_hidden),
            _money("net_revenue", "Attributed revenue (after refunds)", c, net, net_hidden),
            _money("average_basket", "Average basket", c, basket, revenue_hidden),
            _money("sample_costs", "Sample costs", c, samples.value, costs_hidden),
            _ratio(
                "roi", "ROI", c, None if roi is None else round(roi, 4),
                net_hidden or costs_hidden,
            ),
        ]  # fmt: skip
    return out


async def build(session: AsyncSession, target: Target, *, now: datetime) -> PartnerReport:
    """The report of one partner of one event (fold the log first: see the module rules)."""
    sums, event_visits = await _rollup_sums(session, target)

    def n(kind: Kind) -> int:
        return sum(s.n for (k, _), s in sums.items() if k == kind.value)

    online_n, pos_n = n(Kind.ORDER_PAID), n(Kind.POS_SALE)
    sales_n = online_n + pos_n
    online_hidden, pos_hidden = hidden_parts([online_n, pos_n], not hidden(sales_n))
    codes, per_code, codes_used = await _code_uses(session, target)
    code_flags = hidden_parts([per_code.get(p.id, 0) for p in codes], not hidden(codes_used))
    link_rows = await _link_clicks(session, target)
    clicks_total = sum(link.clicks for link in link_rows)
    link_flags = hidden_parts([link.clicks for link in link_rows], not hidden(clicks_total))
    figures = [
        # The event's footfall: a check-in knows no code or link, so no visit is the
        # partner's own.
        _count("event_visits", "Visitors at the event (check-ins)", event_visits),
        _count("sales", "Sales", sales_n),
        _count("online_sales", "Online orders", online_n, hide=online_hidden),
        _count("pos_sales", "Till (POS) sales", pos_n, hide=pos_hidden),
        _count("refunds", "Refunds", n(Kind.ORDER_REFUNDED) + n(Kind.POS_REFUND)),
        _count("samples", "Samples given", n(Kind.SAMPLE_GIVEN)),
        _count("codes_used", "Sales with your codes", codes_used),
        _count("link_clicks", "Clicks on your links", clicks_total),
        *_money_figures(sums, online_hidden, pos_hidden),
    ]
    return PartnerReport(
        event_id=target.event.id,
        event_title=target.event.title,
        timezone=target.event.timezone,
        partner_id=target.partner.id,
        partner_name=target.partner.name,
        generated_at=now,
        threshold=K,
        figures=figures,
        sales_by_hour=_hours(
            await _hourly_sales(session, target), not hidden(sales_n), target.event.timezone
        ),
        codes=[
            CodeLine(
                label=promo.label,
                code_hint=_code_hint(promo),
                uses=_count("code_uses", promo.label, per_code.get(promo.id, 0), hide=flag),
            )
            for promo, flag in zip(codes, code_flags, strict=True)
        ],
        links=[
            LinkLine(
                label=_link_label(link),
                clicks=_count("link_clicks", _link_label(link), link.clicks, hide=flag),
            )
            for link, flag in zip(link_rows, link_flags, strict=True)
        ],
    )


# ---------------------------------------------------------------- CSV

CSV_HEADER = ("section", "key", "label", "currency", "value")


def csv_value(figure: Figure) -> str | int:
    """A figure as the CSV writes it: counts as integers, money in major units ("12.50",
    the currency in its own column), ROI as a ratio; suppressed as the report shows it
    ("< 5" or "hidden"), empty when undefined."""
    if figure.suppressed:
        return figure.display
    if figure.value is None:
        return ""
    if figure.unit == "money":
        assert figure.currency is not None and isinstance(figure.value, int)
        return Money(figure.value, figure.currency).format().split(" ")[0]
    if figure.unit == "ratio":
        return f"{figure.value:.4f}"
    return int(figure.value)


def csv_of(report: PartnerReport) -> str:
    rows: list[tuple[Any, ...]] = [CSV_HEADER]
    rows += [("figure", f.key, f.label, f.currency, csv_value(f)) for f in report.figures]
    rows += [
        ("sales_by_hour", bar.hour.isoformat(), bar.label, None, bar.display)
        for bar in report.sales_by_hour
    ]
    rows += [
        ("code", code.code_hint, code.label, None, csv_value(code.uses)) for code in report.codes
    ]
    rows += [("link", "clicks", link.label, None, csv_value(link.clicks)) for link in report.links]
    return csv_text(rows)
