"""A drop's life, walked exhaustively from its table, on each database.

For every status a drop can be in and every action, the writer (`move_drop`) either makes
the move the table allows or refuses with `invalid_transition` (409) and leaves the drop
as it was; the service's entry points (start, pause/resume/cancel, the worker's start of
a due scheduled drop, the close of drained drops) agree with the same table; and the
drop page's buttons are the table's, not a copy.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, update

from popdrop.core.errors import PopdropError
from popdrop.drops import service as drops
from popdrop.drops.lifecycle import (
    DROP_ACTIONS,
    DROP_LIFECYCLE,
    OPERATOR_ACTIONS,
    SEED_TEST,
    DropAction,
    DropStatus,
    action_leads,
    operator_actions,
)
from popdrop.drops.models import Drop, SendRow
from popdrop.web.context import AppContext
from tests.conftest import Tenant
from tests.drops.helpers import owner

_BODY: dict[str, Any] = {
    "name": "Lifecycle drop",
    "channels": ["email"],
    "from_email": "drops@popdrop.test",
    "variants": [
        {"name": "A", "content": {"email": {"default": {"subject": "Hi", "text": "Hello."}}}}
    ],
    "quiet_start_hour": 0,
    "quiet_end_hour": 0,
}


async def _new_drop(client: httpx.AsyncClient, tenant: Tenant) -> int:
    created = await client.post("/api/v1/drops", json=_BODY, headers=tenant.headers)
    assert created.status_code == 201, created.text
    drop_id = int(created.json()["id"])
    cleared = await client.post(
        f"/api/v1/drops/{drop_id}/seed-override", json={"reason": "test"}, headers=tenant.headers
    )
    assert cleared.status_code == 200, cleared.text
    return drop_id


async def _put(ctx: AppContext, drop_id: int, status: DropStatus, **fields: Any) -> None:
    """Place the drop in `status` (a fixture's shortcut, not a move) with no send rows."""
    started = ctx.clock.now() if status in (DropStatus.SENDING, DropStatus.DONE) else None
    values: dict[str, Any] = {
        "status": status,
        "started_at": started,
        "finished_at": None,
        "paused_reason": None,
        "scheduled_at": None,
    } | fields
    async with ctx.db.transaction() as session:
        await session.execute(delete(SendRow).where(SendRow.drop_id == drop_id))
        await session.execute(update(Drop).where(Drop.id == drop_id).values(**values))


async def _status(ctx: AppContext, drop_id: int) -> str:
    async with ctx.db.reader() as session:
        drop = await session.get(Drop, drop_id)
        assert drop is not None
        return drop.status


def test_the_status_table_is_the_union_of_the_actions() -> None:
    for source in DropStatus:
        for target in DropStatus:
            by_some_action = any(target in action_leads(a, source) for a in DropAction)
            assert DROP_LIFECYCLE.allows(source, target) == by_some_action, (source, target)
    assert DROP_LIFECYCLE.terminal == {DropStatus.DONE, DropStatus.CANCELLED}


def test_the_buttons_are_the_tables() -> None:
    for status in DropStatus:
        offered = operator_actions(status)
        for action in OPERATOR_ACTIONS:
            assert (action in offered) == (status in DROP_ACTIONS[action]), (status, action)
        assert (SEED_TEST in offered) == (status in DROP_ACTIONS[DropAction.START])
    assert operator_actions(DropStatus.DONE) == frozenset()


async def test_the_writer_makes_every_allowed_move_and_refuses_every_other(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    drop_id = await _new_drop(app_client, tenant)
    now = ctx.clock.now()
    walked = refused = 0
    for source in DropStatus:
        for action in DropAction:
            for target in DropStatus:
                if target == source:
                    continue
                await _put(ctx, drop_id, source)
                allowed = target in action_leads(action, source)
                try:
                    async with ctx.db.transaction() as session:
                        drop = await session.get(Drop, drop_id)
                        assert drop is not None
                        drops.move_drop(drop, action, target, now=now, paused_reason="why")
                except PopdropError as error:
                    assert not allowed, (source, action, target, error.message)
                    assert (error.reason, error.status) == ("invalid_transition", 409)
                    assert error.message == f"cannot {action} a drop that is {source}"
                    assert await _status(ctx, drop_id) == source
                    refused += 1
                    continue
                assert allowed, f"{action} moved a {source} drop to {target}"
                assert await _status(ctx, drop_id) == target
                walked += 1
    allowed_moves = sum(len(t) for table in DROP_ACTIONS.values() for t in table.values())
    assert walked == allowed_moves
    assert walked + refused == len(DropAction) * len(DropStatus) * (len(DropStatus) - 1)


@pytest.mark.parametrize("action", [a for a in OPERATOR_ACTIONS if a is not DropAction.START])
async def test_pause_resume_cancel_follow_the_table(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, action: DropAction
) -> None:
    drop_id = await _new_drop(app_client, tenant)
    asked_twice = {
        DropAction.PAUSE: DropStatus.PAUSED,
        DropAction.RESUME: DropStatus.SENDING,
        DropAction.CANCEL: DropStatus.CANCELLED,
    }[action]
    for source in DropStatus:
        await _put(ctx, drop_id, source)
        try:
            async with ctx.db.transaction() as session:
                await drops.set_state(session, owner(tenant), drop_id, action, now=ctx.clock.now())
        except PopdropError as error:
            assert not action_leads(action, source) and source != asked_twice, source
            assert error.reason == "invalid_transition"
            assert await _status(ctx, drop_id) == source
            continue
        after = DropStatus(await _status(ctx, drop_id))
        assert after == source == asked_twice or after in action_leads(action, source)


async def test_start_follows_the_table(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    drop_id = await _new_drop(app_client, tenant)
    later = ctx.clock.now() + timedelta(hours=1)
    for source in DropStatus:
        for scheduled_at in (None, later):
            await _put(ctx, drop_id, source, scheduled_at=scheduled_at)
            try:
                async with ctx.db.transaction() as session:
                    await drops.start_drop(session, owner(tenant), drop_id, now=ctx.clock.now())
            except PopdropError as error:
                assert not action_leads(DropAction.START, source), source
                assert error.reason == "invalid_transition"
                assert await _status(ctx, drop_id) == source
                continue
            expected = DropStatus.SENDING if scheduled_at is None else DropStatus.SCHEDULED
            assert await _status(ctx, drop_id) == expected, (source, scheduled_at)


async def test_the_worker_starts_due_scheduled_drops_and_closes_drained_ones(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    drop_id = await _new_drop(app_client, tenant)
    now = ctx.clock.now()
    for source in DropStatus:
        await _put(ctx, drop_id, source, scheduled_at=now - timedelta(minutes=1))
        async with ctx.db.transaction() as session:
            started = await drops.start_due_drops(session, now=now)
        due = source is DropStatus.SCHEDULED
        assert (drop_id in started) == due
        assert await _status(ctx, drop_id) == (DropStatus.SENDING if due else source)

        await _put(ctx, drop_id, source)
        async with ctx.db.transaction() as session:
            finished = await drops.finish_drained(session, now=now)
        closes = DropStatus.DONE in action_leads(DropAction.FINISH, source)
        assert (drop_id in finished) == closes
        assert await _status(ctx, drop_id) == (DropStatus.DONE if closes else source)
