"""The pricing engine, rule by rule, with answers computed by hand (no database).

Amounts are minor units (EUR cents). Each test says the arithmetic in a comment so a
reader can check it without running the engine.
"""

from __future__ import annotations

import pytest

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
from popdrop.core.errors import PopdropError


def item(key: str, qty: int, unit: int, product: int = 1, **extra: object) -> Item:
    return Item(
        key=key,
        product_id=product,
        variant_id=product * 10,
        title=f"Item {key}",
        qty=qty,
        unit_price_minor=unit,
        **extra,  # type: ignore[arg-type]
    )


def cart(*items: Item, **extra: object) -> Cart:
    return Cart("EUR", tuple(items), **extra)  # type: ignore[arg-type]


def finals(breakdown: Breakdown) -> dict[str, int]:
    return {line.key: line.final_minor for line in breakdown.lines}


def amounts(breakdown: Breakdown, key: str) -> list[tuple[str, str, int]]:
    line = next(line for line in breakdown.lines if line.key == key)
    return [(a.source, a.ref, a.amount_minor) for a in line.adjustments]


def assert_sums(breakdown: Breakdown) -> None:
    assert sum(line.final_minor for line in breakdown.lines) == breakdown.total_minor
    assert breakdown.total_minor == breakdown.subtotal_minor - breakdown.discount_minor


def percent_code(ref: str, value: int, **extra: object) -> Code:
    return Code(ref, ref, CodeKind.PERCENT, value, **extra)  # type: ignore[arg-type]


def fixed_code(ref: str, value: int, **extra: object) -> Code:
    return Code(ref, ref, CodeKind.FIXED, value, **extra)  # type: ignore[arg-type]


# ---------------------------------------------------------------- list price


def test_list_price_only() -> None:
    b = price(cart(item("a", 2, 1250), item("b", 1, 499)))
    assert finals(b) == {"a": 2500, "b": 499}
    assert (b.subtotal_minor, b.discount_minor, b.total_minor) == (2999, 0, 2999)
    assert b.lines[0].list_minor == 2500 and b.lines[0].adjustments == ()


# ---------------------------------------------------------------- bundles


def test_bundle_price_is_split_by_list_value_and_sums_to_the_bundle_price() -> None:
    # List 2000 + 2*800 = 3600 sold at 2500: a gets 2500*2000/3600 = 1388.9 → 1388 + the
    # leftover cent (largest remainder .9 vs .1) = 1389; b gets 1111.
    b = price(
        cart(
            item("a", 1, 2000, bundle_key="kit"),
            item("b", 2, 800, product=2, bundle_key="kit"),
            item("c", 1, 300, product=3),
            bundles=(BundleUse("kit", 7, "Starter kit", 2500, ("a", "b")),),
        )
    )
    assert finals(b) == {"a": 1389, "b": 1111, "c": 300}
    assert finals(b)["a"] + finals(b)["b"] == 2500
    assert amounts(b, "a") == [("bundle", "kit", 611)]
    assert amounts(b, "b") == [("bundle", "kit", 489)]
    assert b.total_minor == 2800
    assert_sums(b)


def test_bundle_items_take_codes_but_no_automatic_rule() -> None:
    # The bundle is the deal: a "2 or more: 50 %" rule skips its units; a 10 % code does not.
    b = price(
        cart(
            item("a", 2, 1000, bundle_key="kit"),
            bundles=(BundleUse("kit", 1, "Pair", 1500, ("a",)),),
            rules=(Rule(1, "half", RuleKind.MIN_QUANTITY, {"min_qty": 2, "percent": 50}),),
            codes=(percent_code("TEN", 10),),
        )
    )
    assert finals(b) == {"a": 1350}  # 1500 - 10 % of 1500
    assert b.rule_spend == {}


def test_a_bundle_must_list_its_items() -> None:
    with pytest.raises(PopdropError) as caught:
        price(cart(item("a", 1, 100, bundle_key="kit")))
    assert caught.value.reason == "invalid_request"


# ---------------------------------------------------------------- codes


