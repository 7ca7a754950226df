"""A host on a phone (390x844) in Debian's chromium against a real `popdrop serve`: from
the event workspace to the guest list, a search, and a slot edit refused below what is
taken."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS, log_in, run_cli
from tests.server import Server, running_server

EMAIL = "host@guests.test"
PASSWORD = "browser test password"

pytestmark = MARKS


@dataclass
class Seeded:
    server: Server
    event_id: int
    slot_id: int


def _api(server: Server, token: str, url: str, body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{server.base_url}{url}", json=body, timeout=10,
        headers={"Authorization": f"Bearer {token}"},
    )  # fmt: skip
    assert response.status_code in (200, 201), (url, response.text)
    data: dict[str, Any] = response.json()
    return data


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    with running_server(tmp_path_factory.mktemp("guests-browser")) as server:
        run_cli(
            server,
            ("org", "create", "market", "Market Org"),
            ("user", "create", "--org", "market", "--email", EMAIL, "--role", "host",
             "--password", PASSWORD),
        )  # fmt: skip
        made = server.cli("token", "create", "--org", "market", "--name", "t", "--role", "host")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip().splitlines()[-1]
        now = datetime.now(UTC)
        event = _api(server, token, "/api/v1/events", {
            "slug": "night-market", "title": "Night market", "timezone": "Europe/Berlin",
            "starts_at": (now + timedelta(days=1)).isoformat(),
            "ends_at": (now + timedelta(days=1, hours=5)).isoformat(),
        })  # fmt: skip
        _api(server, token, f"/api/v1/events/{event['id']}/status", {"status": "published"})
        slot = _api(server, token, f"/api/v1/events/{event['id']}/slots", {
            "label": "Early", "starts_at": (now + timedelta(days=1)).isoformat(),
            "ends_at": (now + timedelta(days=1, hours=1)).isoformat(), "capacity": 10,
        })  # fmt: skip
        for email in ("ada@example.com", "grace@example.com"):
            response = httpx.post(
                f"{server.base_url}/api/v1/public/events/{event['id']}/rsvps",
                json={"slot_id": slot["id"], "email": email, "consent": True,
                      "consent_text": "I agree."},
                timeout=10,
            )  # fmt: skip
            assert response.status_code == 201, response.text
        yield Seeded(server, event["id"], slot["id"])


def test_host_finds_a_guest_and_cannot_cut_below_the_taken_places(
    seeded: Seeded, shots: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = seeded.server.base_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            page.goto(f"{base}/login?next=/events/{seeded.event_id}")
            log_in(page, EMAIL, PASSWORD)
            expect(page).to_have_url(re.compile(rf"/events/{seeded.event_id}$"))

            page.get_by_role("link", name="Guest list").click()
            expect(page).to_have_url(re.compile(rf"/events/{seeded.event_id}/guests$"))
            expect(page.get_by_text("ada@example.com")).to_be_visible()
            page.get_by_label("Search guests").fill("grace")
            page.get_by_role("button", name="Search").click()
            expect(page.get_by_text("grace@example.com")).to_be_visible()
            expect(page.get_by_text("ada@example.com")).to_have_count(0)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the guest list is {width}px wide on a 390px phone"
            page.screenshot(path=shots / "guests-01-search.png", full_page=True)

            page.goto(f"{base}/events/{seeded.event_id}")
            page.get_by_role("link", name="Edit slot Early").click()
            page.get_by_label("Capacity").fill("1")
            page.get_by_role("button", name="Save").click()
            expect(page.get_by_role("alert")).to_contain_text("2 places of this slot are taken")
            page.screenshot(path=shots / "guests-02-refused.png", full_page=True)
            page.get_by_label("Capacity").fill("2")
            page.get_by_role("button", name="Save").click()
            expect(page).to_have_url(re.compile(rf"/events/{seeded.event_id}\?done=edited#slots$"))
            expect(page.get_by_role("status")).to_contain_text("Saved.")
        finally:
            browser.close()
