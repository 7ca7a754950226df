"""`Idempotency-Key` for mutating API calls.

Rules this module keeps:
- A key belongs to one principal and one request. The first request with a key claims it
  (a row naming the principal and the request's fingerprint: method, route, body). A
  request by another principal is refused (`idempotency_key_foreign`, 403) and never sees
  the stored answer; the same principal reusing the key for another route or body is
  refused (`idempotency_key_reused`). Authorization is the caller's job and comes first:
  `run_once` is only called once the caller is known to be allowed to make the request.
- The answer is stored in the same transaction as the operation's writes, so an answer is
  never stored without its effect or the reverse. Refusals (`PopdropError`) are answers
  too: they are stored and replayed.
- A claim is a lease: its owner refreshes `claimed_at` every `HEARTBEAT` while the
  operation runs. A claim not refreshed for `LEASE` (its owner crashed or was killed) is
  taken over by the next request with the key, so a client retrying after a crash is
  answered in seconds. Concurrent requests with a live claim wait for its answer.
- Fencing: the owner stores its answer only if the claim still carries the `claimed_at`
  it wrote itself. An owner that stalled past its lease and was taken over rolls its work
  back and answers `idempotency_in_progress`; the retry then gets the new owner's answer.
  So however clocks or stalls behave, a key's effect happens at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, Text, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.core.clock import Clock, ensure_utc
from popdrop.core.db import Base, Database, UTCDateTime, dialect_insert
from popdrop.core.errors import PopdropError

HEARTBEAT = timedelta(seconds=1)
# Several missed heartbeats, so a busy event loop or a slow commit is not taken for a crash.
LEASE = timedelta(seconds=4)
WAIT_FOR = 30.0
MAX_KEY = 200
MAX_PRINCIPAL = 64


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_records"

    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(MAX_KEY), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    principal: Mapped[str] = mapped_column(String(MAX_PRINCIPAL), server_default="")
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    body: Mapped[str | None] = mapped_column(Text, nullable=True)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime)


Answer = tuple[int, dict[str, Any]]
Operation = Callable[[AsyncSession], Awaitable[Answer]]


def fingerprint(method: str, route: str, body: Any) -> str:
    text = json.dumps([method, route, body], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class _LeaseLost(Exception):
    """Our claim was taken over while the operation ran: its work must not commit."""


def _in_progress() -> PopdropError:
    return PopdropError(
        "idempotency_in_progress",
        "a request with this Idempotency-Key is still running; retry shortly",
        headers={"Retry-After": "1"},
    )


async def run_once(
    db: Database,
    clock: Clock,
    *,
    org_id: int,
    key: str | None,
    principal: str,
    request_fingerprint: str,
    operation: Operation,
) -> Answer:
    """Run `operation` in a transaction at most once per (org, key); return its answer.

    `principal` names the caller (at most 64 characters, e.g. `token:12`); only that
    caller is ever answered for the key.
    """
    if key is None:
        return await db.in_transaction(operation)
    if not key or len(key) > MAX_KEY:
        raise PopdropError("invalid_request", f"Idempotency-Key: 1 to {MAX_KEY} characters")
    if not principal or len(principal) > MAX_PRINCIPAL:
        raise ValueError(f"principal: 1 to {MAX_PRINCIPAL} characters")
    record = _Record(org_id, key, principal, request_fingerprint)
    while True:
        claimed_at = await _claim(db, clock, record)
        if claimed_at is not None:
            break
        answer = await _wait_for_answer(db, clock, record)
        if answer is not None:
            return answer
        # The owner failed without an answer (its claim is gone or its lease ran out).

    lease = _Lease(db, clock, record, claimed_at)

    async def answered(session: AsyncSession) -> Answer:
        status, body = await operation(session)
        if not await _store(session, record, lease.fences(), status, body):
            raise _LeaseLost
        return status, body

    try:
        return await db.in_transaction(answered)
    except _LeaseLost:
        await lease.stop()
        raise _in_progress() from None
    except PopdropError as refusal:
        await lease.stop()
        async with db.transaction() as session:
            stored = await _store(
                session, record, lease.fences(), refusal.status, refusal.to_dict()
            )
        if not stored:
            raise _in_progress() from refusal
        raise
    except BaseException:
        await lease.stop()
        async with db.transaction() as session:
            await session.execute(delete(IdempotencyRecord).where(*record.ours(lease.fences())))
        raise
    finally:
        await lease.stop()


class _Record:
    """Which idempotency row a request is about, and whose it must be."""

    def __init__(self, org_id: int, key: str, principal: str, fp: str) -> None:
        self.org_id = org_id
        self.key = key
        self.principal = principal
        self.fingerprint = fp

    def row(self) -> tuple[Any, ...]:
        return (IdempotencyRecord.org_id == self.org_id, IdempotencyRecord.key == self.key)

    def ours(self, fences: tuple[datetime, ...]) -> tuple[Any, ...]:
        """Still unanswered and still claimed by us (the `claimed_at` we wrote)."""
        return (
            *self.row(),
            IdempotencyRecord.status_code.is_(None),
            IdempotencyRecord.claimed_at.in_(fences),
        )


class _Lease:
    """The owner's heartbeat: refreshes `claimed_at` every `HEARTBEAT` until stopped.

    A beat is fenced like the answer: it only moves a claim that still carries our last
    `claimed_at`. While a beat is in flight, either value may be in the row, so `fences`
    offers both; the store then matches whichever landed.
    """

    def __init__(self, db: Database, clock: Clock, record: _Record, claimed_at: datetime) -> None:
        self._db = db
        self._clock = clock
        self._record = record
        self._confirmed = claimed_at
        self._pending: datetime | None = None
        self._stopped = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    def fences(self) -> tuple[datetime, ...]:
        if self._pending is None:
            return (self._confirmed,)
        return (self._confirmed, self._pending)

    async def stop(self) -> None:
        # Outside the operation's transaction: on SQLite an in-flight beat waits for that
        # transaction's write lock, and only finishes (as a no-op) once it has committed.
        self._stopped.set()
        with contextlib.suppress(Exception):
            await self._task

    async def _run(self) -> None:
        while not self._stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), HEARTBEAT.total_seconds())
            if self._stopped.is_set():
                return
            if not await self._beat():
                return  # taken over: the store's fence will fail and roll the work back

    async def _beat(self) -> bool:
        now = self._clock.now()
        self._pending = now
        try:
            async with self._db.transaction() as session:
                moved = await session.execute(
                    update(IdempotencyRecord)
                    .where(*self._record.ours((self._confirmed,)))
                    .values(claimed_at=now)
                    .returning(IdempotencyRecord.key)
                )
                alive = moved.first() is not None
        except Exception:  # a missed beat is retried; the lease has slack
            self._pending = None
            return True
        if alive:
            self._confirmed = now
        self._pending = None
        return alive


async def _claim(db: Database, clock: Clock, record: _Record) -> datetime | None:
    """Claim the key (a new row, or a claim whose lease ran out); the `claimed_at` written."""
    now = clock.now()
    async with db.transaction() as session:
        inserted = await session.execute(
            dialect_insert(db.dialect, IdempotencyRecord)
            .values(
                org_id=record.org_id,
                key=record.key,
                fingerprint=record.fingerprint,
                principal=record.principal,
                claimed_at=now,
            )
            .on_conflict_do_nothing()
            .returning(IdempotencyRecord.key)
        )
        if inserted.first() is not None:
            return now
        # Take over a claim whose owner stopped renewing it: it crashed or was killed.
        taken = await session.execute(
            update(IdempotencyRecord)
            .where(
                *record.row(),
                IdempotencyRecord.principal == record.principal,
                IdempotencyRecord.fingerprint == record.fingerprint,
                IdempotencyRecord.status_code.is_(None),
                IdempotencyRecord.claimed_at < now - LEASE,
            )
            .values(claimed_at=now)
            .returning(IdempotencyRecord.key)
        )
        return now if taken.first() is not None else None


async def _store(
    session: AsyncSession,
    record: _Record,
    fences: tuple[datetime, ...],
    status: int,
    body: dict[str, Any],
) -> bool:
    """Store the answer if the claim is still ours; False when it was taken over."""
    stored = await session.execute(
        update(IdempotencyRecord)
        .where(*record.ours(fences))
        .values(status_code=status, body=json.dumps(body, default=str))
        .returning(IdempotencyRecord.key)
    )
    return stored.first() is not None


async def _wait_for_answer(db: Database, clock: Clock, record: _Record) -> Answer | None:
    """The stored answer once there is one; None when the claim is gone or its lease ran
    out (the caller then claims the key itself)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_FOR
    delay = 0.005
    while True:
        async with db.reader() as session:
            found = await session.scalar(select(IdempotencyRecord).where(*record.row()))
        if found is None:
            return None
        # Whose key it is comes before anything about the request or its answer.
        if found.principal != record.principal:
            raise PopdropError(
                "idempotency_key_foreign",
                "this Idempotency-Key belongs to another caller; use a key of your own",
            )
        if found.fingerprint != record.fingerprint:
            raise PopdropError(
                "idempotency_key_reused", "this Idempotency-Key was used for another request"
            )
        if found.status_code is not None and found.body is not None:
            return found.status_code, json.loads(found.body)
        if ensure_utc(found.claimed_at) < clock.now() - LEASE:
            return None
        if loop.time() > deadline:
            raise _in_progress()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
