"""Web chat sockets are bounded: a cap per client address and one per process (the
connection over it is told why and closed with 1013, try again later), and a socket
whose visitor sends nothing for the idle time is closed (4408) and gives its place back.

Driven in-process through ASGI like tests/chat/test_web.py, each socket from its own
client address."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any

import pytest
from fastapi import FastAPI

from popdrop.app import build_context, create_app
from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.web.context import AppContext
from popdrop.web.streaming import ConnectionCaps
from tests.conftest import make_tenant

SAFETY = 30.0  # seconds: a hang guard, not a speed assertion


class Socket:
    def __init__(self, app: FastAPI, path: str, address: str) -> None:
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"test")],
            "server": ("test", 80),
            "client": (address, 5555),
            "subprotocols": [],
            "state": {},
        }
        self.task = asyncio.create_task(app(scope, self.to_app.get, self.from_app.put))

    async def connect(self) -> dict[str, Any]:
        """Connect; the first frame (ready, or the refusal)."""
        await self.to_app.put({"type": "websocket.connect"})
        accepted = await self.next()
        assert accepted["type"] == "websocket.accept", accepted
        return await self.frame()

    async def next(self) -> MutableMapping[str, Any]:
        async with asyncio.timeout(SAFETY):
            return await self.from_app.get()

    async def frame(self) -> dict[str, Any]:
        message = await self.next()
        assert message["type"] == "websocket.send", message
        data: dict[str, Any] = json.loads(message["text"])
        return data

    async def closed(self) -> MutableMapping[str, Any]:
        message = await self.next()
        assert message["type"] == "websocket.close", message
        async with asyncio.timeout(SAFETY):
            await self.task
        return message

    async def leave(self) -> None:
        await self.to_app.put({"type": "websocket.disconnect", "code": 1000})
        async with asyncio.timeout(SAFETY):
            await self.task


@pytest.fixture
async def chat_app(settings: Settings, clock: FrozenClock) -> AsyncIterator[Callable[..., Any]]:
    made: list[AppContext] = []

    async def factory(**limits: Any) -> tuple[FastAPI, str]:
        ctx = build_context(settings.model_copy(update=limits), clock=clock)
        made.append(ctx)
        tenant = await make_tenant(ctx)
        return create_app(ctx=ctx), f"/ws/chat/{tenant.slug}"

    yield factory
    for ctx in made:
        await ctx.guard.counter.close()
        await ctx.db.dispose()


def caps_of(app: FastAPI) -> ConnectionCaps:
    caps: ConnectionCaps = app.state.connection_caps_chat_socket
    return caps


async def test_caps_per_address_and_overall_refuse_with_a_reason(
    chat_app: Callable[..., Any],
) -> None:
    app, path = await chat_app(chat_max_per_address=2, chat_max_total=3)
    mine = [Socket(app, path, "10.7.0.1") for _ in range(2)]
    for socket in mine:
        assert (await socket.connect())["type"] == "ready"

    third = Socket(app, path, "10.7.0.1")
    refusal = await third.connect()
    assert refusal["type"] == "error" and refusal["reason"] == "too_many_connections"
    assert refusal["limit"] == 2 and refusal["retry_after"] > 0
    assert (await third.closed())["code"] == 1013

    other = Socket(app, path, "10.7.0.2")
    assert (await other.connect())["type"] == "ready"
    busy = Socket(app, path, "10.7.0.3")
    refused = await busy.connect()
    assert refused["reason"] == "server_busy" and refused["retry_after"] > 0
    assert (await busy.closed())["code"] == 1013

    # A visitor who leaves frees a place for their address.
    await mine[0].leave()
    again = Socket(app, path, "10.7.0.1")
    assert (await again.connect())["type"] == "ready"
    for socket in (mine[1], other, again):
        await socket.leave()
    assert caps_of(app).open == 0


async def test_an_idle_socket_is_closed_and_gives_its_place_back(
    chat_app: Callable[..., Any],
) -> None:
    app, path = await chat_app(chat_idle_seconds=0.2, chat_max_per_address=1)
    quiet = Socket(app, path, "10.8.0.1")
    assert (await quiet.connect())["type"] == "ready"
    closed = await quiet.closed()
    assert closed["code"] == 4408 and closed.get("reason") == "idle_timeout"
    assert caps_of(app).open == 0
    # The same visitor address comes back (the widget reconnects): admitted.
    back = Socket(app, path, "10.8.0.1")
    assert (await back.connect())["type"] == "ready"
    await back.leave()
