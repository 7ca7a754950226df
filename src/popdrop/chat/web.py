"""The web chat channel: a WebSocket per visitor, a full-page chat and the ticket QR image.

- `WS /ws/chat/{org_slug}?visitor=TOKEN` — JSON frames. The server first sends
  `{"type": "ready", "visitor": TOKEN, "resumed": bool}`: the visitor token is a signed
  random visitor id (the widget keeps it in localStorage, so a reload resumes the
  conversation); a forged or foreign token is refused with an error frame and close code
  4403. Scheduled and host messages that waited for the visitor (`chat.inbox`) follow as
  `{"type": "messages", "messages": [...], "pushed": true}`, as do those pushed while the
  socket is open. The client sends `{"type": "start", "ref": …}`, `{"type": "text", "text": …}`,
  `{"type": "button", "payload": …}` or `{"type": "ping"}`, each with an optional `id`
  echoed in the answer: `{"type": "messages", "messages": [...], "status": …}`
  (`messages.to_json`). A bad frame gets `{"type": "error", "reason": …, "message": …}`
  and the socket stays open; frames are rate-limited per connection (token bucket).
- Connections are capped per client address and per process (`chat_max_per_address`,
  `chat_max_total`): one over a cap gets `{"type": "error", "reason":
  "too_many_connections" | "server_busy", "retry_after": s}` and close code 1013 (try
  again later). A socket whose visitor sends no frame for `chat_idle_seconds` is closed
  with code 4408 (`idle_timeout`); the widget reconnects and resumes, and what was pushed
  meanwhile waits in the inbox.
- `GET /chat/{org_slug}` — a page hosting the widget (`?ref=` is passed to the flow).
- `GET /chat/qr/{secret}.svg` — the QR image of a genuine ticket (the widget's
  `qr_ticket` message).
- The widget itself is `/static/chat-widget.js` (one script tag embeds it).
- `WS /ws/bench/echo` exists only when the environment sets `POPDROP_BENCH_ECHO=1` (read
  when this module is imported; never on by default, never in the OpenAPI schema): a
  diagnostic for bench/chat.py that sends every text frame straight back, so the bench
  measures the same server's WebSocket per-message ceiling beside its chat turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from popdrop.accounts import service as accounts
from popdrop.chat import conversations, inbox, live
from popdrop.chat import inbound as chat_inbound
from popdrop.chat.engine import Inbound
from popdrop.chat.messages import WEB, to_json
from popdrop.checkin import service as checkin
from popdrop.checkin import tickets
from popdrop.core import links, qr
from popdrop.core.errors import PopdropError
from popdrop.core.logging import log
from popdrop.core.signing import Signer
from popdrop.web.context import AppContext
from popdrop.web.params import Ctx
from popdrop.web.security import NO_STORE
from popdrop.web.streaming import ConnectionCaps, connection_caps
from popdrop.web.templating import render

CHANNEL = live.CHANNEL
MAX_FRAME = 4096  # characters in one client frame
RATE_PER_S = 5.0  # frames a connection may send per second, sustained…
BURST = 10.0  # …and in a burst
MAX_REFUSED = 50  # rate-limited frames before the connection is closed
CLOSE_REFUSED = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_ABUSE = 1008
CLOSE_TRY_LATER = 1013
CLOSE_IDLE = 4408

router = APIRouter(include_in_schema=False)
BENCH_ECHO = os.environ.get("POPDROP_BENCH_ECHO") == "1"


# ---------------------------------------------------------------- frames


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | int | None = None


class StartFrame(_Frame):
    type: Literal["start"]
    ref: str | None = Field(default=None, max_length=200)


class TextFrame(_Frame):
    type: Literal["text"]
    text: str = Field(min_length=1, max_length=2000)


class ButtonFrame(_Frame):
    type: Literal["button"]
    payload: str = Field(min_length=1, max_length=200)


class PingFrame(_Frame):
    type: Literal["ping"]


ClientFrame = Annotated[
    StartFrame | TextFrame | ButtonFrame | PingFrame, Field(discriminator="type")
]
_FRAMES: TypeAdapter[ClientFrame] = TypeAdapter(ClientFrame)


class FrameError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def parse_frame(raw: str) -> StartFrame | TextFrame | ButtonFrame | PingFrame:
    """A client frame, or `FrameError` with a machine-readable reason."""
    if len(raw) > MAX_FRAME:
        raise FrameError("frame_too_large", f"a frame is at most {MAX_FRAME} characters")
    try:
        data = orjson.loads(raw)
    except ValueError as exc:  # orjson.JSONDecodeError is one
        raise FrameError("bad_json", "a frame is one JSON object") from exc
    if not isinstance(data, dict):
        raise FrameError("bad_json", "a frame is one JSON object")
    if data.get("type") not in ("start", "text", "button", "ping"):
        raise FrameError("unknown_type", "type: one of start, text, button, ping")
    try:
        return _FRAMES.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "frame"
        raise FrameError("invalid_frame", f"{where}: {first.get('msg', 'invalid')}") from exc


def inbound_of(frame: StartFrame | TextFrame | ButtonFrame) -> Inbound:
    if isinstance(frame, StartFrame):
        return Inbound.start(frame.ref)
    if isinstance(frame, TextFrame):
        return Inbound.of_text(frame.text)
    return Inbound.button(frame.payload)


# ---------------------------------------------------------------- visitors


def new_visitor(signer: Signer, org_id: int) -> tuple[str, str]:
    """(token, visitor id): a random id, signed for this organization."""
    visitor = secrets.token_urlsafe(18)
    return links.visitor_token(signer, org_id, visitor), visitor


class Bucket:
    """A token bucket: `take()` is False when the connection sends too fast."""

    def __init__(self, rate: float = RATE_PER_S, burst: float = BURST) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


# ---------------------------------------------------------------- the socket


def _error(reason: str, message: str, frame_id: str | int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "reason": reason, "message": message}
    if frame_id is not None:
        body["id"] = frame_id
    return body


def _frame_id(raw: str) -> str | int | None:
    """The `id` of a frame that failed validation, when there is a usable one."""
    try:
        data = json.loads(raw) if len(raw) <= MAX_FRAME else None
    except ValueError:
        return None
    value = data.get("id") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return value if not isinstance(value, str) or len(value) <= 64 else None


async def _org_id(ctx: AppContext, slug: str) -> int:
    async with ctx.db.reader() as session:
        org = await accounts.get_organization_by_slug(session, slug)
        return int(org.id)


def _socket_caps(websocket: WebSocket, ctx: AppContext) -> ConnectionCaps:
    return connection_caps(
        websocket.app,
        "chat_socket",
        "chat connections",
        per_address=ctx.settings.chat_max_per_address,
        total=ctx.settings.chat_max_total,
    )


@router.websocket("/ws/chat/{org_slug}")
async def chat_socket(websocket: WebSocket, org_slug: str) -> None:
    ctx: AppContext = websocket.app.state.ctx
    await websocket.accept()
    address = websocket.client.host if websocket.client else "unknown"
    try:
        lease = _socket_caps(websocket, ctx).admit(address)
    except PopdropError as refused:  # accepted first so the refusal can say why
        try:
            await websocket.send_json({**_error(refused.reason, refused.message), **refused.detail})
            await websocket.close(CLOSE_TRY_LATER, refused.reason)
        except (WebSocketDisconnect, RuntimeError):
            pass
        return
    try:
        await _serve(websocket, ctx, org_slug)
    except WebSocketDisconnect:
        return
    except Exception as exc:  # the socket answers; it never takes the server down
        log.error("chat socket", error=repr(exc), exc_info=exc)
        if websocket.application_state == WebSocketState.CONNECTED:
            try:
                await websocket.send_json(_error("internal", "something broke on our side"))
                await websocket.close(1011)
            except (WebSocketDisconnect, RuntimeError):
                pass
    finally:
        lease.release()


async def _serve(websocket: WebSocket, ctx: AppContext, org_slug: str) -> None:
    try:
        org_id = await _org_id(ctx, org_slug)
    except PopdropError as error:
        await websocket.send_json(_error(error.reason, error.message))
        await websocket.close(CLOSE_NOT_FOUND)
        return
    token = websocket.query_params.get("visitor") or ""
    if token:
        visitor = links.read_visitor(ctx.signer, org_id, token)
        if visitor is None:
            await websocket.send_json(
                _error("visitor_invalid", "this chat session is not valid; start a new one")
            )
            await websocket.close(CLOSE_REFUSED)
            return
        resumed = True
    else:
        token, visitor = new_visitor(ctx.signer, org_id)
        resumed = False
    await websocket.send_json({"type": "ready", "visitor": token, "resumed": resumed})
    address = conversations.normalize_address(CHANNEL, visitor)
    send = websocket.send_json  # one object: unregister removes this socket, not a newer one
    live.register(org_id, address, send)
    try:
        if resumed:  # what reached nobody while they were away comes first
            await inbox.hand_over(ctx.db, ctx.signer, org_id, address)
        await _converse(websocket, ctx, org_id, visitor)
    finally:
        live.unregister(org_id, address, send)


async def _converse(websocket: WebSocket, ctx: AppContext, org_id: int, visitor: str) -> None:
    deps = conversations.ChatDeps(ctx.signer, ctx.settings.base_url)
    bucket = Bucket()
    refused = 0
    idle = ctx.settings.chat_idle_seconds
    while True:
        try:
            async with asyncio.timeout(idle):
                message = await websocket.receive()
        except TimeoutError:  # a forgotten tab or a dead peer: free the place
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await websocket.close(CLOSE_IDLE, "idle_timeout")
            return
        if message["type"] == "websocket.disconnect":
            return
        raw = message.get("text")
        if not bucket.take():
            refused += 1
            if refused > MAX_REFUSED:
                await websocket.close(CLOSE_ABUSE)
                return
            await websocket.send_json(
                _error("rate_limited", "slow down a little", _frame_id(raw) if raw else None)
            )
            continue
        if raw is None:
            await websocket.send_json(_error("bad_frame", "frames are JSON text"))
            continue
        try:
            frame = parse_frame(raw)
        except FrameError as error:
            await websocket.send_json(_error(error.reason, error.message, _frame_id(raw)))
            continue
        if isinstance(frame, PingFrame):
            reply: dict[str, Any] = {"type": "pong"}
            if frame.id is not None:
                reply["id"] = frame.id
            await websocket.send_json(reply)
            continue
        # A turn's answer is the hot frame: orjson writes the same compact JSON (UTF-8 kept).
        await websocket.send_text(
            orjson.dumps(await _turn(ctx, deps, org_id, visitor, frame)).decode()
        )


async def _turn(
    ctx: AppContext,
    deps: conversations.ChatDeps,
    org_id: int,
    visitor: str,
    frame: StartFrame | TextFrame | ButtonFrame,
) -> dict[str, Any]:
    try:
        result = await chat_inbound.handle(
            ctx.db,
            deps,
            org_id=org_id,
            channel=CHANNEL,
            address=visitor,
            inbound=inbound_of(frame),
            now=ctx.clock.now(),
            capabilities=WEB,
        )
    except PopdropError as error:
        return _error(error.reason, error.message, frame.id)
    reply: dict[str, Any] = {
        "type": "messages",
        "messages": to_json(result.messages),
        "status": result.status,
    }
    if frame.id is not None:
        reply["id"] = frame.id
    return reply


async def bench_echo(websocket: WebSocket) -> None:
    """Diagnostic (POPDROP_BENCH_ECHO=1 only): every text frame straight back."""
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        return


if BENCH_ECHO:
    router.add_api_websocket_route("/ws/bench/echo", bench_echo)


# ---------------------------------------------------------------- pages


@router.get("/chat/{org_slug}")
async def chat_page(request: Request, org_slug: str, ctx: Ctx, ref: str | None = None) -> Response:
    async with ctx.db.reader() as session:
        org = await accounts.get_organization_by_slug(session, org_slug)
    context = {"org": org, "ref": (ref or "")[:200]}
    return render(request, "chat/page.html", context)


@router.get("/chat/qr/{secret}.svg")
async def ticket_qr(secret: str, ctx: Ctx) -> Response:
    async with ctx.db.reader() as session:
        view = await checkin.open_ticket(session, secret)
    if not view.current or view.ticket.status != "valid":
        raise PopdropError("not_found", "this ticket is no longer valid")
    # The ticket's short code printed under the QR, for a door without a camera.
    code = tickets.format_short_code(tickets.short_code(secret))
    image = qr.svg_bytes(secret, scale=6, border=2, caption=code)
    return Response(image, media_type="image/svg+xml", headers=NO_STORE)
