"""Tables of the partners domain: a partner's till connections, the deliveries they
made, and the sales (and refunds) they reported under `pos.sale.v1`.

Only the contract's fields are columns; nothing else a till sends has a place to go.
Webhook secrets are sealed at rest (`core.sealing`), a customer reference is a keyed hash,
and codes seen at the till are handed to attribution, not kept here.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.core.db import Base, BigId, UTCDateTime
from popdrop.core.lifecycle import status_check
from popdrop.partners.lifecycle import PosProvider, PosSaleStatus


class PosConnection(Base):
    """One till (a Square location, a Shopify shop, any Standard Webhooks sender) of one
    partner of one event: where its deliveries go and the secrets they are signed with."""

    __tablename__ = "pos_connections"
    __table_args__ = (status_check(PosProvider, "provider"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    partner_id: Mapped[int] = mapped_column(ForeignKey("partners.id"), index=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"))
    provider: Mapped[str] = mapped_column(String(16))
    account_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    location_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Fernet token of a JSON list of secrets, newest first (more than one during rotation).
    secrets_sealed: Mapped[bytes] = mapped_column(LargeBinary)
    # Square signs over the URL it posts to; it is stored exactly as registered there.
    notification_url: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class PosEvent(Base):
    """One delivery applied (or ignored) once: the provider's event id per connection."""

    __tablename__ = "pos_events"
    __table_args__ = (UniqueConstraint("connection_id", "provider_event_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    connection_id: Mapped[int] = mapped_column(ForeignKey("pos_connections.id"))
    provider_event_id: Mapped[str] = mapped_column(String(200))
    topic: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PosSale(Base):
    __tablename__ = "pos_sales"
    __table_args__ = (
        UniqueConstraint("connection_id", "external_id"),
        Index("ix_pos_sales_org_partner", "org_id", "partner_id", "id"),
        status_check(PosSaleStatus),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    connection_id: Mapped[int] = mapped_column(ForeignKey("pos_connections.id"))
    partner_id: Mapped[int] = mapped_column(ForeignKey("partners.id"))
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"))
    provider: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(200))
    account: Mapped[str | None] = mapped_column(String(200), nullable=True)
    location: Mapped[str | None] = mapped_column(String(200), nullable=True)
    device: Mapped[str | None] = mapped_column(String(200), nullable=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    currency: Mapped[str] = mapped_column(String(3))
    subtotal_minor: Mapped[int] = mapped_column(BigInteger)
    discount_minor: Mapped[int] = mapped_column(BigInteger)
    tax_minor: Mapped[int] = mapped_column(BigInteger)
    total_minor: Mapped[int] = mapped_column(BigInteger)
    refunded_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    # Comma-separated `PaymentMethodType` values (types only).
    payment_methods: Mapped[str] = mapped_column(String(100), default="")
    code_count: Mapped[int] = mapped_column(Integer, default=0)
    # HMAC-SHA256 (hex) of the till's customer id under a key derived from the secret key.
    customer_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(24), default=PosSaleStatus.ACTIVE)


class PosSaleLine(Base):
    __tablename__ = "pos_sale_lines"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    sale_id: Mapped[int] = mapped_column(ForeignKey("pos_sales.id"), index=True)
    sku: Mapped[str | None] = mapped_column(String(64), nullable=True)
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price_minor: Mapped[int] = mapped_column(BigInteger)
    discount_minor: Mapped[int] = mapped_column(BigInteger)


class PosRefund(Base):
    """A refund reported by a till. `sale_id` is null while its sale has not arrived yet
    (out of order); it is linked and applied when the sale comes."""

    __tablename__ = "pos_refunds"
    __table_args__ = (
        UniqueConstraint("connection_id", "external_id"),
        Index("ix_pos_refunds_waiting", "connection_id", "refunds_external_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    connection_id: Mapped[int] = mapped_column(ForeignKey("pos_connections.id"))
    external_id: Mapped[str] = mapped_column(String(200))
    refunds_external_id: Mapped[str] = mapped_column(String(200))
    sale_id: Mapped[int | None] = mapped_column(ForeignKey("pos_sales.id"), nullable=True)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    applied_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
