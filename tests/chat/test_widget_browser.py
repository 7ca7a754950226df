"""The chat widget in a real browser: `popdrop demo --no-serve` seeds the demo org (its
event has the default flow published), a `popdrop serve` process serves it, Playwright on
Debian's chromium talks to /chat/demo through the flow — RSVP a slot, get the QR ticket —
and the ticket checks in on the scanner API. A host's reply from the console reaches a
visitor who had closed the tab when they come back.

Screenshots land in $POPDROP_SCREENSHOTS when set (to look at them), else in tmp_path.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from popdrop.core.db import Database
from popdrop.events.models import Event
from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS
from tests.server import Server, running_server

pytestmark = MARKS


@dataclass
class Demo:
    server: Server
    token: str
    email: str
    password: str


async def _open_doors(url: str) -> None:
    """Doors open now (the demo's pop-up is in two days): the scan must be in the window."""
    db = Database(url, pool_size=1, max_overflow=0)
    try:
        async with db.transaction() as session:
            await session.execute(
                update(Event)
                .where(Event.slug == "weekend-pop-up")
                .values(starts_at=datetime.now(UTC) - timedelta(minutes=15))
            )
    finally:
        await db.dispose()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    with running_server(tmp_path_factory.mktemp("chat-browser")) as server:
        done = server.cli("demo", "--no-serve")
        assert done.returncode == 0, done.stderr
        found = re.search(r"Authorization: Bearer (\S+)", done.stdout)
        login = re.search(r"Login\s+(\S+)\s+password\s+(\S+)", done.stdout)
        assert found and login, done.stdout
        assert "/chat/demo" in done.stdout
        asyncio.run(_open_doors(server.env["POPDROP_DATABASE_URL"]))
        yield Demo(server, found.group(1), login.group(1), login.group(2))


def test_widget_books_a_slot_and_the_ticket_checks_in(demo: Demo, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = demo.server.base_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            page.goto(f"{base}/chat/demo")
            chat = page.locator(".pd-chat")
            expect(chat).to_have_attribute("data-state", "ready")
            expect(page.get_by_role("log")).to_contain_text("pops up at Old Tram Depot")
            expect(page.locator(".pd-countdown time")).to_be_visible()
            page.screenshot(path=shots / "chat-01-greet.png", full_page=True)

            # The menu, then the drop: a carousel of product cards with Reserve buttons.
            page.get_by_role("button", name="See the drop").click()
            carousel = page.locator(".pd-carousel").last
            expect(carousel.locator(".pd-card").first).to_be_visible()
            expect(carousel.get_by_role("button", name="Reserve").first).to_be_visible()
            page.screenshot(path=shots / "chat-02-drop.png", full_page=True)

            # RSVP a slot, typed answers go through the labelled input and Enter.
            page.get_by_role("button", name="RSVP a time slot").last.click()
            slot = page.locator("button.pd-reply:not([disabled])").first
            expect(slot).to_contain_text("left")
            expect(slot).to_be_focused()  # keyboard users land on the new choices
            page.keyboard.press("Enter")
            expect(page.get_by_role("log")).to_contain_text("What email should we send")
            message = page.get_by_label("Message")
            message.fill("widget@example.com")
            message.press("Enter")
            page.get_by_role("button", name="Yes, book it").click()
            qr = page.locator(".pd-qr img")
            expect(qr).to_be_visible()
            expect(page.get_by_role("log")).to_contain_text("Your code for 10% off")
            page.wait_for_function(
                "() => { const i = document.querySelector('.pd-qr img');"
                " return i && i.complete && i.naturalWidth > 0; }"
            )
            page.screenshot(path=shots / "chat-03-ticket.png", full_page=True)
            secret = page.locator(".pd-qr").get_attribute("data-ticket")
            assert secret

            # A reload resumes: same visitor, the transcript and the ticket are still there.
            visitor = page.evaluate("() => localStorage.getItem('popdrop-chat:demo:visitor')")
            page.reload()
            expect(page.locator(".pd-chat")).to_have_attribute("data-state", "ready")
            expect(page.locator(".pd-qr img")).to_be_visible()
            again = page.evaluate("() => localStorage.getItem('popdrop-chat:demo:visitor')")
            assert visitor and again == visitor
        finally:
            browser.close()

    # The door: the scanner API checks the ticket in, once.
    headers = {"Authorization": f"Bearer {demo.token}"}
    body = {"secret": secret, "nonce": secrets.token_hex(12)}
    first = httpx.post(f"{base}/api/v1/checkins", json=body, headers=headers, timeout=10)
    assert first.status_code == 200 and first.json()["result"] == "ok", first.text
    body["nonce"] = secrets.token_hex(12)
    twice = httpx.post(f"{base}/api/v1/checkins", json=body, headers=headers, timeout=10)
    assert twice.json()["result"] == "already_checked_in", twice.text


def test_a_host_reply_waits_for_a_visitor_who_closed_the_tab(demo: Demo, shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = demo.server.base_url
    reply = "Hi, Mia from the shop here: we kept a tote bag aside for you."
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            visitor = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
            page = visitor.new_page()
            page.goto(f"{base}/chat/demo")
            expect(page.get_by_role("log")).to_contain_text("pops up at Old Tram Depot")
            message = page.get_by_label("Message")
            message.fill("Do you still have the tote bag in blue?")
            message.press("Enter")
            expect(page.get_by_role("log")).to_contain_text("Sorry, I did not get that")
            page.close()  # the visitor leaves

            host = browser.new_page(viewport={"width": 1280, "height": 900})
            host.goto(f"{base}/chat/console")
            host.get_by_label("Email").fill(demo.email)
            host.get_by_label("Password").fill(demo.password)
            host.get_by_role("button", name="Log in").click()
            host.locator("[data-testid=conversation] a").first.click()
            host.get_by_label("Reply as host").fill(reply)
            host.get_by_role("button", name="Send", exact=True).click()
            expect(host.locator("body")).to_contain_text(reply)
            host.screenshot(path=shots / "chat-04-host-reply.png", full_page=True)

            # The server's tick finds nobody connected and keeps the reply for the visitor.
            back = visitor.new_page()
            back.wait_for_timeout(3_000)
            back.goto(f"{base}/chat/demo")
            expect(back.locator(".pd-chat")).to_have_attribute("data-state", "ready")
            expect(back.get_by_role("log")).to_contain_text(reply, timeout=15_000)
            back.screenshot(path=shots / "chat-05-reply-waited.png", full_page=True)
        finally:
            browser.close()
