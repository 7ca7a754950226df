"""A/B winners: deterministic statistics, no database, no scipy.

`decide` picks a winner from per-variant outcomes (sent, converted — clicks or RSVPs, as
the drop's metric says). The first variant is the control.

- ``z_test``: a two-proportion z-test with the pooled standard error (the textbook test
  for "are these two rates different?"). With more than one challenger each challenger is
  compared with the control and the p-values are Bonferroni-adjusted (multiplied by the
  number of comparisons), so testing three subjects does not triple the false-winner rate.
- ``bayes``: the probability that a challenger's true rate beats the control's, from
  Beta(1 + converted, 1 + sent - converted) posteriors (uniform prior), computed with the
  exact closed-form sum for two Beta variables — deterministic, unlike Monte Carlo.

Nothing significant, or any variant under ``min_sample`` sends → ``significant=False``
with the reason, and the configured fallback (the control wins, or nobody) applies.

`split` and `in_test_sample` assign contacts deterministically from a keyed BLAKE2b hash
of (drop, contact), so a resumed or re-run send puts everyone in the same arm.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Literal

from popdrop.core.errors import PopdropError

Method = Literal["z_test", "bayes"]
Fallback = Literal["control", "none"]
Reason = Literal["significant", "not_significant", "below_min_sample"]


@dataclass(frozen=True)
class VariantOutcome:
    variant: str
    sent: int
    converted: int

    @property
    def rate(self) -> float:
        return self.converted / self.sent if self.sent else 0.0


@dataclass(frozen=True)
class Decision:
    """`reason` says why (machine-readable); `fallback_applied` says which fallback chose
    `winner` when the data could not ("control" or "none"), else None. `lift`, `p_value`
    and `confidence_interval` describe the reported comparison: the winning challenger vs
    the control, or — when no challenger won — the best-performing challenger vs the
    control. `p_value` is already Bonferroni-adjusted when there are several challengers;
    the interval is of the absolute difference in rates (challenger - control) at the
    matching (adjusted) confidence level."""

    winner: str | None
    significant: bool
    reason: Reason
    message: str
    lift: float | None = None
    p_value: float | None = None
    confidence_interval: tuple[float, float] | None = None
    probability_to_beat: dict[str, float] | None = None
    fallback_applied: Fallback | None = None
    compared: str | None = None  # the challenger that lift / p_value / CI refer to


# ---------------------------------------------------------------------------- statistics


def normal_cdf(x: float) -> float:
    """Φ(x) via erfc: accurate in both tails (1 - erf would cancel to 0 for large x)."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def z_test(control: VariantOutcome, challenger: VariantOutcome) -> tuple[float, float]:
    """Two-sided two-proportion z-test with the pooled standard error → (z, p-value).

    Identical rates, or a pooled rate of 0 or 1 (no variance to test), give z = 0, p = 1.
    """
    n1, n2 = control.sent, challenger.sent
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    pooled = (control.converted + challenger.converted) / (n1 + n2)
    variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if variance <= 0.0:
        return 0.0, 1.0
    z = (challenger.rate - control.rate) / math.sqrt(variance)
    # Two-sided: P(|Z| ≥ |z|) = erfc(|z| / √2), computed directly so tiny p-values survive.
    p = math.erfc(abs(z) / math.sqrt(2.0))
    return z, min(1.0, max(0.0, p))


def difference_interval(
    control: VariantOutcome, challenger: VariantOutcome, *, alpha: float
) -> tuple[float, float]:
    """Wald interval of challenger.rate - control.rate at level 1 - alpha. It uses the
    unpooled standard error: the interval estimates the difference rather than testing
    "no difference", so it must not assume the rates are equal."""
    p1, p2 = control.rate, challenger.rate
    se = math.sqrt(p1 * (1 - p1) / max(control.sent, 1) + p2 * (1 - p2) / max(challenger.sent, 1))
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
    diff = p2 - p1
    return diff - z * se, diff + z * se


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _prob_beta_greater(a_x: int, b_x: int, a_y: int, b_y: int) -> float:
    """P(X > Y) for X ~ Beta(a_x, b_x), Y ~ Beta(a_y, b_y), integer a_x (closed form):

        Σ_{i=0}^{a_x-1} B(a_y + i, b_x + b_y) / ((b_x + i) · B(1 + i, b_x) · B(a_y, b_y))

    Every term is positive, so summing them (in log space per term) is numerically stable
    — no cancellation — and exact up to floating-point rounding."""
    log_norm = _log_beta(a_y, b_y)
    total = 0.0
    for i in range(a_x):
        total += math.exp(
            _log_beta(a_y + i, b_x + b_y) - math.log(b_x + i) - _log_beta(1 + i, b_x) - log_norm
        )
    return min(1.0, max(0.0, total))


