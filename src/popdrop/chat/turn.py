"""Chat turns: runs one turn of a conversation against the domain services.

`run_turn(session, deps, org_id=…, channel=…, address=…, inbound=…, now=…)`:

1. Global keywords first, on every channel: STOP / START / HELP (and YES for a pending
   double opt-in) go through `audience.keywords.handle_inbound`, the one implementation
   shared with SMS drops. A stopped conversation runs no flow until START.
2. The conversation of (org, channel, address) is loaded and locked (FOR UPDATE on
   PostgreSQL; SQLite writers are serialised). It keeps its flow version; an expired or
   finished session starts a new one (`session_no` + 1) on the latest published version.
3. Facts the turn may need are read (the flow says which, per node), `engine.step` runs,
   and each action effect is applied through the domain services inside a SAVEPOINT: a
   refusal (sold out, slot full…) rolls back only that effect and goes back to the engine
   as a failed `EffectResult`, which takes the node's failure branch. Everything else —
   state, transcript, funnel events — is written in the caller's transaction, so a turn
   is all or nothing. The steps the chat alone knows of (a session started, a card shown)
   also enter the metrics funnel log there; RSVPs, holds and checkouts are logged by their
   own services, whatever channel they came from.
4. Outbound messages are degraded to the channel's capabilities; numbered options are
   kept in the state so a reply "2" resolves.

Channel adapters (web widget, SMS, Telegram) hand inbound messages to
`popdrop.chat.inbound` (a host's `/command` first, else `run_turn`) and deliver the
returned messages; `wake_due` runs scheduled waits and timeouts
(reminders, the day-after survey) and returns what to deliver.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.audience import keywords
from popdrop.audience.models import Contact
from popdrop.chat import engine
from popdrop.chat.conversations import (
    INSERT_EVENTS,
    INSERT_MESSAGES,
    SELECT_CONVERSATION,
    ChatDeps,
    ConversationRow,
    address_hash,
    clean_inbound,
    consent_channel,
    conversation_of,
    conversations_table,
    insert_rows,
    load_state,
    locked_conversation,
    move_conversation,
    new_session,
    normalize_address,
    save_conversation,
    save_turn,
    session_expiry,
    session_over,
)
from popdrop.chat.effects import AppliedEffects, Effects, event_row
from popdrop.chat.engine import (
    ChatState,
    Inbound,
)
from popdrop.chat.facts import pinned_card, read_facts
from popdrop.chat.flow import Flow
from popdrop.chat.flow_store import DEFAULT_FLOW_KEY
from popdrop.chat.lifecycle import EXPIRING_CONVERSATION_STATUSES, ConversationStatus
from popdrop.chat.messages import (
    OUT_MESSAGES,
    Capabilities,
    OutMessage,
    Text,
    capabilities_of,
    degrade,
    numbered_choices,
)
from popdrop.chat.models import (
    Conversation,
)
from popdrop.core import metrics
from popdrop.core.errors import PopdropError
from popdrop.core.signing import Signer
from popdrop.metrics import log as funnel
from popdrop.metrics.kinds import Kind

REDACTED = "[redacted]"
MAX_ROUNDS = 100
# Chat funnel steps that go to the metrics log from here (the others' services log theirs).
_LOGGED_KINDS = {"chat_started": Kind.CHAT_STARTED, "card_viewed": Kind.CARD_VIEWED}


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
) -> tuple[ChatState, list[OutMessage], AppliedEffects]:
    facts = await read_facts(session, conv, engine.needs(flow, state, inbound), now)
    effects = Effects(session, deps, conv, now)
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
    applied: AppliedEffects,
    now: datetime,
) -> None:
    conv.state = state.model_dump_json()
    conv.node = state.node
    move_conversation(conv, state, state.status)  # where the engine's turn led
    conv.wake_at = state.wake_at
    conv.last_message_at = now
    conv.expires_at = session_expiry(flow, now, state.wake_at)
    rows: list[dict[str, Any]] = []
    if inbound is not None and inbound.kind != "wake":
        rows.append(message_row(conv, "in", inbound.model_dump(mode="json"), now))
    for body in OUT_MESSAGES.dump_python(messages, mode="json"):
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        if applied.secrets:
            text = _redact(text, applied.secrets)
        rows.append(message_row(conv, "out", text, now))
    await save_turn(session, conv, rows, applied.events)


async def funnel_person(
    session: AsyncSession, signer: Signer, conv: ConversationRow | Conversation
) -> str:
    """Who the funnel log says it was: the contact when the conversation knows it, else a
    keyed digest of the conversation (`chat:<id>`, the reference the chat's holds and
    RSVPs carry too), never the address."""
    if conv.contact_id is not None:
        contact = await session.get(Contact, conv.contact_id)
        if contact is not None:
            person = funnel.point_person(contact.email_hash, contact.phone_hash, contact.id)
            if person is not None:
                return person
    return funnel.keyed_person(signer, f"chat:{conv.id}")


async def _log_funnel(
    session: AsyncSession, signer: Signer, conv: ConversationRow, events: list[dict[str, Any]]
) -> None:
    """This turn's chat-only funnel steps in the metrics log, one statement."""
    logged = [row for row in events if row["kind"] in _LOGGED_KINDS]
    if not logged:
        return  # most turns: no read for the person
    person = await funnel_person(session, signer, conv)
    entries = [
        funnel.Entry(
            conv.org_id,
            _LOGGED_KINDS[row["kind"]],
            row["at"],
            funnel.Tags(channel=conv.channel[:12], event_id=conv.event_id),
            person,
            f"chat:{conv.id}:{conv.session_no}",  # the session: steps per session
        )
        for row in logged
    ]
    await funnel.record_many(session, entries)


