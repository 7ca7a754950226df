"""What a request handler needs from the process: settings, database, signer, clock, and
who the client is.

The client's address is the socket peer's, unless that peer is one of the configured
trusted proxies (`POPDROP_TRUSTED_PROXIES`, none by default): only then are its
`X-Forwarded-For` / `X-Forwarded-Proto` believed, walking X-Forwarded-For from the right
past trusted hops, so a client cannot choose its own address by sending the header.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from popdrop.core.clock import Clock
from popdrop.core.config import Settings
from popdrop.core.db import Database
from popdrop.core.ratelimit import GuessGuard
from popdrop.core.signing import Signer

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class AppContext:
    settings: Settings
    db: Database
    signer: Signer
    clock: Clock
    guard: GuessGuard
    worker: Any = None  # popdrop.worker.Worker while serving (in-process background work)
    # API tokens being looked up right now: a burst that finds the token cache expired waits
    # on one look-up instead of each request taking a pool connection for the same row.
    token_lookups: dict[str, asyncio.Future[Any]] = field(default_factory=dict)


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


async def request_ctx(request: Request) -> AppContext:
    """`get_ctx` as a dependency. Async on purpose: FastAPI runs a plain `def` dependency in
    its thread pool, a hand-off every request would pay (seen at 4-7 % of a hot path's
    samples)."""
    return get_ctx(request)


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def route_of(request: Request) -> str:
    """The matched route's path template (`/api/v1/public/waitlist/claim`), for per-route
    counters that a client cannot multiply by varying ids in the URL."""
    route = request.scope.get("route")
    return str(getattr(route, "path", request.url.path))


def parse_proxies(spec: str) -> tuple[Network, ...]:
    """`10.0.0.1, 10.1.0.0/16` → networks; raises ValueError on a malformed entry."""
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()
    )


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def forwarded_client(peer: str, forwarded_for: str, proxies: tuple[Network, ...]) -> str:
    """The client address for a request from `peer` carrying `forwarded_for`."""
    client = peer
    if not _trusted(peer, proxies):
        return client
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:  # garbage a client put in the header: stop at the last proxy
            break
        client = hop
        if not _trusted(hop, proxies):
            break
    return client


class ForwardedMiddleware:
    """Rewrite the ASGI scope's client (and scheme) from a trusted proxy's headers."""

    def __init__(self, app: ASGIApp, *, trusted_proxies: tuple[Network, ...]) -> None:
        self.app = app
        self.proxies = trusted_proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.proxies and scope.get("client"):
            peer_host, peer_port = scope["client"]
            if _trusted(peer_host, self.proxies):
                # Repeated headers read as one list, in order (RFC 9110 field combining).
                forwarded = ",".join(
                    v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"
                )
                protos = [
                    v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-proto"
                ]
                scope = dict(scope)
                scope["client"] = (forwarded_client(peer_host, forwarded, self.proxies), peer_port)
                proto = protos[-1].split(",")[-1].strip().lower() if protos else ""
                if proto in ("http", "https"):
                    secure = proto == "https"
                    if scope["type"] == "websocket":
                        scope["scheme"] = "wss" if secure else "ws"
                    else:
                        scope["scheme"] = proto
        await self.app(scope, receive, send)
