"""Transactions PostgreSQL aborts for a deadlock are run again, not answered with a 500."""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.models import Organization
from popdrop.web.context import AppContext
from tests.conftest import make_tenant


async def test_opposite_lock_orders_both_finish(ctx: AppContext, backend: str) -> None:
    first, second = (await make_tenant(ctx)).org_id, (await make_tenant(ctx)).org_id
    both_hold_one = asyncio.Barrier(2) if backend == "postgresql" else None
    runs: list[str] = []

    def crossing(a: int, b: int, label: str):
        async def work(session: AsyncSession) -> None:
            runs.append(label)
            await session.execute(
                update(Organization).where(Organization.id == a).values(name=f"{label}-1")
            )
            if both_hold_one is not None:
                # Only the first attempts meet here: that is what deadlocks.
                with contextlib.suppress(TimeoutError, asyncio.BrokenBarrierError):
                    await asyncio.wait_for(both_hold_one.wait(), timeout=2)
            await session.execute(
                update(Organization).where(Organization.id == b).values(name=f"{label}-2")
            )

        return work

    await asyncio.gather(
        ctx.db.in_transaction(crossing(first, second, "ab")),
        ctx.db.in_transaction(crossing(second, first, "ba")),
    )
    if backend == "postgresql":
        assert len(runs) >= 3  # PostgreSQL broke the deadlock and one side ran again
