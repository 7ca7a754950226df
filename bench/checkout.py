"""Checkout under contention over HTTP on PostgreSQL, against pgbench on the same SQL.

1. Seed (service layer): a published event with one lane, one product whose variant
   "hot" has `--units` in stock (the contention), a variant "limit" with a huge stock
   (for pgbench, so every one of its buyers succeeds) and a "warm-up" variant; a token
   with `holds:write` and `orders:write`.
2. Serve with `popdrop serve`; a load-generator process (bench/_flows.py) runs
   `--buyers` buyers over `--clients` keep-alive connections, each buyer in sequence:
   `POST /api/v1/holds` → `POST /api/v1/orders` (Idempotency-Key) → payment confirmation:
   - `--payment stripe` (default; the online path): the order is placed with
     `payment_method: stripe`, `POST /orders/{id}/pay` creates a Checkout Session at the
     Stripe sandbox (`popdrop.commerce.stripe_sandbox`, its own process on loopback,
     reached through the official `stripe` library as in production), then the load
     generator delivers the signed `checkout.session.completed` event Stripe would send
     (secret = POPDROP_STRIPE_WEBHOOK_SECRETS) to `POST /api/v1/payments/stripe/webhook`:
     the webhook is what moves the order to paid and the held unit to sold.
   - `--payment lane` (pay at pickup): the order is placed `pay_at_pickup` and staff
     mark it paid, `POST /orders/{id}/mark-paid` (Idempotency-Key).
   A warm-up of buyers on the warm-up variant comes first. Buyers who come after the
   units are gone get 409 `sold_out` at the hold and stop.
3. Check the database: stock sold == units and held == 0; paid orders == units; every
   paid order has its line and its converted hold (units sold == units in paid orders);
   no order paid twice. Any of these off, or any 5xx, fails the bench (exit 1).
4. The limit: pgbench runs the statements the service sends for one successful buyer's
   hold + order + payment (captured with `log_statement = all` in a dry run; see "the
   pgbench limit" below) on the "limit" variant's stock row (one hot row, like the
   app's), with the same client count, `-M prepared -j 2`; one pgbench transaction =
   one buyer. A script that no longer fits the schema is reported (limit 0), not fatal.

Also printed: each step's p50/p99 and the CPU the server processes spent per paid order
(from /proc, so the machine's other load does not count).

Rate = paid orders / (first hold sent → last payment confirmed). Goal (DESIGN.md):
rate >= 0.4 x the pgbench limit, 0 oversold. Speed never fails the bench.
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
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import get_context
from pathlib import Path

from sqlalchemy.engine import make_url

import _common as common
import _flows
from popdrop.core.db import Database
from popdrop.core.migrate import upgrade
from popdrop.events import service as events
from popdrop.events.schemas import EventCreate, LaneCreate
from popdrop.inventory import service as inventory
from popdrop.inventory.schemas import ProductCreate, StockSet
from redeem import PGBENCH, free_port, server

SANDBOX_KEY = "sk_test_popdrop_bench"
WEBHOOK_SECRET = "whsec_popdrop_bench_webhook_secret"
LIMIT_STOCK = 10_000_000  # the most StockSet takes; pgbench sells far fewer
PRICE_MINOR = 12_000


@dataclass(frozen=True)
class Seeded:
    token: str
    org_id: int
    event_id: int
    lane_id: int
    variant_id: int
    stock_id: int
    limit_variant_id: int
    limit_stock_id: int
    warmup_variant_id: int
    product_id: int
    window_end: str  # the event's end: how long pay-at-pickup keeps the units


async def seed(url: str, units: int, warmup: int) -> Seeded:
    await common.reset_postgres(url)
    await upgrade(url)
    db = Database(url, pool_size=2, max_overflow=0)
    now = common.now()
    try:
        async with db.transaction() as session:
            owner = await common.seed_org(session, "bench-checkout")
            token = await common.seed_token(
                session, owner.org_id, frozenset({"holds:write", "orders:write"})
            )
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
                ProductCreate(
                    title="Sneaker", price_minor=PRICE_MINOR, variants=["hot", "limit", "warm-up"]
                ),
            )
            hot, limit, warm = (v.id for v in product.variants)
            for variant, total in ((hot, units), (limit, LIMIT_STOCK), (warm, warmup)):
                await inventory.set_stock(
                    session,
                    owner,
                    StockSet(variant_id=variant, lane_id=lane.id, total=total),
                    now=now,
                )
    finally:
        await db.dispose()
    conn = await common.pg_connect(url)
    try:
        stock_of = dict(
            await conn.fetch(
                "SELECT variant_id, id FROM stock WHERE variant_id = ANY($1)", [hot, limit]
            )
        )
    finally:
        await conn.close()
    return Seeded(
        token, owner.org_id, event.id, lane.id, hot, stock_of[hot], limit, stock_of[limit], warm,
        product.id, event.ends_at.isoformat(),
    )  # fmt: skip


@contextmanager
def stripe_sandbox() -> Iterator[str]:
    """The Stripe sandbox in its own process on loopback; its API base."""
    port = free_port()
    command = [str(common.ROOT / ".venv/bin/python"), "-m", "popdrop.commerce.stripe_sandbox"]
    command += ["--port", str(port), "--secret", WEBHOOK_SECRET, "--api-key", SANDBOX_KEY]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        why = log.read()
                        raise SystemExit(f"the Stripe sandbox did not start:\n{why}") from None
                    time.sleep(0.1)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def spec_of(seeded: Seeded, payment: str, variant_id: int, prefix: str) -> _flows.CheckoutSpec:
    return _flows.CheckoutSpec(
        token=seeded.token,
        variant_id=variant_id,
        lane_id=seeded.lane_id,
        org_id=seeded.org_id,
        payment=payment,
        webhook_secret=WEBHOOK_SECRET,
        key_prefix=prefix,
    )


def process_cpu_seconds(marker: str) -> float:
    """CPU seconds (user + system) used so far by the processes whose command line holds
    `marker`, and by their descendants (Linux /proc): here the server's master and its
    workers, so the figure does not move with whatever else the machine runs."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    roots: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                command = cmd.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / tick
        if marker in command:
            roots.add(pid)
    total = 0.0
    for pid in used:
        walk = pid
        while walk > 1 and walk not in roots:
            walk = parents.get(walk, 0)
        if walk in roots:
            total += used[pid]
    return total


