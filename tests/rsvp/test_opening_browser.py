"""The public event page before its opening, in a real browser (Playwright on Debian's
chromium) against a real `popdrop serve`: the countdown counts to opens_at, the RSVP form
is not there yet; when the countdown ends the form appears without a reload, the
countdown counts on to the start, and an RSVP goes through.

Screenshots land in $POPDROP_SCREENSHOTS when set (to look at them), else in tmp_path.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS
from tests.server import Server, running_server

pytestmark = MARKS
OPENS_IN = timedelta(seconds=6)


def _api(server: Server, token: str, url: str, body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{server.base_url}{url}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code in (200, 201), (url, response.text)
    data: dict[str, Any] = response.json()
    return data


def test_the_rsvp_form_opens_when_the_countdown_ends(
    tmp_path_factory: pytest.TempPathFactory, shots: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with running_server(tmp_path_factory.mktemp("opening")) as server:
        assert server.cli("org", "create", "depot", "Tram Depot").returncode == 0
        created = server.cli(
            "token", "create", "--org", "depot", "--name", "browser",
            "--scope", "events:write", "--scope", "events:read",
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
                now = datetime.now(UTC)
                event = _api(
                    server,
                    token,
                    "/api/v1/events",
                    {
                        "slug": "opening-soon",
                        "title": "Opening soon",
                        "timezone": "Europe/Berlin",
                        "starts_at": (now + timedelta(days=1)).isoformat(),
                        "ends_at": (now + timedelta(days=1, hours=4)).isoformat(),
                        "opens_at": (now + OPENS_IN).isoformat(),
                    },
                )
                eid = event["id"]
                _api(server, token, f"/api/v1/events/{eid}/status", {"status": "published"})
                _api(
                    server,
                    token,
                    f"/api/v1/events/{eid}/slots",
                    {
                        "label": "Morning",
                        "starts_at": (now + timedelta(days=1)).isoformat(),
                        "ends_at": (now + timedelta(days=1, hours=2)).isoformat(),
                        "capacity": 10,
                    },
                )
                page.goto(f"{server.base_url}/e/{eid}")
                form = page.locator("#rsvp-form")
                expect(page.locator(".countdown-label")).to_have_text("Opens in")
                expect(page.locator("#rsvp-opens")).to_contain_text("RSVPs open")
                expect(form).to_be_hidden()
                page.screenshot(path=shots / "opening-01-before.png", full_page=True)

                # No reload: the page opens the form itself when the countdown ends.
                expect(form).to_be_visible(timeout=15_000)
                expect(page.locator("#rsvp-opens")).to_have_count(0)
                expect(page.locator(".countdown-label")).to_have_text("Starts in")
                expect(page.locator(".countdown-value")).to_have_text(
                    re.compile(r"^(1d 00:00:00|23:59:\d\d)$")
                )
                page.get_by_role("textbox", name="Email").fill("first@example.com")
                page.locator("input[name=consent]").check()
                page.get_by_role("button", name="RSVP").click()
                expect(page.locator("#rsvp-result .alert.good")).to_contain_text("You're in!")
                page.screenshot(path=shots / "opening-02-booked.png", full_page=True)
            finally:
                browser.close()
