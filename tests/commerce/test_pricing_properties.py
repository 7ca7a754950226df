"""Properties of the pricing engine over generated carts (hypothesis, no database).

Whatever the mix of bundles, codes, rules, budgets and floors: no line is negative or under
its margin floor, the lines sum to the total, the same cart gives the same breakdown, the
breakdown survives JSON, and the adjustments come in the documented order.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popdrop.commerce.pricing import (
    AppliesTo,
    Breakdown,
    BundleUse,
    Cart,
    Code,
    CodeKind,
    Item,
    Rule,
    RuleKind,
    Stacking,
    price,
    unit_floor_minor,
)

PRODUCTS = (1, 2, 3)
product_sets = st.none() | st.frozensets(st.sampled_from(PRODUCTS), min_size=1)
optional_small = st.none() | st.integers(0, 3000)


@st.composite
def items(draw: st.DrawFn) -> tuple[Item, ...]:
    count = draw(st.integers(1, 5))
    return tuple(
        Item(
            key=f"k{index}",
            product_id=draw(st.sampled_from(PRODUCTS)),
            variant_id=index,
            title=f"Item {index}",
            qty=draw(st.integers(1, 6)),
            unit_price_minor=draw(st.integers(0, 5000)),
            unit_cost_minor=draw(optional_small),
            floor_bp=draw(st.none() | st.integers(0, 5000)),
            floor_minor=draw(st.none() | st.integers(0, 500)),
        )
        for index in range(count)
    )


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    kind = draw(st.sampled_from(RuleKind))
    off: dict[str, int] = draw(
        st.sampled_from(("percent", "amount_minor")).flatmap(
            lambda name: st.fixed_dictionaries(
                {name: st.integers(1, 100) if name == "percent" else st.integers(1, 5000)}
            )
        )
    )
    if kind is RuleKind.MIN_QUANTITY:
        params = {"min_qty": draw(st.integers(1, 6)), **off}
    elif kind is RuleKind.MIN_VALUE:
        params = {"min_value_minor": draw(st.integers(1, 20000)), **off}
    elif kind is RuleKind.BUY_X_GET_Y:
        params = {"buy": draw(st.integers(1, 3)), "get": draw(st.integers(1, 2))}
        if draw(st.booleans()):
            params["percent"] = draw(st.integers(1, 100))
    else:
        every = draw(st.integers(2, 5))
        params = {"every": every, "free": draw(st.integers(1, every - 1))}
    return Rule(
        id=draw(st.integers(1, 10_000)),
        name=f"rule {kind}",
        kind=kind,
        params=params,
        stacking=draw(st.sampled_from(Stacking)),
        applies_to=draw(st.sampled_from(AppliesTo)),
        priority=draw(st.integers(0, 3)),
        budget_left_minor=draw(st.none() | st.integers(0, 3000)),
        product_ids=draw(product_sets),
    )


@st.composite
def codes(draw: st.DrawFn) -> Code:
    kind = draw(st.sampled_from(CodeKind))
    value = {
        CodeKind.PERCENT: draw(st.integers(1, 100)),
        CodeKind.FIXED: draw(st.integers(1, 5000)),
        CodeKind.FREE_ITEM: 0,
    }[kind]
    ref = draw(st.sampled_from(("A", "B", "C", "D")))  # repeats exercise duplicate_code
    return Code(
        ref=ref,
        label=f"code {ref}",
        kind=kind,
        value=value,
        stacking=draw(st.sampled_from(Stacking)),
        applies_to=draw(st.sampled_from(AppliesTo)),
        priority=draw(st.integers(0, 2)),
        product_ids=draw(product_sets),
    )


@st.composite
def carts(draw: st.DrawFn) -> Cart:
    cart_items = list(draw(items()))
    bundles: list[BundleUse] = []
    # Up to two bundles over disjoint runs of items.
    start = 0
    for number in range(draw(st.integers(0, 2))):
        size = draw(st.integers(1, 2))
        members = cart_items[start : start + size]
        if not members:
            break
        key = f"b{number}"
        for position in range(start, start + len(members)):
            old = cart_items[position]
            cart_items[position] = Item(**{**old.__dict__, "bundle_key": key})
        bundles.append(
            BundleUse(
                key,
                number,
                f"Bundle {number}",
                draw(st.integers(0, 8000)),
                tuple(m.key for m in members),
            )
        )
        start += size
    cart_rules = draw(st.lists(rules(), max_size=3, unique_by=lambda r: r.id))
    return Cart(
        currency="EUR",
        items=tuple(cart_items),
        bundles=tuple(bundles),
        rules=tuple(cart_rules),
        codes=tuple(draw(st.lists(codes(), max_size=3))),
        max_codes=draw(st.integers(0, 3)),
    )


def floor_bound(cart: Cart, breakdown: Breakdown) -> dict[str, int]:
    """What each line may not go under: floor * qty, or the host's own price if lower."""
    bound: dict[str, int] = {}
    for item, line in zip(cart.items, breakdown.lines, strict=True):
        own_price = line.list_minor - sum(
            a.amount_minor for a in line.adjustments if a.source == "bundle"
        )
        unit_floor = unit_floor_minor(item)
        bound[item.key] = 0 if unit_floor is None else min(unit_floor * item.qty, own_price)
    return bound


PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(carts())
def test_never_negative_never_under_the_floor_and_the_lines_sum_to_the_total(cart: Cart) -> None:
    b = price(cart)
    bound = floor_bound(cart, b)
    for line in b.lines:
        assert line.final_minor >= 0
        assert line.final_minor >= bound[line.key]
        assert line.final_minor == line.list_minor - sum(a.amount_minor for a in line.adjustments)
    assert sum(line.final_minor for line in b.lines) == b.total_minor
    assert b.total_minor == b.subtotal_minor - b.discount_minor
    assert b.subtotal_minor == sum(item.qty * item.unit_price_minor for item in cart.items)
    floor_back = -sum(
        a.amount_minor for line in b.lines for a in line.adjustments if a.source == "floor"
    )
    assert b.capped_minor == floor_back >= 0
    # A bundle's items sell at the bundle's price, to the minor unit.
    by_key = {line.key: line for line in b.lines}
    for bundle in cart.bundles:
        after_bundle = sum(
            line.list_minor - sum(a.amount_minor for a in line.adjustments if a.source == "bundle")
            for line in (by_key[key] for key in bundle.item_keys)
        )
        assert after_bundle == bundle.price_minor


@PROPERTY_SETTINGS
@given(carts())
def test_codes_rules_and_budgets_keep_their_limits(cart: Cart) -> None:
    b = price(cart)
    entered = Counter(code.ref for code in cart.codes)
    # Every code entered is either applied or refused, once each.
    assert Counter(b.applied_codes) + Counter(r.ref for r in b.refused_codes) == entered
    assert len(b.applied_codes) <= cart.max_codes
    by_ref = {code.ref: code for code in reversed(cart.codes)}  # first entry of each ref
    if any(by_ref[ref].stacking is Stacking.EXCLUSIVE for ref in b.applied_codes):
        assert len(b.applied_codes) == 1
    budgets = {rule.id: rule.budget_left_minor for rule in cart.rules}
    given_by_rule: Counter[int] = Counter()
    for line in b.lines:
        for adjustment in line.adjustments:
            assert adjustment.why
            if adjustment.source == "rule":
                given_by_rule[int(adjustment.ref)] += adjustment.amount_minor
    for rule_id, spent in b.rule_spend.items():
        assert 0 < spent <= given_by_rule[rule_id]
        budget = budgets[rule_id]
        assert budget is None or spent <= budget
    # Without a floor taking anything back, the spend is exactly what the lines show.
    if b.capped_minor == 0:
        assert dict(b.rule_spend) == {k: v for k, v in given_by_rule.items() if v > 0}


