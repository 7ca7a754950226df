"""Inventory I/O models. Rules: a product card's variant names are trimmed, non-empty and
distinct (ignoring case), since a guest picks a variant by its name; every integer refuses
`true`/`false` (`StrictInput`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints, field_validator, model_validator

from popdrop.core.schemas import StrictInput
from popdrop.inventory.lifecycle import HoldStatus

Id = Field(ge=1, le=2**62)
# Stored in variants.name (100 characters); blanks around a name are not part of it.
VariantName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]


class ProductCreate(StrictInput):
    title: str = Field(min_length=1, max_length=200)
    highlights: str = Field(default="", max_length=2000)
    image_url: str = Field(default="", max_length=500)
    price_minor: int = Field(ge=0, le=10**12)
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")
    limit_per_contact: int | None = Field(default=None, ge=1, le=10_000)
    # What a unit costs the host and the margin floor (commerce.pricing); a sample
    # (commerce.samples) is priced 0 and needs its unit cost.
    unit_cost_minor: int | None = Field(default=None, ge=0, le=10**12)
    margin_floor_bp: int | None = Field(default=None, ge=0, le=100_000)
    margin_floor_minor: int | None = Field(default=None, ge=0, le=10**12)
    is_sample: bool = False
    variants: list[VariantName] = Field(
        default_factory=lambda: ["one size"], min_length=1, max_length=50
    )

    @field_validator("variants")
    @classmethod
    def _distinct_variants(cls, names: list[str]) -> list[str]:
        seen: set[str] = set()
        for name in names:
            if name.casefold() in seen:
                raise ValueError(f"variant {name!r} is listed twice")
            seen.add(name.casefold())
        return names

    @model_validator(mode="after")
    def _sample_is_free(self) -> ProductCreate:
        _check_sample(self.is_sample, self.price_minor, self.unit_cost_minor)
        return self


def _check_sample(is_sample: bool | None, price_minor: int | None, cost: int | None) -> None:
    if is_sample and price_minor not in (None, 0):
        raise ValueError("a sample is priced 0 (price_minor: 0)")
    if is_sample and cost is None:
        raise ValueError("a sample needs its unit_cost_minor (what it costs to give away)")


class VariantOut(BaseModel):
    id: int
    name: str
    sku: str


class ProductOut(BaseModel):
    id: int
    event_id: int
    title: str
    highlights: str
    image_url: str
    price_minor: int
    currency: str
    limit_per_contact: int | None
    unit_cost_minor: int | None = None
    margin_floor_bp: int | None = None
    margin_floor_minor: int | None = None
    is_sample: bool = False
    variants: list[VariantOut]


class StockSet(StrictInput):
    variant_id: int = Id
    lane_id: int = Id
    total: int = Field(ge=0, le=10_000_000)


class StockOut(BaseModel):
    id: int
    variant_id: int
    lane_id: int
    total: int
    sold: int
    available: int


class HoldCreate(StrictInput):
    variant_id: int = Id
    lane_id: int = Id
    qty: int = Field(default=1, ge=1, le=1000)
    slot_id: int | None = Field(default=None, ge=1, le=2**62)
    contact_ref: str | None = Field(default=None, min_length=1, max_length=200)


class HoldOut(BaseModel):
    id: int
    event_id: int
    variant_id: int
    lane_id: int
    slot_id: int | None
    qty: int
    contact_ref: str | None
    status: HoldStatus
    created_at: datetime
    expires_at: datetime
    renewals: int


class Availability(BaseModel):
    variant_id: int
    lane_id: int
    total: int
    held: int
    sold: int
    available: int


# ---------------------------------------------------------------- editing an event's parts
# Leaving a field out keeps it; null is refused (every one of these fields always has a
# value). A product's per-person limit and its variants are not editable: holds cache the
# limit per process, and variants carry stock and holds.


def _no_nulls(model: BaseModel, nullable: frozenset[str] = frozenset()) -> None:
    for name in model.model_fields_set - nullable:
        if getattr(model, name) is None:
            raise ValueError(f"{name} cannot be null (leave it out to keep it)")


class SlotUpdate(StrictInput):
    label: str | None = Field(default=None, max_length=200)
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    capacity: int | None = Field(default=None, ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _checked(self) -> SlotUpdate:
        _no_nulls(self)
        for name in ("starts_at", "ends_at"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} needs a time zone offset (e.g. Z)")
            if value is not None:
                try:
                    value.astimezone(UTC)  # how it is stored
                except OverflowError:
                    raise ValueError(f"{name} is out of range (years 1 to 9999 in UTC)") from None
        return self


class LaneUpdate(StrictInput):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    pickup_point: str | None = Field(default=None, max_length=500)

    @model_validator(mode="after")
    def _checked(self) -> LaneUpdate:
        _no_nulls(self)
        return self


class WindowUpdate(StrictInput):
    capacity: int = Field(ge=0, le=1_000_000)


class ProductUpdate(StrictInput):
    title: str | None = Field(default=None, min_length=1, max_length=200)
    highlights: str | None = Field(default=None, max_length=2000)
    image_url: str | None = Field(default=None, max_length=500)
    price_minor: int | None = Field(default=None, ge=0, le=10**12)
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    # null clears the cost or a floor; is_sample cannot be null.
    unit_cost_minor: int | None = Field(default=None, ge=0, le=10**12)
    margin_floor_bp: int | None = Field(default=None, ge=0, le=100_000)
    margin_floor_minor: int | None = Field(default=None, ge=0, le=10**12)
    is_sample: bool | None = None

    @model_validator(mode="after")
    def _checked(self) -> ProductUpdate:
        _no_nulls(self, frozenset({"unit_cost_minor", "margin_floor_bp", "margin_floor_minor"}))
        return self
