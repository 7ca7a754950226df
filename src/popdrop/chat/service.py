"""Chat service: runs one turn of a conversation against the domain services.

`run_turn(session, deps, org_id=…, channel=…, address=…, inbound=…, now=…)`:

1. Global keywords first, on every channel: STOP / START / HELP (and YES for a pending
   double opt-in) go through `audience.service.handle_inbound`, the one implementation
   shared with SMS drops. A stopped conversation runs no flow until START.
2. The conversation of (org, channel, address) is loaded and locked (FOR UPDATE on
   PostgreSQL; SQLite writers are serialised). It keeps its flow version; an expired or
   finished session starts a new one (`session_no` + 1) on the latest published version.
3. Facts the turn may need are read (the flow says which, per node), `engine.step` runs,
   and each action effect is applied through the domain services inside a SAVEPOINT: a
   refusal (sold out, slot full…) rolls back only that effect and goes back to the engine
   as a failed `EffectResult`, which takes the node's failure branch. Everything else —
   state, transcript, funnel events — is written in the caller's transaction, so a turn
   is all or nothing.
4. Outbound messages are degraded to the channel's capabilities; numbered options are
   kept in the state so a reply "2" resolves.

Channel adapters (web widget, SMS, Telegram) hand inbound messages to
`popdrop.chat.inbound` (a host's `/command` first, else `run_turn`) and deliver the
returned messages; `wake_due` runs scheduled waits and timeouts
(reminders, the day-after survey) and returns what to deliver.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, delete, func, insert, or_, select, union_all, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.audience import service as audience
from popdrop.audience.models import Contact, Segment
from popdrop.audience.schemas import (
    ActivityIn,
    ConsentChange,
    ContactIn,
    SegmentRules,
    clean_labels,
)
from popdrop.chat import engine
from popdrop.chat.engine import (
    ChatState,
    EffectResult,
    EventFact,
    Facts,
    Inbound,
    ProductFact,
    SlotFact,
)
from popdrop.chat.flow import DiscountSpec, Flow, Needs, load_compiled, load_flow, shipped_source
from popdrop.chat.messages import (
    OUT_MESSAGES,
    Capabilities,
    Card,
    OutMessage,
    Text,
    capabilities_of,
    degrade,
    format_time,
    numbered_choices,
)
from popdrop.chat.models import (
    ChatEvent,
    ChatMessage,
    ChatPin,
    Conversation,
    FlowVersion,
    WebInbox,
)
from popdrop.checkin import service as checkin
from popdrop.checkin.schemas import TicketCreate
from popdrop.core.db import UTCDateTime, table_of
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.identity import normalize_phone
from popdrop.core.schemas import is_clean_text
from popdrop.core.signing import Signer
from popdrop.events.models import Event, TimeSlot
from popdrop.inventory import service as inventory
from popdrop.inventory.models import Hold, Product, Stock, Variant
from popdrop.inventory.schemas import HoldCreate
from popdrop.rsvp import service as rsvp_service
from popdrop.rsvp.models import Rsvp
from popdrop.rsvp.schemas import RsvpCreate
from popdrop.vouchers import service as vouchers
from popdrop.vouchers.models import VoucherBatch
from popdrop.vouchers.schemas import BatchCreate

DEFAULT_FLOW_KEY = "popup_drop"
CHAT_ACTOR = "system:chat"
CHAT_SCOPES = frozenset(
    {"holds:write", "tickets:write", "vouchers:write", "audience:read", "audience:write"}
)
CHECKOUT_PURPOSE = "chat-checkout"
REDACTED = "[redacted]"
MAX_ROUNDS = 100
_KEY = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
# Engine activity kinds that are engagement for the audience domain's recency.
_AUDIENCE_ACTIVITY = {"chat_started": "chat"}

_conversations = table_of(Conversation)
_messages = table_of(ChatMessage)
_events = table_of(ChatEvent)
_web_inbox = table_of(WebInbox)


@dataclass(frozen=True)
class ChatDeps:
    """What a turn needs from the process (channel adapters build it from AppContext)."""

    signer: Signer
    base_url: str = "http://127.0.0.1:8000"
    audit_chains: int = 8


@dataclass
class TurnResult:
    conversation_id: int | None
    session_no: int
    status: str
    node: str | None
    messages: list[OutMessage]
    contact_id: int | None = None
    keyword: str | None = None


@dataclass
class Delivery:
    """Messages a scheduled wake-up produced, for the channel to deliver."""

    conversation_id: int
    org_id: int
    channel: str
    address: str
    contact_id: int | None
    messages: list[OutMessage]


def chat_principal(org_id: int) -> Principal:
    """Who acts for a customer's conversation (RSVP, hold, voucher, ticket, consent)."""
    return Principal(org_id, CHAT_ACTOR, "system", CHAT_SCOPES)


# ---------------------------------------------------------------- flows

# (database, org, key, version) -> (flow, bound event): versions never change once stored.
_FLOWS: dict[tuple[str, int, str, int], tuple[Flow, int | None]] = {}


def _db_key(session: AsyncSession) -> str:
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
        _FLOWS[(_db_key(session), org_id, key, row.version)] = (flow, event_id)
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
    cache_key = (_db_key(session), org_id, key, version)
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
    _FLOWS[cache_key] = loaded
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


async def list_flow_versions(
    session: AsyncSession, org_id: int, key: str | None = None
) -> list[FlowVersion]:
    query = select(FlowVersion).where(FlowVersion.org_id == org_id)
    if key is not None:
        query = query.where(FlowVersion.key == key)
    return list(await session.scalars(query.order_by(FlowVersion.key, FlowVersion.version)))


# ---------------------------------------------------------------- addresses


def normalize_address(channel: str, address: str) -> str:
    """SMS: E.164. Other channels: the channel's own id (web session id, Telegram chat id)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,15}", channel):
        raise PopdropError("invalid_request", "channel: a short lowercase name")
    if channel == "sms":
        return normalize_phone(address)
    clean = address.strip()
    if not 1 <= len(clean) <= 200 or not is_clean_text(clean) or not clean.isprintable():
        raise PopdropError("invalid_request", "address: 1 to 200 printable characters")
    return clean


def address_hash(signer: Signer, channel: str, address: str) -> bytes:
    return signer.keyed_hash(f"chat-address:{channel}:{address}")


def consent_channel(channel: str) -> str:
    """The audience consent channel a chat channel's STOP/START applies to."""
    return "sms" if channel == "sms" else "chat"


def _clean_inbound(inbound: Inbound) -> Inbound:
    text = inbound.text
    if not is_clean_text(text):
        text = text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    payload = inbound.payload
    if payload is not None and not is_clean_text(payload):
        payload = None
    if text is inbound.text and payload is inbound.payload:
        return inbound
    return Inbound(kind=inbound.kind, text=text, payload=payload)


# ---------------------------------------------------------------- conversations


