"""Contacts, their consent ledger, the suppression list, activity, segments, import jobs.

Minimal PII: an email and/or an E.164 phone, a first name, locale, time zone and rough
coordinates. Both contact points are also stored as keyed hashes (`core.identity`), which
is what dedupe, opt-outs and the suppression list compare, so an erased contact (PII set
to NULL) is still recognised when a later import brings the same address back.

The current consent per channel is kept on the contact (`consent_email` …: `none`,
`pending`, `granted`, `revoked`) so segments filter on a column; `consent_events` is the
append-only ledger behind it (time, source, the exact wording, proof).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.audience.lifecycle import ConsentState, ImportJobStatus
from popdrop.core.db import Base, BigId, UTCDateTime
from popdrop.core.lifecycle import status_check


class Contact(Base):
    __tablename__ = "contacts"
    __table_args__ = (
        UniqueConstraint("org_id", "email_hash"),
        UniqueConstraint("org_id", "phone_hash"),
        Index("ix_contacts_org_engaged", "org_id", "last_engaged_at"),
        status_check(ConsentState, "consent_email"),
        status_check(ConsentState, "consent_sms"),
        status_check(ConsentState, "consent_chat"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    email: Mapped[str | None] = mapped_column(String(254), nullable=True)
    phone: Mapped[str | None] = mapped_column(String(32), nullable=True)
    email_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32), nullable=True)
    phone_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32), nullable=True)
    first_name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    locale: Mapped[str | None] = mapped_column(String(16), nullable=True)
    time_zone: Mapped[str | None] = mapped_column(String(64), nullable=True)
    source: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lat: Mapped[float | None] = mapped_column(Float, nullable=True)
    lon: Mapped[float | None] = mapped_column(Float, nullable=True)
    consent_email: Mapped[str] = mapped_column(String(8), default=ConsentState.NONE)
    consent_sms: Mapped[str] = mapped_column(String(8), default=ConsentState.NONE)
    consent_chat: Mapped[str] = mapped_column(String(8), default=ConsentState.NONE)
    # Preferences: topics are interests the person chose; frequency caps what they get.
    frequency: Mapped[str] = mapped_column(String(8), default="all")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_engaged_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ContactLabel(Base):
    """A tag (operator's) or an interest (topic) of a contact."""

    __tablename__ = "contact_labels"
    __table_args__ = (Index("ix_contact_labels_lookup", "org_id", "kind", "value", "contact_id"),)

    contact_id: Mapped[int] = mapped_column(
        ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # tag, interest
    value: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[int] = mapped_column(BigInteger)


class ConsentEvent(Base):
    """One grant, request (double opt-in pending) or revoke, as it happened. Never edited."""

    __tablename__ = "consent_events"
    __table_args__ = (Index("ix_consent_events_contact", "contact_id", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id"))
    channel: Mapped[str] = mapped_column(String(8))
    action: Mapped[str] = mapped_column(String(8))  # grant, request, revoke
    # form, chat_keyword, sms_keyword, import, double_opt_in, unsubscribe, preferences,
    # operator, api, complaint, bounce, erase
    source: Mapped[str] = mapped_column(String(16))
    wording: Mapped[str] = mapped_column(Text, default="")
    proof: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class Suppression(Base):
    """A keyed hash of an opted-out, bounced or erased identifier: never re-subscribed by an
    import. `channel` is the channel it is suppressed on, or `all` (erased)."""

    __tablename__ = "suppressions"

    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    identifier_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    channel: Mapped[str] = mapped_column(String(8), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # email, phone
    reason: Mapped[str] = mapped_column(String(16))  # opt_out, erased, bounce, complaint
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ContactActivity(Base):
    """What makes a contact engaged: a click, a chat, an RSVP, a visit, a purchase."""

    __tablename__ = "contact_activity"
    __table_args__ = (
        Index("ix_contact_activity_contact", "contact_id", "at"),
        Index("ix_contact_activity_event", "org_id", "kind", "event_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # click, chat, rsvp, visit, purchase
    event_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class AudienceSettings(Base):
    """Per-organization audience rules: recency buckets, HELP text, retention."""

    __tablename__ = "audience_settings"

    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    hot_days: Mapped[int] = mapped_column(Integer, default=7)
    warm_days: Mapped[int] = mapped_column(Integer, default=60)
    help_text: Mapped[str] = mapped_column(Text, default="")
    retention_months: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Segment(Base):
    """Saved rules (JSON of `schemas.SegmentRules`), evaluated when used."""

    __tablename__ = "segments"
    __table_args__ = (UniqueConstraint("org_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    rules: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ImportJob(Base):
    """A CSV import running in the background: progress and the row-level report."""

    __tablename__ = "contact_import_jobs"
    __table_args__ = (status_check(ImportJobStatus),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    filename: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    total_rows: Mapped[int] = mapped_column(Integer, default=0)
    processed_rows: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    refused: Mapped[int] = mapped_column(Integer, default=0)
    report: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of refusals
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The uploaded CSV while the job is pending; cleared when it ends (it holds PII).
    payload: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
