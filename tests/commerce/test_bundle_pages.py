"""Bundles on the public event page, driven like a browser without JavaScript: the
Bundles section (loaded by htmx, or its own page) lists each active bundle with its
components and the saving; its Buy button holds every component for this browser and
opens one checkout for all of them, priced as the bundle; a component that cannot be
held refuses the bundle with the reason and holds nothing."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import httpx

from popdrop.core.clock import FrozenClock
from tests.commerce.test_catalog import add_product, available
from tests.commerce.test_checkout_pages import send
from tests.conftest import Tenant
from tests.events.helpers import Shop, make_shop, post
from tests.events.test_pages import HTML, csrf_of

HTMX = {**HTML, "HX-Request": "true"}


async def bundle_shop(
    client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, *, mugs: int = 5
) -> tuple[Shop, int, dict[str, Any]]:
    """The shop's tote bag (15.00) and a mug (9.00) sold together at 20.00."""
    shop = await make_shop(client, tenant, clock.now(), units=5, window=10)
    mug = await add_product(client, tenant, shop, title="Mug", price=900, units=mugs)
    bundle = await post(
        client,
        tenant,
        f"/api/v1/events/{shop.event_id}/bundles",
        {
            "title": "Tote + mug",
            "price_minor": 2000,
            "components": [{"variant_id": shop.variant_id}, {"variant_id": mug}],
        },
    )
    return shop, mug, bundle


async def buy_bundle(
    client: httpx.AsyncClient, shop: Shop, bundle: dict[str, Any]
) -> httpx.Response:
    """Press the bundle's Buy button as the Bundles section offers it."""
    section = await client.get(f"/e/{shop.event_id}/bundles", headers=HTML)
    assert section.status_code == 200, section.text
    fields = {
        "csrf": csrf_of(section.text),
        "bundle_id": bundle["id"],
        "lane_id": shop.lane_id,
        "slot_id": shop.slot_id,
    }
    return await client.post(f"/e/{shop.event_id}/buy-bundle", data=fields, headers=HTML)


