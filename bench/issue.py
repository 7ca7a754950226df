"""Bulk issue: 100,000 codes in one batch through `vouchers.service.issue_batch`.

Timed from the first statement to the commit, on SQLite (a fresh file in a temp dir)
and, when reachable, PostgreSQL (the bench database, schema recreated). The limit, measured
in the same run on PostgreSQL: the same rows read back and COPYed raw (asyncpg
`copy_records_to_table`) into an unindexed copy of the vouchers table; ratio = issue rate /
COPY rate. The 10 s target for 100k codes is printed beside it (10 / seconds, >= 1 meets it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import _common as common
from popdrop.core.db import Database
from popdrop.core.migrate import upgrade
from popdrop.vouchers import service
from popdrop.vouchers.schemas import BatchCreate

TARGET_SECONDS = 10.0
CODES = 100_000


async def time_issue(url: str, quantity: int) -> float:
    """Seconds to issue `quantity` codes in one transaction (schema already migrated)."""
    await upgrade(url)
    db = Database(url, pool_size=2, max_overflow=0)
    try:
        async with db.transaction() as session:
            owner = await common.seed_org(session)
        started = time.perf_counter()
        async with db.transaction() as session:
            _, codes = await service.issue_batch(
                session,
                common.SIGNER,
                owner,
                BatchCreate(name="bulk", quantity=quantity),
                now=common.now(),
            )
        seconds = time.perf_counter() - started
        assert len(set(codes)) == quantity
        return seconds
    finally:
        await db.dispose()


async def copy_limit(pg: str) -> float:
    """Rows per second COPYing the issued vouchers raw into an unindexed copy of their table."""
    conn = await common.pg_connect(pg)
    try:
        await conn.execute("CREATE TEMP TABLE scratch (LIKE vouchers INCLUDING DEFAULTS)")
        records = await conn.fetch("SELECT * FROM vouchers")
        columns = list(records[0].keys())
        started = time.perf_counter()
        await conn.copy_records_to_table(
            "scratch", records=[tuple(r) for r in records], columns=columns
        )
        return len(records) / (time.perf_counter() - started)
    finally:
        await conn.close()


async def run(pg: str, quantity: int) -> tuple[float, float | None, float | None]:
    with tempfile.TemporaryDirectory(prefix="popdrop-bench-") as tmp:
        sqlite = await time_issue(f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}", quantity)
    if not await common.pg_reachable(pg):
        print(f"PostgreSQL not reachable at {pg}: skipped")
        return sqlite, None, None
    await common.reset_postgres(pg)
    postgres = await time_issue(pg, quantity)
    return sqlite, postgres, await copy_limit(pg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="same 100k run (fits a minute)")
    parser.add_argument("--database-url", help=f"default: {common.DEFAULT_PG_URL}")
    parser.add_argument("--codes", type=int, default=CODES)
    args = parser.parse_args()
    sqlite, postgres, limit = asyncio.run(run(common.pg_url(args.database_url), args.codes))

    per_100k = 100_000 / args.codes
    for name, seconds in (("SQLite", sqlite), ("PostgreSQL", postgres)):
        if seconds is not None:
            print(
                f"{name:10} {seconds * per_100k:6.2f} s per 100k  {args.codes / seconds:8.0f} "
                f"codes/s  ratio {TARGET_SECONDS / (seconds * per_100k):.2f} (target 10 s, >= 1)"
            )
    slowest = max(s for s in (sqlite, postgres) if s is not None)
    rate = args.codes / (postgres if postgres is not None else sqlite)
    if limit is not None:
        print(
            f"raw COPY   {limit:8.0f} rows/s   ratio {rate / limit:.3f} (PostgreSQL issue / COPY)"
        )
    common.emit(
        {
            "bench": "issue",
            "rate_per_s": round(rate, 1),
            "limit_per_s": round(limit, 1) if limit is not None else None,
            "ratio": round(rate / limit, 3) if limit else None,
            "sqlite_seconds": round(sqlite * per_100k, 2),
            "postgres_seconds": round(postgres * per_100k, 2) if postgres is not None else None,
            "codes_per_s": round(args.codes / slowest),
            "ratio_to_target": round(TARGET_SECONDS / (slowest * per_100k), 2),
            "target_seconds": TARGET_SECONDS,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
