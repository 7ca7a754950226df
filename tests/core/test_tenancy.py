"""`core.tenancy.owned`: a row is found only within its organization; anything else is 404."""

from __future__ import annotations

from datetime import timedelta

import pytest

from popdrop.core.errors import PopdropError
from popdrop.core.tenancy import owned
from popdrop.events.models import Event, Lane
from popdrop.vouchers.models import VoucherBatch
from popdrop.web.context import AppContext
from tests.conftest import make_tenant


async def _event(ctx: AppContext, org_id: int, slug: str) -> int:
    now = ctx.clock.now()
    async with ctx.db.transaction() as session:
        event = Event(
            org_id=org_id,
            slug=slug,
            title="Pop-up",
            timezone="UTC",
            starts_at=now + timedelta(days=1),
            ends_at=now + timedelta(days=2),
            status="draft",
            created_at=now,
        )
        session.add(event)
        await session.flush()
        return event.id


async def test_a_row_is_found_in_its_organization_only(ctx: AppContext) -> None:
    mine, theirs = await make_tenant(ctx), await make_tenant(ctx)
    event_id = await _event(ctx, mine.org_id, "own")
    async with ctx.db.reader() as session:
        found = await owned(session, Event, event_id, mine.org_id)
        assert found.id == event_id and found.org_id == mine.org_id
        with pytest.raises(PopdropError) as across:
            await owned(session, Event, event_id, theirs.org_id)
        with pytest.raises(PopdropError) as missing:
            await owned(session, Event, event_id + 10_000, mine.org_id)
    # Another tenant's id answers exactly like an id that does not exist.
    for refused in (across.value, missing.value):
        assert (refused.reason, refused.status, refused.message) == (
            "not_found",
            404,
            "event not found",
        )


async def test_what_names_the_thing_and_extra_conditions_must_hold(ctx: AppContext) -> None:
    tenant = await make_tenant(ctx)
    event_id = await _event(ctx, tenant.org_id, "one")
    other_event = await _event(ctx, tenant.org_id, "two")
    async with ctx.db.transaction() as session:
        lane = Lane(org_id=tenant.org_id, event_id=event_id, name="Front")
        session.add(lane)
        await session.flush()
        lane_id = lane.id
    async with ctx.db.reader() as session:
        assert (
            await owned(session, Lane, lane_id, tenant.org_id, where=(Lane.event_id == event_id,))
        ).id == lane_id
        with pytest.raises(PopdropError) as wrong_event:
            await owned(
                session,
                Lane,
                lane_id,
                tenant.org_id,
                what="lane of this event",
                where=(Lane.event_id == other_event,),
            )
        assert wrong_event.value.message == "lane of this event not found"
        with pytest.raises(PopdropError) as batch:
            await owned(session, VoucherBatch, 1_000_000, tenant.org_id, what="batch")
        assert batch.value.message == "batch not found"


async def test_lock_and_fresh_read_the_same_row(ctx: AppContext) -> None:
    tenant = await make_tenant(ctx)
    event_id = await _event(ctx, tenant.org_id, "lock")
    async with ctx.db.transaction() as session:
        locked = await owned(session, Event, event_id, tenant.org_id, lock=True)
        fresh = await owned(session, Event, event_id, tenant.org_id, fresh=True)
        assert locked is fresh