@dataclass
class ConversationRow:
    """A `chat_conversations` row as the turn reads and writes it (Core, no ORM: this is
    the hot path). `_save` writes every mutable column back in one UPDATE."""

    id: int
    org_id: int
    channel: str
    address_hash: bytes
    address: str | None
    contact_id: int | None
    event_id: int | None
    flow_key: str
    flow_version: int
    session_no: int
    node: str
    status: str
    state: str
    started_at: datetime
    last_message_at: datetime
    expires_at: datetime
    wake_at: datetime | None
    opted_out_at: datetime | None
    host_ref: str | None
    taken_over_at: datetime | None


_CONV_FIELDS = tuple(f.name for f in fields(ConversationRow))
_CONV_MUTABLE = tuple(
    n for n in _CONV_FIELDS if n not in ("id", "org_id", "channel", "address_hash")
)
_SELECT_CONV = select(*(_conversations.c[name] for name in _CONV_FIELDS))
_BY_ADDRESS = _SELECT_CONV.where(
    _conversations.c.org_id == bindparam("o_id"),
    _conversations.c.channel == bindparam("o_channel"),
    _conversations.c.address_hash == bindparam("o_hash"),
)
_BY_ADDRESS_LOCKED = _BY_ADDRESS.with_for_update()
_SAVE_CONV = (
    update(_conversations)
    .where(_conversations.c.id == bindparam("c_id"))
    .values(
        {name: bindparam(f"v_{name}", type_=_conversations.c[name].type) for name in _CONV_MUTABLE}
    )
)
_INSERT_CONV = insert(_conversations).returning(_conversations.c.id)
_INSERT_MESSAGES = insert(_messages)
_INSERT_EVENTS = insert(_events)
_MESSAGE_COLUMNS = tuple(c.name for c in _messages.c if c.name != "id")
_EVENT_COLUMNS = tuple(c.name for c in _events.c if c.name != "id")


def _unnest(table: Any, columns: tuple[str, ...], prefix: str) -> Any:
    """Rows from one array parameter per column (zipped by `unnest` in the select list)."""
    return select(
        *(
            func.unnest(bindparam(f"{prefix}{name}", type_=ARRAY(table.c[name].type)))
            for name in columns
        )
    )


# The end of a turn on PostgreSQL, one round trip: the conversation row, the transcript
# lines and the funnel events (data-modifying CTEs always run).
_PERSIST_FUSED = (
    insert(_events)
    .from_select(_EVENT_COLUMNS, _unnest(_events, _EVENT_COLUMNS, "e_"))
    .add_cte(_SAVE_CONV.cte("saved"))
    .add_cte(
        insert(_messages)
        .from_select(_MESSAGE_COLUMNS, _unnest(_messages, _MESSAGE_COLUMNS, "m_"))
        .cte("said")
    )
)


