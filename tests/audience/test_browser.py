"""The segment editor in a real browser (Playwright on Debian's chromium) against a real
`popdrop serve` seeded by `popdrop demo` (1,000 contacts): change a rule, and the live
count follows without a reload, agreeing with the API.

Screenshots land in $POPDROP_SCREENSHOTS when set (to look at them), else in tmp_path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS
from tests.server import Server, running_server

pytestmark = MARKS
DEMO_EMAIL = "owner@demo.popdrop.test"


@dataclass
class Demo:
    server: Server
    password: str
    token: str

    def preview(self, rules: dict[str, object]) -> int:
        response = httpx.post(
            f"{self.server.base_url}/api/v1/segments/preview",
            json=rules,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        total: int = response.json()["total"]
        return total


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    with running_server(tmp_path_factory.mktemp("audience-browser")) as server:
        done = server.cli("demo", "--no-serve")
        assert done.returncode == 0, done.stderr
        password = re.search(r"password\s+(\S+)", done.stdout)
        token = re.search(r"Bearer\s+(\S+)", done.stdout)
        assert password and token, done.stdout
        yield Demo(server, password.group(1), token.group(1))


def test_segment_editor_live_count(demo: Demo, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = demo.server.base_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{base}/audience/segments")
            expect(page).to_have_url(re.compile(r"/login\?next=/audience/segments$"))
            page.get_by_label("Email").fill(DEMO_EMAIL)
            page.get_by_label("Password").fill(demo.password)
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("heading", name="Segments", exact=True)).to_be_visible()

            page.get_by_role("link", name="VIP — hot and warm").click()
            expect(page.get_by_role("heading", name="VIP — hot and warm")).to_be_visible()
            total = page.locator("#segment-total")
            vip_rules = {"channels": ["email", "sms"], "tags_any": ["vip"]}
            before = demo.preview({**vip_rules, "recency": ["hot", "warm"]})
            expect(total).to_have_attribute("data-total", str(before))

            # Tick "Cold": the count grows to what the API says, no reload, no submit.
            url = page.url
            page.get_by_role("checkbox", name=re.compile(r"^Cold")).check()
            after = demo.preview({**vip_rules, "recency": ["hot", "warm", "cold"]})
            assert after > before
            expect(total).to_have_attribute("data-total", str(after))
            expect(page.locator('[data-testid="bucket-cold"]')).not_to_have_attribute(
                "data-count", "0"
            )
            assert page.url == url
            page.screenshot(path=shots / "audience-01-segment-editor.png", full_page=True)

            # Typing a tag narrows it down (debounced input).
            page.get_by_label("None of the tags").fill("press")
            narrowed = demo.preview(
                {**vip_rules, "recency": ["hot", "warm", "cold"], "tags_none": ["press"]}
            )
            expect(total).to_have_attribute("data-total", str(narrowed))

            page.get_by_role("link", name="Audience", exact=True).click()
            expect(page.locator("#audience-total")).to_contain_text("1,000")
            page.screenshot(path=shots / "audience-02-overview.png")

            # One contact: what we store, with the erase confirmation step.
            page.locator("table.contacts a").first.click()
            expect(page.get_by_role("heading", name="Consent ledger")).to_be_visible()
            page.get_by_role("link", name="Erase this person…").click()
            expect(page.get_by_role("button", name="Erase permanently")).to_be_visible()
            page.screenshot(path=shots / "audience-03-contact.png", full_page=True)
        finally:
            browser.close()
