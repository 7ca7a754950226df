"""The fold counts every logged event once, and a rebuild from the log gives the same
rollups, on both databases."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from popdrop.metrics import log, rollups
from popdrop.metrics.kinds import Kind
from popdrop.metrics.models import FunnelRollup
from popdrop.web.context import AppContext
from tests.conftest import Tenant


async def _rollup_rows(ctx: AppContext, org_id: int) -> list[tuple[object, ...]]:
    async with ctx.db.reader() as session:
        rows = await session.execute(
            select(
                FunnelRollup.grain,
                FunnelRollup.bucket,
                FunnelRollup.kind,
                FunnelRollup.channel,
                FunnelRollup.event_id,
                FunnelRollup.label,
                FunnelRollup.n,
                FunnelRollup.value,
            )
            .where(FunnelRollup.org_id == org_id)
            .order_by(
                FunnelRollup.grain,
                FunnelRollup.bucket,
                FunnelRollup.kind,
                FunnelRollup.channel,
                FunnelRollup.label,
            )
        )
        return [tuple(row) for row in rows]


async def test_fold_then_rebuild_give_the_same_rollups(ctx: AppContext, tenant: Tenant) -> None:
    start = ctx.clock.now().replace(minute=10, second=5, microsecond=0)
    async with ctx.db.transaction() as session:
        for i in range(30):
            await log.record(
                session,
                tenant.org_id,
                Kind.ORDER_PAID if i % 3 else Kind.VISIT,
                at=start + timedelta(seconds=37 * i),
                tags=log.Tags(channel="email" if i % 2 else "sms", event_id=7),
                person=log.contact_person(i % 5),
                value=100 * i if i % 3 else 0,
                currency="EUR" if i % 3 else "",
            )
    # Other tests' rows may wait in a shared database: ours are folded with them.
    assert await rollups.fold_pending(ctx.db) >= 30
    assert await rollups.fold_pending(ctx.db) == 0  # nothing folds twice
    folded = await _rollup_rows(ctx, tenant.org_id)
    async with ctx.db.reader() as session:
        minute_total = await session.scalar(
            select(func.sum(FunnelRollup.n)).where(
                FunnelRollup.org_id == tenant.org_id, FunnelRollup.grain == 1
            )
        )
        paid_value = await session.scalar(
            select(func.sum(FunnelRollup.value)).where(
                FunnelRollup.org_id == tenant.org_id,
                FunnelRollup.grain == 60,
                FunnelRollup.kind == Kind.ORDER_PAID,
            )
        )
    assert minute_total == 30
    assert paid_value == sum(100 * i for i in range(30) if i % 3)
    assert await rollups.rebuild(ctx.db, tenant.org_id) == 30
    assert await _rollup_rows(ctx, tenant.org_id) == folded
