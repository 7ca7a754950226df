"""The conversation store: what a turn needs from the process (`ChatDeps`), who acts
for a customer (`chat_principal`), channel addresses, and the `chat_conversations` row a
turn loads, locks and saves.

Addresses are stored as a keyed hash (`address_hash`) so an address is found without
keeping it readable; the conversation row is read and written with SQLAlchemy Core (no
ORM) because this is the hot path of every turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal, system_principal
from popdrop.audience import contact_points
from popdrop.audience.models import Contact
from popdrop.chat.engine import (
    ChatState,
    Inbound,
)
from popdrop.chat.flow import Flow
from popdrop.chat.flow_store import get_flow, session_flow
from popdrop.chat.lifecycle import (
    CONVERSATION_LIFECYCLE,
    ENDED_CONVERSATION_STATUSES,
    ConversationStatus,
)
from popdrop.chat.models import (
    ChatEvent,
    ChatMessage,
    Conversation,
)
from popdrop.core.db import table_of
from popdrop.core.errors import PopdropError
from popdrop.core.identity import normalize_phone
from popdrop.core.schemas import is_clean_text
from popdrop.core.signing import Signer

CHAT_ACTOR = "system:chat"
CHAT_SCOPES = frozenset(
    {"holds:write", "tickets:write", "vouchers:write", "audience:read", "audience:write"}
)

conversations_table = table_of(Conversation)
messages_table = table_of(ChatMessage)
chat_events_table = table_of(ChatEvent)


@dataclass(frozen=True)
class ChatDeps:
    """What a turn needs from the process (channel adapters build it from AppContext)."""

    signer: Signer
    base_url: str = "http://127.0.0.1:8000"
    # Where short links (`/s/{slug}`) are served, when a short host is configured; SMS
    # links use it (empty: `base_url`).
    short_base_url: str = ""


def chat_principal(org_id: int) -> Principal:
    """Who acts for a customer's conversation (RSVP, hold, voucher, ticket, consent)."""
    return system_principal(org_id, CHAT_ACTOR, scopes=CHAT_SCOPES)


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


