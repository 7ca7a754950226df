"""A/B statistics: seeded simulations, textbook values, properties, deterministic splits."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popdrop.core.errors import PopdropError
from popdrop.drops.abtest import (
    Method,
    VariantOutcome,
    decide,
    in_test_sample,
    normal_cdf,
    probability_to_beat,
    split,
    z_test,
)


def simulate(rng: random.Random, name: str, sent: int, rate: float) -> VariantOutcome:
    return VariantOutcome(name, sent, sum(rng.random() < rate for _ in range(sent)))


# ----------------------------------------------------------------------- acceptance


@pytest.mark.parametrize("method", ["z_test", "bayes"])
def test_true_two_fold_lift_is_detected(method: Method) -> None:
    # 2 % vs 4 % click rate, 3,000 each: the expected z is ≈ 4.5, so detection is not luck;
    # several seeds make sure of it.
    for seed in range(5):
        rng = random.Random(seed)
        a = simulate(rng, "A", 3000, 0.02)
        b = simulate(rng, "B", 3000, 0.04)
        d = decide([a, b], method=method, metric_label="click rate")
        assert d.significant, d.message
        assert d.winner == "B"
        assert d.reason == "significant"
        assert d.fallback_applied is None
        assert d.lift is not None and d.lift > 0.3
        assert d.p_value is not None and d.p_value < 0.01
        assert d.confidence_interval is not None
        low, high = d.confidence_interval
        assert 0 < low < 0.02 < high  # the true difference, 2 points, lies inside
        assert d.probability_to_beat is not None and d.probability_to_beat["B"] > 0.99
        assert d.message.startswith("B beats A: +")
        assert "click rate" in d.message


@pytest.mark.parametrize("method", ["z_test", "bayes"])
def test_no_difference_is_not_significant_and_fallback_applies(method: Method) -> None:
    rng = random.Random(42)
    a = simulate(rng, "A", 3000, 0.03)
    b = simulate(rng, "B", 3000, 0.03)
    d = decide([a, b], method=method)
    assert not d.significant
    assert d.reason == "not_significant"
    assert d.winner == "A"  # fallback: the control goes to the rest
    assert d.fallback_applied == "control"
    assert "No significant difference" in d.message and "control (A)" in d.message
    assert d.p_value is not None and d.p_value >= 0.05
    assert d.confidence_interval is not None
    assert d.confidence_interval[0] < 0 < d.confidence_interval[1]

    none = decide([a, b], method=method, fallback="none")
    assert none.winner is None and none.fallback_applied == "none"
    assert "no winner" in none.message


def test_no_difference_rarely_declares_a_winner() -> None:
    # Type I error: over 200 seeded A/A tests the false-winner rate stays near alpha.
    rng = random.Random(2024)
    winners = sum(
        decide([simulate(rng, "A", 1000, 0.05), simulate(rng, "B", 1000, 0.05)]).significant
        for _ in range(200)
    )
    assert winners <= 20  # alpha = 5 % → expected 10, binomial sd ≈ 3


def test_below_min_sample_says_so() -> None:
    d = decide([VariantOutcome("A", 150, 3), VariantOutcome("B", 150, 30)], min_sample=200)
    assert not d.significant
    assert d.reason == "below_min_sample"
    assert d.winner == "A" and d.fallback_applied == "control"
    assert "minimum of 200" in d.message and "A (150 sent)" in d.message
    assert d.p_value is None

    d = decide(
        [VariantOutcome("A", 5000, 100), VariantOutcome("B", 199, 30)],
        min_sample=200,
        fallback="none",
    )
    assert d.reason == "below_min_sample" and d.winner is None
    assert "B (199 sent)" in d.message and "A (" not in d.message


def test_control_can_win() -> None:
    d = decide([VariantOutcome("A", 3000, 120), VariantOutcome("B", 3000, 60)])
    assert d.significant and d.winner == "A"
    assert d.lift is not None and d.lift == pytest.approx(-0.5)
    assert d.message.startswith("A (control) beats B")


def test_bonferroni_for_more_than_two_variants() -> None:
    a = VariantOutcome("A", 3000, 90)  # 3.0 %
    b = VariantOutcome("B", 3000, 92)
    c = VariantOutcome("C", 3000, 120)  # 4.0 %: raw p ≈ 0.035, significant alone …
    _, raw_p = z_test(a, c)
    assert 0.025 < raw_p < 0.05
    alone = decide([a, c])
    assert alone.significant and alone.winner == "C"
    # … but not after correcting for two comparisons.
    d = decide([a, b, c])
    assert not d.significant and d.reason == "not_significant"
    assert d.compared == "C"
    assert d.p_value == pytest.approx(min(1.0, raw_p * 2))
    assert "Bonferroni" in d.message and "97.5 % CI" in d.message
    # A clear winner among three still wins.
    strong = decide([a, b, VariantOutcome("C", 3000, 180)])
    assert strong.significant and strong.winner == "C"


def test_invalid_input_is_refused() -> None:
    with pytest.raises(PopdropError) as e:
        decide([VariantOutcome("A", 10, 1)])
    assert e.value.reason == "invalid_request"
    with pytest.raises(PopdropError):
        decide([VariantOutcome("A", 10, 11), VariantOutcome("B", 10, 1)])
    with pytest.raises(PopdropError):
        decide([VariantOutcome("A", 10, 1), VariantOutcome("A", 10, 1)])


# ------------------------------------------------------------------ textbook values


def test_z_test_textbook_value() -> None:
    # Control 100/1000 (10 %), challenger 130/1000 (13 %). By hand:
    #   pooled p = 230 / 2000 = 0.115
    #   SE = sqrt(0.115 · 0.885 · (1/1000 + 1/1000)) = sqrt(0.00020355) = 0.014267
    #   z = (0.13 - 0.10) / 0.014267 = 2.1027
    #   two-sided p = 2 · (1 - Φ(2.1027)) = 2 · (1 - 0.98226) = 0.0355  (normal table)
    z, p = z_test(VariantOutcome("A", 1000, 100), VariantOutcome("B", 1000, 130))
    assert z == pytest.approx(2.1027, abs=1e-4)
    assert p == pytest.approx(0.0355, abs=1e-4)
    assert normal_cdf(1.959964) == pytest.approx(0.975, abs=1e-6)
    assert normal_cdf(0.0) == 0.5
    # Equal rates, or no conversions at all: nothing to test.
    assert z_test(VariantOutcome("A", 500, 0), VariantOutcome("B", 500, 0)) == (0.0, 1.0)


def test_confidence_interval_textbook_value() -> None:
    # Unpooled SE = sqrt(0.10·0.90/1000 + 0.13·0.87/1000) = sqrt(0.0002031) = 0.014251;
    # 95 % CI = 0.03 ± 1.959964 · 0.014251 = (0.00207, 0.05793).
    d = decide([VariantOutcome("A", 1000, 100), VariantOutcome("B", 1000, 130)])
    assert d.confidence_interval == pytest.approx((0.00207, 0.05793), abs=1e-5)
    assert d.lift == pytest.approx(0.30)
    assert d.message == "B beats A: +30 % conversion rate (95 % CI +0.21 to +5.79 pts), p = 0.0355"


def test_probability_to_beat_known_values() -> None:
    # Beta(1,1) vs Beta(1,1): 1/2. Beta(2,1) (pdf 2x) vs Beta(1,1): ∫ 2x · x dx = 2/3.
    assert probability_to_beat(VariantOutcome("A", 0, 0), VariantOutcome("B", 0, 0)) == (
        pytest.approx(0.5)
    )
    assert probability_to_beat(VariantOutcome("A", 0, 0), VariantOutcome("B", 1, 1)) == (
        pytest.approx(2 / 3)
    )
    assert probability_to_beat(VariantOutcome("A", 1, 1), VariantOutcome("B", 0, 0)) == (
        pytest.approx(1 / 3)
    )


def test_probability_to_beat_matches_seeded_monte_carlo() -> None:
    a, b = VariantOutcome("A", 400, 12), VariantOutcome("B", 400, 20)
    exact = probability_to_beat(a, b)
    rng = random.Random(7)
    n = 100_000
    hits = sum(
        rng.betavariate(21, 381) > rng.betavariate(13, 389)  # Beta(1 + conv, 1 + misses)
        for _ in range(n)
    )
    assert exact == pytest.approx(hits / n, abs=0.006)  # ≈ 4 Monte Carlo standard errors
    assert 0.5 < exact < 1


outcome_pairs = st.integers(min_value=1, max_value=5000).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(min_value=0, max_value=n))
)


@settings(max_examples=200, deadline=None)
@given(outcome_pairs, outcome_pairs)
def test_p_value_in_range_and_symmetric(a: tuple[int, int], b: tuple[int, int]) -> None:
    va, vb = VariantOutcome("A", *a), VariantOutcome("B", *b)
    z1, p1 = z_test(va, vb)
    z2, p2 = z_test(vb, va)
    assert 0.0 <= p1 <= 1.0
    assert p1 == pytest.approx(p2, rel=1e-12, abs=1e-300)
    assert z1 == pytest.approx(-z2, rel=1e-12, abs=1e-12)
    d1 = decide([va, vb], min_sample=1)
    d2 = decide([vb, va], min_sample=1)
    assert d1.p_value == pytest.approx(d2.p_value, rel=1e-12, abs=1e-300)
    # Whoever wins significantly wins in both orders.
    if d1.significant:
        assert d2.significant and d1.winner == d2.winner


@settings(max_examples=100, deadline=None)
@given(outcome_pairs, outcome_pairs)
def test_probability_to_beat_is_complementary(a: tuple[int, int], b: tuple[int, int]) -> None:
    va, vb = VariantOutcome("A", *a), VariantOutcome("B", *b)
    p = probability_to_beat(va, vb)
    assert 0.0 <= p <= 1.0
    assert p + probability_to_beat(vb, va) == pytest.approx(1.0, abs=1e-9)


# ----------------------------------------------------------------------- assignment


def test_split_honours_percentages_and_is_stable() -> None:
    variants = [("A", 50), ("B", 30), ("C", 20)]
    counts = Counter(split(cid, 17, variants) for cid in range(100_000))
    for name, pct in variants:
        # binomial sd at 100k is ≤ 0.16 points; 0.6 points is ~4 sd
        assert abs(counts[name] / 100_000 - pct / 100) < 0.006, counts
    # Stable: the same answer every time, and a known value pinned so a change of hash
    # (which would move everyone mid-test after a resume) fails loudly.
    assert [split(cid, 17, variants) for cid in range(20)] == [
        split(cid, 17, variants) for cid in range(20)
    ]
    pinned = "".join(split(cid, 1, [("A", 50), ("B", 50)]) for cid in range(16))
    assert pinned == PINNED_SPLIT
    # Different drops shuffle differently.
    assert sum(split(c, 1, variants) != split(c, 2, variants) for c in range(1000)) > 400


PINNED_SPLIT = "ABAAABBAAAAAABAA"


def test_split_edge_cases() -> None:
    assert {split(c, 3, [("A", 100), ("B", 0)]) for c in range(1000)} == {"A"}
    assert {split(c, 3, [("only", 1)]) for c in range(100)} == {"only"}
    with pytest.raises(PopdropError):
        split(1, 1, [])
    with pytest.raises(PopdropError):
        split(1, 1, [("A", 0), ("B", 0)])


def test_test_sample_fraction_and_independence_from_split() -> None:
    ids = range(100_000)
    sample = [c for c in ids if in_test_sample(c, 9, 0.2)]
    assert abs(len(sample) / 100_000 - 0.2) < 0.005
    # The sample is split like everyone else: the two hashes are independent.
    arms = Counter(split(c, 9, [("A", 50), ("B", 50)]) for c in sample)
    assert abs(arms["A"] / len(sample) - 0.5) < 0.015
    assert all(in_test_sample(c, 9, 1.0) for c in range(100))
    assert not any(in_test_sample(c, 9, 0.0) for c in range(100))
    assert [in_test_sample(c, 9, 0.2) for c in range(50)] == [
        in_test_sample(c, 9, 0.2) for c in range(50)
    ]
    # Growing the fraction only adds contacts (nobody leaves the sample).
    assert set(sample) <= {c for c in ids if in_test_sample(c, 9, 0.3)}
