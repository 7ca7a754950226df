"""`core.cache.ProcessCache`: bounded by size (LRU), entries expire after their TTL."""

from __future__ import annotations

import pytest

from popdrop.core import cache as cache_module
from popdrop.core.cache import ProcessCache


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeMonotonic:
    fake = FakeMonotonic()
    monkeypatch.setattr(cache_module.time, "monotonic", fake)
    return fake


def test_the_cache_never_holds_more_than_its_bound() -> None:
    cache: ProcessCache[int, str] = ProcessCache(maxsize=100)
    for key in range(10_000):
        cache.put(key, str(key))
    assert len(cache) == 100
    assert cache.get(0) is None  # the oldest went first
    assert cache.get(9_999) == "9999"


def test_the_least_recently_used_entry_goes_first() -> None:
    cache: ProcessCache[str, int] = ProcessCache(maxsize=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)


def test_entries_expire_after_the_cache_ttl(clock: FakeMonotonic) -> None:
    cache: ProcessCache[str, int] = ProcessCache(maxsize=10, ttl=5)
    cache.put("a", 1)
    clock.now += 4.9
    assert cache.get("a") == 1
    clock.now += 0.2
    assert cache.get("a") is None
    assert len(cache) == 0


def test_an_entry_may_carry_its_own_ttl(clock: FakeMonotonic) -> None:
    cache: ProcessCache[str, int] = ProcessCache(maxsize=10)
    cache.put("short", 1, ttl=2)
    cache.put("forever", 2)
    clock.now += 1e6
    assert cache.get("short") is None
    assert cache.get("forever") == 2


def test_clear_and_pop_forget() -> None:
    cache: ProcessCache[str, int] = ProcessCache(maxsize=10)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.pop("a")
    cache.pop("missing")
    assert "a" not in cache and "b" in cache
    cache.clear()
    assert len(cache) == 0


def test_a_cache_must_hold_something() -> None:
    with pytest.raises(ValueError):
        ProcessCache(maxsize=0)
