"""The one iCal writer (RFC 5545, through the `icalendar` package): the organization's
calendar feed (`/ical/{token}.ics`) and the event file of a ticket (`/t/{secret}/event.ics`).

Rules:
- Times are written on the event's own wall clock: `DTSTART;TZID=Europe/Paris:…`, with the
  matching VTIMEZONE in the calendar (the zone's rules for the years the events span), so
  a calendar app shows the hour the organizer typed. An unknown zone is written in UTC.
- UIDs live on this install's host (`event-<id>@<base_url host>`, `ticket-<id>@…`): two
  installs never collide in one person's calendar, and a feed's event keeps its UID.
- Text typed in a form comes with CRLF line breaks: every line break becomes one `\\n`
  escape, so no bare CR ever reaches the output (strict parsers break on one).
- The feed lists every event but drafts; a closed event stays in it (it happened).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from urllib.parse import urlsplit

import icalendar

from popdrop.core import links
from popdrop.core.localtime import in_zone
from popdrop.events.lifecycle import EventStatus
from popdrop.events.models import Event

MEDIA_TYPE = "text/calendar; charset=utf-8"


def uid_host(base_url: str) -> str:
    """The install's host, the right-hand side of every UID this install writes."""
    return urlsplit(base_url).hostname or "localhost"


def _text(value: str) -> str:
    """One kind of line break (LF); the package escapes it as `\\n`."""
    return value.replace("\r\n", "\n").replace("\r", "\n")


def _vevent(
    event: Event, *, uid: str, url: str, now: datetime, status: str | None = None
) -> icalendar.Event:
    item = icalendar.Event()
    item.add("uid", uid)
    item.add("dtstamp", now)
    item.add("dtstart", in_zone(event.starts_at, event.timezone))
    item.add("dtend", in_zone(event.ends_at, event.timezone))
    item.add("summary", _text(event.title))
    if event.description:
        item.add("description", _text(event.description))
    location = ", ".join(p for p in (event.venue_name, event.venue_address) if p)
    if location:
        item.add("location", _text(location))
    if event.latitude is not None and event.longitude is not None:
        item.add("geo", (event.latitude, event.longitude))
    item.add("url", url)
    if status:
        item.add("status", status)
    return item


def _calendar(
    items: list[tuple[Event, icalendar.Event]], prodid: str, extra: dict[str, str]
) -> bytes:
    calendar = icalendar.Calendar()
    calendar.add("prodid", prodid)
    calendar.add("version", "2.0")
    calendar.add("calscale", "GREGORIAN")
    for key, value in extra.items():
        calendar.add(key, value)
    for _, item in items:
        calendar.add_component(item)
    if items:
        # The zones' rules for the years the events span (not 1970-2038: a short file).
        first = min(e.starts_at for e, _ in items).year
        last = max(e.ends_at for e, _ in items).year
        calendar.add_missing_timezones(
            first_date=date(max(first - 1, 1), 1, 1), last_date=date(min(last + 1, 9999), 12, 31)
        )
    body: bytes = calendar.to_ical()
    return body


def feed(events: Iterable[Event], *, name: str, base_url: str, now: datetime) -> bytes:
    """The organization's calendar: every event but drafts."""
    host = uid_host(base_url)
    items = [
        (
            event,
            _vevent(
                event,
                uid=f"event-{event.id}@{host}",
                url=links.event_url(base_url, event.id),
                now=now,
                status="CONFIRMED",
            ),
        )
        for event in events
        if event.status != EventStatus.DRAFT
    ]
    return _calendar(items, "-//popdrop//events//EN", {"x-wr-calname": _text(name)})


def ticket_file(
    event: Event, *, ticket_id: int, ticket_url: str, base_url: str, now: datetime
) -> bytes:
    """The event of one ticket, to add to a calendar; its URL is the ticket page."""
    uid = f"ticket-{ticket_id}@{uid_host(base_url)}"
    item = _vevent(event, uid=uid, url=ticket_url, now=now)
    return _calendar([(event, item)], "-//popdrop//tickets//EN", {"method": "PUBLISH"})
