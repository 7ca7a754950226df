"""The war room in a real browser on a phone: a `popdrop serve` process (its in-process
worker sends through the development mailbox, throttled so the send takes a while) driven
by Playwright on Debian's chromium. The host watches a drop's war room while it sends: the
sent tile and the charts move without a reload; then the provider reports a burst of
hard bounces, the real auto-pause stops the drop, and the bounce tile turns red with its
reason while the paused banner appears.

Relies on the drop pipeline and provider feedback writing `message_sent` and
`message_bounced` to the funnel log. Screenshots land in $POPDROP_SCREENSHOTS when set,
else in tmp_path; the last one is also copied to /tmp/shots/war_room.png.
"""

from __future__ import annotations

import re
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, MARKS, log_in, run_cli
from tests.server import running_server

pytestmark = MARKS
EMAIL, PASSWORD = "host@warroom.test", "war room browser password"
PHONE = {"width": 390, "height": 844}
SECRET = "war-room-feedback-secret"
CONTACTS = 300
RATE_PER_S = 20  # the mailbox throttled: 300 messages take ~15 s
BOUNCES = 25  # of at least 120 sent: above the 5 % auto-pause threshold however many went
SHOT_COPY = Path("/tmp/shots/war_room.png")


def contacts_csv(path: Path) -> Path:
    lines = ["email,first_name,consent_email,consent_wording,consent_proof"]
    lines += [
        f"fan{i:03d}@fans.example,Fan{i},yes,Drops by email,signup form" for i in range(CONTACTS)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def contact_ids(base: str, headers: dict[str, str]) -> dict[str, int]:
    found: dict[str, int] = {}
    before: int | None = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"before": before} if before else {})}
        page = httpx.get(f"{base}/api/v1/contacts", params=params, headers=headers)
        assert page.status_code == 200, page.text
        body = page.json()
        found.update({c["email"]: c["id"] for c in body["items"]})
        before = body["next_before"]
        if before is None:
            return found


def tile_value(page: Any, key: str) -> int:
    text = page.locator(f'[data-tile="{key}"] [data-role="value"]').inner_text()
    return int(text.replace(",", ""))


