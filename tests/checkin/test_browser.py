"""The scanner page in a real browser: a `popdrop serve` process seeded with the CLI (org,
volunteer, token), the ORM (event) and its API (tickets), driven by Playwright on Debian's
chromium. The door without BarcodeDetector: Chromium's fake camera plays a Y4M video of a
ticket's QR, which the page reads with the vendored jsQR; and typed short codes.

Screenshots land in $POPDROP_SCREENSHOTS when set (to look at them), else in tmp_path.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from popdrop.accounts import service as accounts
from popdrop.checkin import tickets
from popdrop.core import qr
from popdrop.core.db import Database
from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS
from tests.checkin.helpers import live_event
from tests.server import Server, running_server

EMAIL = "door@browser.test"
PASSWORD = "browser test password"

pytestmark = MARKS


GUESTS = 5


@dataclass
class Seeded:
    server: Server
    event_id: int
    secrets: list[str]


async def _seed_event(url: str) -> int:
    db = Database(url, pool_size=1, max_overflow=0)
    now = datetime.now(UTC)
    try:
        async with db.transaction() as session:
            org = await accounts.get_organization_by_slug(session, "door")
            event = live_event(
                org.id,
                now,
                slug="night-market",
                title="Night market",
                description="",
                venue_name="Old tram depot",
                venue_address="",
                timezone="Europe/Berlin",
                starts_at=now - timedelta(minutes=15),
                ends_at=now + timedelta(hours=3),
            )
            session.add(event)
            await session.flush()
            return event.id
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
        token = server.cli(
            "token", "create", "--org", "door", "--name", "seed", "--scope", "tickets:write"
        )
        assert token.returncode == 0, token.stderr
        event_id = asyncio.run(_seed_event(server.env["POPDROP_DATABASE_URL"]))
        secrets: list[str] = []
        for subject in range(1, GUESTS + 1):  # the server makes and seals the event's key
            issued = httpx.post(
                f"{server.base_url}/api/v1/tickets",
                json={
                    "event_id": event_id,
                    "subject_kind": "rsvp",
                    "subject_id": subject,
                    "holder_ref": f"guest{subject}@example.test",
                },
                headers={"Authorization": f"Bearer {token.stdout.strip()}"},
            )
            assert issued.status_code == 201, issued.text
            secrets.append(issued.json()["secret"])
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
            expect(page.locator("#expected")).to_have_text(str(GUESTS))
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


def y4m_of_qr(payload: str, path: Path, *, width: int = 640, height: int = 480) -> Path:
    """A YUV4MPEG2 video (4:2:0, full-range luma) of the product's QR of `payload`, centred
    on white: what Chromium's fake camera plays in a loop."""
    matrix = qr.make(payload).matrix
    quiet = 4
    size = len(matrix) + 2 * quiet
    scale = (min(width, height) - 40) // size
    left, top = (width - size * scale) // 2, (height - size * scale) // 2
    luma = bytearray(b"\xff" * (width * height))
    for row, cells in enumerate(matrix):
        for col, dark in enumerate(cells):
            if not dark:
                continue
            x0, y0 = left + (col + quiet) * scale, top + (row + quiet) * scale
            for y in range(y0, y0 + scale):
                luma[y * width + x0 : y * width + x0 + scale] = b"\x00" * scale
    chroma = b"\x80" * ((width // 2) * (height // 2) * 2)
    frame = b"FRAME\n" + bytes(luma) + chroma
    header = f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\n".encode()
    path.write_bytes(header + frame * 10)
    return path


def test_scanner_without_barcode_detector_reads_the_camera_and_typed_codes(
    seeded: Seeded, shots: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = seeded.server.base_url
    by_camera, by_code = seeded.secrets[3], seeded.secrets[4]
    video = y4m_of_qr(by_camera, tmp_path / "ticket.y4m")
    camera_args = [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={video}",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *camera_args]
        )
        try:
            context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
            context.grant_permissions(["camera"], origin=base)
            # Every iPhone, Firefox and desktop: no BarcodeDetector, so the page uses jsQR.
            context.add_init_script("delete window.BarcodeDetector;")
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{base}/login?next=/scan/{seeded.event_id}")
            page.get_by_label("Email").fill(EMAIL)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            expect(page).to_have_url(re.compile(rf"/scan/{seeded.event_id}$"))
            assert page.evaluate("'BarcodeDetector' in window") is False
            before = int(page.locator("#checked-in").inner_text())

            result = page.locator("#result")
            page.get_by_role("button", name="Scan with the camera").click()
            expect(result).to_have_attribute("data-result", "ok", timeout=20_000)
            expect(result).to_contain_text("guest4@example.test")
            expect(page.locator("#camera-toggle")).to_have_attribute("data-reader", "jsqr")
            expect(page.locator("#checked-in")).to_have_text(str(before + 1))
            page.screenshot(path=shots / "scan-05-camera-jsqr.png", full_page=True)
            page.get_by_role("button", name="Stop the camera").click()

            # The code printed under the QR, typed the way people type it.
            code = tickets.short_code(by_code)
            typed = f"{code[:4].lower()} {code[4:]}"
            typo = code[:8] + tickets.ALPHABET[(tickets.ALPHABET.index(code[8]) + 1) % 32]
            page.get_by_label("Ticket code").fill(typo)
            page.get_by_role("button", name="Check in").click()
            expect(result).to_have_attribute("data-result", "short_code_invalid")
            page.get_by_label("Ticket code").fill(typed)
            page.get_by_role("button", name="Check in").click()
            expect(result).to_have_attribute("data-result", "ok")
            expect(result).to_contain_text("guest5@example.test")
            expect(page.locator("#checked-in")).to_have_text(str(before + 2))
            page.screenshot(path=shots / "scan-06-typed-code.png", full_page=True)

            # The holder's ticket page prints that code under the QR.
            phone = context.new_page()
            phone.goto(f"{base}/t/{by_code}")
            expect(phone.get_by_label("Ticket code")).to_have_text(tickets.format_short_code(code))
            phone.screenshot(path=shots / "scan-07-ticket-code.png", full_page=True)
            assert not [e for e in errors if "Content Security Policy" in e], errors
        finally:
            browser.close()
