"""Request parameters every router shares: the app context, bounded ids, paging, and the
`Idempotency-Key` header."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path, Query

from popdrop.web.context import AppContext, request_ctx

Ctx = Annotated[AppContext, Depends(request_ctx)]
# Ids are 64-bit in the database: anything outside answers 422, never an overflow 500.
ItemId = Annotated[int, Path(ge=1, le=2**62)]
Limit = Annotated[int, Query(ge=1, le=1000)]
Before = Annotated[int | None, Query(ge=1, le=2**62)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key", max_length=200, description="Retry-safe: same key, same answer"
    ),
]