def test_the_war_room_follows_a_drop_live_and_turns_red_when_it_auto_pauses(
    tmp_path: Path, shots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("POPDROP_FEEDBACK_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("POPDROP_SMTP_RATE_PER_S", str(RATE_PER_S))
    monkeypatch.setenv("POPDROP_SMTP_RATE_BURST", "1")
    # Small batches: a pause stops the send within a few messages (read before each batch).
    monkeypatch.setenv("POPDROP_SEND_BATCH_SIZE", "10")
    with running_server(tmp_path) as server:
        base = server.base_url
        run_cli(
            server,
            ("org", "create", "shop", "Shop"),
            ("user", "create", "--org", "shop", "--email", EMAIL, "--role", "owner",
             "--password", PASSWORD),
            ("contacts", "import", "--org", "shop", str(contacts_csv(tmp_path / "fans.csv"))),
        )  # fmt: skip
        made = server.cli("token", "create", "--org", "shop", "--name", "seed", "--role", "owner")
        assert made.returncode == 0, made.stderr
        headers = {"Authorization": f"Bearer {made.stdout.strip().split()[-1]}"}
        ids = contact_ids(base, headers)
        assert len(ids) == CONTACTS
        now = datetime.now(UTC)
        event = httpx.post(
            f"{base}/api/v1/events",
            json={
                "slug": "night-market", "title": "Night market", "timezone": "Europe/Berlin",
                "starts_at": (now + timedelta(days=1)).isoformat(),
                "ends_at": (now + timedelta(days=1, hours=4)).isoformat(),
            },
            headers=headers,
        )  # fmt: skip
        assert event.status_code == 201, event.text
        event_id = event.json()["id"]
        created = httpx.post(
            f"{base}/api/v1/drops",
            json={
                "name": "Friday night drop",
                "channels": ["email"],
                "from_email": "drops@night-market.example",
                "from_name": "Night market",
                "variants": [{"name": "A", "content": {"email": {"default": {
                    "subject": "Hi {{ first_name }}, the drop is on",
                    "text": "See you tonight: https://shop.example/drop",
                }}}}],
                "quiet_start_hour": 0,
                "quiet_end_hour": 0,
                "event_id": event_id,
            },
            headers=headers,
        )  # fmt: skip
        assert created.status_code == 201, created.text
        drop_id = created.json()["id"]
        override = httpx.post(
            f"{base}/api/v1/drops/{drop_id}/seed-override",
            json={"reason": "browser test"},
            headers=headers,
        )
        assert override.status_code == 200, override.text
        hooks = httpx.get(f"{base}/api/v1/webhook-urls", headers=headers)
        assert hooks.status_code == 200, hooks.text
        feedback_url = hooks.json()["generic"]

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=PHONE, is_mobile=True)
                page.goto(f"{base}/login")
                log_in(page, EMAIL, PASSWORD)
                page.goto(f"{base}/drops/{drop_id}")
                page.locator("#war-room-link").click()
                expect(page).to_have_url(f"{base}/war-room/drops/{drop_id}")
                expect(page.locator('[data-tile="sent"] [data-role="value"]')).to_have_text("0")
                # One uPlot chart per group, drawn by the page's script.
                expect(page.locator(".wr-plot canvas")).to_have_count(3)
                expect(page.locator("#paused-banner")).to_be_hidden()

                started = httpx.post(f"{base}/api/v1/drops/{drop_id}/start", headers=headers)
                assert started.status_code == 200, started.text
                # The sent tile climbs while the page stays where it is (the stream).
                seen: list[int] = []
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    value = tile_value(page, "sent")
                    if not seen or value != seen[-1]:
                        seen.append(value)
                    if value >= 120:
                        break
                    page.wait_for_timeout(250)
                assert seen[-1] >= 120, f"the sent tile stopped at {seen}"
                assert any(0 < v < CONTACTS for v in seen), seen  # seen mid-send, live
                assert len(seen) >= 3, seen  # several pushes, not one jump
                assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
                page.screenshot(path=str(shots / "war_room_sending.png"), full_page=True)

                # The provider reports hard bounces for the first messages out.
                bounces = [
                    {
                        "email": f"fan{i:03d}@fans.example",
                        "type": "bounce",
                        "permanent": True,
                        "reason": "550 5.1.1 user unknown",
                        "message_id": (
                            f"<drop-{drop_id}.contact-{ids[f'fan{i:03d}@fans.example']}"
                            ".email@popdrop>"
                        ),
                    }
                    for i in range(BOUNCES)
                ]
                reported = httpx.post(feedback_url, params={"token": SECRET}, json=bounces)
                assert reported.status_code == 200, reported.text
                assert reported.json()["events"] == {"hard_bounce": BOUNCES}

                # The drop auto-paused: the tile is red with why, the banner says so.
                bounced = page.locator('[data-tile="bounced"]')
                expect(bounced).to_have_attribute("data-alert", "yes", timeout=15_000)
                expect(bounced.locator('[data-role="reason"]')).to_contain_text("bounce rate")
                expect(bounced.locator('[data-role="value"]')).to_have_text(
                    re.compile(rf"^{BOUNCES}$"), timeout=15_000
                )
                banner = page.locator("#paused-banner")
                expect(banner).to_be_visible()
                expect(banner).to_contain_text("auto-paused")
                expect(page.locator(f'.wr-drop[data-drop="{drop_id}"]')).to_have_attribute(
                    "data-status", "paused"
                )
                expect(page.locator('form[data-action="resume"]')).to_be_visible()
                expect(page.locator('form[data-action="pause"]')).to_be_hidden()
                drop = httpx.get(f"{base}/api/v1/drops/{drop_id}", headers=headers).json()
                assert drop["status"] == "paused"
                assert drop["paused_reason"].startswith("auto-paused: bounce rate")
                # Sending stopped (the batch in hand finishes): the figure then holds.
                page.wait_for_timeout(3000)
                held = tile_value(page, "sent")
                assert held < CONTACTS
                page.wait_for_timeout(4500)
                assert tile_value(page, "sent") == held
                wide = page.evaluate("document.documentElement.scrollWidth")
                assert wide <= PHONE["width"], f"the war room is {wide}px wide on a phone"
                shot = shots / "war_room.png"
                page.screenshot(path=str(shot), full_page=True)
                SHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, SHOT_COPY)

                # The event's war room, from the event page, lists the paused drop too.
                page.goto(f"{base}/events/{event_id}")
                page.locator("#war-room-link").click()
                expect(page).to_have_url(f"{base}/war-room/events/{event_id}")
                expect(page.locator(f'.wr-drop[data-drop="{drop_id}"]')).to_have_attribute(
                    "data-status", "paused"
                )
                expect(page.locator("#paused-banner")).to_contain_text("Friday night drop")
                expect(page.locator('[data-tile="bounced"]')).to_have_attribute("data-alert", "yes")
                # On a desktop the three charts sit side by side, each inside its card.
                page.set_viewport_size({"width": 1280, "height": 900})
                page.wait_for_timeout(500)  # the charts follow the resize
                boxes = page.evaluate(
                    "Array.from(document.querySelectorAll('.wr-chart')).map(c => {"
                    " const r = c.getBoundingClientRect();"
                    " const k = c.querySelector('canvas').getBoundingClientRect();"
                    " return [r.left, r.right, k.left, k.right]; })"
                )
                assert len(boxes) == 3 and len({round(b[0]) for b in boxes}) == 3, boxes
                assert all(c_left >= left and c_right <= right for left, right, c_left, c_right
                           in boxes), boxes  # fmt: skip
                page.screenshot(path=str(shots / "war_room_event_desktop.png"), full_page=True)
            finally:
                browser.close()
