"""Live-stock streams: another API call's latency with 400 public SSE streams open.

1. Seed PostgreSQL with an organization and a token; serve with `popdrop serve` (one
   worker process, so every stream lands on the same publisher) and create a published
   event with stock through the API.
2. Idle: a separate load-generator process calls `GET /api/v1/events/{id}/availability`
   (an authenticated API read) from a few keep-alive connections; p50 and rate.
3. Streams: open 400 `GET /e/{id}/availability/stream` connections (raw sockets, each
   reading everything it is sent) and measure the same API call again while the stock
   changes every half second through the API, so the streams really carry updates.
4. Idle again (streams closed), to see how far the machine itself drifted in the run.
5. Checks: every stream answered 200 and received the final stock; the 401st stream from
   the same address (the cap is set to 400 for the run) is refused with 429 and a reason;
   no 5xx. The exit code is non-zero only on a failed check, never on speed.

Goal (issue 13): with 400 open streams, the API call's p50 stays within 2x of idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import httpx

import _common as common
import _loadgen
from popdrop.accounts.service import ROLES
from popdrop.core.db import Database
from popdrop.core.migrate import upgrade
from redeem import free_port, wait_ready

STREAMS = 400
GOAL_RATIO = 2.0
AVAILABLE = re.compile(rb'"available": (\d+)')


@dataclass
class Seeded:
    token: str
    event_id: int
    variant_id: int
    lane_id: int


async def seed_token(url: str) -> str:
    await common.reset_postgres(url)
    await upgrade(url)
    db = Database(url, pool_size=2, max_overflow=0)
    try:
        async with db.transaction() as session:
            owner = await common.seed_org(session, "bench-streams")
            return await common.seed_token(session, owner.org_id, ROLES["owner"])
    finally:
        await db.dispose()


def seed_event(base: str, token: str) -> Seeded:
    headers = {"Authorization": f"Bearer {token}"}
    now = common.now()

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(f"{base}{path}", json=body, headers=headers, timeout=30)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    event = post(
        "/api/v1/events",
        {
            "slug": "stream-drop",
            "title": "Streamed drop",
            "timezone": "UTC",
            "starts_at": (now + timedelta(days=1)).isoformat(),
            "ends_at": (now + timedelta(days=2)).isoformat(),
        },
    )
    post(f"/api/v1/events/{event['id']}/status", {"status": "published"})
    lane = post(f"/api/v1/events/{event['id']}/lanes", {"name": "Front desk"})
    product = post(
        f"/api/v1/events/{event['id']}/products",
        {"title": "Tee", "price_minor": 2000, "variants": ["M"]},
    )
    seeded = Seeded(token, event["id"], product["variants"][0]["id"], lane["id"])
    set_stock(base, seeded, 1000)
    return seeded


def set_stock(base: str, seeded: Seeded, total: int) -> None:
    response = httpx.put(
        f"{base}/api/v1/stock",
        json={"variant_id": seeded.variant_id, "lane_id": seeded.lane_id, "total": total},
        headers={"Authorization": f"Bearer {seeded.token}"},
        timeout=30,
    )
    response.raise_for_status()


@contextmanager
def server(url: str, streams: int) -> Iterator[int]:
    """`popdrop serve` (one worker) with the per-address stream cap at `streams`: the load
    comes from one address here, standing in for that many visitors."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="popdrop-bench-") as tmp:
        env = common.server_env(
            url,
            tmp,
            POPDROP_STREAM_MAX_PER_ADDRESS=str(streams),
            POPDROP_STREAM_MAX_TOTAL=str(streams * 4),
        )
        command = [common.POPDROP_BIN, "serve", "--port", str(port)]
        command += ["--workers", "1", "--no-access-log"]
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


# ---------------------------------------------------------------- streams


PROGRESS = asyncio.Event()  # set whenever a stream is sent a stock figure


