"""Host console pages (`/chat/console`): live conversations, one conversation's transcript
with take over / hand back / reply as host / pin a product card, per-node drop-off of the
default flow, Chat→RSVP, host addresses and broadcasts.

The rules of the other operator pages hold (`PageRoute`): a session and `chat:read` to
see (`chat:write` to act), so a volunteer or a partner gets a 403 page; every POST
carries the double-submit CSRF field and calls `check_csrf` first; another
organization's conversation is a 404; a refusal is shown on the page (4xx), never a 500.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.chat import console as chat_console
from popdrop.chat import conversations, flow_store, host, stats
from popdrop.chat.models import ChatMessage
from popdrop.core.errors import PopdropError
from popdrop.inventory.models import Product
from popdrop.web.auth import check_csrf
from popdrop.web.context import AppContext
from popdrop.web.pagekit import Operator, PageRoute, is_htmx
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False, route_class=PageRoute)

SHOWN = 50
FUNNEL_STEPS = (
    "chat_started",
    "card_viewed",
    "hold",
    "rsvp",
    "voucher_issued",
    "ticket_sent",
    "survey",
)
WHO = {
    "in": "customer",
    "out": "flow",
    "host": "host",
    "queued": "host (queued)",
    "bqueued": "broadcast (queued)",
    "bcast": "broadcast",
}
_NOTICES = {
    "taken": "You have the conversation: the flow is paused until you hand it back.",
    "handed": "Handed back: the flow answers the customer's next message.",
    "replied": "Reply queued for the customer's channel.",
    "pinned": "Product card pinned and sent.",
    "host": "Host address saved.",
    "unhost": "Host address removed.",
}


@dataclass(frozen=True)
class Line:
    id: int
    who: str
    direction: str
    text: str
    at: Any


def describe(direction: str, body: str) -> str:
    """A transcript row as one line of text (an inbound, or an outbound message)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict):
        return str(data)
    kind = data.get("kind")
    if direction == "in":
        if kind == "button":
            return f"[button {data.get('payload') or ''}]"
        if kind == "start":
            return f"[start {data.get('payload') or ''}]".replace(" ]", "]")
        if kind == "wake":
            return "[timer]"
        return str(data.get("text", ""))
    if kind == "card":
        left = data.get("available")
        stock = "" if left is None else (" (sold out)" if left <= 0 else f" ({left} left)")
        return f"[card] {data.get('title', '')}{stock}"
    if kind == "carousel":
        titles = ", ".join(str(c.get("title", "")) for c in data.get("cards", []))
        head = str(data.get("text") or "")
        return f"{head} [cards: {titles}]".strip()
    if kind == "buttons":
        labels = " | ".join(str(b.get("label", "")) for b in data.get("buttons", []))
        return f"{data.get('text') or ''} [{labels}]".strip()
    if kind == "countdown":
        return f"[countdown] {data.get('text') or ''} {data.get('to', '')}".strip()
    if kind == "image":
        return f"[image] {data.get('alt') or data.get('url', '')}"
    if kind == "qr_ticket":
        return f"[ticket] {data.get('text') or ''}".strip()
    return str(data.get("text", ""))


async def _last_lines(
    session: AsyncSession, org_id: int, conversation_ids: list[int]
) -> dict[int, str]:
    """The last message of each conversation, for the list."""
    last: dict[int, str] = {}
    if not conversation_ids:
        return last
    latest = (
        select(func.max(ChatMessage.id))
        .where(ChatMessage.org_id == org_id, ChatMessage.conversation_id.in_(conversation_ids))
        .group_by(ChatMessage.conversation_id)
    )
    rows = await session.execute(
        select(ChatMessage.conversation_id, ChatMessage.direction, ChatMessage.body).where(
            ChatMessage.id.in_(latest)
        )
    )
    for conv_id, direction, body in rows:
        last[conv_id] = f"{WHO.get(direction, direction)}: {describe(direction, body)}"
    return last


async def _list_context(session: AsyncSession, principal: Principal) -> dict[str, Any]:
    convs = await chat_console.list_conversations(session, principal.org_id, limit=SHOWN)
    last = await _last_lines(session, principal.org_id, [c.id for c in convs])
    people = await chat_console.people(session, principal.org_id, convs)
    return {
        "conversations": [
            {
                "id": c.id,
                "channel": c.channel,
                "contact": people[c.id].label(),
                "node": c.node,
                "status": c.status,
                "last": last.get(c.id, ""),
                "at": c.last_message_at,
                "host": c.host_ref,
            }
            for c in convs
        ]
    }


