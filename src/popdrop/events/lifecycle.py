"""The life of an event, as data, and the one definition of an "open" event.

    draft ⇄ published ──▶ live ──▶ closed
                └──────────────────▲

Rules:
- An event moves forward, or back from `published` to `draft` (unpublish before anyone
  could act on it); `closed` is final.
- Open events (`OPEN_EVENT_STATUSES`: published or live) take RSVPs, holds and chat
  bookings; every domain that asks "is this event open?" imports this set.
- An open event with an `opens_at` takes nothing before that moment (fairness: the
  countdown is a real start line). `require_open` is the one rule every path that takes
  capacity calls (RSVP, hold, chat booking, waiting-list claim): `event_closed` (409) when
  the status is not open, `not_open_yet` (409, with `opens_at`) before the opening;
  `open_clause` is the same rule as SQL, for a statement that checks it while it takes.

Pure: no I/O; pages and tests import it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import ColumnElement, and_, or_

from popdrop.core.errors import PopdropError
from popdrop.core.lifecycle import Lifecycle
from popdrop.core.localtime import local


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


class Opening(Protocol):
    """What `require_open` reads of an event (an `Event`, or a row of these columns)."""

    @property
    def status(self) -> str: ...

    @property
    def opens_at(self) -> datetime | None: ...

    @property
    def timezone(self) -> str: ...


def require_open(event: Opening, now: datetime, *, takes: str) -> None:
    """Refuse unless the event takes `takes` (RSVPs, holds…) at `now`: an open status,
    and its `opens_at` (if any) reached. At `opens_at` exactly it is open."""
    if event.status not in OPEN_EVENT_STATUSES:
        raise PopdropError(
            "event_closed", f"this event does not take {takes}", detail={"status": event.status}
        )
    if event.opens_at is not None and now < event.opens_at:
        raise PopdropError(
            "not_open_yet",
            f"this event takes {takes} from {local(event.opens_at, event.timezone)}",
            detail={"opens_at": event.opens_at.isoformat()},
        )


def open_clause(status: Any, opens_at: Any, now: Any) -> ColumnElement[bool]:
    """`require_open`'s rule as a SQL condition on an event's `status` and `opens_at`
    columns at `now` (a bound parameter)."""
    return and_(status.in_(OPEN_EVENT_STATUSES), or_(opens_at.is_(None), opens_at <= now))
