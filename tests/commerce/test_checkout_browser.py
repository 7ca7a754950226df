"""Checkout in a real browser at 390 px: a `popdrop serve` process with the Stripe sandbox
(its own thread) as the payment provider, driven by Playwright on Debian's chromium.

- Pay now: the public page's Buy button → the checkout page (a code applied) → Pay now →
  the sandbox's hosted page (a test card) → the confirmation, paid, with the pickup QR →
  the pickup scanner hands the order out by its typed code.
- Pay at pickup, with JavaScript off: Buy → Pay at pickup → the confirmation with the QR;
  the scanner says not paid, staff mark it paid, then it is handed out.

Screenshots land in $POPDROP_SCREENSHOTS when set, else in tmp_path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from popdrop.commerce.stripe_sandbox import (
    SANDBOX_API_KEY,
    SANDBOX_WEBHOOK_SECRET,
    StripeSandbox,
)
from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS, log_in, run_cli
from tests.server import Server, running_server

pytestmark = MARKS
EMAIL, PASSWORD = "host@checkout.test", "checkout browser password"
PHONE = {"width": 390, "height": 844}


@dataclass
class Shop:
    server: Server
    headers: dict[str, str]
    event_id: int
    lane_id: int
    code: str


def _seed(server: Server) -> Shop:
    run_cli(
        server,
        ("org", "create", "shop", "Shop"),
        ("user", "create", "--org", "shop", "--email", EMAIL, "--role", "owner",
         "--password", PASSWORD),
    )  # fmt: skip
    made = server.cli("token", "create", "--org", "shop", "--name", "seed", "--role", "owner")
    assert made.returncode == 0, made.stderr
    headers = {"Authorization": f"Bearer {made.stdout.strip().split()[-1]}"}
    base, now = server.base_url, datetime.now(UTC)

    def post(url: str, body: dict[str, Any]) -> Any:
        response = httpx.post(base + url, json=body, headers=headers)
        assert response.status_code in (200, 201), (url, response.text)
        return response.json()

    event = post(
        "/api/v1/events",
        {
            "slug": "market", "title": "Night market", "timezone": "Europe/Berlin",
            "venue_name": "Old tram depot", "hold_ttl_seconds": 900,
            "starts_at": (now + timedelta(minutes=5)).isoformat(),
            "ends_at": (now + timedelta(hours=4)).isoformat(),
        },
    )  # fmt: skip
    post(f"/api/v1/events/{event['id']}/status", {"status": "published"})
    lane = post(f"/api/v1/events/{event['id']}/lanes", {"name": "Front desk"})
    product = post(
        f"/api/v1/events/{event['id']}/products",
        {"title": "Linen tote", "price_minor": 2400, "variants": ["natural"]},
    )
    stock = httpx.put(
        f"{base}/api/v1/stock",
        json={"variant_id": product["variants"][0]["id"], "lane_id": lane["id"], "total": 5},
        headers=headers,
    )
    assert stock.status_code == 200, stock.text
    batch = post(
        "/api/v1/voucher-batches",
        {"name": "friends", "quantity": 1, "discount_kind": "percent", "discount_value": 10,
         "discount_description": "Friends of the market"},
    )  # fmt: skip
    return Shop(server, headers, event["id"], lane["id"], batch["codes"][0])


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    sandbox = StripeSandbox(retry_delays=(0.2, 0.5))
    with sandbox.serving_in_thread() as sandbox_url, pytest.MonkeyPatch.context() as env:
        # The server process reads its Stripe settings from the environment.
        env.setenv("POPDROP_STRIPE_SECRET_KEY", SANDBOX_API_KEY)
        env.setenv("POPDROP_STRIPE_API_BASE", sandbox_url)
        env.setenv("POPDROP_STRIPE_WEBHOOK_SECRETS", SANDBOX_WEBHOOK_SECRET)
        with running_server(tmp_path_factory.mktemp("checkout-browser")) as server:
            sandbox.webhook_url = f"{server.base_url}/api/v1/payments/stripe/webhook"
            yield _seed(server)


def _scan(page: Any, base: str, shop: Shop, code: str) -> str:
    page.goto(f"{base}/pickup/{shop.event_id}?lane={shop.lane_id}")
    page.fill("#secret", code)
    page.locator("#manual button[type=submit]").click()
    from playwright.sync_api import expect

    expect(page.locator("#result")).not_to_have_attribute("data-result", "")
    return str(page.locator("#result").get_attribute("data-result"))


def test_pay_now_through_the_hosted_page_then_pickup(shop: Shop, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = shop.server.base_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=PHONE, is_mobile=True)
            page.goto(f"{base}/e/{shop.event_id}")
            page.locator("button.buy").first.click()
            page.wait_for_url(re.compile(r".*/checkout/.*"))
            # The countdown ticks (event-public.js) from the expiry the server wrote.
            expect(page.locator(".countdown-value")).to_have_text(re.compile(r"^00:1[45]:\d\d$"))
            page.fill("input[name=code]", shop.code)
            page.get_by_role("button", name="Apply").click()
            expect(page.locator("table.breakdown")).to_contain_text("Friends of the market")
            expect(page.locator("[data-total]")).to_have_text("21.60 EUR")
            page.fill("input[name=receipt_email]", "ana@example.com")
            page.screenshot(path=str(shots / "checkout-code.png"), full_page=True)
            page.get_by_role("button", name=re.compile("Pay now")).click()
            page.wait_for_url(re.compile(r".*/pay/cs_.*"))  # the provider's hosted page
            page.fill("#card", "4242 4242 4242 4242")
            page.get_by_role("button", name="Pay").click()
            page.wait_for_url(re.compile(r".*/orders/view/.*"))
            expect(page.locator("#order-status")).to_have_attribute("data-status", "paid")
            expect(page.locator("figure.qr svg")).to_be_visible()
            code = page.locator("#pickup-code").inner_text()
            page.screenshot(path=str(shots / "checkout-paid.png"), full_page=True)

            host = browser.new_page(viewport=PHONE, is_mobile=True)
            host.goto(f"{base}/login")
            log_in(host, EMAIL, PASSWORD)
            host.wait_for_url(re.compile(r".*/vouchers.*"))
            assert _scan(host, base, shop, code) == "ok"
            expect(host.locator("#result")).to_contain_text("Hand it over")
            host.screenshot(path=str(shots / "pickup-ok.png"), full_page=True)
        finally:
            browser.close()


def test_pay_at_pickup_without_javascript(shop: Shop, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = shop.server.base_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            customer = browser.new_context(
                viewport=PHONE, is_mobile=True, java_script_enabled=False
            ).new_page()
            customer.goto(f"{base}/e/{shop.event_id}")
            customer.locator("button.buy").first.click()
            customer.wait_for_url(re.compile(r".*/checkout/.*"))
            # Without script the countdown shows the expiry time the server wrote.
            expect(customer.locator(".countdown-value")).to_have_text(
                re.compile(r"^until \d\d:\d\d \w+$")
            )
            customer.get_by_role("button", name="Pay at pickup").click()
            customer.wait_for_url(re.compile(r".*/orders/view/.*"))
            expect(customer.locator("#order-status")).to_have_text("Reserved · pay at pickup")
            expect(customer.locator("figure.qr svg")).to_be_visible()
            code = customer.locator("#pickup-code").inner_text()
            customer.screenshot(path=str(shots / "pay-at-pickup.png"), full_page=True)

            host = browser.new_page(viewport=PHONE, is_mobile=True)
            host.goto(f"{base}/login")
            log_in(host, EMAIL, PASSWORD)
            host.wait_for_url(re.compile(r".*/vouchers.*"))
            assert _scan(host, base, shop, code) == "not_paid"
            orders = httpx.get(
                f"{base}/api/v1/orders?event_id={shop.event_id}&status=pending",
                headers=shop.headers,
            ).json()
            host.goto(f"{base}/orders/{orders[0]['id']}")
            host.get_by_role("button", name="Mark paid · cash").click()
            expect(host.locator("#notice")).to_have_text("Marked paid.")
            assert _scan(host, base, shop, code) == "ok"
        finally:
            browser.close()
