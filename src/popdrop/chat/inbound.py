"""Where every channel (web widget, SMS, Telegram) hands an inbound message.

A `/command` from an address registered as a host of the organization runs as a host
command (`popdrop.chat.host`); anything else, from anyone, is a flow turn
(`popdrop.chat.turn.run_turn`). Keeping this choice here, above both, keeps the flow
service free of the host side.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.chat import conversations, flow_store, host
from popdrop.chat import turn as chat_turn
from popdrop.chat.engine import Inbound
from popdrop.chat.messages import Capabilities
from popdrop.core.db import Database, LateWriteLost, defer_hot_writes


async def turn(
    session: AsyncSession,
    deps: conversations.ChatDeps,
    *,
    org_id: int,
    channel: str,
    address: str,
    inbound: Inbound,
    now: datetime,
    flow_key: str = flow_store.DEFAULT_FLOW_KEY,
    capabilities: Capabilities | None = None,
) -> chat_turn.TurnResult:
    """One inbound message, in the caller's transaction."""
    if inbound.kind == "text" and inbound.text.lstrip().startswith("/"):
        ran = await host.maybe_host_command(
            session,
            deps,
            org_id=org_id,
            channel=channel,
            address=conversations.normalize_address(channel, address),
            text=inbound.text,
            now=now,
        )
        if ran is not None:
            return chat_turn.TurnResult(None, 0, "host", None, ran, keyword="host")
    return await chat_turn.run_turn(
        session,
        deps,
        org_id=org_id,
        channel=channel,
        address=address,
        inbound=inbound,
        now=now,
        flow_key=flow_key,
        capabilities=capabilities,
    )


async def handle(
    db: Database,
    deps: conversations.ChatDeps,
    *,
    org_id: int,
    channel: str,
    address: str,
    inbound: Inbound,
    now: datetime,
    flow_key: str = flow_store.DEFAULT_FLOW_KEY,
    capabilities: Capabilities | None = None,
) -> chat_turn.TurnResult:
    """`turn` in its own transaction (run again on a PostgreSQL deadlock).

    Hot rows (a slot's places, audit chain heads) are written just before the commit, so
    hundreds of conversations booking the same slot queue on it for one round trip each,
    not a whole turn; if the places went meanwhile the turn runs again the ordinary way
    and takes the flow's "full" branch.
    """
    deferring = True

    async def work(session: AsyncSession) -> chat_turn.TurnResult:
        if deferring:
            defer_hot_writes(session)
        return await turn(
            session,
            deps,
            org_id=org_id,
            channel=channel,
            address=address,
            inbound=inbound,
            now=now,
            flow_key=flow_key,
            capabilities=capabilities,
        )

    try:
        return await db.in_transaction(work)
    except LateWriteLost:
        deferring = False
        return await db.in_transaction(work)


__all__ = ["handle", "turn"]
