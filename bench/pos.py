"""POS sales ingested over HTTP (Standard Webhooks, signature checked) on PostgreSQL,
against pgbench running the same statements in the same run.

1. Seed (service layer): an org, an event, a partner and a Standard Webhooks connection.
2. Serve with `popdrop serve`; from C keep-alive connections (a separate load-generator
   process) POST signed `pos.sale.v1` sales (two lines, no code), each with its own event
   id and external id; one delivery in 20 repeats an earlier one (a provider's retry),
   which must be answered 200 and applied once. Rate = deliveries answered per second
   after a warm-up, signature check, JSON parse, contract validation and the transaction
   included.
3. Check the database: one sale (with its two lines) and one event row per distinct
   delivery sent; no external id twice; no 5xx.
4. The limit: pgbench drives the statements one ingest sends on PostgreSQL (the
   connection read, then BEGIN; advisory lock; claim the event; insert the sale and its
   two lines; attribution's look-up of stored touches; the waiting-refund look-up; the
   event's outcome; COMMIT) with the same client count and duration, `-M prepared -j 2`.

Goal: none fixed yet (DESIGN.md asks each benchmark to print its ratio); exit 1 only on a
correctness failure (a lost or doubled sale, a 5xx, a connection error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import get_context
from pathlib import Path

import _common as common
import _loadgen
from popdrop.core import sealing
from popdrop.core.db import Database
from popdrop.core.migrate import upgrade
from popdrop.events.models import Event, Partner
from popdrop.partners import service as partners
from popdrop.partners.lifecycle import PosProvider
from popdrop.partners.signatures import sign_standard
from redeem import checkpoint, run_pgbench, server

PGBENCH = "/usr/bin/pgbench"
DUPLICATE_EVERY = 20

# What one successful ingest sends on PostgreSQL (read with SQLAlchemy echo): the
# connection row (a reader session), then one transaction. Hashes and timestamps are
# computed by the app in Python; here they are constants or now().
PGBENCH_SCRIPT = """\
\\set n random(1, 1000000000000000)
SELECT id, org_id, partner_id, event_id, provider, account_id, location_id, secrets_sealed, \
notification_url, created_at, disabled_at FROM pos_connections WHERE id = :conn;
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended('pg-' || :n, :conn));
INSERT INTO pos_events (org_id, connection_id, provider_event_id, topic, outcome, received_at) \
VALUES (:org, :conn, 'pe-' || :n, 'pos.sale', 'applying', now()) \
ON CONFLICT (connection_id, provider_event_id) DO NOTHING RETURNING pos_events.id \\gset ev_
INSERT INTO pos_sales (org_id, connection_id, partner_id, event_id, provider, external_id, \
account, location, device, occurred_at, received_at, currency, subtotal_minor, discount_minor, \
tax_minor, total_minor, refunded_minor, payment_methods, code_count, customer_hash, status) \
VALUES (:org, :conn, :partner, :event, 'bench-till', 'pg-' || :n, 'acct-1', 'loc-1', 'till-1', \
now(), now(), 'EUR', 6500, 500, 0, 6000, 0, 'card', 0, NULL, 'active') \
ON CONFLICT (connection_id, external_id) DO NOTHING RETURNING pos_sales.id \\gset sale_
INSERT INTO pos_sale_lines (sale_id, sku, quantity, unit_price_minor, discount_minor) \
VALUES (:sale_id, 'TEE-M', 2, 2500, 500), (:sale_id, 'CAP', 1, 1500, 0);
SELECT id, touch FROM sale_touches WHERE org_id = :org AND sale_kind = 'pos_sale' \
AND sale_id = :sale_id ORDER BY CASE WHEN touch = 'first' THEN 0 ELSE 1 END;
SELECT id, amount_minor FROM pos_refunds WHERE connection_id = :conn \
AND refunds_external_id = 'pg-' || :n AND sale_id IS NULL ORDER BY id;
UPDATE pos_events SET outcome = 'sale_recorded' WHERE id = :ev_id;
COMMIT;
"""


@dataclass
class Seeded:
    org_id: int
    partner_id: int
    event_id: int
    connection_id: int
    secret: str
    limit_connection_id: int


async def seed(url: str) -> Seeded:
    await common.reset_postgres(url)
    await upgrade(url)
    sealing.configure(common.SECRET_KEY.encode())
    db = Database(url)
    try:
        async with db.transaction() as session:
            owner = await common.seed_org(session, "bench-pos")
            now = common.now()
            event = Event(
                org_id=owner.org_id,
                slug="bench-pos",
                title="POS bench",
                timezone="UTC",
                starts_at=now,
                ends_at=now + timedelta(days=1),
                created_at=now,
            )
            session.add(event)
            await session.flush()
            partner = Partner(org_id=owner.org_id, event_id=event.id, name="Till", contact_email="")
            session.add(partner)
            await session.flush()
            made, limit = [
                await partners.create_connection(
                    session,
                    owner,
                    partner_id=partner.id,
                    provider=PosProvider.STANDARD,
                    account_id=None,
                    location_id=None,
                    notification_url=None,
                    secret=None,
                    base_url="http://127.0.0.1",
                    now=now,
                )
                for _ in range(2)
            ]
            assert made.secret is not None
            return Seeded(
                owner.org_id,
                partner.id,
                event.id,
                made.connection.id,
                made.secret,
                limit.connection.id,
            )
    finally:
        await db.dispose()


def sale_body(n: int) -> bytes:
    return json.dumps(
        {
            "contract": "pos.sale.v1",
            "source": {"provider": "bench-till", "account": "acct-1", "location": "loc-1"},
            "external_id": f"S-{n}",
            "event_id": f"E-{n}",
            "kind": "sale",
            "occurred_at": common.now().isoformat(),
            "currency": "EUR",
            "lines": [
                {"sku": "TEE-M", "quantity": 2, "unit_price_minor": 2500, "discount_minor": 500},
                {"sku": "CAP", "quantity": 1, "unit_price_minor": 1500},
            ],
            "totals": {"subtotal_minor": 6500, "discount_minor": 500, "total_minor": 6000},
            "payment_methods": ["card"],
        }
    ).encode()


def deliveries(port: int, seeded: Seeded, count: int) -> tuple[list[bytes], list[int]]:
    """Signed requests, and the sale number each carries (a retry repeats an earlier one)."""
    path = f"/pos/webhooks/{seeded.connection_id}"
    stamp = int(time.time())
    requests: list[bytes] = []
    numbers: list[int] = []
    for i in range(count):
        n = i // 2 if i and i % DUPLICATE_EVERY == 0 else i
        body = sale_body(n)
        webhook_id = f"msg_{n}"
        head = (
            f"POST {path} HTTP/1.1\r\n"
            f"Host: {_loadgen.HOST}:{port}\r\n"
            "Content-Type: application/json\r\n"
            f"webhook-id: {webhook_id}\r\n"
            f"webhook-timestamp: {stamp}\r\n"
            f"webhook-signature: {sign_standard(seeded.secret, webhook_id, stamp, body)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        requests.append(head.encode() + body)
        numbers.append(n)
    return requests, numbers


async def stored(url: str, connection_id: int) -> dict[str, int]:
    conn = await common.pg_connect(url)
    try:
        sales = await conn.fetchval(
            "SELECT count(*) FROM pos_sales WHERE connection_id = $1", connection_id
        )
        doubled = await conn.fetchval(
            "SELECT count(*) FROM (SELECT external_id FROM pos_sales WHERE connection_id = $1 "
            "GROUP BY external_id HAVING count(*) > 1) d",
            connection_id,
        )
        lines = await conn.fetchval(
            "SELECT count(*) FROM pos_sale_lines l JOIN pos_sales s ON s.id = l.sale_id "
            "WHERE s.connection_id = $1",
            connection_id,
        )
        events = await conn.fetchval(
            "SELECT count(*) FROM pos_events WHERE connection_id = $1", connection_id
        )
    finally:
        await conn.close()
    return {"sales": sales, "doubled": doubled, "lines": lines, "events": events}


def pgbench(url: str, seeded: Seeded, clients: int, seconds: float, script: Path) -> float:
    variables = {
        "org": seeded.org_id,
        "conn": seeded.limit_connection_id,
        "partner": seeded.partner_id,
        "event": seeded.event_id,
    }
    return run_pgbench(url, clients, seconds, script, variables)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--database-url", help=f"default: {common.DEFAULT_PG_URL}")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="server processes")
    parser.add_argument("--duration", type=float, help="measured seconds (20; quick 8)")
    parser.add_argument("--sales", type=int, help="deliveries prepared (60000; quick 25000)")
    args = parser.parse_args()
    url = common.pg_url(args.database_url)
    duration = args.duration or (8.0 if args.quick else 20.0)
    warmup = 2.0 if args.quick else 3.0
    count = args.sales or (25_000 if args.quick else 60_000)

    seeded = asyncio.run(seed(url))
    asyncio.run(checkpoint(url))
    with server(url, args.workers) as port:
        requests, numbers = deliveries(port, seeded, count)
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            load = pool.submit(_loadgen.run, port, requests, args.clients, warmup, duration)
            result = load.result()
    sent = numbers[: result.sent]
    expected = len(set(sent))
    found = asyncio.run(stored(url, seeded.connection_id))

    with tempfile.TemporaryDirectory(prefix="popdrop-pgbench-") as tmp:
        script = Path(tmp) / "pos.sql"
        script.write_text(PGBENCH_SCRIPT)
        asyncio.run(checkpoint(url))
        pgbench(url, seeded, args.clients, warmup, script)  # warm-up, not measured
        limit = pgbench(url, seeded, args.clients, duration, script)

    rate = result.rate
    ratio = rate / limit if limit else 0.0
    server_errors = sum(n for status, n in result.statuses.items() if status >= 500)
    refused = sum(n for status, n in result.statuses.items() if 400 <= status < 500)
    lost = expected - found["sales"]
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(result.statuses.items()))
    print(f"clients {args.clients}, server workers {args.workers}, measured {result.elapsed:.1f}s")
    print(
        f"HTTP POS ingest {rate:9.0f} /s   p50 {result.percentile_ms(0.5):.1f} ms, "
        f"p99 {result.percentile_ms(0.99):.1f} ms (signed, 1 in {DUPLICATE_EVERY} a retry)"
    )
    print(f"pgbench limit   {limit:9.0f} /s   (same statements, -M prepared -j 2)")
    print(f"ratio           {ratio:9.2f}")
    print(f"answers         {statuses}; connection errors {result.errors}")
    print(
        f"sales {found['sales']} of {expected} distinct sent ({result.sent} deliveries); "
        f"doubled {found['doubled']}; lines {found['lines']}; events {found['events']}"
    )
    if result.exhausted:
        print("note: every prepared delivery was sent before the time was up; use more --sales")
    common.emit(
        {
            "bench": "pos",
            "rate_per_s": round(rate, 1),
            "limit_per_s": round(limit, 1),
            "ratio": round(ratio, 3),
            "p50_ms": round(result.percentile_ms(0.5), 2),
            "p99_ms": round(result.percentile_ms(0.99), 2),
            "deliveries": result.sent,
            "distinct_sales": expected,
            "duplicates": found["doubled"],
            "lost": lost,
            "refused": refused,
            "server_errors": server_errors,
            "clients": args.clients,
            "workers": args.workers,
            "seconds": round(result.elapsed, 2),
        }
    )
    failed = (
        found["doubled"] > 0
        or lost != 0
        or found["events"] != expected
        or found["lines"] != 2 * expected
        or server_errors > 0
        or refused > 0
        or result.errors > 0
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
