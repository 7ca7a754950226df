"""Check-in: scans per second over HTTP on PostgreSQL, and offline verifications per second.

1. Seed (service layer + bulk Core insert): an org with a `checkin` token, a live event
   with its Ed25519 key, and N tickets; their secrets are signed here, like the API does.
2. Serve with `popdrop serve` and scan every ticket once, each with a fresh nonce, from
   C keep-alive connections (a separate load-generator process); measure after a warm-up.
   Every scan is the full path: verify the signature, take the check-in with one
   conditional UPDATE, record the visit and the scan row, answer.
3. Check the database: one visit per 200 answer, no ticket with two visits, one scan row
   per answer.
4. For scale: the same server answering a scan refused by body validation (a 422, no
   database, no signature) - the HTTP stack's own ceiling on this machine, this run.
5. Offline: `verify_offline` (signature + revocation list) in-process, on one core and on
   every core (one process each, as independent door scanners would).

Goals (DESIGN.md): >= 2,000 scans/s over HTTP; >= 20,000 offline verifications/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import get_context

from sqlalchemy import insert

import _common as common
import _loadgen
from popdrop.checkin import service, tickets
from popdrop.checkin.models import Ticket
from popdrop.core.db import Database, table_of
from popdrop.core.migrate import upgrade
from popdrop.events.models import Event
from redeem import checkpoint, server

SCAN_GOAL = 2_000
OFFLINE_GOAL = 20_000
CHUNK = 5_000


@dataclass
class Seeded:
    token: str
    org_id: int
    event_id: int
    public_key: bytes
    secrets: list[str]


async def seed(url: str, count: int) -> Seeded:
    await common.reset_postgres(url)
    await upgrade(url)
    db = Database(url, pool_size=2, max_overflow=0)
    now = common.now()
    try:
        async with db.transaction() as session:
            owner = await common.seed_org(session, "bench-checkin")
            token = await common.seed_token(session, owner.org_id, frozenset({"checkin"}))
            event = Event(
                org_id=owner.org_id,
                slug="door",
                title="Bench door",
                timezone="UTC",
                starts_at=now - timedelta(hours=1),
                ends_at=now + timedelta(hours=6),
                status="live",
                created_at=now,
            )
            session.add(event)
            await session.flush()
            signer = await service.event_signer(session, event, now)
        table = table_of(Ticket)
        epoch = int(now.timestamp())
        plaintext: list[str] = []
        while len(plaintext) < count:
            rows = [
                {
                    "org_id": owner.org_id,
                    "event_id": event.id,
                    "subject_kind": "rsvp",
                    "subject_id": len(plaintext) + i + 1,
                    "holder_ref": None,
                    "status": "valid",
                    "generation": 0,
                    "issued_epoch": epoch,
                    "created_at": now,
                    "changed_at": now,
                }
                for i in range(min(CHUNK, count - len(plaintext)))
            ]
            async with db.transaction() as session:
                ids = (await session.execute(insert(table).returning(table.c.id), rows)).scalars()
                plaintext += [
                    tickets.sign(
                        signer.private,
                        event_id=event.id,
                        ticket_id=ticket_id,
                        generation=0,
                        issued_epoch=epoch,
                    )
                    for ticket_id in ids
                ]
    finally:
        await db.dispose()
    conn = await common.pg_connect(url)
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return Seeded(token, owner.org_id, event.id, signer.public_raw, plaintext)


async def audit_db(url: str, org_id: int) -> tuple[int, int, int]:
    """(visits, tickets with more than one visit, scan rows)."""
    conn = await common.pg_connect(url)
    try:
        visits = await conn.fetchval("SELECT count(*) FROM visits WHERE org_id = $1", org_id)
        doubles = await conn.fetchval(
            "SELECT count(*) FROM (SELECT ticket_id FROM visits WHERE org_id = $1 "
            "GROUP BY ticket_id HAVING count(*) > 1) AS twice",
            org_id,
        )
        scans = await conn.fetchval("SELECT count(*) FROM checkin_scans WHERE org_id = $1", org_id)
    finally:
        await conn.close()
    return int(visits), int(doubles), int(scans)


def http_phase(
    port: int, seeded: Seeded, clients: int, warmup: float, duration: float
) -> _loadgen.LoadResult:
    path = "/api/v1/checkins"
    requests = [
        _loadgen.post_json(
            port,
            path,
            json.dumps({"secret": s, "nonce": secrets.token_hex(12), "gate": "main"}).encode(),
            seeded.token,
        )
        for s in seeded.secrets
    ]
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        job = pool.submit(_loadgen.run, port, requests, clients, warmup, duration)
        return job.result()


def ceiling_phase(port: int, token: str, clients: int, warmup: float, duration: float) -> float:
    body = json.dumps({"secret": "x", "nonce": "short"}).encode()
    requests = [_loadgen.post_json(port, "/api/v1/checkins", body, token)] * 400_000
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        result = pool.submit(_loadgen.run, port, requests, clients, warmup, duration).result()
    return result.rate


def verify_many(public_key: bytes, batch: list[str], revoked: frozenset[int]) -> int:
    """Verify every secret; return how many were ok (a process-pool entry point)."""
    key = tickets.public_key_of(public_key)
    return sum(tickets.verify_offline(key, s, revoked)[0] == "ok" for s in batch)


def offline_rate(public_key: bytes, sample: list[str], processes: int, seconds: float) -> float:
    """Verifications per second: `processes` workers each verify the sample repeatedly."""
    revoked = frozenset(range(10**9, 10**9 + 1_000))  # a synced list of 1,000 revoked ids
    if processes == 1:
        verify_many(public_key, sample[:200], revoked)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            done += verify_many(public_key, sample, revoked)
        return done / (time.perf_counter() - started)
    rounds = max(1, round(seconds * 15_000 / max(len(sample), 1)))
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        list(pool.map(verify_many, [public_key] * processes, [sample[:50]] * processes,
                      [revoked] * processes))  # fmt: skip  # start the workers first
        started = time.perf_counter()
        jobs = [
            pool.submit(verify_many, public_key, sample * rounds, revoked) for _ in range(processes)
        ]
        done = sum(job.result() for job in jobs)
        return done / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--database-url", help=f"default: {common.DEFAULT_PG_URL}")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="server processes")
    parser.add_argument("--duration", type=float, help="measured seconds (20; quick 8)")
    parser.add_argument("--tickets", type=int, help="tickets to scan (80000; quick 30000)")
    args = parser.parse_args()
    url = common.pg_url(args.database_url)
    duration = args.duration or (8.0 if args.quick else 20.0)
    warmup = 2.0 if args.quick else 3.0
    count = args.tickets or (30_000 if args.quick else 80_000)

    started = time.monotonic()
    seeded = asyncio.run(seed(url, count))
    print(f"seeded {count} tickets in {time.monotonic() - started:.1f}s")
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before measuring: {load_avg} (other work on the machine skews figures)")

    asyncio.run(checkpoint(url))
    with server(url, args.workers) as port:
        load = http_phase(port, seeded, args.clients, warmup, duration)
        ceiling = ceiling_phase(port, seeded.token, args.clients, 1.0, min(duration, 6.0))
    visits, doubles, scan_rows = asyncio.run(audit_db(url, seeded.org_id))

    cores = os.cpu_count() or 1
    sample = seeded.secrets[:2_000]
    offline_seconds = 2.0 if args.quick else 5.0
    one_core = offline_rate(seeded.public_key, sample, 1, offline_seconds)
    all_cores = offline_rate(seeded.public_key, sample, cores, offline_seconds)

    rate = load.rate
    ok = load.statuses.get(200, 0)
    answered = sum(load.statuses.values())
    server_errors = sum(n for status, n in load.statuses.items() if status >= 500)
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(load.statuses.items()))
    print(f"clients {args.clients}, server workers {args.workers}, measured {load.elapsed:.1f}s")
    print(
        f"HTTP scans       {rate:9.0f} /s   p50 {load.percentile_ms(0.5):.1f} ms, "
        f"p99 {load.percentile_ms(0.99):.1f} ms"
    )
    print(f"ratio to goal    {rate / SCAN_GOAL:9.2f}     (goal {SCAN_GOAL:,} scans/s)")
    print(
        f"HTTP stack alone {ceiling:9.0f} /s   (a 422 with no database work; scans reach "
        f"{rate / ceiling if ceiling else 0:.2f} of it)"
    )
    print(f"offline, 1 core  {one_core:9.0f} /s   ratio {one_core / OFFLINE_GOAL:.2f}")
    print(
        f"offline, {cores} cores {all_cores:9.0f} /s   ratio {all_cores / OFFLINE_GOAL:.2f}"
        f"     (goal {OFFLINE_GOAL:,}/s; one process per core)"
    )
    print(f"answers          {statuses}; connection errors {load.errors}")
    print(f"visits {visits} vs 200 answers {ok}; double visits {doubles}; scan rows {scan_rows}")
    if load.exhausted:
        print("note: every ticket was scanned before the time was up; use more --tickets")
    common.emit(
        {
            "bench": "checkin",
            "rate_per_s": round(rate, 1),
            "ratio": round(rate / SCAN_GOAL, 3),
            "http_ceiling_per_s": round(ceiling, 1),
            "offline_verify_per_s": round(all_cores, 1),
            "offline_ratio": round(all_cores / OFFLINE_GOAL, 3),
            "offline_verify_per_s_1core": round(one_core, 1),
            "p50_ms": round(load.percentile_ms(0.5), 2),
            "p99_ms": round(load.percentile_ms(0.99), 2),
            "double_visits": doubles,
            "tickets": count,
            "clients": args.clients,
            "workers": args.workers,
            "cores": cores,
            "server_errors": server_errors,
            "seconds": round(load.elapsed, 2),
        }
    )
    failed = doubles > 0 or server_errors > 0 or load.errors > 0 or ok != visits
    return 1 if failed or scan_rows != answered else 0


if __name__ == "__main__":
    sys.exit(main())
