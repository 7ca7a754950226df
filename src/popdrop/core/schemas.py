"""I/O models shared by every domain's API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from popdrop.core.errors import PopdropError


class ErrorBody(BaseModel):
    reason: str
    message: str


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the refusals a route can give."""
    return {status: {"model": ErrorBody} for status in statuses}


def is_clean_text(value: str) -> bool:
    """No NUL and no lone surrogates: both are valid JSON but no database stores them."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def require_clean_text(value: str, field: str) -> str:
    if not is_clean_text(value):
        raise PopdropError("invalid_request", f"{field}: contains characters we cannot store")
    return value


def _all_clean(value: Any) -> bool:
    if isinstance(value, str):
        return is_clean_text(value)
    if isinstance(value, dict):
        return all(_all_clean(k) and _all_clean(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_all_clean(v) for v in value)
    return True


class StrictInput(BaseModel):
    """Base of every request body: unknown fields and unstorable text are refused."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _clean_text(cls, data: Any) -> Any:
        if not _all_clean(data):
            raise ValueError("text contains NUL or invalid unicode characters")
        return data
