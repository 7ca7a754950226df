"""Web chat: WebSocket conversations through the shipped flow on PostgreSQL, against the
same server's WebSocket echo ceiling measured in the same run.

1. Seed (service layer): an org, a published event with four slots and three products in
   stock, and the shipped "pop-up drop" flow published on it.
2. Serve with `popdrop serve` (uvicorn, `--workers` processes) with `POPDROP_BENCH_ECHO=1`:
   this diagnostic setting (off by default, never in the OpenAPI schema) adds
   `WS /ws/bench/echo`, which sends every text frame straight back (`chat/web.py`), so the
   echo ceiling goes through the same server, sockets, load generators and clients as the
   turns. `--clients` load-generator processes each open their share of `--conversations`
   chat sockets (`/ws/chat/bench`) and as many echo sockets, then run in phases, kept in
   step by a barrier with this process:
   a. echo: every echo socket sends a chat-sized frame, waits for it back, sends again
      (closed loop): the ceiling in messages/s;
   b. prepare: every conversation goes start → menu → RSVP a time slot → a slot → email
      up to the "Yes, book it" prompt (not measured);
   c. booking: every conversation answers "Yes, book it" (RSVP + voucher + QR ticket in
      one turn); the server processes' CPU (user + system from /proc, `popdrop serve` and
      its workers only) over this phase / the bookings = CPU per booking turn;
   d. capacity: the conversations browse (MENU → See the drop (live carousel) → Back → …),
      each at most `--browse-rate` turns/s (under the per-socket rate limit), more than the
      server answers: turns/s answered in the window is the capacity, and the server CPU
      over the window / the turns answered in it = CPU per browse turn;
   e. half load: browsing offered at 0.5 x the measured capacity, each turn sent only after
      the previous answer: the p99 turn latency there.
3. Check: no error frames, one confirmed RSVP per booked conversation.

Targets (issue 19): turns/s >= 0.5 x the echo ceiling; server CPU <= 1.5 ms a browse turn
and <= 4 ms a booking turn; p99 < 50 ms at half of the measured capacity. Each is printed
with its ratio; the last line is JSON (`rate_per_s` turns/s, `limit_per_s` echo msgs/s,
`ratio`, `cpu_ms_browse`, `cpu_ms_booking`, `p99_ms_half_load`, `load_avg`, checks).
Exits non-zero only on a correctness failure.
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
from checkout import process_cpu_seconds
from popdrop.chat import flow_store
from popdrop.core.db import Database
from popdrop.core.migrate import upgrade
from popdrop.events import service as events
from popdrop.events.schemas import EventCreate, LaneCreate, SlotCreate
from popdrop.inventory import service as inventory
from popdrop.inventory.schemas import ProductCreate, StockSet
from redeem import checkpoint, server

TARGET_RATIO = 0.5
TARGET_CPU_BROWSE_MS = 1.5
TARGET_CPU_BOOKING_MS = 4.0
TARGET_P99_MS = 50.0
ORG = "bench"
ECHO_PATH = "/ws/bench/echo"
BOOK = "Yes, book it"
# An echo frame about the size of a browse turn's client frame.
ECHO_FRAME = json.dumps({"type": "button", "payload": "n:cards:0123456789abcdef"})


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
    echo_msgs: int = 0  # echoes answered in the measured window
    booked: int = 0
    booking_turns: int = 0
    capacity_turns: int = 0  # browse turns answered in the capacity window
    half_turns: int = 0
    half_latencies: list[float] = field(default_factory=list)  # seconds
    error_frames: dict[str, int] = field(default_factory=dict)
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


def _next_frame(reply: dict[str, Any], booked: bool, n: int) -> dict[str, Any]:
    """What a visitor answers to `reply`: up to the booking prompt, then browse the drop."""
    labels = _labels(reply)
    text = " ".join(str(m.get("text", "")) for m in reply.get("messages", []))
    if BOOK in labels:
        return {"type": "button", "payload": labels[BOOK]}
    if "What email" in text or "does not look like an email" in text:
        return {"type": "text", "text": f"visitor{n}-{os.getpid()}@example.com"}
    slots = [p for label, p in labels.items() if label.endswith("left)")]
    if slots and not booked:
        return {"type": "button", "payload": random.choice(slots)}
    if not booked and "RSVP a time slot" in labels:
        return {"type": "button", "payload": labels["RSVP a time slot"]}
    if "See the drop" in labels:
        return {"type": "button", "payload": labels["See the drop"]}
    if "Back" in labels:
        return {"type": "button", "payload": labels["Back"]}
    return {"type": "text", "text": "MENU"}


class Visitor:
    """One chat socket and where its visitor is in the flow."""

    def __init__(self, ws: Any, n: int, result: ClientResult) -> None:
        self.ws = ws
        self.n = n
        self.result = result
        self.frame: dict[str, Any] = {"type": "start"}
        self.booked = False

    async def turn(self) -> dict[str, Any]:
        await self.ws.send(json.dumps(self.frame))
        reply: dict[str, Any] = json.loads(await self.ws.recv())
        if reply.get("type") == "error":
            reason = str(reply.get("reason"))
            self.result.error_frames[reason] = self.result.error_frames.get(reason, 0) + 1
            self.frame = {"type": "text", "text": "MENU"}
            return reply
        tickets = [m for m in reply.get("messages", []) if m.get("kind") == "qr_ticket"]
        if tickets and not self.booked:
            self.booked = True
            self.result.booked += 1
        self.frame = _next_frame(reply, self.booked, self.n)
        return reply


async def _prepare(visitor: Visitor) -> None:
    for _ in range(12):
        reply = await visitor.turn()
        if BOOK in _labels(reply):
            return
    raise RuntimeError("the flow never asked to book")


async def _paced(
    visitors: list[Visitor], interval: float, warmup: float, duration: float
) -> tuple[int, list[float]]:
    """Each visitor sends its next turn at most every `interval` s and only after the
    previous answer; (turns answered in the window, latencies of turns sent in it)."""
    start = time.monotonic()
    measure_from, until = start + warmup, start + warmup + duration
    answered = 0
    latencies: list[float] = []

    async def run(visitor: Visitor) -> None:
        nonlocal answered
        next_at = start + random.random() * interval
        while True:
            now = time.monotonic()
            if max(now, next_at) >= until:
                return
            if next_at > now:
                await asyncio.sleep(next_at - now)
            sent = time.monotonic()
            await visitor.turn()
            done = time.monotonic()
            next_at = max(sent + interval, done)
            if measure_from <= done <= until:
                answered += 1
                if sent >= measure_from:
                    latencies.append(done - sent)

    await asyncio.gather(*(run(v) for v in visitors))
    return answered, latencies


async def _echo(sockets: list[Any], warmup: float, duration: float) -> int:
    start = time.monotonic()
    measure_from, until = start + warmup, start + warmup + duration
    answered = 0

    async def run(ws: Any) -> None:
        nonlocal answered
        while time.monotonic() < until:
            await ws.send(ECHO_FRAME)
            await ws.recv()
            if time.monotonic() >= measure_from:
                answered += 1

    await asyncio.gather(*(run(ws) for ws in sockets))
    return answered


async def _client(job: dict[str, Any], sync: Any, half_rate: Any, out: Any) -> ClientResult:
    import websockets

    result = ClientResult()
    base = f"ws://{_loadgen.HOST}:{job['port']}"
    visitors: list[Visitor] = []
    echoes: list[Any] = []

    async def open_pair(n: int) -> None:
        try:
            ws = await websockets.connect(f"{base}/ws/chat/{ORG}", max_size=2**20, open_timeout=120)
            ready = json.loads(await ws.recv())
            assert ready["type"] == "ready", ready
            visitors.append(Visitor(ws, n, result))
            echoes.append(await websockets.connect(f"{base}{ECHO_PATH}", open_timeout=120))
        except Exception as exc:  # refused on an overloaded machine: a figure, not a failure
            result.failed_connections += 1
            name = type(exc).__name__
            result.error_frames[f"connect:{name}"] = result.error_frames.get(name, 0) + 1

    opening = []
    for i in range(job["count"]):
        opening.append(asyncio.create_task(open_pair(job["first"] + i)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # open the sockets in small waves
    await asyncio.gather(*opening)

    async def barrier() -> None:
        await asyncio.to_thread(sync.wait)

    await barrier()  # everyone connected
    result.echo_msgs = await _echo(echoes, job["warmup"], job["duration"])
    await barrier()
    await asyncio.gather(*(_prepare(v) for v in visitors))
    await barrier()  # the main process reads the server's CPU
    await barrier()
    before = result.booked
    await asyncio.gather(*(v.turn() for v in visitors))
    result.booking_turns = len(visitors)
    assert result.booked - before <= len(visitors)
    await barrier()  # …and again
    await barrier()  # capacity: the main process reads the CPU over the same window
    interval = 1.0 / job["browse_rate"]
    result.capacity_turns, _ = await _paced(visitors, interval, job["warmup"], job["duration"])
    out.put(result.capacity_turns)
    await barrier()
    await barrier()  # the half-load rate is set
    interval = job["total"] / half_rate.value
    result.half_turns, result.half_latencies = await _paced(
        visitors, interval, job["warmup"], job["duration"]
    )
    for ws in [v.ws for v in visitors] + echoes:
        await ws.close()
    return result


def client_main(job: dict[str, Any], sync: Any, half_rate: Any, out: Any) -> None:
    try:
        import uvloop

    except ImportError:
        out.put(asyncio.run(_client(job, sync, half_rate, out)))
        return
    out.put(uvloop.run(_client(job, sync, half_rate, out)))


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


def phase(name: str) -> None:
    """Where the run is, on stderr (to attach a profiler to the server in a phase)."""
    print(f"phase {name} at {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, url: str) -> int:
    asyncio.run(seed(url))
    asyncio.run(checkpoint(url))
    # Every simulated visitor comes from this machine's one address: the per-address socket
    # cap (20 a process, meant for one real client) would refuse all but the first few.
    os.environ["POPDROP_CHAT_MAX_PER_ADDRESS"] = str(args.conversations)
    os.environ["POPDROP_CHAT_MAX_TOTAL"] = str(args.conversations * 2)
    os.environ["POPDROP_BENCH_ECHO"] = "1"
    # PostgreSQL's connections are shared with other work: a small pool per server process
    # (two cores answer no faster with more), so the server never runs out of them.
    os.environ.setdefault("POPDROP_DB_POOL_SIZE", str(args.pool))
    os.environ.setdefault("POPDROP_DB_MAX_OVERFLOW", "0")
    with server(url, args.workers) as port:
        marker = f"serve --port {port} "
        shares = [args.conversations // args.clients] * args.clients
        for i in range(args.conversations % args.clients):
            shares[i] += 1
        mp = get_context("spawn")
        sync, out = mp.Barrier(args.clients + 1), mp.Queue()
        half_rate = mp.Value("d", 1.0)
        procs, first = [], 0
        for share in shares:
            job = {
                "port": port,
                "first": first,
                "count": share,
                "total": args.conversations,
                "warmup": args.warmup,
                "duration": args.duration,
                "browse_rate": args.browse_rate,
            }
            procs.append(mp.Process(target=client_main, args=(job, sync, half_rate, out)))
            first += share
        for proc in procs:
            proc.start()
        sync.wait()  # connected
        phase("echo")
        sync.wait()  # echo done
        phase("prepare")
        sync.wait()  # prepared
        cpu_before = process_cpu_seconds(marker)
        phase("booking")
        sync.wait()
        sync.wait()  # booked
        cpu_booking = process_cpu_seconds(marker) - cpu_before
        phase("capacity")
        sync.wait()  # capacity starts
        time.sleep(args.warmup)
        cpu_before = process_cpu_seconds(marker)
        time.sleep(args.duration)
        cpu_browse = process_cpu_seconds(marker) - cpu_before
        capacity = sum(out.get() for _ in procs) / args.duration
        half_rate.value = max(1.0, capacity / 2)
        phase("half load")
        sync.wait()  # capacity done, the half rate set
        sync.wait()
        results: list[ClientResult] = [out.get() for _ in procs]
        for proc in procs:
            proc.join()
    return report(args, url, results, capacity, cpu_booking, cpu_browse)


def report(
    args: argparse.Namespace,
    url: str,
    results: list[ClientResult],
    capacity: float,
    cpu_booking: float,
    cpu_browse: float,
) -> int:
    echo = sum(r.echo_msgs for r in results) / args.duration
    ratio = capacity / echo if echo else 0.0
    booking_turns = sum(r.booking_turns for r in results)
    capacity_turns = sum(r.capacity_turns for r in results)
    cpu_ms_booking = cpu_booking * 1000 / max(1, booking_turns)
    cpu_ms_browse = cpu_browse * 1000 / max(1, capacity_turns)
    latencies = [x for r in results for x in r.half_latencies]
    half_rate = sum(r.half_turns for r in results) / args.duration
    p50, p99 = percentile_ms(latencies, 0.50), percentile_ms(latencies, 0.99)
    booked = sum(r.booked for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for reason, n in r.error_frames.items():
            errors[reason] = errors.get(reason, 0) + n
    failed = sum(r.failed_connections for r in results)
    error_frames = sum(n for reason, n in errors.items() if not reason.startswith("connect:"))
    rsvps = asyncio.run(rsvp_count(url))
    load_avg = [round(x, 2) for x in os.getloadavg()]

    print(
        f"conversations {args.conversations} (+ as many echo sockets) over {args.clients} "
        f"client processes, server workers {args.workers}; each phase measured "
        f"{args.duration:.0f} s after a {args.warmup:.0f} s warm-up; load average {load_avg}"
    )
    print(f"echo ceiling    {echo:9,.0f} msgs/s (same server, sockets and clients)")
    print(
        f"turns/s         {capacity:9,.0f} browse turns/s at capacity; ratio to echo "
        f"{ratio:.3f} (target >= {TARGET_RATIO})"
    )
    print(
        f"server CPU      {cpu_ms_browse:9.2f} ms per browse turn (target <= "
        f"{TARGET_CPU_BROWSE_MS}, ratio {cpu_ms_browse / TARGET_CPU_BROWSE_MS:.2f})"
    )
    print(
        f"server CPU      {cpu_ms_booking:9.2f} ms per booking turn (target <= "
        f"{TARGET_CPU_BOOKING_MS}, ratio {cpu_ms_booking / TARGET_CPU_BOOKING_MS:.2f}; "
        f"{booking_turns} bookings)"
    )
    print(
        f"half load       {half_rate:9,.0f} turns/s answered: p99 {p99:.1f} ms (target < "
        f"{TARGET_P99_MS:.0f}, ratio {p99 / TARGET_P99_MS:.2f}); p50 {p50:.1f} ms"
    )
    print(
        f"checks: booked {booked}, confirmed RSVPs in the database {rsvps}; error frames "
        f"{errors or 'none'}; failed connections {failed}"
    )
    # Correctness only: no error frame, and every booking a client saw is one confirmed
    # RSVP. Missed speed targets and connections an overloaded machine refused are figures.
    ok = rsvps == booked and error_frames == 0
    common.emit(
        {
            "bench": "chat",
            "quick": args.quick,
            "rate_per_s": round(capacity, 1),
            "limit_per_s": round(echo, 1),
            "ratio": round(ratio, 3),
            "cpu_ms_browse": round(cpu_ms_browse, 3),
            "cpu_ms_booking": round(cpu_ms_booking, 3),
            "cpu_browse_ratio_to_target": round(cpu_ms_browse / TARGET_CPU_BROWSE_MS, 3),
            "cpu_booking_ratio_to_target": round(cpu_ms_booking / TARGET_CPU_BOOKING_MS, 3),
            "half_load_turns_per_s": round(half_rate, 1),
            "p50_ms_half_load": round(p50, 2),
            "p99_ms_half_load": round(p99, 2),
            "p99_ratio_to_target": round(p99 / TARGET_P99_MS, 3),
            "load_avg": load_avg,
            "conversations": args.conversations,
            "workers": args.workers,
            "booked": booked,
            "rsvps": rsvps,
            "one_rsvp_per_booking": rsvps == booked,
            "error_frames": error_frames,
            "failed_connections": failed,
            "ok": ok,
        }
    )
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of about a minute")
    parser.add_argument("--database-url", help=f"default: {common.DEFAULT_PG_URL}_chat")
    parser.add_argument("--conversations", type=int, default=500)
    parser.add_argument(
        "--browse-rate", type=float, default=4.0,
        help="turns/s one conversation offers at capacity (under the 5/s socket limit)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=max(2, min(8, (os.cpu_count() or 2) // 2)),
        help="server processes",
    )  # fmt: skip
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument("--pool", type=int, default=10, help="database connections a worker")
    parser.add_argument("--duration", type=float, default=None, help="measured s a phase")
    parser.add_argument("--warmup", type=float, default=None, help="unmeasured s a phase")
    args = parser.parse_args()
    args.duration = args.duration or (8.0 if args.quick else 30.0)
    args.warmup = args.warmup or (2.0 if args.quick else 5.0)
    url = common.pg_url(args.database_url)
    if args.database_url is None:
        url = url.replace("/popdrop_bench", "/popdrop_bench_chat")
    if not asyncio.run(common.pg_reachable(url)):
        print(f"PostgreSQL is not reachable at {url}", file=sys.stderr)
        return 2
    return run(args, url)


if __name__ == "__main__":
    sys.exit(main())
