"""Orders API models: what checkout sends (holds, codes, how to pay) and what it gets back
(the price breakdown, the order with its lines, payments and refunds).

Money is integer minor units in the order's currency; times are UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from popdrop.commerce.lifecycle import (
    OrderSource,
    OrderStatus,
    PaymentMethod,
    PaymentStatus,
    RefundStatus,
)
from popdrop.core.schemas import StrictInput

HoldId = Annotated[int, Field(ge=1, le=2**62)]
CodeText = Annotated[str, Field(min_length=1, max_length=64)]
ClickId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")]
MAX_HOLDS_PER_ORDER = 50
MAX_CODES_PER_REQUEST = 5
Tender = Literal["cash", "card"]


class QuoteRequest(StrictInput):
    hold_ids: list[HoldId] = Field(min_length=1, max_length=MAX_HOLDS_PER_ORDER)
    codes: list[CodeText] = Field(default_factory=list, max_length=MAX_CODES_PER_REQUEST)
    contact_ref: str | None = Field(default=None, min_length=1, max_length=200)


class OrderCreate(StrictInput):
    hold_ids: list[HoldId] = Field(min_length=1, max_length=MAX_HOLDS_PER_ORDER)
    codes: list[CodeText] = Field(default_factory=list, max_length=MAX_CODES_PER_REQUEST)
    source: OrderSource = OrderSource.API
    source_ref: str | None = Field(default=None, min_length=1, max_length=200)
    contact_ref: str | None = Field(default=None, min_length=1, max_length=200)
    receipt_email: str | None = Field(
        default=None, min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$"
    )
    receipt_phone: str | None = Field(default=None, min_length=3, max_length=32)
    click_ids: list[ClickId] = Field(
        default_factory=list,
        max_length=2,
        description="The buyer's first and latest short-link click ids (`pd_click` on the "
        "landing page), first touch then last touch: the sale is attributed through them.",
    )
    expected_total_minor: int | None = Field(
        default=None,
        ge=0,
        le=10**12,
        description="The total the customer was shown (the quote's): when the price changed "
        "meanwhile the order is refused with `price_changed` (409) and the new total, so "
        "nobody pays a price they did not see.",
    )
    payment_method: PaymentMethod = Field(
        default=PaymentMethod.PAY_AT_PICKUP,
        description="`stripe`: pay online next (POST /orders/{id}/pay); `pay_at_pickup`: "
        "staff take the money at the lane, the units are kept until the pickup window ends.",
    )


class AdjustmentOut(BaseModel):
    source: Literal["bundle", "rule", "code", "floor"]
    ref: str
    name: str
    why: str
    amount_minor: int


class BreakdownLineOut(BaseModel):
    key: str
    title: str
    qty: int
    unit_price_minor: int
    list_minor: int
    adjustments: list[AdjustmentOut]
    final_minor: int


class RefusalOut(BaseModel):
    ref: str = Field(description="The code as typed (or the voucher id the engine refused)")
    reason: str
    message: str


class BreakdownOut(BaseModel):
    currency: str
    lines: list[BreakdownLineOut]
    subtotal_minor: int
    discount_minor: int
    total_minor: int
    capped_minor: int = Field(description="What the margin floor clawed back from discounts")
    applied_codes: list[str]
    refused_codes: list[RefusalOut]
    rule_spend: dict[str, int]


class LaneOut(BaseModel):
    id: int
    name: str
    pickup_point: str


class WindowOut(BaseModel):
    slot_id: int | None
    label: str
    starts_at: datetime
    ends_at: datetime


class Quote(BaseModel):
    event_id: int
    currency: str
    breakdown: BreakdownOut
    refusals: list[RefusalOut] = Field(description="Codes that do not apply, with why")
    hold_expires_at: datetime = Field(description="The price and the units are held until then")
    lane: LaneOut
    window: WindowOut
    payment_methods: list[PaymentMethod]
    max_codes: int


class OrderLineOut(BaseModel):
    id: int
    hold_id: int | None
    product_id: int
    variant_id: int
    bundle_id: int | None
    title: str
    qty: int
    unit_price_minor: int
    list_minor: int
    discount_minor: int
    final_minor: int
    refunded_qty: int


class PaymentOut(BaseModel):
    id: int
    provider: str
    provider_ref: str | None
    payment_intent: str | None
    amount_minor: int
    currency: str
    status: PaymentStatus
    failure_code: str | None
    failure_message: str | None
    tender: str | None
    created_at: datetime
    updated_at: datetime


class RefundOut(BaseModel):
    id: int
    payment_id: int
    amount_minor: int
    reason: str
    note: str
    provider_ref: str | None
    status: RefundStatus
    failure_code: str | None
    created_at: datetime


class OrderOut(BaseModel):
    id: int
    event_id: int
    status: OrderStatus
    source: OrderSource
    source_ref: str | None
    lane_id: int
    slot_id: int | None
    contact_ref: str | None
    receipt_email: str | None
    receipt_phone: str | None
    currency: str
    subtotal_minor: int
    discount_minor: int
    total_minor: int
    refunded_minor: int
    codes: list[str]
    payment_method: PaymentMethod | None
    short_code: str | None = Field(description="Typable pickup code, grouped as printed")
    price_held_until: datetime
    created_at: datetime
    paid_at: datetime | None
    ready_at: datetime | None
    picked_up_at: datetime | None
    ended_at: datetime | None
    status_reason: str | None
    status_message: str | None
    lines: list[OrderLineOut]
    payments: list[PaymentOut]
    refunds: list[RefundOut]
    breakdown: BreakdownOut


class PayStart(BaseModel):
    order_id: int
    payment_id: int
    redirect_url: str


class MarkPaidRequest(StrictInput):
    tender: Tender = "cash"


class CancelRequest(StrictInput):
    reason: str = Field(default="cancelled", min_length=1, max_length=64)


class RefundRequest(StrictInput):
    amount_minor: int | None = Field(
        default=None, ge=1, le=10**12, description="Omitted: everything not refunded yet"
    )
    reason: str = Field(default="requested_by_customer", min_length=1, max_length=64)
    note: str = Field(default="", max_length=300)


class SalesSummary(BaseModel):
    event_id: int
    currency: str | None
    paid_orders: int = Field(description="Orders paid, ready or picked up")
    revenue_minor: int = Field(description="Their totals less what was refunded")
    average_minor: int = Field(description="Average checkout value of the paid orders")
    refunded_minor: int
    units_sold: int
    by_status: dict[str, int]


class WebhookAck(BaseModel):
    received: bool
    outcome: str
