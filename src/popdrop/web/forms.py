"""Operator forms: what was typed (to show it again) and what is wrong with it, per field.

Values are validated with the API's own pydantic schemas (`Form.build`), so a page and
the API refuse the same input for the same reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ValidationError

from popdrop.core.errors import PopdropError
from popdrop.core.money import Money

M = TypeVar("M", bound=BaseModel)
_FRIENDLY = {
    "missing": "required",
    "string_pattern_mismatch": "lowercase letters, digits and dashes",
    "int_parsing": "a whole number",
}


@dataclass
class Form:
    """A form as typed (to show it again) and what is wrong with it, per field."""

    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.problems

    def integer(self, name: str) -> int | None:
        raw = self.values.get(name, "").replace(",", "").replace("_", "")
        if not raw:
            return None
        try:
            return int(raw)
        except ValueError:
            self.errors[name] = "a whole number"
            return None

    def moment(self, name: str, zone: ZoneInfo | None) -> datetime | None:
        """A datetime-local value is wall time in the event's zone; stored in UTC."""
        raw = self.values.get(name, "")
        if not raw:
            return None
        try:
            value = datetime.fromisoformat(raw)
        except ValueError:
            self.errors[name] = "a date and time"
            return None
        if zone is None:  # the zone's own error is shown; the time is read as UTC meanwhile
            zone = ZoneInfo("UTC")
        try:
            return (value if value.tzinfo else value.replace(tzinfo=zone)).astimezone(UTC)
        except OverflowError:
            self.errors[name] = "a date between the years 1 and 9999"
            return None

    def amount(self, name: str, currency: str) -> int | None:
        """Major units as typed ("15.50") to integer minor units, exactly (`Money.parse`)."""
        raw = self.values.get(name, "")
        if not raw:
            return None
        try:
            Money(0, currency)
        except PopdropError:
            return None  # the currency's own error is reported by the schema
        try:
            return Money.parse(raw, currency).amount_minor
        except PopdropError as error:
            self.errors[name] = error.message  # "an amount like 15.50 (at most 2 decimals)"
            return None

    def build(
        self, model: type[M], data: dict[str, Any], names: Mapping[str, str] | None = None
    ) -> M | None:
        """Validate with the API's schema; errors land on the form field they belong to."""
        clean = {k: v for k, v in data.items() if v is not None and k not in self.errors}
        try:
            spec = model.model_validate(clean)
        except ValidationError as exc:
            for problem in exc.errors():
                message = _FRIENDLY.get(problem["type"]) or str(problem["msg"]).removeprefix(
                    "Value error, "
                )
                loc = [str(p) for p in problem["loc"]]
                name = (names or {}).get(loc[0], loc[0]) if loc else ""
                if name in self.values or name in (names or {}).values():
                    self.errors.setdefault(name, message)
                else:
                    self.problems.append(f"{name}: {message}" if name else message)
            return None
        return spec if self.ok else None


def form_of(data: Mapping[str, Any]) -> Form:
    return Form(values={k: str(v).strip() for k, v in data.items() if k != "csrf"})
