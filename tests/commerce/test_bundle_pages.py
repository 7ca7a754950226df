"""Bundles on the public event page, driven like a browser without JavaScript: the
Bundles section (loaded by htmx, or its own page) lists each active bundle with its
components and the saving; its Buy button holds every component for this browser and
opens one checkout for all of them, priced as the bundle; a component that cannot be
held refuses the bundle with the reason and holds nothing."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import ViewportSize

from popdrop.core.clock import FrozenClock
from tests.browser import CHROMIUM, CHROMIUM_ARGS, run_cli
from tests.commerce.test_catalog import add_product, available
from tests.commerce.test_checkout_pages import send
from tests.conftest import Tenant
from tests.events.helpers import Shop, make_shop, post
from tests.events.test_pages import HTML, csrf_of
from tests.server import Server, running_server

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
    assert "<h1>Sold out</h1>" in again.text
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


# ---------------------------------------------------------------- in a real browser

PHONE: ViewportSize = {"width": 390, "height": 844}


def _api(server: Server, token: str, method: str, url: str, body: Any) -> dict[str, Any]:
    response = httpx.request(
        method,
        f"{server.base_url}{url}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code in (200, 201), (url, response.text)
    data: dict[str, Any] = response.json()
    return data


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium")
def test_sold_out_rows_hide_buy_live_and_a_bundle_sells_from_the_page(
    tmp_path: Path, shots: Path
) -> None:
    """At 390 px: the last tee held elsewhere → its row and the bundle's say "Sold out"
    and their Buy forms go away, without a reload; released → they come back; then the
    bundle's Buy opens one checkout at the bundle's price."""
    from playwright.sync_api import expect, sync_playwright

    data_dir = tmp_path / "server"
    data_dir.mkdir()
    with running_server(data_dir) as server:
        run_cli(server, ("org", "create", "corner", "Corner shop"))
        created = server.cli(
            "token", "create", "--org", "corner", "--name", "browser",
            "--scope", "events:write", "--scope", "events:read",
            "--scope", "inventory:write", "--scope", "holds:write",
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()
        now = datetime.now(UTC)
        event = _api(server, token, "POST", "/api/v1/events", {
            "slug": "corner-drop", "title": "Corner drop", "timezone": "Europe/Berlin",
            "starts_at": (now + timedelta(days=1)).isoformat(),
            "ends_at": (now + timedelta(days=1, hours=4)).isoformat(),
        })  # fmt: skip
        eid = event["id"]
        _api(server, token, "POST", f"/api/v1/events/{eid}/status", {"status": "published"})
        lane = _api(server, token, "POST", f"/api/v1/events/{eid}/lanes", {"name": "Counter"})
        variants = {}
        for title, price, units in (("Tee", 2000, 1), ("Cap", 1000, 3)):
            product = _api(server, token, "POST", f"/api/v1/events/{eid}/products", {
                "title": title, "price_minor": price, "variants": ["one size"],
            })  # fmt: skip
            variants[title] = product["variants"][0]["id"]
            _api(server, token, "PUT", "/api/v1/stock", {
                "variant_id": variants[title], "lane_id": lane["id"], "total": units,
            })  # fmt: skip
        _api(server, token, "POST", f"/api/v1/events/{eid}/bundles", {
            "title": "Tee + cap", "price_minor": 2500,
            "components": [{"variant_id": variants["Tee"]}, {"variant_id": variants["Cap"]}],
        })  # fmt: skip

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=PHONE, is_mobile=True)
                page.goto(f"{server.base_url}/e/{eid}")
                tee_row = page.locator("li", has=page.locator(
                    f'.stock-count[data-variant="{variants["Tee"]}"]'))  # fmt: skip
                bundle_row = page.locator(".bundle-card li", has=page.locator(".bundle-count"))
                expect(bundle_row.locator(".bundle-count")).to_have_text("1 left")
                expect(page.locator(".bundle-save")).to_have_text("save 5.00 EUR")
                expect(tee_row.locator("button.buy")).to_be_visible()

                held = _api(server, token, "POST", "/api/v1/holds", {
                    "variant_id": variants["Tee"], "lane_id": lane["id"], "qty": 1,
                })  # fmt: skip
                expect(tee_row.locator(".stock-count")).to_have_text("Sold out", timeout=10_000)
                expect(tee_row.locator("button.buy")).to_be_hidden()
                expect(bundle_row.locator(".bundle-count")).to_have_text("Sold out")
                expect(bundle_row.locator("button.buy")).to_be_hidden()
                page.screenshot(path=shots / "bundle-01-sold-out-phone.png", full_page=True)

                _api(server, token, "POST", f"/api/v1/holds/{held['id']}/release", {})
                expect(tee_row.locator(".stock-count")).to_have_text("1 left", timeout=10_000)
                expect(tee_row.locator("button.buy")).to_be_enabled()
                expect(bundle_row.locator(".bundle-count")).to_have_text("1 left")
                expect(bundle_row.locator("button.buy")).to_be_visible()
                page.screenshot(path=shots / "bundle-02-back-phone.png", full_page=True)

                bundle_row.locator("button.buy").click()
                page.wait_for_url(re.compile(r"/checkout/"))
                expect(page.locator("[data-total]")).to_have_attribute("data-total", "2500")
                expect(page.locator("table.breakdown")).to_contain_text("Tee + cap")
                page.screenshot(path=shots / "bundle-03-checkout-phone.png", full_page=True)
            finally:
                browser.close()
