"""Host commands from a host's own chat, through chat.service (SQLite, and PostgreSQL when
POPDROP_TEST_DATABASE_URL is set): /soldout reaches the customer's next card, /open,
/stats, /pin, /broadcast with consent and STOP, and no power for a non-host."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import select, update

from popdrop.chat import host, turn
from popdrop.chat.engine import Inbound
from popdrop.chat.messages import Card, Carousel, Text
from popdrop.core.clock import FrozenClock
from popdrop.events.models import TimeSlot
from popdrop.inventory.models import Variant
from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact
from tests.chat.test_service import buttons, deps, say, shop_with_flow, texts
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import Shop

HOST_PHONE = "+33600000001"
MORNING = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)  # 10:00 in Berlin, the shop's time zone


async def setup(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> Shop:
    clock.set(MORNING)
    shop = await shop_with_flow(app_client, ctx, tenant)
    async with ctx.db.transaction() as session:
        await session.execute(
            update(Variant).where(Variant.id == shop.variant_id).values(sku="TOTE-1")
        )
        await host.add_host(
            session,
            deps(ctx),
            tenant.org_id,
            channel="sms",
            address=HOST_PHONE,
            label="Maya",
            now=clock.now(),
        )
    return shop


async def command(ctx: AppContext, tenant: Tenant, text: str, address: str = HOST_PHONE) -> str:
    result = await say(ctx, tenant, text, channel="sms", address=address)
    return texts(result.messages)


def carousel_of(result: turn.TurnResult) -> Carousel:
    [carousel] = [m for m in result.messages if isinstance(m, Carousel)]
    return carousel


async def test_soldout_from_a_host_chat_makes_the_next_card_sold_out(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await setup(app_client, ctx, tenant, clock)
    await say(ctx, tenant, "hi")
    before = carousel_of(await say(ctx, tenant, "DROP"))
    assert before.cards[0].available == 10
    assert [b.label for b in before.cards[0].buttons] == ["Reserve"]
    reserve = before.cards[0].buttons[0].payload or ""

    reply = await command(ctx, tenant, "/soldout tote-1")
    assert reply == "Tote bag is sold out (10 units taken off sale)."

    after = carousel_of(await say(ctx, tenant, "DROP"))
    assert after.cards[0].available == 0 and after.cards[0].buttons == []
    # A Reserve button shown before the command no longer reserves anything.
    late = await say(ctx, tenant, Inbound.button(reserve))
    assert "just sold out" in texts(late.messages)
    # Another customer's first card says so too (SMS: text).
    fresh = await say(ctx, tenant, "DROP", channel="sms", address="+33611112222")
    assert "Tote bag — 15.00 EUR (sold out)" in texts(fresh.messages)
    assert "Reserve" not in texts(fresh.messages)


async def test_a_non_host_sending_commands_gets_the_flow(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await setup(app_client, ctx, tenant, clock)
    other = await make_tenant(ctx)
    async with ctx.db.transaction() as session:  # a host of another organization
        await host.add_host(
            session, deps(ctx), other.org_id, channel="sms", address="+33699999999", now=MORNING
        )
    for address in ("+33655554444", "+33699999999"):
        result = await say(ctx, tenant, "/soldout TOTE-1", channel="sms", address=address)
        assert result.keyword != "host" and result.conversation_id is not None
        assert "sold out" not in texts(result.messages)
    web = await say(ctx, tenant, "/stats")
    assert "RSVPs" not in texts(web.messages)
    card = carousel_of(await say(ctx, tenant, "DROP"))
    assert card.cards[0].available == 10
    # The host's own number on another channel is not a host address either.
    same = await say(ctx, tenant, "/stats", channel="telegram", address=HOST_PHONE)
    assert "RSVPs" not in texts(same.messages)


async def test_open_adds_a_slot_today_or_places_to_it(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await setup(app_client, ctx, tenant, clock)
    assert await command(ctx, tenant, "/open 14:00 10") == "Slot 14:00 opened today with 10 places."
    assert await command(ctx, tenant, "/open 14:00 5") == "Slot 14:00 now has 15 places (15 left)."
    async with ctx.db.reader() as session:
        slot = await session.scalar(
            select(TimeSlot).where(
                TimeSlot.event_id == shop.event_id,
                TimeSlot.starts_at == datetime(2026, 6, 1, 12, 0, tzinfo=UTC),  # 14:00 Berlin
            )
        )
    assert slot is not None and slot.capacity == 15
    assert slot.ends_at - slot.starts_at == timedelta(hours=1)
    assert "already over" in await command(ctx, tenant, "/open 09:00 5")
    assert (await command(ctx, tenant, "/open 25:00 5")).startswith("Usage: /open 14:00 10")
    # Customers see the new slot in the slot picker.
    await say(ctx, tenant, "hi", address="web-open")
    picker = await say(ctx, tenant, "RSVP", address="web-open")
    assert any("(15 left)" in label for label in buttons(picker.messages))


async def test_stats_count_today(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await setup(app_client, ctx, tenant, clock)
    await say(ctx, tenant, "hi")
    drop = carousel_of(await say(ctx, tenant, "DROP"))
    held = await say(ctx, tenant, Inbound.button(drop.cards[0].buttons[0].payload or ""))
    assert "Yours until" in texts(held.messages) or held.status != "error"
    stats = await command(ctx, tenant, "/stats")
    assert "Weekend pop-up, 2026-06-01" in stats
    assert "RSVPs 0 · check-ins 0 · holds 1" in stats
    assert "vouchers issued in chat 1 · chats 1" in stats


async def test_pin_and_unknown_commands(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await setup(app_client, ctx, tenant, clock)
    await say(ctx, tenant, "hi", address="web-before")
    assert await command(ctx, tenant, "/pin Tote bag") == "Pinned Tote bag for Weekend pop-up."
    # A new conversation opens with the pinned card, live availability included…
    first = await say(ctx, tenant, "hi", address="web-new")
    card = first.messages[0]
    assert isinstance(card, Card) and card.title == "Tote bag" and card.available == 10
    assert card.text.startswith("Pinned by the host.") and card.buttons == []
    assert isinstance(first.messages[1], Text)  # …then the flow's greeting
    # …on SMS as text; a conversation already under way is not interrupted.
    sms = await say(ctx, tenant, "hi", channel="sms", address="+33644445555")
    assert texts(sms.messages).startswith("Tote bag — 15.00 EUR (10 left)")
    assert not any(
        isinstance(m, Card) for m in (await say(ctx, tenant, "DROP", address="web-new")).messages
    )
    going = await say(ctx, tenant, "MENU", address="web-before")
    assert not any(isinstance(m, Card) for m in going.messages)
    assert await command(ctx, tenant, "/pin off") == "Unpinned."
    unpinned = await say(ctx, tenant, "hi", address="web-after")
    assert not any(isinstance(m, Card) for m in unpinned.messages)
    assert "not found" in (await command(ctx, tenant, "/pin NOPE")).lower()
    helped = await command(ctx, tenant, "/dance")
    assert "/open 14:00 10" in helped and "/broadcast" in helped and "/soldout" in helped


async def test_broadcast_checks_consent_stop_and_rate(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await setup(app_client, ctx, tenant, clock)
    fan, stopper = "+33611111111", "+33633333333"
    await add_contact(app_client, tenant, phone=fan, consents=("sms",))
    await add_contact(app_client, tenant, phone=stopper, consents=("sms",))
    for address in (fan, "+33622222222", stopper):  # the middle one never consented
        await say(ctx, tenant, "hi", channel="sms", address=address)
    await say(ctx, tenant, "STOP", channel="sms", address=stopper)
    await say(ctx, tenant, "hi", address="web-anon")  # web: no contact, no chat consent

    reply = await command(ctx, tenant, "/broadcast Doors open in 10 minutes!")
    assert reply == "Broadcast queued for 1; skipped 3 (2 no consent, 1 opted out)."
    async with ctx.db.transaction() as session:
        out = await host.take_outbox(session, org_id=tenant.org_id)
    assert [(d.address, d.messages) for d in out] == [
        (fan, [Text(text="Doors open in 10 minutes!")])
    ]
    async with ctx.db.transaction() as session:
        assert await host.take_outbox(session, org_id=tenant.org_id) == []
    again = await command(ctx, tenant, "/broadcast Last call")
    assert again == "Broadcast queued for 0; skipped 4 (2 no consent, 1 opted out, 1 rate limited)."
    clock.set(clock.now() + host.BROADCAST_SPACING + timedelta(minutes=1))
    later = await command(ctx, tenant, "/broadcast Last call")
    assert later.startswith("Broadcast queued for 1;")


def test_parse_is_pure() -> None:
    assert host.parse("hello") is None
    assert host.parse("/open 9h30 4") == host.OpenSlot(datetime(1, 1, 1, 9, 30).time(), 4)
    assert host.parse("/stats@popdrop_bot") == host.Stats()
    assert host.parse("/soldout") == host.Help("Usage: /soldout SKU")
    assert host.parse("/open 14:00 0") == host.Help(
        "Usage: /open 14:00 10 (places from 1 to 100000)"
    )
    assert host.parse("/broadcast  hi there ") == host.Broadcast("hi there")
    assert host.parse("/pin off") == host.Pin(None)
    assert host.parse("/whatever") == host.Help()