def test_percent_code_rounds_once_over_the_cart_with_largest_remainder() -> None:
    # 10 % of 3 * 5 = 1.5 → 2 cents (half up), split 1, 1, 0 (ties to the earlier line).
    b = price(
        cart(
            item("a", 1, 5),
            item("b", 1, 5, product=2),
            item("c", 1, 5, product=3),
            codes=(percent_code("TEN", 10),),
        )
    )
    assert finals(b) == {"a": 4, "b": 4, "c": 5}
    assert b.discount_minor == 2
    assert b.applied_codes == ("TEN",)


def test_fixed_code_is_spread_by_value_and_never_more_than_the_cart() -> None:
    # 500 over 3000 and 2000 → 300 and 200; a 9,999 code on a 1,000 cart takes 1,000.
    b = price(
        cart(item("a", 1, 3000), item("b", 1, 2000, product=2), codes=(fixed_code("FIVE", 500),))
    )
    assert finals(b) == {"a": 2700, "b": 1800}
    big = price(cart(item("a", 2, 500), codes=(fixed_code("BIG", 9999),)))
    assert big.total_minor == 0 and big.discount_minor == 1000


@pytest.mark.parametrize(
    ("fixed_priority", "percent_priority", "applies_to", "total"),
    [
        # fixed first: 10000 - 1000 = 9000, then 10 % of 9000 = 900 → 8100
        (0, 1, AppliesTo.DISCOUNTED, 8100),
        # percent first: 10 % of 10000 = 1000 → 9000, then - 1000 → 8000
        (1, 0, AppliesTo.DISCOUNTED, 8000),
        # on the initial amount the order does not matter: 1000 + 1000 off → 8000
        (0, 1, AppliesTo.INITIAL, 8000),
        (1, 0, AppliesTo.INITIAL, 8000),
    ],
)
def test_fixed_then_percent_vs_percent_then_fixed(
    fixed_priority: int, percent_priority: int, applies_to: AppliesTo, total: int
) -> None:
    b = price(
        cart(
            item("a", 1, 10000),
            codes=(
                fixed_code("TENOFF", 1000, priority=fixed_priority),
                percent_code("TENPC", 10, priority=percent_priority, applies_to=applies_to),
            ),
            max_codes=2,
        )
    )
    assert b.total_minor == total
    first = "TENOFF" if fixed_priority < percent_priority else "TENPC"
    assert b.applied_codes[0] == first
    assert [a.ref for a in b.lines[0].adjustments] == list(b.applied_codes)


def test_100_percent_plus_15_percent_is_zero_not_negative() -> None:
    # Vendure #2385: 100 % then 15 % of the list price would be -15 %; it is 0, and the
    # 15 % code is not spent because it takes nothing off.
    b = price(
        cart(
            item("a", 2, 1000),
            codes=(
                percent_code("ALL", 100, applies_to=AppliesTo.INITIAL),
                percent_code("MORE", 15, applies_to=AppliesTo.INITIAL),
            ),
            max_codes=2,
        )
    )
    assert b.total_minor == 0
    assert b.lines[0].final_minor == 0
    assert b.applied_codes == ("ALL",)
    assert [(r.ref, r.reason) for r in b.refused_codes] == [("MORE", "no_effect")]
    # The other way round: 15 % (300) then 100 % of the list price, capped at what is left.
    swapped = price(
        cart(
            item("a", 2, 1000),
            codes=(
                percent_code("ALL", 100, applies_to=AppliesTo.INITIAL, priority=1),
                percent_code("MORE", 15, applies_to=AppliesTo.INITIAL),
            ),
            max_codes=2,
        )
    )
    assert swapped.total_minor == 0
    assert amounts(swapped, "a") == [("code", "MORE", 300), ("code", "ALL", 1700)]


