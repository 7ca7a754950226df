"""Tenancy: "this organization's row, or 404" — the one lookup every domain uses.

Rules:
- A row is found only by its id AND its organization, so another tenant's id answers
  exactly like an id that does not exist: `not_found` ("<what> not found", HTTP 404),
  never 403, so ids of other organizations cannot be probed.
- `what` names the thing in the message ("event not found"); by default the model's
  class name in lower case, which is what the messages have always said.
- `where` adds conditions that must hold too (e.g. the lane belongs to this event); a row
  failing them is also "not found".
- `lock` takes the row lock (`SELECT … FOR UPDATE`) for a read-modify-write; `fresh`
  re-reads the columns even when the row is already in the session (`populate_existing`),
  for rows other transactions change under us (conversations, jobs, drops).
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.core.errors import not_found

T = TypeVar("T")


async def owned(
    session: AsyncSession,
    model: type[T],
    row_id: int,
    org_id: int,
    *,
    what: str | None = None,
    where: tuple[Any, ...] = (),
    lock: bool = False,
    fresh: bool = False,
) -> T:
    """The `model` row with id `row_id` of organization `org_id`, or `not_found(what)`."""
    columns: Any = model  # every tenant model has `id` and `org_id` columns
    query = select(columns).where(columns.id == row_id, columns.org_id == org_id, *where)
    if lock:
        query = query.with_for_update()
    if fresh:
        query = query.execution_options(populate_existing=True)
    row = await session.scalar(query)
    if row is None:
        raise not_found(what or model.__name__.lower())
    found: T = row
    return found
