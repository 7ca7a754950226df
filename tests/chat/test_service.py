"""The chat service on a real database: the default flow end to end, keywords, refusals,
restarts and expiry (SQLite, and PostgreSQL when POPDROP_TEST_DATABASE_URL is set)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta

import httpx
import pytest
from sqlalchemy import func, select, update

from popdrop.app import build_context
from popdrop.audience.models import Suppression
from popdrop.chat import console, conversations, flow_store, stats, turn
from popdrop.chat import inbound as chat_inbound
from popdrop.chat.engine import Inbound
from popdrop.chat.flow import FlowError, shipped_source
from popdrop.chat.messages import Buttons, Carousel, Countdown, OutMessage, QrTicket, Text
from popdrop.chat.models import ChatEvent, ChatMessage, Conversation, FlowVersion
from popdrop.checkin.models import Ticket
from popdrop.core import audit
from popdrop.core.clock import FrozenClock
from popdrop.core.errors import PopdropError
from popdrop.events.models import TimeSlot
from popdrop.inventory.models import Hold
from popdrop.rsvp.models import Rsvp
from popdrop.vouchers.models import Voucher, VoucherBatch
from popdrop.web.context import AppContext
from tests.checkin.helpers import scan
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import Shop, make_shop


def deps(ctx: AppContext) -> conversations.ChatDeps:
    return conversations.ChatDeps(ctx.signer, ctx.settings.base_url)


async def publish(ctx: AppContext, tenant: Tenant, shop: Shop, source: str | None = None) -> int:
    async with ctx.db.transaction() as session:
        row = await flow_store.publish_flow(
            session,
            tenant.org_id,
            flow_store.DEFAULT_FLOW_KEY,
            source or shipped_source("popup_drop"),
            now=ctx.clock.now(),
            event_id=shop.event_id,
        )
        return row.version


async def say(
    ctx: AppContext,
    tenant: Tenant,
    what: str | Inbound,
    *,
    channel: str = "web",
    address: str = "widget-session-1",
) -> turn.TurnResult:
    inbound = Inbound.of_text(what) if isinstance(what, str) else what
    return await chat_inbound.handle(
        ctx.db,
        deps(ctx),
        org_id=tenant.org_id,
        channel=channel,
        address=address,
        inbound=inbound,
        now=ctx.clock.now(),
    )


def texts(messages: list[OutMessage]) -> str:
    return "\n".join(getattr(m, "text", "") for m in messages)


def buttons(messages: list[OutMessage]) -> dict[str, str]:
    found: dict[str, str] = {}
    for message in messages:
        cards = message.cards if isinstance(message, Carousel) else [message]
        for item in cards:
            for button in getattr(item, "buttons", []):
                if button.payload:
                    found.setdefault(button.label, button.payload)
    return found


async def shop_with_flow(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, units: int = 10
) -> Shop:
    shop = await make_shop(app_client, tenant, ctx.clock.now(), units=units)
    await publish(ctx, tenant, shop)
    return shop


async def count(ctx: AppContext, query: object) -> int:
    async with ctx.db.reader() as session:
        return int(await session.scalar(query) or 0)  # type: ignore[call-overload]


async def test_default_flow_end_to_end_rsvp_voucher_ticket_reminder_nps(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await shop_with_flow(app_client, ctx, tenant)
    hello = await say(ctx, tenant, "hi")
    assert "Weekend pop-up pops up at Old Tram Depot" in texts(hello.messages)
    assert any(isinstance(m, Countdown) for m in hello.messages)
    menu = buttons(hello.messages)
    assert hello.status == "waiting_input"

    drop = await say(ctx, tenant, Inbound.button(menu["See the drop"]))
    [carousel] = [m for m in drop.messages if isinstance(m, Carousel)]
    assert carousel.cards[0].title == "Tote bag" and carousel.cards[0].available == 10

    slots = await say(ctx, tenant, Inbound.button(buttons(drop.messages)["RSVP a time slot"]))
    [pick] = [m for m in slots.messages if isinstance(m, Buttons)]
    assert pick.buttons[0].label.endswith("(50 left)")
    ask = await say(ctx, tenant, Inbound.button(pick.buttons[0].payload or ""))
    assert texts(ask.messages) == "What email should we send your ticket to?"
    wrong = await say(ctx, tenant, "ana at example")
    assert wrong.messages[0] == Text(text="That does not look like an email address. Try again?")
    confirm = await say(ctx, tenant, "Ana@Example.com")
    booked = await say(ctx, tenant, Inbound.button(buttons(confirm.messages)["Yes, book it"]))

    assert booked.status == "waiting_until"
    said = texts(booked.messages)
    assert "You are in for" in said and "Your code for 10% off:" in said
    code = said.split("10% off: ")[1].split("\n")[0].strip()
    [ticket] = [m for m in booked.messages if isinstance(m, QrTicket)]
    assert ticket.url.endswith(f"/t/{ticket.secret}")

    # Real rows: a confirmed RSVP, its valid ticket, and a voucher the vault accepts.
    async with ctx.db.reader() as session:
        rsvp = await session.scalar(select(Rsvp).where(Rsvp.event_id == shop.event_id))
        assert rsvp is not None and rsvp.status == "confirmed" and rsvp.email == "ana@example.com"
        row = await session.scalar(
            select(Ticket).where(Ticket.subject_kind == "rsvp", Ticket.subject_id == rsvp.id)
        )
        assert row is not None and row.status == "valid"
        batch = await session.scalar(
            select(VoucherBatch).where(
                VoucherBatch.org_id == tenant.org_id, VoucherBatch.tag == "chat-drop"
            )
        )
        assert batch is not None
        transcript = list(
            await session.scalars(
                select(ChatMessage.body).where(
                    ChatMessage.conversation_id == booked.conversation_id
                )
            )
        )
    checked = await app_client.post(
        "/api/v1/vouchers/validate", json={"code": code}, headers=tenant.headers
    )
    assert checked.status_code == 200, checked.text
    stored = "\n".join(transcript)
    assert code not in stored and ticket.secret not in stored and turn.REDACTED in stored

    # The reminder two hours before the slot, then the day-after survey.
    assert await chat_wake(ctx, tenant, clock.now() + timedelta(hours=21)) == []
    reminder = await chat_wake(ctx, tenant, clock.now() + timedelta(hours=22))
    assert len(reminder) == 1 and "Reminder: your visit" in texts(reminder[0].messages)
    assert reminder[0].address == "widget-session-1"
    clock.set(clock.now() + timedelta(hours=24))
    door = await scan(app_client, tenant, ticket.secret)
    assert door.status_code == 200 and door.json()["result"] == "ok", door.text
    nps = await chat_wake(ctx, tenant, clock.now() + timedelta(days=2))
    assert "How likely are you to recommend" in texts(nps[0].messages)
    clock.set(clock.now() + timedelta(days=2))
    thanks = await say(ctx, tenant, "9")
    assert thanks.status == "done" and "Thank you" in texts(thanks.messages)

    async with ctx.db.reader() as session:
        funnel = await stats.funnel(session, tenant.org_id, event_id=shop.event_id)
        drop_off = await stats.node_dropoff(session, tenant.org_id, flow_store.DEFAULT_FLOW_KEY, 1)
        survey = await session.scalar(
            select(ChatEvent.value).where(
                ChatEvent.org_id == tenant.org_id, ChatEvent.kind == "survey"
            )
        )
    assert funnel["chat_started"] == 1 and funnel["rsvp"] == 1
    assert funnel["voucher_issued"] == 1 and funnel["ticket_sent"] == 1
    assert funnel["card_viewed"] == 1
    assert survey == 9
    entered = {s.node: s.entered for s in drop_off}
    assert entered["greet"] == 1 and entered["nps_thanks"] == 1 and "reserve" not in entered


async def chat_wake(ctx: AppContext, tenant: Tenant, at: datetime) -> list[turn.Delivery]:
    async with ctx.db.transaction() as session:
        return await turn.wake_due(session, deps(ctx), now=at, org_id=tenant.org_id)


async def test_sms_flow_numbers_options_and_books_by_phone(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    shop = await shop_with_flow(app_client, ctx, tenant)
    phone = "+33612345678"
    hello = await say(ctx, tenant, "Hello", channel="sms", address="+33 6 12 34 56 78")
    [sms] = hello.messages
    assert isinstance(sms, Text)
    assert "1) See the drop\n2) RSVP a time slot" in sms.text
    slots = await say(ctx, tenant, "2", channel="sms", address=phone)
    assert "1) " in texts(slots.messages) and "(50 left)" in texts(slots.messages)
    confirm = await say(ctx, tenant, "1", channel="sms", address=phone)
    assert "1) Yes, book it" in texts(confirm.messages)  # the phone is known: no email asked
    booked = await say(ctx, tenant, "1", channel="sms", address=phone)
    # SMS sends the ticket as a short link (tests/chat/test_short_links.py follows it).
    assert "/s/" in texts(booked.messages) and "/t/" not in texts(booked.messages)
    async with ctx.db.reader() as session:
        rsvp = await session.scalar(select(Rsvp).where(Rsvp.event_id == shop.event_id))
    assert rsvp is not None and rsvp.phone == phone and rsvp.status == "confirmed"


async def test_stop_before_any_flow_and_start_again(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    phone = "+33687654321"
    stop = await say(ctx, tenant, "Stop", channel="sms", address=phone)
    assert stop.keyword == "stop" and stop.conversation_id is None
    assert "unsubscribed" in texts(stop.messages)
    assert (
        await count(
            ctx,
            select(func.count())
            .select_from(Suppression)
            .where(Suppression.org_id == tenant.org_id, Suppression.channel == "sms"),
        )
        == 1
    )
    quiet = await say(ctx, tenant, "hi", channel="sms", address=phone)
    assert quiet.messages == []  # no flow runs for a number that opted out
    start = await say(ctx, tenant, "START", channel="sms", address=phone)
    assert "subscribed again" in texts(start.messages)
    back = await say(ctx, tenant, "hi", channel="sms", address=phone)
    assert "1) See the drop" in texts(back.messages)
    help_ = await say(ctx, tenant, "help", channel="sms", address=phone)
    assert help_.keyword == "help" and "STOP" in texts(help_.messages)


async def test_stop_mid_flow_silences_reminders(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    menu = await say(ctx, tenant, "hi", address="web-stop")
    slots = await say(
        ctx, tenant, Inbound.button(buttons(menu.messages)["RSVP a time slot"]), address="web-stop"
    )
    [pick] = [m for m in slots.messages if isinstance(m, Buttons)]
    await say(ctx, tenant, Inbound.button(pick.buttons[0].payload or ""), address="web-stop")
    confirm = await say(ctx, tenant, "ana@example.com", address="web-stop")
    booked = await say(
        ctx, tenant, Inbound.button(buttons(confirm.messages)["Yes, book it"]), address="web-stop"
    )
    assert booked.status == "waiting_until"
    stop = await say(ctx, tenant, "STOP", address="web-stop")
    assert "unsubscribed" in texts(stop.messages)
    assert (await say(ctx, tenant, "MENU", address="web-stop")).messages == []
    assert await chat_wake(ctx, tenant, clock.now() + timedelta(days=5)) == []


async def test_sold_out_takes_the_failure_branch_without_partial_writes(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    shop = await shop_with_flow(app_client, ctx, tenant, units=1)

    async def cards(address: str) -> dict[str, str]:
        menu = await say(ctx, tenant, "hi", address=address)
        choice = Inbound.button(buttons(menu.messages)["See the drop"])
        return buttons((await say(ctx, tenant, choice, address=address)).messages)

    first, second = await cards("first"), await cards("second")  # both see one left
    mine = await say(ctx, tenant, Inbound.button(first["Reserve"]), address="first")
    assert "Tote bag is yours until" in texts(mine.messages)
    # The reservation ends in the checkout link (the order's pickup QR comes from there).
    pay_links = [
        button.url
        for message in mine.messages
        for button in getattr(message, "buttons", [])
        if button.label == "Pay now or at pickup"
    ]
    assert len(pay_links) == 1 and "/checkout/" in (pay_links[0] or "")
    assert any(isinstance(m, QrTicket) for m in mine.messages)
    late = await say(ctx, tenant, Inbound.button(second["Reserve"]), address="second")
    said = texts(late.messages)
    assert "Sorry, Tote bag just sold out" in said
    assert late.node == "cards"
    [carousel] = [m for m in late.messages if isinstance(m, Carousel)]
    assert carousel.cards[0].available == 0 and carousel.cards[0].buttons == []
    assert (
        await count(
            ctx, select(func.count()).select_from(Hold).where(Hold.event_id == shop.event_id)
        )
        == 1
    )
    # The second customer got no voucher and no ticket: nothing half-written.
    vouchers_issued = await count(
        ctx,
        select(func.count())
        .select_from(Voucher)
        .join(VoucherBatch, VoucherBatch.id == Voucher.batch_id)
        .where(VoucherBatch.org_id == tenant.org_id),
    )
    assert vouchers_issued == 2  # the batch's own first code, and the first customer's


async def test_slot_full_goes_back_to_the_slot_picker(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    shop = await shop_with_flow(app_client, ctx, tenant)
    menu = await say(ctx, tenant, "hi")
    slots = await say(ctx, tenant, Inbound.button(buttons(menu.messages)["RSVP a time slot"]))
    [pick] = [m for m in slots.messages if isinstance(m, Buttons)]
    await say(ctx, tenant, Inbound.button(pick.buttons[0].payload or ""))
    confirm = await say(ctx, tenant, "ana@example.com")
    async with ctx.db.transaction() as session:  # someone else takes the last places
        await session.execute(
            update(TimeSlot).where(TimeSlot.id == shop.slot_id).values(taken=TimeSlot.capacity)
        )
    full = await say(ctx, tenant, Inbound.button(buttons(confirm.messages)["Yes, book it"]))
    assert "that slot just filled up" in texts(full.messages)
    assert "All time slots are full" in texts(full.messages)
    assert (
        await count(
            ctx, select(func.count()).select_from(Rsvp).where(Rsvp.event_id == shop.event_id)
        )
        == 0
    )


async def test_state_survives_a_restart(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    menu = await say(ctx, tenant, "hi")
    slots = await say(ctx, tenant, Inbound.button(buttons(menu.messages)["RSVP a time slot"]))
    [pick] = [m for m in slots.messages if isinstance(m, Buttons)]
    asked = await say(ctx, tenant, Inbound.button(pick.buttons[0].payload or ""))
    assert asked.node == "ask_email"

    # A new process: its own engine, pool and (empty) flow cache.
    flow_store._FLOWS.clear()
    fresh = build_context(ctx.settings, clock=ctx.clock)
    try:
        confirm = await say(fresh, tenant, "ana@example.com")
        assert confirm.node == "confirm" and confirm.session_no == asked.session_no
        assert "Book " in texts(confirm.messages)
    finally:
        await fresh.guard.counter.close()
        await fresh.db.dispose()


async def test_sessions_expire_and_start_fresh_on_the_latest_version(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await shop_with_flow(app_client, ctx, tenant)
    first = await say(ctx, tenant, "hi")
    assert first.node == "menu"
    # A new version while the conversation runs: it keeps its version.
    v2 = shipped_source("popup_drop").replace(
        '"Hi! {event.title} pops up at {event.venue}."', '"Welcome back to {event.title}!"'
    )
    assert await publish(ctx, tenant, shop, v2) == 2
    still = await say(ctx, tenant, "what?")
    assert still.session_no == 1 and "Sorry, I did not get that." in texts(still.messages)

    clock.advance(timedelta(days=3, seconds=1))  # the flow's session_ttl
    async with ctx.db.transaction() as session:
        assert await turn.expire_sessions(session, now=clock.now(), org_id=tenant.org_id) == 1
    again = await say(ctx, tenant, "hi")
    assert again.session_no == 2 and again.node == "menu"
    assert "Welcome back to Weekend pop-up!" in texts(again.messages)
    async with ctx.db.reader() as session:
        conv = await console.get_conversation(session, tenant.org_id, again.conversation_id or 0)
        expired = await session.scalar(
            select(func.count())
            .select_from(ChatEvent)
            .where(ChatEvent.conversation_id == conv.id, ChatEvent.kind == "expired")
        )
    assert conv.flow_version == 2 and expired == 1


async def test_publish_refuses_an_invalid_flow(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    with pytest.raises(FlowError) as caught:
        await publish(ctx, tenant, shop, "start: a\nnodes:\n  a: {type: jump, to: b}\n")
    assert caught.value.message == "line 3: nodes.a.to: unknown node 'b'"
    assert (
        await count(
            ctx,
            select(func.count())
            .select_from(FlowVersion)
            .where(FlowVersion.org_id == tenant.org_id),
        )
        == 0
    )
    # Nothing of ours is published: the org's open event gets the shipped flow.
    hello = await say(ctx, tenant, "hi")
    assert "Weekend pop-up pops up at Old Tram Depot" in texts(hello.messages)


async def test_handoff_take_over_and_hand_back(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    await say(ctx, tenant, "hi")
    await say(ctx, tenant, "banana")
    await say(ctx, tenant, "banana")
    host = await say(ctx, tenant, "banana")
    assert host.status == "handed_off" and "get a host" in texts(host.messages)
    assert (await say(ctx, tenant, "hello?")).messages == []
    conv_id = host.conversation_id or 0
    async with ctx.db.transaction() as session:
        conv = await console.take_over(
            session, tenant.org_id, conv_id, host_ref="user:host", now=ctx.clock.now()
        )
        assert conv.host_ref == "user:host"
        reply = await console.host_message(
            session, tenant.org_id, conv_id, text="Hi, Sam here!", now=ctx.clock.now()
        )
        assert reply.text == "Hi, Sam here!"
        await console.hand_back(session, tenant.org_id, conv_id, now=ctx.clock.now())
    resumed = await say(ctx, tenant, "anything")
    assert resumed.node == "menu" and "What would you like to do?" in texts(resumed.messages)
    async with ctx.db.reader() as session:
        lines = await console.transcript(session, tenant.org_id, conv_id)
    assert [m.direction for m in lines].count("host") == 1
    assert json.loads(lines[0].body)["text"] == "hi"


async def test_conversations_belong_to_their_organization(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    mine = await say(ctx, tenant, "hi", address="shared-address")
    other = await make_tenant(ctx)
    with pytest.raises(PopdropError) as missing:
        await say(ctx, other, "hi", address="shared-address")
    assert missing.value.reason == "not_found"  # the other org has no flow, and no row of ours
    async with ctx.db.reader() as session:
        with pytest.raises(PopdropError):
            await console.get_conversation(session, other.org_id, mine.conversation_id or 0)
        assert await console.list_conversations(session, other.org_id) == []
        rows = await session.scalar(
            select(func.count())
            .select_from(Conversation)
            .where(Conversation.org_id == tenant.org_id)
        )
    assert rows == 1


async def test_erase_person_scrubs_their_chats(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    phone = "+33611223344"
    await say(ctx, tenant, "hi", channel="sms", address=phone)
    web = await say(ctx, tenant, "hi", address="web-erase")
    slots = await say(
        ctx, tenant, Inbound.button(buttons(web.messages)["RSVP a time slot"]), address="web-erase"
    )
    [pick] = [m for m in slots.messages if isinstance(m, Buttons)]
    await say(ctx, tenant, Inbound.button(pick.buttons[0].payload or ""), address="web-erase")
    await say(ctx, tenant, "erase.me@example.com", address="web-erase")
    async with ctx.db.transaction() as session:
        by_phone = await console.erase_person(
            session, ctx.signer, tenant.org_id, contact_id=None, phone=phone, now=ctx.clock.now()
        )
    assert len(by_phone) == 1
    async with ctx.db.reader() as session:
        rows = (
            await session.execute(
                select(Conversation.channel, Conversation.address, Conversation.state).where(
                    Conversation.org_id == tenant.org_id
                )
            )
        ).all()
        sms_messages = await session.scalar(
            select(func.count())
            .select_from(ChatMessage)
            .join(Conversation, Conversation.id == ChatMessage.conversation_id)
            .where(Conversation.org_id == tenant.org_id, Conversation.channel == "sms")
        )
    scrubbed = {channel: (address, state) for channel, address, state in rows}
    assert scrubbed["sms"][0] is None and phone not in scrubbed["sms"][1]
    assert sms_messages == 0
    assert "erase.me@example.com" in scrubbed["web"][1]  # someone else's chat is untouched
    async with ctx.db.transaction() as session:
        by_email = await console.erase_person(
            session,
            ctx.signer,
            tenant.org_id,
            contact_id=None,
            email="erase.me@example.com",
            now=ctx.clock.now(),
        )
    assert len(by_email) == 1
    async with ctx.db.reader() as session:
        left = await session.scalar(
            select(func.count())
            .select_from(ChatMessage)
            .where(ChatMessage.org_id == tenant.org_id, ChatMessage.body.contains("erase.me"))
        )
        state = await session.scalar(
            select(Conversation.state).where(
                Conversation.org_id == tenant.org_id, Conversation.channel == "web"
            )
        )
    assert left == 0 and state is not None and "erase.me" not in state


async def test_concurrent_first_messages_share_one_conversation(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    results = await asyncio.gather(*(say(ctx, tenant, "hi", address="burst") for _ in range(8)))
    assert len({r.conversation_id for r in results}) == 1
    assert sum("pops up at" in texts(r.messages) for r in results) == 1  # one greeting
    assert (
        await count(
            ctx,
            select(func.count())
            .select_from(Conversation)
            .where(Conversation.org_id == tenant.org_id),
        )
        == 1
    )
    assert (
        await count(
            ctx,
            select(func.count())
            .select_from(ChatMessage)
            .where(ChatMessage.org_id == tenant.org_id, ChatMessage.direction == "in"),
        )
        == 8
    )


async def test_a_deep_link_starts_a_session_at_its_entry(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    first = await say(ctx, tenant, Inbound.start("rsvp"), address="qr")
    assert first.node == "pick_slot" and first.session_no == 1
    assert "Pick a time to visit" in texts(first.messages)
    again = await say(ctx, tenant, Inbound.start("drop"), address="qr")
    assert again.node == "cards" and again.session_no == 2
    async with ctx.db.reader() as session:
        steps = await stats.funnel(session, tenant.org_id)
    assert steps["chat_started"] == 2


async def test_a_burst_of_bookings_never_overbooks_a_slot(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    # Web turns write the slot's places at commit time (a short lock on a hot row); a
    # turn that finds them gone there runs again and takes the flow's "full" branch.
    shop = await shop_with_flow(app_client, ctx, tenant)
    async with ctx.db.transaction() as session:
        await session.execute(
            update(TimeSlot).where(TimeSlot.id == shop.slot_id).values(capacity=3, taken=0)
        )
    confirms: list[tuple[str, str]] = []
    for n in range(10):
        address = f"burst-{n}"
        menu = await say(ctx, tenant, "hi", address=address)
        rsvp = buttons(menu.messages)["RSVP a time slot"]
        slots = await say(ctx, tenant, Inbound.button(rsvp), address=address)
        [pick] = [m for m in slots.messages if isinstance(m, Buttons)]
        await say(ctx, tenant, Inbound.button(pick.buttons[0].payload or ""), address=address)
        confirm = await say(ctx, tenant, f"guest{n}@example.com", address=address)
        confirms.append((address, buttons(confirm.messages)["Yes, book it"]))

    results = await asyncio.gather(
        *(say(ctx, tenant, Inbound.button(p), address=a) for a, p in confirms)
    )

    booked = [r for r in results if any(isinstance(m, QrTicket) for m in r.messages)]
    turned_away = [r for r in results if "that slot just filled up" in texts(r.messages)]
    assert (len(booked), len(turned_away)) == (3, 7)
    async with ctx.db.reader() as session:
        slot = await session.get(TimeSlot, shop.slot_id)
        assert slot is not None and slot.taken == 3
        confirmed = await session.scalar(
            select(func.count()).select_from(Rsvp).where(Rsvp.slot_id == shop.slot_id)
        )
        assert confirmed == 3
        tickets = select(func.count()).select_from(Ticket).where(Ticket.org_id == tenant.org_id)
        assert await session.scalar(tickets) == 3
        # The audit entries written at commit time still chain.
        assert (await audit.verify(session, tenant.org_id)).ok