def test_a_percentage_of_a_free_unit_does_not_move_to_its_neighbour() -> None:
    # GIFT frees one of two units at 1000; 15 % of the initial 2000 would be 300, but the
    # free unit's half (150) has nothing left to take: the paying unit gets 150 off → 850.
    b = price(
        cart(
            item("a", 2, 1000),
            codes=(
                Code("GIFT", "Gift", CodeKind.FREE_ITEM, 0),
                percent_code("PCT", 15, applies_to=AppliesTo.INITIAL, priority=1),
            ),
            max_codes=2,
        )
    )
    assert b.total_minor == 850
    assert amounts(b, "a") == [("code", "GIFT", 1000), ("code", "PCT", 150)]
    # The same across lines: ALL frees line a; 15 % of the initial 1000 + 1000 is 300, of
    # which only b's 150 is given.
    across = price(
        cart(
            item("a", 1, 1000, product=1),
            item("b", 1, 1000, product=2),
            codes=(
                percent_code("ALL", 100, product_ids=frozenset({1})),
                percent_code("PCT", 15, applies_to=AppliesTo.INITIAL, priority=1),
            ),
            max_codes=2,
        )
    )
    assert finals(across) == {"a": 0, "b": 850}


def test_100_percent_code_then_a_15_percent_rule_stays_at_zero() -> None:
    b = price(
        cart(
            item("a", 3, 1000),
            codes=(percent_code("ALL", 100),),
            rules=(
                Rule(
                    1,
                    "15",
                    RuleKind.MIN_QUANTITY,
                    {"min_qty": 1, "percent": 15},
                    applies_to=AppliesTo.INITIAL,
                ),
            ),
        )
    )
    assert b.total_minor == 0
    assert b.rule_spend == {}


def test_too_many_codes_keeps_the_first_by_priority() -> None:
    b = price(
        cart(
            item("a", 1, 1000),
            codes=(percent_code("LATE", 10, priority=5), percent_code("EARLY", 20, priority=1)),
        )
    )
    assert b.applied_codes == ("EARLY",)
    assert [(r.ref, r.reason) for r in b.refused_codes] == [("LATE", "too_many_codes")]
    assert b.total_minor == 800


def test_codes_that_do_not_fit_are_refused_with_a_reason() -> None:
    b = price(
        cart(
            item("a", 1, 1000),
            codes=(
                percent_code("SHOES", 10, product_ids=frozenset({99})),
                percent_code("OK", 10),
                percent_code("OK", 10),
            ),
            max_codes=3,
        )
    )
    assert b.applied_codes == ("OK",)
    # Refusals come in the order the codes were entered.
    assert [(r.ref, r.reason) for r in b.refused_codes] == [
        ("SHOES", "no_matching_items"),
        ("OK", "duplicate_code"),
    ]
    assert b.total_minor == 900


def test_free_item_code_takes_the_cheapest_matching_unit() -> None:
    b = price(
        cart(
            item("a", 2, 900),
            item("b", 3, 400, product=2),
            item("c", 1, 100, product=3),
            codes=(Code("GIFT", "Gift", CodeKind.FREE_ITEM, 0, product_ids=frozenset({1, 2})),),
        )
    )
    # c is cheaper but does not match; one unit of b (400) is free.
    assert finals(b) == {"a": 1800, "b": 800, "c": 100}
    assert amounts(b, "b") == [("code", "GIFT", 400)]


def test_exclusive_code_stands_alone_and_keeps_rules_off_its_lines() -> None:
    # EXCL (10 % on product 1) is exclusive: the stackable code is refused, and the
    # "2 or more: 10 %" rule only sees product 2's two units (10 % of 1000 = 100).
    b = price(
        cart(
            item("a", 2, 1000, product=1),
            item("b", 2, 500, product=2),
            codes=(
                percent_code("STACK", 5),
                percent_code("EXCL", 10, stacking=Stacking.EXCLUSIVE, product_ids=frozenset({1})),
            ),
            rules=(Rule(1, "two or more", RuleKind.MIN_QUANTITY, {"min_qty": 2, "percent": 10}),),
            max_codes=2,
        )
    )
    assert b.applied_codes == ("EXCL",)
    assert [(r.ref, r.reason) for r in b.refused_codes] == [("STACK", "not_combinable")]
    assert finals(b) == {"a": 1800, "b": 900}
    assert amounts(b, "a") == [("code", "EXCL", 200)]
    assert amounts(b, "b") == [("rule", "1", 100)]


