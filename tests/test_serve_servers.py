"""`popdrop serve --server granian|uvicorn`: a real server process, run the same way by both.

Each server kind, on SQLite and PostgreSQL: a chat turn over a real WebSocket, a live-stock
event over SSE, forwarded headers believed from a trusted proxy only (the app's rule;
neither server rewrites the client by itself), and SIGTERM: the graceful stop runs the
app's shutdown, which writes the short-link clicks still batched in memory (0 lost).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from sqlalchemy import func, select

from popdrop.accounts.service import ROLES, Principal
from popdrop.attribution import service as attribution
from popdrop.attribution.models import ShortLinkClick
from popdrop.attribution.schemas import LinkTags, LinkTarget, ShortLinkCreate
from popdrop.core.config import Settings
from popdrop.web.context import AppContext
from tests.chat.test_service import shop_with_flow
from tests.conftest import SECRET, Tenant, database_of_its_own, settings_for
from tests.server import free_port

PHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
PROXY = "127.0.0.2"  # loopback answers on all of 127/8: a second local peer address


@contextmanager
def serving(
    kind: str, data_dir: Path, database_url: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {
        **os.environ,
        "POPDROP_DATA_DIR": str(data_dir),
        "POPDROP_DATABASE_URL": database_url,
        "POPDROP_SECRET_KEY": SECRET,
        "POPDROP_LOG_LEVEL": "WARNING",
        "POPDROP_BASE_URL": f"http://127.0.0.1:{port}",
        "POPDROP_TRUSTED_PROXIES": PROXY,
        "POPDROP_STREAM_MAX_PER_ADDRESS": "1",
    }
    env.pop("POPDROP_REDIS_URL", None)
    env.pop("POPDROP_SERVER", None)
    command = [sys.executable, "-m", "popdrop", "serve", "--port", str(port)]
    command += ["--server", kind, "--no-access-log"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                out = process.stdout.read().decode() if process.stdout else ""
                raise RuntimeError(f"server exited: {out[-2000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready in 90 s"
            time.sleep(0.2)
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def short_link(ctx: AppContext, tenant: Tenant) -> str:
    owner = Principal(tenant.org_id, "test", "owner", ROLES["owner"])
    spec = ShortLinkCreate(
        target=LinkTarget(kind="url", url="https://shop.example/drop?ref=test"),  # type: ignore[arg-type]
        tags=LinkTags(channel="sms", utm_source="popdrop"),  # type: ignore[arg-type]
    )
    async with ctx.db.transaction() as session:
        link = await attribution.create_short_link(session, owner, spec, now=ctx.clock.now())
    return link.slug


async def clicks(ctx: AppContext, org_id: int) -> int:
    async with ctx.db.reader() as session:
        query = select(func.count()).select_from(ShortLinkClick)
        return int(await session.scalar(query.where(ShortLinkClick.org_id == org_id)) or 0)


async def chat_turn(base: str, slug: str) -> dict[str, object]:
    async with websockets.connect(base.replace("http", "ws", 1) + f"/ws/chat/{slug}") as ws:
        ready = json.loads(await asyncio.wait_for(ws.recv(), 20))
        assert ready["type"] == "ready" and ready["resumed"] is False
        await ws.send(json.dumps({"type": "start", "id": 1}))
        reply: dict[str, object] = json.loads(await asyncio.wait_for(ws.recv(), 20))
        return reply


async def first_event(lines: AsyncIterator[str]) -> tuple[str, Any]:
    """The first `event:`/`data:` pair read from an open SSE response's lines. The caller
    holds the iterator: a dropped one is closed when collected, and so is the stream."""
    name = ""
    async for line in lines:
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and name:
            return name, json.loads(line.split(":", 1)[1])
    raise AssertionError("the stream ended without an event")


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """A database of this test's own: the served process ticks with the real clock over
    every row of its database."""
    return settings_for(database_of_its_own(database_url, tmp_path, "served"), tmp_path)


@pytest.mark.parametrize("kind", ["granian", "uvicorn"])
async def test_each_server_keeps_websockets_sse_proxies_and_graceful_stop(
    kind: str,
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    settings: Settings,
    tmp_path: Path,
) -> None:
    shop = await shop_with_flow(app_client, ctx, tenant)
    slug = await short_link(ctx, tenant)
    stream_path = f"/e/{shop.event_id}/availability/stream"
    with serving(kind, tmp_path, settings.resolved_database_url) as (base, process):
        # A chat turn over a real WebSocket.
        reply = await chat_turn(base, tenant.slug)
        assert reply["type"] == "messages" and reply["id"] == 1, reply
        assert reply["messages"], reply

        direct = httpx.AsyncClient(base_url=base, timeout=20)
        proxied = httpx.AsyncClient(
            base_url=base, timeout=20, transport=httpx.AsyncHTTPTransport(local_address=PROXY)
        )
        async with direct, proxied:
            # SSE: the stream's first event is the live stock, sent at once.
            async with direct.stream("GET", stream_path) as first:
                assert first.status_code == 200
                assert first.headers["content-type"].startswith("text/event-stream")
                first_lines = first.aiter_lines()
                name, data = await first_event(first_lines)
                assert name == "availability" and data[0]["available"] == 10, data
                # One stream per address (POPDROP_STREAM_MAX_PER_ADDRESS=1): the address
                # is the one the app believes. From an untrusted peer a forged header is
                # ignored: still 127.0.0.1, which holds its one stream.
                forged = {"X-Forwarded-For": "10.0.0.7"}
                refused = await direct.get(stream_path, headers=forged, timeout=5)
                assert refused.status_code == 429, refused.text
                assert refused.json()["reason"] == "too_many_connections"
                # From the trusted proxy the header is believed: a new client address.
                async with proxied.stream("GET", stream_path, headers=forged) as second:
                    assert second.status_code == 200
                    second_lines = second.aiter_lines()
                    assert (await first_event(second_lines))[0] == "availability"
                    again = await proxied.get(stream_path, headers=forged, timeout=5)
                    assert again.status_code == 429, again.text

            # Clicks batched in memory, then SIGTERM at once: the graceful stop writes them.
            phone = {"User-Agent": PHONE, "Accept": "text/html"}
            answers = await asyncio.gather(
                *(direct.get(f"/s/{slug}", headers=phone) for _ in range(40))
            )
        assert {r.status_code for r in answers} == {302}
        process.send_signal(signal.SIGTERM)
        # Granian exits 0; uvicorn, after its graceful stop, raises the signal it caught
        # again (so the exit status says what stopped it).
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert await clicks(ctx, tenant.org_id) == 40


def test_serve_refuses_an_unknown_server(tmp_path: Path) -> None:
    env = {**os.environ, "POPDROP_DATA_DIR": str(tmp_path), "POPDROP_SECRET_KEY": SECRET}
    done = subprocess.run(
        [sys.executable, "-m", "popdrop", "serve", "--server", "hypercorn", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "--server must be one of uvicorn, granian" in done.stderr