async def _measures(session: AsyncSession, org_id: int) -> dict[str, Any]:
    try:
        version = await flow_store.latest_version(session, org_id, flow_store.DEFAULT_FLOW_KEY)
    except PopdropError:
        version = None
    drop = (
        await stats.node_dropoff(session, org_id, flow_store.DEFAULT_FLOW_KEY, version)
        if version
        else []
    )
    most = max((s.entered for s in drop), default=0)
    funnel = await stats.funnel(session, org_id)
    started = funnel.get("chat_started", 0)
    rate = round(100 * funnel.get("rsvp", 0) / started, 1) if started else 0.0
    return {
        "version": version,
        "dropoff": sorted(drop, key=lambda s: (-s.entered, s.node)),
        "most": most,
        "funnel": [(step, funnel.get(step, 0)) for step in FUNNEL_STEPS],
        "started": started,
        "chat_to_rsvp": rate,
    }


@router.get("/chat/console")
async def console(request: Request, principal: Operator, ctx: Ctx) -> Response:
    principal.require("chat:read")
    async with ctx.db.reader() as session:
        context: dict[str, Any] = {
            "principal": principal,
            **await _list_context(session, principal),
        }
        if is_htmx(request):
            response = render(request, "chat/_console_list.html", context)
            response.headers.update(NO_STORE)
            return response
        context.update(await _measures(session, principal.org_id))
        event = await host.current_event(session, principal.org_id, ctx.clock.now())
        hosts = await host.list_hosts(session, principal.org_id)
    context.update(
        {
            "event": event,
            "hosts": hosts,
            "can_write": "chat:write" in principal.scopes,
            "notice": _NOTICES.get(request.query_params.get("done", "")),
            "broadcast": request.query_params.get("broadcast", "")[:300],
            "error": request.query_params.get("error", "")[:300],
        }
    )
    response = render(request, "chat/console.html", context)
    response.headers.update(NO_STORE)
    return response


async def _conversation_context(
    session: AsyncSession, principal: Principal, conversation_id: int
) -> dict[str, Any]:
    conv = await chat_console.get_conversation(session, principal.org_id, conversation_id)
    rows = await chat_console.transcript(session, principal.org_id, conversation_id)
    lines = [
        Line(
            m.id,
            WHO.get(m.direction, m.direction),
            m.direction,
            describe(m.direction, m.body),
            m.created_at,
        )
        for m in rows
    ]
    person = (await chat_console.people(session, principal.org_id, [conv]))[conv.id]
    return {
        "conv": conv,
        "contact": person.label(),
        "person": person,
        "lines": lines,
    }


