"""Orders, their lines, payments, refunds, provider events, bundles, price rules, samples.

Money is integer minor units in the order's currency. An order's `breakdown` is the
pricing engine's answer as JSON, stored when the order is priced: the price the customer
saw holds for the hold's lifetime even if the host changes prices.
"""

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

from popdrop.commerce.lifecycle import (
    OrderSource,
    OrderStatus,
    PaymentMethod,
    PaymentStatus,
    RefundStatus,
)
from popdrop.core.db import Base, BigId, UTCDateTime
from popdrop.core.lifecycle import status_check


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (
        Index("ix_orders_org_event", "org_id", "event_id", "status"),
        Index("ix_orders_lane_window", "lane_id", "slot_id", "status"),
        Index("ix_orders_contact", "org_id", "contact_ref"),
        Index("ix_orders_due", "status", "price_held_until"),  # the expiry sweep
        UniqueConstraint("event_id", "short_code"),
        status_check(OrderStatus),
        status_check(PaymentMethod, "payment_method"),
        status_check(OrderSource, "source"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"))
    status: Mapped[str] = mapped_column(String(16), default=OrderStatus.PENDING)
    source: Mapped[str] = mapped_column(String(8), default=OrderSource.WEB)
    # What brought it: a conversation, a drop, a host (free text such as "chat:12").
    source_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lane_id: Mapped[int] = mapped_column(ForeignKey("lanes.id"))
    slot_id: Mapped[int | None] = mapped_column(ForeignKey("time_slots.id"), nullable=True)
    contact_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Where the receipt goes; erasable (GDPR erase blanks them).
    receipt_email: Mapped[str | None] = mapped_column(String(254), nullable=True)
    receipt_phone: Mapped[str | None] = mapped_column(String(32), nullable=True)
    currency: Mapped[str] = mapped_column(String(3))
    subtotal_minor: Mapped[int] = mapped_column(BigInteger, default=0)  # list prices
    discount_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    total_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    refunded_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    breakdown: Mapped[str] = mapped_column(Text, default="{}")
    codes: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of code labels
    # JSON list of the buyer's first and latest short-link click ids (`web.clicks`).
    click_ids: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    payment_method: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Typable pickup code (like a ticket's short code), unique per event.
    short_code: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Bumped when the pickup QR is re-issued: older QRs stop working.
    pickup_generation: Mapped[int] = mapped_column(Integer, default=1)
    price_held_until: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(200))
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    picked_up_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    picked_up_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Why it ended the way it did, machine-readable ("sold_out_after_expiry", …).
    status_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status_message: Mapped[str | None] = mapped_column(String(300), nullable=True)


class OrderLine(Base):
    __tablename__ = "order_lines"
    # A hold belongs to one order at most, even when two checkouts of it race.
    __table_args__ = (Index("ix_order_lines_order", "order_id"), UniqueConstraint("hold_id"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))
    hold_id: Mapped[int | None] = mapped_column(ForeignKey("holds.id"), nullable=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id"))
    bundle_id: Mapped[int | None] = mapped_column(ForeignKey("bundles.id"), nullable=True)
    title: Mapped[str] = mapped_column(String(300))
    qty: Mapped[int] = mapped_column(Integer)
    unit_price_minor: Mapped[int] = mapped_column(BigInteger)
    list_minor: Mapped[int] = mapped_column(BigInteger)  # qty * unit price
    discount_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    final_minor: Mapped[int] = mapped_column(BigInteger)
    unit_cost_minor: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    refunded_qty: Mapped[int] = mapped_column(Integer, default=0)


class Payment(Base):
    """One attempt to collect an order's total, at a provider or at the lane."""

    __tablename__ = "payments"
    __table_args__ = (
        Index("ix_payments_order", "order_id"),
        Index("ix_payments_payment_intent", "payment_intent"),
        UniqueConstraint("provider", "provider_ref"),
        status_check(PaymentStatus),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))
    provider: Mapped[str] = mapped_column(String(16))  # a PaymentMethod
    provider_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)  # cs_…
    # Stripe's PaymentIntent ("pi_…"): what refunds and payment_intent.* events name.
    payment_intent: Mapped[str | None] = mapped_column(String(200), nullable=True)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), default=PaymentStatus.PENDING)
    # The provider's reason code and message of the last failure (war room).
    failure_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    failure_message: Mapped[str | None] = mapped_column(String(300), nullable=True)
    tender: Mapped[str | None] = mapped_column(String(16), nullable=True)  # cash / card
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(200))


