"""The live war room of a drop or an event: per-minute figures read from the funnel
rollups, tiles with totals and rates, and the thresholds that turn a tile red.

Rules:
- Figures come from `funnel_rollups` (grain 1) only, never from the raw log or the send
  rows, so a war room over millions of events reads a few hundred rollup rows; the
  caller folds pending log rows first (`snapshot_of_drop` / `snapshot_of_event` do).
- The window is the last `WINDOW_MINUTES` minutes, or since the drop started when that is
  later (never fewer than `MIN_MINUTES`, so a chart has a width); totals are the window's.
- A tile turns red with a sentence saying why:
  - bounces: the auto-pause rule of `drops.outcomes` (its window, its minimum sample, the
    drop's own `bounce_threshold`), per drop and channel, so the tile is red exactly when
    those figures would pause the drop; a drop the auto-pause stopped keeps it red;
  - complaints above `COMPLAINT_RATE_LIMIT` of the messages sent;
  - payment failures above `PAYMENT_FAILURE_RATE_LIMIT` of the online payment attempts
    (paid orders + failures; a till sale is not an attempt that can fail here), once there
    are `PAYMENT_FAILURE_MIN_ATTEMPTS`;
  - stock: a product with at most `STOCK_LOW_SHARE` of its units or `STOCK_LOW_UNITS`
    left (read through the inventory service: total - sold - live holds).
- Needs `metrics:read`; another organization's drop or event is a 404.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.core.db import Database
from popdrop.core.money import Money
from popdrop.core.tenancy import owned
from popdrop.drops import outcomes
from popdrop.drops.lifecycle import DropStatus, operator_actions
from popdrop.drops.models import Drop
from popdrop.drops.schemas import DropCreate
from popdrop.events.models import Event
from popdrop.inventory import service as inventory
from popdrop.metrics import rollups
from popdrop.metrics.kinds import Kind
from popdrop.metrics.models import FunnelRollup

WINDOW_MINUTES = 120
MIN_MINUTES = 10
COMPLAINT_RATE_LIMIT = 0.003
PAYMENT_FAILURE_RATE_LIMIT = 0.20
PAYMENT_FAILURE_MIN_ATTEMPTS = 5
STOCK_LOW_SHARE = 0.10
STOCK_LOW_UNITS = 3
SOFT_BOUNCE = "soft"  # a bounce's label: temporary, auto-pause does not count it
AUTO_PAUSED = "auto-paused"  # how `drops.outcomes.auto_pause` opens its reason
# Messages of no drop (receipts, surveys) are judged by a new drop's default threshold.
DEFAULT_BOUNCE_THRESHOLD: float = DropCreate.model_fields["bounce_threshold"].default

# Each series: the log kinds it adds up.
SERIES_KINDS: dict[str, tuple[Kind, ...]] = {
    "sent": (Kind.MESSAGE_SENT,),
    "delivered": (Kind.MESSAGE_DELIVERED,),
    "bounced": (Kind.MESSAGE_BOUNCED,),
    "complaints": (Kind.MESSAGE_COMPLAINED,),
    "clicks": (Kind.MESSAGE_CLICKED,),
    "rsvps": (Kind.RSVP,),
    "checkins": (Kind.VISIT,),
    "payments": (Kind.ORDER_PAID, Kind.POS_SALE),
    "payment_failures": (Kind.PAYMENT_FAILED,),
}
_SERIES_OF: dict[str, str] = {
    kind.value: name for name, kinds in SERIES_KINDS.items() for kind in kinds
}


@dataclass(frozen=True)
class SeriesSpec:
    key: str
    label: str
    color: str


@dataclass(frozen=True)
class Group:
    key: str
    title: str
    series: tuple[SeriesSpec, ...]


# One chart per group.
GROUPS: tuple[Group, ...] = (
    Group(
        "messages",
        "Messages",
        (
            SeriesSpec("sent", "Sent", "#5b3df5"),
            SeriesSpec("delivered", "Delivered", "#176c3a"),
            SeriesSpec("bounced", "Bounced", "#b42318"),
            SeriesSpec("complaints", "Complaints", "#8a5a00"),
        ),
    ),
    Group(
        "conversions",
        "Conversions",
        (
            SeriesSpec("clicks", "Clicks", "#d97706"),
            SeriesSpec("rsvps", "RSVPs", "#2f6fd6"),
            SeriesSpec("checkins", "Check-ins", "#176c3a"),
        ),
    ),
    Group(
        "payments",
        "Payments",
        (
            SeriesSpec("payments", "Payments", "#176c3a"),
            SeriesSpec("payment_failures", "Failures", "#b42318"),
        ),
    ),
)


@dataclass
class Tile:
    key: str
    label: str
    value: int
    display: str
    detail: str = ""
    alert: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class DropState:
    id: int
    name: str
    status: str
    paused_reason: str | None
    auto_paused: bool
    actions: tuple[str, ...]  # "pause" / "resume": what the action table allows now


@dataclass(frozen=True)
class ProductStock:
    product_id: int
    title: str
    total: int
    left: int
    low: bool


@dataclass
class Snapshot:
    """Everything the war room shows, as plain data (the page and the stream's JSON)."""

    scope: str  # "drop" or "event"
    id: int
    title: str
    zone: str
    generated_at: datetime
    since_start: bool  # the window starts at the drop's start (else the last 2 h)
    minutes: list[datetime]
    series: dict[str, list[int]]
    totals: dict[str, int]
    revenue: dict[str, int]  # currency -> minor units paid in the window
    tiles: list[Tile]
    drops: list[DropState]
    stock: list[ProductStock] = field(default_factory=list)

    @property
    def alerts(self) -> list[str]:
        return [t.reason for t in self.tiles if t.alert and t.reason]

    @property
    def paused(self) -> list[DropState]:
        return [d for d in self.drops if d.status == DropStatus.PAUSED]

    def tile(self, key: str) -> Tile:
        return next(t for t in self.tiles if t.key == key)

    def as_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "id": self.id,
            "title": self.title,
            "zone": self.zone,
            "generated_at": self.generated_at.isoformat(),
            "since_start": self.since_start,
            "minutes": [int(m.timestamp()) for m in self.minutes],
            "series": self.series,
            "totals": self.totals,
            "revenue": self.revenue,
            "groups": [
                {"key": g.key, "title": g.title, "series": [asdict(s) for s in g.series]}
                for g in GROUPS
            ],
            "tiles": [asdict(t) for t in self.tiles],
            "alerts": self.alerts,
            "drops": [asdict(d) for d in self.drops],
            "stock": [asdict(s) for s in self.stock],
        }


