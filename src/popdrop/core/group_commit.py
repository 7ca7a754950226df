"""Group commit: concurrent requests for one kind of write share one database transaction.

Rules this module keeps:
- `GroupCommit(flush)` collects the items `submit`ted while a flush is running (or within
  the same turn of the event loop, or within `linger` seconds when set) and hands them to
  `flush(items)` together, at most `max_batch` at a time and at most `max_in_flight`
  flushes at once per instance. An idle instance flushes at the next loop turn, so a lone
  request waits for no one; under load the batch grows by itself to whatever arrived
  during the previous flush (no timer to tune).
- `flush` gets the items in arrival order and returns one answer per item, in the same
  order: a value, or an exception instance that is raised to that item's submitter only.
  The flush decides what "each item all-or-nothing" means for its statement (typically:
  one statement with arrays in and one row out per item that took effect; an item with no
  row took no effect and its submitter goes down its ordinary one-request path).
- If `flush` raises, every submitter of that batch gets `GroupFailed` (with the cause):
  the transaction rolled back, so nothing of the batch happened and each item may be
  tried again on its own.
- A submitter that is cancelled (its client went away) does not cancel the flush: its item
  may still take effect, exactly like a single request cancelled during its commit.
- One instance belongs to one event loop (it holds futures); keep one per loop and per
  database (`for_loop`). It imports no domain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
K = TypeVar("K")

Flush = Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]]


class GroupFailed(Exception):
    """The batch an item was in failed as a whole (rolled back); nothing of it happened."""


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        flush: Flush[T, R],
        *,
        max_batch: int = 256,
        max_in_flight: int = 1,
        linger: float = 0.0,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1 or linger < 0:
            raise ValueError("max_batch and max_in_flight >= 1, linger >= 0")
        self._flush = flush
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.linger = linger
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # flushes run (for tests and benchmarks)
        self.items = 0  # items flushed

    async def submit(self, item: T) -> R:
        """The answer `flush` gives for `item` (raised if it is an exception)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        if self._scheduled or not self._pending or self._in_flight >= self.max_in_flight:
            return
        self._scheduled = True
        loop = asyncio.get_running_loop()
        if self.linger and len(self._pending) < self.max_batch:
            loop.call_later(self.linger, self._start)
        else:
            loop.call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        if not self._pending or self._in_flight >= self.max_in_flight:
            return
        batch = self._pending[: self.max_batch]
        del self._pending[: self.max_batch]
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._kick()  # more than max_batch waiting and room for another flush

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            try:
                answers = await self._flush([item for item, _ in batch])
                if len(answers) != len(batch):
                    raise RuntimeError(f"flush gave {len(answers)} answers for {len(batch)}")
            except BaseException as exc:  # every waiter must hear of it
                for _, future in batch:
                    if not future.done():
                        failure = GroupFailed(f"group commit failed: {exc!r}")
                        failure.__cause__ = exc
                        future.set_exception(failure)
                if not isinstance(exc, Exception):
                    raise
                return
            self.batches += 1
            self.items += len(batch)
            for (_, future), answer in zip(batch, answers, strict=True):
                if future.done():  # its submitter was cancelled
                    continue
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
        finally:
            self._in_flight -= 1
            self._kick()


def for_loop(
    registry: dict[tuple[K, asyncio.AbstractEventLoop], GroupCommit[T, R]],
    key: K,
    make: Callable[[], GroupCommit[T, R]],
) -> GroupCommit[T, R]:
    """The instance of `key` for the running loop, made on first use. Instances of closed
    loops are dropped as new ones are made."""
    loop = asyncio.get_running_loop()
    found = registry.get((key, loop))
    if found is None:
        for stale in [k for k in registry if k[1].is_closed()]:
            del registry[stale]
        found = registry[(key, loop)] = make()
    return found