async def _insert(session: AsyncSession, statement: Any, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn = await session.connection()
        await conn.execute(statement, rows)


def _conv_of(row: Any) -> ConversationRow:
    values = dict(zip(_CONV_FIELDS, row, strict=True))
    values["address_hash"] = bytes(values["address_hash"])
    return ConversationRow(**values)


async def _locked(
    session: AsyncSession, org_id: int, channel: str, digest: bytes
) -> ConversationRow | None:
    """The conversation of an address, locked for this transaction (FOR UPDATE on
    PostgreSQL; SQLite writers are serialised already)."""
    conn = await session.connection()
    query = _BY_ADDRESS_LOCKED if conn.dialect.name == "postgresql" else _BY_ADDRESS
    row = (
        await conn.execute(query, {"o_id": org_id, "o_channel": channel, "o_hash": digest})
    ).first()
    return _conv_of(row) if row is not None else None


def _save_params(conv: ConversationRow) -> dict[str, Any]:
    params = {f"v_{name}": getattr(conv, name) for name in _CONV_MUTABLE}
    params["c_id"] = conv.id
    return params


async def _save(session: AsyncSession, conv: ConversationRow) -> None:
    conn = await session.connection()
    await conn.execute(_SAVE_CONV, _save_params(conv))


def _as_arrays(
    prefix: str, columns: tuple[str, ...], rows: list[dict[str, Any]]
) -> dict[str, list[Any]]:
    return {f"{prefix}{name}": [row[name] for row in rows] for name in columns}


async def _save_all(
    session: AsyncSession,
    conv: ConversationRow,
    messages: list[dict[str, Any]],
    events: list[dict[str, Any]],
) -> None:
    """The conversation row, transcript lines and funnel events of a turn."""
    conn = await session.connection()
    if conn.dialect.name != "postgresql":
        await conn.execute(_SAVE_CONV, _save_params(conv))
        await _insert(session, _INSERT_MESSAGES, messages)
        await _insert(session, _INSERT_EVENTS, events)
        return
    params = _save_params(conv)
    params |= _as_arrays("m_", _MESSAGE_COLUMNS, messages)
    params |= _as_arrays("e_", _EVENT_COLUMNS, events)
    await conn.execute(_PERSIST_FUSED, params)


async def _find_contact_id(
    session: AsyncSession,
    signer: Signer,
    org_id: int,
    *,
    email: str | None = None,
    phone: str | None = None,
) -> int | None:
    try:
        points = audience.contact_points(signer, email, phone)
    except PopdropError:
        return None
    for digest, column in (
        (points.email_hash, Contact.email_hash),
        (points.phone_hash, Contact.phone_hash),
    ):
        if digest is None:
            continue
        found = await session.scalar(
            select(Contact.id).where(
                Contact.org_id == org_id, column == digest, Contact.erased_at.is_(None)
            )
        )
        if found is not None:
            return int(found)
    return None


def _expiry(flow: Flow, now: datetime, wake_at: datetime | None) -> datetime:
    base = max(now, wake_at) if wake_at is not None else now
    return base + timedelta(seconds=flow.session_ttl)


async def _new_session(
    session: AsyncSession,
    deps: ChatDeps,
    conv: ConversationRow | None,
    *,
    org_id: int,
    channel: str,
    address: str,
    digest: bytes,
    flow_key: str,
    now: datetime,
) -> tuple[ConversationRow, Flow, ChatState]:
    """Start (or restart, on the same row) a session on the latest flow version."""
    version = await latest_version(session, org_id, flow_key)
    flow, event_id = await get_flow(session, org_id, flow_key, version)
    state = ChatState.initial(flow, flow_key, version)
    if channel == "sms":
        state.vars.setdefault("phone", address)
    values: dict[str, Any] = {
        "address": address,
        "flow_key": flow_key,
        "flow_version": version,
        "event_id": event_id,
        "node": state.node,
        "status": state.status,
        "state": state.model_dump_json(),
        "started_at": now,
        "last_message_at": now,
        "expires_at": _expiry(flow, now, None),
        "wake_at": None,
        "host_ref": None,
        "taken_over_at": None,
    }
    if conv is not None:
        for name, value in values.items():
            setattr(conv, name, value)
        conv.session_no += 1
        return conv, flow, state
    contact_id = None
    opted_out_at = None
    if channel == "sms":
        contact_id = await _find_contact_id(session, deps.signer, org_id, phone=address)
        points = audience.contact_points(deps.signer, None, address)
        suppressed = await audience.suppressed_channels(session, org_id, points)
        if "sms" in suppressed or "all" in suppressed:
            opted_out_at = now  # they sent STOP before any flow: stay quiet until START
    values.update(
        org_id=org_id,
        channel=channel,
        address_hash=digest,
        contact_id=contact_id,
        session_no=1,
        opted_out_at=opted_out_at,
    )
    try:
        async with session.begin_nested():
            conn = await session.connection()  # inside: the SAVEPOINT is emitted now
            new_id = (await conn.execute(_INSERT_CONV, values)).scalar_one()
    except IntegrityError:
        # The same address's first message raced us: continue on the row it created.
        found = await _locked(session, org_id, channel, digest)
        if found is None:
            raise
        return found, *(await _load_state(session, found))
    return ConversationRow(id=int(new_id), **values), flow, state


async def _load_state(
    session: AsyncSession, conv: ConversationRow | Conversation
) -> tuple[Flow, ChatState]:
    flow, _event = await get_flow(session, conv.org_id, conv.flow_key, conv.flow_version)
    try:
        state = ChatState.model_validate_json(conv.state)
    except ValidationError:
        state = ChatState.initial(flow, conv.flow_key, conv.flow_version)
    return flow, state


def _session_over(conv: ConversationRow, state: ChatState, inbound: Inbound, now: datetime) -> bool:
    if inbound.kind == "wake":
        return False
    if inbound.kind == "start":
        return state.turns > 0  # a deep link / QR scan opens a session of its own
    if state.status in ("done", "expired", "error"):
        return True
    if state.status == "handed_off":
        return False
    return conv.expires_at <= now


# ---------------------------------------------------------------- facts


# Event details and product catalogues change rarely: each process keeps them a few seconds.
# Availability and slots are read live on every turn that needs them.
CACHE_SECONDS = 5.0
_EVENTS: dict[tuple[str, int], tuple[float, EventFact | None]] = {}
_CATALOGS: dict[tuple[str, int, int], tuple[float, list[ProductFact]]] = {}
_CACHE_MAX = 10_000

_products_t = table_of(Product)
_variants_t = table_of(Variant)
_stock_t = table_of(Stock)
_holds_t = table_of(Hold)
_now_param = bindparam("now", type_=UTCDateTime())
_free = union_all(
    select(
        _variants_t.c.product_id.label("product_id"),
        (_stock_t.c.total - _stock_t.c.sold).label("n"),
    )
    .join(_stock_t, _stock_t.c.variant_id == _variants_t.c.id)
    .join(_products_t, _products_t.c.id == _variants_t.c.product_id)
    .where(_products_t.c.event_id == bindparam("e_id"), _products_t.c.org_id == bindparam("o_id")),
    select(_variants_t.c.product_id, -_holds_t.c.qty)
    .join(_variants_t, _variants_t.c.id == _holds_t.c.variant_id)
    .where(
        _holds_t.c.event_id == bindparam("e_id"),
        _holds_t.c.status == "active",
        _holds_t.c.expires_at > _now_param,
    ),
).subquery()
# Units left per product of an event: total - sold - unexpired active holds (as
# inventory.availability counts them), in one round trip.
_AVAILABLE = select(_free.c.product_id, func.sum(_free.c.n)).group_by(_free.c.product_id)


def _cached(cache: dict[Any, tuple[float, Any]], key: Any) -> Any:
    hit = cache.get(key)
    if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
        return hit[1]
    return None


def _remember(cache: dict[Any, tuple[float, Any]], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = (time.monotonic(), value)


async def _event_fact(session: AsyncSession, event_id: int) -> EventFact | None:
    key = (_db_key(session), event_id)
    cached: EventFact | None = _cached(_EVENTS, key)
    if cached is not None:
        return cached
    row = (
        await session.execute(
            select(
                Event.id,
                Event.title,
                Event.starts_at,
                Event.ends_at,
                Event.timezone,
                Event.venue_name,
                Event.status,
            ).where(Event.id == event_id)
        )
    ).first()
    fact = None
    if row is not None:
        fact = EventFact(
            id=row.id,
            title=row.title,
            starts_at=row.starts_at,
            ends_at=row.ends_at,
            timezone=row.timezone,
            venue=row.venue_name,
            status=row.status,
        )
    _remember(_EVENTS, key, fact)
    return fact


async def _catalog(session: AsyncSession, org_id: int, event_id: int) -> list[ProductFact]:
    key = (_db_key(session), org_id, event_id)
    cached: list[ProductFact] | None = _cached(_CATALOGS, key)
    if cached is not None:
        return cached
    rows = (
        await session.execute(
            select(
                Product.id,
                Product.title,
                Product.highlights,
                Product.price_minor,
                Product.currency,
                Product.image_url,
            )
            .where(Product.event_id == event_id, Product.org_id == org_id)
            .order_by(Product.id)
        )
    ).all()
    skus: dict[int, list[str]] = {}
    if rows:
        for product_id, sku in await session.execute(
            select(Variant.product_id, Variant.sku).where(
                Variant.product_id.in_([r[0] for r in rows]), Variant.sku != ""
            )
        ):
            skus.setdefault(int(product_id), []).append(sku)
    catalog = [
        ProductFact(
            id=int(r[0]),
            title=r[1],
            text=r[2] or "",
            price_minor=int(r[3]),
            currency=r[4],
            image_url=r[5] or "",
            available=0,
            skus=tuple(skus.get(int(r[0]), ())),
        )
        for r in rows
    ]
    _remember(_CATALOGS, key, catalog)
    return catalog


async def _products(
    session: AsyncSession, org_id: int, event_id: int, now: datetime
) -> list[ProductFact]:
    """The event's products (catalogue cached briefly) with live availability."""
    catalog = await _catalog(session, org_id, event_id)
    if not catalog:
        return []
    conn = await session.connection()
    left = {
        int(product_id): int(n or 0)
        for product_id, n in await conn.execute(
            _AVAILABLE, {"e_id": event_id, "o_id": org_id, "now": now}
        )
    }
    return [replace(p, available=max(left.get(p.id, 0), 0)) for p in catalog]


_slots_t = table_of(TimeSlot)
_SLOTS = (
    select(
        _slots_t.c.id,
        _slots_t.c.label,
        _slots_t.c.starts_at,
        _slots_t.c.ends_at,
        _slots_t.c.capacity - _slots_t.c.taken,
    )
    .where(
        _slots_t.c.event_id == bindparam("e_id"),
        _slots_t.c.org_id == bindparam("o_id"),
        _slots_t.c.ends_at > _now_param,
    )
    .order_by(_slots_t.c.starts_at, _slots_t.c.id)
)
_contacts_t = table_of(Contact)
_FIRST_NAME = select(_contacts_t.c.first_name).where(_contacts_t.c.id == bindparam("c_id"))


async def _slots(
    session: AsyncSession, org_id: int, event_id: int, now: datetime
) -> list[SlotFact]:
    """The event's slots not over yet, with places left (live)."""
    conn = await session.connection()
    rows = await conn.execute(_SLOTS, {"e_id": event_id, "o_id": org_id, "now": now})
    return [
        SlotFact(
            id=int(r[0]), label=r[1] or "", starts_at=r[2], ends_at=r[3], free=max(int(r[4]), 0)
        )
        for r in rows
    ]


async def _segments(
    session: AsyncSession, org_id: int, contact_id: int, names: Iterable[str], now: datetime
) -> frozenset[str]:
    member: set[str] = set()
    for name in names:
        rules_text = await session.scalar(
            select(Segment.rules).where(Segment.org_id == org_id, Segment.name == name)
        )
        if rules_text is None:
            continue
        rules = SegmentRules.model_validate(json.loads(rules_text))
        conditions = await audience.segment_conditions(session, org_id, rules, now=now)
        found = await session.scalar(
            select(Contact.id).where(Contact.id == contact_id, *conditions).limit(1)
        )
        if found is not None:
            member.add(name)
    return frozenset(member)


async def _facts(
    session: AsyncSession, conv: ConversationRow, needs: Needs, now: datetime
) -> Facts:
    facts = Facts(now=now, channel=conv.channel)
    if conv.event_id is not None:
        facts.event = await _event_fact(session, conv.event_id)
        if needs.products:
            facts.products = await _products(session, conv.org_id, conv.event_id, now)
        if needs.slots:
            facts.slots = await _slots(session, conv.org_id, conv.event_id, now)
    if conv.contact_id is not None:
        conn = await session.connection()
        first_name = (await conn.execute(_FIRST_NAME, {"c_id": conv.contact_id})).scalar()
        facts.contact = {"id": conv.contact_id, "first_name": first_name}
        if needs.segments:
            facts.segments = await _segments(
                session, conv.org_id, conv.contact_id, needs.segments, now
            )
    return facts


_pins_t = table_of(ChatPin)
_PINNED = select(_pins_t.c.product_id).where(
    _pins_t.c.org_id == bindparam("o_id"), _pins_t.c.event_id == bindparam("e_id")
)
PINNED_PREFIX = "Pinned by the host. "


async def host_card(
    session: AsyncSession, org_id: int, event_id: int, product_id: int, now: datetime
) -> Card | None:
    """A product of the event as a host's card (pinned, or sent from the console): live
    availability, no action buttons; None when the event has no such product."""
    for product in await _products(session, org_id, event_id, now):
        if product.id == product_id:
            return engine.card_of(product, text=PINNED_PREFIX + product.text)
    return None


async def pinned_card(
    session: AsyncSession, org_id: int, event_id: int | None, now: datetime
) -> Card | None:
    """The card a host pinned for the event (`/pin`, or from the console) with live
    availability; every new session's first answer starts with it."""
    if event_id is None:
        return None
    conn = await session.connection()
    product_id = (await conn.execute(_PINNED, {"o_id": org_id, "e_id": event_id})).scalar()
    if product_id is None:
        return None
    return await host_card(session, org_id, event_id, int(product_id), now)


# ---------------------------------------------------------------- effects


@dataclass
class _Applied:
    """What applying a turn's effects left behind for persistence."""

    events: list[dict[str, Any]] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)


def _event_row(
    conv: ConversationRow | Conversation,
    kind: str,
    at: datetime,
    node: str | None = None,
    ref: str | None = None,
    value: int | None = None,
) -> dict[str, Any]:
    return {
        "org_id": conv.org_id,
        "conversation_id": conv.id,
        "session_no": conv.session_no,
        "channel": conv.channel,
        "event_id": conv.event_id,
        "flow_key": conv.flow_key,
        "flow_version": conv.flow_version,
        "kind": kind[:24],
        "node": node,
        "ref": ref[:200] if ref else None,
        "value": value,
        "at": at,
    }


def _contact_ref(conv: ConversationRow) -> str:
    return f"contact:{conv.contact_id}" if conv.contact_id else f"chat:{conv.id}"


def _failure(error: PopdropError) -> EffectResult:
    return EffectResult(ok=False, reason=error.reason, message=error.message)


async def _in_savepoint(session: AsyncSession, work: Any) -> EffectResult:
    """Run one effect; a refusal rolls back only what it wrote and becomes a failed result."""
    try:
        async with session.begin_nested():
            await session.connection()  # emit the SAVEPOINT before any Core statement
            result: EffectResult = await work()
            return result
    except PopdropError as error:
        return _failure(error)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        return EffectResult(ok=False, reason="invalid_request", message=f"{where}: {first['msg']}")


class _Effects:
    def __init__(
        self, session: AsyncSession, deps: ChatDeps, conv: ConversationRow, now: datetime
    ) -> None:
        self.session = session
        self.deps = deps
        self.conv = conv
        self.now = now
        self.principal = chat_principal(conv.org_id)
        self.applied = _Applied()
        self.event_tz: str | None = None
        self.state_vars: dict[str, Any] = {}
        # Tickets this turn's RSVPs issued, (subject kind, id) → (ticket id, secret): the
        # send-ticket step that usually follows needs no second look-up.
        self.issued_tickets: dict[tuple[str, int], tuple[int, str]] = {}

    def event(
        self,
        kind: str,
        *,
        node: str | None = None,
        ref: str | None = None,
        value: int | None = None,
    ) -> None:
        self.applied.events.append(_event_row(self.conv, kind, self.now, node, ref, value))

    async def apply(self, effect: engine.Effect, node: str) -> EffectResult | None:
        """Apply one effect; an awaited (action) effect returns its result."""
        if isinstance(effect, engine.RsvpEffect):
            result = await _in_savepoint(self.session, lambda: self.rsvp(effect))
        elif isinstance(effect, engine.HoldEffect):
            result = await _in_savepoint(self.session, lambda: self.hold(effect))
        elif isinstance(effect, engine.IssueVoucherEffect):
            result = await _in_savepoint(self.session, lambda: self.voucher(effect))
        elif isinstance(effect, engine.SendTicketEffect):
            issued = self.issued_tickets.get((effect.subject_kind, effect.subject_id))
            if issued is not None:
                result = await self._ticket_result(*issued)
            else:
                result = await _in_savepoint(self.session, lambda: self.ticket(effect))
        elif isinstance(effect, engine.CheckoutLinkEffect):
            result = await _in_savepoint(self.session, lambda: self.checkout(effect))
        else:
            await self.side_effect(effect, node)
            return None
        self.applied.secrets.update(v for v in result.secrets.values() if v)
        return result

    async def side_effect(self, effect: engine.Effect, node: str) -> None:
        conv = self.conv
        if isinstance(effect, engine.RecordActivityEffect):
            self.event(effect.kind, node=node, ref=effect.ref, value=effect.value)
            kind = _AUDIENCE_ACTIVITY.get(effect.kind)
            if kind is not None and conv.contact_id is not None:
                await audience.record_activity(
                    self.session,
                    self.deps.signer,
                    conv.org_id,
                    ActivityIn(kind=kind, contact_id=conv.contact_id, event_id=conv.event_id),
                    now=self.now,
                )
        elif isinstance(effect, engine.SurveyAnswerEffect):
            self.event("survey", node=node, ref=effect.survey, value=effect.score)
        elif isinstance(effect, engine.ReleaseEffect):
            await _in_savepoint(self.session, lambda: self.release(effect))
        elif isinstance(effect, engine.TagEffect):
            contact = await self.contact()
            if contact is not None:
                labels = clean_labels(list(effect.tags))
                await audience.add_labels(self.session, contact, "tag", labels)
        elif isinstance(effect, engine.GrantConsentEffect):
            await _in_savepoint(self.session, lambda: self.consent(effect, node))
        elif isinstance(effect, engine.HandoffEffect):
            conv.taken_over_at = None
            conv.host_ref = None
        # ScheduleEffect: the state's wake_at is persisted with the conversation.

    async def contact(self) -> Contact | None:
        conv = self.conv
        if conv.contact_id is None:
            return None
        found = await self.session.get(Contact, conv.contact_id)
        return found if found is not None and found.erased_at is None else None

    async def _ok(
        self, data: dict[str, Any], secrets: dict[str, str] | None = None
    ) -> EffectResult:
        return EffectResult(ok=True, data=data, secrets=secrets or {})

    def _ticket_url(self, secret: str) -> str:
        return f"{self.deps.base_url.rstrip('/')}/t/{secret}"

    async def _link_contact(self, email: str | None, phone: str | None) -> None:
        conv = self.conv
        if conv.contact_id is None:
            conv.contact_id = await _find_contact_id(
                self.session, self.deps.signer, conv.org_id, email=email, phone=phone
            )

    async def rsvp(self, effect: engine.RsvpEffect) -> EffectResult:
        conv = self.conv
        if conv.event_id is None:
            raise PopdropError("invalid_request", "this chat flow is not bound to an event")
        spec = RsvpCreate(
            slot_id=effect.slot_id,
            email=effect.email,
            phone=effect.phone,
            places=effect.places,
            consent=True,
            consent_text=effect.consent_text,
            waitlist=effect.waitlist,
        )
        result = await rsvp_service.create_rsvp(
            self.session,
            self.deps.signer,
            event_id=conv.event_id,
            spec=spec,
            now=self.now,
            audit_chains=self.deps.audit_chains,
            actor=f"chat:{conv.id}",
        )
        rsvp = result.rsvp
        await self._link_contact(rsvp.email, rsvp.phone)
        await audience.record_activity(
            self.session,
            self.deps.signer,
            conv.org_id,
            ActivityIn(kind="rsvp", email=rsvp.email, phone=rsvp.phone, event_id=conv.event_id),
            now=self.now,
        )
        secrets: dict[str, str] = {}
        if result.ticket_secret is not None:
            secrets = {
                "ticket_secret": result.ticket_secret,
                "ticket_url": self._ticket_url(result.ticket_secret),
            }
            if result.ticket_id is not None:
                self.issued_tickets[("rsvp", rsvp.id)] = (result.ticket_id, result.ticket_secret)
        return await self._ok({"rsvp_id": rsvp.id, "rsvp_status": rsvp.status}, secrets)

    async def _tz(self) -> str | None:
        if self.event_tz is None and self.conv.event_id is not None:
            self.event_tz = await self.session.scalar(
                select(Event.timezone).where(Event.id == self.conv.event_id)
            )
        return self.event_tz

    async def hold(self, effect: engine.HoldEffect) -> EffectResult:
        conv = self.conv
        product = await self.session.scalar(
            select(Product).where(
                Product.id == effect.product_id,
                Product.org_id == conv.org_id,
                Product.event_id == conv.event_id,
            )
        )
        if product is None:
            raise not_found("product of this event")
        variants = list(
            await self.session.scalars(
                select(Variant).where(Variant.product_id == product.id).order_by(Variant.id)
            )
        )
        wanted = (effect.variant or "").strip().casefold()
        chosen = [
            v
            for v in variants
            if not wanted or wanted in (v.name.casefold(), v.sku.casefold(), str(v.id))
        ]
        if not chosen:
            raise PopdropError(
                "invalid_request", f"{product.title} has no variant {effect.variant!r}"
            )
        # The lane with the most units left for the first variant that has any.
        rows = (
            await self.session.execute(
                select(Stock.variant_id, Stock.lane_id, Stock.total - Stock.held - Stock.sold)
                .where(Stock.variant_id.in_([v.id for v in chosen]))
                .order_by((Stock.total - Stock.held - Stock.sold).desc(), Stock.id)
            )
        ).all()
        if not rows:
            raise PopdropError("sold_out", "sold out", detail={"available": 0})
        order = {v.id: i for i, v in enumerate(chosen)}
        variant_id, lane_id, _left = min(
            rows, key=lambda r: (0 if r[2] >= effect.qty else 1, order[r[0]])
        )
        hold = await inventory.create_hold(
            self.session,
            self.principal,
            HoldCreate(
                variant_id=variant_id,
                lane_id=lane_id,
                qty=effect.qty,
                slot_id=effect.slot_id,
                contact_ref=_contact_ref(conv),
            ),
            now=self.now,
        )
        return await self._ok(
            {
                "hold_id": hold.id,
                "hold_expires_at": hold.expires_at.isoformat(),
                "hold_until": format_time(hold.expires_at, await self._tz()),
                "product_id": product.id,
                "product_title": product.title,
            }
        )

    async def _our_hold(self, hold_id: int) -> Hold | None:
        hold: Hold | None = await self.session.scalar(
            select(Hold).where(
                Hold.id == hold_id,
                Hold.org_id == self.conv.org_id,
                Hold.contact_ref.in_([_contact_ref(self.conv), f"chat:{self.conv.id}"]),
            )
        )
        return hold

    async def release(self, effect: engine.ReleaseEffect) -> EffectResult:
        if await self._our_hold(effect.hold_id) is None:
            raise not_found("hold")
        await inventory.end_hold(
            self.session, self.principal, effect.hold_id, convert=False, now=self.now
        )
        return await self._ok({})

    async def _batch(self, tag: str, create: DiscountSpec | None) -> VoucherBatch:
        conv = self.conv
        batch: VoucherBatch | None = await self.session.scalar(
            select(VoucherBatch)
            .where(VoucherBatch.org_id == conv.org_id, VoucherBatch.tag == tag)
            .order_by(VoucherBatch.revoked_at.is_not(None), VoucherBatch.id)
            .limit(1)
        )
        if batch is not None:
            if batch.revoked_at is not None:
                raise PopdropError("revoked", "these vouchers were withdrawn")
            return batch
        if create is None:
            raise not_found(f"voucher batch tagged {tag!r}")
        made, _codes = await vouchers.issue_batch(
            self.session,
            self.deps.signer,
            self.principal,
            BatchCreate(
                name=f"Chat vouchers ({tag})",
                quantity=1,
                tag=tag,
                ttl_seconds=create.ttl_seconds,
                per_contact_limit=create.per_contact_limit,
                currency=create.currency,
                discount_kind=create.kind,
                discount_value=create.value,
                discount_description=create.description,
                event_ref=str(conv.event_id) if conv.event_id else None,
                offer_ref=f"chat:{conv.flow_key}",
            ),
            now=self.now,
            audit_chains=self.deps.audit_chains,
        )
        return made

    async def voucher(self, effect: engine.IssueVoucherEffect) -> EffectResult:
        batch = await self._batch(effect.batch, effect.create)
        subject = _contact_ref(self.conv)
        issued = await vouchers.issue_derived(
            self.session, self.deps.signer, batch, [subject], now=self.now
        )
        if subject not in issued:
            raise PopdropError("unavailable", "the voucher could not be issued")
        voucher_id, code = issued[subject]
        return await self._ok(
            {"voucher_id": voucher_id, "voucher_discount": vouchers.describe_discount(batch)},
            {"voucher_code": code},
        )

    async def ticket(self, effect: engine.SendTicketEffect) -> EffectResult:
        conv = self.conv
        if effect.subject_kind == "rsvp":
            row = (
                await self.session.execute(
                    select(Rsvp.event_id, Rsvp.status, Rsvp.email, Rsvp.phone).where(
                        Rsvp.id == effect.subject_id, Rsvp.org_id == conv.org_id
                    )
                )
            ).first()
            if row is None:
                raise not_found("RSVP")
            if row.status != "confirmed":
                raise PopdropError("conflict", f"this RSVP is {row.status}: no ticket yet")
            event_id, holder = row.event_id, row.email or row.phone
        else:
            hold = await self._our_hold(effect.subject_id)
            if hold is None:
                raise not_found("hold")
            event_id, holder = hold.event_id, None
        ticket, secret, _created = await checkin.issue_ticket(
            self.session,
            self.principal,
            TicketCreate(
                event_id=event_id,
                subject_kind=effect.subject_kind,
                subject_id=effect.subject_id,
                holder_ref=holder,
            ),
            now=self.now,
            audit_chains=self.deps.audit_chains,
        )
        return await self._ticket_result(ticket.id, secret)

    async def _ticket_result(self, ticket_id: int, secret: str) -> EffectResult:
        return await self._ok(
            {"ticket_id": ticket_id},
            {"ticket_secret": secret, "ticket_url": self._ticket_url(secret)},
        )

    async def checkout(self, effect: engine.CheckoutLinkEffect) -> EffectResult:
        hold = await self._our_hold(effect.hold_id)
        if hold is None:
            raise not_found("hold")
        if hold.status != "active" or hold.expires_at <= self.now:
            raise PopdropError("hold_expired", "this reservation has expired")
        token = self.deps.signer.sign(CHECKOUT_PURPOSE, {"h": hold.id, "o": hold.org_id})
        url = f"{self.deps.base_url.rstrip('/')}/checkout/{token}"
        return await self._ok({"checkout_hold_id": hold.id}, {"checkout_url": url})

    async def consent(self, effect: engine.GrantConsentEffect, node: str) -> EffectResult:
        conv = self.conv
        contact = await self.contact()
        state_vars = self.state_vars
        if contact is None:
            email = state_vars.get("email")
            phone = state_vars.get("phone")
            contact, _created = await audience.upsert_contact(
                self.session,
                self.deps.signer,
                self.principal,
                ContactIn(
                    email=email if isinstance(email, str) else None,
                    phone=phone if isinstance(phone, str) else None,
                    source=f"chat:{conv.flow_key}",
                ),
                now=self.now,
            )
            conv.contact_id = contact.id
        channel = effect.channel or consent_channel(conv.channel)
        await audience.change_consent(
            self.session,
            self.deps.signer,
            contact,
            ConsentChange(
                channel=channel,
                action="grant",
                wording=effect.wording,
                source="chat_keyword",
                proof=f"chat conversation {conv.id}, node {node}",
            ),
            now=self.now,
        )
        return await self._ok({})


# ---------------------------------------------------------------- the turn


def _redact(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, REDACTED)
    return text


async def _run_engine(
    session: AsyncSession,
    deps: ChatDeps,
    conv: ConversationRow,
    flow: Flow,
    state: ChatState,
    inbound: Inbound | None,
    now: datetime,
) -> tuple[ChatState, list[OutMessage], _Applied]:
    facts = await _facts(session, conv, engine.needs(flow, state, inbound), now)
    effects = _Effects(session, deps, conv, now)
    outbound: list[OutMessage] = []
    result = engine.step(flow, state, inbound, facts)
    for _round in range(MAX_ROUNDS):
        outbound.extend(result.outbound)
        for node in result.visited:
            effects.event("node", node=node)
        effects.state_vars = result.state.vars
        pending = result.pending
        for effect in result.effects:
            if effect is pending:
                continue
            await effects.apply(effect, result.state.node)
        if pending is None:
            break
        answer = await effects.apply(pending, result.state.node)
        assert answer is not None
        facts.results[pending.key] = answer
        result = engine.step(flow, result.state, None, facts)
    else:  # pragma: no cover - the engine's step limit ends a turn long before this
        raise PopdropError("unavailable", "this conversation did not settle")
    return result.state, outbound, effects.applied


async def _persist(
    session: AsyncSession,
    conv: ConversationRow,
    flow: Flow,
    state: ChatState,
    inbound: Inbound | None,
    messages: list[OutMessage],
    applied: _Applied,
    now: datetime,
) -> None:
    conv.state = state.model_dump_json()
    conv.node = state.node
    conv.status = state.status
    conv.wake_at = state.wake_at
    conv.last_message_at = now
    conv.expires_at = _expiry(flow, now, state.wake_at)
    rows: list[dict[str, Any]] = []
    if inbound is not None and inbound.kind != "wake":
        rows.append(_message_row(conv, "in", inbound.model_dump(mode="json"), now))
    for body in OUT_MESSAGES.dump_python(messages, mode="json"):
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        if applied.secrets:
            text = _redact(text, applied.secrets)
        rows.append(_message_row(conv, "out", text, now))
    await _save_all(session, conv, rows, applied.events)


def _message_row(
    conv: ConversationRow | Conversation, direction: str, body: Any, now: datetime
) -> dict[str, Any]:
    text = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
    return {
        "org_id": conv.org_id,
        "conversation_id": conv.id,
        "session_no": conv.session_no,
        "direction": direction,
        "body": text,
        "created_at": now,
    }


async def _keyword_turn(
    session: AsyncSession,
    deps: ChatDeps,
    conv: ConversationRow | None,
    *,
    org_id: int,
    channel: str,
    address: str,
    inbound: Inbound,
    now: datetime,
) -> TurnResult | None:
    """STOP / START / HELP (YES) through the audience domain; None when not a keyword."""
    if inbound.kind != "text" or audience.parse_keyword(inbound.text) is None:
        return None
    answer = await audience.handle_inbound(
        session,
        deps.signer,
        org_id=org_id,
        channel=consent_channel(channel),
        sender=address,
        text=inbound.text,
        now=now,
        contact_id=conv.contact_id if conv is not None else None,
    )
    if answer.action is None:
        return None  # e.g. YES with nothing pending: an ordinary answer for the flow
    messages: list[OutMessage] = [Text(text=answer.reply)] if answer.reply else []
    if conv is None:
        return TurnResult(None, 0, "none", None, messages, answer.contact_id, answer.keyword)
    if answer.action == "opted_out":
        conv.opted_out_at = now
        conv.wake_at = None
    elif answer.action in ("opted_in", "confirmed"):
        conv.opted_out_at = None
    if conv.contact_id is None and answer.contact_id is not None:
        conv.contact_id = answer.contact_id
    conv.last_message_at = now
    await _save(session, conv)
    rows = [_message_row(conv, "in", inbound.model_dump(mode="json"), now)]
    rows += [_message_row(conv, "out", m.model_dump(mode="json"), now) for m in messages]
    await _insert(session, _INSERT_MESSAGES, rows)
    await _insert(
        session,
        _INSERT_EVENTS,
        [_event_row(conv, f"keyword_{answer.keyword}", now, ref=answer.action)],
    )
    return TurnResult(
        conv.id, conv.session_no, conv.status, conv.node, messages, conv.contact_id, answer.keyword
    )


async def run_turn(
    session: AsyncSession,
    deps: ChatDeps,
    *,
    org_id: int,
    channel: str,
    address: str,
    inbound: Inbound,
    now: datetime,
    flow_key: str = DEFAULT_FLOW_KEY,
    capabilities: Capabilities | None = None,
) -> TurnResult:
    """One inbound message of a conversation, in the caller's transaction (module doc)."""
    inbound = _clean_inbound(inbound)
    address = normalize_address(channel, address)
    digest = address_hash(deps.signer, channel, address)
    conv = await _locked(session, org_id, channel, digest)
    keyword = await _keyword_turn(
        session,
        deps,
        conv,
        org_id=org_id,
        channel=channel,
        address=address,
        inbound=inbound,
        now=now,
    )
    if keyword is not None:
        return keyword
    fresh = True
    if conv is None:
        if inbound.kind == "wake":
            return TurnResult(None, 0, "none", None, [])
        conv, flow, state = await _new_session(
            session,
            deps,
            None,
            org_id=org_id,
            channel=channel,
            address=address,
            digest=digest,
            flow_key=flow_key,
            now=now,
        )
    else:
        flow, state = await _load_state(session, conv)
        fresh = conv.opted_out_at is None and _session_over(conv, state, inbound, now)
        if fresh:
            if state.status in ("active", "waiting_input", "waiting_until"):
                await _insert(
                    session, _INSERT_EVENTS, [_event_row(conv, "expired", now, state.node)]
                )
            conv, flow, state = await _new_session(
                session,
                deps,
                conv,
                org_id=org_id,
                channel=channel,
                address=address,
                digest=digest,
                flow_key=flow_key,
                now=now,
            )
    if conv.opted_out_at is not None:
        # Opted out (STOP, or a suppressed number): nothing is sent until START.
        await _insert(
            session,
            _INSERT_MESSAGES,
            [_message_row(conv, "in", inbound.model_dump(mode="json"), now)],
        )
        return TurnResult(conv.id, conv.session_no, conv.status, conv.node, [], conv.contact_id)
    return await _turn(session, deps, conv, flow, state, inbound, now, capabilities, fresh)


async def _turn(
    session: AsyncSession,
    deps: ChatDeps,
    conv: ConversationRow,
    flow: Flow,
    state: ChatState,
    inbound: Inbound,
    now: datetime,
    capabilities: Capabilities | None,
    fresh: bool = False,
) -> TurnResult:
    state, outbound, applied = await _run_engine(session, deps, conv, flow, state, inbound, now)
    if fresh:
        pinned = await pinned_card(session, conv.org_id, conv.event_id, now)
        if pinned is not None:
            outbound.insert(0, pinned)
            applied.events.append(_event_row(conv, "card_viewed", now, ref=str(pinned.product_id)))
    caps = capabilities or capabilities_of(conv.channel)
    messages = degrade(outbound, caps, now=now)
    if messages:
        state.numbered = numbered_choices(messages)
    await _persist(session, conv, flow, state, inbound, messages, applied, now)
    return TurnResult(conv.id, conv.session_no, state.status, state.node, messages, conv.contact_id)


# ---------------------------------------------------------------- scheduled work


async def wake_due(
    session: AsyncSession,
    deps: ChatDeps,
    *,
    now: datetime,
    limit: int = 100,
    org_id: int | None = None,
) -> list[Delivery]:
    """Run the waits and input timeouts that are due (reminders, the day-after survey):
    each conversation takes one wake step; the caller's channels deliver the messages
    (after their own last-moment consent check)."""
    c = _conversations.c
    query = (
        _SELECT_CONV.where(
            c.wake_at.is_not(None),
            c.wake_at <= now,
            c.opted_out_at.is_(None),
            c.status.in_(("waiting_until", "waiting_input")),
        )
        .order_by(c.wake_at, c.id)
        .limit(limit)
    )
    if org_id is not None:
        query = query.where(c.org_id == org_id)
    conn = await session.connection()
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    deliveries: list[Delivery] = []
    for row in (await conn.execute(query)).all():
        conv = _conv_of(row)
        flow, state = await _load_state(session, conv)
        result = await _turn(session, deps, conv, flow, state, Inbound.wake(), now, None)
        if conv.wake_at is not None and conv.wake_at <= now:
            conv.wake_at = None  # a wake that did not move the conversation: not again
            await _save(session, conv)
        if result.messages and conv.address is not None:
            deliveries.append(
                Delivery(
                    conv.id,
                    conv.org_id,
                    conv.channel,
                    conv.address,
                    conv.contact_id,
                    result.messages,
                )
            )
    return deliveries


async def expire_sessions(
    session: AsyncSession, *, now: datetime, limit: int = 1000, org_id: int | None = None
) -> int:
    """Mark sessions silent past their expiry as `expired` (for the console and funnel);
    their next message starts fresh either way. Handed-off and waiting ones are left."""
    query = select(Conversation.id).where(
        Conversation.expires_at <= now,
        Conversation.status.in_(("active", "waiting_input")),
    )
    if org_id is not None:
        query = query.where(Conversation.org_id == org_id)
    rows = (await session.execute(query.order_by(Conversation.expires_at).limit(limit))).all()
    count = 0
    for (conv_id,) in rows:
        conv = await session.get(Conversation, conv_id, populate_existing=True)
        if conv is None or conv.expires_at > now or conv.status not in ("active", "waiting_input"):
            continue
        _flow, state = await _load_state(session, conv)
        state.status = "expired"
        state.wake_at = None
        conv.state = state.model_dump_json()
        conv.status = "expired"
        conv.wake_at = None
        await _insert(session, _INSERT_EVENTS, [_event_row(conv, "expired", now, conv.node)])
        count += 1
    await session.flush()
    return count


# ---------------------------------------------------------------- host side


async def get_conversation(
    session: AsyncSession, org_id: int, conversation_id: int
) -> Conversation:
    conv = await session.scalar(
        select(Conversation)
        .where(Conversation.id == conversation_id, Conversation.org_id == org_id)
        .execution_options(populate_existing=True)
    )
    if conv is None:
        raise not_found("conversation")
    return conv


async def take_over(
    session: AsyncSession, org_id: int, conversation_id: int, *, host_ref: str, now: datetime
) -> Conversation:
    """A host takes the conversation: the flow pauses (handed_off) until `hand_back`."""
    conv = await get_conversation(session, org_id, conversation_id)
    flow, state = await _load_state(session, conv)
    state.status = "handed_off"
    state.wake_at = None
    conv.state = state.model_dump_json()
    conv.status = "handed_off"
    conv.wake_at = None
    conv.host_ref = host_ref[:200]
    conv.taken_over_at = now
    conv.expires_at = _expiry(flow, now, None)
    await session.flush()
    return conv


async def hand_back(
    session: AsyncSession,
    org_id: int,
    conversation_id: int,
    *,
    now: datetime,
    node: str | None = None,
) -> Conversation:
    """Give the conversation back to its flow: at `node`, the handoff node's `next`, or the
    start. The flow resumes with the customer's next message."""
    conv = await get_conversation(session, org_id, conversation_id)
    flow, state = await _load_state(session, conv)
    if node is not None and node not in flow.nodes:
        raise PopdropError("invalid_request", f"node: the flow has no node {node!r}")
    current = flow.nodes.get(state.node)
    resume = node or getattr(current, "next", None) or flow.start
    state.node = resume
    state.status = "active"
    state.tries = 0
    conv.state = state.model_dump_json()
    conv.node = resume
    conv.status = "active"
    conv.host_ref = None
    conv.taken_over_at = None
    conv.expires_at = _expiry(flow, now, None)
    await session.flush()
    return conv


async def host_message(
    session: AsyncSession, org_id: int, conversation_id: int, *, text: str, now: datetime
) -> Text:
    """Record a host's reply; the caller's channel delivers the returned message."""
    if not text.strip() or not is_clean_text(text) or len(text) > 2000:
        raise PopdropError("invalid_request", "text: 1 to 2000 characters")
    conv = await get_conversation(session, org_id, conversation_id)
    message = Text(text=text)
    conv.last_message_at = now
    await _insert(
        session,
        _INSERT_MESSAGES,
        [_message_row(conv, "host", message.model_dump(mode="json"), now)],
    )
    return message


async def transcript(
    session: AsyncSession, org_id: int, conversation_id: int, *, limit: int = 200
) -> list[ChatMessage]:
    await get_conversation(session, org_id, conversation_id)
    rows = await session.scalars(
        select(ChatMessage)
        .where(ChatMessage.conversation_id == conversation_id, ChatMessage.org_id == org_id)
        .order_by(ChatMessage.id.desc())
        .limit(limit)
    )
    return list(reversed(list(rows)))


async def list_conversations(
    session: AsyncSession, org_id: int, *, limit: int = 50, status: str | None = None
) -> list[Conversation]:
    query = select(Conversation).where(Conversation.org_id == org_id)
    if status is not None:
        query = query.where(Conversation.status == status)
    return list(
        await session.scalars(query.order_by(Conversation.last_message_at.desc()).limit(limit))
    )


async def erase_person(
    session: AsyncSession,
    signer: Signer,
    org_id: int,
    *,
    contact_id: int | None,
    email: str | None = None,
    phone: str | None = None,
    now: datetime,
) -> int:
    """Forget a person's chats (for audience erase): their conversations lose the clear
    address, the contact link, the transcript, kept web messages and the state's
    variables (an email or phone they typed); funnel events stay, anonymous. Returns the
    conversations scrubbed."""
    c = _conversations.c
    conditions = []
    if contact_id is not None:
        conditions.append(c.contact_id == contact_id)
    for point in (email, phone):
        if point:
            # Their address, or a state holding what they typed (an email, a phone).
            conditions.append(c.address == point)
            conditions.append(c.state.contains(point, autoescape=True))
    if phone:
        digest = address_hash(signer, "sms", phone)
        conditions.append((c.channel == "sms") & (c.address_hash == digest))
    if not conditions:
        return 0
    conn = await session.connection()
    rows = (await conn.execute(_SELECT_CONV.where(c.org_id == org_id, or_(*conditions)))).all()
    for row in rows:
        conv = _conv_of(row)
        _flow, state = await _load_state(session, conv)
        state.vars = {}
        state.status = "expired"
        state.wake_at = None
        conv.state = state.model_dump_json()
        conv.status = "expired"
        conv.wake_at = None
        conv.address = None
        conv.contact_id = None
        conv.expires_at = now
        await _save(session, conv)
        await conn.execute(delete(_messages).where(_messages.c.conversation_id == conv.id))
        await conn.execute(delete(_web_inbox).where(_web_inbox.c.conversation_id == conv.id))
    return len(rows)


# ---------------------------------------------------------------- measurement


@dataclass(frozen=True)
class NodeStat:
    node: str
    entered: int  # sessions that entered the node
    stopped: int  # sessions whose last node it is (and that are not done)


async def node_dropoff(
    session: AsyncSession, org_id: int, key: str, version: int
) -> list[NodeStat]:
    """Per node of a flow version: sessions that entered it, and sessions that stopped
    there (their conversation's current node, not finished) — the drop-off."""
    session_key = _events.c.conversation_id * 1_000_000 + _events.c.session_no
    entered = await session.execute(
        select(_events.c.node, func.count(func.distinct(session_key)))
        .where(
            _events.c.org_id == org_id,
            _events.c.flow_key == key,
            _events.c.flow_version == version,
            _events.c.kind == "node",
        )
        .group_by(_events.c.node)
    )
    counts = {str(node): int(n) for node, n in entered}
    stopped_rows = await session.execute(
        select(_conversations.c.node, func.count())
        .where(
            _conversations.c.org_id == org_id,
            _conversations.c.flow_key == key,
            _conversations.c.flow_version == version,
            _conversations.c.status.not_in(("done",)),
        )
        .group_by(_conversations.c.node)
    )
    stopped = {str(node): int(n) for node, n in stopped_rows}
    return [
        NodeStat(node, counts.get(node, 0), stopped.get(node, 0))
        for node in sorted(set(counts) | set(stopped))
    ]


async def funnel(
    session: AsyncSession, org_id: int, *, event_id: int | None = None
) -> dict[str, int]:
    """Sessions per funnel step (chat_started, card_viewed, rsvp, hold, voucher_issued,
    checkout_started, ticket_sent, survey): Chat→RSVP is rsvp / chat_started."""
    session_key = _events.c.conversation_id * 1_000_000 + _events.c.session_no
    query = (
        select(_events.c.kind, func.count(func.distinct(session_key)))
        .where(_events.c.org_id == org_id, _events.c.kind != "node")
        .group_by(_events.c.kind)
    )
    if event_id is not None:
        query = query.where(_events.c.event_id == event_id)
    return {str(kind): int(n) for kind, n in await session.execute(query)}


__all__ = [
    "DEFAULT_FLOW_KEY",
    "ChatDeps",
    "Delivery",
    "NodeStat",
    "TurnResult",
    "erase_person",
    "expire_sessions",
    "funnel",
    "get_conversation",
    "hand_back",
    "host_card",
    "host_message",
    "list_conversations",
    "list_flow_versions",
    "node_dropoff",
    "pinned_card",
    "publish_default_flow",
    "publish_flow",
    "run_turn",
    "take_over",
    "transcript",
    "wake_due",
]
