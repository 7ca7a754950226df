"""A door volunteer on a phone (390x844) logs in and reaches the scanner in one click,
against a real `popdrop serve` in Debian's chromium."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from popdrop.accounts import service as accounts
from popdrop.accounts.models import User
from popdrop.core.db import Database
from popdrop.events.models import Event, StaffAssignment
from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS, log_in, run_cli
from tests.server import Server, running_server

EMAIL = "shift@browser.test"
PASSWORD = "browser test password"

pytestmark = MARKS


@dataclass
class Seeded:
    server: Server
    event_id: int


async def _seed(url: str) -> int:
    db = Database(url, pool_size=1, max_overflow=0)
    now = datetime.now(UTC)
    try:
        async with db.transaction() as session:
            org = await accounts.get_organization_by_slug(session, "gate")
            event = Event(
                org_id=org.id, slug="flea-market", title="Flea market at the depot",
                description="", venue_name="Old tram depot", venue_address="",
                timezone="Europe/Berlin", starts_at=now + timedelta(hours=1),
                ends_at=now + timedelta(hours=5), status="live", hold_ttl_seconds=900,
                max_hold_renewals=2, created_at=now,
            )  # fmt: skip
            session.add(event)
            await session.flush()
            user = (await session.scalars(select(User).where(User.email == EMAIL))).one()
            session.add(
                StaffAssignment(org_id=org.id, event_id=event.id, user_id=user.id, gate="east")
            )
            return event.id
    finally:
        await db.dispose()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    with running_server(tmp_path_factory.mktemp("home-browser")) as server:
        run_cli(
            server,
            ("org", "create", "gate", "Gate Org"),
            ("user", "create", "--org", "gate", "--email", EMAIL, "--role", "volunteer",
             "--password", PASSWORD),
        )  # fmt: skip
        yield Seeded(server, asyncio.run(_seed(server.env["POPDROP_DATABASE_URL"])))


def test_volunteer_logs_in_and_reaches_the_scanner_in_one_click(
    seeded: Seeded, shots: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = seeded.server.base_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            page.goto(f"{base}/login")
            log_in(page, EMAIL, PASSWORD)
            expect(page).to_have_url(re.compile(r"/home$"))
            expect(page.get_by_role("heading", name="Flea market at the depot")).to_be_visible()
            expect(page.get_by_text("east")).to_be_visible()
            # Nothing sticks out sideways on a phone.
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the home page is {width}px wide on a 390px phone"
            page.screenshot(path=shots / "home-01-volunteer.png", full_page=True)

            scanner = page.get_by_role("link", name="Scanner")
            expect(scanner).to_be_visible()
            scanner.click()
            expect(page).to_have_url(re.compile(rf"/scan/{seeded.event_id}\?gate=east$"))
            expect(page.locator("#gate-input")).to_have_value("east")  # scans count at east
            expect(page.get_by_role("heading", name="Flea market at the depot")).to_be_visible()
            page.screenshot(path=shots / "home-02-scanner.png", full_page=True)
        finally:
            browser.close()
