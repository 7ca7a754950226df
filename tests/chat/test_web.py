"""The web chat channel: the WebSocket protocol, visitor tokens, bad frames, the page and
the ticket QR image (SQLite, and PostgreSQL when POPDROP_TEST_DATABASE_URL is set).

The socket is driven in-process through the ASGI interface, on the test's own event loop
(the app's database pool lives on it too)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any

import httpx
from fastapi import FastAPI

from popdrop.chat import web
from popdrop.core import links
from popdrop.core.signing import Signer
from popdrop.web.context import AppContext
from tests.chat.test_service import shop_with_flow
from tests.conftest import Tenant, make_tenant

Frame = dict[str, Any]


class Socket:
    """A WebSocket client speaking ASGI straight to the app."""

    def __init__(self, app: FastAPI, path: str, query: str = "") -> None:
        self.app = app
        self.path = path
        self.query = query
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.close_code: int | None = None

    async def __aenter__(self) -> Socket:
        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query.encode(),
            "headers": [(b"host", b"test")],
            "server": ("test", 80),
            "client": ("127.0.0.1", 5555),
            "subprotocols": [],
            "state": {},
        }
        self.task = asyncio.create_task(self.app(scope, self.to_app.get, self.from_app.put))
        await self.to_app.put({"type": "websocket.connect"})
        accepted = await self._next()
        assert accepted["type"] == "websocket.accept", accepted
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        await self.to_app.put({"type": "websocket.disconnect", "code": 1000})
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)

    async def _next(self) -> MutableMapping[str, Any]:
        return await asyncio.wait_for(self.from_app.get(), 20)

    async def send(self, frame: Frame) -> None:
        await self.send_text(json.dumps(frame))

    async def send_text(self, text: str) -> None:
        await self.to_app.put({"type": "websocket.receive", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        await self.to_app.put({"type": "websocket.receive", "bytes": data})

    async def receive(self) -> Frame:
        message = await self._next()
        if message["type"] == "websocket.close":
            self.close_code = message.get("code")
            return {"type": "closed", "code": self.close_code}
        assert message["type"] == "websocket.send", message
        data: Frame = json.loads(message["text"])
        return data

    async def turn(self, frame: Frame) -> Frame:
        await self.send(frame)
        return await self.receive()


def app_of(ctx: AppContext) -> FastAPI:
    from popdrop.app import create_app

    return create_app(ctx=ctx)


def labels(reply: Frame) -> dict[str, str]:
    """Button label → payload, across buttons, cards and carousels."""
    found: dict[str, str] = {}
    for message in reply["messages"]:
        items = message.get("cards") if message["kind"] == "carousel" else [message]
        for item in items or []:
            for button in item.get("buttons") or []:
                if button.get("payload"):
                    found.setdefault(button["label"], button["payload"])
    return found


def said(reply: Frame) -> str:
    return "\n".join(str(m.get("text", "")) for m in reply["messages"])


async def test_round_trip_through_the_default_flow(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    app = app_of(ctx)
    async with Socket(app, f"/ws/chat/{tenant.slug}") as ws:
        ready = await ws.receive()
        assert ready["type"] == "ready" and ready["resumed"] is False
        assert links.read_visitor(ctx.signer, tenant.org_id, ready["visitor"])
        hello = await ws.turn({"type": "start", "id": 1})
        assert hello["type"] == "messages" and hello["id"] == 1
        kinds = [m["kind"] for m in hello["messages"]]
        assert "countdown" in kinds and "buttons" in kinds
        assert "pops up at" in said(hello)
        drop = await ws.turn({"type": "button", "payload": labels(hello)["See the drop"]})
        [carousel] = [m for m in drop["messages"] if m["kind"] == "carousel"]
        assert carousel["cards"][0]["title"] == "Tote bag"
        slots = await ws.turn({"type": "button", "payload": labels(drop)["RSVP a time slot"]})
        [pick] = [m for m in slots["messages"] if m["kind"] == "buttons"]
        ask = await ws.turn({"type": "button", "payload": pick["buttons"][0]["payload"]})
        assert said(ask) == "What email should we send your ticket to?"
        confirm = await ws.turn({"type": "text", "text": "ana@example.com"})
        booked = await ws.turn({"type": "button", "payload": labels(confirm)["Yes, book it"]})
        [ticket] = [m for m in booked["messages"] if m["kind"] == "qr_ticket"]
        assert "Your code for 10% off" in said(booked)
        pong = await ws.turn({"type": "ping", "id": "p"})
        assert pong == {"type": "pong", "id": "p"}

    # The widget shows the ticket's QR as an image; a made-up secret has none.
    qr = await app_client.get(f"/chat/qr/{ticket['secret']}.svg")
    assert qr.status_code == 200 and qr.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in qr.content and qr.headers["cache-control"] == "no-store"
    assert (await app_client.get("/chat/qr/not-a-ticket.svg")).status_code == 404


async def test_bad_frames_get_a_reason_and_the_socket_stays_open(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    async with Socket(app_of(ctx), f"/ws/chat/{tenant.slug}") as ws:
        await ws.receive()
        cases: list[tuple[str | bytes, str]] = [
            ("not json", "bad_json"),
            ("[1, 2]", "bad_json"),
            (json.dumps({"type": "shout"}), "unknown_type"),
            (json.dumps({"type": "text", "text": ""}), "invalid_frame"),
            (json.dumps({"type": "text", "text": "hi", "extra": 1}), "invalid_frame"),
            (json.dumps({"type": "button", "payload": None, "id": 7}), "invalid_frame"),
            ("x" * (web.MAX_FRAME + 1), "frame_too_large"),
            (b"\x00\x01", "bad_frame"),
        ]
        for raw, reason in cases:
            if isinstance(raw, bytes):
                await ws.send_bytes(raw)
            else:
                await ws.send_text(raw)
            answer = await ws.receive()
            assert answer["type"] == "error" and answer["reason"] == reason, (raw, answer)
            assert answer["message"]
            await asyncio.sleep(web.BURST / web.RATE_PER_S / len(cases))  # stay under the limit
        bad_id = await ws.turn({"type": "button", "payload": None, "id": 7})
        assert bad_id["id"] == 7
        # Still serving: a good frame after the bad ones runs a turn.
        hello = await ws.turn({"type": "start"})
        assert hello["type"] == "messages" and "pops up at" in said(hello)


async def test_rate_limited_per_connection(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    async with Socket(app_of(ctx), f"/ws/chat/{tenant.slug}") as ws:
        await ws.receive()
        answers = []
        for _ in range(int(web.BURST) + 5):
            answers.append(await ws.turn({"type": "ping"}))
        reasons = [a.get("reason") for a in answers]
        assert reasons.count("rate_limited") >= 4
        assert answers[0] == {"type": "pong"}


async def test_reconnect_with_the_visitor_token_resumes_the_conversation(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    app = app_of(ctx)
    async with Socket(app, f"/ws/chat/{tenant.slug}") as ws:
        token = (await ws.receive())["visitor"]
        hello = await ws.turn({"type": "start"})
        slots = await ws.turn({"type": "button", "payload": labels(hello)["RSVP a time slot"]})
        [pick] = [m for m in slots["messages"] if m["kind"] == "buttons"]

    async with Socket(app, f"/ws/chat/{tenant.slug}", f"visitor={token}") as again:
        ready = await again.receive()
        assert ready == {"type": "ready", "visitor": token, "resumed": True}
        # The slot buttons shown before the reload still answer the same conversation.
        ask = await again.turn({"type": "button", "payload": pick["buttons"][0]["payload"]})
        assert said(ask) == "What email should we send your ticket to?"

    # A new visitor (no token) starts its own conversation.
    async with Socket(app, f"/ws/chat/{tenant.slug}") as other:
        fresh = await other.receive()
        assert fresh["visitor"] != token and fresh["resumed"] is False
        answer = await other.turn({"type": "button", "payload": pick["buttons"][0]["payload"]})
        assert "What email" not in said(answer)


async def test_forged_or_foreign_visitor_tokens_are_refused(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    other = await make_tenant(ctx)
    theirs, _ = web.new_visitor(ctx.signer, other.org_id)
    forged, _ = web.new_visitor(Signer(b"another-secret-key-" + b"x" * 40), tenant.org_id)
    mine, _ = web.new_visitor(ctx.signer, tenant.org_id)
    tampered = mine[:-2] + ("AA" if not mine.endswith("AA") else "BB")
    app = app_of(ctx)
    for token in (theirs, forged, tampered, "garbage"):
        async with Socket(app, f"/ws/chat/{tenant.slug}", f"visitor={token}") as ws:
            refused = await ws.receive()
            assert refused["type"] == "error" and refused["reason"] == "visitor_invalid"
            closed = await ws.receive()
            assert closed == {"type": "closed", "code": web.CLOSE_REFUSED}


async def test_unknown_organization_closes_the_socket(ctx: AppContext) -> None:
    async with Socket(app_of(ctx), "/ws/chat/no-such-org") as ws:
        answer = await ws.receive()
        assert answer["type"] == "error" and answer["reason"] == "not_found"
        assert await ws.receive() == {"type": "closed", "code": web.CLOSE_NOT_FOUND}


async def test_no_published_flow_is_an_error_frame(ctx: AppContext, tenant: Tenant) -> None:
    async with Socket(app_of(ctx), f"/ws/chat/{tenant.slug}") as ws:
        await ws.receive()
        answer = await ws.turn({"type": "start", "id": "s"})
        assert answer["type"] == "error" and answer["reason"] == "not_found"
        assert answer["id"] == "s"


async def test_chat_page_embeds_the_widget(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    page = await app_client.get(f"/chat/{tenant.slug}?ref=drop")
    assert page.status_code == 200
    assert 'src="/static/chat-widget.js"' in page.text
    assert f'data-org="{tenant.slug}"' in page.text and 'data-ref="drop"' in page.text
    widget = await app_client.get("/static/chat-widget.js")
    assert widget.status_code == 200 and "WebSocket" in widget.text
    missing = await app_client.get("/chat/no-such-org", headers={"accept": "text/html"})
    assert missing.status_code == 404


def test_bench_echo_route_is_off_by_default() -> None:
    """The diagnostic echo socket (bench/chat.py) exists only with POPDROP_BENCH_ECHO=1."""
    from popdrop.chat import web as chat_web

    assert not chat_web.BENCH_ECHO
    paths = {getattr(route, "path", "") for route in chat_web.router.routes}
    assert "/ws/bench/echo" not in paths