def message_row(
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
    if inbound.kind != "text" or keywords.parse_keyword(inbound.text) is None:
        return None
    answer = await keywords.handle_inbound(
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
    await save_conversation(session, conv)
    rows = [message_row(conv, "in", inbound.model_dump(mode="json"), now)]
    rows += [message_row(conv, "out", m.model_dump(mode="json"), now) for m in messages]
    await insert_rows(session, INSERT_MESSAGES, rows)
    await insert_rows(
        session,
        INSERT_EVENTS,
        [event_row(conv, f"keyword_{answer.keyword}", now, ref=answer.action)],
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
    metrics.CHAT_TURNS.labels(channel).inc()
    inbound = clean_inbound(inbound)
    address = normalize_address(channel, address)
    digest = address_hash(deps.signer, channel, address)
    conv = await locked_conversation(session, org_id, channel, digest)
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
        conv, flow, state = await new_session(
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
        flow, state = await load_state(session, conv)
        fresh = conv.opted_out_at is None and session_over(conv, state, inbound, now)
        if fresh:
            if state.status in ("active", "waiting_input", "waiting_until"):
                await insert_rows(
                    session, INSERT_EVENTS, [event_row(conv, "expired", now, state.node)]
                )
            conv, flow, state = await new_session(
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
        await insert_rows(
            session,
            INSERT_MESSAGES,
            [message_row(conv, "in", inbound.model_dump(mode="json"), now)],
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
            applied.events.append(event_row(conv, "card_viewed", now, ref=str(pinned.product_id)))
    caps = capabilities or capabilities_of(conv.channel)
    messages = degrade(outbound, caps, now=now)
    if messages:
        state.numbered = numbered_choices(messages)
    await _persist(session, conv, flow, state, inbound, messages, applied, now)
    await _log_funnel(session, deps.signer, conv, applied.events)
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
    c = conversations_table.c
    query = (
        SELECT_CONVERSATION.where(
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
        conv = conversation_of(row)
        flow, state = await load_state(session, conv)
        result = await _turn(session, deps, conv, flow, state, Inbound.wake(), now, None)
        if conv.wake_at is not None and conv.wake_at <= now:
            conv.wake_at = None  # a wake that did not move the conversation: not again
            await save_conversation(session, conv)
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
        Conversation.status.in_(EXPIRING_CONVERSATION_STATUSES),
    )
    if org_id is not None:
        query = query.where(Conversation.org_id == org_id)
    rows = (await session.execute(query.order_by(Conversation.expires_at).limit(limit))).all()
    count = 0
    for (conv_id,) in rows:
        conv = await session.get(Conversation, conv_id, populate_existing=True)
        if (
            conv is None
            or conv.expires_at > now
            or conv.status not in EXPIRING_CONVERSATION_STATUSES
        ):
            continue
        _flow, state = await load_state(session, conv)
        move_conversation(conv, state, ConversationStatus.EXPIRED)
        state.wake_at = None
        conv.state = state.model_dump_json()
        conv.wake_at = None
        await insert_rows(session, INSERT_EVENTS, [event_row(conv, "expired", now, conv.node)])
        count += 1
    await session.flush()
    return count
