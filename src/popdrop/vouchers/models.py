from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.core.db import Base, BigId, UTCDateTime
from popdrop.core.lifecycle import status_check
from popdrop.vouchers.lifecycle import IssueJobStatus


class VoucherBatch(Base):
    __tablename__ = "voucher_batches"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    tag: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    prefix: Mapped[str] = mapped_column(String(8), default="")
    quantity: Mapped[int] = mapped_column(Integer)
    max_uses: Mapped[int] = mapped_column(Integer)
    valid_from: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    valid_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ttl_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    per_contact_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    currency: Mapped[str] = mapped_column(String(3))
    budget_minor: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    budget_spent_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_per_use_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    discount_kind: Mapped[str] = mapped_column(String(16))
    discount_value: Mapped[int] = mapped_column(BigInteger, default=0)
    discount_description: Mapped[str] = mapped_column(Text, default="")
    event_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    offer_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(200))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Voucher(Base):
    """One code. Only its keyed hash is stored; `uses` is the counter redemption bumps."""

    __tablename__ = "vouchers"
    __table_args__ = (Index("ix_vouchers_org_batch", "org_id", "batch_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    batch_id: Mapped[int] = mapped_column(ForeignKey("voucher_batches.id"))
    code_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    max_uses: Mapped[int] = mapped_column(Integer)
    valid_from: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    valid_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoke_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Redemption(Base):
    __tablename__ = "redemptions"
    __table_args__ = (Index("ix_redemptions_org_voucher", "org_id", "voucher_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    voucher_id: Mapped[int] = mapped_column(ForeignKey("vouchers.id"))
    batch_id: Mapped[int] = mapped_column(ForeignKey("voucher_batches.id"), index=True)
    contact_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    order_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    cost_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    redeemed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(200))
    rolled_back_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    rollback_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)


class VoucherContactUse(Base):
    """Per-contact use counter of a batch, bumped conditionally like `vouchers.uses`."""

    __tablename__ = "voucher_contact_uses"

    batch_id: Mapped[int] = mapped_column(ForeignKey("voucher_batches.id"), primary_key=True)
    contact_ref: Mapped[str] = mapped_column(String(200), primary_key=True)
    uses: Mapped[int] = mapped_column(Integer, default=0)


class VoucherIssueJob(Base):
    """A big batch issued in the background, a chunk of codes per transaction.

    No plaintext code is stored: code `i` of the job is derived from a MAC of (`seed`, i)
    under the secret key, so a resumed chunk makes the same codes and the CSV download
    makes them again. `seed` is wiped at the first download, when the job fails, and when
    the download window ends; after that the codes exist only as keyed hashes.
    """

    __tablename__ = "voucher_issue_jobs"
    __table_args__ = (status_check(IssueJobStatus),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("voucher_batches.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    total: Mapped[int] = mapped_column(Integer)
    issued: Mapped[int] = mapped_column(Integer, default=0)
    with_links: Mapped[bool] = mapped_column(Boolean, default=False)
    seed: Mapped[bytes | None] = mapped_column(LargeBinary(32), nullable=True)
    # Bumped by each claim: a runner whose lease was taken over stops at its next chunk.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(200))
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    downloaded_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