@PROPERTY_SETTINGS
@given(carts())
def test_percent_codes_take_their_percentage_and_fixed_codes_their_amount(cart: Cart) -> None:
    """A percent code takes at most its percentage of each line's base (2 cents of
    rounding): a full unit's part never moves to its neighbour. A fixed code gives its
    whole value unless every line it matches is at 0 after it."""
    b = price(cart)
    first_code = {code.ref: code for code in reversed(cart.codes)}
    for item, line in zip(cart.items, b.lines, strict=True):
        left = initial = line.list_minor
        for adjustment in line.adjustments:
            before = left
            left -= adjustment.amount_minor
            if adjustment.source == "bundle":
                initial = left
            if adjustment.source == "code" and first_code[adjustment.ref].kind is CodeKind.PERCENT:
                code = first_code[adjustment.ref]
                base = initial if code.applies_to is AppliesTo.INITIAL else before
                assert adjustment.amount_minor <= code.value * base / 100 + 2
    for position, ref in enumerate(b.applied_codes):
        code = first_code[ref]
        if code.kind is not CodeKind.FIXED:
            continue
        so_far = set(b.applied_codes[: position + 1])
        given_total = 0
        left_after: list[int] = []
        for item, line in zip(cart.items, b.lines, strict=True):
            given_total += sum(
                a.amount_minor for a in line.adjustments if a.source == "code" and a.ref == ref
            )
            if code.product_ids is None or item.product_id in code.product_ids:
                taken = sum(
                    a.amount_minor
                    for a in line.adjustments
                    if a.source == "bundle" or (a.source == "code" and a.ref in so_far)
                )
                left_after.append(line.list_minor - taken)
        assert given_total == code.value or not any(left_after)


SOURCE_ORDER = {"bundle": 0, "code": 1, "rule": 2, "floor": 3}


@PROPERTY_SETTINGS
@given(carts())
def test_the_stacking_order_is_the_documented_one(cart: Cart) -> None:
    """bundle → codes by (priority, entry) → rules by (priority, id) → floor, on every line;
    an exclusive code's lines carry no rule; codes and rules only take off."""
    b = price(cart)
    first_entry: dict[str, tuple[int, int]] = {}
    for position, code in enumerate(cart.codes):
        first_entry.setdefault(code.ref, (code.priority, position))
    assert list(b.applied_codes) == sorted(b.applied_codes, key=lambda ref: first_entry[ref])
    rule_rank = {str(rule.id): (rule.priority, rule.id) for rule in cart.rules}
    code_rank = {ref: rank for rank, ref in enumerate(b.applied_codes)}
    first_code = {code.ref: code for code in reversed(cart.codes)}  # a repeated ref is refused
    exclusive = {ref for ref, code in first_code.items() if code.stacking is Stacking.EXCLUSIVE}
    for line in b.lines:
        sources = [a.source for a in line.adjustments]
        assert sources == sorted(sources, key=SOURCE_ORDER.__getitem__)
        line_codes = [a.ref for a in line.adjustments if a.source == "code"]
        assert line_codes == sorted(line_codes, key=code_rank.__getitem__)
        line_rules = [a.ref for a in line.adjustments if a.source == "rule"]
        assert line_rules == sorted(line_rules, key=rule_rank.__getitem__)
        if exclusive & set(line_codes):
            assert not line_rules
        for adjustment in line.adjustments:
            if adjustment.source in ("code", "rule"):
                assert adjustment.amount_minor > 0

    # A later stage never changes an earlier one: without the rules, or without the last
    # rule in (priority, id) order, the bundles and codes (and the earlier rules) are the same.
    def before(breakdown: Breakdown, keep: set[str]) -> list[list[tuple[str, str, int]]]:
        return [
            [(a.source, a.ref, a.amount_minor) for a in line.adjustments if a.source in keep]
            for line in breakdown.lines
        ]

    no_rules = price(replace(cart, rules=()))
    assert before(no_rules, {"bundle", "code"}) == before(b, {"bundle", "code"})
    assert no_rules.applied_codes == b.applied_codes
    if cart.rules:
        ordered = sorted(cart.rules, key=lambda rule: (rule.priority, rule.id))
        without_last = price(replace(cart, rules=tuple(ordered[:-1])))
        last = str(ordered[-1].id)
        assert [
            [adjustment for adjustment in line if adjustment[1] != last or adjustment[0] != "rule"]
            for line in before(b, {"bundle", "code", "rule"})
        ] == before(without_last, {"bundle", "code", "rule"})


@PROPERTY_SETTINGS
@given(carts())
def test_same_input_same_breakdown_and_json_round_trips(cart: Cart) -> None:
    first = price(cart)
    assert price(cart) == first
    wire = json.loads(json.dumps(first.to_json()))
    assert Breakdown.from_json(wire) == first
    assert Breakdown.from_json(wire).to_json() == first.to_json()
