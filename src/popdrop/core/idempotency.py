"""`Idempotency-Key` for mutating API calls.

The first request with a key claims it (a row in its own short transaction), runs the
operation, and stores the answer in the same transaction as the operation's writes, so an
answer is never stored without its effect or the reverse. Concurrent requests with the
same key wait for that answer and return it; a claim left by a crashed process is taken
over after `STALE_AFTER`. A key reused for a different request is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, Text, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.core.clock import Clock
from popdrop.core.db import Base, Database, UTCDateTime, dialect_insert
from popdrop.core.errors import PopdropError

STALE_AFTER = timedelta(seconds=60)
WAIT_FOR = 30.0
MAX_KEY = 200


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_records"

    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(MAX_KEY), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    principal: Mapped[str] = mapped_column(String(64), server_default="")
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    body: Mapped[str | None] = mapped_column(Text, nullable=True)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime)


Answer = tuple[int, dict[str, Any]]
Operation = Callable[[AsyncSession], Awaitable[Answer]]


def fingerprint(method: str, path: str, body: Any) -> str:
    text = json.dumps([method, path, body], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


async def run_once(
    db: Database,
    clock: Clock,
    *,
    org_id: int,
    key: str | None,
    request_fingerprint: str,
    operation: Operation,
) -> Answer:
    """Run `operation` in a transaction at most once per (org, key); return its answer.

    Refusals (`PopdropError`) are answers too: they are stored and replayed.
    """
    if key is None:
        return await db.in_transaction(operation)
    if not key or len(key) > MAX_KEY:
        raise PopdropError("invalid_request", f"Idempotency-Key: 1 to {MAX_KEY} characters")
    while not await _claim(db, clock, org_id, key, request_fingerprint):
        answer = await _wait_for_answer(db, org_id, key, request_fingerprint)
        if answer is not None:
            return answer
        # The owner failed without an answer and dropped its claim: claim it ourselves.

    async def answered(session: AsyncSession) -> Answer:
        status, body = await operation(session)
        await _store(session, org_id, key, status, body)
        return status, body

    try:
        return await db.in_transaction(answered)
    except PopdropError as refusal:
        async with db.transaction() as session:
            await _store(session, org_id, key, refusal.status, refusal.to_dict())
        raise
    except BaseException:
        async with db.transaction() as session:
            await session.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.org_id == org_id, IdempotencyRecord.key == key
                )
            )
        raise


async def _claim(db: Database, clock: Clock, org_id: int, key: str, fp: str) -> bool:
    now = clock.now()
    async with db.transaction() as session:
        inserted = await session.execute(
            dialect_insert(db.dialect, IdempotencyRecord)
            .values(org_id=org_id, key=key, fingerprint=fp, claimed_at=now)
            .on_conflict_do_nothing()
            .returning(IdempotencyRecord.key)
        )
        if inserted.first() is not None:
            return True
        # Take over a claim whose owner died before answering.
        taken = await session.execute(
            update(IdempotencyRecord)
            .where(
                IdempotencyRecord.org_id == org_id,
                IdempotencyRecord.key == key,
                IdempotencyRecord.fingerprint == fp,
                IdempotencyRecord.status_code.is_(None),
                IdempotencyRecord.claimed_at < now - STALE_AFTER,
            )
            .values(claimed_at=now)
            .returning(IdempotencyRecord.key)
        )
        return taken.first() is not None


async def _store(
    session: AsyncSession, org_id: int, key: str, status: int, body: dict[str, Any]
) -> None:
    await session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.org_id == org_id, IdempotencyRecord.key == key)
        .values(status_code=status, body=json.dumps(body, default=str))
    )


async def _wait_for_answer(db: Database, org_id: int, key: str, fp: str) -> Answer | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_FOR
    delay = 0.005
    while True:
        async with db.reader() as session:
            record = await session.scalar(
                select(IdempotencyRecord).where(
                    IdempotencyRecord.org_id == org_id, IdempotencyRecord.key == key
                )
            )
        if record is None:
            return None
        if record.fingerprint != fp:
            raise PopdropError(
                "idempotency_key_reused", "this Idempotency-Key was used for another request"
            )
        if record.status_code is not None and record.body is not None:
            return record.status_code, json.loads(record.body)
        if loop.time() > deadline:
            raise PopdropError(
                "idempotency_in_progress",
                "a request with this Idempotency-Key is still running; retry shortly",
                headers={"Retry-After": "1"},
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
