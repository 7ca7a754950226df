"""One pure-ASGI middleware for what every request needs: a body size cap, security
headers on every response (`web.security`), Prometheus metrics and a structured access log."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from popdrop.core.errors import PopdropError
from popdrop.core.logging import log
from popdrop.web.security import add_missing, security_headers

REQUESTS = Counter("popdrop_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "popdrop_http_request_seconds",
    "HTTP request latency",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


class EdgeMiddleware:
    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, log_requests: bool, https: bool = False
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.log_requests = log_requests
        self.https = https  # the base URL is https: HSTS on every response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            await _too_large(send, self.max_body, self._headers(scope))
            status["code"] = 413
            self._record(scope, status["code"], started)
            return

        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise PopdropError(
                        "payload_too_large", f"request body is over {self.max_body} bytes"
                    )
            return message

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                # The route is known by now, so the chat page can be told from the rest.
                message = {
                    **message,
                    "headers": add_missing(message.get("headers", []), self._headers(scope)),
                }
            await send(message)

        try:
            await self.app(scope, capped_receive, recording_send)
        finally:
            self._record(scope, status["code"], started)

    def _headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        route = getattr(scope.get("route"), "path", None)
        return security_headers(route, https=self.https)

    def _record(self, scope: Scope, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        REQUESTS.labels(scope["method"], route, str(status)).inc()
        LATENCY.labels(route).observe(elapsed)
        if self.log_requests:
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                route=route,
                status=status,
                ms=round(elapsed * 1000, 2),
            )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Send, limit: int, extra: list[tuple[bytes, bytes]]) -> None:
    body = (
        b'{"reason":"payload_too_large","message":"request body is over '
        + str(limit).encode()
        + b' bytes"}'
    )
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
