"""The public event page in a real browser (Playwright on Debian's chromium) against a
real `popdrop serve`: live stock over SSE drops after a hold made through the API, and
an RSVP through the page's form, with the waiting list when the slot is full.

Screenshots land in $POPDROP_SCREENSHOTS when set (to look at them), else in tmp_path.
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
from playwright.sync_api import ViewportSize

from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS
from tests.server import Server, running_server

EMAIL = "host@events.test"
PASSWORD = "browser test password"
PHONE: ViewportSize = {"width": 390, "height": 844}
DESKTOP: ViewportSize = {"width": 1280, "height": 900}

pytestmark = MARKS


@dataclass
class Drop:
    server: Server
    event_id: int
    variant_id: int
    lane_id: int
    token: str

    def api(self, method: str, url: str, body: Any) -> dict[str, Any]:
        response = httpx.request(
            method,
            f"{self.server.base_url}{url}",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        assert response.status_code in (200, 201), (url, response.text)
        data: dict[str, Any] = response.json()
        return data


@pytest.fixture(scope="module")
def drop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drop]:
    with running_server(tmp_path_factory.mktemp("event-browser")) as server:
        for args in (
            ("org", "create", "depot", "Tram Depot"),
            ("user", "create", "--org", "depot", "--email", EMAIL, "--role", "host",
             "--password", PASSWORD),
        ):  # fmt: skip
            done = server.cli(*args)
            assert done.returncode == 0, f"popdrop {' '.join(args)}: {done.stderr}"
        created = server.cli(
            "token", "create", "--org", "depot", "--name", "browser",
            "--scope", "vouchers:write", "--scope", "vouchers:read",
            "--scope", "inventory:write", "--scope", "holds:write",
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        seed = Drop(server, 0, 0, 0, created.stdout.strip())
        now = datetime.now(UTC)
        event = seed.api(
            "POST",
            "/api/v1/events",
            {
                "slug": "spring-drop",
                "title": "Spring drop at the Tram Depot",
                "description": "Twenty linen tees, one afternoon. First come, first served.",
                "venue_name": "Old Tram Depot",
                "venue_address": "Gleisstraße 4, Berlin",
                "timezone": "Europe/Berlin",
                "starts_at": (now + timedelta(days=2)).isoformat(),
                "ends_at": (now + timedelta(days=2, hours=5)).isoformat(),
                # Open already: holds and RSVPs are refused before opens_at.
                "opens_at": (now - timedelta(minutes=5)).isoformat(),
            },
        )
        eid = event["id"]
        seed.api("POST", f"/api/v1/events/{eid}/status", {"status": "published"})
        for label, hours, capacity in (("Early", 0, 1), ("Afternoon", 2, 30)):
            seed.api(
                "POST",
                f"/api/v1/events/{eid}/slots",
                {
                    "label": label,
                    "starts_at": (now + timedelta(days=2, hours=hours)).isoformat(),
                    "ends_at": (now + timedelta(days=2, hours=hours + 2)).isoformat(),
                    "capacity": capacity,
                },
            )
        front = seed.api("POST", f"/api/v1/events/{eid}/lanes", {"name": "Front desk"})
        back = seed.api("POST", f"/api/v1/events/{eid}/lanes", {"name": "Back yard"})
        tee = seed.api(
            "POST",
            f"/api/v1/events/{eid}/products",
            {
                "title": "Linen tee",
                "highlights": "Organic linen\nCut and sewn in Lisbon",
                "price_minor": 2450,
                "variants": ["S", "M"],
            },
        )
        tote = seed.api(
            "POST",
            f"/api/v1/events/{eid}/products",
            {"title": "Tote bag", "price_minor": 900, "variants": ["one size"]},
        )
        small, medium = (v["id"] for v in tee["variants"])
        for variant, lane, total in (
            (small, front["id"], 4),
            (medium, front["id"], 2),
            (small, back["id"], 3),
            (tote["variants"][0]["id"], front["id"], 0),
        ):
            seed.api(
                "PUT", "/api/v1/stock", {"variant_id": variant, "lane_id": lane, "total": total}
            )
        yield Drop(server, eid, small, front["id"], seed.token)


def test_live_stock_drops_after_a_hold(drop: Drop, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=PHONE, is_mobile=True)
            page.goto(f"{drop.server.base_url}/e/{drop.event_id}")
            expect(
                page.get_by_role("heading", name="Spring drop at the Tram Depot")
            ).to_be_visible()
            expect(page.locator(".product-price").first).to_have_text("24.50 EUR")
            count = page.locator(
                f'.stock-count[data-variant="{drop.variant_id}"][data-lane="{drop.lane_id}"]'
            )
            expect(count).to_have_text("4 left")
            shown = int(count.get_attribute("data-available") or "-1")
            assert shown == 4
            expect(page.locator(".stock-count.sold-out")).to_have_text("Sold out")
            # The countdown to the start ticks (JS), in the d hh:mm:ss form.
            expect(page.locator(".countdown-value")).to_have_text(
                re.compile(r"^(\d+d )?\d\d:\d\d:\d\d$")
            )
            page.screenshot(path=shots / "event-01-public-phone.png", full_page=True)

            drop.api(
                "POST",
                "/api/v1/holds",
                {"variant_id": drop.variant_id, "lane_id": drop.lane_id, "qty": 3},
            )
            expect(count).to_have_text("1 left", timeout=10_000)
            expect(count).to_have_attribute("data-available", "1")
            drop.api(
                "POST",
                "/api/v1/holds",
                {"variant_id": drop.variant_id, "lane_id": drop.lane_id, "qty": 1},
            )
            expect(count).to_have_text("Sold out", timeout=10_000)
            expect(count).to_have_class(re.compile("sold-out"))
            page.screenshot(path=shots / "event-02-after-holds-phone.png", full_page=True)

            wide = browser.new_page(viewport=DESKTOP)
            wide.goto(f"{drop.server.base_url}/e/{drop.event_id}")
            expect(wide.locator(".product-card")).to_have_count(2)
            wide.screenshot(path=shots / "event-03-public-desktop.png", full_page=True)
        finally:
            browser.close()


def test_rsvp_through_the_page_form(drop: Drop, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=PHONE, is_mobile=True)
            url = f"{drop.server.base_url}/e/{drop.event_id}"
            page.goto(url)
            page.locator(".slot-option", has_text="Early").locator("input").check()
            page.get_by_role("textbox", name="Email").fill("ada@example.com")
            page.get_by_role("button", name="RSVP").click()
            expect(page.locator("#rsvp-result .alert.bad")).to_contain_text("consent")
            page.locator("input[name=consent]").check()
            page.get_by_role("button", name="RSVP").click()
            expect(page.locator("#rsvp-result .alert.good")).to_contain_text("You're in!")
            expect(page.locator("#rsvp-result")).to_contain_text("ada@example.com")
            expect(page.locator(".slot-left").first).to_have_text("Full · waiting list")
            page.screenshot(path=shots / "event-04-rsvp-confirmed-phone.png", full_page=True)

            # The Early slot had one place: the next guest is offered the waiting list.
            page.goto(url)
            expect(page.locator(".slot-left").first).to_have_text("Full · waiting list")
            page.locator(".slot-option", has_text="Early").locator("input").check()
            page.get_by_label("or phone").fill("+33612345678")
            page.locator("input[name=consent]").check()
            page.get_by_role("button", name="RSVP").click()
            expect(page.locator("#rsvp-result .alert.warn")).to_contain_text(
                "join the waiting list?"
            )
            page.screenshot(path=shots / "event-05-slot-full-phone.png", full_page=True)
            page.get_by_role("button", name="Join the waiting list").click()
            expect(page.locator("#rsvp-result .alert.good")).to_contain_text("waiting list")

            # A bad email: the API's message, next to the form.
            page.goto(url)
            page.get_by_role("textbox", name="Email").fill("not-an-email")
            page.locator("input[name=consent]").check()
            page.get_by_role("button", name="RSVP").click()
            expect(page.locator("#rsvp-result .alert.bad")).to_contain_text("email")
        finally:
            browser.close()


def test_operator_event_page(drop: Drop, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=DESKTOP)
            page.goto(f"{drop.server.base_url}/events")
            page.get_by_role("textbox", name="Email").fill(EMAIL)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("heading", name="Events", exact=True)).to_be_visible()
            page.screenshot(path=shots / "event-06-operator-list.png", full_page=True)
            page.get_by_role("link", name="Spring drop at the Tram Depot").click()
            expect(page.get_by_role("heading", name="Stock and live availability")).to_be_visible()
            page.screenshot(path=shots / "event-07-operator-detail.png", full_page=True)
            signed_in = page.context.storage_state()
            phone = browser.new_context(
                viewport=PHONE, is_mobile=True, storage_state=signed_in
            ).new_page()
            phone.goto(page.url)
            phone.screenshot(path=shots / "event-08-operator-detail-phone.png")
            phone.locator("#stock").screenshot(path=shots / "event-09-operator-stock-phone.png")
            phone.locator("#slots").screenshot(path=shots / "event-10-operator-slots-phone.png")
        finally:
            browser.close()
