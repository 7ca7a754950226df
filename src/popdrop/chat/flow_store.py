"""Published chat flows: versions stored per (org, key), compiled once per process.

Rules:
- A published version never changes: a compiled flow is cached by (database, org, key,
  version) for the life of the process, and a conversation keeps the version its session
  started on (a new session takes the latest). Publishing is validation first (`FlowError`,
  reason `invalid_flow`, every error with its line and field), then the next number.
- A version is bound to an event (`event_id`) or unbound. An unbound version binds each new
  session to the organization's next open event (published or live, not over yet), so one
  flow follows the organization from pop-up to pop-up.
- An organization that never published the default key (`popup_drop`) starts from the
  shipped flow: the first session that needs it stores it as version 1, unbound, by
  `SHIPPED_BY` (`session_flow`). Without any open event there is nothing to offer and no
  flow starts (`not_found`); keywords still answer.

`publish_default_flow` stores the shipped flow bound to one event (the demo).
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
from popdrop.core import audit
from popdrop.core.cache import ProcessCache
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.schemas import is_clean_text
from popdrop.events.lifecycle import OPEN_EVENT_STATUSES
from popdrop.events.models import Event

DEFAULT_FLOW_KEY = "popup_drop"
SHIPPED_BY = "popdrop:shipped"
MAX_SOURCE = 200_000
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
    check_key(key)
    if not is_clean_text(source):
        raise PopdropError("invalid_request", "source: contains characters we cannot store")
    if len(source) > MAX_SOURCE:
        raise PopdropError("invalid_request", f"source: at most {MAX_SOURCE} characters")
    flow = load_flow(source)
    if event_id is not None:
        owner = await session.scalar(select(Event.org_id).where(Event.id == event_id))
        if owner != org_id:
            raise not_found("event")
    for _attempt in range(3):
        latest = await _latest(session, org_id, key)
        row = _version_row(org_id, key, (latest or 0) + 1, flow, source, event_id, now, created_by)
        try:
            async with session.begin_nested():
                session.add(row)
                await session.flush()
        except IntegrityError:
            continue  # a concurrent publish took this number
        _FLOWS.put((db_key(session), org_id, key, row.version), (flow, event_id))
        await audit.append(
            session,
            org_id=org_id,
            actor=created_by or "system",
            action="chat.flow.publish",
            subject=f"chat-flow:{key}",
            payload={"key": key, "version": row.version, "event": event_id, "title": flow.title},
            at=now,
        )
        return row
    raise PopdropError("conflict", "this flow is being published by someone else; try again")


def _version_row(
    org_id: int,
    key: str,
    version: int,
    flow: Flow,
    source: str,
    event_id: int | None,
    now: datetime,
    created_by: str,
) -> FlowVersion:
    return FlowVersion(
        org_id=org_id,
        key=key,
        version=version,
        event_id=event_id,
        title=flow.title,
        source=source,
        compiled=json.dumps(flow.compiled(), separators=(",", ":")),
        created_at=now,
        created_by=created_by,
    )


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise PopdropError("invalid_request", "key: lowercase letters, digits, _ and -, at most 64")
    return key


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
    version = await _latest(session, org_id, key)
    if version is None:
        raise PopdropError("not_found", f"no chat flow {key!r} is published")
    return version


async def next_open_event_id(session: AsyncSession, org_id: int, now: datetime) -> int | None:
    """The organization's next open event (published or live, not over): the event an
    unbound flow version offers."""
    found = await session.scalar(
        select(Event.id)
        .where(Event.org_id == org_id, Event.status.in_(OPEN_EVENT_STATUSES), Event.ends_at > now)
        .order_by(Event.starts_at, Event.id)
        .limit(1)
    )
    return None if found is None else int(found)


async def _latest(session: AsyncSession, org_id: int, key: str) -> int | None:
    version = await session.scalar(
        select(func.max(FlowVersion.version)).where(
            FlowVersion.org_id == org_id, FlowVersion.key == key
        )
    )
    return None if version is None else int(version)


async def _store_shipped(session: AsyncSession, org_id: int, key: str, now: datetime) -> int:
    """Store the shipped flow as version 1 of `key`, unbound; a concurrent first session
    that stored it already wins (its version 1 is used)."""
    source = shipped_source("popup_drop")
    flow = load_flow(source)
    row = _version_row(org_id, key, 1, flow, source, None, now, SHIPPED_BY)
    try:
        async with session.begin_nested():
            session.add(row)
            await session.flush()
    except IntegrityError:
        found = await _latest(session, org_id, key)
        if found is None:
            raise
        return found
    _FLOWS.put((db_key(session), org_id, key, 1), (flow, None))
    return 1


async def flow_available(session: AsyncSession, org_id: int, key: str, now: datetime) -> bool:
    """Whether a new session of `key` can start: a published version, or (for the default
    key) the shipped flow with an open event to offer."""
    if await _latest(session, org_id, key) is not None:
        return True
    return key == DEFAULT_FLOW_KEY and await next_open_event_id(session, org_id, now) is not None


async def session_flow(
    session: AsyncSession, org_id: int, key: str, now: datetime
) -> tuple[int, Flow, int | None]:
    """The (version, flow, event) a new session of `key` starts on: the latest version; for
    an unbound version, the organization's next open event. An organization without any
    version of the default key gets the shipped flow (module rules)."""
    version = await _latest(session, org_id, key)
    if version is None:
        if key != DEFAULT_FLOW_KEY or await next_open_event_id(session, org_id, now) is None:
            raise PopdropError(
                "not_found", f"no chat flow {key!r} is published and no event is open yet"
            )
        version = await _store_shipped(session, org_id, key, now)
    flow, bound = await get_flow(session, org_id, key, version)
    if bound is None:
        bound = await next_open_event_id(session, org_id, now)
    return version, flow, bound


async def list_versions(
    session: AsyncSession, org_id: int, key: str, *, limit: int = 100
) -> list[FlowVersion]:
    """The published versions of `key`, newest first."""
    return list(
        await session.scalars(
            select(FlowVersion)
            .where(FlowVersion.org_id == org_id, FlowVersion.key == key)
            .order_by(FlowVersion.version.desc())
            .limit(limit)
        )
    )


async def get_version(session: AsyncSession, org_id: int, key: str, version: int) -> FlowVersion:
    found = await session.scalar(
        select(FlowVersion).where(
            FlowVersion.org_id == org_id, FlowVersion.key == key, FlowVersion.version == version
        )
    )
    if found is None:
        raise not_found(f"chat flow {key} version {version}")
    return found


async def current_source(session: AsyncSession, org_id: int, key: str) -> tuple[int, str]:
    """(version, YAML) of what new sessions of `key` use: the latest version, or (0, the
    shipped flow) for a default key never published."""
    version = await _latest(session, org_id, key)
    if version is not None:
        return version, (await get_version(session, org_id, key, version)).source
    if key == DEFAULT_FLOW_KEY:
        return 0, shipped_source("popup_drop")
    raise PopdropError("not_found", f"no chat flow {key!r} is published")
