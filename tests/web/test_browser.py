"""End to end in a real browser: a `popdrop serve` process seeded with the CLI, driven by
Playwright on Debian's chromium (never a downloaded browser).

Screenshots land in $POPDROP_SCREENSHOTS when set (to look at them), else in tmp_path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS
from tests.server import Server, running_server

EMAIL = "host@browser.test"
PASSWORD = "browser test password"

pytestmark = MARKS


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("browser")) as server:
        for args in (
            ("org", "create", "shop", "Corner Shop"),
            ("user", "create", "--org", "shop", "--email", EMAIL, "--role", "host",
             "--password", PASSWORD),
        ):  # fmt: skip
            done = server.cli(*args)
            assert done.returncode == 0, f"popdrop {' '.join(args)}: {done.stderr}"
        yield server


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_issue_codes_and_claim_in_a_browser(served: Server, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{served.base_url}/vouchers")
            expect(page).to_have_url(re.compile(r"/login\?next=/vouchers$"))
            page.screenshot(path=shots / "01-login.png")
            page.get_by_label("Email").fill(EMAIL)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            expect(page).to_have_url(re.compile(r"/vouchers$"))
            expect(page.get_by_role("heading", name="Voucher vault")).to_be_visible()

            # Issue five codes, each with a claim link.
            page.get_by_role("link", name="Issue a batch").click()
            page.locator("input[name=name]").fill("Saturday drop: 15% off")
            page.locator("input[name=quantity]").fill("5")
            page.locator("input[name=prefix]").fill("SAT")
            page.locator("input[name=tag]").fill("weekend")
            page.locator("select[name=discount_kind]").select_option("percent")
            page.locator("input[name=discount_value]").fill("15")
            page.locator("input[name=discount_description]").fill("15% off anything today")
            page.locator("input[name=links]").check()
            page.screenshot(path=shots / "02-issue-form.png", full_page=True)
            page.get_by_role("button", name="Issue codes").click()
            expect(page.get_by_role("heading", name="5 codes issued")).to_be_visible()
            codes = page.locator("td.code")
            expect(codes).to_have_count(5)
            first_code = codes.first.inner_text().strip()
            assert re.fullmatch(r"SAT(-[0-9A-Z]{4}){3}-[0-9A-Z]", first_code)
            download = page.get_by_role("link", name=re.compile("Download CSV"))
            expect(download).to_have_attribute("href", re.compile(r"^data:text/csv;base64,"))
            page.screenshot(path=shots / "03-issued.png", full_page=True)
            claim_url = page.locator("a.claim-link").first.get_attribute("href")
            assert claim_url and claim_url.startswith(f"{served.base_url}/v/")

            # The batch page no longer shows any code.
            page.get_by_role("link", name="Batch details").click()
            expect(page.get_by_role("heading", name=re.compile("Saturday drop"))).to_be_visible()
            assert first_code not in page.content()
            page.screenshot(path=shots / "04-batch.png", full_page=True)

            # htmx search on the list page swaps in the code's state.
            page.get_by_role("link", name="Vouchers", exact=True).click()
            page.get_by_label("Voucher code").fill(first_code)
            page.get_by_role("button", name="Search").click()
            expect(page.locator("#search-result .badge")).to_have_text("valid")
            page.screenshot(path=shots / "05-list-search.png", full_page=True)

            # htmx audit verification.
            page.get_by_role("link", name="Audit").click()
            page.get_by_role("button", name="Verify the hash chains").click()
            expect(page.locator("#verify-result .alert.good")).to_contain_text("OK")
            page.screenshot(path=shots / "06-audit.png", full_page=True)

            # The customer's claim page, on a phone-sized screen.
            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.goto(claim_url)
            expect(phone.locator(".qr svg")).to_be_visible()
            expect(phone.locator(".claim-code")).to_have_text(first_code)
            expect(phone.get_by_role("heading", name="15% off anything today")).to_be_visible()
            phone.screenshot(path=shots / "07-claim-phone.png", full_page=True)
            tampered = phone.goto(claim_url[:-2] + ("xx" if not claim_url.endswith("xx") else "yy"))
            assert tampered is not None and tampered.status == 400
            trouble = phone.get_by_role("heading", name="This link doesn't look right")
            expect(trouble).to_be_visible()
            phone.screenshot(path=shots / "08-claim-tampered.png", full_page=True)
        finally:
            browser.close()
