"""The web chat sockets open in this process, and the relay that reaches those open in
another one, so scheduled messages (reminders, the day-after survey) and host messages
reach a visitor who is connected right now.

Such messages are first kept in the visitor's inbox (`chat.inbox`). The process that
took them hands them to the visitor's socket when it is open there; when it is not and
`POPDROP_REDIS_URL` is set, it publishes the inbox row's id on Redis pub/sub
(`RELAY_CHANNEL`); every `popdrop serve` process listens (`Relay.listen`, started with the
server) and hands the row over if it holds the socket. So a reminder woken by a
`popdrop worker`, or a host reply taken by another server process, reaches a visitor
connected anywhere, and one connected nowhere gets it when they come back.

Redis is optional at run time: publishing fails fast (a short timeout, no retries) and the
caller keeps the row for the visitor's next connect; the listener subscribes again after a
lost connection, once a second, until Redis is back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from popdrop.core.logging import log
from popdrop.core.ratelimit import redis_client

Send = Callable[[dict[str, Any]], Awaitable[None]]
OnRelayed = Callable[[int, str, int], Awaitable[object]]  # org id, address, inbox row id

CHANNEL = "web"
RELAY_CHANNEL = "popdrop:chat:web"
RECONNECT_SECONDS = 1.0
PUBLISH_TIMEOUT_SECONDS = 0.5

_OPEN: dict[tuple[int, str], Send] = {}


def register(org_id: int, address: str, send: Send) -> None:
    _OPEN[(org_id, address)] = send


def unregister(org_id: int, address: str, send: Send) -> None:
    if _OPEN.get((org_id, address)) is send:
        del _OPEN[(org_id, address)]


def is_open(org_id: int, address: str) -> bool:
    return (org_id, address) in _OPEN


async def push(org_id: int, address: str, frame: dict[str, Any]) -> bool:
    """Send `frame` to the visitor's open socket; False when they are not connected here."""
    send = _OPEN.get((org_id, address))
    if send is None:
        return False
    try:
        await send(frame)
    except Exception:  # closed meanwhile: the socket's own loop cleans up
        return False
    return True


class Relay:
    """Inbox rows for sockets open in other processes, over Redis pub/sub."""

    def __init__(self, url: str, *, timeout: float = PUBLISH_TIMEOUT_SECONDS) -> None:
        # Two clients: publishing fails fast; the subscriber's reads block (no read timeout).
        self._redis = redis_client(url, timeout=timeout)
        self._subscriber = redis_client(url, timeout=None)

    async def publish(self, org_id: int, address: str, inbox_id: int) -> int:
        """Tell every listening server process about a kept row; how many were listening."""
        payload = {"org_id": org_id, "address": address, "inbox_id": inbox_id}
        return int(await self._redis.publish(RELAY_CHANNEL, json.dumps(payload)))

    async def listen(self, on_relayed: OnRelayed, ready: asyncio.Event | None = None) -> None:
        """Call `on_relayed` for each row announced while a socket of its visitor is open
        here, until cancelled; subscribes again after a lost connection. `ready` is set once
        subscribed."""
        while True:
            try:
                async with self._subscriber.pubsub() as pubsub:
                    await pubsub.subscribe(RELAY_CHANNEL)
                    async for message in pubsub.listen():
                        if message["type"] == "subscribe" and ready is not None:
                            ready.set()
                        elif message["type"] == "message":
                            await _relayed(message["data"], on_relayed)
            except (RedisError, OSError) as exc:  # TimeoutError is an OSError
                log.warning("chat relay lost Redis, subscribing again", error=repr(exc))
                await asyncio.sleep(RECONNECT_SECONDS)

    async def close(self) -> None:
        await self._redis.aclose()
        await self._subscriber.aclose()


async def _relayed(data: bytes, on_relayed: OnRelayed) -> None:
    try:
        payload = json.loads(data)
        org_id, address = int(payload["org_id"]), str(payload["address"])
        inbox_id = int(payload["inbox_id"])
    except (ValueError, KeyError, TypeError):
        log.warning("chat relay: unreadable message ignored")
        return
    if not is_open(org_id, address):
        return
    try:
        await on_relayed(org_id, address, inbox_id)
    except Exception as exc:  # the listener outlives one bad hand-over; the row stays kept
        log.error("chat relay: hand-over failed", error=repr(exc))
