"""From the chat to a handed-out order, in a real browser at 390 px: a `popdrop serve`
process (SQLite, and PostgreSQL when POPDROP_TEST_DATABASE_URL is set) with the shipped
"pop-up drop" flow published and the Stripe sandbox (its own thread) as the payment
provider, driven by Playwright on Debian's chromium.

- Pay now: the chat widget → "See the drop" → Reserve → the flow's 10 % code and its
  "Pay now or at pickup" link (a new tab) → the checkout page, the code applied and named
  in the breakdown → Pay now → the sandbox's hosted page → the confirmation, paid, with a
  pickup QR that ZBar reads back to the order's signed secret → a volunteer's pickup
  scanner hands it out by the typed code, then refuses the QR as already picked up. The
  API agrees: source chat, picked up, the code redeemed for this order, the unit sold.
- Pay at pickup, with JavaScript off on the checkout side: the chat's link → Pay at pickup
  → the confirmation with the QR → the scanner says not paid → the volunteer goes from the
  scanner to the lane's queue and the order, marks it paid (cash) → handed out.
- The chat's visit ticket (sent after the checkout link) still checks in at the door
  once its hold has become an order.

Screenshots land in $POPDROP_SCREENSHOTS when set, else in tmp_path.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from popdrop.chat.flow import shipped_source
from popdrop.commerce.stripe_sandbox import (
    SANDBOX_API_KEY,
    SANDBOX_WEBHOOK_SECRET,
    StripeSandbox,
)
from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS, log_in, run_cli
from tests.conftest import postgres_url, side_postgres
from tests.server import Server, running_server

if TYPE_CHECKING:
    from playwright.sync_api import ViewportSize

pytestmark = MARKS
pyzbar = pytest.importorskip("pyzbar.pyzbar", reason="needs pyzbar and Debian's libzbar0")

ORG = "chatshop"
VOLUNTEER = ("lane@chatshop.test", "chat checkout lane password")
PHONE: ViewportSize = {"width": 390, "height": 844}
PRICE_MINOR = 2400  # the tote; the chat's code takes 10 % off
CODE_SAID = re.compile(r"Your code for 10% off: ([0-9A-Z-]+)")


@dataclass
class Shop:
    server: Server
    headers: dict[str, str]
    event_id: int
    lane_id: int
    variant_id: int

    def get(self, url: str) -> Any:
        response = httpx.get(self.server.base_url + url, headers=self.headers, timeout=10)
        assert response.status_code == 200, (url, response.text)
        return response.json()

    def stock(self) -> dict[str, int]:
        rows = self.get(f"/api/v1/events/{self.event_id}/availability")
        (row,) = [r for r in rows if r["variant_id"] == self.variant_id]
        return {k: row[k] for k in ("total", "held", "sold", "available")}


def _seed(server: Server) -> Shop:
    run_cli(
        server,
        ("org", "create", ORG, "Chat shop"),
        ("user", "create", "--org", ORG, "--email", VOLUNTEER[0], "--role", "volunteer",
         "--password", VOLUNTEER[1]),
    )  # fmt: skip
    made = server.cli("token", "create", "--org", ORG, "--name", "seed", "--role", "owner")
    assert made.returncode == 0, made.stderr
    headers = {"Authorization": f"Bearer {made.stdout.strip().split()[-1]}"}
    base, now = server.base_url, datetime.now(UTC)

    def send(method: str, url: str, body: dict[str, Any]) -> Any:
        response = httpx.request(method, base + url, json=body, headers=headers, timeout=10)
        assert response.status_code in (200, 201), (url, response.text)
        return response.json()

    # Doors opened ten minutes ago: an order without a slot is picked up in the door
    # hours, so the scanner is inside the window now.
    event = send(
        "POST", "/api/v1/events",
        {
            "slug": "courtyard", "title": "Courtyard drop", "timezone": "Europe/Berlin",
            "venue_name": "Old tram depot", "hold_ttl_seconds": 900,
            "starts_at": (now - timedelta(minutes=10)).isoformat(),
            "ends_at": (now + timedelta(hours=4)).isoformat(),
        },
    )  # fmt: skip
    send("POST", f"/api/v1/events/{event['id']}/status", {"status": "published"})
    lane = send("POST", f"/api/v1/events/{event['id']}/lanes", {"name": "Front desk"})
    product = send(
        "POST", f"/api/v1/events/{event['id']}/products",
        {"title": "Linen tote", "price_minor": PRICE_MINOR, "variants": ["natural"]},
    )  # fmt: skip
    variant_id = product["variants"][0]["id"]
    send("PUT", "/api/v1/stock", {"variant_id": variant_id, "lane_id": lane["id"], "total": 4})
    flow = send("POST", "/api/v1/chat/flows", {"source": shipped_source("popup_drop")})
    assert flow["version"] == 1, flow
    return Shop(server, headers, event["id"], lane["id"], variant_id)


def _database(kind: str) -> str | None:
    """None: the server's own SQLite file; else a PostgreSQL database of its own, reset
    (on a thread: asyncio.run must not meet pytest-asyncio's loop)."""
    if kind == "sqlite":
        return None
    if postgres_url() is None:
        pytest.skip("PostgreSQL run: set POPDROP_TEST_DATABASE_URL (CI does)")
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, side_postgres("chatpay")).result()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def shop(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Shop]:
    database_url = _database(request.param)
    sandbox = StripeSandbox(retry_delays=(0.2, 0.5))
    with sandbox.serving_in_thread() as sandbox_url, pytest.MonkeyPatch.context() as env:
        # The server process reads its Stripe settings from the environment.
        env.setenv("POPDROP_STRIPE_SECRET_KEY", SANDBOX_API_KEY)
        env.setenv("POPDROP_STRIPE_API_BASE", sandbox_url)
        env.setenv("POPDROP_STRIPE_WEBHOOK_SECRETS", SANDBOX_WEBHOOK_SECRET)
        with running_server(tmp_path_factory.mktemp("chat-checkout"), database_url) as server:
            sandbox.webhook_url = f"{server.base_url}/api/v1/payments/stripe/webhook"
            yield _seed(server)


