"""Web chat: 500 concurrent WebSocket conversations through the default flow, on PostgreSQL.

1. Seed (service layer): an org, a published event with four slots and three products in
   stock, and the shipped "pop-up drop" flow published on it.
2. Serve with `popdrop serve` (uvicorn, `--workers` processes). `--clients` load-generator
   processes open `--conversations` WebSockets to `/ws/chat/bench` between them; each
   conversation is a visitor going through the flow like the widget does: start → menu
   → RSVP a time slot → a slot → email → "Yes, book it" (RSVP + voucher + QR ticket in
   one turn) → then browsing: MENU → See the drop (live carousel) → Back → …
3. Each conversation sends its next turn at a steady pace (`--rate` turns/s offered in
   all, spread over the conversations, each turn sent only after the previous answer),
   so the latency is the server's, not a queue the bench built. Turns answered during the
   warm-up are not measured.
4. Check: no error frames, one confirmed RSVP per booked conversation.

Goals (issue 6): >= 1,000 turns/s and p99 turn latency < 50 ms with 500 conversations.
Each figure is printed with its ratio to the target; the last line is JSON (`turns_per_s`,
`p99_ms`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import get_context
from typing import Any

import _common as common
import _loadgen
from popdrop.chat import flow_store
from popdrop.core.db import Database
from popdrop.core.migrate import upgrade
from popdrop.events import service as events
from popdrop.events.schemas import EventCreate, LaneCreate, SlotCreate
from popdrop.inventory import service as inventory
from popdrop.inventory.schemas import ProductCreate, StockSet
from redeem import checkpoint, server

TARGET_TURNS_PER_S = 1_000
TARGET_P99_MS = 50.0
ORG = "bench"


async def seed(url: str) -> int:
    await common.reset_postgres(url)
    await upgrade(url)
    db = Database(url, pool_size=2, max_overflow=0)
    now = common.now()
    try:
        async with db.transaction() as session:
            owner = await common.seed_org(session, ORG)
            day = now + timedelta(days=2)
            event = await events.create_event(
                session,
                owner,
                EventCreate(
                    slug="chat-drop",
                    title="Bench Pop-up",
                    venue_name="Hall 1",
                    timezone="Europe/Berlin",
                    starts_at=day,
                    ends_at=day + timedelta(hours=8),
                    hold_ttl_seconds=900,
                ),
                now=now,
            )
            await events.set_status(session, owner, event.id, "published")
            for i in range(4):
                await events.add_slot(
                    session,
                    owner,
                    event.id,
                    SlotCreate(
                        label=f"{10 + 2 * i}:00",
                        starts_at=day + timedelta(hours=2 * i),
                        ends_at=day + timedelta(hours=2 * i + 2),
                        capacity=100_000,
                    ),
                )
            lane = await events.add_lane(session, owner, event.id, LaneCreate(name="Door"))
            for title, price in (("Sneaker", 12_900), ("Tote", 1_500), ("Cold brew", 400)):
                product = await inventory.create_product(
                    session,
                    owner,
                    event.id,
                    ProductCreate(title=title, highlights="Bench item", price_minor=price),
                )
                for variant in product.variants:
                    await inventory.set_stock(
                        session,
                        owner,
                        StockSet(variant_id=variant.id, lane_id=lane.id, total=10_000),
                        now=now,
                    )
            await flow_store.publish_default_flow(session, owner.org_id, event.id, now=now)
            return owner.org_id
    finally:
        await db.dispose()


# ---------------------------------------------------------------- the load generator


@dataclass
class ClientResult:
    latencies: list[float] = field(default_factory=list)  # seconds, measured window
    measured_turns: int = 0
    turns: int = 0
    booked: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    failed_connections: int = 0


def _labels(reply: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for message in reply.get("messages", []):
        items = message.get("cards") if message.get("kind") == "carousel" else [message]
        for item in items or []:
            for button in item.get("buttons") or []:
                if button.get("payload"):
                    found.setdefault(button["label"], button["payload"])
    return found


def _next_frame(reply: dict[str, Any], state: dict[str, Any], n: int) -> dict[str, Any]:
    """What a visitor answers to `reply`: book once, then browse the drop."""
    labels = _labels(reply)
    text = " ".join(str(m.get("text", "")) for m in reply.get("messages", []))
    if "Yes, book it" in labels:
        return {"type": "button", "payload": labels["Yes, book it"]}
    if "What email" in text or "does not look like an email" in text:
        return {"type": "text", "text": f"visitor{n}-{os.getpid()}@example.com"}
    slots = [p for label, p in labels.items() if label.endswith("left)")]
    if slots and not state["booked"]:
        return {"type": "button", "payload": random.choice(slots)}
    if not state["booked"] and "RSVP a time slot" in labels:
        return {"type": "button", "payload": labels["RSVP a time slot"]}
    if "See the drop" in labels:
        return {"type": "button", "payload": labels["See the drop"]}
    if "Back" in labels:
        return {"type": "button", "payload": labels["Back"]}
    return {"type": "text", "text": "MENU"}


@dataclass
class Window:
    """Set once every conversation of every client process is connected."""

    go: asyncio.Event
    connected: int = 0
    measure_from: float = 0.0
    until: float = 0.0


async def _conversation(
    port: int, n: int, interval: float, window: Window, result: ClientResult
) -> None:
    import websockets

    url = f"ws://{_loadgen.HOST}:{port}/ws/chat/{ORG}"
    try:
        async with websockets.connect(url, max_size=2**20, open_timeout=120) as ws:
            ready = json.loads(await ws.recv())
            assert ready["type"] == "ready", ready
            window.connected += 1
            await window.go.wait()
            measure_from, until = window.measure_from, window.until
            state: dict[str, Any] = {"booked": False}
            frame: dict[str, Any] = {"type": "start"}
            next_at = time.monotonic() + random.random() * interval
            while True:
                now = time.monotonic()
                if now >= until:
                    return
                if next_at > now:
                    await asyncio.sleep(next_at - now)
                sent = time.monotonic()
                await ws.send(json.dumps(frame))
                reply = json.loads(await ws.recv())
                done = time.monotonic()
                next_at = max(sent + interval, done)
                result.turns += 1
                if sent >= measure_from and done <= until:
                    result.latencies.append(done - sent)
                    result.measured_turns += 1
                if reply.get("type") == "error":
                    reason = str(reply.get("reason"))
                    result.errors[reason] = result.errors.get(reason, 0) + 1
                    frame = {"type": "text", "text": "MENU"}
                    continue
                tickets = [m for m in reply.get("messages", []) if m.get("kind") == "qr_ticket"]
                if tickets and not state["booked"]:
                    state["booked"] = True
                    result.booked += 1
                frame = _next_frame(reply, state, n)
    except Exception as exc:  # refused or closed mid-run: count it, keep the others going
        result.failed_connections += 1
        result.errors[type(exc).__name__] = result.errors.get(type(exc).__name__, 0) + 1


async def _client(
    port: int, first: int, count: int, interval: float, warmup: float, duration: float, sync: Any
) -> ClientResult:
    result = ClientResult()
    window = Window(asyncio.Event())
    tasks = []
    for i in range(count):
        conversation = _conversation(port, first + i, interval, window, result)
        tasks.append(asyncio.create_task(conversation))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # open the sockets in small waves
    while window.connected + result.failed_connections < count:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    await asyncio.to_thread(sync.wait)  # every process connected: start together
    window.measure_from = time.monotonic() + warmup
    window.until = window.measure_from + duration
    window.go.set()
    await asyncio.gather(*tasks)
    return result


def client_main(args: tuple[int, int, int, float, float, float], sync: Any, out: Any) -> None:
    out.put(asyncio.run(_client(*args, sync)))


# ---------------------------------------------------------------- the run


async def rsvp_count(url: str) -> int:
    conn = await common.pg_connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM rsvps WHERE status = 'confirmed'"))
    finally:
        await conn.close()


def percentile_ms(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def run(args: argparse.Namespace, url: str) -> int:
    asyncio.run(seed(url))
    asyncio.run(checkpoint(url))
    interval = args.conversations / args.rate
    # Every simulated visitor comes from this machine's one address: the per-address socket
    # cap (20 a process, meant for one real client) would refuse all but the first few.
    os.environ["POPDROP_CHAT_MAX_PER_ADDRESS"] = str(args.conversations)
    os.environ["POPDROP_CHAT_MAX_TOTAL"] = str(args.conversations * 2)
    with server(url, args.workers) as port:
        shares = [args.conversations // args.clients] * args.clients
        for i in range(args.conversations % args.clients):
            shares[i] += 1
        mp = get_context("spawn")
        sync, out = mp.Barrier(args.clients), mp.Queue()
        procs, first = [], 0
        for share in shares:
            job = (port, first, share, interval, args.warmup, args.duration)
            procs.append(mp.Process(target=client_main, args=(job, sync, out)))
            first += share
        busy_before = common.busy_cpu_seconds()
        for proc in procs:
            proc.start()
        results: list[ClientResult] = [out.get() for _ in procs]
        busy = common.busy_cpu_seconds() - busy_before
        for proc in procs:
            proc.join()
    latencies = [x for r in results for x in r.latencies]
    measured = sum(r.measured_turns for r in results)
    # Each process has its own monotonic clock: the window is the configured one.
    elapsed = args.duration
    turns_per_s = measured / elapsed
    p50, p99 = percentile_ms(latencies, 0.50), percentile_ms(latencies, 0.99)
    booked = sum(r.booked for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for reason, n in r.errors.items():
            errors[reason] = errors.get(reason, 0) + n
    failed = sum(r.failed_connections for r in results)
    rsvps = asyncio.run(rsvp_count(url))
    # Load-independent: what a turn costs the machine (server + PostgreSQL + load generator).
    cpu_ms_per_turn = busy * 1000 / max(1, sum(r.turns for r in results))

    print(
        f"conversations {args.conversations} over {args.clients} client processes, "
        f"server workers {args.workers}, offered {args.rate:.0f} turns/s, "
        f"measured {elapsed:.0f} s after a {args.warmup:.0f} s warm-up"
    )
    print(
        f"turns/s {turns_per_s:,.0f} (target >= {TARGET_TURNS_PER_S:,}, "
        f"ratio {turns_per_s / TARGET_TURNS_PER_S:.2f})"
    )
    print(
        f"p99 turn latency {p99:.1f} ms (target < {TARGET_P99_MS:.0f} ms, "
        f"ratio {p99 / TARGET_P99_MS:.2f}); p50 {p50:.1f} ms"
    )
    print(f"booked {booked} (confirmed RSVPs in the database: {rsvps}); errors {errors or 'none'}")
    print(f"machine CPU per turn {cpu_ms_per_turn:.2f} ms (server, PostgreSQL, load generator)")
    # Correctness only: every booking a client saw is one confirmed RSVP. Missed speed targets
    # and connections an overloaded machine refused are figures, not failures.
    ok = rsvps == booked
    common.emit(
        {
            "bench": "chat",
            "quick": args.quick,
            "conversations": args.conversations,
            "workers": args.workers,
            "offered_turns_per_s": args.rate,
            "turns": measured,
            "turns_per_s": round(turns_per_s, 1),
            "turns_per_s_ratio_to_target": round(turns_per_s / TARGET_TURNS_PER_S, 3),
            "p50_ms": round(p50, 2),
            "p99_ms": round(p99, 2),
            "p99_ratio_to_target": round(p99 / TARGET_P99_MS, 3),
            "machine_cpu_ms_per_turn": round(cpu_ms_per_turn, 2),
            "booked": booked,
            "rsvps": rsvps,
            "errors": sum(errors.values()),
            "failed_connections": failed,
            "ok": ok,
        }
    )
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--database-url", help=f"default: {common.DEFAULT_PG_URL}_chat")
    parser.add_argument("--conversations", type=int, default=500)
    parser.add_argument(
        "--rate", type=float, default=1_250.0, help="turns/s offered in all (default 1,250)"
    )
    parser.add_argument(
        "--workers", type=int, default=max(2, min(8, (os.cpu_count() or 2) // 2)),
        help="server processes",
    )  # fmt: skip
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=None, help="unmeasured seconds first")
    args = parser.parse_args()
    args.duration = args.duration or (15.0 if args.quick else 60.0)
    args.warmup = args.warmup or (5.0 if args.quick else 10.0)
    url = common.pg_url(args.database_url)
    if args.database_url is None:
        url = url.replace("/popdrop_bench", "/popdrop_bench_chat")
    if not asyncio.run(common.pg_reachable(url)):
        print(f"PostgreSQL is not reachable at {url}", file=sys.stderr)
        return 2
    return run(args, url)


if __name__ == "__main__":
    sys.exit(main())
