"""Published chat flows: versions stored per (org, key), compiled once per process.

A published version never changes, so a compiled flow is cached by (database, org, key,
version) for the life of the process. `publish_default_flow` stores the shipped
`popup_drop` flow for an org.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.chat.flow import Flow, load_compiled, load_flow, shipped_source
from popdrop.chat.models import (
    FlowVersion,
)
from popdrop.core.cache import ProcessCache
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.schemas import is_clean_text
from popdrop.events.models import Event

DEFAULT_FLOW_KEY = "popup_drop"
_KEY = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


# ---------------------------------------------------------------- flows

# (database, org, key, version) -> (flow, bound event): versions never change once stored.
_FLOWS: ProcessCache[tuple[str, int, str, int], tuple[Flow, int | None]] = ProcessCache(
    maxsize=2_048
)


def db_key(session: AsyncSession) -> str:
    return str(session.get_bind().engine.url)


async def publish_flow(
    session: AsyncSession,
    org_id: int,
    key: str,
    source: str,
    *,
    now: datetime,
    event_id: int | None = None,
    created_by: str = "",
) -> FlowVersion:
    """Validate `source` and store it as the next version of `key` (new sessions use it;
    running conversations keep theirs). `FlowError` (invalid_flow) with line and field."""
    if not _KEY.match(key):
        raise PopdropError("invalid_request", "key: lowercase letters, digits, _ and -, at most 64")
    if not is_clean_text(source):
        raise PopdropError("invalid_request", "source: contains characters we cannot store")
    flow = load_flow(source)
    if event_id is not None:
        owner = await session.scalar(select(Event.org_id).where(Event.id == event_id))
        if owner != org_id:
            raise not_found("event")
    for _attempt in range(3):
        latest = await session.scalar(
            select(func.max(FlowVersion.version)).where(
                FlowVersion.org_id == org_id, FlowVersion.key == key
            )
        )
        row = FlowVersion(
            org_id=org_id,
            key=key,
            version=int(latest or 0) + 1,
            event_id=event_id,
            title=flow.title,
            source=source,
            compiled=json.dumps(flow.compiled(), separators=(",", ":")),
            created_at=now,
            created_by=created_by,
        )
        try:
            async with session.begin_nested():
                session.add(row)
                await session.flush()
        except IntegrityError:
            continue  # a concurrent publish took this number
        _FLOWS.put((db_key(session), org_id, key, row.version), (flow, event_id))
        return row
    raise PopdropError("conflict", "this flow is being published by someone else; try again")


async def publish_default_flow(
    session: AsyncSession, org_id: int, event_id: int, *, now: datetime, key: str = DEFAULT_FLOW_KEY
) -> FlowVersion:
    """Publish the shipped "pop-up drop" flow bound to `event_id`."""
    return await publish_flow(
        session, org_id, key, shipped_source("popup_drop"), now=now, event_id=event_id
    )


async def get_flow(
    session: AsyncSession, org_id: int, key: str, version: int
) -> tuple[Flow, int | None]:
    cache_key = (db_key(session), org_id, key, version)
    cached = _FLOWS.get(cache_key)
    if cached is not None:
        return cached
    row = (
        await session.execute(
            select(FlowVersion.compiled, FlowVersion.event_id).where(
                FlowVersion.org_id == org_id,
                FlowVersion.key == key,
                FlowVersion.version == version,
            )
        )
    ).first()
    if row is None:
        raise not_found(f"chat flow {key} version {version}")
    loaded = (load_compiled(json.loads(row.compiled)), row.event_id)
    _FLOWS.put(cache_key, loaded)
    return loaded


async def latest_version(session: AsyncSession, org_id: int, key: str) -> int:
    version = await session.scalar(
        select(func.max(FlowVersion.version)).where(
            FlowVersion.org_id == org_id, FlowVersion.key == key
        )
    )
    if version is None:
        raise PopdropError("not_found", f"no chat flow {key!r} is published")
    return int(version)
