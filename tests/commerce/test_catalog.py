"""The catalog: bundles held all or none, price rules checked against their kind, the
checkout policy per event, and product cost fields through the product API."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from typing import Any

import httpx
import pytest

from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import Shop, make_shop, post


async def add_product(
    client: httpx.AsyncClient,
    tenant: Tenant,
    shop: Shop,
    *,
    title: str,
    price: int,
    units: int,
    **extra: Any,
) -> int:
    """A product of the shop's event with `units` at its lane; its variant id."""
    product = await post(
        client,
        tenant,
        f"/api/v1/events/{shop.event_id}/products",
        {"title": title, "price_minor": price, **extra},
    )
    variant_id = int(product["variants"][0]["id"])
    response = await client.put(
        "/api/v1/stock",
        json={"variant_id": variant_id, "lane_id": shop.lane_id, "total": units},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    return variant_id


async def available(client: httpx.AsyncClient, tenant: Tenant, shop: Shop) -> dict[int, int]:
    response = await client.get(
        f"/api/v1/events/{shop.event_id}/availability", headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    return {row["variant_id"]: row["available"] for row in response.json()}


async def test_a_bundle_is_held_all_or_none(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)  # tote bag, 1500
    mug = await add_product(app_client, tenant, shop, title="Mug", price=900, units=1)
    bundle = await post(
        app_client,
        tenant,
        f"/api/v1/events/{shop.event_id}/bundles",
        {
            "title": "Tote + mug",
            "price_minor": 2000,
            "components": [{"variant_id": shop.variant_id, "qty": 2}, {"variant_id": mug}],
        },
    )
    assert bundle["currency"] == "EUR" and bundle["list_minor"] == 2 * 1500 + 900
    assert [c["qty"] for c in bundle["components"]] == [2, 1]

    first = await app_client.post(
        f"/api/v1/bundles/{bundle['id']}/holds",
        json={"lane_id": shop.lane_id, "contact_ref": "ann"},
        headers=tenant.headers,
    )
    assert first.status_code == 201, first.text
    holds = first.json()["holds"]
    assert sorted((h["variant_id"], h["qty"]) for h in holds) == sorted(
        [(shop.variant_id, 2), (mug, 1)]
    )
    assert await available(app_client, tenant, shop) == {shop.variant_id: 3, mug: 0}

    # The mug is gone: the second bundle is refused with the mug's reason and the totes
    # that were free are not held by it.
    second = await app_client.post(
        f"/api/v1/bundles/{bundle['id']}/holds",
        json={"lane_id": shop.lane_id, "contact_ref": "bob"},
        headers=tenant.headers,
    )
    assert second.status_code == 409, second.text
    refusal = second.json()
    assert (refusal["reason"], refusal["variant_id"]) == ("sold_out", mug)
    assert refusal["bundle_id"] == bundle["id"]
    assert await available(app_client, tenant, shop) == {shop.variant_id: 3, mug: 0}

    # Deactivated: no new holds of it, and the list says so.
    off = await post(app_client, tenant, f"/api/v1/bundles/{bundle['id']}/deactivate", {})
    assert off["active"] is False
    gone = await app_client.post(
        f"/api/v1/bundles/{bundle['id']}/holds",
        json={"lane_id": shop.lane_id},
        headers=tenant.headers,
    )
    assert gone.status_code == 404


async def test_a_bundle_in_a_full_pickup_window_holds_nothing(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5, window=2)
    cap = await add_product(app_client, tenant, shop, title="Cap", price=1000, units=5)
    bundle = await post(
        app_client,
        tenant,
        f"/api/v1/events/{shop.event_id}/bundles",
        {
            "title": "Tote + cap",
            "price_minor": 2000,
            "components": [{"variant_id": shop.variant_id}, {"variant_id": cap, "qty": 2}],
        },
    )
    # Three units in a window of two: the cap's hold finds the window full.
    refused = await app_client.post(
        f"/api/v1/bundles/{bundle['id']}/holds",
        json={"lane_id": shop.lane_id, "slot_id": shop.slot_id},
        headers=tenant.headers,
    )
    assert (refused.status_code, refused.json()["reason"]) == (409, "slot_full")
    assert await available(app_client, tenant, shop) == {shop.variant_id: 5, cap: 5}
    # The window's places went back too: a single tote still fits.
    single = await app_client.post(
        "/api/v1/holds",
        json={"variant_id": shop.variant_id, "lane_id": shop.lane_id, "slot_id": shop.slot_id,
              "qty": 2},
        headers=tenant.headers,
    )  # fmt: skip
    assert single.status_code == 201, single.text


async def test_bundle_components_come_from_the_event_in_one_currency(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    other = await make_shop(app_client, tenant, clock.now(), slug="other-event")
    usd = await add_product(app_client, tenant, shop, title="Import", price=500, units=1,
                            currency="USD")  # fmt: skip
    url = f"/api/v1/events/{shop.event_id}/bundles"
    foreign = await app_client.post(
        url,
        json={"title": "x", "price_minor": 1, "components": [{"variant_id": other.variant_id}]},
        headers=tenant.headers,
    )
    assert foreign.status_code == 404
    mixed = await app_client.post(
        url,
        json={"title": "x", "price_minor": 1,
              "components": [{"variant_id": shop.variant_id}, {"variant_id": usd}]},
        headers=tenant.headers,
    )  # fmt: skip
    assert (mixed.status_code, mixed.json()["reason"]) == (422, "invalid_request")
    twice = await app_client.post(
        url,
        json={"title": "x", "price_minor": 1,
              "components": [{"variant_id": usd}, {"variant_id": usd}]},
        headers=tenant.headers,
    )  # fmt: skip
    assert twice.status_code == 422
    stranger = await make_tenant(ctx)
    hidden = await app_client.get(url, headers=stranger.headers)
    assert hidden.status_code == 404


async def test_price_rules_are_checked_against_their_kind(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    url = f"/api/v1/events/{shop.event_id}/price-rules"
    good = await post(
        app_client,
        tenant,
        url,
        {"name": "3 for less", "kind": "min_quantity", "params": {"min_qty": 3, "percent": 10},
         "priority": 5, "budget_minor": 10_000},
    )  # fmt: skip
    assert good["params"] == {"min_qty": 3, "percent": 10} and good["active"] is True
    bad_bodies = [
        {"kind": "min_quantity", "params": {"min_qty": 3}},  # no size
        {"kind": "min_quantity", "params": {"min_qty": 3, "percent": 10, "amount_minor": 5}},
        {"kind": "min_quantity", "params": {"min_qty": 3, "percent": 150}},
        {"kind": "min_value", "params": {"percent": 10}},  # no threshold
        {"kind": "buy_x_get_y", "params": {"buy": 2, "get": 1, "colour": 3}},
        {"kind": "cheapest_free", "params": {"every": 3, "free": 3}},
        {"kind": "cheapest_free", "params": {"every": 3, "free": True}},
        {"kind": "percent_off_everything", "params": {}},
        {"kind": "min_value", "params": {"min_value_minor": 10**30, "percent": 5}},
        {
            "kind": "buy_x_get_y",
            "params": {"buy": 2, "get": 1},
            "valid_from": "0001-01-01T00:00:00+01:00",
        },
    ]
    for body in bad_bodies:
        refused = await app_client.post(url, json={"name": "bad", **body}, headers=tenant.headers)
        assert refused.status_code == 422, (body, refused.text)
        assert refused.json()["reason"] in ("invalid_request", "malformed"), refused.text
    window = await app_client.post(
        url,
        json={"name": "w", "kind": "buy_x_get_y", "params": {"buy": 2, "get": 1},
              "valid_from": clock.now().isoformat(),
              "valid_until": (clock.now() - timedelta(hours=1)).isoformat()},
        headers=tenant.headers,
    )  # fmt: skip
    assert window.status_code == 422

    # Edits are checked the same way; a kind change needs its params.
    patch = f"/api/v1/price-rules/{good['id']}"
    wrong = await app_client.patch(patch, json={"params": {"min_qty": 0, "percent": 10}},
                                   headers=tenant.headers)  # fmt: skip
    assert wrong.status_code == 422
    no_params = await app_client.patch(patch, json={"kind": "min_value"}, headers=tenant.headers)
    assert no_params.status_code == 422
    moved = await app_client.patch(
        patch,
        json={"kind": "min_value", "params": {"min_value_minor": 5000, "amount_minor": 500},
              "budget_minor": None},
        headers=tenant.headers,
    )  # fmt: skip
    assert moved.status_code == 200, moved.text
    assert (moved.json()["kind"], moved.json()["budget_minor"]) == ("min_value", None)
    scoped = await app_client.patch(
        patch, json={"product_ids": [shop.product_id]}, headers=tenant.headers
    )
    assert scoped.json()["product_ids"] == [shop.product_id]
    assert scoped.json()["params"] == {"min_value_minor": 5000, "amount_minor": 500}
    other = await make_shop(app_client, tenant, clock.now(), slug="another")
    foreign = await app_client.patch(
        patch, json={"product_ids": [other.product_id]}, headers=tenant.headers
    )
    assert foreign.status_code == 404
    off = await post(app_client, tenant, f"/api/v1/price-rules/{good['id']}/deactivate", {})
    assert off["active"] is False
    listed = await app_client.get(url, headers=tenant.headers)
    assert [r["id"] for r in listed.json()] == [good["id"]]


async def test_checkout_policy_defaults_and_put(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    url = f"/api/v1/events/{shop.event_id}/checkout-policy"
    default = (await app_client.get(url, headers=tenant.headers)).json()
    assert default == {
        "event_id": shop.event_id, "max_codes_per_order": 1, "pay_online": True,
        "pay_at_pickup": True, "code_stacking": "stackable", "code_applies_to": "discounted",
    }  # fmt: skip
    body = {"max_codes_per_order": 2, "pay_online": False, "code_stacking": "exclusive"}
    for _ in range(2):  # a second PUT replaces the first
        put = await app_client.put(url, json=body, headers=tenant.headers)
        assert put.status_code == 200, put.text
    now = (await app_client.get(url, headers=tenant.headers)).json()
    assert (now["max_codes_per_order"], now["pay_online"], now["code_stacking"]) == (
        2, False, "exclusive"
    )  # fmt: skip
    nothing = await app_client.put(
        url, json={"pay_online": False, "pay_at_pickup": False}, headers=tenant.headers
    )
    assert nothing.status_code == 422


async def test_product_cost_floor_and_sample_fields(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    url = f"/api/v1/events/{shop.event_id}/products"
    product = await post(
        app_client,
        tenant,
        url,
        {"title": "Hoodie", "price_minor": 5000, "unit_cost_minor": 2000,
         "margin_floor_bp": 1500, "margin_floor_minor": 300},
    )  # fmt: skip
    assert (product["unit_cost_minor"], product["margin_floor_bp"]) == (2000, 1500)
    assert product["is_sample"] is False
    paid_sample = await app_client.post(
        url, json={"title": "x", "price_minor": 100, "is_sample": True, "unit_cost_minor": 50},
        headers=tenant.headers,
    )  # fmt: skip
    assert paid_sample.status_code == 422
    costless = await app_client.post(
        url, json={"title": "x", "price_minor": 0, "is_sample": True}, headers=tenant.headers
    )
    assert costless.status_code == 422
    cleared = await app_client.patch(
        f"/api/v1/products/{product['id']}",
        json={"margin_floor_minor": None, "unit_cost_minor": 2100},
        headers=tenant.headers,
    )
    assert cleared.status_code == 200, cleared.text
    assert (cleared.json()["margin_floor_minor"], cleared.json()["unit_cost_minor"]) == (None, 2100)
    not_free = await app_client.patch(
        f"/api/v1/products/{product['id']}", json={"is_sample": True}, headers=tenant.headers
    )
    assert (not_free.status_code, not_free.json()["reason"]) == (422, "invalid_request")


async def test_concurrent_bundle_holds_never_leave_a_component_held(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, backend: str
) -> None:
    if backend != "postgresql":
        pytest.skip("concurrency is proven on PostgreSQL (SQLite serialises writers)")
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    mug = await add_product(app_client, tenant, shop, title="Mug", price=900, units=3)
    bundle = await post(
        app_client,
        tenant,
        f"/api/v1/events/{shop.event_id}/bundles",
        {"title": "Pair", "price_minor": 2000,
         "components": [{"variant_id": shop.variant_id}, {"variant_id": mug}]},
    )  # fmt: skip
    answers = await asyncio.gather(
        *(
            app_client.post(
                f"/api/v1/bundles/{bundle['id']}/holds",
                json={"lane_id": shop.lane_id, "contact_ref": f"p{i}"},
                headers=tenant.headers,
            )
            for i in range(12)
        )
    )
    assert Counter(a.status_code for a in answers) == {201: 3, 409: 9}
    assert {a.json()["reason"] for a in answers if a.status_code == 409} == {"sold_out"}
    # Three totes went with the three mugs; none stayed held by a refused bundle.
    assert await available(app_client, tenant, shop) == {shop.variant_id: 2, mug: 0}
