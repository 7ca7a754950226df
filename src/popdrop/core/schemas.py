"""I/O models shared by every domain's API.

Rules every request body keeps (`StrictInput`): unknown fields, NUL and lone surrogates
are refused, and so is `true`/`false` where a number is expected (pydantic's lax mode
would read `"quantity": true` as 1).
"""

from __future__ import annotations

import functools
from typing import Any, Literal, get_args, get_origin

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


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(value, bool) for value in get_args(annotation))
    return any(_accepts_bool(arg) for arg in get_args(annotation))


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, list | tuple) and any(isinstance(v, bool) for v in value)


@functools.cache
def _no_bool_fields(model: type[BaseModel]) -> tuple[tuple[str, str], ...]:
    """(input key, field name) of the fields whose type has no place for a bool."""
    return tuple(
        (info.alias or name, name)
        for name, info in model.model_fields.items()
        if not _accepts_bool(info.annotation)
    )


class StrictInput(BaseModel):
    """Base of every request body: unknown fields, unstorable text and booleans given for
    numbers are refused."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _clean_text(cls, data: Any) -> Any:
        if not _all_clean(data):
            raise ValueError("text contains NUL or invalid unicode characters")
        if isinstance(data, dict):
            for key, name in _no_bool_fields(cls):
                if _has_bool(data.get(key)):
                    raise ValueError(f"{name}: true/false is not a number")
        return data
