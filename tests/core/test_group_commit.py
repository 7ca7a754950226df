"""The group-commit coalescer: batching, answers per item, failures, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from popdrop.core.group_commit import GroupCommit, GroupFailed, for_loop


async def test_concurrent_items_share_a_flush_and_get_their_own_answers() -> None:
    seen: list[list[int]] = []

    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        seen.append(list(items))
        await asyncio.sleep(0.01)
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    group: GroupCommit[int, int] = GroupCommit(flush)
    results = await asyncio.gather(*(group.submit(i) for i in range(20)), return_exceptions=True)
    for i, result in enumerate(results):
        if i % 2:
            assert isinstance(result, ValueError) and str(result) == f"odd {i}"
        else:
            assert result == i * 10
    assert sum(len(b) for b in seen) == 20
    assert seen[0] == list(range(20))  # all arrived in one loop turn: one batch, in order
    assert group.batches == 1 and group.items == 20


async def test_items_arriving_during_a_flush_form_the_next_batch() -> None:
    seen: list[list[int]] = []
    release = asyncio.Event()

    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        seen.append(list(items))
        if len(seen) == 1:
            await release.wait()
        return list(items)

    group: GroupCommit[int, int] = GroupCommit(flush, max_in_flight=1)
    first = asyncio.ensure_future(group.submit(0))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    later = [asyncio.ensure_future(group.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0.01)
    assert seen == [[0]]  # one flush at a time: the rest wait
    release.set()
    assert await first == 0
    assert await asyncio.gather(*later) == [1, 2, 3, 4, 5]
    assert seen == [[0], [1, 2, 3, 4, 5]]


async def test_max_batch_splits_and_max_in_flight_runs_them_together() -> None:
    running = 0
    peak = 0
    sizes: list[int] = []

    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        sizes.append(len(items))
        await asyncio.sleep(0.01)
        running -= 1
        return list(items)

    group: GroupCommit[int, int] = GroupCommit(flush, max_batch=4, max_in_flight=2)
    assert await asyncio.gather(*(group.submit(i) for i in range(10))) == list(range(10))
    assert max(sizes) <= 4 and sum(sizes) == 10
    assert peak == 2


async def test_a_failed_flush_fails_every_item_of_its_batch_only() -> None:
    calls = 0

    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("rolled back")
        return list(items)

    group: GroupCommit[int, int] = GroupCommit(flush)
    results = await asyncio.gather(*(group.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, GroupFailed) for r in results)
    assert isinstance(results[0].__cause__, RuntimeError)  # type: ignore[union-attr]
    assert await group.submit(7) == 7  # the instance keeps working


async def test_wrong_answer_count_is_a_failure() -> None:
    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        return [1]

    group: GroupCommit[int, int] = GroupCommit(flush)
    with pytest.raises(GroupFailed):
        await asyncio.gather(group.submit(1), group.submit(2))


async def test_a_cancelled_submitter_does_not_cancel_the_flush() -> None:
    flushed: list[int] = []
    started = asyncio.Event()

    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        started.set()
        await asyncio.sleep(0.02)
        flushed.extend(items)
        return list(items)

    group: GroupCommit[int, int] = GroupCommit(flush)
    gone = asyncio.ensure_future(group.submit(1))
    stays = asyncio.ensure_future(group.submit(2))
    await started.wait()
    gone.cancel()
    assert await stays == 2
    assert flushed == [1, 2]  # the cancelled item still took effect, like a cancelled commit


async def test_linger_gathers_items_of_later_loop_turns() -> None:
    seen: list[list[int]] = []

    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        seen.append(list(items))
        return list(items)

    group: GroupCommit[int, int] = GroupCommit(flush, linger=0.02)

    async def late(i: int) -> int:
        await asyncio.sleep(0.005 * i)
        return await group.submit(i)

    assert await asyncio.gather(*(late(i) for i in range(3))) == [0, 1, 2]
    assert seen == [[0, 1, 2]]


async def test_for_loop_keeps_one_instance_per_key_and_loop() -> None:
    registry: dict = {}  # type: ignore[type-arg]

    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        return list(items)

    a = for_loop(registry, "db", lambda: GroupCommit(flush))
    assert for_loop(registry, "db", lambda: GroupCommit(flush)) is a
    assert for_loop(registry, "other", lambda: GroupCommit(flush)) is not a


def test_bad_settings_are_refused() -> None:
    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        return list(items)

    with pytest.raises(ValueError):
        GroupCommit(flush, max_batch=0)
