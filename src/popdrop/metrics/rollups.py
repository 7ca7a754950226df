"""The rollups: per-minute and per-hour counts and sums of the funnel log, by kind and
every dimension, which dashboards and the API read instead of the raw log.

Rules:
- `fold` moves new log rows into the rollups: it flips `rolled` on a batch of rows and
  adds their counts in the same transaction, so a row is counted once or not yet, never
  twice and never lost (a row committed after the batch was taken is in the next one).
- Folds and rebuilds are serialized by a lock on `funnel_rollups` (SQLite serializes
  every writer anyway); writers of the log never wait for it.
- The Prometheus counter `popdrop_funnel_events_total{kind,channel}` grows by what a
  fold moved, once that fold commits (a rolled-back fold counts nothing).
- `rebuild` recomputes an organization's rollups from its log in one statement; what
  retention has deleted from the log is gone from the rebuilt rollups too.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, false, func, literal, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.core import metrics
from popdrop.core.db import Database, after_commit, dialect_insert, table_of
from popdrop.metrics.models import FunnelEvent, FunnelRollup

funnel_events = table_of(FunnelEvent)
funnel_rollups = table_of(FunnelRollup)

GRAINS = (1, 60)  # minutes
FOLD_BATCH = 5_000
_DIMENSIONS = (
    "kind",
    "channel",
    "event_id",
    "drop_id",
    "variant",
    "segment",
    "partner_id",
    "lane_id",
    "label",
    "currency",
)
_KEY = ("org_id", "grain", "bucket", *_DIMENSIONS)
# The queue's next batch, then those rows flipped: two statements, because PostgreSQL
# plans `UPDATE … WHERE id IN (subquery)` for one unfolded row and runs the subquery again
# for every row it updates (seconds for a batch); a list of ids is one index probe each.
_NEXT = (
    select(funnel_events.c.id)
    .where(funnel_events.c.rolled == false())
    .order_by(funnel_events.c.id)
    .limit(FOLD_BATCH)
)
_TAKE = (
    update(funnel_events)
    .where(
        funnel_events.c.id.in_(bindparam("ids", expanding=True)),
        funnel_events.c.rolled == false(),
    )
    .values(rolled=True)
    .returning(
        funnel_events.c.org_id,
        funnel_events.c.at,
        *(funnel_events.c[name] for name in _DIMENSIONS),
        funnel_events.c.value,
    )
)


def bucket_of(at: datetime, grain: int) -> datetime:
    if grain == 1:
        return at.replace(second=0, microsecond=0)
    return at.replace(minute=0, second=0, microsecond=0)


def _aggregate(rows: Iterable[Any]) -> list[dict[str, Any]]:
    totals: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        dims = tuple(
            (row[i + 2] or 0) if name.endswith("_id") else row[i + 2]
            for i, name in enumerate(_DIMENSIONS)
        )
        for grain in GRAINS:
            total = totals[(row[0], grain, bucket_of(row[1], grain), *dims)]
            total[0] += 1
            total[1] += int(row[-1])
    # Key order: two folds never lock the same rollup rows in opposite orders.
    return [
        {**dict(zip(_KEY, key, strict=True)), "n": n, "value": value}
        for key, (n, value) in sorted(totals.items(), key=lambda item: repr(item[0]))
    ]


async def _lock(session: AsyncSession) -> None:
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text("LOCK TABLE funnel_rollups IN SHARE ROW EXCLUSIVE MODE"))


async def _add(session: AsyncSession, totals: list[dict[str, Any]]) -> None:
    if not totals:
        return
    statement = dialect_insert(session.get_bind().dialect.name, funnel_rollups)
    statement = statement.on_conflict_do_update(
        index_elements=list(_KEY),
        set_={
            "n": funnel_rollups.c.n + statement.excluded.n,
            "value": funnel_rollups.c.value + statement.excluded.value,
        },
    )
    await session.execute(statement, totals)


async def fold(session: AsyncSession) -> int:
    """Fold one batch of new log rows into the rollups; returns how many were folded."""
    ids = list(await session.scalars(_NEXT))
    if not ids:
        return 0  # the usual answer to a reader's fold: one index probe, no lock
    await _lock(session)
    rows = (await session.execute(_TAKE, {"ids": ids})).all()
    await _add(session, _aggregate(rows))
    _count_after_commit(session, rows)
    return len(rows)


def _count_after_commit(session: AsyncSession, rows: Sequence[Any]) -> None:
    if not rows:
        return
    folded = Counter((row.kind, row.channel) for row in rows)

    async def count() -> None:
        for (kind, channel), n in folded.items():
            metrics.funnel_events(kind, channel, n)

    after_commit(session, count)


async def fold_pending(db: Database) -> int:
    """Fold until the log has no unfolded row left; one transaction per batch."""
    folded = 0
    while True:
        async with db.transaction() as session:
            batch = await fold(session)
        folded += batch
        if batch < FOLD_BATCH:
            return folded


def _bucket_sql(dialect: str, grain: int) -> Any:
    column = funnel_events.c.at
    if dialect == "postgresql":
        return func.date_trunc("minute" if grain == 1 else "hour", column, "UTC")
    return func.strftime(
        "%Y-%m-%d %H:%M:00.000000" if grain == 1 else "%Y-%m-%d %H:00:00.000000", column
    )


async def rebuild(db: Database, org_id: int) -> int:
    """Recompute an organization's rollups from its log; returns the events counted."""
    async with db.transaction() as session:
        dialect = session.get_bind().dialect.name
        await _lock(session)
        await session.execute(delete(funnel_rollups).where(funnel_rollups.c.org_id == org_id))
        await session.execute(
            update(funnel_events)
            .where(funnel_events.c.org_id == org_id, funnel_events.c.rolled == false())
            .values(rolled=True)
        )
        for grain in GRAINS:
            bucket = _bucket_sql(dialect, grain)
            dims = [
                func.coalesce(funnel_events.c[name], 0)
                if name.endswith("_id")
                else funnel_events.c[name]
                for name in _DIMENSIONS
            ]
            source = (
                select(
                    funnel_events.c.org_id,
                    literal(grain),
                    bucket,
                    *dims,
                    func.count(),
                    func.coalesce(func.sum(funnel_events.c.value), 0),
                )
                .where(funnel_events.c.org_id == org_id)
                .group_by(bucket, *dims, funnel_events.c.org_id)
            )
            await session.execute(
                funnel_rollups.insert().from_select([*_KEY, "n", "value"], source)
            )
        total = await session.scalar(
            select(func.count()).select_from(funnel_events).where(funnel_events.c.org_id == org_id)
        )
    return int(total or 0)
