"""Long-lived responses: streamed CSV downloads, server-sent event streams, and the caps
on how many long-lived connections (SSE streams, chat sockets) a process keeps open.

Rules kept here:
- A refusal comes before the response starts: a CSV export's checks run first (a proper
  4xx, not a cut-off file); a connection over its cap gets a `PopdropError` with a reason
  (`too_many_connections` 429 for one address, `server_busy` 503 for the process) and a
  `Retry-After`, never a stream that opens and dies.
- What a long-lived response holds (a read session, a cap slot, a subscription) is let go
  exactly once when it ends, however it ends: finished, timed out, client gone, cancelled.
- An SSE stream ends by itself after its idle time (nothing new to send) or its lifetime
  (jittered, so reconnects do not come in one wave); the browser's EventSource reconnects.
  Keep-alive comments between events find dead peers; they do not count as activity.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

from popdrop.core.errors import PopdropError
from popdrop.web.context import AppContext
from popdrop.web.security import NO_STORE

SSE_HEADERS = {**NO_STORE, "X-Accel-Buffering": "no"}
RETRY_AFTER_SECONDS = 30
LIFETIME_JITTER = 0.1  # a stream lives between 90 % and 100 % of its lifetime


async def csv_download(
    ctx: AppContext,
    open_export: Callable[[AsyncSession], Awaitable[AsyncIterator[str]]],
    filename: str,
) -> StreamingResponse:
    """Stream an export. Its checks run before the response starts (a refusal is a proper
    4xx, not a cut-off file); the read session then lives as long as the stream, closed by
    the stream's end or, if the client went away first, by the response's background task."""
    stack = AsyncExitStack()
    session = await stack.enter_async_context(ctx.db.reader())
    try:
        chunks = await open_export(session)
    except BaseException:
        await stack.aclose()
        raise

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await stack.aclose()

    return StreamingResponse(
        body(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"', **NO_STORE},
        background=BackgroundTask(stack.aclose),
    )


# ---------------------------------------------------------------- connection caps


class Lease:
    """One admitted connection; `release()` frees its place (a second call does nothing)."""

    def __init__(self, caps: ConnectionCaps, address: str) -> None:
        self._caps = caps
        self.address = address
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._caps._release(self.address)


class ConnectionCaps:
    """How many connections of one kind this process holds, per client address and in all.

    Counted in memory: connections are held by this process, so its own count is exact
    (each server process has its own caps)."""

    def __init__(self, noun: str, *, per_address: int, total: int) -> None:
        self.noun = noun
        self.per_address = per_address
        self.total = total
        self._by_address: dict[str, int] = {}
        self._open = 0

    @property
    def open(self) -> int:
        return self._open

    def admit(self, address: str) -> Lease:
        """A lease for one more connection, or a `PopdropError` saying which cap is full."""
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if self._by_address.get(address, 0) >= self.per_address:
            raise PopdropError(
                "too_many_connections",
                f"at most {self.per_address} {self.noun} per address are open at a time; "
                "close one or try again later",
                status=429,
                headers=retry,
                detail={"limit": self.per_address, "retry_after": RETRY_AFTER_SECONDS},
            )
        if self._open >= self.total:
            raise PopdropError(
                "server_busy",
                f"this server holds as many {self.noun} as it can; try again later",
                status=503,
                headers=retry,
                detail={"retry_after": RETRY_AFTER_SECONDS},
            )
        self._by_address[address] = self._by_address.get(address, 0) + 1
        self._open += 1
        return Lease(self, address)

    def _release(self, address: str) -> None:
        left = self._by_address.get(address, 0) - 1
        if left > 0:
            self._by_address[address] = left
        else:
            self._by_address.pop(address, None)
        self._open -= 1


def connection_caps(
    app: Any, name: str, noun: str, *, per_address: int, total: int
) -> ConnectionCaps:
    """The caps called `name` of this app, made on first use. They live on `app.state`
    because they count what this app's process holds (a test's app counts its own)."""
    key = f"connection_caps_{name}"
    caps: ConnectionCaps | None = getattr(app.state, key, None)
    if caps is None:
        caps = ConnectionCaps(noun, per_address=per_address, total=total)
        setattr(app.state, key, caps)
    return caps


# ---------------------------------------------------------------- server-sent events


@dataclass(frozen=True)
class StreamLimits:
    idle_seconds: float  # nothing new to send for this long: the stream ends
    max_seconds: float  # the stream ends after this long, whatever happens
    keepalive_seconds: float  # a comment line this often while nothing is sent


class StreamTimer:
    """The deadlines of one SSE stream (monotonic time)."""

    def __init__(self, limits: StreamLimits, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._limits = limits
        start = now()
        self.ends_at = start + limits.max_seconds * (1 - LIFETIME_JITTER * random.random())
        self.idle_at = start + limits.idle_seconds
        self.ping_at = start + limits.keepalive_seconds

    def timeout(self) -> float:
        """Seconds until the next thing to do (end or keep-alive)."""
        return max(0.0, min(self.ends_at, self.idle_at, self.ping_at) - self._now())

    def sent(self) -> None:
        now = self._now()
        self.idle_at = now + self._limits.idle_seconds
        self.ping_at = now + self._limits.keepalive_seconds

    def expired(self) -> str | None:
        """Why the stream must end now (`max_lifetime`, `idle_timeout`), else None."""
        now = self._now()
        if now >= self.ends_at:
            return "max_lifetime"
        if now >= self.idle_at:
            return "idle_timeout"
        return None

    def ping_due(self) -> bool:
        now = self._now()
        if now < self.ping_at:
            return False
        self.ping_at = now + self._limits.keepalive_seconds
        return True


def sse_event(event: str, data: str) -> str:
    """One SSE event; `data` is a single line (compact JSON)."""
    return f"event: {event}\ndata: {data}\n\n"


def sse_end(reason: str) -> str:
    """The last event of a stream that the server ends; EventSource reconnects after it."""
    return sse_event("end", f'{{"reason": "{reason}"}}')


SSE_KEEPALIVE = ": keepalive\n\n"


class EventStream(StreamingResponse):
    """A `text/event-stream` response that calls each `on_close` once when it ends, however
    it ends (the generator's own `finally` does not run if it was never started)."""

    def __init__(
        self, content: AsyncIterator[str], on_close: Sequence[Callable[[], None]] = ()
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = tuple(on_close)
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for close in self._on_close:
                close()
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(RuntimeError):  # still running: it is being cancelled
                    await aclose()