# ---------------------------------------------------------------- entry points


async def snapshot_of_drop(
    db: Database, principal: Principal, drop_id: int, *, now: datetime
) -> Snapshot:
    """Fold what the log gained, then read the drop's war room."""
    await rollups.fold_pending(db)
    async with db.reader() as session:
        return await drop_war_room(session, principal, drop_id, now=now)


async def snapshot_of_event(
    db: Database, principal: Principal, event_id: int, *, now: datetime
) -> Snapshot:
    """Fold what the log gained, then read the event's war room."""
    await rollups.fold_pending(db)
    async with db.reader() as session:
        return await event_war_room(session, principal, event_id, now=now)


async def drop_war_room(
    session: AsyncSession, principal: Principal, drop_id: int, *, now: datetime
) -> Snapshot:
    principal.require("metrics:read")
    drop = await owned(session, Drop, drop_id, principal.org_id, fresh=True)
    event = (
        await session.scalar(
            select(Event).where(Event.id == drop.event_id, Event.org_id == principal.org_id)
        )
        if drop.event_id is not None
        else None
    )
    first, last, since_start = _window(now, drop.started_at)
    rows = await _rollup_rows(session, principal.org_id, FunnelRollup.drop_id == drop.id, first)
    stock = await _stock(session, principal, event.id, now) if event is not None else []
    return _snapshot(
        "drop",
        drop.id,
        drop.name,
        event.timezone if event is not None else "UTC",
        now=now,
        first=first,
        last=last,
        since_start=since_start,
        rows=rows,
        drops=[drop],
        stock=stock,
    )


