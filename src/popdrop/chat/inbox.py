"""The web visitor's inbox: scheduled and host messages wait here until a socket of the
visitor's takes them.

Web chat has no address to reach someone who is not connected. So the worker tick keeps
each web delivery as a `chat_web_inbox` row, in the same transaction that takes it (a
crash then loses nothing). Then it hands the row to the visitor's socket: in its own
process, or through the Redis relay (`chat.live`) in the server process that holds the
socket. If the visitor is connected nowhere, the row waits, and the visitor gets it
right after `ready` when they come back (a reload, a new visit with the same visitor
token). A socket takes rows by deleting them, and sends them in the same transaction, so
a row goes to one socket: a failed send rolls the delete back. Rows older than
`KEEP_FOR` are dropped by `purge`.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.chat import conversations, live
from popdrop.chat.models import Conversation, WebInbox
from popdrop.core.db import Database, table_of
from popdrop.core.signing import Signer

KEEP_FOR = timedelta(days=7)

_inbox = table_of(WebInbox)
_conversations = table_of(Conversation)


class _NotSent(Exception):
    """The socket went away mid-send: roll the take back."""


async def keep(
    session: AsyncSession, org_id: int, conversation_id: int, messages: list[Any], now: datetime
) -> int:
    """Keep `messages` (as the widget gets them) for the conversation's visitor; the row id."""
    conn = await session.connection()
    row = {
        "org_id": org_id,
        "conversation_id": conversation_id,
        "body": json.dumps(messages, separators=(",", ":"), ensure_ascii=False),
        "created_at": now,
    }
    return int((await conn.execute(insert(_inbox).returning(_inbox.c.id), row)).scalar_one())


async def hand_over(
    db: Database, signer: Signer, org_id: int, address: str, inbox_id: int | None = None
) -> int:
    """Send one kept row (`inbox_id`), or all of the visitor's, to their socket open in this
    process, as one pushed frame; how many messages went."""
    if not live.is_open(org_id, address):
        return 0
    digest = conversations.address_hash(signer, live.CHANNEL, address)
    theirs = select(_conversations.c.id).where(
        _conversations.c.org_id == org_id,
        _conversations.c.channel == live.CHANNEL,
        _conversations.c.address_hash == digest,
    )
    take = delete(_inbox).where(_inbox.c.conversation_id.in_(theirs))
    if inbox_id is not None:
        take = take.where(_inbox.c.id == inbox_id)
    try:
        async with db.transaction() as session:
            conn = await session.connection()
            rows = sorted((await conn.execute(take.returning(_inbox.c.id, _inbox.c.body))).all())
            messages = [m for _id, body in rows for m in json.loads(body)]
            if not messages:
                return 0
            frame = {"type": "messages", "messages": messages, "pushed": True}
            if not await live.push(org_id, address, frame):
                raise _NotSent
    except _NotSent:
        return 0
    return len(messages)


async def purge(session: AsyncSession, *, now: datetime) -> int:
    """Drop rows kept longer than `KEEP_FOR` (a visitor who never came back)."""
    conn = await session.connection()
    result = await conn.execute(delete(_inbox).where(_inbox.c.created_at < now - KEEP_FOR))
    return int(result.rowcount or 0)


__all__ = ["KEEP_FOR", "hand_over", "keep", "purge"]