def probability_to_beat(control: VariantOutcome, challenger: VariantOutcome) -> float:
    """P(challenger's true rate > control's) under uniform Beta(1, 1) priors."""
    a_c, b_c = 1 + challenger.converted, 1 + challenger.sent - challenger.converted
    a_k, b_k = 1 + control.converted, 1 + control.sent - control.converted
    # The sum has a_x terms; use the side with fewer conversions (P(X>Y) = 1 - P(Y>X) for
    # continuous variables) so big campaigns cost as little as possible.
    if a_c <= a_k:
        return _prob_beta_greater(a_c, b_c, a_k, b_k)
    return 1.0 - _prob_beta_greater(a_k, b_k, a_c, b_c)


# ------------------------------------------------------------------------------- decide


def _validate(outcomes: list[VariantOutcome]) -> None:
    if len(outcomes) < 2:
        raise PopdropError("invalid_request", "an A/B test needs at least two variants")
    names = [o.variant for o in outcomes]
    if len(set(names)) != len(names):
        raise PopdropError("invalid_request", f"variant names must be unique: {names}")
    for o in outcomes:
        if o.sent < 0 or o.converted < 0 or o.converted > o.sent:
            raise PopdropError(
                "invalid_request",
                f"variant {o.variant}: need 0 ≤ converted ≤ sent, got {o.converted}/{o.sent}",
            )


def _pct(x: float) -> str:
    return f"{x * 100:+.0f} %" if abs(x) >= 0.1 else f"{x * 100:+.1f} %"


def _pts(x: float) -> str:
    return f"{x * 100:+.2f}"


def _prob(p: float) -> str:
    # "100.0 %" would overstate certainty: clamp the display, keep the float exact.
    if p > 0.999:
        return "> 99.9 %"
    if p < 0.001:
        return "< 0.1 %"
    return f"{p * 100:.1f} %"


def _p(p: float) -> str:
    return "p < 0.0001" if p < 0.0001 else f"p = {p:.4f}"