def http_phase(
    url: str, seeded: Seeded, payment: str, buyers: int, warmup: int, clients: int, workers: int
) -> tuple[_flows.FlowResult, _flows.FlowResult, float]:
    """(warm-up, measured) results of the buyers over HTTP, and the CPU seconds the
    server processes (`popdrop serve`, all workers) used during the measured part."""
    with contextmanager_for(payment) as api_base:
        if api_base:
            os.environ["POPDROP_STRIPE_API_BASE"] = api_base
            os.environ["POPDROP_STRIPE_SECRET_KEY"] = SANDBOX_KEY
        os.environ["POPDROP_STRIPE_WEBHOOK_SECRETS"] = WEBHOOK_SECRET
        with (
            server(url, workers) as port,
            ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool,
        ):
            warm_spec = spec_of(seeded, payment, seeded.warmup_variant_id, "warm")
            warm = pool.submit(_flows.run, port, warm_spec, warmup, clients).result()
            spec = spec_of(seeded, payment, seeded.variant_id, "buyer")
            marker = f"serve --port {port} "
            cpu_before = process_cpu_seconds(marker)
            measured = pool.submit(_flows.run, port, spec, buyers, clients).result()
            cpu = process_cpu_seconds(marker) - cpu_before
    return warm, measured, cpu


@contextmanager
def contextmanager_for(payment: str) -> Iterator[str | None]:
    if payment == _flows.STRIPE:
        with stripe_sandbox() as api_base:
            yield api_base
    else:
        yield None


# ---------------------------------------------------------------- the pgbench limit

