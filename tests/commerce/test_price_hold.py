"""The price a customer saw holds for the hold's lifetime: a host raising a product's price
does not reach units held before the raise (quote, checkout page, placed order), a cut
does (the lower of the held and the current price), and holds taken after a change pay
the new price."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx

from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.commerce.helpers import hold, make_shop, placed
from tests.commerce.test_checkout_pages import hold_link
from tests.conftest import Tenant
from tests.events.helpers import Shop
from tests.events.test_pages import HTML, login, submit


async def set_price(
    client: httpx.AsyncClient, tenant: Tenant, shop: Shop, clock: FrozenClock, price: int
) -> None:
    """The host edits the product's price a minute later (and a minute passes after)."""
    clock.advance(timedelta(minutes=1))
    response = await client.patch(
        f"/api/v1/products/{shop.product_id}", json={"price_minor": price}, headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["price_minor"] == price
    clock.advance(timedelta(minutes=1))


async def quoted(client: httpx.AsyncClient, tenant: Tenant, hold_id: int) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/orders/quote", json={"hold_ids": [hold_id]}, headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    breakdown: dict[str, Any] = response.json()["breakdown"]
    return breakdown


async def test_a_raise_does_not_reach_units_held_before_it(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)  # 15.00 EUR
    early, path = await hold_link(app_client, ctx, tenant, shop, qty=2)
    await set_price(app_client, tenant, shop, clock, 2000)

    breakdown = await quoted(app_client, tenant, early)
    [line] = breakdown["lines"]
    assert (line["unit_price_minor"], breakdown["total_minor"]) == (1500, 3000)
    page = await app_client.get(path, headers=HTML)
    assert page.status_code == 200, page.text
    assert 'data-total="3000"' in page.text and "30.00 EUR" in page.text  # 2 x 15.00
    assert "40.00" not in page.text

    late = await hold(app_client, tenant, shop)  # held after the raise: the new price
    assert (await quoted(app_client, tenant, late))["total_minor"] == 2000

    order = await placed(app_client, tenant, [early], expected_total_minor=3000)
    assert order["total_minor"] == 3000
    assert [(x["qty"], x["unit_price_minor"]) for x in order["lines"]] == [(2, 1500)]
    assert (await placed(app_client, tenant, [late]))["total_minor"] == 2000


async def test_a_cut_after_the_hold_is_passed_on(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    cut_only = await hold(app_client, tenant, shop)
    await set_price(app_client, tenant, shop, clock, 2000)
    raised_first = await hold(app_client, tenant, shop)  # held at 20.00
    await set_price(app_client, tenant, shop, clock, 1200)

    assert (await quoted(app_client, tenant, cut_only))["total_minor"] == 1200
    assert (await quoted(app_client, tenant, raised_first))["total_minor"] == 1200
    order = await placed(app_client, tenant, [cut_only, raised_first])
    assert order["total_minor"] == 2400
    assert {x["unit_price_minor"] for x in order["lines"]} == {1200}


async def test_a_hold_keeps_its_price_through_several_raises(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    await set_price(app_client, tenant, shop, clock, 1800)
    held = await hold(app_client, tenant, shop)  # held at 18.00
    await set_price(app_client, tenant, shop, clock, 1900)
    await set_price(app_client, tenant, shop, clock, 2500)
    assert (await quoted(app_client, tenant, held))["total_minor"] == 1800
    # A change that leaves the price as it is records nothing and changes nothing.
    await set_price(app_client, tenant, shop, clock, 2500)
    assert (await quoted(app_client, tenant, held))["total_minor"] == 1800


async def test_a_product_with_a_price_history_and_no_holds_can_be_removed(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    await set_price(app_client, tenant, shop, clock, 2000)
    response = await app_client.delete(
        f"/api/v1/products/{shop.product_id}", headers=tenant.headers
    )
    assert response.status_code == 204, response.text


async def test_a_raise_on_the_host_edit_page_keeps_the_held_price(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    held = await hold(app_client, tenant, shop)
    await login(app_client, ctx, tenant, "owner")
    edit = f"/events/{shop.event_id}/products/{shop.product_id}/edit"
    saved = await submit(
        app_client, edit, edit, {"title": "Tote bag", "price": "20.00", "currency": "EUR"}
    )
    assert saved.status_code == 303
    assert (await quoted(app_client, tenant, held))["total_minor"] == 1500
    # The edit page stamps the change with the app's clock: a hold taken after it pays
    # the new price.
    clock.advance(timedelta(seconds=1))
    later = await hold(app_client, tenant, shop)
    assert (await quoted(app_client, tenant, later))["total_minor"] == 2000
