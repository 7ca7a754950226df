"""Moments shown in an event's own time zone: pages, messages and the chat all use these."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def zone_of(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local(
    value: datetime | None, timezone: str, fmt: str = "%a %d %b %Y, %H:%M", zone: bool = True
) -> str:
    """A moment in the event's own time zone (with its abbreviation unless told not to)."""
    if value is None:
        return "—"
    try:
        value = value.astimezone(zone_of(timezone))
    except OverflowError:  # year 1 or 9999 pushed past the calendar: show it in UTC
        value = value.astimezone(UTC)
    return value.strftime(f"{fmt} %Z" if zone else fmt)
