"""Drops, their content variants, the send rows (the outbox), clicks and feedback.

`send_rows` is the truth of a send: one row per (drop, contact, channel), frozen when the
drop starts. Workers claim rows with a lease (`claimed_at`); a row whose worker died is
claimed again once the lease runs out, and carries the same Message-ID and the same
per-recipient voucher, so a receiver can drop the rare duplicate.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.core.db import Base, BigId, UTCDateTime
from popdrop.core.lifecycle import status_check
from popdrop.drops.lifecycle import DropStatus, SeedStatus, SendRowStatus


class Drop(Base):
    __tablename__ = "drops"
    __table_args__ = (status_check(DropStatus), status_check(SeedStatus, "seed_status"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    event_id: Mapped[int | None] = mapped_column(ForeignKey("events.id"), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    slug: Mapped[str] = mapped_column(String(64))  # utm_campaign
    status: Mapped[str] = mapped_column(String(16), default=DropStatus.DRAFT)
    segment_id: Mapped[int | None] = mapped_column(ForeignKey("segments.id"), nullable=True)
    channels: Mapped[str] = mapped_column(String(32))  # "email sms"
    from_email: Mapped[str] = mapped_column(String(254), default="")
    from_name: Mapped[str] = mapped_column(String(200), default="")
    sms_from: Mapped[str] = mapped_column(String(32), default="")
    # Per-recipient vouchers: the batch the codes go into (made when the drop is created).
    voucher_batch_id: Mapped[int | None] = mapped_column(
        ForeignKey("voucher_batches.id"), nullable=True
    )
    seed_list: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of emails/phones
    seed_status: Mapped[str] = mapped_column(String(16), default=SeedStatus.UNTESTED)
    seed_report: Mapped[str] = mapped_column(Text, default="[]")
    ab_metric: Mapped[str] = mapped_column(String(8), default="click")
    ab_test_fraction: Mapped[float] = mapped_column(Float, default=1.0)
    ab_decide_after_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    ab_min_sample: Mapped[int] = mapped_column(Integer, default=200)
    ab_fallback: Mapped[str] = mapped_column(String(8), default="control")
    ab_decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ab_winner: Mapped[str | None] = mapped_column(String(32), nullable=True)
    ab_result: Mapped[str | None] = mapped_column(Text, nullable=True)
    frequency_cap: Mapped[int] = mapped_column(Integer, default=3)
    frequency_window_hours: Mapped[int] = mapped_column(Integer, default=24)
    quiet_start_hour: Mapped[int] = mapped_column(Integer, default=21)
    quiet_end_hour: Mapped[int] = mapped_column(Integer, default=8)
    bounce_threshold: Mapped[float] = mapped_column(Float, default=0.05)
    complaint_threshold: Mapped[float] = mapped_column(Float, default=0.003)
    scheduled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    paused_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DropVariant(Base):
    """One A/B variant's content: JSON {channel: {bucket|"default": {field: template}}}."""

    __tablename__ = "drop_variants"
    __table_args__ = (UniqueConstraint("drop_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    drop_id: Mapped[int] = mapped_column(ForeignKey("drops.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(32))
    split_percent: Mapped[int] = mapped_column(Integer, default=100)
    content: Mapped[str] = mapped_column(Text)


class SendRow(Base):
    __tablename__ = "send_rows"
    __table_args__ = (
        UniqueConstraint("drop_id", "contact_id", "channel"),
        Index("ix_send_rows_due", "drop_id", "status", "not_before"),
        Index("ix_send_rows_sent", "drop_id", "sent_at"),
        Index("ix_send_rows_contact", "contact_id", "channel", "sent_at"),  # frequency caps
        status_check(SendRowStatus),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(BigInteger)
    drop_id: Mapped[int] = mapped_column(ForeignKey("drops.id", ondelete="CASCADE"))
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id"))
    channel: Mapped[str] = mapped_column(String(8))
    variant: Mapped[str | None] = mapped_column(String(32), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=SendRowStatus.PENDING)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    message_id: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    provider_id: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    voucher_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(200), nullable=True)  # why skipped/failed
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    bounced_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    complained_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    clicked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class LinkClick(Base):
    __tablename__ = "link_clicks"
    __table_args__ = (Index("ix_link_clicks_drop", "drop_id", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(BigInteger)
    drop_id: Mapped[int] = mapped_column(ForeignKey("drops.id", ondelete="CASCADE"))
    send_row_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    url: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
