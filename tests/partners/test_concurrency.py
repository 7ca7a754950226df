"""Duplicate deliveries at the same time make one sale, and a refund racing its sale is
never lost: on PostgreSQL with a pool of real connections (and on SQLite)."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
from sqlalchemy import func, select

from popdrop.core.clock import FrozenClock
from popdrop.partners.models import PosEvent, PosSale
from popdrop.web.context import AppContext
from tests.conftest import Tenant
from tests.partners.helpers import (
    SHOPIFY_ORDER,
    SQUARE_PAYMENT,
    SQUARE_REFUND,
    make_till,
    send_shopify,
    send_square,
    send_standard,
    square_event,
    standard_sale,
)


async def _count(ctx: AppContext, model: type[PosSale] | type[PosEvent], org_id: int) -> int:
    async with ctx.db.reader() as session:
        return int(await session.scalar(select(func.count()).where(model.org_id == org_id)) or 0)


async def test_the_same_event_delivered_50_times_at_once_is_one_sale(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    responses = await asyncio.gather(
        *(send_square(app_client, till, SQUARE_PAYMENT) for _ in range(50))
    )
    assert {r.status_code for r in responses} == {200}
    assert Counter(r.json()["outcome"] for r in responses) == {"sale_recorded": 1, "duplicate": 49}
    assert await _count(ctx, PosSale, tenant.org_id) == 1


async def test_different_events_for_one_sale_at_once_make_one_sale(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    """orders/create and orders/paid (and Shopify's retries) racing: one sale."""
    till = await make_till(app_client, tenant, clock.now())
    sends = [
        send_shopify(app_client, till, topic, f"ev-{topic}-{n}", SHOPIFY_ORDER)
        for n in range(20)
        for topic in ("orders/create", "orders/paid")
    ]
    responses = await asyncio.gather(*sends)
    outcomes = Counter(r.json()["outcome"] for r in responses)
    assert outcomes == {"sale_recorded": 1, "sale_already_recorded": 39}
    assert await _count(ctx, PosSale, tenant.org_id) == 1
    assert await _count(ctx, PosEvent, tenant.org_id) == 40


async def test_refunds_racing_their_sales_are_all_applied(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    sends = []
    for n in range(15):
        payment_id = f"PAY{n:04d}"
        sends.append(
            send_square(
                app_client, till, square_event(SQUARE_PAYMENT, id=payment_id, event_id=f"p-{n}")
            )
        )
        sends.append(
            send_square(
                app_client,
                till,
                square_event(
                    SQUARE_REFUND, id=f"REF{n:04d}", payment_id=payment_id, event_id=f"r-{n}"
                ),
            )
        )
    responses = await asyncio.gather(*sends)
    assert {r.status_code for r in responses} == {200}
    listed = await app_client.get("/api/v1/pos/sales", headers=tenant.headers)
    assert len(listed.json()) == 15
    assert {(s["status"], s["refunded_minor"]) for s in listed.json()} == {("reversed", 100)}


async def test_many_distinct_sales_at_once_are_all_kept(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    now = clock.now()
    responses = await asyncio.gather(
        *(
            send_standard(
                app_client,
                till,
                standard_sale(external_id=f"C-{n}", event_id=f"c-{n}"),
                now,
                webhook_id=f"m{n}",
            )
            for n in range(60)
        )
    )
    assert {r.status_code for r in responses} == {200}
    assert await _count(ctx, PosSale, tenant.org_id) == 60