async def event_war_room(
    session: AsyncSession, principal: Principal, event_id: int, *, now: datetime
) -> Snapshot:
    principal.require("metrics:read")
    event = await owned(session, Event, event_id, principal.org_id)
    first, last, since_start = _window(now, None)
    rows = await _rollup_rows(session, principal.org_id, FunnelRollup.event_id == event.id, first)
    drops = list(
        (
            await session.scalars(
                select(Drop)
                .where(Drop.org_id == principal.org_id, Drop.event_id == event.id)
                .order_by(Drop.id.desc())
                .execution_options(populate_existing=True)
            )
        ).all()
    )
    # A message of this event may come from a drop tied to another event since; its
    # threshold still applies to its bounces.
    known = {d.id for d in drops}
    others = {r.drop_id for r in rows if r.drop_id and r.drop_id not in known}
    extra = (
        list(
            (
                await session.scalars(
                    select(Drop).where(Drop.org_id == principal.org_id, Drop.id.in_(others))
                )
            ).all()
        )
        if others
        else []
    )
    return _snapshot(
        "event",
        event.id,
        event.title,
        event.timezone,
        now=now,
        first=first,
        last=last,
        since_start=since_start,
        rows=rows,
        drops=drops,
        thresholds={d.id: d.bounce_threshold for d in [*drops, *extra]},
        stock=await _stock(session, principal, event.id, now),
    )


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Row:
    bucket: datetime
    kind: str
    channel: str
    drop_id: int
    label: str
    currency: str
    n: int
    value: int


def _minute(at: datetime) -> datetime:
    return rollups.bucket_of(at.astimezone(UTC), 1)


def _window(now: datetime, started_at: datetime | None) -> tuple[datetime, datetime, bool]:
    """(first minute, last minute, whether the window starts at the drop's start)."""
    last = _minute(now)
    first = last - timedelta(minutes=WINDOW_MINUTES - 1)
    since_start = False
    if started_at is not None and _minute(started_at) > first:
        first, since_start = _minute(started_at), True
    first = min(first, last - timedelta(minutes=MIN_MINUTES - 1))
    return first, last, since_start


async def _rollup_rows(
    session: AsyncSession, org_id: int, scope: Any, first: datetime
) -> list[_Row]:
    r = FunnelRollup
    query = (
        select(
            r.bucket,
            r.kind,
            r.channel,
            r.drop_id,
            r.label,
            r.currency,
            func.sum(r.n),
            func.sum(r.value),
        )
        .where(
            r.org_id == org_id,
            scope,
            r.grain == 1,
            r.bucket >= first,
            r.kind.in_(list(_SERIES_OF)),
        )
        .group_by(r.bucket, r.kind, r.channel, r.drop_id, r.label, r.currency)
    )
    return [
        _Row(_minute(b), str(k), str(ch), int(d), str(lb), str(cur), int(n), int(v))
        for b, k, ch, d, lb, cur, n, v in await session.execute(query)
    ]


async def _stock(
    session: AsyncSession, principal: Principal, event_id: int, now: datetime
) -> list[ProductStock]:
    products = await inventory.list_products(session, principal, event_id)
    rows = await inventory.availability(session, event_id, now, org_id=principal.org_id)
    product_of = {v.id: p.id for p in products for v in p.variants}
    total: dict[int, int] = defaultdict(int)
    left: dict[int, int] = defaultdict(int)
    for row in rows:
        product_id = product_of.get(row.variant_id)
        if product_id is not None:
            total[product_id] += row.total
            left[product_id] += row.available
    return [
        ProductStock(
            p.id, p.title, total[p.id], left[p.id], nearly_sold_out(left[p.id], total[p.id])
        )
        for p in products
        if total[p.id] > 0
    ]


