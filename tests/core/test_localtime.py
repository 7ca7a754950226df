"""The one formatter of shown times: a slot's window on the event's own wall clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from popdrop.core.localtime import DASH, local, slot_label

# 16:00 UTC on Friday 11 January 2030: 11:00 in New York (EST), 17:00 in Paris (CET).
WINTER = datetime(2030, 1, 11, 16, tzinfo=UTC)


def test_a_slot_shows_the_hours_of_its_event_zone() -> None:
    end = WINTER + timedelta(hours=2)
    assert slot_label(WINTER, end, "America/New_York") == f"Fri 11 Jan, 11:00{DASH}13:00 EST"
    assert slot_label(WINTER, end, "Europe/Paris") == f"Fri 11 Jan, 17:00{DASH}19:00 CET"
    summer = datetime(2030, 6, 7, 16, tzinfo=UTC)
    assert slot_label(summer, summer + timedelta(hours=2), "Europe/Paris") == (
        f"Fri 07 Jun, 18:00{DASH}20:00 CEST"
    )


def test_a_named_slot_keeps_its_name_before_the_times() -> None:
    label = slot_label(WINTER, WINTER + timedelta(hours=1), "America/New_York", "Early birds")
    assert label == f"Early birds · Fri 11 Jan, 11:00{DASH}12:00 EST"


def test_a_window_over_midnight_or_a_clock_change_says_so() -> None:
    late = datetime(2030, 1, 11, 22, tzinfo=UTC)  # 23:00 in Paris
    assert slot_label(late, late + timedelta(hours=3), "Europe/Paris") == (
        f"Fri 11 Jan, 23:00 {DASH} Sat 12 Jan, 02:00 CET"
    )
    # Paris moves its clocks from 02:00 CET to 03:00 CEST on 31 March 2030.
    night = datetime(2030, 3, 31, 0, tzinfo=UTC)
    assert slot_label(night, night + timedelta(hours=2), "Europe/Paris") == (
        f"Sun 31 Mar, 01:00 CET {DASH} 04:00 CEST"
    )


def test_an_unknown_zone_shows_utc_and_says_it() -> None:
    assert slot_label(WINTER, WINTER + timedelta(hours=1), "Mars/Olympus") == (
        f"Fri 11 Jan, 16:00{DASH}17:00 UTC"
    )
    assert local(WINTER, "Mars/Olympus") == "Fri 11 Jan 2030, 16:00 UTC"
    assert local(None, "Europe/Paris") == "—"