async def test_the_public_page_lists_the_bundle_with_its_saving(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop, _, bundle = await bundle_shop(app_client, tenant, clock, mugs=3)
    public = await app_client.get(f"/e/{shop.event_id}", headers=HTML)
    assert public.status_code == 200
    # The page loads the section from commerce (and links to it for a browser without script).
    assert f'hx-get="/e/{shop.event_id}/bundles"' in public.text
    assert f'href="/e/{shop.event_id}/bundles"' in public.text

    fragment = await app_client.get(f"/e/{shop.event_id}/bundles", headers=HTMX)
    assert fragment.status_code == 200
    text = fragment.text
    assert "<html" not in text  # a fragment for htmx
    assert "Tote + mug" in text and "Tote bag" in text and "Mug" in text
    assert "20.00 EUR" in text and "24.00 EUR" in text and "save 4.00 EUR" in text
    assert f'action="/e/{shop.event_id}/buy-bundle"' in text
    assert f'name="bundle_id" value="{bundle["id"]}"' in text
    # Three mugs make three bundles, whatever the five totes could make.
    assert re.search(r'class="stock-count bundle-count[^"]*"[^>]*data-available="3"', text)
    assert "3 left" in text

    # Without script: the same section as a page of its own, with a way back.
    page = await app_client.get(f"/e/{shop.event_id}/bundles", headers=HTML)
    assert page.status_code == 200 and "<html" in page.text
    assert "save 4.00 EUR" in page.text and f'href="/e/{shop.event_id}"' in page.text

    # A deactivated bundle is no longer offered.
    await post(app_client, tenant, f"/api/v1/bundles/{bundle['id']}/deactivate", {})
    gone = await app_client.get(f"/e/{shop.event_id}/bundles", headers=HTMX)
    assert gone.status_code == 200 and "Tote + mug" not in gone.text


async def test_a_bundle_bought_from_the_public_page_is_one_order_at_the_bundle_price(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop, mug, bundle = await bundle_shop(app_client, tenant, clock)
    bought = await buy_bundle(app_client, shop, bundle)
    assert bought.status_code == 303, bought.text
    checkout = urlsplit(bought.headers["location"]).path
    assert checkout.startswith("/checkout/")
    assert app_client.cookies.get("popdrop_buyer")
    # Both components are held for this browser.
    assert await available(app_client, tenant, shop) == {shop.variant_id: 4, mug: 4}

    page = await app_client.get(checkout, headers=HTML)
    assert page.status_code == 200, page.text
    assert "Tote bag" in page.text and "Mug" in page.text
    assert 'data-total="2000"' in page.text  # the bundle's price, not 24.00

    placed = await send(
        app_client, checkout, {"action": "pickup", "receipt_email": "a@example.com"}
    )
    assert placed.status_code == 303, placed.text
    assert "/orders/view/" in placed.headers["location"]
    orders = await app_client.get(
        f"/api/v1/orders?event_id={shop.event_id}", headers=tenant.headers
    )
    [order] = orders.json()
    assert order["total_minor"] == 2000 and order["payment_method"] == "pay_at_pickup"
    assert order["source"] == "web" and order["contact_ref"].startswith("web:")
    assert sorted(line["variant_id"] for line in order["lines"]) == sorted([shop.variant_id, mug])
    assert {line["bundle_id"] for line in order["lines"]} == {bundle["id"]}
    assert sum(line["final_minor"] for line in order["lines"]) == 2000

    # Staff take the money at the lane: both components are sold, nothing held.
    paid = await app_client.post(
        f"/api/v1/orders/{order['id']}/mark-paid", json={"tender": "cash"}, headers=tenant.headers
    )
    assert paid.status_code == 200, paid.text
    assert paid.json()["status"] == "paid"
    rows = await app_client.get(
        f"/api/v1/events/{shop.event_id}/availability", headers=tenant.headers
    )
    stock = {row["variant_id"]: (row["held"], row["sold"]) for row in rows.json()}
    assert stock == {shop.variant_id: (0, 1), mug: (0, 1)}


async def test_a_sold_out_component_refuses_the_bundle_with_the_reason_and_holds_nothing(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop, mug, bundle = await bundle_shop(app_client, tenant, clock, mugs=1)
    first = await buy_bundle(app_client, shop, bundle)
    assert first.status_code == 303, first.text
    before = await available(app_client, tenant, shop)
    assert before == {shop.variant_id: 4, mug: 0}

    # The section says so: the last mug is held, no bundle is left.
    fragment = await app_client.get(f"/e/{shop.event_id}/bundles", headers=HTMX)
    assert re.search(
        r'class="stock-count bundle-count sold-out"[^>]*data-available="0"', fragment.text
    )
    assert "Sold out" in fragment.text

    again = await buy_bundle(app_client, shop, bundle)
    assert again.status_code == 409, again.text
    assert "Mug (one size) is sold out" in again.text
    assert "Nothing was held" in again.text and "<code>sold_out</code>" in again.text
    assert f'href="/e/{shop.event_id}"' in again.text
    assert await available(app_client, tenant, shop) == before  # no tote held meanwhile


async def test_bad_bundle_forms_get_a_page_never_a_500(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop, _, bundle = await bundle_shop(app_client, tenant, clock)
    section = await app_client.get(f"/e/{shop.event_id}/bundles", headers=HTML)
    csrf = csrf_of(section.text)
    url = f"/e/{shop.event_id}/buy-bundle"
    forged = await app_client.post(
        url, data={"csrf": "x", "bundle_id": bundle["id"], "lane_id": shop.lane_id}, headers=HTML
    )
    assert forged.status_code == 403
    unknown = await app_client.post(
        url, data={"csrf": csrf, "bundle_id": 999999, "lane_id": shop.lane_id}, headers=HTML
    )
    assert unknown.status_code == 404 and f'href="/e/{shop.event_id}"' in unknown.text
    typo = await app_client.post(
        url, data={"csrf": csrf, "bundle_id": "x", "lane_id": shop.lane_id}, headers=HTML
    )
    assert typo.status_code == 400 or typo.status_code == 422
    assert (await app_client.get("/e/999999/bundles", headers=HTML)).status_code == 404
    # Nothing of it held anything.
    assert set((await available(app_client, tenant, shop)).values()) == {5}
