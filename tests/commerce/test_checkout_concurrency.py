"""Checkout under contention, on PostgreSQL: 1,000 units and 5,000 buyers through hold →
order → payment (a fake provider, Stripe events applied as the webhook applies them) give
exactly 1,000 paid orders and nothing oversold; a single-use code in 100 concurrent
checkouts discounts exactly one order and the 99 others are told why."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import datetime

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal, system_principal
from popdrop.commerce import orders, settlement
from popdrop.commerce.models import Order, PriceRule
from popdrop.commerce.schemas import OrderCreate, OrderOut
from popdrop.commerce.stripe_events import StripeEvent
from popdrop.core.clock import FrozenClock
from popdrop.core.errors import PopdropError
from popdrop.inventory import service as inventory
from popdrop.inventory.models import Stock
from popdrop.inventory.schemas import HoldCreate
from popdrop.web.context import AppContext
from tests.commerce.helpers import FakeProvider, make_shop
from tests.conftest import Tenant, issue
from tests.events.helpers import post

UNITS = 1_000
BUYERS = 5_000
PARALLEL = 48


def _buyer(tenant: Tenant) -> Principal:
    return system_principal(tenant.org_id, "test:checkout", role="owner")


def _succeeded(order_id: int, org_id: int, intent: str, n: int, now: datetime) -> StripeEvent:
    return StripeEvent(
        id=f"evt_{order_id}_{n}",
        type="payment_intent.succeeded",
        created=now,
        object_id=intent,
        order_id=order_id,
        org_id=org_id,
        payment_intent=intent,
        amount_minor=1500,
        currency="EUR",
        failure_code=None,
        failure_message=None,
        status="succeeded",
    )


async def test_five_thousand_buyers_one_thousand_units(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    backend: str,
) -> None:
    if backend != "postgresql":
        pytest.skip("contention is proven on PostgreSQL (SQLite runs writers one at a time)")
    shop = await make_shop(app_client, tenant, clock.now(), units=UNITS)
    principal = _buyer(tenant)
    provider = FakeProvider()
    gate = asyncio.Semaphore(PARALLEL)
    now = clock.now()
    outcomes: Counter[str] = Counter()

    async def buy(n: int) -> None:
        async with gate:
            spec = HoldCreate(variant_id=shop.variant_id, lane_id=shop.lane_id, qty=1)
            try:
                held = await inventory.take_hold(ctx.db, principal, spec, now=now)
            except PopdropError as refusal:
                outcomes[f"hold:{refusal.reason}"] += 1
                return

            async def place(session: AsyncSession) -> OrderOut:
                return await orders.place_order(
                    session, ctx.signer, principal,
                    OrderCreate(hold_ids=[held.id], payment_method="stripe", contact_ref=f"c{n}"),
                    now=now,
                )  # fmt: skip

            order = await ctx.db.in_transaction(place)
            started = await settlement.start_online_payment(
                ctx.db, principal, order.id, provider,
                signer=ctx.signer, base_url="http://test", now=now,
            )  # fmt: skip
            intent = provider.sessions[f"order-{order.id}-pay-1"].payment_intent
            assert intent is not None and started.payment_id
            event = _succeeded(order.id, tenant.org_id, intent, n, now)
            settled = await settlement.handle_stripe_event(ctx.db, event, provider, now=now)
            outcomes[settled.outcome] += 1
            if n % 10 == 0:  # Stripe delivers twice now and then: the second is a no-op
                again = await settlement.handle_stripe_event(ctx.db, event, provider, now=now)
                outcomes[f"again:{again.outcome}"] += 1

    started_at = time.perf_counter()
    await asyncio.gather(*(buy(n) for n in range(BUYERS)))
    elapsed = time.perf_counter() - started_at

    assert outcomes["paid"] == UNITS, outcomes
    assert set(outcomes) <= {"paid", "again:duplicate", "hold:sold_out"}, outcomes
    assert outcomes["hold:sold_out"] == BUYERS - UNITS, outcomes
    async with ctx.db.reader() as session:
        stock = await session.scalar(select(Stock).where(Stock.variant_id == shop.variant_id))
        assert stock is not None
        assert (stock.total, stock.held, stock.sold) == (UNITS, 0, UNITS)  # 0 oversold
        by_status = dict(
            list(
                (
                    await session.execute(
                        select(Order.status, func.count())
                        .where(Order.event_id == shop.event_id)
                        .group_by(Order.status)
                    )
                ).tuples()
            )
        )
    assert by_status == {"paid": UNITS}
    assert elapsed < 300, f"{elapsed:.1f} s"


async def test_a_single_use_code_in_one_hundred_checkouts_discounts_one_order(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    backend: str,
) -> None:
    if backend != "postgresql":
        pytest.skip("contention is proven on PostgreSQL (SQLite runs writers one at a time)")
    shop = await make_shop(app_client, tenant, clock.now(), units=100)
    _, [code] = await issue(
        app_client, tenant, discount_kind="percent", discount_value=20, max_uses=1
    )
    principal = _buyer(tenant)
    now = clock.now()
    holds = [
        await inventory.take_hold(
            ctx.db,
            principal,
            HoldCreate(variant_id=shop.variant_id, lane_id=shop.lane_id, qty=1),
            now=now,
        )
        for _ in range(100)
    ]

    async def checkout(hold_id: int) -> int | str:
        async def place(session: AsyncSession) -> OrderOut:
            return await orders.place_order(
                session, ctx.signer, principal,
                OrderCreate(hold_ids=[hold_id], codes=[code], payment_method="pay_at_pickup"),
                now=now,
            )  # fmt: skip

        try:
            order = await ctx.db.in_transaction(place)
        except PopdropError as refusal:
            assert code in refusal.message  # the customer is told which code and why
            return refusal.reason
        assert order.discount_minor == 300 and order.total_minor == 1200
        return order.id

    results = await asyncio.gather(*(checkout(h.id) for h in holds))
    placed = [r for r in results if isinstance(r, int)]
    refused = Counter(r for r in results if isinstance(r, str))
    assert len(placed) == 1
    assert refused == {"exhausted": 99}
    async with ctx.db.reader() as session:
        count = await session.scalar(
            select(func.count()).select_from(Order).where(Order.event_id == shop.event_id)
        )
    assert count == 1  # the refused checkouts wrote nothing


async def test_one_hold_in_ten_racing_checkouts_makes_one_order(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    backend: str,
) -> None:
    if backend != "postgresql":
        pytest.skip("contention is proven on PostgreSQL (SQLite runs writers one at a time)")
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    principal = _buyer(tenant)
    now = clock.now()
    held = await inventory.take_hold(
        ctx.db, principal, HoldCreate(variant_id=shop.variant_id, lane_id=shop.lane_id), now=now
    )

    async def checkout() -> str:
        async def place(session: AsyncSession) -> OrderOut:
            return await orders.place_order(
                session, ctx.signer, principal, OrderCreate(hold_ids=[held.id]), now=now
            )

        try:
            await ctx.db.in_transaction(place)
        except PopdropError as refusal:
            return refusal.reason
        return "placed"

    results = Counter(await asyncio.gather(*(checkout() for _ in range(10))))
    assert results == {"placed": 1, "hold_taken": 9}


async def test_a_rule_budget_is_never_overspent(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    backend: str,
) -> None:
    if backend != "postgresql":
        pytest.skip("contention is proven on PostgreSQL (SQLite runs writers one at a time)")
    shop = await make_shop(app_client, tenant, clock.now(), units=200)
    rule = await post(
        app_client, tenant, f"/api/v1/events/{shop.event_id}/price-rules",
        {"name": "Two for less", "kind": "min_quantity",
         "params": {"min_qty": 2, "amount_minor": 300}, "budget_minor": 1000},
    )  # fmt: skip
    principal = _buyer(tenant)
    now = clock.now()
    holds = [
        await inventory.take_hold(
            ctx.db,
            principal,
            HoldCreate(variant_id=shop.variant_id, lane_id=shop.lane_id, qty=2),
            now=now,
        )
        for _ in range(40)
    ]

    async def checkout(hold_id: int) -> int:
        async def place(session: AsyncSession) -> OrderOut:
            return await orders.place_order(
                session, ctx.signer, principal, OrderCreate(hold_ids=[hold_id]), now=now
            )

        return (await ctx.db.in_transaction(place)).discount_minor

    discounts = await asyncio.gather(*(checkout(h.id) for h in holds))
    assert sum(discounts) == 1000  # 300 + 300 + 300 + the last 100, never more
    assert sorted(d for d in discounts if d) == [100, 300, 300, 300]
    async with ctx.db.reader() as session:
        spent = await session.scalar(
            select(PriceRule.budget_spent_minor).where(PriceRule.id == rule["id"])
        )
    assert spent == 1000