# What the service sends on PostgreSQL for one buyer who gets a unit and pays, as of
# commit 9e7b75f (captured with `ALTER DATABASE popdrop_bench_checkout SET log_statement
# = 'all'` around one warmed-up buyer of each payment path and read back from the server
# log; token and hold-target lookups are cached in the server and not sent; the worker
# tick's own statements are not the buyer's). When the order service changes its SQL,
# capture again the same way and update these scripts: the ratio is only fair if they match.
# Statements, their order and their transactions are the app's; the app's bound values
# become pgbench variables (ids from RETURNING … \gset, random keys) or now().
# Differences: the app computes timestamps in Python (here now()); unique texts (keys,
# short code, session and event ids) come from a random number (`:key`); the claim
# INSERT also returns `claimed_at`, which the app knows already, for the fenced UPDATE.
_HOLD_COLS = (
    "holds.id, holds.org_id, holds.event_id, holds.stock_id, holds.variant_id, holds.lane_id, "
    "holds.slot_id, holds.qty, holds.contact_ref, holds.status, holds.created_at, "
    "holds.expires_at, holds.renewals, holds.ended_at, variants.id AS id_1, variants.org_id AS "
    "org_id_1, variants.product_id, variants.name, variants.sku, products.id AS id_2, "
    "products.org_id AS org_id_2, products.event_id AS event_id_1, products.title, "
    "products.highlights, products.image_url, products.price_minor, products.currency, "
    "products.limit_per_contact, products.unit_cost_minor, products.margin_floor_bp, "
    "products.margin_floor_minor, products.is_sample"
)
_EVENT_COLS = (
    "events.id, events.org_id, events.slug, events.title, events.description, "
    "events.venue_name, events.venue_address, events.latitude, events.longitude, "
    "events.timezone, events.starts_at, events.ends_at, events.opens_at, events.status, "
    "events.hold_ttl_seconds, events.max_hold_renewals, events.created_at"
)
_RULE_COLS = (
    "price_rules.id, price_rules.org_id, price_rules.event_id, price_rules.name, "
    "price_rules.kind, price_rules.params, price_rules.stacking, price_rules.applies_to, "
    "price_rules.priority, price_rules.budget_minor, price_rules.budget_spent_minor, "
    "price_rules.valid_from, price_rules.valid_until, price_rules.active"
)
_ORDER_COLS = (
    "orders.id, orders.org_id, orders.event_id, orders.status, orders.source, "
    "orders.source_ref, orders.lane_id, orders.slot_id, orders.contact_ref, "
    "orders.receipt_email, orders.receipt_phone, orders.currency, orders.subtotal_minor, "
    "orders.discount_minor, orders.total_minor, orders.refunded_minor, orders.breakdown, "
    "orders.codes, orders.payment_method, orders.short_code, orders.pickup_generation, "
    "orders.price_held_until, orders.created_at, orders.created_by, orders.paid_at, "
    "orders.ready_at, orders.picked_up_at, orders.picked_up_by, orders.ended_at, "
    "orders.status_reason, orders.status_message"
)
_LINE_COLS = (
    "order_lines.id, order_lines.org_id, order_lines.order_id, order_lines.hold_id, "
    "order_lines.product_id, order_lines.variant_id, order_lines.bundle_id, order_lines.title, "
    "order_lines.qty, order_lines.unit_price_minor, order_lines.list_minor, "
    "order_lines.discount_minor, order_lines.final_minor, order_lines.unit_cost_minor, "
    "order_lines.refunded_qty"
)
_PAYMENT_COLS = (
    "payments.id, payments.org_id, payments.order_id, payments.provider, payments.provider_ref, "
    "payments.payment_intent, payments.amount_minor, payments.currency, payments.status, "
    "payments.failure_code, payments.failure_message, payments.tender, payments.created_at, "
    "payments.updated_at, payments.actor"
)
_REFUND_COLS = (
    "refunds.id, refunds.org_id, refunds.order_id, refunds.payment_id, refunds.amount_minor, "
    "refunds.reason, refunds.note, refunds.provider_ref, refunds.status, refunds.failure_code, "
    "refunds.created_at, refunds.actor"
)

_HOLD = """\
\\set key random(1, 1000000000000000)
\\set short random(100000000, 999999999)
WITH taken AS (UPDATE stock SET held=(stock.held + 1) WHERE stock.id = :stock \
AND (stock.total - stock.held) - stock.sold >= 1 AND (EXISTS (SELECT events.id FROM events \
WHERE events.id = :event AND events.status IN ('published', 'live') \
AND (events.opens_at IS NULL OR events.opens_at <= now()))) \
RETURNING (stock.total - stock.held) - stock.sold AS anon_14) \
INSERT INTO holds (org_id, event_id, stock_id, variant_id, lane_id, slot_id, qty, contact_ref, \
status, created_at, expires_at, renewals, ended_at) SELECT :org, :event, :stock, :variant, \
:lane, NULL, 1, NULL, 'active', now(), now() + interval '900 seconds', 0, NULL \
WHERE EXISTS (SELECT taken.anon_14 FROM taken) RETURNING holds.id AS hold \\gset
"""


