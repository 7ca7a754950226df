"""The pricing engine: a pure function from a cart to a price breakdown.

    price(cart) -> Breakdown

No I/O, no database, no clock: data in, breakdown out (like the chat engine). Money is
integer minor units in the cart's currency. docs/pricing.md has worked examples.

The order (pretix's, with the voucher before the automatic discounts):
1. **List price**: qty * unit price per line.
2. **Bundles**: the items of a `BundleUse` sell together at its price, split across them
   by list value (largest remainder). The result is each unit's *initial* amount, the base
   of `AppliesTo.INITIAL`. Bundles are prices, not discounts: the floor never undoes them.
3. **Codes** in (priority, entry) order. An exclusive code that takes something off is the
   only code (the others: `not_combinable`) and no automatic rule touches its lines. At most
   `max_codes` codes apply (`too_many_codes`); `no_matching_items`, `no_effect`,
   `duplicate_code` are the other refusals. Percent: whole percent of the scope's base,
   half up; fixed: minor units spread by base; free item: the cheapest paying unit.
4. **Automatic rules** in (priority, id) order. Each unit (one piece of a line) is used by
   at most one rule; units inside a bundle and units already at 0 take no part. An
   exclusive rule stays off lines a code touched. A rule never spends more than
   `budget_left_minor`: the units come in order (lines in cart order; the cheapest free
   unit first) and the one where the budget runs out gets the rest.
5. **Margin floor** per line: discounts never take it under unit floor * qty (or under
   the host's own price, if that is lower); what comes back is an adjustment with
   source "floor", name "discount_capped", counted in `capped_minor` and taken off
   `rule_spend` (latest discount first).

Every discount is capped at what is left of the unit, so nothing goes negative (100 % +
15 % is 0; Vendure #2385). Amounts are split with largest remainder, so the line finals
sum exactly to the total. Ties sort by item key: the same cart gives the same breakdown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Literal

from popdrop.core.errors import PopdropError
from popdrop.core.money import Money


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
    """One bundle instance: its items (with their qty) sell at `price_minor` together."""

    key: str
    bundle_id: int
    title: str
    price_minor: int
    item_keys: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    """An automatic discount. `params` by kind (integers):

    - min_quantity: "min_qty" units, and "percent" (whole %) or "amount_minor" (once,
      spread over the matching units);
    - min_value: "min_value_minor" (matching units' amount so far), "percent" or "amount_minor";
    - buy_x_get_y: "buy", "get", optional "percent" (default 100): per complete group of
      buy + get matching units, the cheapest `get` units are discounted;
    - cheapest_free: "every", "free": per complete group of `every` units the cheapest
      `free` are free.
    `product_ids` None = every product. `budget_left_minor` None = no budget.
    """

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
    """A voucher entered at checkout: percent `value` = whole percent (15 = 15 %), fixed =
    minor units, free_item = the cheapest matching unit is free (`value` unused)."""

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
    """What one source took off one line (floor: negative, given back, "discount_capped")."""

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
    """A code not applied: reason too_many_codes, not_combinable, no_matching_items,
    no_effect or duplicate_code."""

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


MAX_UNITS_PER_LINE = 10_000  # a line is priced unit by unit; a bigger line is a typo or an attack


def price(cart: Cart) -> Breakdown:
    """Price `cart`: list → bundles → codes → automatic rules → margin floor.

    Raises `PopdropError("invalid_request")` for a malformed cart (duplicate keys, a bundle
    naming an unknown item, rule params that do not fit the kind…); a code that does not
    apply is never an error, it is a `Refusal` in the breakdown.
    """
    _check_cart(cart)
    state = _State(cart)
    state.apply_bundles()
    state.apply_codes()
    state.apply_rules()
    state.apply_floor()
    return state.breakdown()


# --- validation -------------------------------------------------------------------------


def _bad(message: str) -> PopdropError:
    return PopdropError("invalid_request", message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_rule(rule: Rule) -> None:
    """Refuse params that do not fit the rule's kind (the docstring of `Rule` lists them)."""
    params = dict(rule.params)
    if not all(_is_int(v) for v in params.values()):
        raise _bad(f"rule {rule.name!r}: params are integers")
    if rule.kind in (RuleKind.MIN_QUANTITY, RuleKind.MIN_VALUE):
        threshold = "min_qty" if rule.kind is RuleKind.MIN_QUANTITY else "min_value_minor"
        allowed = {threshold, "percent", "amount_minor"}
        if threshold not in params or params[threshold] < 1:
            raise _bad(f"rule {rule.name!r}: {threshold} must be at least 1")
        if ("percent" in params) == ("amount_minor" in params):
            raise _bad(f"rule {rule.name!r}: give either percent or amount_minor")
        if "percent" in params and not 1 <= params["percent"] <= 100:
            raise _bad(f"rule {rule.name!r}: percent is between 1 and 100")
        if "amount_minor" in params and params["amount_minor"] < 1:
            raise _bad(f"rule {rule.name!r}: amount_minor must be positive")
    elif rule.kind is RuleKind.BUY_X_GET_Y:
        allowed = {"buy", "get", "percent"}
        if params.get("buy", 0) < 1 or params.get("get", 0) < 1:
            raise _bad(f"rule {rule.name!r}: buy and get must be at least 1")
        if not 1 <= params.get("percent", 100) <= 100:
            raise _bad(f"rule {rule.name!r}: percent is between 1 and 100")
    else:
        allowed = {"every", "free"}
        every, free = params.get("every", 0), params.get("free", 0)
        if free < 1 or every <= free:
            raise _bad(f"rule {rule.name!r}: free must be at least 1 and below every")
    if unknown := set(params) - allowed:
        raise _bad(f"rule {rule.name!r}: unknown params {sorted(unknown)}")
    if rule.budget_left_minor is not None and not _is_int(rule.budget_left_minor):
        raise _bad(f"rule {rule.name!r}: budget_left_minor is an integer")


def check_code(code: Code) -> None:
    """Refuse a code whose value does not fit its kind (percent 1 to 100, fixed ≥ 1 minor unit)."""
    if not _is_int(code.value):
        raise _bad(f"code {code.label!r}: value is an integer")
    if code.kind is CodeKind.PERCENT and not 1 <= code.value <= 100:
        raise _bad(f"code {code.label!r}: percent is between 1 and 100")
    if code.kind is CodeKind.FIXED and code.value < 1:
        raise _bad(f"code {code.label!r}: a fixed amount must be positive")


def _check_cart(cart: Cart) -> None:
    Money(0, cart.currency)  # refuses a currency that is not ISO 4217
    keys = [item.key for item in cart.items]
    if len(set(keys)) != len(keys):
        raise _bad("item keys must be unique")
    for item in cart.items:
        if not _is_int(item.qty) or not 1 <= item.qty <= MAX_UNITS_PER_LINE:
            raise _bad(f"item {item.key!r}: quantity must be 1 to {MAX_UNITS_PER_LINE}")
        if not _is_int(item.unit_price_minor) or item.unit_price_minor < 0:
            raise _bad(f"item {item.key!r}: the price is a non-negative integer")
        for name in ("unit_cost_minor", "floor_bp", "floor_minor"):
            value = getattr(item, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise _bad(f"item {item.key!r}: {name} is a non-negative integer")
    by_key = {item.key: item for item in cart.items}
    bundle_keys = [bundle.key for bundle in cart.bundles]
    if len(set(bundle_keys)) != len(bundle_keys):
        raise _bad("bundle keys must be unique")
    bundled: set[str] = set()
    for bundle in cart.bundles:
        if not _is_int(bundle.price_minor) or bundle.price_minor < 0:
            raise _bad(f"bundle {bundle.title!r}: the price is a non-negative integer")
        if not bundle.item_keys:
            raise _bad(f"bundle {bundle.title!r} has no items")
        for key in bundle.item_keys:
            if key not in by_key or by_key[key].bundle_key != bundle.key:
                raise _bad(f"bundle {bundle.title!r}: item {key!r} is not one of its lines")
            if key in bundled:
                raise _bad(f"item {key!r} is in two bundles")
            bundled.add(key)
    for item in cart.items:
        if item.bundle_key is not None and item.key not in bundled:
            raise _bad(
                f"item {item.key!r} names bundle {item.bundle_key!r}, which does not list it"
            )
    rule_ids = [rule.id for rule in cart.rules]
    if len(set(rule_ids)) != len(rule_ids):
        raise _bad("rule ids must be unique")
    for rule in cart.rules:
        check_rule(rule)
    for code in cart.codes:
        check_code(code)
    if not _is_int(cart.max_codes) or cart.max_codes < 0:
        raise _bad("max_codes is a non-negative integer")


# --- arithmetic ---------------------------------------------------------------------------


def _percent_of(percent: int, amount: int) -> int:
    """`percent` % of `amount` in minor units, half a unit rounded up (amount ≥ 0)."""
    return (percent * amount + 50) // 100


def _split(amount: int, weights: list[int]) -> list[int]:
    """Split `amount` ≥ 0 proportionally to `weights` (largest remainder; ties go to the
    earlier position, so callers order their inputs deterministically). All-zero weights
    split evenly."""
    if not weights:
        return []
    if sum(weights) <= 0:
        weights = [1] * len(weights)
    total = sum(weights)
    shares = [amount * w // total for w in weights]
    remainders = [amount * w % total for w in weights]
    short = amount - sum(shares)
    for index in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:short]:
        shares[index] += 1
    return shares


def _distribute(amount: int, weights: list[int], caps: list[int], refill: bool) -> list[int]:
    """Split `amount` by `weights`, never giving position i more than `caps[i]`.

    With `refill`, what a capped position could not take goes to the others (a fixed amount
    is given in full while there is room); without it, it is simply not given (a percentage
    of a line that is already at 0 is 0, not a bigger share elsewhere)."""
    shares = [0] * len(weights)
    # The first round splits over every position, full or not, so a full one's part is
    # not silently moved to the others; only a refill hands it on.
    active = list(range(len(weights)))
    remaining = amount
    while remaining > 0 and active:
        split = _split(remaining, [weights[i] for i in active])
        overflow = 0
        still_open: list[int] = []
        for index, share in zip(active, split, strict=True):
            give = min(share, caps[index] - shares[index])
            shares[index] += give
            overflow += share - give
            if shares[index] < caps[index]:
                still_open.append(index)
        if not refill:
            break
        remaining, active = overflow, still_open
    return shares


def unit_floor_minor(item: Item) -> int | None:
    """The lowest price one unit of `item` may reach through discounts, or None without a cost.

    max(cost * (1 + floor_bp / 10,000) rounded up, cost + floor_minor); a missing floor
    counts as 0, so a set cost alone keeps discounts from selling under cost.
    """
    if item.unit_cost_minor is None:
        return None
    cost = item.unit_cost_minor
    by_ratio = -(-cost * (10_000 + (item.floor_bp or 0)) // 10_000)
    return max(by_ratio, cost + (item.floor_minor or 0))


# --- the state the stages work on -----------------------------------------------------------


@dataclass
class _Unit:
    """One piece of a line: discounts are computed and capped per piece."""

    line: int
    index: int
    initial: int  # after the bundle split: the base of AppliesTo.INITIAL
    current: int  # what is left after the discounts so far
    bundled: bool
    used_by_rule: bool = False
    exclusive_lock: bool = False  # an exclusive code took its line
    code_touched: bool = False  # some code took its line (exclusive rules stay off it)


@dataclass
class _Adj:
    source: Literal["bundle", "rule", "code", "floor"]
    ref: str
    name: str
    why: str
    amount: int
    rule_id: int | None = None


class _State:
    def __init__(self, cart: Cart) -> None:
        self.cart = cart
        self.units: list[list[_Unit]] = [
            [
                _Unit(
                    line, index, item.unit_price_minor, item.unit_price_minor, bool(item.bundle_key)
                )
                for index in range(item.qty)
            ]
            for line, item in enumerate(cart.items)
        ]
        self.adjustments: list[list[_Adj]] = [[] for _ in cart.items]
        self.applied_codes: list[str] = []
        self.refused: list[Refusal] = []
        self.refused_at: list[tuple[int, Refusal]] = []  # (entry position, refusal)
        self.rule_spend: dict[int, int] = {}
        self.capped = 0
        self.floor_back: list[int] = [0] * len(cart.items)

    def money(self, amount: int) -> str:
        return Money(amount, self.cart.currency).format()

    def sort_key(self, unit: _Unit) -> tuple[str, int]:
        return (self.cart.items[unit.line].key, unit.index)

    # Bundles: the bundle price replaces its items' list prices, split by list value.
    def apply_bundles(self) -> None:
        position = {item.key: line for line, item in enumerate(self.cart.items)}
        for bundle in self.cart.bundles:
            lines = [position[key] for key in bundle.item_keys]
            line_units = [self.units[line] for line in lines]
            shares = _split(
                bundle.price_minor, [sum(u.initial for u in units) for units in line_units]
            )
            for line, units, share in zip(lines, line_units, shares, strict=True):
                list_amount = sum(u.initial for u in units)
                unit_shares = _split(share, [u.initial for u in units])
                for unit, unit_share in zip(units, unit_shares, strict=True):
                    unit.initial = unit.current = unit_share
                self.adjustments[line].append(
                    _Adj(
                        "bundle",
                        bundle.key,
                        bundle.title,
                        f"part of bundle {bundle.title} at {self.money(bundle.price_minor)}",
                        list_amount - share,
                    )
                )

    # Spreading an amount over units, line by line.
    def spread(
        self, units: list[_Unit], applies_to: AppliesTo, amount: int, refill: bool
    ) -> list[int]:
        """Split `amount` over `units` (in their order): first over their lines by base,
        then over each line's units; never more than a unit's current amount. With
        `refill` (fixed amounts) a full unit's excess goes to the others; without it
        (percentages) it is not given: 15 % of a unit already at 0 is 0, not 30 % of its
        neighbour."""
        by_line: dict[int, list[int]] = {}
        for position, unit in enumerate(units):
            by_line.setdefault(unit.line, []).append(position)
        groups = list(by_line.values())
        base = [self.base(units[p], applies_to) for p in range(len(units))]
        line_shares = _distribute(
            amount,
            [sum(base[p] for p in group) for group in groups],
            [sum(units[p].current for p in group) for group in groups],
            refill,
        )
        result = [0] * len(units)
        for group, line_share in zip(groups, line_shares, strict=True):
            unit_shares = _distribute(
                line_share, [base[p] for p in group], [units[p].current for p in group], refill
            )
            for position, share in zip(group, unit_shares, strict=True):
                result[position] = share
        return result

    @staticmethod
    def base(unit: _Unit, applies_to: AppliesTo) -> int:
        return unit.initial if applies_to is AppliesTo.INITIAL else unit.current

    def commit(self, units: list[_Unit], amounts: list[int], template: _Adj) -> None:
        """Take `amounts` off `units`; one adjustment (like `template`) per line touched."""
        per_line: dict[int, int] = {}
        for unit, amount in zip(units, amounts, strict=True):
            unit.current -= amount
            per_line[unit.line] = per_line.get(unit.line, 0) + amount
        for line in sorted(per_line):
            if per_line[line]:
                self.adjustments[line].append(replace(template, amount=per_line[line]))

    def matching(self, product_ids: frozenset[int] | None) -> list[_Unit]:
        return [
            unit
            for units in self.units
            for unit in units
            if product_ids is None or self.cart.items[unit.line].product_id in product_ids
        ]

    # Codes: in (priority, entry) order; an exclusive code that has an effect stands alone.
    def code_effect(self, code: Code) -> tuple[list[_Unit], list[int], set[int]]:
        """The units a code discounts, by how much, and the lines it touches."""
        scope = self.matching(code.product_ids)
        if code.kind is CodeKind.FREE_ITEM:
            paying = [unit for unit in scope if unit.current > 0]
            if not paying:
                return [], [], {scope[0].line} if scope else set()
            cheapest = min(paying, key=lambda u: (u.current, *self.sort_key(u)))
            return [cheapest], [cheapest.current], {cheapest.line}
        if code.kind is CodeKind.PERCENT:
            total = _percent_of(code.value, sum(self.base(u, code.applies_to) for u in scope))
            amounts = self.spread(scope, code.applies_to, total, refill=False)
        else:
            amounts = self.spread(scope, code.applies_to, code.value, refill=True)
        return scope, amounts, {unit.line for unit in scope}

    def code_why(self, code: Code) -> str:
        # The code's label is the adjustment's name already: say what it does, not again.
        if code.kind is CodeKind.PERCENT:
            base = " the price before discounts" if code.applies_to is AppliesTo.INITIAL else ""
            return f"the code you entered: {code.value}% off{base}"
        if code.kind is CodeKind.FIXED:
            return f"the code you entered: {self.money(code.value)} off"
        return "the code you entered: the cheapest matching item free"

    def refuse(self, position: int, code: Code, reason: str, message: str) -> None:
        self.refused_at.append((position, Refusal(code.ref, reason, message)))

    def apply_codes(self) -> None:
        candidates: list[tuple[int, int, Code]] = []
        seen: set[str] = set()
        for position, code in enumerate(self.cart.codes):
            if code.ref in seen:
                self.refuse(position, code, "duplicate_code", f"{code.label} is already entered")
                continue
            seen.add(code.ref)
            candidates.append((code.priority, position, code))
        candidates.sort(key=lambda c: (c[0], c[1]))
        ordered = [code for _, _, code in candidates]
        # An exclusive code that would take something off (alone, so on the bundled prices)
        # is the one code of the order; without a free slot it cannot be that either.
        alone = next(
            (
                code
                for code in ordered
                if self.cart.max_codes > 0
                and code.stacking is Stacking.EXCLUSIVE
                and sum(self.code_effect(code)[1]) > 0
            ),
            None,
        )
        for _, position, code in candidates:
            if not self.matching(code.product_ids):
                self.refuse(
                    position,
                    code,
                    "no_matching_items",
                    f"{code.label} does not apply to anything in the cart",
                )
            elif alone is not None and code is not alone:
                self.refuse(
                    position,
                    code,
                    "not_combinable",
                    f"{code.label} cannot be combined with {alone.label}",
                )
            elif len(self.applied_codes) >= self.cart.max_codes:
                limit = self.cart.max_codes
                self.refuse(
                    position,
                    code,
                    "too_many_codes",
                    f"at most {limit} code{'s' if limit != 1 else ''} per order",
                )
            else:
                units, amounts, touched = self.code_effect(code)
                if sum(amounts) <= 0:
                    self.refuse(
                        position,
                        code,
                        "no_effect",
                        f"{code.label} would take nothing off this cart",
                    )
                    continue
                why = self.code_why(code)
                self.commit(
                    units,
                    amounts,
                    _Adj("code", code.ref, code.label, why, 0),
                )
                self.applied_codes.append(code.ref)
                for line in touched:
                    for unit in self.units[line]:
                        unit.code_touched = True
                        unit.exclusive_lock |= code.stacking is Stacking.EXCLUSIVE
        # Refusals read in the order the customer entered the codes.
        self.refused = [refusal for _, refusal in sorted(self.refused_at, key=lambda r: r[0])]

    # Automatic rules: by (priority, id); each unit is used by at most one of them.
    def eligible(self, rule: Rule) -> list[_Unit]:
        return [
            unit
            for unit in self.matching(rule.product_ids)
            if unit.current > 0
            and not unit.bundled
            and not unit.used_by_rule
            and not unit.exclusive_lock
            and not (rule.stacking is Stacking.EXCLUSIVE and unit.code_touched)
        ]

    def rule_effect(
        self, rule: Rule, units: list[_Unit]
    ) -> tuple[list[_Unit], list[int], list[_Unit]]:
        """(units discounted in budget order, amounts, every unit the rule uses)."""
        params = rule.params
        if rule.kind in (RuleKind.MIN_QUANTITY, RuleKind.MIN_VALUE):
            if rule.kind is RuleKind.MIN_QUANTITY:
                met = len(units) >= params["min_qty"]
            else:
                met = sum(u.current for u in units) >= params["min_value_minor"]
            if not met:
                return [], [], []
            if "percent" in params:
                total = _percent_of(
                    params["percent"], sum(self.base(u, rule.applies_to) for u in units)
                )
                return units, self.spread(units, rule.applies_to, total, refill=False), units
            return (
                units,
                self.spread(units, rule.applies_to, params["amount_minor"], refill=True),
                units,
            )
        if rule.kind is RuleKind.BUY_X_GET_Y:
            paid, free, percent = params["buy"], params["get"], params.get("percent", 100)
        else:
            paid, free, percent = params["every"] - params["free"], params["free"], 100
        groups = len(units) // (paid + free)
        if not groups:
            return [], [], []
        # Dearest first; the cheapest units of the complete groups are the ones given away.
        ranked = sorted(units, key=lambda u: (-u.current, *self.sort_key(u)))
        condition = ranked[: groups * paid]
        benefit = ranked[len(ranked) - groups * free :][::-1]  # cheapest first
        amounts = [
            min(u.current, _percent_of(percent, self.base(u, rule.applies_to))) for u in benefit
        ]
        return benefit, amounts, condition + benefit

    def rule_why(self, rule: Rule) -> str:
        params = rule.params
        if "amount_minor" in params:
            off = f"{self.money(params['amount_minor'])} off"
        else:
            off = f"{params.get('percent', 100)} % off"
        if rule.kind is RuleKind.MIN_QUANTITY:
            return f"{params['min_qty']} or more items: {off}"
        if rule.kind is RuleKind.MIN_VALUE:
            return f"{self.money(params['min_value_minor'])} or more: {off}"
        if rule.kind is RuleKind.BUY_X_GET_Y:
            gift = "free" if params.get("percent", 100) == 100 else off
            return f"buy {params['buy']}, get {params['get']} {gift}"
        return f"every {params['every']} items: the cheapest {params['free']} free"

    def apply_rules(self) -> None:
        for rule in sorted(self.cart.rules, key=lambda r: (r.priority, r.id)):
            budget = rule.budget_left_minor
            if budget is not None and budget <= 0:
                continue
            units, amounts, used = self.rule_effect(rule, self.eligible(rule))
            why = self.rule_why(rule)
            if budget is not None and sum(amounts) > budget:
                # The budget runs out mid-cart: earlier units get theirs in full, then nothing.
                left = budget
                for position, amount in enumerate(amounts):
                    amounts[position] = min(amount, left)
                    left -= amounts[position]
                why += f" (the campaign budget ran out: {self.money(budget)} was left)"
            spent = sum(amounts)
            if spent <= 0:
                continue
            self.commit(
                units,
                amounts,
                _Adj("rule", str(rule.id), rule.name, why, 0, rule.id),
            )
            for unit in used:
                unit.used_by_rule = True
            self.rule_spend[rule.id] = spent

    # Margin floor: discounts (codes, rules) never take a line under floor * qty.
    def apply_floor(self) -> None:
        for line, item in enumerate(self.cart.items):
            unit_floor = unit_floor_minor(item)
            if unit_floor is None:
                continue
            units = self.units[line]
            # Never above the host's own price (list or bundle): the floor caps discounts only.
            target = min(unit_floor * item.qty, sum(u.initial for u in units))
            claw = target - sum(u.current for u in units)
            if claw <= 0:
                continue
            self.floor_back[line] = claw
            self.capped += claw
            # The latest discounts are the ones given back (budgets are refunded accordingly).
            owed = claw
            for adj in reversed(self.adjustments[line]):
                if owed <= 0:
                    break
                if adj.source == "rule" and adj.rule_id is not None:
                    back = min(owed, adj.amount)
                    self.rule_spend[adj.rule_id] -= back
                    owed -= back
                elif adj.source == "code":
                    owed -= min(owed, adj.amount)
            self.adjustments[line].append(
                _Adj(
                    "floor",
                    item.key,
                    "discount_capped",
                    f"margin floor: at least {self.money(unit_floor)} each",
                    -claw,
                )
            )

    def breakdown(self) -> Breakdown:
        lines: list[LineBreakdown] = []
        for line, item in enumerate(self.cart.items):
            final = sum(u.current for u in self.units[line]) + self.floor_back[line]
            lines.append(
                LineBreakdown(
                    key=item.key,
                    title=item.title,
                    qty=item.qty,
                    unit_price_minor=item.unit_price_minor,
                    list_minor=item.qty * item.unit_price_minor,
                    adjustments=tuple(
                        Adjustment(a.source, a.ref, a.name, a.why, a.amount)
                        for a in self.adjustments[line]
                    ),
                    final_minor=final,
                )
            )
        subtotal = sum(line.list_minor for line in lines)
        total = sum(line.final_minor for line in lines)
        return Breakdown(
            currency=self.cart.currency,
            lines=tuple(lines),
            subtotal_minor=subtotal,
            discount_minor=subtotal - total,
            total_minor=total,
            capped_minor=self.capped,
            applied_codes=tuple(self.applied_codes),
            refused_codes=tuple(self.refused),
            rule_spend={
                rule_id: spent for rule_id, spent in sorted(self.rule_spend.items()) if spent > 0
            },
        )
