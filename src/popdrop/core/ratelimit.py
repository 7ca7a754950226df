"""Guessing guard: fixed-window counters of failed attempts, in memory or in Redis.

Only failures that look like guessing count (unknown or malformed codes); a crowd hitting a
sold-out code is not an attack. Redis shares the counters between processes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from popdrop.core.errors import PopdropError


class FailureCounter(Protocol):
    async def counts(self, keys: Sequence[str], window: int) -> list[int]: ...

    async def add(self, keys: Sequence[str], window: int) -> None: ...

    async def close(self) -> None: ...


def _bucket(window: int) -> int:
    return int(time.time()) // window


class MemoryCounter:
    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}

    async def counts(self, keys: Sequence[str], window: int) -> list[int]:
        bucket = _bucket(window)
        return [self._counts.get((key, bucket), 0) for key in keys]

    async def add(self, keys: Sequence[str], window: int) -> None:
        bucket = _bucket(window)
        if len(self._counts) > 100_000:  # drop old windows
            self._counts = {k: v for k, v in self._counts.items() if k[1] == bucket}
        for key in keys:
            self._counts[(key, bucket)] = self._counts.get((key, bucket), 0) + 1

    async def close(self) -> None:
        return None


class RedisCounter:
    def __init__(self, url: str, namespace: str = "popdrop") -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(url)
        self._ns = namespace

    def _key(self, key: str, window: int) -> str:
        return f"{self._ns}:fail:{key}:{_bucket(window)}"

    async def counts(self, keys: Sequence[str], window: int) -> list[int]:
        values = await self._redis.mget([self._key(k, window) for k in keys])
        return [int(v) if v is not None else 0 for v in values]

    async def add(self, keys: Sequence[str], window: int) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                name = self._key(key, window)
                pipe.incr(name)
                pipe.expire(name, window * 2)
            await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()


class GuessGuard:
    def __init__(
        self, counter: FailureCounter, *, per_address: int, per_org: int, window: int
    ) -> None:
        self.counter = counter
        self.per_address = per_address
        self.per_org = per_org
        self.window = window

    def _keys(self, org_id: int, address: str) -> list[str]:
        return [f"addr:{address}", f"org:{org_id}"]

    async def check(self, org_id: int, address: str) -> None:
        """Raise `rate_limited` (429, Retry-After) if this client or org guessed too much."""
        by_address, by_org = await self.counter.counts(self._keys(org_id, address), self.window)
        if by_address >= self.per_address or by_org >= self.per_org:
            retry = self.window - int(time.time()) % self.window
            raise PopdropError(
                "rate_limited",
                "too many failed attempts; wait before trying again",
                headers={"Retry-After": str(max(retry, 1))},
                detail={"retry_after": max(retry, 1)},
            )

    async def failed(self, org_id: int, address: str) -> None:
        await self.counter.add(self._keys(org_id, address), self.window)


GUESSING_REASONS = frozenset({"unknown", "malformed"})