def _claim(suffix: str) -> str:
    return f"""\
BEGIN ISOLATION LEVEL READ COMMITTED;
INSERT INTO idempotency_records (org_id, key, fingerprint, principal, claimed_at) \
VALUES (:org, 'pg-' || :key::text || '-{suffix}', :fingerprint, 'token:1', now()) \
ON CONFLICT DO NOTHING RETURNING idempotency_records.key AS claimed_key, \
idempotency_records.claimed_at AS claimed \\gset
COMMIT;
"""


def _order(method: str) -> str:
    extend = ""
    if method == "pay_at_pickup":  # the units wait for the lane until the window ends
        extend = (
            "UPDATE holds SET expires_at=:window_end::timestamptz WHERE holds.id IN (:hold) "
            "AND holds.status = 'active' AND holds.expires_at < :window_end::timestamptz;\n"
        )
    return (
        _claim("order")
        + f"""\
BEGIN ISOLATION LEVEL READ COMMITTED;
SELECT {_HOLD_COLS}, (SELECT count(siblings.id) AS count_1 FROM variants AS siblings \
WHERE siblings.product_id = products.id) AS anon_1, EXISTS (SELECT order_lines.id \
FROM order_lines WHERE order_lines.hold_id = holds.id) AS anon_2 FROM holds \
JOIN variants ON variants.id = holds.variant_id \
JOIN products ON products.id = variants.product_id WHERE holds.id IN (:hold) \
AND holds.org_id = :org ORDER BY holds.id FOR UPDATE OF holds;
SELECT {_EVENT_COLS}, lanes.id AS id_1, lanes.org_id AS org_id_1, lanes.event_id, lanes.name, \
lanes.pickup_point, time_slots.id AS id_2, time_slots.org_id AS org_id_2, \
time_slots.event_id AS event_id_1, time_slots.label, time_slots.starts_at AS starts_at_1, \
time_slots.ends_at AS ends_at_1, time_slots.capacity, time_slots.taken, \
checkout_policies.event_id AS event_id_2, checkout_policies.org_id AS org_id_3, \
checkout_policies.max_codes_per_order, checkout_policies.pay_online, \
checkout_policies.pay_at_pickup, checkout_policies.code_stacking, \
checkout_policies.code_applies_to FROM events JOIN lanes ON lanes.id = :lane \
LEFT OUTER JOIN time_slots ON false \
LEFT OUTER JOIN checkout_policies ON checkout_policies.event_id = events.id \
WHERE events.id = :event;
SELECT bundles.id, bundles.org_id, bundles.event_id, bundles.title, bundles.price_minor, \
bundles.currency, bundles.active, bundle_components.variant_id, bundle_components.qty \
FROM bundles JOIN bundle_components ON bundle_components.bundle_id = bundles.id \
WHERE bundles.event_id = :event AND bundles.active IS true AND bundles.currency = 'EUR' \
ORDER BY bundles.id;
SELECT {_RULE_COLS} FROM price_rules WHERE price_rules.event_id = :event \
AND price_rules.org_id = :org AND price_rules.active IS true \
AND (price_rules.valid_from IS NULL OR price_rules.valid_from <= now()) \
AND (price_rules.valid_until IS NULL OR price_rules.valid_until > now()) ORDER BY price_rules.id;
INSERT INTO orders (org_id, event_id, status, source, source_ref, lane_id, slot_id, \
contact_ref, receipt_email, receipt_phone, currency, subtotal_minor, discount_minor, \
total_minor, refunded_minor, breakdown, codes, payment_method, short_code, pickup_generation, \
price_held_until, created_at, created_by, paid_at, ready_at, picked_up_at, picked_up_by, \
ended_at, status_reason, status_message) VALUES (:org, :event, 'pending', 'api', NULL, :lane, \
NULL, 'b' || :key::text, NULL, NULL, 'EUR', {PRICE_MINOR}, 0, {PRICE_MINOR}, 0, :breakdown, \
'[]', '{method}', 'PG' || :short::text, 1, now() + interval '900 seconds', now(), :actor, NULL, \
NULL, NULL, NULL, NULL, NULL, NULL) RETURNING orders.id AS order_id \\gset
INSERT INTO order_lines (org_id, order_id, hold_id, product_id, variant_id, bundle_id, title, \
qty, unit_price_minor, list_minor, discount_minor, final_minor, unit_cost_minor, refunded_qty) \
VALUES (:org, :order_id, :hold, :product, :variant, NULL, 'Sneaker (hot)', 1, {PRICE_MINOR}, \
{PRICE_MINOR}, 0, {PRICE_MINOR}, NULL, 0) RETURNING order_lines.id;
{extend}"""
        + _store_answer(201, "order", "order_body")
    )


