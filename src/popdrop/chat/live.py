"""The web chat sockets open in this process, and the relay that reaches those open in
another one, so scheduled messages (reminders, the day-after survey) and host messages
reach a visitor who is connected right now.

A push goes to the visitor's socket when it is open in this process. When it is not and
`POPDROP_REDIS_URL` is set, it is published on Redis pub/sub (`RELAY_CHANNEL`); every
`popdrop serve` process listens (`Relay.listen`, started with the server) and hands it
to the socket if it holds it. So a reminder woken by a `popdrop worker`, or a host reply
taken by another server process, reaches a visitor connected anywhere. Pub/sub keeps
nothing: a visitor connected nowhere gets nothing (web chat has no address to reach
someone who left; the widget keeps its transcript in the browser).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from popdrop.core.logging import log

Send = Callable[[dict[str, Any]], Awaitable[None]]

RELAY_CHANNEL = "popdrop:chat:web"
RECONNECT_SECONDS = 1.0

_OPEN: dict[tuple[int, str], Send] = {}


def register(org_id: int, address: str, send: Send) -> None:
    _OPEN[(org_id, address)] = send


def unregister(org_id: int, address: str, send: Send) -> None:
    if _OPEN.get((org_id, address)) is send:
        del _OPEN[(org_id, address)]


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
    """Pushes between processes over Redis pub/sub."""

    def __init__(self, url: str) -> None:
        self._redis = Redis.from_url(url)

    async def publish(self, org_id: int, address: str, frame: dict[str, Any]) -> int:
        """Hand `frame` to every listening server process; how many were listening."""
        payload = {"org_id": org_id, "address": address, "frame": frame}
        return int(await self._redis.publish(RELAY_CHANNEL, json.dumps(payload)))

    async def listen(self, ready: asyncio.Event | None = None) -> None:
        """Deliver relayed frames to the sockets open in this process, until cancelled;
        subscribes again after a lost connection. `ready` is set once subscribed."""
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(RELAY_CHANNEL)
                    async for message in pubsub.listen():
                        if message["type"] == "subscribe" and ready is not None:
                            ready.set()
                        elif message["type"] == "message":
                            await _deliver(message["data"])
            except (RedisError, OSError) as exc:
                log.warning("chat relay lost Redis, subscribing again", error=repr(exc))
                await asyncio.sleep(RECONNECT_SECONDS)

    async def close(self) -> None:
        await self._redis.aclose()


async def _deliver(data: bytes) -> None:
    try:
        payload = json.loads(data)
        key = (int(payload["org_id"]), str(payload["address"]))
        frame = payload["frame"]
    except (ValueError, KeyError, TypeError):
        log.warning("chat relay: unreadable message ignored")
        return
    if isinstance(frame, dict):
        await push(*key, frame)
