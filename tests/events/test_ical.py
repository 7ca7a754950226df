"""The iCal feed and a ticket's calendar file, read back by the `icalendar` package: one
writer, times on the event's wall clock (TZID + VTIMEZONE), UIDs on this install's host,
and no bare CR from a description typed in a form (CRLF)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import httpx
import icalendar
import pytest

from popdrop.core.config import Settings
from popdrop.web.context import AppContext
from tests.checkin.helpers import issue, make_event
from tests.conftest import Tenant
from tests.events.helpers import post

BASE_URL = "https://pop.example.org"
STARTS = datetime(2030, 1, 11, 16, tzinfo=UTC)  # 11:00 in New York, 17:00 in Paris
TYPED = "Sneakers, coffee; and friends.\r\nBring a bag!\r\n\r\nDoors at 11.\rLast entry 16."


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"base_url": BASE_URL})


def read(body: bytes) -> icalendar.Calendar:
    assert re.search(rb"\r(?!\n)", body) is None, "a bare CR"
    assert re.search(rb"(?<!\r)\n", body) is None, "a bare LF"
    return icalendar.Calendar.from_ical(body)


def only(calendar: icalendar.Calendar, name: str) -> icalendar.cal.Component:
    [component] = calendar.walk(name)
    return component


async def test_feed_is_on_the_event_wall_clock_with_its_zone(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    event = await post(
        app_client,
        tenant,
        "/api/v1/events",
        {
            "slug": "ny",
            "title": "Brooklyn pop-up",
            "description": TYPED,
            "venue_name": "Navy Yard",
            "venue_address": "63 Flushing Ave, Brooklyn",
            "timezone": "America/New_York",
            "starts_at": STARTS.isoformat(),
            "ends_at": (STARTS + timedelta(hours=6)).isoformat(),
        },
    )
    await post(app_client, tenant, f"/api/v1/events/{event['id']}/status", {"status": "published"})
    link = (await app_client.get("/api/v1/ical-link", headers=tenant.headers)).json()["url"]
    assert link.startswith(BASE_URL)
    feed = await app_client.get(link.removeprefix(BASE_URL))
    assert feed.status_code == 200
    assert feed.headers["content-type"] == "text/calendar; charset=utf-8"
    assert b"DTSTART;TZID=America/New_York:20300111T110000\r\n" in feed.content
    calendar = read(feed.content)
    assert only(calendar, "VTIMEZONE")["TZID"] == "America/New_York"
    vevent = only(calendar, "VEVENT")
    assert vevent["DTSTART"].params["TZID"] == "America/New_York"
    assert vevent.start == STARTS and vevent.start.hour == 11
    assert vevent.end == STARTS + timedelta(hours=6)
    assert str(vevent["UID"]) == f"event-{event['id']}@pop.example.org"
    assert str(vevent["DESCRIPTION"]) == TYPED.replace("\r\n", "\n").replace("\r", "\n")
    assert str(vevent["LOCATION"]) == "Navy Yard, 63 Flushing Ave, Brooklyn"
    assert str(vevent["URL"]) == f"{BASE_URL}/e/{event['id']}"
    assert str(calendar["X-WR-CALNAME"]) == tenant.slug  # the organization's name


async def test_ticket_file_is_on_the_event_wall_clock_with_its_zone(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id, starts_at=STARTS)
    ticket = await issue(app_client, tenant, event_id)
    ics = await app_client.get(f"/t/{ticket['secret']}/event.ics")
    assert ics.status_code == 200
    assert ics.headers["content-type"] == "text/calendar; charset=utf-8"
    assert b"DTSTART;TZID=Europe/Paris:20300111T170000\r\n" in ics.content
    calendar = read(ics.content)
    assert str(calendar["METHOD"]) == "PUBLISH"
    assert only(calendar, "VTIMEZONE")["TZID"] == "Europe/Paris"
    vevent = only(calendar, "VEVENT")
    assert vevent["DTSTART"].params["TZID"] == "Europe/Paris"
    assert vevent.start == STARTS and vevent.start.hour == 17
    assert str(vevent["UID"]) == f"ticket-{ticket['ticket']['id']}@pop.example.org"
    assert str(vevent["DESCRIPTION"]) == "Sneakers, coffee; and friends"
    assert str(vevent["URL"]) == f"{BASE_URL}/t/{ticket['secret']}"
