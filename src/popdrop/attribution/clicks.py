"""The click batch: redirects hand clicks to memory, a task writes them every ~100 ms.

Rules this module keeps:
- A redirect never waits for a database write: `record` only appends to a list.
- One flush is one transaction: the clicks are inserted and each link's `clicks` (and
  `bot_hits`) counter is raised by what it got, links in id order (no deadlock between
  two processes flushing at once). If the transaction fails (the database is away), the
  clicks go back to the front of the batch and the next flush tries again: a click is
  lost only if the process dies before a flush succeeds.
- The flusher task is started by the app's lifespan (`run`), and a graceful shutdown
  flushes what is left. Tests and benchmarks call `flush` themselves.
- There is one recorder per `Database` (`recorder_for`), so a process talking to two
  databases (tests) never writes one's clicks into the other.
- `counted(link_id)` is every click this process recorded for a link since it started
  (flushed or not): the redirect adds it to the stored count it cached to enforce
  `max_clicks` without a database read.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, insert, update

from popdrop.attribution.models import ShortLink, ShortLinkClick
from popdrop.core.db import Database, table_of
from popdrop.core.logging import log

FLUSH_INTERVAL_SECONDS = 0.1
# Past this many unwritten clicks (the database has been away for a long while) the
# oldest are dropped and logged, so memory stays bounded.
MAX_PENDING = 1_000_000

_clicks = table_of(ShortLinkClick)
_links = table_of(ShortLink)
_INSERT = insert(_clicks)
_BUMP = (
    update(_links)
    .where(_links.c.id == bindparam("link"))
    .values(
        clicks=_links.c.clicks + bindparam("n_clicks"),
        bot_hits=_links.c.bot_hits + bindparam("n_bots"),
    )
)


@dataclass(frozen=True, slots=True)
class PendingClick:
    org_id: int
    link_id: int
    click_id: str
    at: datetime
    channel: str | None
    device_class: str
    referrer_host: str | None


class ClickRecorder:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[PendingClick] = []
        self._bots: Counter[int] = Counter()
        self._counted: Counter[int] = Counter()
        self._lock = asyncio.Lock()
        self.dropped = 0

    def record(self, click: PendingClick) -> None:
        self._pending.append(click)
        self._counted[click.link_id] += 1
        if len(self._pending) > MAX_PENDING:
            excess = len(self._pending) - MAX_PENDING
            del self._pending[:excess]
            self.dropped += excess
            log.error("clicks: database away too long, oldest clicks dropped", dropped=excess)

    def bot_hit(self, link_id: int) -> None:
        self._bots[link_id] += 1

    def counted(self, link_id: int) -> int:
        return self._counted[link_id]

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> int:
        """Write every pending click; the number written (0 when the write failed)."""
        async with self._lock:
            batch, self._pending = self._pending, []
            bots, self._bots = self._bots, Counter()
            if not batch and not bots:
                return 0
            per_link: Counter[int] = Counter(click.link_id for click in batch)
            try:
                async with self.db.transaction() as session:
                    if batch:
                        await session.execute(
                            _INSERT,
                            [
                                {
                                    "org_id": c.org_id,
                                    "link_id": c.link_id,
                                    "click_id": c.click_id,
                                    "at": c.at,
                                    "channel": c.channel,
                                    "device_class": c.device_class,
                                    "referrer_host": c.referrer_host,
                                }
                                for c in batch
                            ],
                        )
                    rows = [
                        {"link": link, "n_clicks": per_link[link], "n_bots": bots[link]}
                        for link in sorted(set(per_link) | set(bots))
                    ]
                    await session.execute(_BUMP, rows)
            except Exception as exc:  # the database went away: keep them for the next try
                self._pending[:0] = batch
                self._bots.update(bots)
                log.warning("clicks: flush failed, will retry", clicks=len(batch), error=repr(exc))
                return 0
            return len(batch)

    async def run(self, stop: asyncio.Event, interval: float = FLUSH_INTERVAL_SECONDS) -> None:
        """Flush every `interval` seconds until `stop` is set, then flush what is left."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            await self.flush()
        await self.flush()


_RECORDERS: weakref.WeakKeyDictionary[Database, ClickRecorder] = weakref.WeakKeyDictionary()


def recorder_for(db: Database) -> ClickRecorder:
    recorder = _RECORDERS.get(db)
    if recorder is None:
        recorder = _RECORDERS[db] = ClickRecorder(db)
    return recorder
