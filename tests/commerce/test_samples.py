"""Zero-cost samples: one per person per campaign (also under a storm of concurrent
grants on PostgreSQL), a unit taken from the lane's stock, its cost allocated, its
provenance kept, and the people who bought afterwards counted."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from typing import Any

import httpx
import pytest

from popdrop.commerce.models import Order
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.commerce.test_catalog import add_product, available
from tests.conftest import Tenant
from tests.events.helpers import Shop, make_shop, post


async def sample_shop(
    client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, *, units: int = 5
) -> tuple[Shop, int, int]:
    """A shop with a sample product (cost 250) at its lane; (shop, product, variant)."""
    shop = await make_shop(client, tenant, clock.now())
    variant = await add_product(
        client, tenant, shop, title="Tasting cup", price=0, units=units,
        is_sample=True, unit_cost_minor=250,
    )  # fmt: skip
    products = await client.get(f"/api/v1/events/{shop.event_id}/products", headers=tenant.headers)
    [product] = [p for p in products.json() if p["is_sample"]]
    return shop, int(product["id"]), variant


async def order_of(ctx: AppContext, tenant: Tenant, shop: Shop, contact: str, status: str) -> None:
    now = ctx.clock.now()
    async with ctx.db.transaction() as session:
        session.add(
            Order(
                org_id=tenant.org_id, event_id=shop.event_id, status=status, source="web",
                lane_id=shop.lane_id, currency="EUR", total_minor=1500, contact_ref=contact,
                price_held_until=now, created_at=now, created_by="test", paid_at=now,
            )
        )  # fmt: skip


def give(shop: Shop, product_id: int, contact: str, **extra: Any) -> dict[str, Any]:
    return {
        "product_id": product_id,
        "lane_id": shop.lane_id,
        "campaign": "launch",
        "contact_ref": contact,
        "allocated_to": "campaign:launch",
        **extra,
    }


async def test_one_sample_per_person_per_campaign_with_its_cost_allocated(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop, product_id, variant = await sample_shop(app_client, tenant, clock, units=3)
    partner = await post(
        app_client, tenant, f"/api/v1/events/{shop.event_id}/partners", {"name": "Bakery"}
    )
    first = await app_client.post(
        "/api/v1/samples",
        json=give(shop, product_id, "ann@example.test", drop_id=7, segment="hot",
                  conversation_id=12),
        headers=tenant.headers,
    )  # fmt: skip
    assert first.status_code == 201, first.text
    grant = first.json()
    assert (grant["unit_cost_minor"], grant["currency"]) == (250, "EUR")
    assert (grant["drop_id"], grant["segment"], grant["conversation_id"]) == (7, "hot", 12)
    assert "ann@example.test" not in first.text  # the person is a keyed digest only
    assert (await available(app_client, tenant, shop))[variant] == 2

    again = await app_client.post(
        "/api/v1/samples", json=give(shop, product_id, "ann@example.test"), headers=tenant.headers
    )
    assert (again.status_code, again.json()["reason"]) == (409, "already_sampled")
    other_campaign = await app_client.post(
        "/api/v1/samples",
        json=give(shop, product_id, "ann@example.test", campaign="autumn",
                  allocated_to=f"partner:{partner['id']}"),
        headers=tenant.headers,
    )  # fmt: skip
    assert other_campaign.status_code == 201, other_campaign.text
    bob = await app_client.post(
        "/api/v1/samples",
        json=give(shop, product_id, "bob", allocated_to="budget:marketing"),
        headers=tenant.headers,
    )
    assert bob.status_code == 201
    # Three units, three samples: the fourth person is told there is none left.
    late = await app_client.post(
        "/api/v1/samples", json=give(shop, product_id, "cy"), headers=tenant.headers
    )
    assert (late.status_code, late.json()["reason"]) == (409, "sold_out")
    assert (await available(app_client, tenant, shop))[variant] == 0

    # Sample -> purchase: bob pays an order later; ann's order was refunded.
    clock.advance(timedelta(minutes=5))
    await order_of(ctx, tenant, shop, "bob", "paid")
    await order_of(ctx, tenant, shop, "ann@example.test", "refunded")
    costs = await app_client.get(f"/api/v1/events/{shop.event_id}/samples", headers=tenant.headers)
    assert costs.status_code == 200, costs.text
    report = costs.json()
    assert report["samples"] == 3
    assert {
        (a["allocated_to"], a["samples"], a["cost_minor"], a["bought_later"])
        for a in report["allocations"]
    } == {
        ("campaign:launch", 1, 250, 0),
        (f"partner:{partner['id']}", 1, 250, 0),
        ("budget:marketing", 1, 250, 1),
    }
    assert len(report["recent"]) == 3


async def test_only_samples_of_this_event_to_known_payers(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop, product_id, _ = await sample_shop(app_client, tenant, clock)
    not_sample = await app_client.post(
        "/api/v1/samples", json=give(shop, shop.product_id, "ann"), headers=tenant.headers
    )
    assert (not_sample.status_code, not_sample.json()["reason"]) == (422, "invalid_request")
    for allocated_to in ("partner:999999", "nobody", "campaign:"):
        refused = await app_client.post(
            "/api/v1/samples",
            json=give(shop, product_id, "ann", allocated_to=allocated_to),
            headers=tenant.headers,
        )
        assert refused.status_code in (404, 422), (allocated_to, refused.text)
    other = await make_shop(app_client, tenant, clock.now(), slug="elsewhere")
    wrong_lane = await app_client.post(
        "/api/v1/samples",
        json={**give(shop, product_id, "ann"), "lane_id": other.lane_id},
        headers=tenant.headers,
    )
    assert wrong_lane.status_code == 404


async def test_twenty_concurrent_grants_for_one_person_give_one(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, backend: str
) -> None:
    if backend != "postgresql":
        pytest.skip("concurrency is proven on PostgreSQL (SQLite serialises writers)")
    shop, product_id, variant = await sample_shop(app_client, tenant, clock, units=50)
    responses = await asyncio.gather(
        *(
            app_client.post(
                "/api/v1/samples",
                json=give(shop, product_id, "same-person"),
                headers=tenant.headers,
            )
            for _ in range(20)
        )
    )
    assert Counter(r.status_code for r in responses) == {201: 1, 409: 19}
    assert {r.json()["reason"] for r in responses if r.status_code == 409} == {"already_sampled"}
    assert (await available(app_client, tenant, shop))[variant] == 49  # one unit taken