def test_stackable_code_and_stackable_rule_both_apply() -> None:
    # 10 % code: 2000 → 1800; then "2 or more: 10 %" on the discounted 1800 → 180 → 1620.
    b = price(
        cart(
            item("a", 2, 1000),
            codes=(percent_code("TEN", 10),),
            rules=(Rule(1, "two or more", RuleKind.MIN_QUANTITY, {"min_qty": 2, "percent": 10}),),
        )
    )
    assert b.total_minor == 1620
    assert [a.source for a in b.lines[0].adjustments] == ["code", "rule"]


def test_exclusive_rule_stays_off_lines_a_code_touched() -> None:
    b = price(
        cart(
            item("a", 1, 1000, product=1),
            item("b", 1, 1000, product=2),
            codes=(percent_code("TEN", 10, product_ids=frozenset({1})),),
            rules=(
                Rule(
                    1,
                    "any one",
                    RuleKind.MIN_QUANTITY,
                    {"min_qty": 1, "percent": 20},
                    stacking=Stacking.EXCLUSIVE,
                ),
            ),
        )
    )
    assert finals(b) == {"a": 900, "b": 800}
    assert b.rule_spend == {1: 200}


# ---------------------------------------------------------------- automatic rules


def test_min_quantity_threshold() -> None:
    rule = Rule(1, "3+", RuleKind.MIN_QUANTITY, {"min_qty": 3, "amount_minor": 300})
    assert price(cart(item("a", 2, 1000), rules=(rule,))).total_minor == 2000
    b = price(cart(item("a", 2, 1000), item("b", 1, 500, product=2), rules=(rule,)))
    # 300 once, spread by value 2000 : 500 → 240 and 60.
    assert finals(b) == {"a": 1760, "b": 440}
    assert b.rule_spend == {1: 300}


def test_min_value_threshold_counts_the_amount_after_codes() -> None:
    rule = Rule(1, "50+", RuleKind.MIN_VALUE, {"min_value_minor": 5000, "percent": 10})
    assert price(cart(item("a", 5, 1000), rules=(rule,))).total_minor == 4500
    # A 1 EUR code brings the cart to 4900: under the threshold, no rule.
    b = price(cart(item("a", 5, 1000), rules=(rule,), codes=(fixed_code("ONE", 100),)))
    assert b.total_minor == 4900
    assert b.rule_spend == {}


@pytest.mark.parametrize(
    ("qty", "free_units"),
    [(2, 0), (3, 1), (5, 1), (6, 2), (7, 2), (9, 3)],
)
def test_buy_two_get_one_applies_per_complete_multiple(qty: int, free_units: int) -> None:
    # Medusa #13265: 7 units of buy-2-get-1 = 2 complete groups = 2 free units.
    b = price(
        cart(
            item("a", qty, 1000),
            rules=(Rule(1, "b2g1", RuleKind.BUY_X_GET_Y, {"buy": 2, "get": 1}),),
        )
    )
    assert b.total_minor == (qty - free_units) * 1000
    assert b.rule_spend == ({1: free_units * 1000} if free_units else {})


def test_buy_x_get_y_gives_the_cheapest_and_leaves_the_rest_to_later_rules() -> None:
    # 7 units: 1000 x3 (a) and 500 x4 (b). Two groups of 3: condition = the 4 dearest
    # (a, a, a, b0), gift = the 2 cheapest (b2, b3) → 1000 off. b1 is left over, so the
    # later "any 1: 10 %" rule takes 50 off it; nothing else.
    b = price(
        cart(
            item("a", 3, 1000),
            item("b", 4, 500, product=2),
            rules=(
                Rule(2, "10 % on anything", RuleKind.MIN_QUANTITY, {"min_qty": 1, "percent": 10}),
                Rule(1, "b2g1", RuleKind.BUY_X_GET_Y, {"buy": 2, "get": 1}, priority=10),
            ),
        )
    )
    assert finals(b) == {"a": 3000, "b": 950}
    assert amounts(b, "b") == [("rule", "1", 1000), ("rule", "2", 50)]
    assert b.rule_spend == {1: 1000, 2: 50}


