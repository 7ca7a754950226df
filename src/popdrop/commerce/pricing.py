"""The pricing engine: a pure function from a cart to a price breakdown.

    price(cart) -> Breakdown

No I/O, no database, no clock: data in, breakdown out. Money is integer minor units.
(Skeleton: list price only; bundles, codes, rules and the margin floor follow.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal


class Stacking(StrEnum):
    EXCLUSIVE = "exclusive"
    STACKABLE = "stackable"


class AppliesTo(StrEnum):
    """The base amount a discount is computed on."""

    INITIAL = "initial"
    DISCOUNTED = "discounted"


class RuleKind(StrEnum):
    MIN_QUANTITY = "min_quantity"
    MIN_VALUE = "min_value"
    BUY_X_GET_Y = "buy_x_get_y"
    CHEAPEST_FREE = "cheapest_free"


class CodeKind(StrEnum):
    """Same values as the voucher vault's discount kinds."""

    PERCENT = "percent"
    FIXED = "fixed"
    FREE_ITEM = "free_item"


@dataclass(frozen=True)
class Item:
    key: str
    product_id: int
    variant_id: int
    title: str
    qty: int
    unit_price_minor: int
    unit_cost_minor: int | None = None
    floor_bp: int | None = None
    floor_minor: int | None = None
    bundle_key: str | None = None


@dataclass(frozen=True)
class BundleUse:
    key: str
    bundle_id: int
    title: str
    price_minor: int
    item_keys: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    id: int
    name: str
    kind: RuleKind
    params: Mapping[str, int]
    stacking: Stacking = Stacking.STACKABLE
    applies_to: AppliesTo = AppliesTo.DISCOUNTED
    priority: int = 100
    budget_left_minor: int | None = None
    product_ids: frozenset[int] | None = None


@dataclass(frozen=True)
class Code:
    ref: str
    label: str
    kind: CodeKind
    value: int
    stacking: Stacking = Stacking.STACKABLE
    applies_to: AppliesTo = AppliesTo.DISCOUNTED
    priority: int = 0
    product_ids: frozenset[int] | None = None


@dataclass(frozen=True)
class Cart:
    currency: str
    items: tuple[Item, ...]
    bundles: tuple[BundleUse, ...] = ()
    rules: tuple[Rule, ...] = ()
    codes: tuple[Code, ...] = ()
    max_codes: int = 1


@dataclass(frozen=True)
class Adjustment:
    source: Literal["bundle", "rule", "code", "floor"]
    ref: str
    name: str
    why: str
    amount_minor: int


@dataclass(frozen=True)
class LineBreakdown:
    key: str
    title: str
    qty: int
    unit_price_minor: int
    list_minor: int
    adjustments: tuple[Adjustment, ...]
    final_minor: int


@dataclass(frozen=True)
class Refusal:
    ref: str
    reason: str
    message: str


@dataclass(frozen=True)
class Breakdown:
    currency: str
    lines: tuple[LineBreakdown, ...]
    subtotal_minor: int
    discount_minor: int
    total_minor: int
    capped_minor: int
    applied_codes: tuple[str, ...]
    refused_codes: tuple[Refusal, ...]
    rule_spend: Mapping[int, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "currency": self.currency,
            "lines": [
                {
                    "key": line.key,
                    "title": line.title,
                    "qty": line.qty,
                    "unit_price_minor": line.unit_price_minor,
                    "list_minor": line.list_minor,
                    "adjustments": [
                        {
                            "source": a.source,
                            "ref": a.ref,
                            "name": a.name,
                            "why": a.why,
                            "amount_minor": a.amount_minor,
                        }
                        for a in line.adjustments
                    ],
                    "final_minor": line.final_minor,
                }
                for line in self.lines
            ],
            "subtotal_minor": self.subtotal_minor,
            "discount_minor": self.discount_minor,
            "total_minor": self.total_minor,
            "capped_minor": self.capped_minor,
            "applied_codes": list(self.applied_codes),
            "refused_codes": [
                {"ref": r.ref, "reason": r.reason, "message": r.message} for r in self.refused_codes
            ],
            # JSON object keys are strings; from_json turns them back into rule ids.
            "rule_spend": {
                str(rule_id): spent for rule_id, spent in sorted(self.rule_spend.items())
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Breakdown:
        return cls(
            currency=str(data["currency"]),
            lines=tuple(
                LineBreakdown(
                    key=str(line["key"]),
                    title=str(line["title"]),
                    qty=int(line["qty"]),
                    unit_price_minor=int(line["unit_price_minor"]),
                    list_minor=int(line["list_minor"]),
                    adjustments=tuple(
                        Adjustment(
                            source=a["source"],
                            ref=str(a["ref"]),
                            name=str(a["name"]),
                            why=str(a["why"]),
                            amount_minor=int(a["amount_minor"]),
                        )
                        for a in line["adjustments"]
                    ),
                    final_minor=int(line["final_minor"]),
                )
                for line in data["lines"]
            ),
            subtotal_minor=int(data["subtotal_minor"]),
            discount_minor=int(data["discount_minor"]),
            total_minor=int(data["total_minor"]),
            capped_minor=int(data["capped_minor"]),
            applied_codes=tuple(str(ref) for ref in data["applied_codes"]),
            refused_codes=tuple(
                Refusal(ref=str(r["ref"]), reason=str(r["reason"]), message=str(r["message"]))
                for r in data["refused_codes"]
            ),
            rule_spend={int(k): int(v) for k, v in dict(data["rule_spend"]).items()},
        )


def price(cart: Cart) -> Breakdown:
    """Price a cart (skeleton: list price only)."""
    lines = tuple(
        LineBreakdown(
            key=item.key,
            title=item.title,
            qty=item.qty,
            unit_price_minor=item.unit_price_minor,
            list_minor=item.qty * item.unit_price_minor,
            adjustments=(),
            final_minor=item.qty * item.unit_price_minor,
        )
        for item in cart.items
    )
    subtotal = sum(line.list_minor for line in lines)
    return Breakdown(
        currency=cart.currency,
        lines=lines,
        subtotal_minor=subtotal,
        discount_minor=0,
        total_minor=subtotal,
        capped_minor=0,
        applied_codes=(),
        refused_codes=(),
        rule_spend={},
    )
