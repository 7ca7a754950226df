"""Check-in: scans per second over HTTP on PostgreSQL, and offline verifications per second.

1. Seed (service layer + bulk Core insert): an org with a `checkin` token, a live event
   with its Ed25519 key, and N tickets; their secrets are signed here, like the API does.
2. Serve with `popdrop serve` and scan every ticket once, each with a fresh nonce, from
   C keep-alive connections (a separate load-generator process); measure after a warm-up,
   in rounds that alternate with the ceiling's (4).
   Every scan is the full path: verify the signature, take the check-in with one
   conditional UPDATE, record the visit and the scan row, answer.
3. Check the database: one visit per 200 answer, no ticket with two visits, one scan row
   per answer.
4. The limit (the target's): the same server answering a scan refused by body
   validation (a 422, no database, no signature) - the HTTP stack's own ceiling on this
   machine, this run, with the same clients.
5. The second limit: pgbench runs what the service sends to PostgreSQL for one
   successful scan (`service.hot_scan_sql()`: the same statement text the hot path
   executes, and BEGIN/COMMIT around it when the hot path uses a transaction), with the
   same client count, `-M prepared -j 2`, on a second event's tickets taken in order from
   a sequence, so every transaction checks a ticket in (checked against the visits).
6. Offline: `verify_offline` (signature + revocation list) in-process, on one core and on
   every core (one process each, as independent door scanners would).

Goals (DESIGN.md, issue 19): scans >= 0.7 x the HTTP ceiling (ratio); >= 20,000 offline
verifications/s. The ratio to pgbench and the old fixed 2,000/s are printed beside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import get_context
from pathlib import Path

from sqlalchemy import insert

import _common as common
import _loadgen
from popdrop.checkin import service, tickets
from popdrop.checkin.models import Ticket
from popdrop.core.db import Database, table_of
from popdrop.core.migrate import upgrade
from popdrop.events.models import Event
from redeem import checkpoint, run_pgbench, server

SCAN_GOAL = 2_000  # the old fixed goal, printed beside the ratio
CEILING_GOAL = 0.7
LIMIT_SEQUENCE = "bench_limit_ticket"
OFFLINE_GOAL = 20_000
CHUNK = 5_000


@dataclass
class Seeded:
    token: str
    org_id: int
    event_id: int
    public_key: bytes
    secrets: list[str]
    limit_event_id: int
    limit_tickets: int


async def seed(url: str, count: int, limit_tickets: int) -> Seeded:
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
            limit = Event(
                org_id=owner.org_id,
                slug="limit",
                title="Bench limit (pgbench)",
                timezone="UTC",
                starts_at=now - timedelta(hours=1),
                ends_at=now + timedelta(hours=6),
                status="live",
                created_at=now,
            )
            session.add_all([event, limit])
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
        # pgbench's tickets: valid, unused, consecutive ids handed out by a sequence.
        low = await conn.fetchval(
            "WITH made AS (INSERT INTO tickets (org_id, event_id, subject_kind, subject_id, "
            "status, generation, issued_epoch, created_at, changed_at) "
            "SELECT $1, $2, 'rsvp', 10000000 + g, 'valid', 0, $3, $4, $4 "
            "FROM generate_series(1, $5) g RETURNING id) SELECT min(id) FROM made",
            owner.org_id,
            limit.id,
            epoch,
            now,
            limit_tickets,
        )
        await conn.execute(f"CREATE SEQUENCE {LIMIT_SEQUENCE} START WITH {int(low)}")
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return Seeded(
        token, owner.org_id, event.id, signer.public_raw, plaintext, limit.id, limit_tickets
    )


async def audit_db(url: str, event_id: int) -> tuple[int, int, int]:
    """(visits, tickets with more than one visit, scan rows) of one event."""
    conn = await common.pg_connect(url)
    try:
        visits = await conn.fetchval("SELECT count(*) FROM visits WHERE event_id = $1", event_id)
        doubles = await conn.fetchval(
            "SELECT count(*) FROM (SELECT ticket_id FROM visits WHERE event_id = $1 "
            "GROUP BY ticket_id HAVING count(*) > 1) AS twice",
            event_id,
        )
        scans = await conn.fetchval(
            "SELECT count(*) FROM checkin_scans WHERE event_id = $1", event_id
        )
    finally:
        await conn.close()
    return int(visits), int(doubles), int(scans)


def http_phase(
    port: int, seeded: Seeded, clients: int, warmup: float, duration: float, start: int = 0
) -> _loadgen.LoadResult:
    path = "/api/v1/checkins"
    requests = [
        _loadgen.post_json(
            port,
            path,
            json.dumps({"secret": s, "nonce": secrets.token_hex(12), "gate": "main"}).encode(),
            seeded.token,
        )
        for s in seeded.secrets[start:]
    ]
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        job = pool.submit(_loadgen.run, port, requests, clients, warmup, duration)
        return job.result()


def ceiling_phase(
    port: int, token: str, clients: int, warmup: float, duration: float
) -> _loadgen.LoadResult:
    body = json.dumps({"secret": "x", "nonce": "short"}).encode()
    requests = [_loadgen.post_json(port, "/api/v1/checkins", body, token)] * 400_000
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_loadgen.run, port, requests, clients, warmup, duration).result()


def merged(results: list[_loadgen.LoadResult]) -> _loadgen.LoadResult:
    """Rounds as one result: answers and latencies added up, measured time summed."""
    total = _loadgen.LoadResult()
    for result in results:
        total.statuses.update(result.statuses)
        total.latencies += result.latencies
        total.errors += result.errors
        total.sent += result.sent
        total.exhausted |= result.exhausted
    total.measured_from = 0.0
    total.last_done = sum(result.elapsed for result in results)
    return total


def interleaved(
    port: int, seeded: Seeded, clients: int, rounds: int, seconds: float
) -> tuple[_loadgen.LoadResult, _loadgen.LoadResult]:
    """Scans and the 422 ceiling in alternating rounds (ABAB...), so both meet the same
    machine: its speed moves a lot within a minute when other work runs beside."""
    scans: list[_loadgen.LoadResult] = []
    ceilings: list[_loadgen.LoadResult] = []
    start = 0
    for _ in range(rounds):
        scans.append(http_phase(port, seeded, clients, 0.5, seconds, start))
        start += scans[-1].sent
        ceilings.append(ceiling_phase(port, seeded.token, clients, 0.5, seconds))
    return merged(scans), merged(ceilings)


def pgbench_script(seeded: Seeded) -> tuple[str, dict[str, object]]:
    """The pgbench script of one successful scan, and its variables.

    The statement is the service's own (`hot_scan_sql`): each `$n` becomes a pgbench
    variable of the value the app would bind (the times of a scan now, a 16-byte digest,
    a stored answer of the usual size), except the ticket id (the next unused ticket of
    the limit event, from a sequence, in a scalar subquery of the same statement) and the
    nonce (random per transaction)."""
    hot = service.hot_scan_sql()
    now = common.now()
    answer = {
        "result": "ok", "message": "checked in", "nonce": secrets.token_hex(12),
        "ticket_id": 10**6, "event_id": seeded.limit_event_id, "checked_in_at": now.isoformat(),
        "gate": "main", "scanned_at": now.isoformat(),
    }  # fmt: skip
    values: dict[str, object] = {
        **hot.constants,
        "org": seeded.org_id,
        "eid": seeded.limit_event_id,
        "gen": 0,
        "gate": "main",
        "at": now.isoformat(),
        "received_at": now.isoformat(),
        "opens_by": (now + service.OPENS_BEFORE).isoformat(),
        "closes_from": (now - service.CLOSES_AFTER).isoformat(),
        "digest": "\\x" + secrets.token_hex(16),
        "answer": json.dumps(answer),
        "offline": "false",
        "actor": "token:1:bench",
    }
    inline = {
        "tid": f"(SELECT nextval('{LIMIT_SEQUENCE}'))",
        "nonce": ":nonce::text" if hot.arrays else ":nonce",
        "idx": "0",
    }
    variables: dict[str, object] = {}

    def placeholder(match: re.Match[str]) -> str:
        name = hot.names[int(match.group(1)) - 1]  # the `::TYPE` after it stays
        return f"ARRAY[{value_of(name)}]" if hot.arrays else value_of(name)

    def value_of(name: str) -> str:
        if name in inline:
            return inline[name]
        if values[name] is None:
            return "NULL"
        if values[name] == "":  # pgbench takes no empty -D value
            return "''"
        variables[f"p_{name}"] = values[name]
        return f":p_{name}::text" if hot.arrays else f":p_{name}"

    text = re.sub(r"\$(\d+)", placeholder, " ".join(hot.text.split()))
    lines = ["\\set nonce random(1, 1000000000000000)"]
    lines += ["BEGIN;", text + ";", "COMMIT;"] if hot.in_transaction else [text + ";"]
    return "\n".join(lines) + "\n", variables


async def limit_audit(url: str, seeded: Seeded) -> tuple[int, int]:
    """(tickets pgbench took from the sequence, visits of the limit event)."""
    conn = await common.pg_connect(url)
    try:
        last, called = await conn.fetchrow(f"SELECT last_value, is_called FROM {LIMIT_SEQUENCE}")
        low = await conn.fetchval(
            "SELECT min(id) FROM tickets WHERE event_id = $1", seeded.limit_event_id
        )
        visits = await conn.fetchval(
            "SELECT count(*) FROM visits WHERE event_id = $1", seeded.limit_event_id
        )
    finally:
        await conn.close()
    return (int(last) - int(low) + 1 if called else 0), int(visits)


def pgbench_once(
    url: str, clients: int, seconds: float, script: Path, variables: dict[str, object]
) -> float:
    """`run_pgbench`, tried again when the shared server is out of connection slots."""
    for attempt in range(6):
        try:
            return run_pgbench(url, clients, seconds, script, variables)
        except SystemExit as failure:
            if "too many clients" not in str(failure) or attempt == 5:
                raise
            print("pgbench: PostgreSQL is out of connection slots (other work); retrying")
            time.sleep(3)
    raise AssertionError("unreachable")


def pgbench_phase(url: str, seeded: Seeded, clients: int, warmup: float, seconds: float) -> float:
    script, variables = pgbench_script(seeded)
    with tempfile.TemporaryDirectory(prefix="popdrop-pgbench-") as tmp:
        path = Path(tmp) / "scan.sql"
        path.write_text(script)
        asyncio.run(checkpoint(url))
        pgbench_once(url, clients, warmup, path, variables)  # warm-up, not measured
        return pgbench_once(url, clients, seconds, path, variables)


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
    parser.add_argument(
        "--limit-tickets", type=int, help="pgbench's tickets (400000; quick 150000)"
    )
    args = parser.parse_args()
    url = common.pg_url(args.database_url)
    duration = args.duration or (8.0 if args.quick else 20.0)
    warmup = 2.0 if args.quick else 3.0
    count = args.tickets or (30_000 if args.quick else 80_000)
    limit_tickets = args.limit_tickets or (150_000 if args.quick else 400_000)
    rounds = 4 if args.quick else 6

    started = time.monotonic()
    seeded = asyncio.run(seed(url, count, limit_tickets))
    seconds = time.monotonic() - started
    print(f"seeded {count} tickets + {limit_tickets} for pgbench in {seconds:.1f}s")
    load_avg = os.getloadavg()
    print(
        "load average before measuring: "
        + ", ".join(f"{x:.2f}" for x in load_avg)
        + " (other work on the machine skews figures)"
    )

    asyncio.run(checkpoint(url))
    with server(url, args.workers) as port:
        # Every worker builds its routes on its first requests (seconds of CPU): pay that
        # with refusals before any phase is measured, so neither phase measures it.
        ceiling_phase(port, seeded.token, args.clients, 0.0, warmup)
        load, refused = interleaved(port, seeded, args.clients, rounds, duration / rounds)
    ceiling = refused.rate
    visits, doubles, scan_rows = asyncio.run(audit_db(url, seeded.event_id))
    limit = pgbench_phase(url, seeded, args.clients, warmup, duration)
    taken, limit_visits = asyncio.run(limit_audit(url, seeded))

    cores = os.cpu_count() or 1
    sample = seeded.secrets[:2_000]
    offline_seconds = 2.0 if args.quick else 5.0
    one_core = offline_rate(seeded.public_key, sample, 1, offline_seconds)
    all_cores = offline_rate(seeded.public_key, sample, cores, offline_seconds)

    rate = load.rate
    ratio = rate / ceiling if ceiling else 0.0
    ratio_pg = rate / limit if limit else 0.0
    ok = load.statuses.get(200, 0)
    answered = sum(load.statuses.values())
    server_errors = sum(n for status, n in load.statuses.items() if status >= 500)
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(load.statuses.items()))
    print(
        f"clients {args.clients}, server workers {args.workers}, measured {load.elapsed:.1f}s "
        f"of scans and {refused.elapsed:.1f}s of refusals in {rounds} alternating rounds"
    )
    print(
        f"HTTP scans       {rate:9.0f} /s   p50 {load.percentile_ms(0.5):.1f} ms, "
        f"p99 {load.percentile_ms(0.99):.1f} ms"
    )
    print(f"HTTP ceiling     {ceiling:9.0f} /s   (the same server's 422: no database work)")
    print(f"ratio to ceiling {ratio:9.2f}     (goal >= {CEILING_GOAL})")
    print(f"pgbench limit    {limit:9.0f} /s   (the scan's SQL, -M prepared -j 2, same clients)")
    print(f"ratio to pgbench {ratio_pg:9.2f}")
    print(f"fixed goal       {rate / SCAN_GOAL:9.2f}     (of {SCAN_GOAL:,} scans/s, beside)")
    print(f"offline, 1 core  {one_core:9.0f} /s   ratio {one_core / OFFLINE_GOAL:.2f}")
    print(
        f"offline, {cores} cores {all_cores:9.0f} /s   ratio {all_cores / OFFLINE_GOAL:.2f}"
        f"     (goal {OFFLINE_GOAL:,}/s; one process per core)"
    )
    print(f"answers          {statuses}; connection errors {load.errors}")
    print(f"visits {visits} vs 200 answers {ok}; double visits {doubles}; scan rows {scan_rows}")
    print(f"pgbench took {taken} tickets and made {limit_visits} visits (every one must succeed)")
    if load.exhausted:
        print("note: every ticket was scanned before the time was up; use more --tickets")
    limit_fair = taken == limit_visits and taken <= seeded.limit_tickets
    if not limit_fair:
        print("note: some pgbench transactions took no ticket: its limit is too high; raise "
              "--limit-tickets")  # fmt: skip
    common.emit(
        {
            "bench": "checkin",
            "rate_per_s": round(rate, 1),
            "limit_per_s": round(ceiling, 1),
            "ratio": round(ratio, 3),
            "pgbench_per_s": round(limit, 1),
            "ratio_to_pgbench": round(ratio_pg, 3),
            "pgbench_all_succeeded": limit_fair,
            "fixed_goal_ratio": round(rate / SCAN_GOAL, 3),
            "load_avg": [round(x, 2) for x in load_avg],
            "offline_verify_per_s": round(all_cores, 1),
            "offline_ratio": round(all_cores / OFFLINE_GOAL, 3),
            "offline_verify_per_s_1core": round(one_core, 1),
            "p50_ms": round(load.percentile_ms(0.5), 2),
            "p99_ms": round(load.percentile_ms(0.99), 2),
            "double_visits": doubles,
            "visits": visits,
            "ok_answers": ok,
            "scan_rows": scan_rows,
            "answers": answered,
            "tickets": count,
            "clients": args.clients,
            "workers": args.workers,
            "cores": cores,
            "server_errors": server_errors,
            "connection_errors": load.errors,
            "seconds": round(load.elapsed, 2),
        }
    )
    failed = doubles > 0 or server_errors > 0 or load.errors > 0 or ok != visits
    return 1 if failed or scan_rows != answered else 0


if __name__ == "__main__":
    sys.exit(main())
