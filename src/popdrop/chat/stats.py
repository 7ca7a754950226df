"""Flow measurement: where sessions stop (drop-off per node) and the funnel of events.

The funnel's steps the metrics log holds are read from its rollups, plus the log rows
the worker has not folded yet, in one statement: the figures are current and the raw log
is never scanned. They are the chat's sessions and cards shown (which the chat logs) and
the RSVPs and holds made in a chat (which their services log with channel `chat`), so
the console's Chat→RSVP is the insights' `chat_rsvp`. The steps the log does not hold
(vouchers, tickets, checkout links, survey answers in a chat) are counted from the chat's
own events.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, false, func, literal, or_, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.chat.conversations import chat_events_table, conversations_table
from popdrop.metrics.kinds import Kind
from popdrop.metrics.rollups import funnel_events, funnel_rollups

# Funnel steps read from the metrics log: the chat's own (`turn._log_funnel`), and the
# RSVPs and holds their services log for a chat (channel `chat`; an RSVP also label `chat`).
LOGGED_STEPS = (Kind.CHAT_STARTED.value, Kind.CARD_VIEWED.value, Kind.RSVP.value, Kind.HOLD.value)


def _in_chat(c: Any) -> ColumnElement[bool]:
    """The log rows (or rollup rows) of the chat's funnel steps."""
    return or_(
        c.kind.in_((Kind.CHAT_STARTED.value, Kind.CARD_VIEWED.value)),
        and_(c.kind == Kind.RSVP.value, or_(c.channel == "chat", c.label == "chat")),
        and_(c.kind == Kind.HOLD.value, c.channel == "chat"),
    )


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
    """Per funnel step: chat_started (sessions), card_viewed (cards shown), rsvp (confirmed
    RSVPs made in a chat), hold (holds placed in a chat), and sessions that reached
    voucher_issued, checkout_started, ticket_sent, survey. Chat→RSVP is rsvp /
    chat_started."""
    counts = await _logged(session, org_id, event_id)
    session_key = chat_events_table.c.conversation_id * 1_000_000 + chat_events_table.c.session_no
    query = (
        select(chat_events_table.c.kind, func.count(func.distinct(session_key)))
        .where(
            chat_events_table.c.org_id == org_id,
            chat_events_table.c.kind.not_in(("node", *LOGGED_STEPS)),
        )
        .group_by(chat_events_table.c.kind)
    )
    if event_id is not None:
        query = query.where(chat_events_table.c.event_id == event_id)
    counts.update({str(kind): int(n) for kind, n in await session.execute(query)})
    return counts


async def _logged(
    session: AsyncSession,
    org_id: int,
    event_id: int | None,
    window: tuple[datetime, datetime] | None = None,
) -> dict[str, int]:
    """The log's chat steps: rollups plus the rows not folded yet (one statement, so a
    fold committing meanwhile neither loses nor doubles a row). All time reads the hourly
    rollups; a window (whole minutes: a local day) reads the minute ones."""
    r, e = funnel_rollups.c, funnel_events.c
    folded = select(r.kind, r.n).where(
        r.org_id == org_id, r.grain == (60 if window is None else 1), _in_chat(r)
    )
    # `= false`, not `IS FALSE`: only the former lets the planner use the partial index
    # of unfolded rows instead of reading the organization's whole log.
    fresh = select(e.kind, literal(1).label("n")).where(
        e.org_id == org_id, e.rolled == false(), _in_chat(e)
    )
    if event_id is not None:
        folded = folded.where(r.event_id == event_id)
        fresh = fresh.where(e.event_id == event_id)
    if window is not None:
        start, end = window
        folded = folded.where(r.bucket >= start, r.bucket < end)
        fresh = fresh.where(e.at >= start, e.at < end)
    both = union_all(folded, fresh).subquery()
    rows = await session.execute(select(both.c.kind, func.sum(both.c.n)).group_by(both.c.kind))
    counts = dict.fromkeys(LOGGED_STEPS, 0)
    counts.update({str(kind): int(n) for kind, n in rows})
    return counts


async def chats_started(
    session: AsyncSession, org_id: int, event_id: int, start: datetime, end: datetime
) -> int:
    """Chat sessions of an event started in [start, end), whole minutes (a host's day)."""
    return (await _logged(session, org_id, event_id, (start, end)))[Kind.CHAT_STARTED.value]
