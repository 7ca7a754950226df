"""The insights page in a real browser at 390 px (a `popdrop serve` process, Debian's
chromium): the host follows the event page's link, sees the tiles, the funnel bars and
the breakdown tables, and the page does not scroll sideways. A screenshot is saved.

Screenshots land in $POPDROP_SCREENSHOTS when set, else in tmp_path.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from popdrop.core.db import Database
from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS, log_in, run_cli
from tests.metrics.simulation import Ids, seed
from tests.server import running_server

pytestmark = MARKS
EMAIL, PASSWORD = "host@insights.test", "insights browser password"
PHONE = {"width": 390, "height": 844}


async def _seed(url: str, ids: Ids) -> None:
    db = Database(url)
    try:
        async with db.transaction() as session:
            await seed(session, 1, ids, None)  # the first organization of a fresh database
    finally:
        await db.dispose()


def test_host_reads_insights_on_a_phone(tmp_path: Path, shots: Path) -> None:
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
        event_id = event.json()["id"]
        ids = Ids(event_id, event_id + 1, 7, 8, 9, 10)
        asyncio.run(_seed(server.env["POPDROP_DATABASE_URL"], ids))

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=PHONE, is_mobile=True)
                page.goto(f"{server.base_url}/events/{event_id}")
                log_in(page, EMAIL, PASSWORD)
                page.goto(f"{server.base_url}/events/{event_id}")
                page.locator("#insights-link").click()
                expect(page.locator("h1")).to_contain_text("Insights · Night market")
                expect(page.locator("#kpi-message_click strong")).to_have_text("50.0 %")
                expect(page.locator("#kpi-nps strong")).to_have_text("+25")
                bars = page.locator("#funnel li")
                expect(bars).to_have_count(5)
                first = page.locator("#funnel li").first.locator(".bar > span")
                last = page.locator("#funnel li").last.locator(".bar > span")
                # Bars are drawn to scale: 4 of 12 persons paid.
                full, paid = first.bounding_box(), last.bounding_box()
                assert full and paid and abs(paid["width"] / full["width"] - 4 / 12) < 0.02
                expect(page.locator("#by-hour tr[data-key='15']")).to_be_visible()
                page.screenshot(path=str(shots / "insights-event.png"), full_page=True)
                wide = page.evaluate("document.documentElement.scrollWidth")
                assert wide <= PHONE["width"], f"the insights page is {wide}px wide on a phone"
            finally:
                browser.close()
