"""Ordered-step funnels, time to convert and repeat purchases, on the raw log of one event
or one drop (the per-person view; the period view over rollups is `kpis`).

Rules (docs/metrics.md, "Funnels"):
- Portable SQL, as Umami does it: one CTE per step; step k keeps the persons of step k-1
  with an event of kind k that is later than their step k-1 (strictly) and no later than
  their first step plus the conversion window. A person's first step is their earliest
  event of that kind in the scope (and window `[since, until)` if given); each later step
  takes the earliest event that qualifies, which is the one that leaves most room for the
  steps after it. Events without a person never enter a funnel.
- Every step reads the same scope: the event's (or the drop's) tagged events.
- A breakdown groups persons by the channel / variant / segment of their first step.
- The query is bounded by one event's people; pages and the API call it for one scope
  at a time, never across an organization.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy import ColumnElement, Interval, and_, exists, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.core.db import table_of
from popdrop.core.errors import PopdropError
from popdrop.metrics.kinds import PURCHASE_KINDS, Kind
from popdrop.metrics.kpis import Ratio, ratio
from popdrop.metrics.models import FunnelEvent

funnel_events = table_of(FunnelEvent)

FunnelBreakdown = Literal["channel", "variant", "segment"]
BREAKDOWNS: tuple[FunnelBreakdown, ...] = ("channel", "variant", "segment")
MIN_STEPS, MAX_STEPS = 2, 8
MAX_WINDOW_HOURS = 24 * 90
MAX_REPEAT_DAYS = 365
CHAT_KINDS = frozenset({Kind.CHAT_STARTED, Kind.CARD_VIEWED})
DEFAULT_STEPS = (
    Kind.MESSAGE_SENT,
    Kind.MESSAGE_CLICKED,
    Kind.RSVP,
    Kind.VISIT,
    Kind.ORDER_PAID,
)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class FunnelStep(_Out):
    kind: str
    persons: int
    from_previous: Ratio  # persons / persons of the step before (step 1: of itself)
    from_first: Ratio  # persons / persons of step 1


class FunnelGroup(_Out):
    key: str  # the first step's channel / variant / segment ('' when it had none)
    steps: list[FunnelStep]


class Funnel(_Out):
    steps: list[FunnelStep]
    window_hours: int
    breakdown: str | None
    groups: list[FunnelGroup]
    # From the first step to the last, over the persons who reached the last.
    median_seconds_to_convert: float | None


class Repeat(_Out):
    days: int
    rate: Ratio  # buyers with a second purchase within `days` / buyers
    chat_repeats: Ratio  # of those second purchases, the ones a chat step preceded


def _refuse(field: str, message: str) -> PopdropError:
    return PopdropError("invalid_request", message, detail={"field": field})


def parse_steps(steps: Sequence[str] | str) -> list[Kind]:
    """Step names (a list, or one comma-separated string) → kinds, or a 422 saying why."""
    names = [s.strip() for s in steps.split(",")] if isinstance(steps, str) else list(steps)
    known = {k.value for k in Kind}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise _refuse("steps", f"unknown step {unknown[0][:32]!r}; steps are event kinds")
    if not MIN_STEPS <= len(names) <= MAX_STEPS:
        raise _refuse("steps", f"a funnel has {MIN_STEPS} to {MAX_STEPS} steps")
    return [Kind(name) for name in names]


def _check_window(window_hours: int) -> None:
    if not 1 <= window_hours <= MAX_WINDOW_HOURS:
        raise _refuse("window_hours", f"the window is 1 to {MAX_WINDOW_HOURS} hours")


def _scope(table: Any, org_id: int, event_id: int | None, drop_id: int | None) -> list[Any]:
    if (event_id is None) == (drop_id is None):
        raise _refuse("event_id", "name one event or one drop")
    where = [table.c.org_id == org_id]
    if event_id is not None:
        where.append(table.c.event_id == event_id)
    else:
        where.append(table.c.drop_id == drop_id)
    return where


def _plus(dialect: str, moment: Any, seconds: int) -> ColumnElement[Any]:
    """`moment + seconds` in SQL. SQLite stores `YYYY-MM-DD HH:MM:SS.ffffff` text:
    `datetime()` moves the whole seconds and the fraction is put back, so the result
    compares as text with the stored values, exactly."""
    if dialect == "postgresql":
        result: ColumnElement[Any] = moment + literal(timedelta(seconds=seconds), Interval())
        return result
    return func.datetime(moment, f"+{seconds} seconds").op("||")(func.substr(moment, 20))


def _steps_of(counts: Sequence[int], kinds: Sequence[Kind]) -> list[FunnelStep]:
    first = counts[0] if counts else 0
    return [
        FunnelStep(
            kind=kind.value,
            persons=n,
            from_previous=ratio(n, counts[i - 1] if i else n),
            from_first=ratio(n, first),
        )
        for i, (kind, n) in enumerate(zip(kinds, counts, strict=True))
    ]


async def funnel(
    session: AsyncSession,
    org_id: int,
    steps: Sequence[str],
    *,
    event_id: int | None = None,
    drop_id: int | None = None,
    window_hours: int = 72,
    breakdown: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Funnel:
    """How many persons reached each step, in order, within `window_hours` of their first."""
    kinds = parse_steps(steps)
    _check_window(window_hours)
    if breakdown is not None and breakdown not in BREAKDOWNS:
        raise _refuse("breakdown", f"breakdown is one of {', '.join(BREAKDOWNS)}")
    dialect = session.get_bind().dialect.name
    window = window_hours * 3600
    e = funnel_events
    where = _scope(e, org_id, event_id, drop_id)
    if since is not None:
        where.append(e.c.at >= since)
    if until is not None:
        where.append(e.c.at < until)
    key = e.c[breakdown] if breakdown else literal("")
    ranked = (
        select(
            e.c.person,
            e.c.at,
            key.label("key"),
            func.row_number().over(partition_by=e.c.person, order_by=(e.c.at, e.c.id)).label("rn"),
        )
        .where(*where, e.c.kind == kinds[0].value, e.c.person.is_not(None))
        .subquery("first_events")
    )
    first = (
        select(ranked.c.person, ranked.c.at.label("t0"), ranked.c.at, ranked.c.key)
        .where(ranked.c.rn == 1)
        .cte("step1")
    )
    ctes = [first]
    for number, kind in enumerate(kinds[1:], start=2):
        prev = ctes[-1]
        later = e.alias(f"e{number}")
        joined = prev.join(
            later,
            and_(
                *_scope(later, org_id, event_id, drop_id),
                later.c.person == prev.c.person,
                later.c.kind == kind.value,
                later.c.at > prev.c.at,
                later.c.at <= _plus(dialect, prev.c.t0, window),
            ),
        )
        ctes.append(
            select(prev.c.person, prev.c.t0, func.min(later.c.at).label("at"))
            .select_from(joined)
            .group_by(prev.c.person, prev.c.t0)
            .cte(f"step{number}")
        )
    source: Any = first
    for cte in ctes[1:]:
        source = source.outerjoin(cte, cte.c.person == first.c.person)
    rows = (
        await session.execute(
            select(first.c.key, first.c.t0, *(cte.c.at for cte in ctes[1:])).select_from(source)
        )
    ).all()
    total = [0] * len(kinds)
    by_key: dict[str, list[int]] = defaultdict(lambda: [0] * len(kinds))
    durations: list[float] = []
    for row in rows:
        group = by_key[str(row[0] or "")]
        for i, reached in enumerate(row[1:]):
            if reached is not None:
                total[i] += 1
                group[i] += 1
        if row[-1] is not None:
            durations.append((_aware(row[-1]) - _aware(row[1])).total_seconds())
    return Funnel(
        steps=_steps_of(total, kinds),
        window_hours=window_hours,
        breakdown=breakdown,
        groups=[
            FunnelGroup(key=k, steps=_steps_of(v, kinds))
            for k, v in sorted(by_key.items(), key=lambda kv: (-kv[1][0], kv[0]))
        ]
        if breakdown
        else [],
        median_seconds_to_convert=statistics.median(durations) if durations else None,
    )


def _aware(moment: datetime) -> datetime:
    # Stored times are UTC; a raw SQLite value (text, no zone) is read as such.
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def repeat_rate(
    session: AsyncSession,
    org_id: int,
    *,
    event_id: int | None = None,
    drop_id: int | None = None,
    days: int = 30,
) -> Repeat:
    """Of the persons whose first purchase (paid order or POS sale) of the scope is known,
    how many bought again anywhere in the organization within `days` after it; and of
    those second purchases, how many a chat step (chat started, card viewed) of the same
    person led to (after the first purchase, no later than the second)."""
    if not 1 <= days <= MAX_REPEAT_DAYS:
        raise _refuse("days", f"days is 1 to {MAX_REPEAT_DAYS}")
    dialect = session.get_bind().dialect.name
    e = funnel_events
    buys = [k.value for k in PURCHASE_KINDS]
    firsts = (
        select(e.c.person, func.min(e.c.at).label("first_at"))
        .where(*_scope(e, org_id, event_id, drop_id), e.c.kind.in_(buys), e.c.person.is_not(None))
        .group_by(e.c.person)
        .cte("firsts")
    )
    again = e.alias("again")
    seconds = (
        select(firsts.c.person, firsts.c.first_at, func.min(again.c.at).label("second_at"))
        .select_from(
            firsts.join(
                again,
                and_(
                    again.c.org_id == org_id,
                    again.c.person == firsts.c.person,
                    again.c.kind.in_(buys),
                    again.c.at > firsts.c.first_at,
                    again.c.at <= _plus(dialect, firsts.c.first_at, days * 86_400),
                ),
            )
        )
        .group_by(firsts.c.person, firsts.c.first_at)
        .cte("seconds")
    )
    chat = e.alias("chat")
    led_by_chat = exists(
        select(chat.c.id).where(
            chat.c.org_id == org_id,
            chat.c.person == seconds.c.person,
            chat.c.kind.in_([k.value for k in CHAT_KINDS]),
            chat.c.at > seconds.c.first_at,
            chat.c.at <= seconds.c.second_at,
        )
    )
    buyers = int(await session.scalar(select(func.count()).select_from(firsts)) or 0)
    rows = (await session.execute(select(seconds.c.person, led_by_chat))).all()
    repeats = len(rows)
    chats = sum(1 for row in rows if row[1])
    return Repeat(days=days, rate=ratio(repeats, buyers), chat_repeats=ratio(chats, repeats))
