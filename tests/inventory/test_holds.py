"""Holds: never oversold, expired holds free stock at once, every refusal has a reason."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

import httpx
from sqlalchemy import func, select

from popdrop.core.clock import FrozenClock
from popdrop.inventory import service
from popdrop.inventory.models import Hold, Stock
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import Shop, make_shop


def hold_body(shop: Shop, **extra: object) -> dict[str, object]:
    return {"variant_id": shop.variant_id, "lane_id": shop.lane_id, **extra}


async def availability(client: httpx.AsyncClient, tenant: Tenant, shop: Shop) -> int:
    response = await client.get(
        f"/api/v1/events/{shop.event_id}/availability", headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    [row] = response.json()
    return int(row["available"])


async def test_hold_lifecycle_and_reasons(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    first = await app_client.post(
        "/api/v1/holds", json=hold_body(shop, qty=2), headers=tenant.headers
    )
    assert first.status_code == 201, first.text
    hold = first.json()
    assert hold["status"] == "active"
    assert await availability(app_client, tenant, shop) == 1
    short = await app_client.post(
        "/api/v1/holds", json=hold_body(shop, qty=2), headers=tenant.headers
    )
    assert (short.status_code, short.json()["reason"]) == (409, "insufficient_stock")
    assert short.json()["available"] == 1
    last = await app_client.post("/api/v1/holds", json=hold_body(shop), headers=tenant.headers)
    assert last.status_code == 201
    gone = await app_client.post("/api/v1/holds", json=hold_body(shop), headers=tenant.headers)
    assert (gone.status_code, gone.json()["reason"]) == (409, "sold_out")

    released = await app_client.post(f"/api/v1/holds/{hold['id']}/release", headers=tenant.headers)
    assert released.json()["status"] == "released"
    assert await availability(app_client, tenant, shop) == 2
    again = await app_client.post(f"/api/v1/holds/{hold['id']}/release", headers=tenant.headers)
    assert again.status_code == 409

    converted = await app_client.post(
        f"/api/v1/holds/{last.json()['id']}/convert", headers=tenant.headers
    )
    assert converted.json()["status"] == "converted"
    assert await availability(app_client, tenant, shop) == 2  # sold stays out of stock


async def test_an_expired_hold_frees_stock_at_once(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=1)
    hold = (
        await app_client.post("/api/v1/holds", json=hold_body(shop), headers=tenant.headers)
    ).json()
    assert await availability(app_client, tenant, shop) == 0
    clock.advance(timedelta(seconds=600))  # the event's hold TTL
    # No sweeper ran: availability already counts it free, and a new hold gets the unit.
    assert await availability(app_client, tenant, shop) == 1
    taken = await app_client.post("/api/v1/holds", json=hold_body(shop), headers=tenant.headers)
    assert taken.status_code == 201, taken.text
    stale = await app_client.post(f"/api/v1/holds/{hold['id']}/convert", headers=tenant.headers)
    assert stale.status_code in (409, 410)  # the old hold can no longer be converted
    assert stale.json()["reason"] in ("hold_expired", "conflict")


async def test_extend_is_capped(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    hold = (
        await app_client.post("/api/v1/holds", json=hold_body(shop), headers=tenant.headers)
    ).json()
    for _ in range(2):  # max_hold_renewals default
        clock.advance(timedelta(seconds=500))
        extended = await app_client.post(
            f"/api/v1/holds/{hold['id']}/extend", headers=tenant.headers
        )
        assert extended.status_code == 200, extended.text
    third = await app_client.post(f"/api/v1/holds/{hold['id']}/extend", headers=tenant.headers)
    assert (third.status_code, third.json()["reason"]) == (409, "renewals_exhausted")


async def test_closed_events_slots_and_per_contact_limits(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    draft = await make_shop(app_client, tenant, clock.now(), status="draft", slug="draft-one")
    refused = await app_client.post("/api/v1/holds", json=hold_body(draft), headers=tenant.headers)
    assert (refused.status_code, refused.json()["reason"]) == (409, "event_closed")

    shop = await make_shop(
        app_client, tenant, clock.now(), window=2, limit_per_contact=3, slug="with-window"
    )
    body = hold_body(shop, slot_id=shop.slot_id, contact_ref="ann")
    assert (
        await app_client.post("/api/v1/holds", json=body, headers=tenant.headers)
    ).status_code == 201
    assert (
        await app_client.post("/api/v1/holds", json=body, headers=tenant.headers)
    ).status_code == 201
    full = await app_client.post("/api/v1/holds", json=body, headers=tenant.headers)
    assert (full.status_code, full.json()["reason"]) == (409, "slot_full")
    no_slot = hold_body(shop, contact_ref="ann", qty=2)
    over = await app_client.post("/api/v1/holds", json=no_slot, headers=tenant.headers)
    assert (over.status_code, over.json()["reason"]) == (409, "limit_per_contact")
    other = await app_client.post(
        "/api/v1/holds", json=hold_body(shop, contact_ref="bob", qty=2), headers=tenant.headers
    )
    assert other.status_code == 201


async def test_5000_contenders_for_1000_units_get_exactly_1000_holds(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=1000)
    sem = asyncio.Semaphore(200)

    async def contend() -> httpx.Response:
        async with sem:
            return await app_client.post(
                "/api/v1/holds", json=hold_body(shop), headers=tenant.headers
            )

    responses = await asyncio.gather(*(contend() for _ in range(5000)))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 1000, 409: 4000}
    assert {r.json()["reason"] for r in responses if r.status_code == 409} == {"sold_out"}
    async with ctx.db.reader() as session:
        held = await session.scalar(
            select(func.sum(Hold.qty)).where(Hold.org_id == tenant.org_id, Hold.status == "active")
        )
    assert held == 1000
    assert await availability(app_client, tenant, shop) == 0


async def test_holds_and_stock_are_tenant_private(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    hold = (
        await app_client.post("/api/v1/holds", json=hold_body(shop), headers=tenant.headers)
    ).json()
    intruder = await make_tenant(ctx)
    for method, url, body in (
        ("POST", "/api/v1/holds", hold_body(shop)),
        ("GET", f"/api/v1/holds/{hold['id']}", None),
        ("POST", f"/api/v1/holds/{hold['id']}/release", None),
        ("POST", f"/api/v1/holds/{hold['id']}/convert", None),
        ("POST", f"/api/v1/holds/{hold['id']}/extend", None),
        ("GET", f"/api/v1/events/{shop.event_id}/availability", None),
        ("GET", f"/api/v1/events/{shop.event_id}/products", None),
        (
            "PUT",
            "/api/v1/stock",
            {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "total": 1},
        ),
    ):
        response = await app_client.request(method, url, json=body, headers=intruder.headers)
        assert response.status_code == 404, (method, url, response.text)


async def test_stock_cannot_drop_below_what_is_held(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    await app_client.post("/api/v1/holds", json=hold_body(shop, qty=3), headers=tenant.headers)
    lower = await app_client.put(
        "/api/v1/stock",
        json={"variant_id": shop.variant_id, "lane_id": shop.lane_id, "total": 2},
        headers=tenant.headers,
    )
    assert (lower.status_code, lower.json()["reason"]) == (409, "conflict")
    ok = await app_client.put(
        "/api/v1/stock",
        json={"variant_id": shop.variant_id, "lane_id": shop.lane_id, "total": 3},
        headers=tenant.headers,
    )
    assert ok.json()["available"] == 0


async def test_a_retried_hold_with_a_key_is_made_once(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    headers = {**tenant.headers, "Idempotency-Key": "cart-7"}
    answers = await asyncio.gather(
        *(
            app_client.post("/api/v1/holds", json=hold_body(shop, qty=2), headers=headers)
            for _ in range(20)
        )
    )
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1
    assert await availability(app_client, tenant, shop) == 3


async def test_expired_holds_are_given_back_when_stock_runs_short(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=2)
    for _ in range(2):
        assert (
            await app_client.post("/api/v1/holds", json=hold_body(shop), headers=tenant.headers)
        ).status_code == 201
    clock.advance(timedelta(minutes=11))
    # Both old holds expired: a burst of 10 gets exactly the 2 units back, no more.
    answers = await asyncio.gather(
        *(
            app_client.post("/api/v1/holds", json=hold_body(shop), headers=tenant.headers)
            for _ in range(10)
        )
    )
    assert Counter(a.status_code for a in answers) == {201: 2, 409: 8}
    async with ctx.db.reader() as session:
        states = Counter(
            (
                await session.execute(select(Hold.status).where(Hold.org_id == tenant.org_id))
            ).scalars()
        )
    assert states == {"expired": 2, "active": 2}


async def test_a_burst_is_group_committed_and_never_oversold(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    """Concurrent plain holds of one variant go to PostgreSQL in batches (one statement
    for many requests): each request still gets its own all-or-nothing answer, the units
    granted never exceed the stock, and the stock counter equals the hold rows."""
    shop = await make_shop(app_client, tenant, clock.now(), units=40)
    service.BATCH_SIZES.clear()
    quantities = [1 + i % 3 for i in range(300)]  # 1, 2, 3 units each
    sem = asyncio.Semaphore(100)

    async def contend(qty: int) -> httpx.Response:
        async with sem:
            return await app_client.post(
                "/api/v1/holds", json=hold_body(shop, qty=qty), headers=tenant.headers
            )

    answers = await asyncio.gather(*(contend(q) for q in quantities))
    granted = [q for q, a in zip(quantities, answers, strict=True) if a.status_code == 201]
    refused = [a for a in answers if a.status_code != 201]
    assert {a.status_code for a in refused} == {409}
    assert {a.json()["reason"] for a in refused} <= {"sold_out", "insufficient_stock"}
    left = await availability(app_client, tenant, shop)
    assert sum(granted) + left == 40
    for answer in refused:  # the figures a refusal names are never more than what is left
        body = answer.json()
        if body["reason"] == "insufficient_stock":
            assert body["requested"] > body["available"]
    assert all(q > left for q, a in zip(quantities, answers, strict=True) if a.status_code != 201)
    ids = [a.json()["id"] for a in answers if a.status_code == 201]
    assert len(set(ids)) == len(ids)
    async with ctx.db.reader() as session:
        rows = (
            await session.execute(
                select(Hold.id, Hold.qty).where(
                    Hold.org_id == tenant.org_id, Hold.variant_id == shop.variant_id
                )
            )
        ).all()
        counter = await session.scalar(
            select(Stock.held).where(Stock.variant_id == shop.variant_id)
        )
    assert sorted(r.id for r in rows) == sorted(ids)
    assert sum(r.qty for r in rows) == sum(granted) == counter
    if ctx.db.dialect == "postgresql":
        assert max(service.BATCH_SIZES) > 1  # the burst was batched


async def test_a_burst_on_a_few_units_grants_exactly_those(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=7)
    sem = asyncio.Semaphore(100)

    async def contend() -> httpx.Response:
        async with sem:
            return await app_client.post(
                "/api/v1/holds", json=hold_body(shop), headers=tenant.headers
            )

    answers = await asyncio.gather(*(contend() for _ in range(400)))
    assert Counter(a.status_code for a in answers) == {201: 7, 409: 393}
    assert {a.json()["reason"] for a in answers if a.status_code == 409} == {"sold_out"}
    async with ctx.db.reader() as session:
        counter = await session.scalar(
            select(Stock.held).where(Stock.variant_id == shop.variant_id)
        )
        rows = await session.scalar(select(func.count()).where(Hold.variant_id == shop.variant_id))
    assert counter == rows == 7
    assert await availability(app_client, tenant, shop) == 0
