"""Live stock for the public stream: one publisher per event, fanned out in memory.

Rules kept here:
- **One read per tick per event, however many listen.** A publisher reads the event's
  availability once per tick (`stream_tick_seconds`) and hands the same JSON to every
  subscriber in this process; 1 or 400 open streams cost the database the same.
- **A change made here is read at once.** `StockHub.changed` (called after a stock edit or
  a hold in this process) wakes the publisher; reads stay at least `MIN_GAP_SECONDS`
  apart, so a burst of holds costs a few reads, not one per hold. Changes made by
  another process show up at the next tick.
- **It runs only while someone listens.** The first subscriber starts the publisher, the
  last one to leave ends it; the hub forgets it in the same step, so a late subscriber
  starts a fresh one instead of joining a finished one.
- **Only open events stream.** The event's status is read with the first stock read and
  again every `STATUS_EVERY_SECONDS`; a draft/closed/unknown event refuses new
  subscribers (`not_found`) and ends the streams of the current ones (`Gone`).
- **A failed read keeps the last stock** and is tried again next tick; a failed first
  read refuses the subscribers waiting for it with `unavailable` (503, Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable

from sqlalchemy import select

from popdrop.core.clock import Clock
from popdrop.core.db import Database
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.logging import log
from popdrop.events.lifecycle import OPEN_EVENT_STATUSES
from popdrop.events.models import Event
from popdrop.inventory import service

MIN_GAP_SECONDS = 0.2
STATUS_EVERY_SECONDS = 15.0
UNAVAILABLE_RETRY_SECONDS = 5


class Gone(Exception):
    """The stream's event stopped being public (`reason`: `event_closed`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Subscription:
    """One listener of an event's stock; `next()` gives each new version once."""

    def __init__(self, publisher: _Publisher) -> None:
        self._publisher = publisher
        self._seen = 0  # the version last handed out
        self._closed = False

    async def next(self, within: float) -> str | None:
        """The newest stock (JSON) not yet handed out, or None when nothing changed within
        `within` seconds. Raises `Gone` once the event is no longer open."""
        publisher = self._publisher
        if publisher.gone is None and publisher.version == self._seen:
            changed = publisher.changed  # set (and replaced) by the next publish
            try:
                async with asyncio.timeout(within):
                    await changed.wait()
            except TimeoutError:
                return None
        if publisher.gone is not None:
            raise Gone(publisher.gone)
        if publisher.version == self._seen:
            return None
        self._seen = publisher.version
        return publisher.payload

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._publisher.leave(self)


