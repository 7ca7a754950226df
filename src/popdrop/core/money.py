"""The one money type: integer minor units plus an ISO 4217 currency code."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from popdrop.core.errors import PopdropError

_CURRENCY = re.compile(r"^[A-Z]{3}$")
# Currencies whose minor unit is not 1/100 (ISO 4217); everything else has two decimals.
_EXPONENT = {"JPY": 0, "KRW": 0, "ISK": 0, "CLP": 0, "VND": 0, "BHD": 3, "KWD": 3, "TND": 3}


@dataclass(frozen=True, slots=True)
class Money:
    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        if not _CURRENCY.match(self.currency):
            raise PopdropError("invalid_request", f"currency {self.currency!r} is not ISO 4217")
        if isinstance(self.amount_minor, bool) or not isinstance(self.amount_minor, int):
            raise PopdropError("invalid_request", "money amounts are integer minor units")

    @classmethod
    def parse(cls, typed: str, currency: str) -> Money:
        """Major units as a person types them ("15.50", "15,50", "15") → exact minor units.

        Decimal arithmetic, never floats. More decimals than the currency has, or anything
        that is not a finite number, is refused (`invalid_request`); so is a currency that
        is not ISO 4217. An empty string is not an amount: callers decide what "blank" means.
        """
        exponent = cls(0, currency).exponent  # checks the currency first
        try:
            minor = Decimal(typed.replace(",", ".")).scaleb(exponent)
            if not minor.is_finite() or minor != minor.to_integral_value():
                raise InvalidOperation
        except InvalidOperation:
            raise PopdropError(
                "invalid_request", f"an amount like 15.50 (at most {exponent} decimals)"
            ) from None
        return cls(int(minor), currency)

    def __add__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.amount_minor + other.amount_minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.amount_minor - other.amount_minor, self.currency)

    def _same(self, other: Money) -> None:
        if other.currency != self.currency:
            raise PopdropError(
                "invalid_request", f"cannot mix {self.currency} and {other.currency}"
            )

    @property
    def exponent(self) -> int:
        return _EXPONENT.get(self.currency, 2)

    def format(self) -> str:
        """`12.50 EUR` — exact, no floats."""
        exp = self.exponent
        sign = "-" if self.amount_minor < 0 else ""
        whole, frac = (
            divmod(abs(self.amount_minor), 10**exp) if exp else (abs(self.amount_minor), 0)
        )
        text = f"{whole}.{frac:0{exp}d}" if exp else f"{whole}"
        return f"{sign}{text} {self.currency}"

    def __str__(self) -> str:
        return self.format()
