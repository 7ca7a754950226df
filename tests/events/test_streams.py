"""The public live-stock stream under load and abuse: many streams share one publisher
(one database read per change for all of them), caps per address and overall refuse
before the stream starts, and streams end after their idle time or lifetime.

Streams are driven in-process straight through the ASGI interface (no sockets), so 400
of them are cheap and each can come from its own client address. Waits are bounded by a
generous safety timeout only; nothing here asserts how fast anything is (see
bench/streams.py for that).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event

from popdrop.app import build_context, create_app
from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.inventory import live, service
from popdrop.web.context import AppContext
from popdrop.web.streaming import ConnectionCaps
from tests.conftest import make_tenant
from tests.events.helpers import Shop, make_shop, post

SAFETY = 60.0  # seconds: a hang guard, not a speed assertion


class Stream:
    """One GET of the stream, spoken as ASGI to the app from a given client address."""

    def __init__(self, app: FastAPI, path: str, address: str) -> None:
        self.app = app
        self.path = path
        self.address = address
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.text = ""
        self.finished = False
        self._asked = False
        self._gone = asyncio.Event()
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"test"), (b"accept", b"text/event-stream")],
            "client": (self.address, 40000),
            "server": ("test", 80),
            "state": {},
        }
        try:
            await self.app(scope, self._receive, self._send)
        finally:
            self.finished = True
            self._notify()

    async def _receive(self) -> dict[str, Any]:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            self.text += message.get("body", b"").decode()
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def until(self, done: Callable[[Stream], bool]) -> None:
        async with asyncio.timeout(SAFETY):
            while not done(self):
                await self._changed.wait()

    def events(self, name: str = "availability") -> list[Any]:
        """The data of every `name` event received so far."""
        found = []
        for block in self.text.split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if lines.get("event") == name:
                found.append(json.loads(lines["data"]))
        return found

    def available(self) -> int | None:
        seen = self.events()
        return seen[-1][0]["available"] if seen else None

    def body(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.text)
        return data

    async def close(self) -> None:
        self._gone.set()
        async with asyncio.timeout(SAFETY):
            await self.task


def started(stream: Stream) -> bool:
    return stream.finished or bool(stream.events())


async def open_streams(app: FastAPI, shop: Shop, addresses: list[str]) -> list[Stream]:
    streams = [Stream(app, f"/e/{shop.event_id}/availability/stream", a) for a in addresses]
    for stream in streams:
        await stream.until(lambda s: s.status is not None and (s.status != 200 or started(s)))
    return streams


class Live:
    """An app (and an API client on it) with its own stream settings."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.app = create_app(ctx=ctx)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://test"
        )

    @property
    def hub(self) -> live.StockHub:
        hub: live.StockHub = self.app.state.stock_hub
        return hub

    @property
    def caps(self) -> ConnectionCaps:
        caps: ConnectionCaps = self.app.state.connection_caps_stock_stream
        return caps


MakeLive = Callable[..., Awaitable[Live]]


@pytest.fixture
async def make_live(settings: Settings, clock: FrozenClock) -> AsyncIterator[MakeLive]:
    """Apps with their own stream settings; each is shut down after the test."""
    made: list[Live] = []

    async def factory(**limits: Any) -> Live:
        made.append(Live(build_context(settings.model_copy(update=limits), clock=clock)))
        return made[-1]

    yield factory
    for one in made:
        if getattr(one.app.state, "stock_hub", None) is not None:
            await one.hub.close()
        await one.client.aclose()
        await one.ctx.guard.counter.close()
        await one.ctx.db.dispose()


async def shop_of(one: Live, **options: Any) -> tuple[Shop, Any]:
    tenant = await make_tenant(one.ctx)
    shop = await make_shop(one.client, tenant, one.ctx.clock.now(), **options)
    return shop, tenant


