"""Moments shown in an event's own time zone: pages, messages, the chat and the iCal files
all use these (never a UTC hour shown as if it were local).

- `local`: one moment, with the zone's abbreviation (`Fri 05 Dec 2026, 11:00 CET`).
- `slot_label`: a time window, the one way slots are named everywhere (pages, chat buttons
  and cards, SMS, Telegram, waiting-list notices): `Fri 05 Dec, 11:00-13:00 CET` (an en dash
  between the ends), after the slot's own name if any (`Morning · Fri 05 Dec, 11:00-13:00 CET`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

SLOT_DAY = "%a %d %b, %H:%M"
DASH = "\u2013"  # the en dash between a window's two ends


def zone_of(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def in_zone(value: datetime, timezone: str) -> datetime:
    """The moment on the event's wall clock (UTC when the zone's calendar overflows)."""
    try:
        return value.astimezone(zone_of(timezone))
    except OverflowError:  # year 1 or 9999 pushed past the calendar: show it in UTC
        return value.astimezone(UTC)


def local(
    value: datetime | None, timezone: str, fmt: str = "%a %d %b %Y, %H:%M", zone: bool = True
) -> str:
    """A moment in the event's own time zone (with its abbreviation unless told not to)."""
    if value is None:
        return "—"
    value = in_zone(value, timezone)
    return value.strftime(f"{fmt} %Z" if zone else fmt)


def slot_label(starts_at: datetime, ends_at: datetime, timezone: str, name: str = "") -> str:
    """A window in the event's zone: `Fri 05 Dec, 11:00-13:00 CET`; an end on another day
    shows its date, and a window across a clock change shows both abbreviations
    (`Sun 29 Mar, 01:00 CET - 04:00 CEST`). A slot's own name comes first."""
    start, end = in_zone(starts_at, timezone), in_zone(ends_at, timezone)
    same_day = start.date() == end.date()
    finish = end.strftime("%H:%M" if same_day else SLOT_DAY)
    sep = DASH if same_day else f" {DASH} "
    if start.tzname() == end.tzname():
        when = f"{start:{SLOT_DAY}}{sep}{finish} {end:%Z}"
    else:
        when = f"{start:{SLOT_DAY}} {start:%Z} {DASH} {finish} {end:%Z}"
    return f"{name} · {when}" if name else when
