"""The Content-Security-Policy in a real browser: `popdrop demo --no-serve` seeds the demo
org, a `popdrop serve` process serves it, and Debian's chromium opens the operator and
public pages while listening for CSP violations. A policy that blocks something a page
needs (a script, a stream, a style) would show up here, not only as a broken feature."""

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

# Records every violation the document reports, before any page script runs.
LISTEN = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.__csp.push(e.violatedDirective + " " + (e.blockedURI || "inline"));
});
"""


@dataclass
class Demo:
    server: Server
    email: str
    password: str
    event_id: int


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    with running_server(tmp_path_factory.mktemp("csp-browser")) as server:
        done = server.cli("demo", "--no-serve")
        assert done.returncode == 0, done.stderr
        token = re.search(r"Authorization: Bearer (\S+)", done.stdout)
        login = re.search(r"Login\s+(\S+)\s+password\s+(\S+)", done.stdout)
        assert token and login, done.stdout
        events = httpx.get(
            f"{server.base_url}/api/v1/events",
            headers={"Authorization": f"Bearer {token.group(1)}"},
            timeout=10,
        )
        assert events.status_code == 200, events.text
        yield Demo(server, login.group(1), login.group(2), int(events.json()[0]["id"]))


def test_pages_run_under_the_policy_without_violations(demo: Demo, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = demo.server.base_url
    eid = demo.event_id
    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.add_init_script(LISTEN)
            page.on(
                "console",
                lambda m: console.append(m.text) if "Content Security Policy" in m.text else None,
            )
            page.goto(f"{base}/login")
            page.get_by_label("Email").fill(demo.email)
            page.get_by_label("Password").fill(demo.password)
            page.get_by_role("button", name="Log in").click()
            expect(page).not_to_have_url(re.compile(r"/login"))

            visited: dict[str, list[str]] = {}
            for path in (
                "/vouchers",
                "/events",
                f"/events/{eid}",
                f"/scan/{eid}",
                "/audience",
                "/drops",
                "/chat/console",
                "/mailbox",
                "/audit",
                f"/e/{eid}",
                "/chat/demo",
            ):
                page.goto(f"{base}{path}", wait_until="load")
                # Streams never go idle: give deferred scripts, htmx and streams a moment.
                page.wait_for_timeout(500)
                visited[path] = page.evaluate("window.__csp")
            # The page scripts did run: the scanner wired its form, the chat connected.
            page.goto(f"{base}/chat/demo")
            expect(page.locator(".pd-chat")).to_have_attribute("data-state", "ready")
            page.screenshot(path=shots / "csp-chat.png")
        finally:
            browser.close()
    assert all(not found for found in visited.values()), visited
    assert not console, console
