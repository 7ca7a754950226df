"""`popdrop metrics rebuild`, run as a real process: rollups that went wrong are
recomputed from the log, for the organization named and no other."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from sqlalchemy import update

from popdrop.metrics import kpis, rollups
from popdrop.metrics.kpis import Scope
from popdrop.metrics.models import FunnelRollup
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.metrics.simulation import Ids, seed
from tests.server import POPDROP, server_env

IDS = Ids(event=11, event2=12, drop=13, partner=14, lane1=15, lane2=16)


async def test_rebuild_repairs_one_organizations_rollups(
    ctx: AppContext, tenant: Tenant, database_url: str, tmp_path: Path
) -> None:
    other = await make_tenant(ctx)
    async with ctx.db.transaction() as session:
        await seed(session, tenant.org_id, IDS, other.org_id)
    await rollups.fold_pending(ctx.db)
    async with ctx.db.transaction() as session:  # damage both organizations' rollups
        await session.execute(update(FunnelRollup).values(n=FunnelRollup.n + 5))
    done = await asyncio.to_thread(
        subprocess.run,
        [*POPDROP, "metrics", "rebuild", "--org", tenant.slug],
        env=server_env(tmp_path, database_url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"{tenant.slug}: rollups rebuilt from 60 events" in done.stdout
    async with ctx.db.reader() as session:
        mine = await kpis.kpis(session, Scope(tenant.org_id, event_id=IDS.event))
        theirs = await kpis.kpis(session, Scope(other.org_id))
    assert mine.counts["message_sent"] == 12 and mine.counts["visit"] == 6
    assert theirs.counts["message_sent"] > 5  # not named: left as it was