class _Publisher:
    def __init__(self, hub: StockHub, event_id: int) -> None:
        self.hub = hub
        self.event_id = event_id
        self.subscribers: set[Subscription] = set()
        self.payload = ""
        self.version = 0
        self.changed = asyncio.Event()
        self.lanes: frozenset[int] = frozenset()
        self.gone: str | None = None
        self.failed = False
        self.finished = False
        self.reads = 0  # availability reads, for tests and the benchmark
        self.ready = asyncio.Event()  # the first read is done (or failed)
        self._wake = asyncio.Event()
        self._last_read = 0.0
        self._status_due = 0.0
        self.task = asyncio.create_task(self._run(), name=f"stock-publisher-{event_id}")

    def join(self) -> Subscription:
        subscription = Subscription(self)
        self.subscribers.add(subscription)
        return subscription

    def leave(self, subscription: Subscription) -> None:
        self.subscribers.discard(subscription)
        if not self.subscribers:
            self._wake.set()  # let the loop see nobody listens and end now

    def wake(self) -> None:
        self._wake.set()

    def _publish(self, payload: str) -> None:
        if payload == self.payload:
            return
        self.payload = payload
        self.version += 1
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def _end(self, reason: str) -> None:
        self.gone = reason
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    async def _read(self, *, with_status: bool) -> bool:
        """Read the stock (and the event's status); False when the event is not open."""
        hub = self.hub
        async with hub.db.reader() as session:
            if with_status:
                status = await session.scalar(select(Event.status).where(Event.id == self.event_id))
                self._status_due = time.monotonic() + STATUS_EVERY_SECONDS
                if status not in OPEN_EVENT_STATUSES:
                    return False
            rows = await service.availability(session, self.event_id, hub.clock.now())
        self.reads += 1
        hub.reads += 1
        self._last_read = time.monotonic()
        self.lanes = frozenset(row.lane_id for row in rows)
        self._publish(json.dumps([row.model_dump() for row in rows]))
        return True

    async def _sleep(self) -> None:
        try:
            async with asyncio.timeout(self.hub.tick_seconds):
                await self._wake.wait()
        except TimeoutError:
            pass
        gap = self._last_read + MIN_GAP_SECONDS - time.monotonic()
        if gap > 0 and self.subscribers:
            await asyncio.sleep(gap)
        self._wake.clear()  # before the read: a change during it wakes the next one

    async def _run(self) -> None:
        try:
            try:
                opened = await self._read(with_status=True)
            except Exception as exc:
                log.warning("stock publisher", event_id=self.event_id, error=repr(exc))
                self.failed = True
                return
            if not opened:
                self._end("event_closed")
                return
            self.ready.set()
            while True:
                await self._sleep()
                if not self.subscribers:
                    return
                try:
                    if not await self._read(with_status=time.monotonic() >= self._status_due):
                        self._end("event_closed")
                        return
                except Exception as exc:  # keep the last stock; try again next tick
                    log.warning("stock publisher", event_id=self.event_id, error=repr(exc))
        finally:
            # No await from the loop's last check to here: nobody joins a finished publisher.
            self.finished = True
            if self.gone is None and self.subscribers:  # cancelled: the server is stopping
                self._end("server_stopping")
            self.hub.forget(self)
            self.ready.set()


class StockHub:
    """The stock publishers of one process (one per event someone is watching)."""

    def __init__(self, db: Database, clock: Clock, *, tick_seconds: float) -> None:
        self.db = db
        self.clock = clock
        self.tick_seconds = tick_seconds
        self.reads = 0  # availability reads by every publisher, for tests and the benchmark
        self._publishers: dict[int, _Publisher] = {}

    async def subscribe(self, event_id: int) -> Subscription:
        """Listen to an open event's stock; the first `next()` gives the current stock.
        Refuses an event that is not published/live (`not_found`) and a first read that
        failed (`unavailable`)."""
        publisher = self._publishers.get(event_id)
        if publisher is None:
            publisher = _Publisher(self, event_id)
            self._publishers[event_id] = publisher
        subscription = publisher.join()
        try:
            await publisher.ready.wait()
        except BaseException:
            subscription.close()
            raise
        if publisher.failed:
            subscription.close()
            raise PopdropError(
                "unavailable",
                "live stock is unavailable right now; try again shortly",
                status=503,
                headers={"Retry-After": str(UNAVAILABLE_RETRY_SECONDS)},
            )
        if publisher.gone is not None:
            subscription.close()
            raise not_found("event")
        return subscription

    def changed(self, *, event_id: int | None = None, lanes: Iterable[int] = ()) -> None:
        """Stock of an event (or of some lanes) changed in this process: read it soon."""
        lane_ids = frozenset(lanes)
        for publisher in self._publishers.values():
            if publisher.event_id == event_id or publisher.lanes & lane_ids:
                publisher.wake()

    def listeners(self, event_id: int) -> int:
        publisher = self._publishers.get(event_id)
        return len(publisher.subscribers) if publisher else 0

    def forget(self, publisher: _Publisher) -> None:
        if self._publishers.get(publisher.event_id) is publisher:
            del self._publishers[publisher.event_id]

    async def close(self) -> None:
        """End every publisher (their streams see no more changes)."""
        publishers = list(self._publishers.values())
        for publisher in publishers:
            publisher.task.cancel()
        for publisher in publishers:
            with contextlib.suppress(asyncio.CancelledError):
                await publisher.task
