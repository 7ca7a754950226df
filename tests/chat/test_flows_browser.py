"""A host on a phone (390x844) publishes a chat flow from the flow page: reached from the
chat console, a refused file shows its error beside the line, then a valid one becomes
version 1 — against a real `popdrop serve` in Debian's chromium."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from popdrop.chat.flow import shipped_source
from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS
from tests.server import Server, running_server

EMAIL = "flows@browser.test"
PASSWORD = "browser test password"
BROKEN = "start: greet\nnodes:\n  greet:\n    type: message\n    say: Hi!\n    next: menuu\n"

pytestmark = MARKS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("flows-browser")) as srv:
        for args in (
            ("org", "create", "stall", "Stall Org"),
            ("user", "create", "--org", "stall", "--email", EMAIL, "--role", "host",
             "--password", PASSWORD),
        ):  # fmt: skip
            done = srv.cli(*args)
            assert done.returncode == 0, f"popdrop {' '.join(args)}: {done.stderr}"
        yield srv


def _fits(page: object, what: str) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")  # type: ignore[attr-defined]
    assert width <= 390, f"{what} is {width}px wide on a 390px phone"


def test_a_host_publishes_a_flow_from_a_phone(server: Server, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = server.base_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            page.goto(f"{base}/login")
            page.get_by_label("Email").fill(EMAIL)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            expect(page).not_to_have_url(re.compile(r"/login"))
            page.goto(f"{base}/chat/console")
            page.get_by_role("link", name="Chat flow").click()
            expect(page).to_have_url(re.compile(r"/chat/flows$"))
            expect(page.get_by_role("heading", name="Chat flow", exact=True)).to_be_visible()
            expect(page.get_by_test_id("flow-current")).to_contain_text("shipped flow")
            _fits(page, "the flow page")

            page.get_by_label("Flow (YAML)").fill(BROKEN)
            page.get_by_role("button", name="Publish").click()
            expect(page.get_by_test_id("flow-errors")).to_contain_text("line 6")
            wrong = page.locator("li.invalid[data-line='6']")
            expect(wrong).to_contain_text("next: menuu")
            expect(wrong).to_contain_text("unknown node 'menuu'")
            expect(page.get_by_label("Flow (YAML)")).to_have_value(BROKEN)  # kept, to fix
            _fits(page, "the refused flow")
            page.screenshot(path=shots / "flows-01-refused.png", full_page=True)

            page.get_by_label("Flow (YAML)").fill(shipped_source("popup_drop"))
            page.get_by_role("button", name="Check").click()
            expect(page.get_by_test_id("flow-checked")).to_contain_text("is valid")
            page.get_by_role("button", name="Publish").click()
            expect(page).to_have_url(re.compile(r"/chat/flows\?published=1$"))
            expect(page.get_by_text("Version 1 published.")).to_be_visible()
            expect(page.locator("[data-testid=flow-version][data-version='1']")).to_be_visible()
            _fits(page, "the flow page after publishing")
            page.screenshot(path=shots / "flows-02-published.png", full_page=True)
        finally:
            browser.close()
