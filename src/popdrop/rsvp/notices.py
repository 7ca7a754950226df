"""What the waiting list tells people: an offer just made (the only place its plaintext
voucher code exists) and the notifications it queues in the outbox — by email and/or SMS,
whatever the RSVP gave, and into the chat conversation the RSVP was made in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from popdrop.outbound import outbox

OFFER_NOTICE = "waitlist_offer"  # the outbox kind of an offer's message
# The actor (and `Rsvp.source`) of an RSVP made in a chat conversation: `chat:<id>`.
CHAT_SOURCE = "chat:"


def chat_conversation_of(source: str | None) -> int | None:
    """The chat conversation an RSVP source (or a chat notice's recipient) names, or None."""
    if source is None or not source.startswith(CHAT_SOURCE):
        return None
    ref = source.removeprefix(CHAT_SOURCE)
    return int(ref) if ref.isdigit() else None


@dataclass(frozen=True)
class OfferMade:
    """An offer just made: the only place its plaintext voucher code exists."""

    offer_id: int
    rsvp_id: int
    org_id: int
    event_id: int
    slot_id: int
    places: int
    code: str
    expires_at: datetime
    email: str | None
    phone: str | None
    source: str | None = None  # the RSVP's source: `chat:<id>` sends it there too


def offer_notices(offer: OfferMade) -> list[outbox.Notice]:
    """The messages that tell the person about an offer: by email and/or SMS, whatever the
    RSVP gave, and into the chat conversation the RSVP was made in (if it was). They carry
    the code (the claim link is built from it at send time)."""
    payload = {
        "offer": offer.offer_id,
        "event": offer.event_id,
        "places": offer.places,
        "code": offer.code,
    }
    subject = f"offer:{offer.offer_id}"
    conversation_id = chat_conversation_of(offer.source)
    points = (
        (outbox.Channel.EMAIL, offer.email),
        (outbox.Channel.SMS, offer.phone),
        (outbox.Channel.CHAT, f"{CHAT_SOURCE}{conversation_id}" if conversation_id else None),
    )
    return [
        outbox.Notice(offer.org_id, OFFER_NOTICE, subject, channel, address, payload)
        for channel, address in points
        if address
    ]
