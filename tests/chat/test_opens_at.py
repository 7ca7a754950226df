"""A chat booking or reservation before the event's `opens_at`: the visitor is told when
it opens (no crash, nothing taken); at `opens_at` the same one goes through; a second
booking of the same slot is refused with the reason, and takes no place."""

from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo

import httpx

from popdrop.chat import conversations, flow_store
from popdrop.chat import inbound as chat_inbound
from popdrop.chat.engine import Inbound
from popdrop.chat.flow import shipped_source
from popdrop.chat.messages import Buttons, Carousel, OutMessage
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.conftest import Tenant
from tests.events.helpers import make_shop
from tests.rsvp.helpers import make_slot, slot_taken

VISITOR = "widget-early-bird"


def _text(messages: list[OutMessage]) -> str:
    return " ".join(str(getattr(message, "text", "")) for message in messages)


def _buttons(messages: list[OutMessage]) -> dict[str, str]:
    return {
        button.label: button.payload
        for message in messages
        if isinstance(message, Buttons)
        for button in message.buttons
        if button.payload
    }


async def _publish(ctx: AppContext, tenant: Tenant, clock: FrozenClock, event_id: int) -> None:
    async with ctx.db.transaction() as session:
        await flow_store.publish_flow(
            session,
            tenant.org_id,
            flow_store.DEFAULT_FLOW_KEY,
            shipped_source("popup_drop"),
            now=clock.now(),
            event_id=event_id,
        )


async def _say(
    ctx: AppContext, tenant: Tenant, clock: FrozenClock, inbound: Inbound
) -> list[OutMessage]:
    result = await chat_inbound.handle(
        ctx.db,
        conversations.ChatDeps(ctx.signer),
        org_id=tenant.org_id,
        channel="web",
        address=VISITOR,
        inbound=inbound,
        now=clock.now(),
    )
    return result.messages


async def test_a_chat_booking_before_opens_at_says_when_then_books_once(
    ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    opens_at = clock.now() + timedelta(hours=1)
    event_id, slot_id = await make_slot(ctx, tenant, capacity=3, opens_at=opens_at)
    await _publish(ctx, tenant, clock, event_id)

    async def say(inbound: Inbound) -> list[OutMessage]:
        return await _say(ctx, tenant, clock, inbound)

    async def book() -> list[OutMessage]:
        menu = await say(Inbound.of_text("menu"))
        slots = await say(Inbound.button(_buttons(menu)["RSVP a time slot"]))
        confirm = await say(Inbound.button(next(iter(_buttons(slots).values()))))
        if "Yes, book it" not in _buttons(confirm):  # the first time: the email first
            confirm = await say(Inbound.of_text("early@example.com"))
        return await say(Inbound.button(_buttons(confirm)["Yes, book it"]))

    await say(Inbound.of_text("hi"))
    refused = _text(await book())
    when = opens_at.astimezone(ZoneInfo("Europe/Paris")).strftime("%H:%M")
    assert "We could not book that: this event takes RSVPs from" in refused
    assert when in refused
    assert await slot_taken(ctx, slot_id) == 0

    clock.set(opens_at)
    booked = _text(await book())
    assert "You are in for" in booked, booked
    assert await slot_taken(ctx, slot_id) == 1

    # The same visitor books the same slot again: told so, and no second place is taken.
    again = _text(await book())
    assert "We could not book that: you already have an RSVP for this time slot" in again
    assert await slot_taken(ctx, slot_id) == 1


async def test_a_chat_reservation_before_opens_at_says_when_and_at_opens_at_it_holds(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    opens_at = clock.now() + timedelta(hours=2)
    moved = await app_client.patch(
        f"/api/v1/events/{shop.event_id}",
        json={"opens_at": opens_at.isoformat()},
        headers=tenant.headers,
    )
    assert moved.status_code == 200, moved.text
    await _publish(ctx, tenant, clock, shop.event_id)

    async def reserve() -> str:
        menu = await _say(ctx, tenant, clock, Inbound.of_text("menu"))
        drop = await _say(ctx, tenant, clock, Inbound.button(_buttons(menu)["See the drop"]))
        [card] = [card for m in drop if isinstance(m, Carousel) for card in m.cards]
        [button] = [b for b in card.buttons if b.label == "Reserve" and b.payload]
        assert button.payload is not None
        return _text(await _say(ctx, tenant, clock, Inbound.button(button.payload)))

    await _say(ctx, tenant, clock, Inbound.of_text("hi"))
    refused = await reserve()
    when = opens_at.astimezone(ZoneInfo("Europe/Berlin")).strftime("%H:%M")  # make_shop's
    assert "We could not reserve that: this event takes reservations from" in refused
    assert when in refused

    clock.set(opens_at)
    held = await reserve()
    assert "Tote bag is yours until" in held, held
