"""A database outage answers 503 `database_unavailable` with Retry-After, never 500, and
requests succeed again once it is back. PostgreSQL is reached through a small asyncio TCP
proxy in the test, which is cut (every connection closed, new ones refused) under load and
then restored; the shared PostgreSQL service itself is never touched."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy.engine import make_url

from popdrop.app import build_context, create_app, outage_reason
from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.vouchers import codes
from popdrop.web.context import AppContext
from tests.conftest import make_tenant
from tests.server import free_port


class CuttableProxy:
    """127.0.0.1:<port> → PostgreSQL, until `cut()`: then every piped connection is closed
    and the port refuses new ones, until `restore()` listens on the same port again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # reset, as a crashed server or a network cut would
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None

    async def restore(self) -> None:
        await self.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self.cut()


@asynccontextmanager
async def serving(ctx: AppContext) -> AsyncIterator[str]:
    port = free_port()
    config = uvicorn.Config(
        create_app(ctx=ctx), host="127.0.0.1", port=port, log_level="critical", lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@dataclass
class Answer:
    started: float
    ended: float
    status: int
    reason: str
    retry_after: str | None


@dataclass
class Phases:
    cut_at: float = float("inf")
    restored_at: float = float("inf")
    answers: list[Answer] = field(default_factory=list)


async def test_a_postgresql_outage_answers_503_with_retry_after_never_500(
    database_url: str, settings: Settings, clock: FrozenClock, tmp_path: Path
) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("a PostgreSQL outage (SQLite has no server to lose)")
    real = make_url(database_url)
    proxy = CuttableProxy(real.host or "127.0.0.1", real.port or 5432)
    await proxy.start()
    proxied = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    # The load guesses unknown codes too: keep the guard out of this test's way.
    update = {"database_url": proxied, "guess_limit_per_token": 1_000_000}
    ctx = build_context(settings.model_copy(update=update), clock=clock)
    tenant = await make_tenant(ctx)
    phases = Phases()
    try:
        async with serving(ctx) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
            issued = await http.post(
                "/api/v1/voucher-batches",
                json={"name": "load", "quantity": 1, "max_uses": 100_000},
                headers=tenant.headers,
            )
            assert issued.status_code == 201, issued.text
            [code] = issued.json()["codes"]
            stop = asyncio.Event()

            async def load(n: int) -> None:
                for i in range(5000):  # bounded; stops once the scenario is over
                    if stop.is_set():
                        return
                    body = {"code": code if i % 2 else codes.format_code(codes.new_code())}
                    if n == 0:
                        path, kw = "/api/v1/events", {"headers": tenant.headers}
                        began = time.monotonic()
                        response = await http.get(path, **kw)
                    else:
                        began = time.monotonic()
                        response = await http.post(
                            "/api/v1/vouchers/redeem", json=body, headers=tenant.headers
                        )
                    reason = ""
                    if response.headers.get("content-type", "").startswith("application/json"):
                        payload = response.json()
                        reason = payload.get("reason", "") if isinstance(payload, dict) else ""
                    phases.answers.append(
                        Answer(
                            began,
                            time.monotonic(),
                            response.status_code,
                            reason,
                            response.headers.get("retry-after"),
                        )
                    )
                    await asyncio.sleep(0.01)

            workers = [asyncio.create_task(load(n)) for n in range(4)]
            # Cut once the load has been answered a few times (a busy machine can take
            # over a second for the first answers through the proxy).
            for _ in range(300):
                if len(phases.answers) >= 8:
                    break
                await asyncio.sleep(0.05)
            phases.cut_at = time.monotonic()
            await proxy.cut()
            await asyncio.sleep(2.0)
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.headers["retry-after"]
            phases.restored_at = time.monotonic()
            await proxy.restore()
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*workers)
            assert (await http.get("/readyz")).status_code == 200
    finally:
        await proxy.stop()
        await ctx.guard.counter.close()
        await ctx.db.dispose()

    answers = phases.answers
    assert [a.status for a in answers if a.status >= 500 and a.status != 503] == []
    during = [a for a in answers if a.started > phases.cut_at and a.ended < phases.restored_at]
    assert len(during) >= 10, "the load went on during the outage"
    for answer in during:
        assert (answer.status, answer.reason) == (503, "database_unavailable"), answer
        assert answer.retry_after is not None and int(answer.retry_after) >= 1
    before = [a for a in answers if a.ended < phases.cut_at]
    assert before and all(a.status < 500 for a in before)
    # Once it is back, requests succeed again (a stale pooled connection may cost one 503).
    after = [a for a in answers if a.started > phases.restored_at + 1.0]
    assert after and all(a.status in (200, 404) for a in after), [a.status for a in after]


def test_connection_errors_are_outages_and_bugs_are_not() -> None:
    assert outage_reason(ConnectionRefusedError(111, "refused")) == "database_unavailable"
    assert outage_reason(OSError("Multiple exceptions: Connect call failed")) == (
        "database_unavailable"
    )
    wrapped = RuntimeError("while querying")
    wrapped.__cause__ = ConnectionResetError()
    assert outage_reason(wrapped) == "database_unavailable"
    assert outage_reason(FileNotFoundError(2, "no such file")) is None
    assert outage_reason(KeyError("bug")) is None
