"""The life of an RSVP and of a waiting-list offer, as data.

RSVP:

    confirmed ─────────────────────────────▶ cancelled
    waitlisted ──offer──▶ offered ──claim──▶ confirmed
        │                   │ └──expiry──▶ lapsed
        └───────────────────┴──────────────▶ cancelled

Offer: `open` until it is `claimed`, `expired` (its deadline passed) or `cancelled` (the
RSVP was cancelled while offered). Every non-open status is final.

Rules:
- A confirmed RSVP's places count in the slot's `taken`; an offered one's places are held
  there by its open offer until claimed (they stay) or expired/cancelled (they go back).
- `cancelled` and `lapsed` are final: a lapsed person joins the list again with a new RSVP.
- One active RSVP (confirmed, waitlisted or offered) per person and slot: a second one
  with the same email or phone is refused (`already_rsvped`).

Pure: no I/O; pages and tests import it.
"""

from __future__ import annotations

from enum import StrEnum

from popdrop.core.lifecycle import Lifecycle


class RsvpStatus(StrEnum):
    CONFIRMED = "confirmed"
    WAITLISTED = "waitlisted"
    OFFERED = "offered"
    CANCELLED = "cancelled"
    LAPSED = "lapsed"


RSVP_LIFECYCLE: Lifecycle[RsvpStatus] = Lifecycle(
    "RSVP",
    RsvpStatus,
    {
        RsvpStatus.CONFIRMED: frozenset({RsvpStatus.CANCELLED}),
        RsvpStatus.WAITLISTED: frozenset({RsvpStatus.OFFERED, RsvpStatus.CANCELLED}),
        RsvpStatus.OFFERED: frozenset(
            {RsvpStatus.CONFIRMED, RsvpStatus.LAPSED, RsvpStatus.CANCELLED}
        ),
        RsvpStatus.CANCELLED: frozenset(),
        RsvpStatus.LAPSED: frozenset(),
    },
)

# RSVPs still waiting for a place (on the list, or holding an open offer).
WAITING_RSVP_STATUSES = (RsvpStatus.WAITLISTED, RsvpStatus.OFFERED)
# RSVPs that hold or wait for a place: a person (an email, a phone number) has at most
# one of these per slot. `cancelled` and `lapsed` ones never block a new RSVP.
ACTIVE_RSVP_STATUSES = (RsvpStatus.CONFIRMED, *WAITING_RSVP_STATUSES)


class OfferStatus(StrEnum):
    OPEN = "open"
    CLAIMED = "claimed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


OFFER_LIFECYCLE: Lifecycle[OfferStatus] = Lifecycle(
    "waiting-list offer",
    OfferStatus,
    {
        OfferStatus.OPEN: frozenset(
            {OfferStatus.CLAIMED, OfferStatus.EXPIRED, OfferStatus.CANCELLED}
        ),
        OfferStatus.CLAIMED: frozenset(),
        OfferStatus.EXPIRED: frozenset(),
        OfferStatus.CANCELLED: frozenset(),
    },
)
