"""Hot-SKU holds over HTTP on PostgreSQL: N units, M contenders, exactly N holds.

1. Seed (service layer): a published event with one lane, one product variant with
   `--units` in stock, and a token with `holds:write`.
2. Serve with `popdrop serve`; a load-generator process fires `--contenders` requests
   `POST /api/v1/holds {variant_id, lane_id}` from `--clients` keep-alive connections.
3. Check the database: active holds add up to exactly the units (no oversell), the stock
   counter agrees, and the number of 201 answers equals the number of hold rows.

A warm-up of holds on another variant comes first (connections, caches). The figure is
holds granted per second: units / (time from the first request to the
last granted hold). DESIGN.md's target is >= 1,000 holds/s (pretix documents 300-400
tickets per minute per event); the ratio printed is against that target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import get_context

from sqlalchemy import func, select

import _common as common
import _loadgen
from popdrop.core.db import Database
from popdrop.core.migrate import upgrade
from popdrop.events import service as events
from popdrop.events.schemas import EventCreate, LaneCreate
from popdrop.inventory import service as inventory
from popdrop.inventory.models import Hold, Stock
from popdrop.inventory.schemas import ProductCreate, StockSet
from redeem import server

TARGET_PER_S = 1_000.0
# Holds on another variant first: open the server's connections, fill its caches.
WARMUP_REQUESTS = 3_000


@dataclass
class Seeded:
    token: str
    variant_id: int
    lane_id: int
    org_id: int
    warmup_variant_id: int


async def seed(url: str, units: int) -> Seeded:
    await common.reset_postgres(url)
    await upgrade(url)
    db = Database(url, pool_size=2, max_overflow=0)
    now = common.now()
    try:
        async with db.transaction() as session:
            owner = await common.seed_org(session, "bench-holds")
            token = await common.seed_token(session, owner.org_id, frozenset({"holds:write"}))
            event = await events.create_event(
                session,
                owner,
                EventCreate(
                    slug="drop",
                    title="Hot drop",
                    starts_at=now + timedelta(hours=1),
                    ends_at=now + timedelta(hours=5),
                    hold_ttl_seconds=900,
                ),
                now=now,
            )
            await events.set_status(session, owner, event.id, "published")
            lane = await events.add_lane(session, owner, event.id, LaneCreate(name="Door"))
            product = await inventory.create_product(
                session,
                owner,
                event.id,
                ProductCreate(title="Sneaker", price_minor=12_000, variants=["hot", "warm-up"]),
            )
            variant_id, warmup_id = (v.id for v in product.variants)
            for variant, total in ((variant_id, units), (warmup_id, WARMUP_REQUESTS)):
                await inventory.set_stock(
                    session,
                    owner,
                    StockSet(variant_id=variant, lane_id=lane.id, total=total),
                    now=now,
                )
    finally:
        await db.dispose()
    return Seeded(token, variant_id, lane.id, owner.org_id, warmup_id)


async def check(url: str, seeded: Seeded) -> tuple[int, int]:
    """(units held in hold rows, the stock's held counter)."""
    db = Database(url, pool_size=1, max_overflow=0)
    try:
        async with db.reader() as session:
            rows = await session.scalar(
                select(func.coalesce(func.sum(Hold.qty), 0)).where(
                    Hold.variant_id == seeded.variant_id, Hold.status == "active"
                )
            )
            counter = await session.scalar(
                select(Stock.held).where(Stock.variant_id == seeded.variant_id)
            )
    finally:
        await db.dispose()
    return int(rows or 0), int(counter or 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--database-url", help=f"default: {common.DEFAULT_PG_URL}")
    parser.add_argument("--units", type=int, default=1_000)
    parser.add_argument("--contenders", type=int, default=5_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    # Its own database: benches may run side by side, and each drops its schema.
    url = common.pg_url(args.database_url).replace("/popdrop_bench", "/popdrop_bench_holds")
    seeded = asyncio.run(seed(url, args.units))
    body = json.dumps({"variant_id": seeded.variant_id, "lane_id": seeded.lane_id}).encode()
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before measuring: {load_avg}")
    warm = json.dumps({"variant_id": seeded.warmup_variant_id, "lane_id": seeded.lane_id})
    with server(url, args.workers) as port:
        warmup = [_loadgen.post_json(port, "/api/v1/holds", warm.encode(), seeded.token)]
        requests = [_loadgen.post_json(port, "/api/v1/holds", body, seeded.token)]
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            pool.submit(
                _loadgen.run, port, warmup * WARMUP_REQUESTS, args.clients, 0.0, 60.0
            ).result()
            job = pool.submit(
                _loadgen.run, port, requests * args.contenders, args.clients, 0.0, 120.0
            )
            load = job.result()
    granted_at = sorted(done for done, status in load.timeline if status == 201)
    granted = len(granted_at)
    selling = (granted_at[-1] - load.started) if granted_at else float("inf")
    rate = granted / selling if granted else 0.0
    everything = (load.timeline[-1][0] - load.started) if load.timeline else float("inf")
    held_rows, counter = asyncio.run(check(url, seeded))
    oversold = max(held_rows - args.units, 0) + max(granted - args.units, 0)
    server_errors = sum(n for status, n in load.statuses.items() if status >= 500)
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(load.statuses.items()))
    print(f"units {args.units}, contenders {args.contenders}, clients {args.clients}")
    print(f"holds granted   {granted}  (hold rows {held_rows}, stock counter {counter})")
    print(f"hold rate       {rate:9.0f} /s   until sold out in {selling:.2f} s")
    print(f"target          {TARGET_PER_S:9.0f} /s   ratio {rate / TARGET_PER_S:.2f} (goal >= 1)")
    print(f"all answers     {len(load.timeline) / everything:9.0f} /s   {statuses}")
    p50, p99 = load.percentile_ms(0.5), load.percentile_ms(0.99)
    print(f"latency         p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"oversold        {oversold}")
    common.emit(
        {
            "bench": "holds",
            "rate_per_s": round(rate, 1),
            "limit_per_s": TARGET_PER_S,
            "ratio": round(rate / TARGET_PER_S, 3),
            "p50_ms": round(p50, 2),
            "p99_ms": round(p99, 2),
            "oversold": oversold,
            "units": args.units,
            "contenders": args.contenders,
            "answers_per_s": round(len(load.timeline) / everything, 1),
            "server_errors": server_errors,
        }
    )
    failed = (
        oversold > 0
        or granted != args.units
        or held_rows != args.units
        or counter != args.units
        or server_errors > 0
        or load.errors > 0
    )
    return 1 if failed else 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    sys.exit(code)
