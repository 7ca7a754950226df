"""The host console's side of conversations: list, read the transcript, take over, reply
as the host, hand back to the flow, who the person is, and erase a person's conversations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.audience.models import Contact
from popdrop.chat.conversations import (
    INSERT_MESSAGES,
    SELECT_CONVERSATION,
    address_hash,
    conversation_of,
    conversations_table,
    insert_rows,
    load_state,
    messages_table,
    move_conversation,
    save_conversation,
    session_expiry,
)
from popdrop.chat.lifecycle import ConversationStatus
from popdrop.chat.messages import (
    Text,
)
from popdrop.chat.models import (
    ChatMessage,
    Conversation,
    WebInbox,
)
from popdrop.chat.turn import message_row
from popdrop.core.db import table_of
from popdrop.core.errors import PopdropError
from popdrop.core.schemas import is_clean_text
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned
from popdrop.rsvp.models import Rsvp
from popdrop.rsvp.notices import CHAT_SOURCE, chat_conversation_of

_web_inbox = table_of(WebInbox)


# ---------------------------------------------------------------- host side


async def get_conversation(
    session: AsyncSession, org_id: int, conversation_id: int
) -> Conversation:
    return await owned(session, Conversation, conversation_id, org_id, fresh=True)


async def take_over(
    session: AsyncSession, org_id: int, conversation_id: int, *, host_ref: str, now: datetime
) -> Conversation:
    """A host takes the conversation: the flow pauses (handed_off) until `hand_back`."""
    conv = await get_conversation(session, org_id, conversation_id)
    flow, state = await load_state(session, conv)
    move_conversation(conv, state, ConversationStatus.HANDED_OFF)
    state.wake_at = None
    conv.state = state.model_dump_json()
    conv.wake_at = None
    conv.host_ref = host_ref[:200]
    conv.taken_over_at = now
    conv.expires_at = session_expiry(flow, now, None)
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
    flow, state = await load_state(session, conv)
    if node is not None and node not in flow.nodes:
        raise PopdropError("invalid_request", f"node: the flow has no node {node!r}")
    current = flow.nodes.get(state.node)
    resume = node or getattr(current, "next", None) or flow.start
    state.node = resume
    move_conversation(conv, state, ConversationStatus.ACTIVE)
    state.tries = 0
    conv.state = state.model_dump_json()
    conv.node = resume
    conv.host_ref = None
    conv.taken_over_at = None
    conv.expires_at = session_expiry(flow, now, None)
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
    await insert_rows(
        session,
        INSERT_MESSAGES,
        [message_row(conv, "host", message.model_dump(mode="json"), now)],
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


@dataclass(frozen=True)
class Person:
    """Who a conversation is with, as far as the host may know: the linked contact, else
    the RSVP the conversation booked, else an SMS number."""

    name: str | None = None
    email: str | None = None
    phone: str | None = None

    def label(self) -> str:
        shown = [part for part in (self.name, self.email, self.phone) if part]
        return " · ".join(shown) if shown else "anonymous"


async def people(
    session: AsyncSession, org_id: int, convs: Sequence[Conversation]
) -> dict[int, Person]:
    """The `Person` of each conversation (by id), in two queries whatever their number."""
    contact_ids = {c.contact_id for c in convs if c.contact_id is not None}
    contacts: dict[int, tuple[str | None, str | None, str | None]] = {}
    if contact_ids:
        contact_rows = await session.execute(
            select(Contact.id, Contact.first_name, Contact.email, Contact.phone).where(
                Contact.org_id == org_id, Contact.id.in_(contact_ids), Contact.erased_at.is_(None)
            )
        )
        contacts = {int(r[0]): (r[1], r[2], r[3]) for r in contact_rows}
    booked: dict[int, tuple[str | None, str | None]] = {}
    if convs:
        rsvp_rows = await session.execute(
            select(Rsvp.source, Rsvp.email, Rsvp.phone)
            .where(Rsvp.org_id == org_id, Rsvp.source.in_([f"{CHAT_SOURCE}{c.id}" for c in convs]))
            .order_by(Rsvp.id)
        )
        for source, email, phone in rsvp_rows:
            conv_id = chat_conversation_of(source)
            if conv_id is not None and (email or phone):
                booked[conv_id] = (email, phone)  # the latest booking wins
    found: dict[int, Person] = {}
    for conv in convs:
        name, email, phone = contacts.get(conv.contact_id or 0, (None, None, None))
        rsvp_email, rsvp_phone = booked.get(conv.id, (None, None))
        sms = conv.address if conv.channel == "sms" else None
        found[conv.id] = Person(name, email or rsvp_email, phone or rsvp_phone or sms)
    return found


async def erase_person(
    session: AsyncSession,
    signer: Signer,
    org_id: int,
    *,
    contact_id: int | None,
    email: str | None = None,
    phone: str | None = None,
    now: datetime,
) -> list[int]:
    """Forget a person's chats (for audience erase): their conversations lose the clear
    address, the contact link, the transcript, kept web messages and the state's
    variables (an email or phone they typed); funnel events stay, anonymous. Returns the
    ids of the conversations scrubbed (so notices queued for them can go too)."""
    c = conversations_table.c
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
        return []
    conn = await session.connection()
    rows = (
        await conn.execute(SELECT_CONVERSATION.where(c.org_id == org_id, or_(*conditions)))
    ).all()
    for row in rows:
        conv = conversation_of(row)
        _flow, state = await load_state(session, conv)
        state.vars = {}
        move_conversation(conv, state, ConversationStatus.EXPIRED)
        state.wake_at = None
        conv.state = state.model_dump_json()
        conv.wake_at = None
        conv.address = None
        conv.contact_id = None
        conv.expires_at = now
        await save_conversation(session, conv)
        await conn.execute(
            delete(messages_table).where(messages_table.c.conversation_id == conv.id)
        )
        await conn.execute(delete(_web_inbox).where(_web_inbox.c.conversation_id == conv.id))
    return [int(row.id) for row in rows]
