from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from popdrop.core.schemas import StrictInput
from popdrop.rsvp.lifecycle import OfferStatus, RsvpStatus

MAX_PLACES = 10
SlotId = Field(ge=1, le=2**62)


class RsvpCreate(StrictInput):
    """A public RSVP: an email or a phone number, the consent text as shown, and places."""

    slot_id: int = SlotId
    email: str | None = Field(default=None, min_length=3, max_length=254)
    phone: str | None = Field(default=None, min_length=3, max_length=32)
    places: int = Field(default=1, ge=1, le=MAX_PLACES)
    consent: bool = Field(description="The consent checkbox: must be ticked")
    consent_text: str = Field(
        min_length=1, max_length=2000, description="The checkbox text, stored verbatim"
    )
    waitlist: bool = Field(
        default=False, description="If the slot is full, join its waiting list instead"
    )


class CancelByToken(StrictInput):
    token: str = Field(min_length=1, max_length=500)


class CancelRequest(StrictInput):
    reason: str = Field(default="cancelled by operator", min_length=1, max_length=200)


class ClaimRequest(StrictInput):
    event_id: int = SlotId
    code: str = Field(min_length=1, max_length=64)


class RsvpOut(BaseModel):
    id: int
    event_id: int
    slot_id: int
    status: RsvpStatus
    places: int
    email: str | None
    phone: str | None
    consent_text: str
    created_at: datetime
    confirmed_at: datetime | None
    cancelled_at: datetime | None
    cancel_reason: str | None


class RsvpCreated(BaseModel):
    rsvp: RsvpOut
    cancel_token: str = Field(description="Signed token for POST /api/v1/public/rsvps/cancel")
    ticket_url: str | None = Field(
        default=None, description="The QR ticket page of a confirmed RSVP (checked in at the door)"
    )


class OfferOut(BaseModel):
    """An offer's state (its voucher code is never shown here)."""

    id: int
    places: int
    status: OfferStatus
    offered_at: datetime
    expires_at: datetime
    closed_at: datetime | None


class WaitlistEntryOut(BaseModel):
    rsvp_id: int
    slot_id: int
    places: int
    status: RsvpStatus
    created_at: datetime
    position: int | None = Field(description="1 = next in line (waiting entries only)")
    offer: OfferOut | None


class WaitlistOut(BaseModel):
    event_id: int
    entries: list[WaitlistEntryOut]
