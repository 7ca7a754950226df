"""A cheap closed-loop HTTP/1.1 load generator: raw asyncio streams, keep-alive.

Each of `clients` connections sends the next prepared request, reads the status line,
headers and Content-Length body, and records the latency. Requests that start during
the warm-up are sent but not measured. Run it in its own process (`run` is picklable) so
it does not share an event loop with anything being measured.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

HOST = "127.0.0.1"


@dataclass
class LoadResult:
    statuses: Counter[int] = field(default_factory=Counter)  # every response, warm-up included
    latencies: list[float] = field(default_factory=list)  # seconds, measured window only
    measured_from: float = 0.0
    last_done: float = 0.0
    sent: int = 0
    errors: int = 0
    exhausted: bool = False
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (done, status), all
    started: float = 0.0

    @property
    def elapsed(self) -> float:
        return max(self.last_done - self.measured_from, 1e-9)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Status code and whether the server will close the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, close


async def _drive(
    port: int, requests: list[bytes], clients: int, warmup: float, duration: float
) -> LoadResult:
    result = LoadResult()
    start = time.perf_counter()
    result.started = start
    result.measured_from = start + warmup
    stop_at = result.measured_from + duration
    cursor = iter(requests)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while time.perf_counter() < stop_at:
                request = next(cursor, None)
                if request is None:
                    result.exhausted = True
                    return
                sent_at = time.perf_counter()
                result.sent += 1
                try:
                    writer.write(request)
                    status, close = await _read_response(reader)
                except (OSError, asyncio.IncompleteReadError):
                    result.errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, port)
                    continue
                done = time.perf_counter()
                result.statuses[status] += 1
                result.timeline.append((done, status))
                if sent_at >= result.measured_from:
                    result.latencies.append(done - sent_at)
                    result.last_done = max(result.last_done, done)
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, port)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(clients)))
    return result


def run(
    port: int, requests: list[bytes], clients: int, warmup: float, duration: float
) -> LoadResult:
    """Entry point for a worker process."""
    main = _drive(port, requests, clients, warmup, duration)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def post_json(port: int, path: str, body: bytes, token: str) -> bytes:
    """One keep-alive POST request, ready to write."""
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {HOST}:{port}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body
