"""Flow measurement: where sessions stop (drop-off per node) and the funnel of events."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.chat.conversations import chat_events_table, conversations_table

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
    session_key = chat_events_table.c.conversation_id * 1_000_000 + chat_events_table.c.session_no
    entered = await session.execute(
        select(chat_events_table.c.node, func.count(func.distinct(session_key)))
        .where(
            chat_events_table.c.org_id == org_id,
            chat_events_table.c.flow_key == key,
            chat_events_table.c.flow_version == version,
            chat_events_table.c.kind == "node",
        )
        .group_by(chat_events_table.c.node)
    )
    counts = {str(node): int(n) for node, n in entered}
    stopped_rows = await session.execute(
        select(conversations_table.c.node, func.count())
        .where(
            conversations_table.c.org_id == org_id,
            conversations_table.c.flow_key == key,
            conversations_table.c.flow_version == version,
            conversations_table.c.status.not_in(("done",)),
        )
        .group_by(conversations_table.c.node)
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
    session_key = chat_events_table.c.conversation_id * 1_000_000 + chat_events_table.c.session_no
    query = (
        select(chat_events_table.c.kind, func.count(func.distinct(session_key)))
        .where(chat_events_table.c.org_id == org_id, chat_events_table.c.kind != "node")
        .group_by(chat_events_table.c.kind)
    )
    if event_id is not None:
        query = query.where(chat_events_table.c.event_id == event_id)
    return {str(kind): int(n) for kind, n in await session.execute(query)}
