"""The one kind of in-process cache: bounded in size, optionally expiring.

Rules: every module-level cache in popdrop is a `ProcessCache`, so none can grow without
limit in a long-lived process (a worker that sees every organization, a test run that
talks to many databases). When full, the least recently used entry goes (LRU). An entry
may also expire: `ttl` seconds after it was put (per cache, or per entry), measured on
the monotonic clock. A cache only saves a database read: losing an entry early is always
safe, so the bound is a size, never a correctness limit. Caches are per process and not
shared between threads (the app is one event loop per process).

Built on `cachetools.TLRUCache` (time-aware LRU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable
from typing import Generic, TypeVar

from cachetools import TLRUCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ProcessCache(Generic[K, V]):
    """A bounded LRU cache whose entries may expire; `get` answers None on a miss."""

    def __init__(self, maxsize: int, ttl: float | None = None) -> None:
        if maxsize < 1:
            raise ValueError("a process cache holds at least one entry")
        self.maxsize = maxsize
        self.ttl = ttl
        # Each entry carries its own lifetime, so one cache can hold entries put with
        # different TTLs (the API token cache takes its TTL from the settings per call).
        self._entries: TLRUCache[K, tuple[V, float]] = TLRUCache(
            maxsize, ttu=_expiry, timer=time.monotonic
        )

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(self, key: K, value: V, ttl: float | None = None) -> None:
        """Remember `value` for `ttl` seconds (default: the cache's; None: until evicted)."""
        lifetime = ttl if ttl is not None else self.ttl
        self._entries[key] = (value, math.inf if lifetime is None else lifetime)

    def pop(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        self._entries.expire()
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


def _expiry(_key: object, entry: tuple[object, float], now: float) -> float:
    return now + entry[1]