class Refund(Base):
    __tablename__ = "refunds"
    __table_args__ = (Index("ix_refunds_order", "order_id"), status_check(RefundStatus))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))
    payment_id: Mapped[int] = mapped_column(ForeignKey("payments.id"))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(64))  # requested_by_customer, sold_out, …
    note: Mapped[str] = mapped_column(String(300), default="")
    provider_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)  # re_…
    status: Mapped[str] = mapped_column(String(16), default=RefundStatus.PENDING)
    failure_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(200))


class ProviderEvent(Base):
    """A webhook event taken from a payment provider: its id is the dedupe key (providers
    retry for days, in no order)."""

    __tablename__ = "provider_events"
    __table_args__ = (UniqueConstraint("provider", "event_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(16))
    event_id: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(100))
    org_id: Mapped[int | None] = mapped_column(ForeignKey("organizations.id"), nullable=True)
    object_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    provider_created_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(64), default="")


class Bundle(Base):
    """A micro-bundle: variants sold together at the bundle's own price."""

    __tablename__ = "bundles"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    price_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class BundleComponent(Base):
    __tablename__ = "bundle_components"

    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id"), primary_key=True)
    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id"), primary_key=True)
    qty: Mapped[int] = mapped_column(Integer, default=1)


class PriceRule(Base):
    """An automatic discount of an event (`commerce.pricing` defines the kinds and the
    order they apply in). `params` is the kind's JSON settings."""

    __tablename__ = "price_rules"
    __table_args__ = (Index("ix_price_rules_event", "event_id", "active"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    params: Mapped[str] = mapped_column(Text, default="{}")
    stacking: Mapped[str] = mapped_column(String(16), default="stackable")  # or exclusive
    applies_to: Mapped[str] = mapped_column(String(16), default="discounted")  # or initial
    priority: Mapped[int] = mapped_column(Integer, default=100)
    budget_minor: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    budget_spent_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    valid_from: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    valid_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class CheckoutPolicy(Base):
    """An event's checkout settings (an event without a row takes the defaults)."""

    __tablename__ = "checkout_policies"

    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"), primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    max_codes_per_order: Mapped[int] = mapped_column(Integer, default=1)
    pay_online: Mapped[bool] = mapped_column(Boolean, default=True)
    pay_at_pickup: Mapped[bool] = mapped_column(Boolean, default=True)
    # How a stackable voucher combines with automatic discounts by default.
    code_stacking: Mapped[str] = mapped_column(String(16), default="stackable")
    code_applies_to: Mapped[str] = mapped_column(String(16), default="discounted")


class SampleGrant(Base):
    """A zero-cost sample given out: one per person per campaign, its cost allocated."""

    __tablename__ = "sample_grants"
    __table_args__ = (UniqueConstraint("product_id", "campaign", "person_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"), index=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    order_id: Mapped[int | None] = mapped_column(ForeignKey("orders.id"), nullable=True)
    campaign: Mapped[str] = mapped_column(String(100))
    # A keyed digest of the contact reference: the same person, without the PII.
    person_key: Mapped[str] = mapped_column(String(64))
    unit_cost_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    # Who pays for it: "partner:<id>", "campaign:<name>" or "budget:<name>".
    allocated_to: Mapped[str] = mapped_column(String(120))
    # Where the person came from: drop, segment, conversation (for sample → purchase).
    drop_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    segment: Mapped[str | None] = mapped_column(String(16), nullable=True)
    conversation_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    given_at: Mapped[datetime] = mapped_column(UTCDateTime)
    given_by: Mapped[str] = mapped_column(String(200))
