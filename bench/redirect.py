"""Short-link redirects per second over HTTP, against the same server's no-database ceiling.

1. Seed (service layer): an org with N short links (plain URL targets with UTM tags).
2. Serve with `popdrop serve` and request `/s/{slug}` round-robin over the links from C
   keep-alive connections (a separate load-generator process, a phone's user agent so
   every request is a counted click); measure after a warm-up. Every redirect is the
   real path: the cached view, the validity and max-clicks checks, a fresh click id,
   the click handed to the in-memory batch, a 302.
3. For scale: the same server answering `GET /healthz` (no database) - the HTTP stack's
   own ceiling on this machine, this run.
4. A last half-second burst of redirects, then stop the server at once (its graceful stop
   must flush that batch) and check the database: one click row per 302 answered in
   every phase, and the links' counters agree (0 lost).

Goal (DESIGN.md): redirects >= 0.7 x the HTTP ceiling, 0 clicks lost. Exits non-zero
only when clicks were lost (or the server failed), never on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import _common as common
import _loadgen
from popdrop.attribution import service
from popdrop.attribution.schemas import LinkTags, LinkTarget, ShortLinkCreate
from popdrop.core.db import Database
from popdrop.core.migrate import upgrade
from redeem import checkpoint, server

RATIO_GOAL = 0.7
# Its own database by default, so it never wipes one another benchmark is using.
DEFAULT_URL = common.DEFAULT_PG_URL.rsplit("/", 1)[0] + "/popdrop_bench_redirect"
PHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)


@dataclass
class Seeded:
    org_id: int
    slugs: list[str]


async def seed(url: str, count: int) -> Seeded:
    await common.reset_postgres(url)
    await upgrade(url)
    db = Database(url, pool_size=2, max_overflow=0)
    slugs: list[str] = []
    try:
        async with db.transaction() as session:
            owner = await common.seed_org(session, "bench-redirect")
            for i in range(count):
                spec = ShortLinkCreate(
                    target=LinkTarget(kind="url", url=f"https://shop.example/drop/{i}?ref=bench"),  # type: ignore[arg-type]
                    tags=LinkTags(
                        channel="sms",  # type: ignore[arg-type]
                        utm_source="popdrop",
                        utm_medium="sms",
                        utm_campaign="bench",
                    ),
                )
                link = await service.create_short_link(session, owner, spec, now=common.now())
                slugs.append(link.slug)
    finally:
        await db.dispose()
    return Seeded(owner.org_id, slugs)


def get(port: int, path: str) -> bytes:
    """One keep-alive GET request from a phone's browser, ready to write."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {_loadgen.HOST}:{port}\r\nUser-Agent: {PHONE}\r\n"
        "Accept: text/html\r\n\r\n"
    ).encode()


def phase(
    port: int, requests: list[bytes], clients: int, warmup: float, duration: float
) -> _loadgen.LoadResult:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_loadgen.run, port, requests, clients, warmup, duration).result()


async def stored_clicks(url: str, org_id: int) -> tuple[int, int]:
    """(click rows, sum of the links' click counters) of the org."""
    conn = await common.pg_connect(url)
    try:
        rows = await conn.fetchval(
            "SELECT count(*) FROM short_link_clicks WHERE org_id = $1", org_id
        )
        counters = await conn.fetchval(
            "SELECT coalesce(sum(clicks), 0) FROM short_links WHERE org_id = $1", org_id
        )
    finally:
        await conn.close()
    return int(rows), int(counters)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--database-url", help=f"default: {DEFAULT_URL}")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="server processes")
    parser.add_argument("--duration", type=float, help="measured seconds (15; quick 6)")
    parser.add_argument("--links", type=int, default=200, help="short links to spread over")
    args = parser.parse_args()
    url = args.database_url or os.environ.get("POPDROP_BENCH_REDIRECT_DATABASE_URL") or DEFAULT_URL
    duration = args.duration or (6.0 if args.quick else 15.0)
    warmup = 2.0 if args.quick else 3.0

    started = time.monotonic()
    seeded = asyncio.run(seed(url, args.links))
    print(f"seeded {args.links} short links in {time.monotonic() - started:.1f}s")
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before measuring: {load_avg} (other work on the machine skews figures)")

    asyncio.run(checkpoint(url))
    with server(url, args.workers) as port:
        paths = [get(port, f"/s/{slug}") for slug in seeded.slugs]
        requests = paths * (2_000_000 // len(paths))
        load = phase(port, requests, args.clients, warmup, duration)
        ceiling_requests = [get(port, "/healthz")] * 2_000_000
        ceiling = phase(port, ceiling_requests, args.clients, 1.0, min(duration, 6.0)).rate
        # A last burst right before the stop: its clicks are still in memory when the
        # server is told to stop, so only the graceful shutdown's flush can save them.
        tail = phase(port, requests, args.clients, 0.0, 0.5)
    # The server has stopped: its graceful shutdown flushed the last batch of clicks.
    rows, counters = asyncio.run(stored_clicks(url, seeded.org_id))

    rate = load.rate
    redirected = load.statuses.get(302, 0) + tail.statuses.get(302, 0)
    lost = max(redirected - rows, 0)
    mismatch = counters != rows
    server_errors = sum(n for status, n in load.statuses.items() if status >= 500)
    ratio = rate / ceiling if ceiling else 0.0
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(load.statuses.items()))
    print(f"clients {args.clients}, server workers {args.workers}, measured {load.elapsed:.1f}s")
    print(
        f"redirects        {rate:9.0f} /s   p50 {load.percentile_ms(0.5):.1f} ms, "
        f"p99 {load.percentile_ms(0.99):.1f} ms"
    )
    print(f"HTTP ceiling     {ceiling:9.0f} /s   (GET /healthz, no database)")
    print(f"ratio            {ratio:9.2f}      (goal {RATIO_GOAL})")
    print(f"answers          {statuses}; connection errors {load.errors}")
    print(
        f"clicks stored {rows} for {redirected} redirects: lost {lost}; "
        f"link counters {counters} ({'agree' if not mismatch else 'DISAGREE'})"
    )
    common.emit(
        {
            "bench": "redirect",
            "rate_per_s": round(rate, 1),
            "limit_per_s": round(ceiling, 1),
            "ratio": round(ratio, 3),
            "lost_clicks": lost,
            "clicks_stored": rows,
            "redirects": redirected,
            "counters_agree": not mismatch,
            "p50_ms": round(load.percentile_ms(0.5), 2),
            "p99_ms": round(load.percentile_ms(0.99), 2),
            "links": args.links,
            "clients": args.clients,
            "workers": args.workers,
            "server_errors": server_errors,
            "seconds": round(load.elapsed, 2),
        }
    )
    return 1 if lost or mismatch or server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
