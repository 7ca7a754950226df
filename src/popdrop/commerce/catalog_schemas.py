"""Catalog I/O models: bundles, price rules, an event's checkout policy and samples.

Rules: every integer refuses `true`/`false` (`StrictInput`); money is integer minor
units; a bundle's components name distinct variants; a rule's `params` are checked
against its kind by `commerce.catalog.check_rule` (the kinds are `commerce.pricing`'s).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import (
    BaseModel,
    Field,
    StrictInt,
    StringConstraints,
    field_validator,
    model_validator,
)

from popdrop.commerce.pricing import AppliesTo, RuleKind, Stacking
from popdrop.core.schemas import StrictInput
from popdrop.inventory.schemas import HoldOut

Id = Field(ge=1, le=2**62)
Money = Field(ge=0, le=10**12)
ParamName = Annotated[str, StringConstraints(min_length=1, max_length=40)]
ProductId = Annotated[StrictInt, Field(ge=1, le=2**62)]
# "partner:<id>", "campaign:<name>" or "budget:<name>" (who pays for a sample).
ALLOCATION_PATTERN = (
    r"^(partner:[1-9][0-9]{0,17}|campaign:[^\s:][^:]{0,99}|budget:[^\s:][^:]{0,99})$"
)


def _no_nulls(model: BaseModel) -> None:
    for name in model.model_fields_set:
        if getattr(model, name) is None and name not in _NULLABLE:
            raise ValueError(f"{name} cannot be null (leave it out to keep it)")


# Fields of a rule update that may be set to null (no budget, no start, no end).
_NULLABLE = frozenset({"budget_minor", "valid_from", "valid_until", "product_ids"})


def _aware(value: datetime | None, name: str) -> None:
    if value is None:
        return
    if value.tzinfo is None:
        raise ValueError(f"{name} needs a time zone offset (e.g. Z)")
    try:
        value.astimezone(UTC)  # how it is stored
    except OverflowError:
        raise ValueError(f"{name} is out of range (years 1 to 9999 in UTC)") from None


# ---------------------------------------------------------------- bundles


class ComponentIn(StrictInput):
    variant_id: int = Id
    qty: int = Field(default=1, ge=1, le=100)


class BundleCreate(StrictInput):
    title: str = Field(min_length=1, max_length=200)
    price_minor: int = Money
    components: list[ComponentIn] = Field(min_length=1, max_length=20)

    @field_validator("components")
    @classmethod
    def _distinct(cls, components: list[ComponentIn]) -> list[ComponentIn]:
        seen = set()
        for component in components:
            if component.variant_id in seen:
                raise ValueError(
                    f"variant {component.variant_id} is listed twice; give it a qty instead"
                )
            seen.add(component.variant_id)
        return components


class ComponentOut(BaseModel):
    variant_id: int
    product_id: int
    title: str  # product title and variant name
    qty: int
    unit_price_minor: int  # the product's list price now


class BundleOut(BaseModel):
    id: int
    event_id: int
    title: str
    price_minor: int
    currency: str
    active: bool
    components: list[ComponentOut]
    list_minor: int  # what the components cost bought one by one (list prices now)


class BundleHoldCreate(StrictInput):
    """Hold every component of a bundle at one lane (all or none)."""

    lane_id: int = Id
    slot_id: int | None = Field(default=None, ge=1, le=2**62)
    contact_ref: str | None = Field(default=None, min_length=1, max_length=200)


class BundleHolds(BaseModel):
    bundle_id: int
    holds: list[HoldOut]  # one per component, in variant order


# ---------------------------------------------------------------- price rules


class RuleFields(StrictInput):
    stacking: Stacking = Stacking.STACKABLE
    applies_to: AppliesTo = AppliesTo.DISCOUNTED
    priority: int = Field(default=100, ge=0, le=10_000)
    budget_minor: int | None = Field(default=None, ge=0, le=10**12)
    valid_from: datetime | None = None
    valid_until: datetime | None = None


class PriceRuleCreate(RuleFields):
    name: str = Field(min_length=1, max_length=200)
    kind: RuleKind
    params: dict[ParamName, StrictInt] = Field(default_factory=dict, max_length=10)
    # The products the rule counts (of its event); left out: every product.
    product_ids: list[ProductId] | None = Field(default=None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _checked(self) -> PriceRuleCreate:
        _aware(self.valid_from, "valid_from")
        _aware(self.valid_until, "valid_until")
        return self


class PriceRuleUpdate(StrictInput):
    """Leaving a field out keeps it; `budget_minor`, `valid_from`, `valid_until` and
    `product_ids` may be set to null (none; every product). A new `kind` needs its
    `params` in the same request."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    kind: RuleKind | None = None
    params: dict[ParamName, StrictInt] | None = Field(default=None, max_length=10)
    product_ids: list[ProductId] | None = Field(default=None, min_length=1, max_length=200)
    stacking: Stacking | None = None
    applies_to: AppliesTo | None = None
    priority: int | None = Field(default=None, ge=0, le=10_000)
    budget_minor: int | None = Field(default=None, ge=0, le=10**12)
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    active: bool | None = None

    @model_validator(mode="after")
    def _checked(self) -> PriceRuleUpdate:
        _no_nulls(self)
        if "kind" in self.model_fields_set and "params" not in self.model_fields_set:
            raise ValueError("a new kind needs its params in the same request")
        _aware(self.valid_from, "valid_from")
        _aware(self.valid_until, "valid_until")
        return self