def _store_answer(status: int, suffix: str, body: str) -> str:
    return f"""\
UPDATE idempotency_records SET status_code={status}, body=:{body} \
WHERE idempotency_records.org_id = :org \
AND idempotency_records.key = 'pg-' || :key::text || '-{suffix}' \
AND idempotency_records.status_code IS NULL \
AND idempotency_records.claimed_at IN (:claimed::timestamptz) RETURNING idempotency_records.key;
COMMIT;
"""


# What `orders.order_out` reads to answer with an order it did not build itself.
_READ_ANSWER = f"""\
SELECT {_LINE_COLS} FROM order_lines WHERE order_lines.order_id IN (:order_id) \
ORDER BY order_lines.id;
SELECT {_PAYMENT_COLS} FROM payments WHERE payments.order_id IN (:order_id) \
ORDER BY payments.id;
SELECT {_REFUND_COLS} FROM refunds WHERE refunds.order_id IN (:order_id) ORDER BY refunds.id;
"""

# The order's holds, locked, then held → sold (settlement.take_units →
# units.units_of_order, units.convert_active).
_LOCK_UNITS = """\
SELECT holds.id, holds.stock_id, holds.lane_id, holds.slot_id, holds.qty, holds.status \
FROM holds JOIN order_lines ON order_lines.hold_id = holds.id \
WHERE order_lines.order_id = :order_id ORDER BY holds.id FOR UPDATE OF holds;
UPDATE holds SET status='converted', ended_at=now() WHERE holds.id = :hold \
AND holds.status = 'active' RETURNING holds.id;
"""
_SELL = "UPDATE stock SET held=(stock.held - 1), sold=(stock.sold + 1) WHERE stock.id = :stock;\n"
_PAID = "UPDATE orders SET status='paid', paid_at=now() WHERE orders.id = :order_id;\n"

# The webhook defers the hot stock UPDATE to just before its COMMIT (core.db late writes).
_PAY_STRIPE = f"""\
BEGIN ISOLATION LEVEL READ COMMITTED;
SELECT {_ORDER_COLS}, (SELECT count(payments.id) AS count_1 FROM payments \
WHERE payments.order_id = orders.id) AS anon_1 FROM orders WHERE orders.id = :order_id \
AND orders.org_id = :org;
SELECT {_LINE_COLS} FROM order_lines WHERE order_lines.order_id = :order_id \
ORDER BY order_lines.id;
ROLLBACK;
BEGIN ISOLATION LEVEL READ COMMITTED;
INSERT INTO payments (org_id, order_id, provider, provider_ref, payment_intent, amount_minor, \
currency, status, created_at, updated_at, actor) VALUES (:org, :order_id, 'stripe', \
'cs_test_pg' || :key::text, NULL, {PRICE_MINOR}, 'EUR', 'pending', now(), now(), :actor) \
ON CONFLICT DO NOTHING RETURNING payments.id AS payment_id \\gset
COMMIT;
BEGIN ISOLATION LEVEL READ COMMITTED;
INSERT INTO provider_events (provider, event_id, type, org_id, object_ref, \
provider_created_at, received_at, outcome) VALUES ('stripe', 'evt_pg' || :key::text, \
'checkout.session.completed', NULL, 'cs_test_pg' || :key::text, now(), now(), '') \
ON CONFLICT DO NOTHING RETURNING provider_events.id AS event_row \\gset
SELECT {_ORDER_COLS} FROM orders WHERE orders.id = :order_id AND orders.org_id = :org \
FOR UPDATE;
SELECT {_PAYMENT_COLS} FROM payments WHERE payments.provider = 'stripe' \
AND payments.provider_ref = 'cs_test_pg' || :key::text FOR UPDATE;
UPDATE payments SET payment_intent='pi_pg' || :key::text, status='succeeded', updated_at=now() \
WHERE payments.id = :payment_id;
{_LOCK_UNITS}{_PAID}\
UPDATE provider_events SET org_id=:org, outcome='paid' WHERE provider_events.id = :event_row;
{_SELL}\
COMMIT;
"""