def availability_sql(one: Live, shop: Shop) -> Callable[[], Any]:
    """Capture the SQL text the availability read runs, to count it among all statements."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    async def capture() -> str:
        engine = one.ctx.db.engine.sync_engine
        event.listen(engine, "before_cursor_execute", record)
        try:
            async with one.ctx.db.reader() as session:
                await service.availability(session, shop.event_id, one.ctx.clock.now())
        finally:
            event.remove(engine, "before_cursor_execute", record)
        [statement] = {text for text in seen if "stock" in text.lower()}  # not BEGIN etc.
        return statement

    return capture


async def test_400_streams_get_a_stock_change_from_one_database_read(make_live: MakeLive) -> None:
    # A long tick: only the change itself (a stock edit through the API) causes a read.
    one = await make_live(stream_tick_seconds=3600.0)
    shop, tenant = await shop_of(one, units=10)
    addresses = [f"10.1.{i // 200}.{i % 200 + 1}" for i in range(400)]
    streams = await open_streams(one.app, shop, addresses)
    assert {s.status for s in streams} == {200}
    assert {s.available() for s in streams} == {10}
    assert one.hub.listeners(shop.event_id) == 400
    assert one.caps.open == 400

    statement = await availability_sql(one, shop)()
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, text: str, *_args: Any) -> None:
        statements.append(text)

    engine = one.ctx.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        changed = await one.client.put(
            "/api/v1/stock",
            json={"variant_id": shop.variant_id, "lane_id": shop.lane_id, "total": 7},
            headers=tenant.headers,
        )
        assert changed.status_code == 200, changed.text
        for stream in streams:
            await stream.until(lambda s: s.available() == 7)
    finally:
        event.remove(engine, "before_cursor_execute", count)

    # Every one of the 400 saw the change, read from the database once for all of them.
    assert statements.count(statement) == 1
    assert all(len(s.events()) == 2 for s in streams)

    await asyncio.gather(*(s.close() for s in streams))
    # Everything a stream held is let go: its cap slot, its place at the publisher.
    assert one.caps.open == 0
    assert one.hub.listeners(shop.event_id) == 0


async def test_the_cap_per_address_refuses_the_next_stream_before_it_starts(
    make_live: MakeLive,
) -> None:
    one = await make_live(stream_max_per_address=3, stream_max_total=5)
    shop, _ = await shop_of(one)
    mine = await open_streams(one.app, shop, ["10.2.0.1"] * 3)
    assert [s.status for s in mine] == [200, 200, 200]

    [fourth] = await open_streams(one.app, shop, ["10.2.0.1"])
    await fourth.until(lambda s: s.finished)
    assert fourth.status == 429
    assert fourth.headers["content-type"] == "application/json"
    assert fourth.headers["retry-after"].isdigit()
    refusal = fourth.body()
    assert refusal["reason"] == "too_many_connections"
    assert "3" in refusal["message"] and refusal["limit"] == 3

    # Others are not affected by one address's streams, up to the overall cap.
    others = await open_streams(one.app, shop, ["10.2.0.2", "10.2.0.3"])
    assert [s.status for s in others] == [200, 200]
    [sixth] = await open_streams(one.app, shop, ["10.2.0.4"])
    await sixth.until(lambda s: s.finished)
    assert sixth.status == 503 and sixth.body()["reason"] == "server_busy"
    assert sixth.headers["retry-after"].isdigit()

    # Closing a stream frees its place for the same address.
    await mine[0].close()
    [again] = await open_streams(one.app, shop, ["10.2.0.1"])
    assert again.status == 200 and again.available() == 10
    await asyncio.gather(*(s.close() for s in [*mine[1:], *others, again]))
    assert one.caps.open == 0


async def test_refused_events_do_not_keep_a_place(make_live: MakeLive) -> None:
    one = await make_live(stream_max_per_address=1)
    draft, _ = await shop_of(one, status="draft", slug="draft")
    for _ in range(3):  # a 404 gives its place back: the cap of 1 never fills
        [stream] = await open_streams(one.app, draft, ["10.3.0.1"])
        await stream.until(lambda s: s.finished)
        assert stream.status == 404 and stream.body()["reason"] == "not_found"
    assert one.caps.open == 0


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        ({"stream_idle_seconds": 0.2}, "idle_timeout"),
        ({"stream_max_seconds": 0.2, "stream_keepalive_seconds": 0.05}, "max_lifetime"),
    ],
)
async def test_a_stream_ends_after_its_idle_time_or_lifetime(
    make_live: MakeLive, limits: dict[str, float], reason: str
) -> None:
    one = await make_live(**limits)
    shop, _ = await shop_of(one)
    [stream] = await open_streams(one.app, shop, ["10.4.0.1"])
    await stream.until(lambda s: s.finished)
    # It said why it ended, after telling the stock; EventSource reconnects after `retry`.
    assert stream.text.startswith("retry: ")
    assert stream.available() == 10
    assert stream.events("end") == [{"reason": reason}]
    assert one.caps.open == 0
    assert one.hub.listeners(shop.event_id) == 0
    # A reconnect is welcome and gets the current stock at once.
    [again] = await open_streams(one.app, shop, ["10.4.0.1"])
    assert again.status == 200 and again.available() == 10
    await again.close()


async def test_a_closed_event_ends_its_streams(
    make_live: MakeLive, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "STATUS_EVERY_SECONDS", 0.0)  # re-read the status every tick
    one = await make_live(stream_tick_seconds=0.05)
    shop, tenant = await shop_of(one)
    streams = await open_streams(one.app, shop, ["10.5.0.1", "10.5.0.2"])
    await post(one.client, tenant, f"/api/v1/events/{shop.event_id}/status", {"status": "live"})
    await post(one.client, tenant, f"/api/v1/events/{shop.event_id}/status", {"status": "closed"})
    for stream in streams:
        await stream.until(lambda s: s.finished)
        assert stream.events("end") == [{"reason": "event_closed"}]
    [late] = await open_streams(one.app, shop, ["10.5.0.3"])
    await late.until(lambda s: s.finished)
    assert late.status == 404
    assert one.caps.open == 0


async def test_holds_through_the_api_reach_open_streams_without_waiting_for_a_tick(
    make_live: MakeLive,
) -> None:
    one = await make_live(stream_tick_seconds=3600.0)
    shop, tenant = await shop_of(one, units=5)
    [stream] = await open_streams(one.app, shop, ["10.6.0.1"])
    hold = await post(
        one.client,
        tenant,
        "/api/v1/holds",
        {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "qty": 2},
    )
    await stream.until(lambda s: s.available() == 3)
    await post(one.client, tenant, f"/api/v1/holds/{hold['id']}/release", {})
    await stream.until(lambda s: s.available() == 5)
    assert [rows[0]["available"] for rows in stream.events()] == [5, 3, 5]
    await stream.close()
