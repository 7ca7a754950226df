"""Token revocations reach every server process at once, over Redis pub/sub.

Rules this module keeps:
- `accounts.revoke_token` signals `TOKENS_REVOKED` after its commit; a process that runs
  `TokenRevocations` (the server, from the app's lifespan; the CLI, for `token revoke`)
  publishes it on `REVOKED_CHANNEL`. Every server process listens and empties its cache of
  resolved tokens (`accounts.forget_tokens`), so the token's next call there reads the
  table and is refused. The message carries nothing: the cache only saves database reads,
  so emptying it whole is always safe, and no token hash leaves the process.
- Redis is optional at run time: publishing fails fast and a lost message is noticed
  within `POPDROP_TOKEN_CACHE_SECONDS` (the cache's TTL), as without Redis. The listener
  subscribes again after a lost connection, once a second, and empties the cache each
  time it (re)subscribes, since a revocation published meanwhile was missed.
"""

from __future__ import annotations

import asyncio

from redis.exceptions import RedisError

from popdrop.accounts import service as accounts
from popdrop.core.db import Database
from popdrop.core.logging import log
from popdrop.core.ratelimit import redis_client

REVOKED_CHANNEL = "popdrop:tokens:revoked"
RECONNECT_SECONDS = 1.0
PUBLISH_TIMEOUT_SECONDS = 0.5


class TokenRevocations:
    """Publishes this process's revocations and applies everyone's."""

    def __init__(self, url: str, *, timeout: float = PUBLISH_TIMEOUT_SECONDS) -> None:
        # Two clients: publishing fails fast; the subscriber's reads block (no read timeout).
        self._redis = redis_client(url, timeout=timeout)
        self._subscriber = redis_client(url, timeout=None)

    def publish_on_commit(self, db: Database) -> None:
        """Publish after every transaction of `db` that revoked a token."""
        db.on_commit_signal(accounts.TOKENS_REVOKED, self.publish)

    async def publish(self) -> int:
        """Tell every listening process; how many were listening."""
        return int(await self._redis.publish(REVOKED_CHANNEL, b"revoked"))

    async def listen(self, ready: asyncio.Event | None = None) -> None:
        """Empty this process's token cache on each revocation, until cancelled. `ready`
        is set once subscribed."""
        while True:
            try:
                async with self._subscriber.pubsub() as pubsub:
                    await pubsub.subscribe(REVOKED_CHANNEL)
                    async for message in pubsub.listen():
                        if message["type"] in ("subscribe", "message"):
                            accounts.forget_tokens()
                        if message["type"] == "subscribe" and ready is not None:
                            ready.set()
            except (RedisError, OSError) as exc:  # TimeoutError is an OSError
                log.warning("token revocations lost Redis, subscribing again", error=repr(exc))
                await asyncio.sleep(RECONNECT_SECONDS)

    async def close(self) -> None:
        await self._redis.aclose()
        await self._subscriber.aclose()