def test_buy_x_get_y_on_the_initial_amount_never_goes_negative() -> None:
    # Medusa #8829: a 50 % code leaves 500 a unit; "get 1 free" computed on the initial
    # 1000 is capped at the 500 left → 3 * 500 - 500 = 1000.
    b = price(
        cart(
            item("a", 3, 1000),
            codes=(percent_code("HALF", 50),),
            rules=(
                Rule(
                    1,
                    "b2g1",
                    RuleKind.BUY_X_GET_Y,
                    {"buy": 2, "get": 1},
                    applies_to=AppliesTo.INITIAL,
                ),
            ),
        )
    )
    assert b.total_minor == 1000
    assert b.rule_spend == {1: 500}


def test_buy_x_get_y_at_a_percentage() -> None:
    # buy 1 get 1 at 50 %: 4 units of 999 → 2 groups, 2 units at half (499.5 → 500 off each).
    b = price(
        cart(
            item("a", 4, 999),
            rules=(Rule(1, "b1g1", RuleKind.BUY_X_GET_Y, {"buy": 1, "get": 1, "percent": 50}),),
        )
    )
    assert b.total_minor == 4 * 999 - 2 * 500


def test_cheapest_free_every_three() -> None:
    # 4 items at 400, 300, 200, 100: one group of 3 → the cheapest, 100, is free.
    b = price(
        cart(
            item("a", 1, 400),
            item("b", 1, 300, product=2),
            item("c", 1, 200, product=3),
            item("d", 1, 100, product=4),
            rules=(Rule(1, "3 for 2", RuleKind.CHEAPEST_FREE, {"every": 3, "free": 1}),),
        )
    )
    assert finals(b) == {"a": 400, "b": 300, "c": 200, "d": 0}


def test_rules_run_by_priority_then_id_and_each_unit_takes_one_rule() -> None:
    rules = (
        Rule(5, "twenty", RuleKind.MIN_QUANTITY, {"min_qty": 1, "percent": 20}, priority=50),
        Rule(3, "ten", RuleKind.MIN_QUANTITY, {"min_qty": 1, "percent": 10}, priority=50),
    )
    b = price(cart(item("a", 1, 1000), rules=rules))
    # Same priority: id 3 first, and then the unit is used; "twenty" gets nothing.
    assert b.total_minor == 900
    assert b.rule_spend == {3: 100}


def test_budget_runs_out_mid_cart() -> None:
    # 10 % of 3 units at 1000 = 300, but 250 is left: a's two units get 100 each, b gets 50.
    b = price(
        cart(
            item("a", 2, 1000),
            item("b", 1, 1000, product=2),
            rules=(
                Rule(
                    1,
                    "ten",
                    RuleKind.MIN_QUANTITY,
                    {"min_qty": 1, "percent": 10},
                    budget_left_minor=250,
                ),
            ),
        )
    )
    assert finals(b) == {"a": 1800, "b": 950}
    assert b.rule_spend == {1: 250}
    assert "budget" in b.lines[1].adjustments[0].why


def test_an_exhausted_budget_gives_nothing_and_leaves_the_units_to_other_rules() -> None:
    b = price(
        cart(
            item("a", 1, 1000),
            rules=(
                Rule(
                    1,
                    "spent",
                    RuleKind.MIN_QUANTITY,
                    {"min_qty": 1, "percent": 50},
                    budget_left_minor=0,
                ),
                Rule(2, "ten", RuleKind.MIN_QUANTITY, {"min_qty": 1, "percent": 10}, priority=200),
            ),
        )
    )
    assert b.total_minor == 900
    assert b.rule_spend == {2: 100}


# ---------------------------------------------------------------- margin floor


