"""`pos.sale.v1`: the one minimal contract every till's sale (or refund) is read into.

Every adapter (Square, Shopify, the Standard Webhooks endpoint) turns its provider's
payload into a `PosSaleV1`; nothing else about a sale is ever kept. Rules:
- Unknown fields are dropped on ingest (`extra="ignore"`): a till that sends a customer's
  name, email or address next to the contract's fields has them discarded before any
  write or log.
- Money is integer minor units in `currency` (ISO 4217); lines carry SKU, quantity, unit
  price and discount only (no product names: a free-text name is where PII hides).
- Payment methods are types only (`card`, `cash`, …), never card numbers.
- `customer_ref` (a till's customer id) is read to be hashed with a key derived from the
  app's secret key (`partners.service.customer_hash`); its plaintext is never stored.
- `event_id` is the delivery's dedupe key: one event id is applied once per connection.

`docs/pos.sale.v1.schema.json` is `pos_sale_json_schema()`, kept equal by a test.
Pure: no I/O.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

CONTRACT: Literal["pos.sale.v1"] = "pos.sale.v1"
# An id from a provider (event, sale, location…): printable, no spaces, bounded.
ID_PATTERN = r"^[A-Za-z0-9._:/#@+=-]{1,200}$"
_ID = ID_PATTERN
_MINOR = Field(ge=0, le=10**12)


class PaymentMethodType(StrEnum):
    CARD = "card"
    CASH = "cash"
    WALLET = "wallet"
    GIFT_CARD = "gift_card"
    BANK = "bank"
    OTHER = "other"


class _Contract(BaseModel):
    # Unknown fields are dropped, never stored; the contract's own fields are immutable.
    model_config = ConfigDict(extra="ignore", frozen=True)


class PosSource(_Contract):
    provider: str = Field(pattern=r"^[a-z0-9_-]{1,32}$", description="square, shopify, …")
    account: str | None = Field(default=None, pattern=_ID, description="merchant / shop id")
    location: str | None = Field(default=None, pattern=_ID)
    device: str | None = Field(default=None, pattern=_ID)


class PosLine(_Contract):
    sku: str | None = Field(default=None, pattern=r"^[^\x00-\x1f\x7f]{1,64}$")
    quantity: int = Field(ge=1, le=100_000)
    unit_price_minor: int = _MINOR
    discount_minor: int = Field(default=0, ge=0, le=10**12, description="whole line")


class PosTotals(_Contract):
    subtotal_minor: int = _MINOR
    discount_minor: int = Field(default=0, ge=0, le=10**12)
    tax_minor: int = Field(default=0, ge=0, le=10**12)
    total_minor: int = _MINOR


class PosSaleV1(_Contract):
    contract: Literal["pos.sale.v1"] = CONTRACT
    source: PosSource
    external_id: str = Field(pattern=_ID, description="the sale's (or refund's) id at the till")
    event_id: str = Field(pattern=_ID, description="dedupe key: applied once per connection")
    kind: Literal["sale", "refund"] = "sale"
    refunds: str | None = Field(
        default=None, pattern=_ID, description="for a refund: the external id it refunds"
    )
    occurred_at: AwareDatetime = Field(description="the till's time (RFC 3339, with offset)")
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    lines: list[PosLine] = Field(default_factory=list, max_length=500)
    totals: PosTotals
    payment_methods: list[PaymentMethodType] = Field(default_factory=list, max_length=10)
    codes: list[str] = Field(
        default_factory=list,
        max_length=20,
        description="promo / voucher codes seen at the till",
    )
    customer_ref: str | None = Field(
        default=None,
        max_length=200,
        description="the till's customer id; kept only as a keyed hash",
    )

    @model_validator(mode="after")
    def _refund_names_its_sale(self) -> PosSaleV1:
        if self.kind == "refund" and not self.refunds:
            raise ValueError("a refund names the external id it refunds (`refunds`)")
        if self.kind == "sale" and self.refunds:
            raise ValueError("`refunds` is for refunds only")
        for code in self.codes:
            if not 1 <= len(code) <= 64 or not code.isprintable() or code.strip() != code:
                raise ValueError("a code is 1-64 printable characters")
        return self


def pos_sale_json_schema() -> dict[str, Any]:
    """The JSON Schema of `pos.sale.v1` (what docs/pos.sale.v1.schema.json holds)."""
    schema = PosSaleV1.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://popdrop.dev/schemas/pos.sale.v1.schema.json",
        **schema,
        "title": "pos.sale.v1",
        # A refund names the external id of the sale it refunds.
        "allOf": [
            {
                "if": {"properties": {"kind": {"const": "refund"}}, "required": ["kind"]},
                "then": {"required": ["refunds"]},
            }
        ],
    }


def pos_sale_json_schema_text() -> str:
    return json.dumps(pos_sale_json_schema(), indent=2, sort_keys=True) + "\n"
