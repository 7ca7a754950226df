from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.checkin.lifecycle import TicketStatus
from popdrop.core.db import Base, BigId, UTCDateTime
from popdrop.core.lifecycle import status_check


class EventKey(Base):
    """The Ed25519 keypair that signs an event's ticket secrets, made on first use.

    The private key is stored sealed (`core.sealing`: AES under a key derived from the
    app's secret key, Fernet): whoever reads only the database cannot mint tickets.
    Migration 0014 sealed the raw keys stored before it; `popdrop checkin rotate-keys`
    seals them again under a new secret key.
    """

    __tablename__ = "checkin_event_keys"

    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"), primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    private_key: Mapped[bytes] = mapped_column(LargeBinary)  # a Fernet token
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Ticket(Base):
    """A QR ticket for a subject of another domain (an RSVP, a hold) or a manual one.

    `subject_id` has no foreign key on purpose: any domain can point a ticket at its rows.
    `generation` counts re-issues; only the secret of the current generation works.
    `checked_in_at` is set once, by one conditional UPDATE (`… WHERE checked_in_at IS NULL`).
    `short_code` is the typable code of the current secret (`tickets.short_code`), unique
    per event; NULL only for the rare old ticket whose code collided when 0014 backfilled.
    """

    __tablename__ = "tickets"
    __table_args__ = (
        Index("ix_tickets_org_event", "org_id", "event_id", "status"),
        Index("ix_tickets_subject", "org_id", "subject_kind", "subject_id"),
        # One valid ticket per subject and event, even when two issues race.
        Index(
            "uq_tickets_valid_subject",
            "org_id",
            "event_id",
            "subject_kind",
            "subject_id",
            unique=True,
            postgresql_where=text(f"status = '{TicketStatus.VALID}'"),
            sqlite_where=text(f"status = '{TicketStatus.VALID}'"),
        ),
        Index("uq_tickets_event_short_code", "event_id", "short_code", unique=True),
        status_check(TicketStatus),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"))
    short_code: Mapped[str | None] = mapped_column(String(9), nullable=True)
    subject_kind: Mapped[str] = mapped_column(String(16))  # rsvp, hold, manual
    subject_id: Mapped[int] = mapped_column(BigInteger)
    holder_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=TicketStatus.VALID)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    issued_epoch: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    checked_in_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    checked_in_gate: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Scan(Base):
    """Every scan, failed ones too; (org, nonce) is unique so a retry gets the same answer."""

    __tablename__ = "checkin_scans"
    __table_args__ = (
        UniqueConstraint("org_id", "nonce"),
        Index("ix_checkin_scans_ticket", "ticket_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    nonce: Mapped[str] = mapped_column(String(64))
    secret_digest: Mapped[bytes] = mapped_column(LargeBinary(16))
    event_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    ticket_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result: Mapped[str] = mapped_column(String(32))
    status_code: Mapped[int] = mapped_column(Integer)
    answer: Mapped[str] = mapped_column(Text)
    gate: Mapped[str | None] = mapped_column(String(64), nullable=True)
    offline: Mapped[bool] = mapped_column(Boolean, default=False)
    scanned_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(200))


class Visit(Base):
    """A tracked visit: what a successful check-in turns an RSVP or a reservation into."""

    __tablename__ = "visits"
    __table_args__ = (
        UniqueConstraint("ticket_id"),
        Index("ix_visits_org_event", "org_id", "event_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"))
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"))
    subject_kind: Mapped[str] = mapped_column(String(16))
    subject_id: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    gate: Mapped[str | None] = mapped_column(String(64), nullable=True)
