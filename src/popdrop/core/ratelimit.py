"""Guessing guard: fixed-window counters of failed attempts, in memory or in Redis.

Rules this module keeps:
- Only failures that look like guessing count (unknown or malformed codes); a crowd hitting
  a sold-out code is not an attack.
- Public and authenticated callers are counted apart, so neither can lock the other out.
  An authenticated caller (an API token, an operator session) is counted by its own
  principal only: a flood of forged public requests never touches a till's counter. A
  public caller is counted per address and per route (per organization), so a flood on one
  public route leaves the organization's other routes and its tills alone.
- Redis shares the counters between processes; while Redis does not answer (short
  timeouts, no retries), each process counts in its own memory and tries Redis again a few
  seconds later. The guard never fails a request because its store is down.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Sequence
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from popdrop.core.errors import PopdropError
from popdrop.core.logging import log


class FailureCounter(Protocol):
    # `ago=1`: the window before the current one (a login lock spans two windows).
    async def counts(self, keys: Sequence[str], window: int, *, ago: int = 0) -> list[int]: ...

    async def add(self, keys: Sequence[str], window: int) -> None: ...

    async def close(self) -> None: ...


def _bucket(window: int) -> int:
    return int(time.time()) // window


def redis_client(url: str, *, timeout: float | None) -> Redis:
    """A Redis client that fails fast: one attempt, `timeout` seconds to connect and read
    (None: reads may block, as a pub/sub listener's do). redis-py's default retries with
    backoff would hold a request for seconds while Redis is down."""
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout if timeout is not None else 2.0,
        retry=Retry(NoBackoff(), 0),
    )


class MemoryCounter:
    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}

    async def counts(self, keys: Sequence[str], window: int, *, ago: int = 0) -> list[int]:
        bucket = _bucket(window) - ago
        return [self._counts.get((key, bucket), 0) for key in keys]

    async def add(self, keys: Sequence[str], window: int) -> None:
        bucket = _bucket(window)
        if len(self._counts) > 100_000:  # drop old windows (the previous one is still read)
            self._counts = {k: v for k, v in self._counts.items() if k[1] >= bucket - 1}
        for key in keys:
            self._counts[(key, bucket)] = self._counts.get((key, bucket), 0) + 1

    async def close(self) -> None:
        return None


class RedisCounter:
    def __init__(self, url: str, namespace: str = "popdrop", *, timeout: float = 0.25) -> None:
        self._redis = redis_client(url, timeout=timeout)
        self._ns = namespace

    def _key(self, key: str, window: int, ago: int = 0) -> str:
        return f"{self._ns}:fail:{key}:{_bucket(window) - ago}"

    async def counts(self, keys: Sequence[str], window: int, *, ago: int = 0) -> list[int]:
        values = await self._redis.mget([self._key(k, window, ago) for k in keys])
        return [int(v) if v is not None else 0 for v in values]

    async def add(self, keys: Sequence[str], window: int) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                name = self._key(key, window)
                pipe.incr(name)
                pipe.expire(name, window * 2)
            await pipe.execute()

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()


# What a lost, refused or slow Redis raises through redis-py.
REDIS_DOWN: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)


class FallbackCounter:
    """Redis while it answers; this process's memory while it does not. After a failure
    Redis is left alone for `retry_seconds` (no request waits on a dead Redis twice in a
    row), then tried again; counts made in memory meanwhile stay in memory."""

    def __init__(self, shared: RedisCounter, *, retry_seconds: float = 5.0) -> None:
        self.shared = shared
        self.memory = MemoryCounter()
        self.retry_seconds = retry_seconds
        self._down_until = 0.0
        self.error: str | None = None  # the last failure while Redis is considered down

    @property
    def degraded(self) -> bool:
        return self.error is not None

    def _try_shared(self) -> bool:
        return time.monotonic() >= self._down_until

    def _down(self, exc: BaseException) -> None:
        if self.error is None:
            log.warning("guard: Redis unreachable, counting in this process", error=repr(exc))
        self.error = type(exc).__name__
        self._down_until = time.monotonic() + self.retry_seconds

    def _up(self) -> None:
        if self.error is not None:
            log.info("guard: Redis is back, counting there again")
        self.error = None

    async def counts(self, keys: Sequence[str], window: int, *, ago: int = 0) -> list[int]:
        if self._try_shared():
            try:
                values = await self.shared.counts(keys, window, ago=ago)
            except REDIS_DOWN as exc:
                self._down(exc)
            else:
                self._up()
                return values
        return await self.memory.counts(keys, window, ago=ago)

    async def add(self, keys: Sequence[str], window: int) -> None:
        if self._try_shared():
            try:
                await self.shared.add(keys, window)
            except REDIS_DOWN as exc:
                self._down(exc)
            else:
                self._up()
                return
        await self.memory.add(keys, window)

    async def close(self) -> None:
        await self.shared.close()


def address_key(address: str) -> str:
    """IPv6 clients are counted per /64 (one host usually holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


class GuessGuard:
    """Counters of guessing failures, keyed so that public callers and authenticated ones
    never share one: `principal` (an actor such as `token:12:till`) names an authenticated
    caller, None a public one counted by `address` and by `route` within `org_id`."""

    def __init__(
        self,
        counter: FailureCounter,
        *,
        per_address: int,
        per_org: int,
        window: int,
        per_token: int | None = None,
    ) -> None:
        self.counter = counter
        self.per_address = per_address
        self.per_org = per_org  # public failures per route of one organization
        self.per_token = per_token if per_token is not None else per_address
        self.window = window

    def _limits(
        self, org_id: int, address: str, principal: str | None, route: str
    ) -> tuple[list[str], list[int]]:
        if principal is not None:
            return [f"auth:{org_id}:{principal}"], [self.per_token]
        return (
            [f"pub:addr:{address_key(address)}", f"pub:org:{org_id}:route:{route}"],
            [self.per_address, self.per_org],
        )

    async def check(
        self, org_id: int, address: str, *, principal: str | None = None, route: str = ""
    ) -> None:
        """Raise `rate_limited` (429, Retry-After) if this caller guessed too much."""
        keys, limits = self._limits(org_id, address, principal, route)
        counts = await self.counter.counts(keys, self.window)
        if any(count >= limit for count, limit in zip(counts, limits, strict=True)):
            retry = max(self.window - int(time.time()) % self.window, 1)
            raise PopdropError(
                "rate_limited",
                "too many failed attempts; wait before trying again",
                headers={"Retry-After": str(retry)},
                detail={"retry_after": retry},
            )

    async def failed(
        self, org_id: int, address: str, *, principal: str | None = None, route: str = ""
    ) -> None:
        keys, _ = self._limits(org_id, address, principal, route)
        await self.counter.add(keys, self.window)

    @property
    def degraded(self) -> bool:
        """True while the shared store is down and this process counts on its own."""
        return bool(getattr(self.counter, "degraded", False))


GUESSING_REASONS = frozenset({"unknown", "malformed"})
