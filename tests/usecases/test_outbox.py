"""The outbox's own rules: after-commit hooks run only after a commit, a notice is kept
once, a crashed drainer's lease runs out and the row is taken again, transient failures
back off until the attempts run out (docs/notifications.md)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from popdrop.core.clock import FrozenClock
from popdrop.core.db import after_commit, signal_after_commit
from popdrop.outbound import outbox
from popdrop.outbound.outbox import Channel, Notice, Notification, NotificationStatus
from popdrop.web.context import AppContext
from tests.conftest import Tenant


def _notice(tenant: Tenant, subject: str) -> Notice:
    return Notice(tenant.org_id, "test", subject, Channel.EMAIL, "x@example.com", {"n": 1})


async def _row(ctx: AppContext, subject: str) -> Notification:
    async with ctx.db.reader() as session:
        row = await session.scalar(select(Notification).where(Notification.subject == subject))
    assert row is not None
    return row


async def test_after_commit_hooks_run_after_a_commit_only(ctx: AppContext) -> None:
    ran: list[str] = []

    async def hook() -> None:
        ran.append("hook")

    async def listener() -> None:
        ran.append("topic")

    async def broken() -> None:
        raise RuntimeError("the broker is away")

    ctx.db.on_commit_signal("test-topic", listener)
    with pytest.raises(ValueError):
        async with ctx.db.transaction() as session:
            after_commit(session, hook)
            signal_after_commit(session, "test-topic")
            raise ValueError("rolled back")
    assert ran == []
    async with ctx.db.transaction() as session:
        after_commit(session, broken)  # logged, never raised: the transaction committed
        after_commit(session, hook, key="once")
        after_commit(session, hook, key="once")
        signal_after_commit(session, "test-topic")
        signal_after_commit(session, "test-topic")
        assert ran == []  # not before the commit
    assert ran == ["hook", "topic"]


async def test_a_notice_is_kept_once_and_a_lapsed_lease_is_taken_again(
    ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    subject = f"lease:{tenant.org_id}"
    for _ in range(2):
        async with ctx.db.transaction() as session:
            await outbox.enqueue(session, [_notice(tenant, subject)], now=clock.now())
    async with ctx.db.transaction() as session:
        first = [r for r in await outbox.claim(session, now=clock.now()) if r.subject == subject]
    assert len(first) == 1  # one row for the two enqueues
    # The drainer died mid-send: within the lease nobody takes the row ...
    clock.advance(timedelta(seconds=outbox.LEASE_SECONDS - 1))
    async with ctx.db.transaction() as session:
        taken = await outbox.claim(session, now=clock.now())
    assert subject not in [r.subject for r in taken]
    # ... after it, the next drain does, and counts the attempt.
    clock.advance(timedelta(seconds=2))
    async with ctx.db.transaction() as session:
        again = [r for r in await outbox.claim(session, now=clock.now()) if r.subject == subject]
    assert len(again) == 1 and again[0].attempts == 2
    async with ctx.db.transaction() as session:
        await outbox.finish(session, again[0].id, NotificationStatus.SENT, now=clock.now())
    row = await _row(ctx, subject)
    assert row.status == "sent" and row.payload == "{}"
    # A finished row never moves again (a late retry of a slow drainer changes nothing).
    async with ctx.db.transaction() as session:
        await outbox.finish(session, row.id, NotificationStatus.FAILED, now=clock.now())
        assert await outbox.retry(session, row, now=clock.now(), error="late") in (
            NotificationStatus.PENDING,
            NotificationStatus.FAILED,
        )
    assert (await _row(ctx, subject)).status == "sent"


async def test_transient_failures_back_off_until_the_attempts_run_out(
    ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    subject = f"retry:{tenant.org_id}"
    async with ctx.db.transaction() as session:
        await outbox.enqueue(session, [_notice(tenant, subject)], now=clock.now())
    delays: list[float] = []
    for attempt in range(1, 4):
        async with ctx.db.transaction() as session:
            [row] = [
                r for r in await outbox.claim(session, now=clock.now()) if r.subject == subject
            ]
            status = await outbox.retry(
                session, row, now=clock.now(), error="451 try later", max_attempts=3
            )
        stored = await _row(ctx, subject)
        if attempt < 3:
            assert status == NotificationStatus.PENDING and stored.status == "pending"
            delays.append((stored.not_before - clock.now()).total_seconds())
            clock.advance(stored.not_before - clock.now())
        else:
            assert status == NotificationStatus.FAILED and stored.status == "failed"
            assert stored.last_error == "451 try later" and stored.payload == "{}"
    assert delays == [30.0, 60.0]
    assert outbox.backoff_seconds(1, retry_after=90) == 90
    assert outbox.backoff_seconds(20) == outbox.MAX_RETRY_SECONDS


async def test_an_address_no_provider_takes_is_skipped_not_a_stalled_drain(
    ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    """A receipt typed as `x@localhost` is refused for that row alone (`invalid_address`);
    before, the address check raised out of the drain and every pass failed on it."""
    from popdrop.usecases.notify import refusal

    bad = Notice(tenant.org_id, "test", "bad-address", Channel.EMAIL, "x@localhost", {})
    async with ctx.db.transaction() as session:
        await outbox.enqueue(session, [bad], now=clock.now())
    row = await _row(ctx, "bad-address")
    async with ctx.db.reader() as session:
        assert await refusal(session, ctx.signer, row) == "invalid_address"
        good = Notification(
            org_id=tenant.org_id, channel="email", recipient="x@example.com", kind="test"
        )
        assert await refusal(session, ctx.signer, good) is None
