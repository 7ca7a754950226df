"""`Money.parse`: major units as typed → exact integer minor units, never through a float."""

from __future__ import annotations

import pytest

from popdrop.core.errors import PopdropError
from popdrop.core.money import Money


@pytest.mark.parametrize(
    ("typed", "currency", "minor"),
    [
        ("15.50", "EUR", 1550),
        ("15,50", "EUR", 1550),
        ("15", "EUR", 1500),
        ("0.1", "EUR", 10),
        ("0.29", "EUR", 29),  # 0.29 * 100 is 28.999999999999996 as a float
        ("1e3", "EUR", 100_000),
        ("-4.5", "EUR", -450),
        ("1500", "JPY", 1500),
        ("1.234", "KWD", 1234),
        ("19.99", "USD", 1999),
    ],
)
def test_amounts_parse_exactly(typed: str, currency: str, minor: int) -> None:
    assert Money.parse(typed, currency) == Money(minor, currency)


@pytest.mark.parametrize(
    ("typed", "currency", "decimals"),
    [
        ("15.505", "EUR", 2),
        ("1.5", "JPY", 0),
        ("abc", "EUR", 2),
        ("", "EUR", 2),
        ("NaN", "EUR", 2),
        ("Infinity", "EUR", 2),
        ("1,000.50", "EUR", 2),
    ],
)
def test_amounts_that_are_not_exact_are_refused(typed: str, currency: str, decimals: int) -> None:
    with pytest.raises(PopdropError) as refused:
        Money.parse(typed, currency)
    assert refused.value.reason == "invalid_request"
    assert refused.value.message == f"an amount like 15.50 (at most {decimals} decimals)"


def test_an_unknown_currency_is_refused_before_the_amount() -> None:
    with pytest.raises(PopdropError) as refused:
        Money.parse("abc", "euro")
    assert "ISO 4217" in refused.value.message