# ---------------------------------------------------------------- steps both tests take


def _chat_to_checkout_link(page: Any, shop: Shop, shots: Path, prefix: str) -> tuple[str, str, str]:
    """In the widget: the drop, Reserve, the code said in the chat, the checkout link.
    Returns (the 10 % code, the link's URL, the visit ticket's secret)."""
    from playwright.sync_api import expect

    page.goto(f"{shop.server.base_url}/chat/{ORG}")
    expect(page.locator(".pd-chat")).to_have_attribute("data-state", "ready")
    log = page.get_by_role("log")
    expect(log).to_contain_text("Courtyard drop pops up at Old tram depot")
    page.get_by_role("button", name="See the drop").click()
    carousel = page.locator(".pd-carousel").last
    expect(carousel.locator(".pd-card").first).to_contain_text("Linen tote")
    page.screenshot(path=str(shots / f"{prefix}-1-drop.png"), full_page=True)
    carousel.get_by_role("button", name="Reserve").first.click()

    expect(log).to_contain_text(
        re.compile(r"Linen tote is yours until \w{3} \d\d \w{3}, \d\d:\d\d")
    )
    expect(log).to_contain_text(CODE_SAID)
    said = CODE_SAID.search(log.inner_text())
    assert said, log.inner_text()
    link = page.get_by_role("link", name="Pay now or at pickup")
    expect(link).to_be_visible()
    expect(page.locator(".pd-qr img")).to_be_visible()  # the visit ticket follows the link
    _fits(page, "the chat")
    page.screenshot(path=str(shots / f"{prefix}-2-reserved.png"), full_page=True)
    href = link.get_attribute("href")
    assert href and re.search(r"/checkout/[^/]+$", href), href
    ticket = page.locator(".pd-qr").get_attribute("data-ticket")
    assert ticket
    return said.group(1), href, ticket


def _fits(page: Any, what: str) -> None:
    """Nothing sideways on a phone: the page is no wider than its 390 px viewport."""
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"{what} is {width}px wide on a 390px phone"


def _staff_page(browser: Any, shop: Shop) -> Any:
    """A volunteer (scanner role: pickup and collecting money, nothing else) logged in."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport=PHONE, is_mobile=True)
    page.goto(f"{shop.server.base_url}/login")
    log_in(page, *VOLUNTEER)
    expect(page).not_to_have_url(re.compile(r"/login"))
    return page


def _scan(page: Any, shop: Shop, typed: str) -> str:
    from playwright.sync_api import expect

    page.goto(f"{shop.server.base_url}/pickup/{shop.event_id}?lane={shop.lane_id}")
    page.fill("#secret", typed)
    page.locator("#manual button[type=submit]").click()
    expect(page.locator("#result")).not_to_have_attribute("data-result", "")
    return str(page.locator("#result").get_attribute("data-result"))


def _qr_text(page: Any) -> str:
    """What ZBar reads from the confirmation page's QR, as the phone shows it."""
    from PIL import Image

    png = page.locator("figure.qr svg").screenshot()
    found = pyzbar.decode(Image.open(BytesIO(png)))
    assert len(found) == 1, found
    return str(found[0].data.decode())