# Mark-paid at the lane updates the stock row where it sells, then writes the rest.
_PAY_LANE = (
    _claim("paid")
    + f"""\
BEGIN ISOLATION LEVEL READ COMMITTED;
SELECT {_ORDER_COLS} FROM orders WHERE orders.id = :order_id AND orders.org_id = :org \
FOR UPDATE;
{_LOCK_UNITS}{_SELL}{_PAID}\
INSERT INTO payments (org_id, order_id, provider, provider_ref, payment_intent, amount_minor, \
currency, status, failure_code, failure_message, tender, created_at, updated_at, actor) \
VALUES (:org, :order_id, 'pay_at_pickup', NULL, NULL, {PRICE_MINOR}, 'EUR', 'succeeded', NULL, \
NULL, 'card', now(), now(), :actor) RETURNING payments.id;
"""
    + _READ_ANSWER
    + _store_answer(200, "paid", "paid_body")
)


def pgbench_script(payment: str) -> str:
    if payment == _flows.STRIPE:
        return _HOLD + _order("stripe") + _PAY_STRIPE
    return _HOLD + _order("pay_at_pickup") + _PAY_LANE


def _answer_bodies(seeded: Seeded, method: str) -> dict[str, str]:
    """Texts of the app's size and shape for the order's breakdown and the stored answers."""
    line = {
        "key": "h1", "title": "Sneaker (hot)", "qty": 1, "unit_price_minor": PRICE_MINOR,
        "list_minor": PRICE_MINOR, "adjustments": [], "final_minor": PRICE_MINOR,
    }  # fmt: skip
    breakdown = {
        "currency": "EUR", "lines": [line], "subtotal_minor": PRICE_MINOR, "discount_minor": 0,
        "total_minor": PRICE_MINOR, "capped_minor": 0, "applied_codes": [],
        "refused_codes": [], "rule_spend": {},
    }  # fmt: skip
    stamp = common.now().isoformat().replace("+00:00", "Z")
    order = {
        "id": 1, "event_id": seeded.event_id, "status": "pending", "source": "api",
        "source_ref": None, "lane_id": seeded.lane_id, "slot_id": None, "contact_ref": "b1",
        "receipt_email": None, "receipt_phone": None, "currency": "EUR",
        "subtotal_minor": PRICE_MINOR, "discount_minor": 0, "total_minor": PRICE_MINOR,
        "refunded_minor": 0, "codes": [], "payment_method": method,
        "short_code": "ABCD-EFGH-J", "price_held_until": stamp, "created_at": stamp,
        "paid_at": None, "ready_at": None, "picked_up_at": None, "ended_at": None,
        "status_reason": None, "status_message": None,
        "lines": [{
            "id": 1, "hold_id": 1, "product_id": 1, "variant_id": seeded.variant_id,
            "bundle_id": None, "title": "Sneaker (hot)", "qty": 1,
            "unit_price_minor": PRICE_MINOR, "list_minor": PRICE_MINOR, "discount_minor": 0,
            "final_minor": PRICE_MINOR, "refunded_qty": 0,
        }],
        "payments": [], "refunds": [], "breakdown": breakdown,
    }  # fmt: skip
    payment = {
        "id": 1, "provider": "pay_at_pickup", "provider_ref": None, "payment_intent": None,
        "amount_minor": PRICE_MINOR, "currency": "EUR", "status": "succeeded",
        "failure_code": None, "failure_message": None, "tender": "card",
        "created_at": stamp, "updated_at": stamp,
    }  # fmt: skip
    paid = {**order, "status": "paid", "paid_at": stamp, "payments": [payment]}
    return {
        "breakdown": json.dumps(breakdown),
        "order_body": json.dumps(order),
        "paid_body": json.dumps(paid),
        "fingerprint": "f" * 64,
        "actor": "token:1:bench",
    }


