"""The life of an event, as data, and the one definition of an "open" event.

    draft ⇄ published ──▶ live ──▶ closed
                └──────────────────▲

Rules:
- An event moves forward, or back from `published` to `draft` (unpublish before anyone
  could act on it); `closed` is final.
- Open events (`OPEN_EVENT_STATUSES`: published or live) take RSVPs, holds and chat
  bookings; every domain that asks "is this event open?" imports this set.

Pure: no I/O; pages and tests import it.
"""

from __future__ import annotations

from enum import StrEnum

from popdrop.core.lifecycle import Lifecycle


class EventStatus(StrEnum):
    DRAFT = "draft"
    PUBLISHED = "published"
    LIVE = "live"
    CLOSED = "closed"


EVENT_LIFECYCLE: Lifecycle[EventStatus] = Lifecycle(
    "event",
    EventStatus,
    {
        EventStatus.DRAFT: frozenset({EventStatus.PUBLISHED}),
        EventStatus.PUBLISHED: frozenset({EventStatus.DRAFT, EventStatus.LIVE, EventStatus.CLOSED}),
        EventStatus.LIVE: frozenset({EventStatus.CLOSED}),
        EventStatus.CLOSED: frozenset(),
    },
)

# The statuses in which an event takes RSVPs, holds and bookings.
OPEN_EVENT_STATUSES = (EventStatus.PUBLISHED, EventStatus.LIVE)