def _order_in_secret(secret: str) -> tuple[int, int]:
    """(event_id, order_id) from a pickup secret: kind "O" | event (8) | order (8) | …"""
    raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    kind, event_id, order_id = struct.unpack(">cQQ", raw[:17])
    assert kind == b"O", raw[:1]
    return event_id, order_id


def _validate(shop: Shop, code: str) -> httpx.Response:
    """The vault's dry run of a code (nothing consumed)."""
    return httpx.post(
        f"{shop.server.base_url}/api/v1/vouchers/validate",
        json={"code": code},
        headers=shop.headers,
        timeout=10,
    )


# ---------------------------------------------------------------- the tests


def test_chat_reserve_pay_now_and_pick_up(shop: Shop, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    before = shop.stock()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            visitor = browser.new_context(viewport=PHONE, is_mobile=True)
            chat = visitor.new_page()
            code, _href, ticket = _chat_to_checkout_link(chat, shop, shots, "chat-pay")
            assert shop.stock()["held"] == before["held"] + 1  # Reserve held a unit
            fresh = _validate(shop, code)
            assert fresh.status_code == 200, fresh.text
            voucher_id = fresh.json()["id"]

            # The link opens the checkout in a new tab, as the widget's links do.
            with visitor.expect_page() as opened:
                chat.get_by_role("link", name="Pay now or at pickup").click()
            page = opened.value
            page.wait_for_load_state()
            expect(page).to_have_url(re.compile(r"/checkout/[^/]+$"))
            expect(page.locator("table.breakdown")).to_contain_text("Linen tote")
            expect(page.locator("[data-total]")).to_have_text("24.00 EUR")
            page.screenshot(path=str(shots / "chat-pay-3-checkout.png"), full_page=True)

            page.fill("input[name=code]", code)
            page.get_by_role("button", name="Apply").click()
            expect(page.locator("table.breakdown")).to_contain_text("10% off at the pop-up")
            expect(page.locator("[data-total]")).to_have_text("21.60 EUR")
            page.fill("input[name=receipt_email]", "chat-buyer@example.com")
            _fits(page, "the checkout page")
            page.screenshot(path=str(shots / "chat-pay-4-code.png"), full_page=True)
            page.get_by_role("button", name=re.compile("Pay now")).click()

            page.wait_for_url(re.compile(r".*/pay/cs_.*"))  # the provider's hosted page
            page.fill("#card", "4242 4242 4242 4242")
            page.screenshot(path=str(shots / "chat-pay-5-hosted.png"), full_page=True)
            page.get_by_role("button", name="Pay", exact=True).click()

            page.wait_for_url(re.compile(r".*/orders/view/.*"))
            expect(page.locator("#order-status")).to_have_attribute("data-status", "paid")
            expect(page.locator("figure.qr svg")).to_be_visible()
            typed = page.locator("#pickup-code").inner_text()
            assert re.fullmatch(r"[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]", typed), typed
            secret = _qr_text(page)
            event_id, order_id = _order_in_secret(secret)
            assert event_id == shop.event_id
            expect(page.locator(".eyebrow")).to_have_text(f"Order #{order_id}")
            _fits(page, "the confirmation")
            page.screenshot(path=str(shots / "chat-pay-6-paid.png"), full_page=True)

            staff = _staff_page(browser, shop)
            assert _scan(staff, shop, typed) == "ok"
            expect(staff.locator("#result")).to_contain_text(f"Order #{order_id} · 1 x Linen tote")
            _fits(staff, "the pickup scanner")
            staff.screenshot(path=str(shots / "chat-pay-7-handed-out.png"), full_page=True)
            # The QR read back from the page is the same order: already handed out.
            assert _scan(staff, shop, secret) == "already_picked_up"
            staff.screenshot(path=str(shots / "chat-pay-8-again.png"), full_page=True)

            page.reload()
            expect(page.locator("#order-status")).to_have_attribute("data-status", "picked_up")
        finally:
            browser.close()

    order = shop.get(f"/api/v1/orders/{order_id}")
    assert order["source"] == "chat" and order["contact_ref"].startswith("chat:"), order
    assert order["status"] == "picked_up" and order["payment_method"] == "stripe", order
    assert order["codes"] == ["10% off at the pop-up"]  # the code's label; codes stay secret
    assert (order["subtotal_minor"], order["discount_minor"], order["total_minor"]) == (
        PRICE_MINOR, PRICE_MINOR // 10, PRICE_MINOR - PRICE_MINOR // 10,
    )  # fmt: skip
    assert order["short_code"] == typed
    assert [p["status"] for p in order["payments"]] == ["succeeded"], order["payments"]
    redeemed = [r for r in shop.get("/api/v1/redemptions") if r["order_ref"] == f"order:{order_id}"]
    assert len(redeemed) == 1 and redeemed[0]["rolled_back_at"] is None, redeemed
    assert redeemed[0]["voucher_id"] == voucher_id  # the code the chat said, now spent
    spent = _validate(shop, code)
    assert spent.status_code == 409 and spent.json()["reason"] == "exhausted", spent.text
    after = shop.stock()
    assert after["sold"] == before["sold"] + 1, (before, after)
    assert after["held"] == before["held"] and after["available"] == before["available"] - 1

    # The visit ticket the chat sent with the link still counts the visit at the door.
    door = httpx.post(
        f"{shop.server.base_url}/api/v1/checkins",
        json={"secret": ticket, "nonce": secrets.token_hex(12)},
        headers=shop.headers,
        timeout=10,
    )
    assert door.status_code == 200 and door.json()["result"] == "ok", door.text
    assert door.json()["subject_kind"] == "hold", door.text


def test_chat_reserve_pay_at_pickup_without_javascript(shop: Shop, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    before = shop.stock()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            # The widget needs script; the checkout link it hands out must not.
            chat = browser.new_context(viewport=PHONE, is_mobile=True).new_page()
            _code, href, _ticket = _chat_to_checkout_link(chat, shop, shots, "chat-pickup")
            customer = browser.new_context(
                viewport=PHONE, is_mobile=True, java_script_enabled=False
            ).new_page()
            customer.goto(href)
            expect(customer.locator(".countdown-value")).to_have_text(
                re.compile(r"^until \d\d:\d\d \w+$")
            )
            customer.get_by_role("button", name="Pay at pickup").click()
            customer.wait_for_url(re.compile(r".*/orders/view/.*"))
            expect(customer.locator("#order-status")).to_have_text("Reserved · pay at pickup")
            expect(customer.locator(".instructions")).to_contain_text("24.00 EUR")
            expect(customer.locator("figure.qr svg")).to_be_visible()
            typed = customer.locator("#pickup-code").inner_text()
            _, order_id = _order_in_secret(_qr_text(customer))
            customer.screenshot(path=str(shots / "chat-pickup-3-reserved.png"), full_page=True)

            staff = _staff_page(browser, shop)
            assert _scan(staff, shop, typed) == "not_paid"
            expect(staff.locator("#result")).to_contain_text("24.00")
            staff.screenshot(path=str(shots / "chat-pickup-4-not-paid.png"), full_page=True)
            # As staff find it: the scanner's lane link → the lane's queue → the order.
            staff.get_by_role("link", name="Front desk").click()
            row = staff.locator(f"tr[data-order='{order_id}']")
            expect(row).to_contain_text("collect 24.00 EUR")
            _fits(staff, "the lane view")
            staff.screenshot(path=str(shots / "chat-pickup-5-lane.png"), full_page=True)
            row.get_by_role("link", name=f"#{order_id}").click()
            staff.get_by_role("button", name="Mark paid · cash").click()
            expect(staff.locator("#notice")).to_have_text("Marked paid.")
            _fits(staff, "the order page")
            staff.screenshot(path=str(shots / "chat-pickup-6-marked-paid.png"), full_page=True)
            assert _scan(staff, shop, typed) == "ok"
            expect(staff.locator("#result")).to_contain_text("Hand it over")
        finally:
            browser.close()

    order = shop.get(f"/api/v1/orders/{order_id}")
    assert order["source"] == "chat" and order["status"] == "picked_up", order
    assert order["payment_method"] == "pay_at_pickup" and order["total_minor"] == PRICE_MINOR
    after = shop.stock()
    assert after["sold"] == before["sold"] + 1 and after["held"] == before["held"], (
        before,
        after,
    )
