"""An `Idempotency-Key` claim is a lease (issue 13, item 7): a claim whose owner died is
taken over in seconds, a live owner keeps its claim however long its operation runs, and an
owner that lost its claim never commits, so the effect happens once. SQLite, and PostgreSQL
when set. The real SIGKILL of a server is in tests/web/test_idempotency_crash.py."""

from __future__ import annotations

import asyncio
import json
import secrets
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts import service as accounts
from popdrop.accounts.models import Organization
from popdrop.core import idempotency
from popdrop.core.clock import Clock, SystemClock
from popdrop.core.errors import PopdropError
from popdrop.core.idempotency import IdempotencyRecord, fingerprint, run_once
from popdrop.web.context import AppContext
from tests.conftest import make_tenant

PRINCIPAL = "token:1"
FP = fingerprint("POST", "/api/v1/effects", {"n": 1})


class SkewedClock:
    """Another server whose clock runs ahead."""

    def __init__(self, ahead: timedelta) -> None:
        self.ahead = ahead

    def now(self) -> datetime:
        return SystemClock().now() + self.ahead


class Effects:
    """An operation whose effect is a row; counts the rows that were committed."""

    def __init__(self, ctx: AppContext, *, takes: float = 0.0) -> None:
        self.ctx = ctx
        self.prefix = f"eff-{secrets.token_hex(4)}"
        self.takes = takes
        self.runs = 0
        self.started = asyncio.Event()  # the owner holds the claim and is running

    async def operation(self, session: AsyncSession) -> tuple[int, dict[str, Any]]:
        self.runs += 1
        self.started.set()
        org = await accounts.create_organization(
            session, slug=f"{self.prefix}-{self.runs}", name="effect", now=SystemClock().now()
        )
        await asyncio.sleep(self.takes)
        return 201, {"effect": org.slug}

    async def committed(self) -> int:
        async with self.ctx.db.reader() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(Organization)
                .where(Organization.slug.like(f"{self.prefix}-%"))
            )
        return int(count or 0)


async def _run(ctx: AppContext, org_id: int, key: str, effects: Effects, clock: Clock) -> Any:
    return await run_once(
        ctx.db,
        clock,
        org_id=org_id,
        key=key,
        principal=PRINCIPAL,
        request_fingerprint=FP,
        operation=effects.operation,
    )


async def _stored(ctx: AppContext, org_id: int, key: str) -> IdempotencyRecord:
    async with ctx.db.reader() as session:
        record = await session.scalar(
            select(IdempotencyRecord).where(
                IdempotencyRecord.org_id == org_id, IdempotencyRecord.key == key
            )
        )
    assert record is not None
    return record


async def test_claim_left_by_a_killed_owner_is_taken_over(
    ctx: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Well under the minute a dead claim used to block its key for: the retry must not
    # give up on a claim nobody renews.
    monkeypatch.setattr(idempotency, "WAIT_FOR", 20.0)
    org_id = (await make_tenant(ctx)).org_id
    async with ctx.db.transaction() as session:  # what a SIGKILL mid-operation leaves
        session.add(
            IdempotencyRecord(
                org_id=org_id,
                key="dead-owner",
                fingerprint=FP,
                principal=PRINCIPAL,
                claimed_at=SystemClock().now(),
            )
        )
    effects = Effects(ctx)
    status, body = await _run(ctx, org_id, "dead-owner", effects, SystemClock())
    assert status == 201 and body["effect"].startswith(effects.prefix)
    assert await effects.committed() == 1
    again = await _run(ctx, org_id, "dead-owner", effects, SystemClock())
    assert again == (status, body) and await effects.committed() == 1


async def test_live_owner_keeps_its_claim_past_the_lease(
    ctx: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lease twenty-five beats long: a CI machine running several test workers can stall
    # this process's event loop for over a second, and a stalled owner reads as a dead one
    # (production keeps four beats of a second each).
    monkeypatch.setattr(idempotency, "LEASE", timedelta(seconds=2.5))
    monkeypatch.setattr(idempotency, "HEARTBEAT", timedelta(seconds=0.1))
    org_id = (await make_tenant(ctx)).org_id
    effects = Effects(ctx, takes=6.0)  # several leases long
    owner = asyncio.create_task(_run(ctx, org_id, "long-run", effects, SystemClock()))
    await effects.started.wait()
    waiters = await asyncio.gather(
        *(_run(ctx, org_id, "long-run", effects, SystemClock()) for _ in range(3))
    )
    answer = await owner
    assert all(waiter == answer for waiter in waiters)
    assert effects.runs == 1 and await effects.committed() == 1


async def test_owner_taken_over_never_commits(
    ctx: AppContext, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(idempotency, "HEARTBEAT", timedelta(seconds=0.1))
    org_id = (await make_tenant(ctx)).org_id
    effects = Effects(ctx, takes=1.0)
    first = asyncio.create_task(_run(ctx, org_id, "skewed", effects, SystemClock()))
    await effects.started.wait()
    # A server whose clock is a minute ahead sees the claim as expired and takes it over.
    second = await _run(ctx, org_id, "skewed", effects, SkewedClock(timedelta(minutes=1)))
    try:
        answers = [await first, second]
    except PopdropError as lost:
        assert lost.reason == "idempotency_in_progress"
        answers = [second]
    if backend == "postgresql":
        # The first owner's transaction was open while the second took the claim over.
        assert len(answers) == 1
    else:
        # SQLite: the first owner's transaction holds the database's write lock, so the
        # takeover waits for its answer instead.
        assert answers[0] == second
    record = await _stored(ctx, org_id, "skewed")
    assert all(answer == (record.status_code, _body(record)) for answer in answers)
    assert await effects.committed() == 1
    retry = await _run(ctx, org_id, "skewed", effects, SystemClock())
    assert retry == answers[-1] and await effects.committed() == 1


def _body(record: IdempotencyRecord) -> Any:
    assert record.body is not None
    return json.loads(record.body)


async def test_foreign_principal_is_refused_while_the_claim_runs(ctx: AppContext) -> None:
    org_id = (await make_tenant(ctx)).org_id
    effects = Effects(ctx, takes=0.5)
    owner = asyncio.create_task(_run(ctx, org_id, "mine", effects, SystemClock()))
    await effects.started.wait()
    with pytest.raises(PopdropError) as refused:
        await run_once(
            ctx.db,
            SystemClock(),
            org_id=org_id,
            key="mine",
            principal="token:2",
            request_fingerprint=FP,
            operation=effects.operation,
        )
    assert refused.value.reason == "idempotency_key_foreign" and refused.value.status == 403
    await owner
    assert effects.runs == 1 and await effects.committed() == 1
