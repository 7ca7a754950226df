"""Property: whatever events several writers log at once, in parallel transactions (some
rolled back), while folds run at the same time, the rollups end up equal to a full
recomputation from the log: no event lost, none counted twice. On PostgreSQL the writers
and the folds really overlap; on SQLite their transactions take turns."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from popdrop.metrics import log, rollups
from popdrop.metrics.kinds import Kind
from popdrop.metrics.models import FunnelEvent, FunnelRollup
from popdrop.web.context import AppContext
from tests.conftest import make_tenant

START = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
DIMS: tuple[str, ...] = ("kind", "channel", "event_id", "drop_id", "variant", "segment")
DIMS += ("partner_id", "lane_id", "label", "currency")


class Rollback(Exception):
    """Raised inside a writer's transaction so that none of its events commit."""


events = st.fixed_dictionaries(
    {
        "kind": st.sampled_from([Kind.MESSAGE_SENT, Kind.VISIT, Kind.ORDER_PAID, Kind.RSVP]),
        "channel": st.sampled_from(["", "email", "sms"]),
        "event_id": st.sampled_from([None, 1, 2]),
        "variant": st.sampled_from(["", "A", "B"]),
        "lane_id": st.sampled_from([None, 7]),
        "label": st.sampled_from(["", "chat"]),
        # Within three hours, to the microsecond: minute and hour edges are crossed.
        "offset": st.integers(min_value=0, max_value=3 * 3600 * 10**6),
        "value": st.integers(min_value=0, max_value=10_000),
        "currency": st.sampled_from(["", "EUR"]),
    }
)
writers = st.lists(
    st.tuples(st.lists(events, min_size=1, max_size=12), st.booleans()),
    min_size=2,
    max_size=4,
)


async def write(ctx: AppContext, org_id: int, batch: list[dict[str, Any]], abort: bool) -> None:
    try:
        async with ctx.db.transaction() as session:
            for event in batch:
                await log.record(
                    session,
                    org_id,
                    event["kind"],
                    at=START + timedelta(microseconds=event["offset"]),
                    tags=log.Tags(
                        channel=event["channel"],
                        event_id=event["event_id"],
                        variant=event["variant"],
                        lane_id=event["lane_id"],
                        label=event["label"],
                    ),
                    person=log.contact_person(event["offset"] % 5),
                    value=event["value"],
                    currency=event["currency"],
                )
                await asyncio.sleep(0)  # let the others (and the folds) in between rows
            if abort:
                raise Rollback
    except Rollback:
        pass


async def fold_while(ctx: AppContext, writing: asyncio.Event) -> None:
    while not writing.is_set():
        await rollups.fold_pending(ctx.db)
        await asyncio.sleep(0)


def truncate(at: datetime, grain: int) -> datetime:
    at = at.replace(second=0, microsecond=0)
    return at.replace(minute=0) if grain == 60 else at


async def recomputed(ctx: AppContext, org_id: int) -> dict[tuple[Any, ...], tuple[int, int]]:
    """The rollups a full pass over the log gives, grouped in Python."""
    async with ctx.db.reader() as session:
        query = select(FunnelEvent).where(FunnelEvent.org_id == org_id)
        rows = (await session.execute(query)).all()
    totals: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0])
    for (event,) in rows:
        assert event.rolled
        dims = tuple(getattr(event, d) or (0 if d.endswith("_id") else "") for d in DIMS)
        for grain in (1, 60):
            total = totals[(grain, truncate(event.at, grain), *dims)]
            total[0] += 1
            total[1] += event.value
    return {key: (n, value) for key, (n, value) in totals.items()}


async def stored(ctx: AppContext, org_id: int) -> dict[tuple[Any, ...], tuple[int, int]]:
    async with ctx.db.reader() as session:
        rows = (
            await session.execute(select(FunnelRollup).where(FunnelRollup.org_id == org_id))
        ).all()
    return {(r.grain, r.bucket, *(getattr(r, d) for d in DIMS)): (r.n, r.value) for (r,) in rows}


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=writers)
async def test_concurrent_writes_and_folds_keep_rollups_exact(
    ctx: AppContext, batches: list[tuple[list[dict[str, Any]], bool]]
) -> None:
    tenant = await make_tenant(ctx)  # a fresh organization for each example
    writing = asyncio.Event()
    folder = asyncio.create_task(fold_while(ctx, writing))
    await asyncio.gather(*(write(ctx, tenant.org_id, batch, abort) for batch, abort in batches))
    writing.set()
    await folder
    await rollups.fold_pending(ctx.db)
    committed = [event for batch, abort in batches if not abort for event in batch]
    truth = await recomputed(ctx, tenant.org_id)
    # Nothing lost or doubled in the log itself (rolled-back writers left nothing) ...
    assert sum(n for key, (n, _) in truth.items() if key[0] == 1) == len(committed)
    # ... nor in the rollups.
    assert await stored(ctx, tenant.org_id) == truth