def decide(
    outcomes: list[VariantOutcome],
    *,
    min_sample: int = 200,
    alpha: float = 0.05,
    probability_threshold: float = 0.95,
    method: Method = "z_test",
    fallback: Fallback = "control",
    metric_label: str = "conversion rate",
) -> Decision:
    """Pick the winner. `outcomes[0]` is the control; see the module docstring."""
    _validate(outcomes)
    if not 0.0 < alpha < 1.0 or not 0.5 <= probability_threshold < 1.0:
        raise PopdropError("invalid_request", "need 0 < alpha < 1 and 0.5 ≤ threshold < 1")
    control, challengers = outcomes[0], outcomes[1:]
    k = len(challengers)
    fallback_winner = control.variant if fallback == "control" else None
    fallback_text = (
        f"the control ({control.variant}) goes to the rest"
        if fallback == "control"
        else "no winner is sent"
    )

    def fallback_decision(reason: Reason, why: str, base: Decision | None = None) -> Decision:
        return replace(
            base or Decision(winner=None, significant=False, reason=reason, message=""),
            winner=fallback_winner,
            significant=False,
            reason=reason,
            message=f"{why}; {fallback_text}.",
            fallback_applied=fallback,
        )

    small = [o for o in outcomes if o.sent < min_sample]
    if small:
        names = ", ".join(f"{o.variant} ({o.sent} sent)" for o in small)
        return fallback_decision(
            "below_min_sample", f"Not enough data: below the minimum of {min_sample} for {names}"
        )

    p_beat = {c.variant: probability_to_beat(control, c) for c in challengers}
    # Bonferroni: each of the k comparisons is run at alpha / k.
    adj_alpha = alpha / k
    tests = {c.variant: z_test(control, c) for c in challengers}
    adj_p = {name: min(1.0, p * k) for name, (_, p) in tests.items()}

    if method == "z_test":
        better = [c for c in challengers if tests[c.variant][0] > 0 and adj_p[c.variant] < alpha]
        all_worse = all(tests[c.variant][0] < 0 and adj_p[c.variant] < alpha for c in challengers)
    else:
        better = [c for c in challengers if p_beat[c.variant] >= probability_threshold]
        all_worse = all(1.0 - p_beat[c.variant] >= probability_threshold for c in challengers)

    # Among the challengers that beat the control, the one with the best observed rate
    # wins; the comparison reported is that one, else the best challenger overall.
    winner_c = max(better, key=lambda c: c.rate) if better else None
    shown = winner_c or max(challengers, key=lambda c: c.rate)
    lift = (shown.rate - control.rate) / control.rate if control.rate > 0 else None
    ci = difference_interval(control, shown, alpha=adj_alpha)
    stats = Decision(
        winner=None,
        significant=False,
        reason="not_significant",
        message="",
        lift=lift,
        p_value=adj_p[shown.variant],
        confidence_interval=ci,
        probability_to_beat=p_beat,
        compared=shown.variant,
    )
    level = f"{(1 - adj_alpha) * 100:.4g} %"
    ci_text = f"{level} CI {_pts(ci[0])} to {_pts(ci[1])} pts"
    if method == "z_test":
        evidence = _p(adj_p[shown.variant])
        if k > 1:
            evidence += f", Bonferroni-adjusted for {k} comparisons"
    else:
        evidence = f"P({shown.variant} beats {control.variant}) = {_prob(p_beat[shown.variant])}"
    lift_text = f"{_pct(lift)} {metric_label}" if lift is not None else metric_label

    if winner_c is not None:
        return replace(
            stats,
            winner=winner_c.variant,
            significant=True,
            reason="significant",
            message=(
                f"{winner_c.variant} beats {control.variant}: {lift_text} ({ci_text}), {evidence}"
            ),
        )
    if all_worse:
        others = ", ".join(c.variant for c in challengers)
        return replace(
            stats,
            winner=control.variant,
            significant=True,
            reason="significant",
            message=(
                f"{control.variant} (control) beats {others}: {shown.variant} is "
                f"{lift_text} ({ci_text}), {evidence}"
            ),
        )
    return fallback_decision(
        "not_significant",
        f"No significant difference: {shown.variant} vs {control.variant} "
        f"{lift_text} ({ci_text}), {evidence}",
        stats,
    )


# ------------------------------------------------------------------------- assignment


def _unit(contact_id: int, drop_id: int, purpose: bytes) -> int:
    """A 64-bit value uniform over [0, 2**64) for (drop, contact). BLAKE2b is stable across
    processes and Python versions (unlike `hash()`, which is salted per process); the
    `person` tag gives each purpose an independent hash, so the test-sample draw does not
    correlate with the variant draw (otherwise a 20 % sample would all land in arm A)."""
    digest = hashlib.blake2b(
        f"{drop_id}:{contact_id}".encode(), digest_size=8, person=purpose
    ).digest()
    return int.from_bytes(digest, "big")


def split(contact_id: int, drop_id: int, variants: list[tuple[str, int]]) -> str:
    """The variant for this contact, by split weights (percentages; any positive total).

    Integer arithmetic maps the hash onto [0, total) exactly, so a 50/50 split is 50/50."""
    if not variants:
        raise PopdropError("invalid_request", "no variants to split between")
    if any(weight < 0 for _, weight in variants):
        raise PopdropError("invalid_request", "split percentages must not be negative")
    total = sum(weight for _, weight in variants)
    if total <= 0:
        raise PopdropError("invalid_request", "split percentages must add up to more than 0")
    bucket = (_unit(contact_id, drop_id, b"popdrop-ab-split") * total) >> 64
    for name, weight in variants:
        if bucket < weight:
            return name
        bucket -= weight
    raise AssertionError("unreachable: bucket < total")  # pragma: no cover


def in_test_sample(contact_id: int, drop_id: int, fraction: float) -> bool:
    """Whether this contact belongs to the test phase (a `fraction` of the audience); the
    rest wait for the winner. fraction ≥ 1 → everyone, ≤ 0 → nobody."""
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    return _unit(contact_id, drop_id, b"popdrop-ab-test") < int(fraction * 2**64)
