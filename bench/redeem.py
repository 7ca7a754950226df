"""Flash-sale redemption over HTTP on PostgreSQL, against the raw rate of the same SQL.

1. Seed (service layer): an org with a `vouchers:redeem` token and N single-use codes;
   a second org with a batch whose codes have a huge `max_uses`, for the limit.
2. Serve with `popdrop serve` and redeem every code once from C keep-alive connections
   (a separate load-generator process); measure rate and latency after a warm-up.
3. Check the database: no code used more than `max_uses`, no voucher with two
   redemption rows, and exactly one redemption row per 200 answer.
4. The limit: pgbench drives the statements `vouchers.service.redeem` sends for a
   successful redemption (captured with SQLAlchemy echo) with the same client count and
   duration, `-M prepared -j 2`, on the second org's codes, so every transaction succeeds.
   That is what one redemption costs alone; the server groups concurrent redemptions
   (`service.redeem_now`, one transaction for a group), which is how it can come near it.

Goal (DESIGN.md): rate >= 50 % of the limit, zero double redemptions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import _common as common
import _loadgen
from popdrop.core.config import DEFAULT_AUDIT_CHAINS
from popdrop.core.db import Database
from popdrop.core.migrate import upgrade
from popdrop.vouchers import service
from popdrop.vouchers.schemas import BatchCreate

AUDIT_CHAINS = DEFAULT_AUDIT_CHAINS  # the bench never configures the ledger: the default
LIMIT_CODES = 10_000
PGBENCH = "/usr/bin/pgbench"

# What `vouchers.service.redeem` sends on PostgreSQL for a successful redemption once the
# batch policy is cached and the chain head exists (print the compiled statements with
# `_REDEEM_FUSED.compile(dialect=postgresql.dialect())` and `audit._SET_HEAD_AND_INSERT`):
# BEGIN; one fused statement (take the use, record the redemption, bump and lock the audit
# chain head, returning the previous hash); one fused statement (new head hash + audit
# entry); COMMIT. pgbench cannot pick a random bytea, so the code row is picked by a
# random id and its code_hash read by a scalar subquery (one extra primary-key lookup
# inside the same statement, no extra round trip). Hashes are constants: the app computes
# them in Python, not in the database. Text holding a colon comes in as a -D variable,
# since pgbench reads `:name` inside literals as a variable.
PGBENCH_SCRIPT = """\
\\set id random(:lo, :hi)
BEGIN;
WITH taken AS (UPDATE vouchers SET uses=(vouchers.uses + 1) WHERE vouchers.code_hash = \
(SELECT v.code_hash FROM vouchers v WHERE v.id = :id) AND vouchers.org_id = :org \
AND vouchers.revoked_at IS NULL AND vouchers.uses < vouchers.max_uses \
AND (vouchers.valid_from IS NULL OR vouchers.valid_from <= now()) \
AND (vouchers.valid_until IS NULL OR vouchers.valid_until > now()) \
RETURNING vouchers.id, vouchers.batch_id, vouchers.uses, vouchers.max_uses), \
recorded AS (INSERT INTO redemptions (org_id, voucher_id, batch_id, contact_ref, order_ref, \
cost_minor, redeemed_at, actor) SELECT :org, taken.id, taken.batch_id, NULL, NULL, \
voucher_batches.cost_per_use_minor, now(), :actor FROM taken \
JOIN voucher_batches ON voucher_batches.id = taken.batch_id \
RETURNING redemptions.id, redemptions.cost_minor), \
head AS (UPDATE audit_heads SET seq=(audit_heads.seq + 1) WHERE audit_heads.org_id = :org \
AND audit_heads.chain = (SELECT taken.id % :chains FROM taken) \
RETURNING audit_heads.seq, audit_heads.hash) \
SELECT taken.id AS voucher_id, taken.batch_id, taken.uses, taken.max_uses, \
recorded.id AS redemption_id, recorded.cost_minor, head.seq AS seq, head.hash AS prev \
FROM taken JOIN recorded ON true LEFT OUTER JOIN head ON true \\gset
\\set chain :voucher_id % :chains
WITH set_head AS (UPDATE audit_heads SET hash=:hash WHERE audit_heads.org_id = :org \
AND audit_heads.chain = :chain) \
INSERT INTO audit_entries (org_id, chain, seq, at, actor, action, subject, payload, \
payload_digest, prev_hash, hash) VALUES (:org, :chain, :seq, now(), :actor, \
'voucher.redeem', :subject::text || :voucher_id, \
:payload_head::text || :redemption_id || :payload_use::text || :uses || '}', \
:hash, :prev, :hash);
COMMIT;
"""
PGBENCH_VARIABLES = {
    "chains": str(AUDIT_CHAINS),
    "actor": "token:1:bench",
    "subject": "voucher:",
    "payload_head": '{"contact_ref":null,"cost_minor":0,"order_ref":null,"redemption":',
    "payload_use": ',"use":',
    "hash": "f" * 64,
}


@dataclass
class Seeded:
    token: str
    codes: list[str]
    app_org: int
    limit_org: int
    limit_ids: tuple[int, int]


async def seed(url: str, codes: int) -> Seeded:
    await common.reset_postgres(url)
    await upgrade(url)
    db = Database(url, pool_size=2, max_overflow=0)
    try:
        async with db.transaction() as session:
            owner = await common.seed_org(session, "bench")
            token = await common.seed_token(session, owner.org_id, frozenset({"vouchers:redeem"}))
            spec = BatchCreate(name="flash sale", quantity=codes)
            _, plaintext = await service.issue_batch(
                session, common.SIGNER, owner, spec, now=common.now()
            )
        async with db.transaction() as session:
            other = await common.seed_org(session, "bench-limit")
            spec = BatchCreate(name="limit", quantity=LIMIT_CODES, max_uses=1_000_000_000)
            batch, _ = await service.issue_batch(
                session, common.SIGNER, other, spec, now=common.now()
            )
    finally:
        await db.dispose()
    conn = await common.pg_connect(url)
    try:
        low, high = await conn.fetchrow(
            "SELECT min(id), max(id) FROM vouchers WHERE batch_id = $1", batch.id
        )
        # The app creates a chain head on first use; pgbench needs them all up front.
        await conn.execute(
            "INSERT INTO audit_heads (org_id, chain, seq, hash) "
            "SELECT $1, c, 0, repeat('0', 64) FROM generate_series(0, $2) c "
            "ON CONFLICT DO NOTHING",
            other.org_id,
            AUDIT_CHAINS - 1,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return Seeded(token, plaintext, owner.org_id, other.org_id, (low, high))


async def checkpoint(url: str) -> None:
    """Start each phase with a clean checkpoint, so neither pays for the other's writes."""
    conn = await common.pg_connect(url)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def double_redemptions(url: str, org_id: int) -> tuple[int, int]:
    """(codes used beyond max_uses + vouchers with several redemptions, redemption rows)."""
    conn = await common.pg_connect(url)
    try:
        over = await conn.fetchval(
            "SELECT count(*) FROM vouchers WHERE org_id = $1 AND uses > max_uses", org_id
        )
        repeated = await conn.fetchval(
            "SELECT count(*) FROM (SELECT voucher_id FROM redemptions WHERE org_id = $1 "
            "GROUP BY voucher_id HAVING count(*) > 1) AS twice",
            org_id,
        )
        rows = await conn.fetchval("SELECT count(*) FROM redemptions WHERE org_id = $1", org_id)
    finally:
        await conn.close()
    return int(over) + int(repeated), int(rows)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((_loadgen.HOST, 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(url: str, workers: int) -> Iterator[int]:
    """`popdrop serve` on a free port, ready (/readyz) before the body runs."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="popdrop-bench-") as tmp:
        env = common.server_env(url, tmp)
        command = [common.POPDROP_BIN, "serve", "--port", str(port)]
        command += ["--workers", str(workers), "--no-access-log"]
        with open(Path(tmp) / "server.log", "w+") as log:
            proc = subprocess.Popen(command, env=env, cwd=tmp, stdout=log, stderr=log)
            try:
                wait_ready(port, proc, log)
                yield port
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def wait_ready(port: int, proc: subprocess.Popen[bytes], log: object, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://{_loadgen.HOST}:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    log.seek(0)  # type: ignore[attr-defined]
    raise SystemExit(f"server did not become ready:\n{log.read()}")  # type: ignore[attr-defined]


def http_phase(
    port: int, seeded: Seeded, clients: int, warmup: float, duration: float
) -> _loadgen.LoadResult:
    path = "/api/v1/vouchers/redeem"
    requests = [
        _loadgen.post_json(port, path, json.dumps({"code": code}).encode(), seeded.token)
        for code in seeded.codes
    ]
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        job = pool.submit(_loadgen.run, port, requests, clients, warmup, duration)
        return job.result()


def pgbench(url: str, seeded: Seeded, clients: int, seconds: float, script: Path) -> float:
    """Transactions per second (without connection time) of the redemption script."""
    low, high = seeded.limit_ids
    variables = {**PGBENCH_VARIABLES, "org": seeded.limit_org, "lo": low, "hi": high}
    return run_pgbench(url, clients, seconds, script, variables)


def run_pgbench(
    url: str, clients: int, seconds: float, script: Path, variables: dict[str, Any]
) -> float:
    """Transactions per second (without connection time) of `script` with `variables`."""
    parts = common.libpq_url(url)
    command = [PGBENCH, "-n", "-M", "prepared", "-j", "2", "-c", str(clients)]
    command += ["-T", str(max(1, round(seconds))), "-f", str(script)]
    for name, value in variables.items():
        command += ["-D", f"{name}={value}"]
    command += ["-h", parts.host or "127.0.0.1", "-p", str(parts.port or 5432)]
    command += ["-U", parts.username or "postgres", parts.database or "postgres"]
    env = {**os.environ, **({"PGPASSWORD": parts.password} if parts.password else {})}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60)
    found = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    if done.returncode != 0 or found is None or (failed and int(failed.group(1))):
        raise SystemExit(f"pgbench failed:\n{done.stdout}\n{done.stderr}")
    return float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--database-url", help=f"default: {common.DEFAULT_PG_URL}")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="server processes (2 beat 1)")
    parser.add_argument("--duration", type=float, help="measured seconds (20; quick 8)")
    parser.add_argument("--codes", type=int, help="codes to redeem (60000; quick 25000)")
    args = parser.parse_args()
    url = common.pg_url(args.database_url)
    duration = args.duration or (8.0 if args.quick else 20.0)
    warmup = 2.0 if args.quick else 3.0
    codes = args.codes or (25_000 if args.quick else 60_000)

    started = time.monotonic()
    seeded = asyncio.run(seed(url, codes))
    print(f"seeded {codes} codes + {LIMIT_CODES} limit codes in {time.monotonic() - started:.1f}s")

    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before measuring: {load_avg} (other work on the machine skews figures)")
    asyncio.run(checkpoint(url))
    with server(url, args.workers) as port:
        load = http_phase(port, seeded, args.clients, warmup, duration)
    doubles, rows = asyncio.run(double_redemptions(url, seeded.app_org))

    with tempfile.TemporaryDirectory(prefix="popdrop-pgbench-") as tmp:
        script = Path(tmp) / "redeem.sql"
        script.write_text(PGBENCH_SCRIPT)
        asyncio.run(checkpoint(url))
        pgbench(url, seeded, args.clients, warmup, script)  # warm-up, not measured
        limit = pgbench(url, seeded, args.clients, duration, script)

    rate = load.rate
    ratio = rate / limit if limit else 0.0
    ok = load.statuses.get(200, 0)
    server_errors = sum(n for status, n in load.statuses.items() if status >= 500)
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(load.statuses.items()))
    print(f"clients {args.clients}, server workers {args.workers}, measured {load.elapsed:.1f}s")
    print(
        f"HTTP redeem     {rate:9.0f} /s   p50 {load.percentile_ms(0.5):.1f} ms, "
        f"p99 {load.percentile_ms(0.99):.1f} ms"
    )
    print(f"pgbench limit   {limit:9.0f} /s   (same SQL, -M prepared -j 2)")
    print(f"ratio           {ratio:9.2f}     (goal >= 0.50)")
    load_end = common.load_average()  # os.getloadavg() at the end of the run
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in load_end)}")
    print(f"answers         {statuses}; connection errors {load.errors}")
    print(f"double redemptions {doubles}; 200 answers {ok} vs redemption rows {rows}")
    if load.exhausted:
        print("note: every code was redeemed before the time was up; use more --codes")
    common.emit(
        {
            "bench": "redeem",
            "rate_per_s": round(rate, 1),
            "limit_per_s": round(limit, 1),
            "ratio": round(ratio, 3),
            "p50_ms": round(load.percentile_ms(0.5), 2),
            "p99_ms": round(load.percentile_ms(0.99), 2),
            "double_redemptions": doubles,
            "codes": codes,
            "clients": args.clients,
            "workers": args.workers,
            "server_errors": server_errors,
            "seconds": round(load.elapsed, 2),
            "load_avg": load_end,
        }
    )
    failed = doubles > 0 or server_errors > 0 or load.errors > 0 or ok != rows
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
