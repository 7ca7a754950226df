"""Redis stopped mid-run: redemptions and public RSVPs keep working, /readyz says which
dependency is down, nothing answers 500 and no connection is dropped; all recovers when
Redis comes back on the same port. The test runs its own redis-server (never the shared one)
and a real uvicorn server in-process, with the app's lifespan (worker tick, chat relay)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from redis.asyncio import Redis

from popdrop.app import build_context, create_app
from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.vouchers import codes
from popdrop.web.context import AppContext
from popdrop.worker import Worker
from tests.conftest import make_tenant
from tests.rsvp.helpers import make_slot, rsvp
from tests.server import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
pytestmark = pytest.mark.skipif(
    not Path(REDIS_SERVER).exists(), reason="needs a redis-server binary to stop and start"
)


@contextmanager
def redis_on(port: int, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                import socket

                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


@asynccontextmanager
async def serving(ctx: AppContext) -> AsyncIterator[str]:
    port = free_port()
    config = uvicorn.Config(
        create_app(ctx=ctx), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_redis_stopped_mid_run_degrades_cleanly_and_recovers(
    settings: Settings, clock: FrozenClock, tmp_path: Path
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    settings = settings.model_copy(
        update={
            "redis_url": url,
            "broker_url": url,
            "redis_retry_seconds": 0.2,
            "send_poll_seconds": 0.2,
        }
    )
    ctx = build_context(settings, clock=clock)
    statuses: list[int] = []

    # One keep-alive connection for the whole run: a reset connection would raise here.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with redis_on(port, tmp_path) as first_redis:
        async with serving(ctx) as base, httpx.AsyncClient(base_url=base, limits=limits) as http:
            tenant = await make_tenant(ctx)
            event_id, slot_id = await make_slot(ctx, tenant, capacity=100)
            issued = await http.post(
                "/api/v1/voucher-batches",
                json={"name": "till", "quantity": 30},
                headers=tenant.headers,
            )
            assert issued.status_code == 201, issued.text
            valid = list(issued.json()["codes"])

            async def call(method: str, path: str, **kw: Any) -> httpx.Response:
                response = await http.request(method, path, **kw)
                statuses.append(response.status_code)
                return response

            async def redeem(code: str) -> httpx.Response:
                return await call(
                    "POST", "/api/v1/vouchers/redeem", json={"code": code}, headers=tenant.headers
                )

            async def round_of_work(n: int) -> None:
                for i in range(n):
                    assert (await redeem(valid.pop())).status_code == 200
                    unknown = await redeem(codes.format_code(codes.new_code()))
                    assert (unknown.status_code, unknown.json()["reason"]) == (404, "unknown")
                    booked = await rsvp(
                        http, event_id, slot_id, email=f"guest{len(valid)}-{i}@example.com"
                    )
                    statuses.append(booked.status_code)
                    assert booked.status_code == 201, booked.text

            ready = (await call("GET", "/readyz")).json()
            assert (ready["status"], ready["degraded"]) == ("ready", [])
            await round_of_work(2)

            first_redis.kill()  # Redis goes away mid-run
            first_redis.wait(timeout=10)

            down = await call("GET", "/readyz")
            assert down.status_code == 200  # the database is fine
            assert down.json()["status"] == "degraded"
            assert set(down.json()["degraded"]) == {"broker", "redis"}
            assert down.json()["dependencies"]["redis"].startswith("unavailable")
            await round_of_work(4)
            assert ctx.guard.degraded  # the guard counted in this process meanwhile

            with redis_on(port, tmp_path):  # back, on the same port
                for _ in range(100):
                    back = (await call("GET", "/readyz")).json()
                    if back["status"] == "ready":
                        break
                    await asyncio.sleep(0.1)
                assert back["status"] == "ready", back
                await asyncio.sleep(0.3)  # past redis_retry_seconds: the guard tries Redis
                await round_of_work(2)
                assert not ctx.guard.degraded
                check = Redis.from_url(url)
                try:  # the failures are counted in Redis again
                    assert await check.keys("popdrop:fail:*")
                finally:
                    await check.aclose()
    assert 500 not in statuses


async def test_a_drop_kick_with_the_broker_down_is_logged_not_raised(ctx: AppContext) -> None:
    port = free_port()  # nothing listens there
    settings = ctx.settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{port}/0", "send_poll_seconds": 0.05}
    )
    worker = Worker(settings, ctx.db, ctx.signer, ctx.clock)
    try:
        assert await worker.send_drop.kiq(1) is False
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(receive=True, stop=stop))
        await asyncio.sleep(0.3)  # a few ticks without a broker
        assert not running.done()
        stop.set()
        await running  # ends cleanly
    finally:
        await worker.close()