@dataclass
class Held:
    status: int = 0
    last_available: int | None = None
    received: int = 0  # bytes
    errors: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def open_stream(port: int, event_id: int) -> tuple[int, bytes, Any, Any]:
    reader, writer = await asyncio.open_connection(_loadgen.HOST, port)
    writer.write(
        f"GET /e/{event_id}/availability/stream HTTP/1.1\r\nHost: {_loadgen.HOST}:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head, reader, writer


async def hold_streams(port: int, event_id: int, count: int) -> tuple[list[Held], list[Any]]:
    """Open `count` streams; each keeps reading and notes the last stock it was sent."""
    held: list[Held] = []
    writers: list[Any] = []

    async def drain(one: Held, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(65536):
                one.received += len(chunk)
                found = AVAILABLE.findall(chunk)
                if found:
                    one.last_available = int(found[-1])
                    PROGRESS.set()
        except (OSError, asyncio.IncompleteReadError):
            one.errors += 1

    opened = await asyncio.gather(*(open_stream(port, event_id) for _ in range(count)))
    for status, _head, reader, writer in opened:
        one = Held(status=status)
        one.tasks.append(asyncio.create_task(drain(one, reader)))
        held.append(one)
        writers.append(writer)
    return held, writers


async def close_streams(held: list[Held], writers: list[Any]) -> None:
    for writer in writers:
        writer.close()
    for one in held:
        for task in one.tasks:
            task.cancel()
    await asyncio.gather(*(t for one in held for t in one.tasks), return_exceptions=True)


async def refused_over_cap(port: int, event_id: int) -> tuple[int, str]:
    """Status and reason of one more stream from the same address."""
    status, head, reader, writer = await open_stream(port, event_id)
    body = b""
    match = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    if match:
        body = await reader.readexactly(int(match.group(1)))
    writer.close()
    try:
        reason = str(json.loads(body).get("reason", ""))
    except ValueError:
        reason = ""
    return status, reason


# ---------------------------------------------------------------- the API call


def api_requests(port: int, seeded: Seeded, count: int) -> list[bytes]:
    request = (
        f"GET /api/v1/events/{seeded.event_id}/availability HTTP/1.1\r\n"
        f"Host: {_loadgen.HOST}:{port}\r\nAuthorization: Bearer {seeded.token}\r\n\r\n"
    ).encode()
    return [request] * count


async def measure(
    pool: ProcessPoolExecutor, port: int, requests: list[bytes], clients: int, seconds: float
) -> _loadgen.LoadResult:
    loop = asyncio.get_running_loop()
    job = loop.run_in_executor(pool, _loadgen.run, port, requests, clients, 1.0, seconds)
    return await job


async def change_stock(base: str, seeded: Seeded, stop: asyncio.Event) -> int:
    """Change the stock every half second until stopped; the last total set."""
    total = 1000
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        while not stop.is_set():
            total = 900 + (total + 7) % 100
            response = await client.put(
                "/api/v1/stock",
                json={"variant_id": seeded.variant_id, "lane_id": seeded.lane_id, "total": total},
                headers={"Authorization": f"Bearer {seeded.token}"},
            )
            response.raise_for_status()
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    return total


async def run(port: int, seeded: Seeded, args: argparse.Namespace) -> dict[str, Any]:
    base = f"http://{_loadgen.HOST}:{port}"
    requests = api_requests(port, seeded, 400_000)
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        await measure(pool, port, requests[:2000], args.clients, 1.0)  # start the worker
        idle = await measure(pool, port, requests, args.clients, args.duration)

        started = time.perf_counter()
        held, writers = await hold_streams(port, seeded.event_id, args.streams)
        opened_in = time.perf_counter() - started
        refusal = await refused_over_cap(port, seeded.event_id)
        stop = asyncio.Event()
        changer = asyncio.create_task(change_stock(base, seeded, stop))
        busy = await measure(pool, port, requests, args.clients, args.duration)
        stop.set()
        final = await changer
        with suppress(TimeoutError):  # every stream should get the final stock: wait for it
            async with asyncio.timeout(30):
                while any(h.last_available != final for h in held):
                    PROGRESS.clear()
                    await PROGRESS.wait()
        updated = sum(h.last_available == final for h in held)
        ok_streams = sum(h.status == 200 for h in held)
        stream_errors = sum(h.errors for h in held)
        await close_streams(held, writers)

        after = await measure(pool, port, requests, args.clients, args.duration)
    return {
        "idle": idle,
        "busy": busy,
        "after": after,
        "opened_in": opened_in,
        "refusal": refusal,
        "updated": updated,
        "ok_streams": ok_streams,
        "stream_errors": stream_errors,
        "bytes": sum(h.received for h in held),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--database-url", help=f"default: {common.DEFAULT_PG_URL}")
    parser.add_argument("--streams", type=int, default=STREAMS)
    parser.add_argument("--clients", type=int, default=4, help="API load connections")
    parser.add_argument("--duration", type=float, help="measured seconds per phase (15; quick 5)")
    args = parser.parse_args()
    args.duration = args.duration or (5.0 if args.quick else 15.0)
    url = common.pg_url(args.database_url)

    token = asyncio.run(seed_token(url))
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before measuring: {load_avg} (other work on the machine skews figures)")
    with server(url, args.streams) as port:
        seeded = seed_event(f"http://{_loadgen.HOST}:{port}", token)
        out = asyncio.run(run(port, seeded, args))

    idle: _loadgen.LoadResult = out["idle"]
    busy: _loadgen.LoadResult = out["busy"]
    after: _loadgen.LoadResult = out["after"]
    p50_idle = (idle.percentile_ms(0.5) + after.percentile_ms(0.5)) / 2
    p50_busy = busy.percentile_ms(0.5)
    ratio = p50_busy / p50_idle if p50_idle else 0.0
    refusal_status, refusal_reason = out["refusal"]
    server_errors = sum(
        n for r in (idle, busy, after) for status, n in r.statuses.items() if status >= 500
    )
    load_errors = idle.errors + busy.errors + after.errors
    for name, result in (("idle", idle), (f"{args.streams} streams", busy), ("idle after", after)):
        print(
            f"API call, {name:12} p50 {result.percentile_ms(0.5):7.2f} ms   "
            f"p99 {result.percentile_ms(0.99):7.2f} ms   {result.rate:8.0f} /s"
        )
    print(
        f"p50 with streams / idle  {ratio:.2f}   (goal <= {GOAL_RATIO:.0f}; idle = mean of "
        f"before and after: {p50_idle:.2f} ms)"
    )
    print(
        f"streams: {out['ok_streams']}/{args.streams} answered 200 (opened in "
        f"{out['opened_in']:.2f} s), {out['updated']} got the final stock, "
        f"{out['bytes'] / 1024:.0f} KiB sent, {out['stream_errors']} read errors"
    )
    print(f"stream {args.streams + 1} from the same address: {refusal_status} {refusal_reason}")
    checks = {
        "streams_ok": out["ok_streams"] == args.streams,
        "streams_updated": out["updated"] == args.streams,
        "cap_refused": refusal_status == 429 and refusal_reason == "too_many_connections",
        "no_server_errors": server_errors == 0 and load_errors == 0,
    }
    common.emit(
        {
            "bench": "streams",
            "rate_per_s": round(busy.rate, 1),
            "limit_per_s": round((idle.rate + after.rate) / 2, 1),
            "ratio": round(ratio, 3),
            "goal_ratio": GOAL_RATIO,
            "p50_idle_ms": round(p50_idle, 2),
            "p50_streams_ms": round(p50_busy, 2),
            "p99_streams_ms": round(busy.percentile_ms(0.99), 2),
            "streams": args.streams,
            "clients": args.clients,
            "server_errors": server_errors,
            **checks,
        }
    )
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