def test_unit_floor_is_the_higher_of_ratio_rounded_up_and_absolute() -> None:
    assert unit_floor_minor(item("a", 1, 1000)) is None
    assert unit_floor_minor(item("a", 1, 1000, unit_cost_minor=600)) == 600
    assert unit_floor_minor(item("a", 1, 1000, unit_cost_minor=333, floor_bp=1000)) == 367
    assert (
        unit_floor_minor(item("a", 1, 1000, unit_cost_minor=600, floor_bp=2500, floor_minor=200))
        == 800
    )


def test_margin_floor_claws_back_and_records_discount_capped() -> None:
    # Floor 800 a unit (cost 600 + 200). 30 % code → 700 each; the floor gives 100 back
    # per unit (200 for 2) as "discount_capped".
    b = price(
        cart(
            item("a", 2, 1000, unit_cost_minor=600, floor_bp=2500, floor_minor=200),
            codes=(percent_code("THIRTY", 30),),
        )
    )
    assert b.lines[0].final_minor == 1600
    floor = b.lines[0].adjustments[-1]
    assert (floor.source, floor.name, floor.amount_minor) == ("floor", "discount_capped", -200)
    assert b.capped_minor == 200
    assert b.discount_minor == 400
    assert_sums(b)


def test_margin_floor_gives_back_the_latest_discount_first_and_rule_spend_says_so() -> None:
    # Floor 900. Code 5 % → 950, rule 10 % of 950 = 95 → 855; the floor takes 45 back from
    # the rule, so the rule spent 50.
    b = price(
        cart(
            item("a", 1, 1000, unit_cost_minor=900),
            codes=(percent_code("FIVE", 5),),
            rules=(Rule(1, "ten", RuleKind.MIN_QUANTITY, {"min_qty": 1, "percent": 10}),),
        )
    )
    assert b.total_minor == 900
    assert b.capped_minor == 45
    assert b.rule_spend == {1: 50}


def test_margin_floor_never_raises_the_hosts_own_price() -> None:
    # A sample at 0 with a cost, and a bundle priced under the cost: no claw-back, the floor
    # only bounds discounts.
    b = price(
        cart(
            item("sample", 1, 0, unit_cost_minor=250),
            item("x", 1, 1000, product=2, unit_cost_minor=800, bundle_key="k"),
            bundles=(BundleUse("k", 1, "Deal", 700, ("x",)),),
            codes=(percent_code("TEN", 10),),
        )
    )
    # x: 700 is the price; the 10 % code (70) is clawed back since 630 < 700 ≤ floor.
    assert finals(b) == {"sample": 0, "x": 700}
    assert b.capped_minor == 70


# ---------------------------------------------------------------- determinism and JSON


def test_breakdown_json_round_trips_and_names_every_discount() -> None:
    b = price(
        cart(
            item("a", 3, 1000, unit_cost_minor=700),
            codes=(percent_code("TEN", 10), fixed_code("X", 1)),
            rules=(Rule(4, "b2g1", RuleKind.BUY_X_GET_Y, {"buy": 2, "get": 1}),),
        )
    )
    data = b.to_json()
    assert Breakdown.from_json(data) == b
    assert data["rule_spend"] == {"4": b.rule_spend[4]}
    assert all(a["why"] for line in data["lines"] for a in line["adjustments"])


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (Rule(1, "x", RuleKind.MIN_QUANTITY, {"min_qty": 2}), "percent or amount_minor"),
        (Rule(1, "x", RuleKind.MIN_VALUE, {"min_value_minor": 1, "percent": 101}), "percent"),
        (Rule(1, "x", RuleKind.BUY_X_GET_Y, {"buy": 0, "get": 1}), "buy and get"),
        (Rule(1, "x", RuleKind.CHEAPEST_FREE, {"every": 2, "free": 2}), "free"),
        (Rule(1, "x", RuleKind.CHEAPEST_FREE, {"every": 3, "free": 1, "oops": 1}), "unknown"),
    ],
)
def test_bad_rule_params_are_refused(rule: Rule, message: str) -> None:
    with pytest.raises(PopdropError) as caught:
        price(cart(item("a", 1, 100), rules=(rule,)))
    assert caught.value.reason == "invalid_request"
    assert message in str(caught.value)