def nearly_sold_out(left: int, total: int) -> bool:
    return total > 0 and (left <= STOCK_LOW_UNITS or left <= STOCK_LOW_SHARE * total)


# ---------------------------------------------------------------- the snapshot


def _snapshot(
    scope: str,
    scope_id: int,
    title: str,
    zone: str,
    *,
    now: datetime,
    first: datetime,
    last: datetime,
    since_start: bool,
    rows: list[_Row],
    drops: list[Drop],
    stock: list[ProductStock],
    thresholds: dict[int, float] | None = None,
) -> Snapshot:
    span = int((last - first).total_seconds() // 60) + 1
    minutes = [first + timedelta(minutes=i) for i in range(span)]
    series = {name: [0] * span for name in SERIES_KINDS}
    revenue: dict[str, int] = defaultdict(int)
    paid_online = soft = 0
    for row in rows:
        index = int((row.bucket - first).total_seconds() // 60)
        if not 0 <= index < span:
            continue  # a bucket after `now` (a clock behind a writer's): not shown yet
        name = _SERIES_OF[row.kind]
        series[name][index] += row.n
        if name == "payments" and row.currency:
            revenue[row.currency] += row.value
        if row.kind == Kind.ORDER_PAID:
            paid_online += row.n
        elif row.kind == Kind.MESSAGE_BOUNCED and row.label == SOFT_BOUNCE:
            soft += row.n
    totals = {name: sum(values) for name, values in series.items()}
    limits = thresholds if thresholds is not None else {d.id: d.bounce_threshold for d in drops}
    bounce_reason = _bounce_verdict(rows, limits, now) or _auto_paused_reason(drops)
    tiles = _tiles(totals, paid_online, soft, dict(revenue), since_start, bounce_reason, stock)
    return Snapshot(
        scope=scope,
        id=scope_id,
        title=title,
        zone=zone,
        generated_at=now,
        since_start=since_start,
        minutes=minutes,
        series=series,
        totals=totals,
        revenue=dict(sorted(revenue.items())),
        tiles=tiles,
        drops=[_drop_state(d) for d in drops],
        stock=stock,
    )


def _drop_state(drop: Drop) -> DropState:
    offered = operator_actions(DropStatus(drop.status))
    return DropState(
        id=drop.id,
        name=drop.name,
        status=drop.status,
        paused_reason=drop.paused_reason,
        auto_paused=_is_auto_paused(drop),
        actions=tuple(a for a in ("pause", "resume") if a in offered),
    )


def _is_auto_paused(drop: Drop) -> bool:
    return drop.status == DropStatus.PAUSED and (drop.paused_reason or "").startswith(AUTO_PAUSED)


def _auto_paused_reason(drops: list[Drop]) -> str | None:
    for drop in drops:
        if _is_auto_paused(drop) and "bounce" in (drop.paused_reason or ""):
            return f"{drop.name}: {drop.paused_reason}"
    return None


def _bounce_verdict(rows: list[_Row], thresholds: dict[int, float], now: datetime) -> str | None:
    """The auto-pause rule on the rollups: per drop and channel over the auto-pause window,
    at least its minimum sample, a rate of the bounces it counts (not soft ones) above the
    drop's threshold."""
    # Read at call time: the auto-pause's own numbers, whatever they are set to.
    window, min_sent = outcomes.AUTO_PAUSE_WINDOW, outcomes.AUTO_PAUSE_MIN_SENT
    since = _minute(now - window)
    sent: dict[tuple[int, str], int] = defaultdict(int)
    bounced: dict[tuple[int, str], int] = defaultdict(int)
    for row in rows:
        if row.bucket < since:
            continue
        if row.kind == Kind.MESSAGE_SENT:
            sent[(row.drop_id, row.channel)] += row.n
        elif row.kind == Kind.MESSAGE_BOUNCED and row.label != SOFT_BOUNCE:
            bounced[(row.drop_id, row.channel)] += row.n
    minutes = int(window.total_seconds() // 60)
    for key in sorted(sent):
        count, out = bounced.get(key, 0), sent[key]
        threshold = thresholds.get(key[0], DEFAULT_BOUNCE_THRESHOLD)
        if out >= min_sent and count / out > threshold:
            what = "bounce" if key[1] in ("email", "") else f"{key[1]} bounce"
            return (
                f"{what} rate {count / out:.1%} over the last {minutes} minutes "
                f"({count} of {out}) is above the auto-pause threshold {threshold:.1%}"
            )
    return None


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole > 0 else None


def _percent(rate: float | None) -> str:
    return "—" if rate is None else f"{rate * 100:.1f} %"


def _tiles(
    totals: dict[str, int],
    paid_online: int,
    soft: int,
    revenue: dict[str, int],
    since_start: bool,
    bounce_reason: str | None,
    stock: list[ProductStock],
) -> list[Tile]:
    window = "since the start" if since_start else f"last {WINDOW_MINUTES // 60} h"
    sent = totals["sent"]
    complaint_rate = _rate(totals["complaints"], sent)
    attempts = totals["payment_failures"] + paid_online
    failure_rate = _rate(totals["payment_failures"], attempts)
    complaint_alert = complaint_rate is not None and complaint_rate > COMPLAINT_RATE_LIMIT
    failure_alert = (
        failure_rate is not None
        and attempts >= PAYMENT_FAILURE_MIN_ATTEMPTS
        and failure_rate > PAYMENT_FAILURE_RATE_LIMIT
    )
    amounts = ", ".join(Money(v, c).format() for c, v in sorted(revenue.items()))

    def count(key: str, label: str, detail: str = "", **kw: Any) -> Tile:
        return Tile(key, label, totals[key], f"{totals[key]:,}", detail, **kw)

    tiles = [
        count("sent", "Sent", window),
        count("delivered", "Delivered", f"{_percent(_rate(totals['delivered'], sent))} of sent"),
        count(
            "bounced",
            "Bounced",
            f"{_percent(_rate(totals['bounced'], sent))} of sent"
            + (f" ({soft} soft)" if soft else ""),
            alert=bounce_reason is not None,
            reason=bounce_reason,
        ),
        count(
            "complaints",
            "Complaints",
            f"{_percent(complaint_rate)} of sent",
            alert=complaint_alert,
            reason=(
                f"complaint rate {_percent(complaint_rate)} ({totals['complaints']} of {sent}) "
                f"is above {COMPLAINT_RATE_LIMIT:.1%}"
                if complaint_alert
                else None
            ),
        ),
        count("clicks", "Clicks", f"{_percent(_rate(totals['clicks'], sent))} of sent"),
        count("rsvps", "RSVPs", window),
        count("checkins", "Check-ins", window),
        count("payments", "Payments", amounts or window),
        count(
            "payment_failures",
            "Payment failures",
            f"{_percent(failure_rate)} of {attempts} attempts",
            alert=failure_alert,
            reason=(
                f"payment failure rate {_percent(failure_rate)} "
                f"({totals['payment_failures']} of {attempts} attempts) "
                f"is above {PAYMENT_FAILURE_RATE_LIMIT:.0%}"
                if failure_alert
                else None
            ),
        ),
    ]
    if stock:
        low = [s for s in stock if s.low]
        left = sum(s.left for s in stock)
        tiles.append(
            Tile(
                "stock",
                "Stock left",
                left,
                f"{left:,}",
                f"{len(stock)} product{'s' if len(stock) != 1 else ''}",
                alert=bool(low),
                reason=(
                    "nearly sold out: "
                    + "; ".join(f"{s.title} ({s.left} of {s.total} left)" for s in low)
                    if low
                    else None
                ),
            )
        )
    return tiles
