"""Request and response bodies of the partners API."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from popdrop.core.schemas import StrictInput
from popdrop.partners.lifecycle import PosProvider

_ID = r"^[A-Za-z0-9._:/#@+=-]{1,200}$"


class ConnectionCreate(StrictInput):
    partner_id: int = Field(ge=1, le=2**62)
    provider: PosProvider
    account_id: str | None = Field(default=None, pattern=_ID)
    location_id: str | None = Field(default=None, pattern=_ID)
    notification_url: str | None = Field(
        default=None,
        max_length=500,
        pattern=r"^https?://\S+$",
        description="Square: the URL exactly as registered in Square (it is signed)",
    )
    secret: str | None = Field(
        default=None,
        min_length=8,
        max_length=200,
        description="Square signature key or Shopify secret; Standard Webhooks: "
        "omit to have a whsec_ secret generated",
    )


class SecretRotate(StrictInput):
    secret: str | None = Field(default=None, min_length=8, max_length=200)


class ConnectionOut(BaseModel):
    id: int
    partner_id: int
    event_id: int
    provider: str
    account_id: str | None
    location_id: str | None
    delivery_url: str
    notification_url: str | None
    secrets: int = Field(description="how many secrets verify deliveries (2 during rotation)")
    created_at: datetime
    disabled_at: datetime | None


class ConnectionCreated(BaseModel):
    connection: ConnectionOut
    secret: str | None = Field(description="a generated secret, shown this once")


class PosLineOut(BaseModel):
    sku: str | None
    quantity: int
    unit_price_minor: int
    discount_minor: int


class PosSaleOut(BaseModel):
    id: int
    connection_id: int
    partner_id: int
    event_id: int
    provider: str
    external_id: str
    location: str | None
    occurred_at: datetime
    currency: str
    subtotal_minor: int
    discount_minor: int
    tax_minor: int
    total_minor: int
    refunded_minor: int
    status: str
    payment_methods: list[str]
    code_count: int
    lines: list[PosLineOut]


class DeliveryAck(BaseModel):
    received: bool = True
    outcome: str
    sale_id: int | None = None