def pgbench(
    url: str, seeded: Seeded, payment: str, clients: int, seconds: float, script: Path
) -> tuple[float, int]:
    """(buyers per second without connection time, buyers done) of the checkout script."""
    parts = common.libpq_url(url)
    command = [PGBENCH, "-n", "-M", "prepared", "-j", "2", "-c", str(clients)]
    command += ["-T", str(max(1, round(seconds))), "-f", str(script)]
    method = "stripe" if payment == _flows.STRIPE else "pay_at_pickup"
    variables: dict[str, object] = {
        **_answer_bodies(seeded, method),
        "org": seeded.org_id,
        "event": seeded.event_id,
        "lane": seeded.lane_id,
        "stock": seeded.limit_stock_id,
        "variant": seeded.limit_variant_id,
        "product": seeded.product_id,
        "window_end": seeded.window_end,
    }
    for name, value in variables.items():
        command += ["-D", f"{name}={value}"]
    command += ["-h", parts.host or "127.0.0.1", "-p", str(parts.port or 5432)]
    command += ["-U", parts.username or "postgres", parts.database or "postgres"]
    env = {**os.environ, **({"PGPASSWORD": parts.password} if parts.password else {})}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60)
    found = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
    processed = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    if done.returncode != 0 or found is None or (failed and int(failed.group(1))):
        raise PgbenchFailed(f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return float(found.group(1)), int(processed.group(1)) if processed else 0


class PgbenchFailed(Exception):
    """The limit could not be measured (most likely the service's SQL changed and the
    scripts above no longer fit the schema): said loudly, but not a correctness failure."""


async def checkpoint(url: str) -> None:
    """Start each phase with a clean checkpoint, so neither pays for the other's writes."""
    conn = await common.pg_connect(url)
    try:
        await conn.execute("ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


@dataclass
class Books:
    """What the database says about the hot variant after the run."""

    total: int
    held: int
    sold: int
    paid_orders: int
    paid_units: int  # order lines' units of the paid orders
    converted_units: int  # units of converted holds
    paid_without_units: int  # paid orders missing their line or their converted hold
    paid_twice: int  # orders with more than one succeeded payment
    active_holds: int


async def books(url: str, seeded: Seeded) -> Books:
    conn = await common.pg_connect(url)
    try:
        total, held, sold = await conn.fetchrow(
            "SELECT total, held, sold FROM stock WHERE id = $1", seeded.stock_id
        )
        paid_orders, paid_units = await conn.fetchrow(
            "SELECT count(DISTINCT o.id), coalesce(sum(l.qty), 0) FROM orders o "
            "JOIN order_lines l ON l.order_id = o.id "
            "WHERE l.variant_id = $1 AND o.status IN ('paid', 'ready', 'picked_up')",
            seeded.variant_id,
        )
        converted = await conn.fetchval(
            "SELECT coalesce(sum(qty), 0) FROM holds WHERE variant_id = $1 "
            "AND status = 'converted'",
            seeded.variant_id,
        )
        # Every order of the event that is paid must own a line on a converted hold.
        without = await conn.fetchval(
            "SELECT count(*) FROM orders o WHERE o.event_id = $1 "
            "AND o.status IN ('paid', 'ready', 'picked_up') AND NOT EXISTS ("
            "SELECT 1 FROM order_lines l JOIN holds h ON h.id = l.hold_id "
            "WHERE l.order_id = o.id AND h.status = 'converted')",
            seeded.event_id,
        )
        twice = await conn.fetchval(
            "SELECT count(*) FROM (SELECT order_id FROM payments WHERE status = 'succeeded' "
            "AND org_id = $1 GROUP BY order_id HAVING count(*) > 1) AS doubled",
            seeded.org_id,
        )
        active = await conn.fetchval(
            "SELECT count(*) FROM holds WHERE variant_id = $1 AND status = 'active'",
            seeded.variant_id,
        )
    finally:
        await conn.close()
    return Books(
        int(total), int(held), int(sold), int(paid_orders), int(paid_units), int(converted),
        int(without), int(twice), int(active),
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument(
        "--database-url", help="default: the bench URL with database popdrop_bench_checkout"
    )
    parser.add_argument("--payment", choices=[_flows.STRIPE, _flows.LANE], default=_flows.STRIPE)
    parser.add_argument("--units", type=int, help="units of the hot variant (1000; quick 100)")
    parser.add_argument("--buyers", type=int, help="buyers (5000; quick 500)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="server processes")
    parser.add_argument(
        "--pgbench-seconds", type=float, help="pgbench's measured run (10; quick 3)"
    )
    args = parser.parse_args()
    units = args.units or (100 if args.quick else 1_000)
    buyers = args.buyers or (500 if args.quick else 5_000)
    warmup = 64 if args.quick else 300
    seconds = args.pgbench_seconds or (3.0 if args.quick else 10.0)
    # Its own database: benches may run side by side, and each drops its schema.
    url = common.pg_url(args.database_url)
    if make_url(url).database == "popdrop_bench":
        url = make_url(url).set(database="popdrop_bench_checkout").render_as_string(False)

    started = time.monotonic()
    seeded = asyncio.run(seed(url, units, warmup))
    print(f"seeded in {time.monotonic() - started:.1f}s; payment: {args.payment}")
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before measuring: {load_avg} (other work on the machine skews figures)")

    asyncio.run(checkpoint(url))
    warm, flow, cpu = http_phase(
        url, seeded, args.payment, buyers, warmup, args.clients, args.workers
    )
    ledger = asyncio.run(books(url, seeded))

    with tempfile.TemporaryDirectory(prefix="popdrop-pgbench-") as tmp:
        script = Path(tmp) / "checkout.sql"
        script.write_text(pgbench_script(args.payment))
        asyncio.run(checkpoint(url))
        try:
            pgbench(url, seeded, args.payment, args.clients, 2.0, script)  # warm-up
            limit, limit_buyers = pgbench(url, seeded, args.payment, args.clients, seconds, script)
        except PgbenchFailed as failure:
            print(f"PGBENCH FAILED, no limit this run (update the scripts?):\n{failure}")
            limit, limit_buyers = 0.0, 0

    paid = flow.paid
    selling = (max(flow.paid_at) - flow.started) if paid else float("inf")
    rate = paid / selling if paid else 0.0
    ratio = rate / limit if limit else 0.0
    p50, p99 = flow.percentile_ms(0.5), flow.percentile_ms(0.99)
    oversold = (
        max(ledger.sold + ledger.held - ledger.total, 0)
        + max(ledger.paid_units - ledger.total, 0)
        + max(ledger.sold - ledger.paid_units, 0)
        + ledger.paid_without_units
        + ledger.paid_twice
    )
    server_errors = flow.server_errors + warm.server_errors
    steps = ", ".join(f"{k}: {n}" for k, n in sorted(flow.statuses.items()))
    ends = ", ".join(f"{k}: {n}" for k, n in flow.outcomes.most_common())
    print(f"units {units}, buyers {buyers}, clients {args.clients}, workers {args.workers}")
    print(f"answers         {steps}; connection errors {flow.errors}")
    print(f"buyers ended    {ends}")
    each = ", ".join(
        f"{step} {flow.percentile_ms(0.5, step):.0f}/{flow.percentile_ms(0.99, step):.0f}"
        for step in sorted(flow.steps)
    )
    print(f"per answer      p50/p99 ms: {each}")
    print(f"paid orders     {paid}  in {selling:.2f} s (first hold sent → last payment confirmed)")
    print(f"HTTP checkout   {rate:9.0f} paid/s   p50 {p50:.1f} ms, p99 {p99:.1f} ms (hold → paid)")
    print(
        f"pgbench limit   {limit:9.0f} buyers/s (same SQL, {limit_buyers} buyers, "
        f"-M prepared -j 2 -c {args.clients})"
    )
    print(f"ratio           {ratio:9.2f}     (goal >= 0.40)")
    if paid:
        print(
            f"server CPU      {cpu * 1000 / paid:9.1f} ms per paid order (popdrop serve, all "
            f"workers; sold-out buyers included; {cpu:.1f} s in all)"
        )
    print(
        f"stock           total {ledger.total}, sold {ledger.sold}, held {ledger.held}; "
        f"paid orders {ledger.paid_orders} with {ledger.paid_units} units; converted holds "
        f"{ledger.converted_units}; paid without units {ledger.paid_without_units}; "
        f"paid twice {ledger.paid_twice}; active holds {ledger.active_holds}"
    )
    print(f"oversold        {oversold}")
    if warm.paid != warmup:
        print(f"note: warm-up paid {warm.paid} of {warmup}: {dict(warm.outcomes)}")
    common.emit(
        {
            "bench": "checkout",
            "payment": args.payment,
            "rate_per_s": round(rate, 1),
            "limit_per_s": round(limit, 1),
            "ratio": round(ratio, 3),
            "p50_ms": round(p50, 2),
            "p99_ms": round(p99, 2),
            "oversold": oversold,
            "paid": paid,
            "units": units,
            "buyers": buyers,
            "clients": args.clients,
            "workers": args.workers,
            "server_errors": server_errors,
            "seconds": round(selling, 2),
            "server_cpu_ms_per_paid": round(cpu * 1000 / paid, 1) if paid else None,
        }
    )
    failed = (
        oversold > 0
        or paid != units
        or ledger.paid_orders != units
        or ledger.sold != units
        or ledger.held != 0
        or ledger.converted_units != units
        or server_errors > 0
        or flow.errors > 0
    )
    return 1 if failed else 0


if __name__ == "__main__":
    begun = time.monotonic()
    code = main()
    print(f"({time.monotonic() - begun:.0f} s)", file=sys.stderr)
    sys.exit(code)
