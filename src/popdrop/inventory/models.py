from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.core.db import Base, BigId, UTCDateTime
from popdrop.core.lifecycle import status_check
from popdrop.inventory.lifecycle import HoldStatus


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    highlights: Mapped[str] = mapped_column(Text, default="")
    image_url: Mapped[str] = mapped_column(String(500), default="")
    price_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    limit_per_contact: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # What one unit costs the host, and the floor prices never go under (commerce.pricing):
    # cost * (1 + floor_bp / 10,000) and cost + floor_minor, whichever is higher.
    unit_cost_minor: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    margin_floor_bp: Mapped[int | None] = mapped_column(Integer, nullable=True)
    margin_floor_minor: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # A zero-cost sample: price 0, one per person per campaign (commerce.samples).
    is_sample: Mapped[bool] = mapped_column(Boolean, default=False)


class ProductPrice(Base):
    """A product's earlier price: `price_minor` was its price until `until`, when the host
    changed it (written in the change's transaction by `inventory.parts.update_product`).
    A checkout prices each held unit at the price in effect when its hold was taken (the
    earliest row with `until` after the hold's `created_at`, else the current price), so
    a host raising a price never changes what an earlier holder pays (`commerce.orders`)."""

    __tablename__ = "product_prices"
    __table_args__ = (Index("ix_product_prices_product_until", "product_id", "until"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    price_minor: Mapped[int] = mapped_column(BigInteger)
    until: Mapped[datetime] = mapped_column(UTCDateTime)


class Variant(Base):
    __tablename__ = "variants"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    sku: Mapped[str] = mapped_column(String(100), default="")


class Stock(Base):
    """Units of a variant at a lane. `held` counts active holds; expired ones are given
    back (lazily, by the next hold on this stock) and never count in availability."""

    __tablename__ = "stock"
    __table_args__ = (UniqueConstraint("variant_id", "lane_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id"))
    lane_id: Mapped[int] = mapped_column(ForeignKey("lanes.id"))
    total: Mapped[int] = mapped_column(Integer)
    held: Mapped[int] = mapped_column(Integer, default=0)
    sold: Mapped[int] = mapped_column(Integer, default=0)


class Hold(Base):
    __tablename__ = "holds"
    __table_args__ = (
        Index("ix_holds_stock_active", "stock_id", "status", "expires_at"),
        Index("ix_holds_contact", "stock_id", "contact_ref"),
        Index("ix_holds_person", "event_id", "contact_ref"),  # limits across lanes
        status_check(HoldStatus),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"))
    stock_id: Mapped[int] = mapped_column(ForeignKey("stock.id"))
    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id"))
    lane_id: Mapped[int] = mapped_column(ForeignKey("lanes.id"))
    slot_id: Mapped[int | None] = mapped_column(ForeignKey("time_slots.id"), nullable=True)
    qty: Mapped[int] = mapped_column(Integer)
    contact_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=HoldStatus.ACTIVE)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    renewals: Mapped[int] = mapped_column(Integer, default=0)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
