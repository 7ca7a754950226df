"""A visitor answers the Day+1 survey on a phone (390x844) in Debian's chromium, against a
real `popdrop serve`: checked in at the door, invited by the host, the server's worker puts
the message in its development mailbox when it is due, and the link in it opens the page:
a tap on 9, a comment, "Send", the thank-you; opened again, "already answered"."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from popdrop.accounts import service as accounts
from popdrop.core.db import Database
from popdrop.metrics.survey_models import SurveyInvitation
from popdrop.outbound.models import MailboxMessage
from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS, log_in, run_cli
from tests.checkin.helpers import live_event
from tests.server import Server, running_server

pytestmark = MARKS
GUEST = "guest@example.com"
HOST = "host@example.com"
PASSWORD = "browser test password"


@dataclass
class Seeded:
    server: Server
    event_id: int
    link: str


async def _seed_event(url: str) -> int:
    db = Database(url, pool_size=1, max_overflow=0)
    now = datetime.now(UTC)
    try:
        async with db.transaction() as session:
            org = await accounts.get_organization_by_slug(session, "survey")
            event = live_event(
                org.id,
                now,
                title="Night market",
                starts_at=now - timedelta(minutes=15),
                ends_at=now + timedelta(hours=3),
            )
            session.add(event)
            await session.flush()
            return event.id
    finally:
        await db.dispose()


async def _make_due(url: str, event_id: int) -> None:
    """Skip to the day after: the invitation is due now (the server's clock is real)."""
    db = Database(url, pool_size=1, max_overflow=0)
    try:
        async with db.transaction() as session:
            await session.execute(
                update(SurveyInvitation)
                .where(SurveyInvitation.event_id == event_id)
                .values(due_at=datetime.now(UTC) - timedelta(minutes=1))
            )
    finally:
        await db.dispose()


async def _mailed_text(url: str) -> str | None:
    db = Database(url, pool_size=1, max_overflow=0)
    try:
        async with db.reader() as session:
            text = await session.scalar(
                select(MailboxMessage.text).where(MailboxMessage.recipient == GUEST)
            )
            return None if text is None else str(text)
    finally:
        await db.dispose()


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
    with running_server(tmp_path_factory.mktemp("survey-browser")) as server:
        run_cli(
            server,
            ("org", "create", "survey", "Survey Org"),
            ("user", "create", "--org", "survey", "--email", HOST, "--role", "host",
             "--password", PASSWORD),
        )  # fmt: skip
        made = server.cli("token", "create", "--org", "survey", "--name", "t", "--role", "host")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip().splitlines()[-1]
        url = server.env["POPDROP_DATABASE_URL"]
        event_id = asyncio.run(_seed_event(url))
        _api(server, token, "/api/v1/contacts", {
            "email": GUEST, "consents": [{"channel": "email", "wording": "Yes, email me."}],
        })  # fmt: skip
        ticket = _api(server, token, "/api/v1/tickets", {
            "event_id": event_id, "subject_kind": "manual", "subject_id": 1, "holder_ref": GUEST,
        })  # fmt: skip
        _api(server, token, "/api/v1/checkins", {
            "secret": ticket["secret"], "nonce": secrets.token_hex(12),
        })  # fmt: skip
        scheduled = _api(server, token, f"/api/v1/surveys/events/{event_id}/schedule", {})
        assert scheduled["scheduled"] == 1, scheduled
        asyncio.run(_make_due(url, event_id))
        deadline = time.monotonic() + 30  # the server's worker ticks every few seconds
        text = None
        while text is None and time.monotonic() < deadline:
            time.sleep(0.5)
            text = asyncio.run(_mailed_text(url))
        assert text is not None, "the invitation never reached the mailbox"
        found = re.search(r"http://127\.0\.0\.1:\d+/q/\S+", text)
        assert found is not None, text
        yield Seeded(server, event_id, found.group(0))


def test_a_visitor_answers_on_a_phone(seeded: Seeded, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            page.goto(seeded.link)
            expect(page.get_by_role("heading", level=1)).to_contain_text("Night market")
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the survey is {width}px wide on a 390px phone"
            nine = page.locator("label", has=page.locator("input[value='9']"))
            box = nine.bounding_box()
            assert box is not None and box["height"] >= 40, "score buttons too small to tap"
            nine.click()
            expect(page.locator("input[value='9']")).to_be_checked()
            page.get_by_label("Anything to tell us?").fill("Great music, more seats please.")
            page.screenshot(path=shots / "survey.png", full_page=True)
            page.get_by_role("button", name="Send my answer").click()
            expect(page.get_by_role("heading", name="Thank you!")).to_be_visible()
            expect(page.get_by_text("(9/10)")).to_be_visible()
            page.screenshot(path=shots / "survey-thanks.png", full_page=True)

            page.goto(seeded.link)
            expect(page.get_by_role("heading", name="You already answered")).to_be_visible()
            expect(page.locator("input[name='score']")).to_have_count(0)

            # The host sees the answer on the event's NPS page (same phone).
            host = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            host.goto(f"{seeded.server.base_url}/login?next=/insights/events/{seeded.event_id}/nps")
            log_in(host, HOST, PASSWORD)
            expect(host.locator("#nps")).to_have_text("+100")
            expect(host.locator("#n")).to_have_text("1")
            expect(host.locator("#comments")).to_contain_text("Great music, more seats please.")
            expect(host.locator("#comments")).not_to_contain_text(GUEST)
            width = host.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the NPS page is {width}px wide on a 390px phone"
            host.screenshot(path=shots / "survey-nps.png", full_page=True)
        finally:
            browser.close()
    figures = httpx.get(f"{seeded.server.base_url}/q/not-a-token", timeout=10)
    assert figures.status_code == 404
