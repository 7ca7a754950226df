"""The scanner page in a real browser: a `popdrop serve` process seeded with the CLI (org,
volunteer) and the ORM (event, tickets), driven by Playwright on Debian's chromium.

Screenshots land in $POPDROP_SCREENSHOTS when set (to look at them), else in tmp_path.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from popdrop.accounts import service as accounts
from popdrop.accounts.service import ROLES, Principal
from popdrop.checkin import service
from popdrop.checkin.schemas import TicketCreate
from popdrop.core.db import Database
from popdrop.events.models import Event
from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS
from tests.server import Server, running_server

EMAIL = "door@browser.test"
PASSWORD = "browser test password"

pytestmark = MARKS


@dataclass
class Seeded:
    server: Server
    event_id: int
    secrets: list[str]


async def _seed(url: str) -> tuple[int, list[str]]:
    db = Database(url, pool_size=1, max_overflow=0)
    now = datetime.now(UTC)
    try:
        async with db.transaction() as session:
            org = await accounts.get_organization_by_slug(session, "door")
            event = Event(
                org_id=org.id,
                slug="night-market",
                title="Night market",
                description="",
                venue_name="Old tram depot",
                venue_address="",
                timezone="Europe/Berlin",
                starts_at=now - timedelta(minutes=15),
                ends_at=now + timedelta(hours=3),
                status="live",
                hold_ttl_seconds=900,
                max_hold_renewals=2,
                created_at=now,
            )
            session.add(event)
            await session.flush()
            owner = Principal(org.id, "test:seed", "owner", ROLES["owner"])
            secrets: list[str] = []
            for subject in (1, 2, 3):
                spec = TicketCreate(
                    event_id=event.id,
                    subject_kind="rsvp",
                    subject_id=subject,
                    holder_ref=f"guest{subject}@example.test",
                )
                _, secret, _ = await service.issue_ticket(session, owner, spec, now=now)
                secrets.append(secret)
            return event.id, secrets
    finally:
        await db.dispose()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    with running_server(tmp_path_factory.mktemp("checkin-browser")) as server:
        for args in (
            ("org", "create", "door", "Door Org"),
            ("user", "create", "--org", "door", "--email", EMAIL, "--role", "volunteer",
             "--password", PASSWORD),
        ):  # fmt: skip
            done = server.cli(*args)
            assert done.returncode == 0, f"popdrop {' '.join(args)}: {done.stderr}"
        event_id, secrets = asyncio.run(_seed(server.env["POPDROP_DATABASE_URL"]))
        yield Seeded(server, event_id, secrets)


def test_scanner_green_then_red(seeded: Seeded, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = seeded.server.base_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            page.goto(f"{base}/scan/{seeded.event_id}")
            expect(page).to_have_url(re.compile(rf"/login\?next=/scan/{seeded.event_id}$"))
            page.get_by_label("Email").fill(EMAIL)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            expect(page).to_have_url(re.compile(rf"/scan/{seeded.event_id}$"))
            expect(page.get_by_role("heading", name="Night market")).to_be_visible()
            expect(page.locator("#checked-in")).to_have_text("0")
            expect(page.locator("#expected")).to_have_text("3")
            page.screenshot(path=shots / "scan-01-ready.png", full_page=True)

            result = page.locator("#result")
            page.get_by_label("Ticket code").fill(seeded.secrets[0])
            page.get_by_role("button", name="Check in").click()
            expect(result).to_have_attribute("data-result", "ok")
            expect(result).to_have_class(re.compile(r"\bok\b"))
            expect(result).to_contain_text("guest1@example.test")
            expect(page.locator("#checked-in")).to_have_text("1")
            page.screenshot(path=shots / "scan-02-green.png", full_page=True)
            green = result.evaluate("e => getComputedStyle(e).backgroundColor")
            assert green == "rgb(24, 163, 74)"

            page.get_by_label("Ticket code").fill(seeded.secrets[0])
            page.get_by_role("button", name="Check in").click()
            expect(result).to_have_attribute("data-result", "already_checked_in")
            expect(result).to_have_class(re.compile(r"\bbad\b"))
            expect(result).to_contain_text("already_checked_in")
            expect(page.locator("#checked-in")).to_have_text("1")
            page.screenshot(path=shots / "scan-03-red.png", full_page=True)
            red = result.evaluate("e => getComputedStyle(e).backgroundColor")
            assert red == "rgb(217, 45, 32)"

            page.get_by_label("Ticket code").fill("not a ticket")
            page.get_by_role("button", name="Check in").click()
            expect(result).to_have_attribute("data-result", "invalid")

            # The holder's ticket page shows the QR and the calendar link.
            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.goto(f"{base}/t/{seeded.secrets[1]}")
            expect(phone.locator(".qr svg")).to_be_visible()
            expect(phone.get_by_role("link", name="Add to calendar")).to_be_visible()
            phone.screenshot(path=shots / "scan-04-ticket.png", full_page=True)
        finally:
            browser.close()
