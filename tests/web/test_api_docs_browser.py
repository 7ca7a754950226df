"""`/api/docs` in Debian's chromium with every request that is not for the server
aborted: Swagger UI comes from the vendored files, so the operations and the Authorize
button (the bearer scheme) show up offline, without a CSP violation."""

from __future__ import annotations

from pathlib import Path

from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS
from tests.server import running_server

pytestmark = MARKS


def test_swagger_ui_renders_offline_with_an_authorize_button(tmp_path: Path, shots: Path) -> None:
    from playwright.sync_api import Route, expect, sync_playwright

    blocked: list[str] = []
    violations: list[str] = []

    def only_the_server(route: Route) -> None:
        if route.request.url.startswith(server.base_url + "/"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with running_server(tmp_path) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", only_the_server)
            page.on(
                "console",
                lambda m: violations.append(m.text) if "Content Security" in m.text else None,
            )
            page.goto(f"{server.base_url}/api/docs")
            # Every resource has its section (opened on demand), the vouchers one lists redeem.
            vouchers = page.locator(".opblock-tag", has_text="vouchers").first
            expect(vouchers).to_be_visible(timeout=20_000)
            assert page.locator(".opblock-tag").count() >= 15
            vouchers.click()
            redeem = page.locator(".opblock-summary-path", has_text="/api/v1/vouchers/redeem")
            expect(redeem.first).to_be_visible()
            expect(page.get_by_role("button", name="Authorize")).to_be_visible()
            assert page.locator(".opblock").count() > 10
            page.screenshot(path=str(shots / "api-docs.png"))
        finally:
            browser.close()
    assert blocked == [], blocked
    assert violations == [], violations
