"""RSVPs to time slots and the offers made to the waiting list.

One `rsvps` row per request: `confirmed` places count in the slot's `taken`; a
`waitlisted` row waits (FIFO by `created_at`, then id); an `offered` row has an open
`waitlist_offers` row whose places are held in `taken` until claimed or expired.
A person (an email, a phone number) has at most one active RSVP per slot.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.core.db import Base, BigId, UTCDateTime
from popdrop.core.lifecycle import status_check
from popdrop.rsvp.lifecycle import ACTIVE_RSVP_STATUSES, OfferStatus, RsvpStatus


def _one_per_person(point: str) -> Index:
    active = ", ".join(f"'{status}'" for status in ACTIVE_RSVP_STATUSES)
    where = text(f"status IN ({active}) AND {point} IS NOT NULL AND duplicate_of IS NULL")
    return Index(
        f"uq_rsvps_slot_{point}_active",
        "slot_id",
        point,
        unique=True,
        postgresql_where=where,
        sqlite_where=where,
    )


class Rsvp(Base):
    __tablename__ = "rsvps"
    __table_args__ = (
        Index("ix_rsvps_event_status", "event_id", "status"),
        Index("ix_rsvps_waiting", "slot_id", "status", "created_at"),
        # One active RSVP per person (email, phone) and slot, race-free (migration 0015).
        *(_one_per_person(point) for point in ("email", "phone")),
        status_check(RsvpStatus),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"))
    slot_id: Mapped[int] = mapped_column(ForeignKey("time_slots.id"))
    email: Mapped[str | None] = mapped_column(String(254), nullable=True)
    phone: Mapped[str | None] = mapped_column(String(32), nullable=True)
    places: Mapped[int] = mapped_column(Integer)
    consent_text: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    cancel_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Who made it (the actor: `public:rsvp`, `chat:<conversation id>`, an operator); an
    # offer for an RSVP made in a chat conversation also goes into that conversation.
    source: Mapped[str | None] = mapped_column(String(80), nullable=True)
    # Set by migration 0015 only, on active RSVPs made before one-per-person-and-slot:
    # the earlier RSVP of the same person and slot (kept, shown, never unique-checked).
    duplicate_of: Mapped[int | None] = mapped_column(BigId, nullable=True)


class WaitlistOffer(Base):
    """A place held for a waiting RSVP, claimable with a single-use voucher until expiry.

    The voucher's plaintext code is never stored: only the service call that makes the
    offer returns it (for the messaging that sends it).
    """

    __tablename__ = "waitlist_offers"
    __table_args__ = (
        Index("ix_waitlist_offers_due", "status", "expires_at"),
        status_check(OfferStatus),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"), index=True)
    slot_id: Mapped[int] = mapped_column(ForeignKey("time_slots.id"))
    rsvp_id: Mapped[int] = mapped_column(ForeignKey("rsvps.id"), index=True)
    voucher_id: Mapped[int] = mapped_column(ForeignKey("vouchers.id"), unique=True)
    places: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    offered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