def clean_inbound(inbound: Inbound) -> Inbound:
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
    the hot path). `save_conversation` writes every mutable column back in one UPDATE."""

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
SELECT_CONVERSATION = select(*(conversations_table.c[name] for name in _CONV_FIELDS))
_BY_ADDRESS = SELECT_CONVERSATION.where(
    conversations_table.c.org_id == bindparam("o_id"),
    conversations_table.c.channel == bindparam("o_channel"),
    conversations_table.c.address_hash == bindparam("o_hash"),
)
_BY_ADDRESS_LOCKED = _BY_ADDRESS.with_for_update()
_SAVE_CONV = (
    update(conversations_table)
    .where(conversations_table.c.id == bindparam("c_id"))
    .values(
        {
            name: bindparam(f"v_{name}", type_=conversations_table.c[name].type)
            for name in _CONV_MUTABLE
        }
    )
)
_INSERT_CONV = insert(conversations_table).returning(conversations_table.c.id)
INSERT_MESSAGES = insert(messages_table)
INSERT_EVENTS = insert(chat_events_table)
_MESSAGE_COLUMNS = tuple(c.name for c in messages_table.c if c.name != "id")
_EVENT_COLUMNS = tuple(c.name for c in chat_events_table.c if c.name != "id")


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
    insert(chat_events_table)
    .from_select(_EVENT_COLUMNS, _unnest(chat_events_table, _EVENT_COLUMNS, "e_"))
    .add_cte(_SAVE_CONV.cte("saved"))
    .add_cte(
        insert(messages_table)
        .from_select(_MESSAGE_COLUMNS, _unnest(messages_table, _MESSAGE_COLUMNS, "m_"))
        .cte("said")
    )
)


async def insert_rows(session: AsyncSession, statement: Any, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn = await session.connection()
        await conn.execute(statement, rows)


def conversation_of(row: Any) -> ConversationRow:
    values = dict(zip(_CONV_FIELDS, row, strict=True))
    values["address_hash"] = bytes(values["address_hash"])
    return ConversationRow(**values)


async def locked_conversation(
    session: AsyncSession, org_id: int, channel: str, digest: bytes
) -> ConversationRow | None:
    """The conversation of an address, locked for this transaction (FOR UPDATE on
    PostgreSQL; SQLite writers are serialised already)."""
    conn = await session.connection()
    query = _BY_ADDRESS_LOCKED if conn.dialect.name == "postgresql" else _BY_ADDRESS
    row = (
        await conn.execute(query, {"o_id": org_id, "o_channel": channel, "o_hash": digest})
    ).first()
    return conversation_of(row) if row is not None else None


def _save_params(conv: ConversationRow) -> dict[str, Any]:
    params = {f"v_{name}": getattr(conv, name) for name in _CONV_MUTABLE}
    params["c_id"] = conv.id
    return params


async def save_conversation(session: AsyncSession, conv: ConversationRow) -> None:
    conn = await session.connection()
    await conn.execute(_SAVE_CONV, _save_params(conv))


def _as_arrays(
    prefix: str, columns: tuple[str, ...], rows: list[dict[str, Any]]
) -> dict[str, list[Any]]:
    return {f"{prefix}{name}": [row[name] for row in rows] for name in columns}


async def save_turn(
    session: AsyncSession,
    conv: ConversationRow,
    messages: list[dict[str, Any]],
    events: list[dict[str, Any]],
) -> None:
    """The conversation row, transcript lines and funnel events of a turn."""
    conn = await session.connection()
    if conn.dialect.name != "postgresql":
        await conn.execute(_SAVE_CONV, _save_params(conv))
        await insert_rows(session, INSERT_MESSAGES, messages)
        await insert_rows(session, INSERT_EVENTS, events)
        return
    params = _save_params(conv)
    params |= _as_arrays("m_", _MESSAGE_COLUMNS, messages)
    params |= _as_arrays("e_", _EVENT_COLUMNS, events)
    await conn.execute(_PERSIST_FUSED, params)


async def find_contact_id(
    session: AsyncSession,
    signer: Signer,
    org_id: int,
    *,
    email: str | None = None,
    phone: str | None = None,
) -> int | None:
    try:
        points = contact_points.contact_points(signer, email, phone)
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


def session_expiry(flow: Flow, now: datetime, wake_at: datetime | None) -> datetime:
    base = max(now, wake_at) if wake_at is not None else now
    return base + timedelta(seconds=flow.session_ttl)


async def new_session(
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
    """Start (or restart, on the same row) a session on the latest flow version (an unbound
    version binds the org's next open event; the shipped flow when none: flow_store)."""
    version, flow, event_id = await session_flow(session, org_id, flow_key, now)
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
        "expires_at": session_expiry(flow, now, None),
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
        contact_id = await find_contact_id(session, deps.signer, org_id, phone=address)
        points = contact_points.contact_points(deps.signer, None, address)
        suppressed = await contact_points.suppressed_channels(session, org_id, points)
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
        found = await locked_conversation(session, org_id, channel, digest)
        if found is None:
            raise
        return found, *(await load_state(session, found))
    return ConversationRow(id=int(new_id), **values), flow, state


async def load_state(
    session: AsyncSession, conv: ConversationRow | Conversation
) -> tuple[Flow, ChatState]:
    flow, _event = await get_flow(session, conv.org_id, conv.flow_key, conv.flow_version)
    try:
        state = ChatState.model_validate_json(conv.state)
    except ValidationError:
        state = ChatState.initial(flow, conv.flow_key, conv.flow_version)
    return flow, state


def session_over(conv: ConversationRow, state: ChatState, inbound: Inbound, now: datetime) -> bool:
    if inbound.kind == "wake":
        return False
    if inbound.kind == "start":
        return state.turns > 0  # a deep link / QR scan opens a session of its own
    if state.status in ENDED_CONVERSATION_STATUSES:
        return True
    if state.status == "handed_off":
        return False
    return conv.expires_at <= now


def move_conversation(
    conv: ConversationRow | Conversation, state: ChatState, target: ConversationStatus
) -> None:
    """The one writer of a conversation's status: the row and its engine state move
    together, along `CONVERSATION_LIFECYCLE` (staying is not a move); any other move is
    refused (`invalid_transition`)."""
    current = ConversationStatus(conv.status)
    if target != current:
        CONVERSATION_LIFECYCLE.check(current, target)
    state.status = target
    conv.status = target