class PriceRuleOut(BaseModel):
    id: int
    event_id: int
    name: str
    kind: RuleKind
    params: dict[str, int]
    product_ids: list[int] | None
    stacking: Stacking
    applies_to: AppliesTo
    priority: int
    budget_minor: int | None
    budget_spent_minor: int
    valid_from: datetime | None
    valid_until: datetime | None
    active: bool


# ---------------------------------------------------------------- checkout policy


class CheckoutPolicyIn(StrictInput):
    """The whole policy (PUT): a field left out takes its default."""

    max_codes_per_order: int = Field(default=1, ge=0, le=10)
    pay_online: bool = True
    pay_at_pickup: bool = True
    code_stacking: Stacking = Stacking.STACKABLE
    code_applies_to: AppliesTo = AppliesTo.DISCOUNTED

    @model_validator(mode="after")
    def _some_way_to_pay(self) -> CheckoutPolicyIn:
        if not (self.pay_online or self.pay_at_pickup):
            raise ValueError("allow at least one way to pay (pay_online or pay_at_pickup)")
        return self


class CheckoutPolicyOut(BaseModel):
    event_id: int
    max_codes_per_order: int
    pay_online: bool
    pay_at_pickup: bool
    code_stacking: Stacking
    code_applies_to: AppliesTo


# ---------------------------------------------------------------- samples


class SampleGive(StrictInput):
    product_id: int = Id
    lane_id: int = Id
    campaign: str = Field(min_length=1, max_length=100)
    contact_ref: str = Field(min_length=1, max_length=200)
    allocated_to: str = Field(pattern=ALLOCATION_PATTERN, max_length=120)
    drop_id: int | None = Field(default=None, ge=1, le=2**62)
    segment: str | None = Field(default=None, min_length=1, max_length=16)
    conversation_id: int | None = Field(default=None, ge=1, le=2**62)


class SampleOut(BaseModel):
    id: int
    event_id: int
    product_id: int
    campaign: str
    unit_cost_minor: int
    currency: str
    allocated_to: str
    drop_id: int | None
    segment: str | None
    conversation_id: int | None
    given_at: datetime
    given_by: str


class AllocationCost(BaseModel):
    allocated_to: str
    currency: str
    samples: int
    cost_minor: int
    # Samples whose person placed a paid order at this event after getting it.
    bought_later: int = 0


class SampleCosts(BaseModel):
    event_id: int
    samples: int
    allocations: list[AllocationCost]
    recent: list[SampleOut]
