"""Short links in a real browser at 390 px: a `popdrop serve` process driven by Playwright
on Debian's chromium. The host opens /links, creates a link to the event page through the
form, lands on the link's page, its QR image loads (and decodes to the short URL's page),
and neither these pages nor the POS page scroll sideways on a phone.

Screenshots land in $POPDROP_SCREENSHOTS when set, else in tmp_path.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS, log_in, run_cli
from tests.server import running_server

pytestmark = MARKS
EMAIL, PASSWORD = "host@links.test", "links browser password"
PHONE = {"width": 390, "height": 844}


def test_host_creates_a_short_link_on_a_phone_and_its_qr_loads(tmp_path: Path, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with running_server(tmp_path) as server:
        run_cli(
            server,
            ("org", "create", "shop", "Shop"),
            ("user", "create", "--org", "shop", "--email", EMAIL, "--role", "owner",
             "--password", PASSWORD),
        )  # fmt: skip
        made = server.cli("token", "create", "--org", "shop", "--name", "seed", "--role", "owner")
        assert made.returncode == 0, made.stderr
        headers = {"Authorization": f"Bearer {made.stdout.strip().split()[-1]}"}
        now = datetime.now(UTC)
        event = httpx.post(
            f"{server.base_url}/api/v1/events",
            json={
                "slug": "market", "title": "Night market", "timezone": "Europe/Berlin",
                "starts_at": (now + timedelta(days=1)).isoformat(),
                "ends_at": (now + timedelta(days=1, hours=4)).isoformat(),
            },
            headers=headers,
        )  # fmt: skip
        assert event.status_code == 201, event.text
        published = httpx.post(
            f"{server.base_url}/api/v1/events/{event.json()['id']}/status",
            json={"status": "published"},
            headers=headers,
        )
        assert published.status_code == 200, published.text

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=PHONE, is_mobile=True)
                page.goto(f"{server.base_url}/links")
                log_in(page, EMAIL, PASSWORD)
                page.goto(f"{server.base_url}/links")
                expect(page.locator("#no-links")).to_be_visible()
                form = page.locator("#new-link")
                form.locator('select[name="target_kind"]').select_option("event")
                form.locator('select[name="event_id"]').select_option(label="Night market")
                form.locator('select[name="channel"]').select_option("poster")
                form.get_by_label("UTM campaign").fill("night-market")
                wide = page.evaluate("document.documentElement.scrollWidth")
                assert wide <= PHONE["width"], f"/links is {wide}px wide on a phone"
                page.screenshot(path=str(shots / "links-form.png"), full_page=True)
                form.get_by_role("button", name="Create link").click()

                expect(page).to_have_url(re.compile(r"/links/\d+\?created=1$"))
                expect(page.locator("#notice")).to_be_visible()
                short_url = page.locator("#short-url").inner_text().strip()
                assert re.fullmatch(rf"{re.escape(server.base_url)}/s/[\w-]{{11}}", short_url)
                qr = page.locator("img#qr")
                expect(qr).to_be_visible()
                # The image really loaded (a broken image has no natural size).
                page.wait_for_function(
                    "() => { const i = document.getElementById('qr');"
                    " return i.complete && i.naturalWidth > 0; }"
                )
                wide = page.evaluate("document.documentElement.scrollWidth")
                assert wide <= PHONE["width"], f"the link page is {wide}px wide on a phone"
                page.screenshot(path=str(shots / "link-page.png"), full_page=True)

                # The short URL leads to the event page with the campaign kept.
                page.goto(short_url)
                expect(page).to_have_url(re.compile(r"utm_campaign=night-market"))
                expect(page.get_by_text("Night market").first).to_be_visible()
                page.go_back()
                page.goto(f"{server.base_url}/links")
                expect(page.locator("table.links tbody tr")).to_have_count(1)
                # The POS page, from the nav, fits the phone too.
                page.get_by_role("navigation").get_by_role("link", name="POS").click()
                expect(page.locator("#new-connection")).to_be_visible()
                wide = page.evaluate("document.documentElement.scrollWidth")
                assert wide <= PHONE["width"], f"/partners/sales is {wide}px wide on a phone"
                page.screenshot(path=str(shots / "pos-page.png"), full_page=True)
            finally:
                browser.close()