@router.get("/chat/console/{conversation_id}")
async def conversation(
    request: Request, conversation_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    return await _conversation_page(request, ctx, principal, conversation_id)


async def _conversation_page(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    conversation_id: int,
    *,
    error: str | None = None,
    status: int = 200,
) -> Response:
    principal.require("chat:read")
    async with ctx.db.reader() as session:
        context: dict[str, Any] = {
            "principal": principal,
            **await _conversation_context(session, principal, conversation_id),
        }
        if is_htmx(request):
            response = render(request, "chat/_console_transcript.html", context)
            response.headers.update(NO_STORE)
            return response
        event_id = context["conv"].event_id
        products = (
            list(
                await session.scalars(
                    select(Product)
                    .where(Product.org_id == principal.org_id, Product.event_id == event_id)
                    .order_by(Product.id)
                )
            )
            if event_id is not None
            else []
        )
    context.update(
        {
            "products": products,
            "error": error,
            "can_write": "chat:write" in principal.scopes,
            "notice": _NOTICES.get(request.query_params.get("done", "")),
        }
    )
    response = render(request, "chat/console_conversation.html", context, status=status)
    response.headers.update(NO_STORE)
    return response


def _back(conversation_id: int, done: str) -> RedirectResponse:
    return RedirectResponse(f"/chat/console/{conversation_id}?done={done}", status_code=303)


@router.post("/chat/console/{conversation_id}/take-over")
async def take_over(
    request: Request, conversation_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    check_csrf(request, ctx, await request.form())
    principal.require("chat:write")
    async with ctx.db.transaction() as session:
        await chat_console.take_over(
            session,
            principal.org_id,
            conversation_id,
            host_ref=principal.actor,
            now=ctx.clock.now(),
        )
    return _back(conversation_id, "taken")


@router.post("/chat/console/{conversation_id}/hand-back")
async def hand_back(
    request: Request, conversation_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    check_csrf(request, ctx, await request.form())
    principal.require("chat:write")
    async with ctx.db.transaction() as session:
        await chat_console.hand_back(
            session, principal.org_id, conversation_id, now=ctx.clock.now()
        )
    return _back(conversation_id, "handed")


@router.post("/chat/console/{conversation_id}/reply")
async def reply(
    request: Request, conversation_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    data = await request.form()
    check_csrf(request, ctx, data)
    principal.require("chat:write")
    text = str(data.get("text", ""))
    try:
        async with ctx.db.transaction() as session:
            await host.queue_reply(
                session, principal.org_id, conversation_id, text=text, now=ctx.clock.now()
            )
    except PopdropError as error:
        if error.reason != "invalid_request":
            raise
        return await _conversation_page(
            request, ctx, principal, conversation_id, error=error.message, status=422
        )
    return _back(conversation_id, "replied")


@router.post("/chat/console/{conversation_id}/pin")
async def pin(request: Request, conversation_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    data = await request.form()
    check_csrf(request, ctx, data)
    principal.require("chat:write")
    raw = str(data.get("product_id", ""))
    if not raw.isdecimal() or len(raw) > 18:
        return await _conversation_page(
            request, ctx, principal, conversation_id, error="product: choose one", status=422
        )
    now = ctx.clock.now()
    async with ctx.db.transaction() as session:
        conv = await chat_console.get_conversation(session, principal.org_id, conversation_id)
        if conv.event_id is not None:
            await host.pin(
                session, principal.org_id, conv.event_id, int(raw), by=principal.actor, now=now
            )
        await host.send_card(session, principal.org_id, conversation_id, int(raw), now=now)
    return _back(conversation_id, "pinned")


@router.post("/chat/console/broadcast")
async def broadcast(request: Request, principal: Operator, ctx: Ctx) -> Response:
    data = await request.form()
    check_csrf(request, ctx, data)
    principal.require("chat:write")
    text = str(data.get("text", ""))
    now = ctx.clock.now()
    try:
        async with ctx.db.transaction() as session:
            event = await host.current_event(session, principal.org_id, now)
            if event is None:
                raise PopdropError("invalid_request", "no open event to broadcast to")
            result = await host.broadcast(session, principal.org_id, event.id, text, now=now)
    except PopdropError as error:
        if error.reason != "invalid_request":
            raise
        return _console_redirect(error=error.message)
    return _console_redirect(broadcast=result.summary())


def _console_redirect(**query: str) -> RedirectResponse:
    from urllib.parse import urlencode

    return RedirectResponse(f"/chat/console?{urlencode(query)}#broadcast", status_code=303)


@router.post("/chat/console/hosts")
async def add_host(request: Request, principal: Operator, ctx: Ctx) -> Response:
    data = await request.form()
    check_csrf(request, ctx, data)
    principal.require("chat:write")
    deps = conversations.ChatDeps(ctx.signer, ctx.settings.base_url)
    try:
        async with ctx.db.transaction() as session:
            await host.add_host(
                session,
                deps,
                principal.org_id,
                channel=str(data.get("channel", "")).strip().lower(),
                address=str(data.get("address", "")),
                label=str(data.get("label", "")).strip(),
                now=ctx.clock.now(),
            )
    except PopdropError as error:
        if error.reason != "invalid_request":
            raise
        return _console_redirect(error=error.message)
    return RedirectResponse("/chat/console?done=host#hosts", status_code=303)


@router.post("/chat/console/hosts/{host_id}/delete")
async def remove_host(request: Request, host_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    check_csrf(request, ctx, await request.form())
    principal.require("chat:write")
    async with ctx.db.transaction() as session:
        await host.remove_host(session, principal.org_id, host_id)
    return RedirectResponse("/chat/console?done=unhost#hosts", status_code=303)
