"""A chat booking before the event's `opens_at`: the visitor is told when booking opens
(no crash, no place taken); at `opens_at` the same booking goes through; a second booking
of the same slot is refused with the reason, and takes no place."""

from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo

from popdrop.chat import conversations, flow_store
from popdrop.chat import inbound as chat_inbound
from popdrop.chat.engine import Inbound
from popdrop.chat.flow import shipped_source
from popdrop.chat.messages import Buttons, OutMessage
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.conftest import Tenant
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


async def test_a_chat_booking_before_opens_at_says_when_then_books_once(
    ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    opens_at = clock.now() + timedelta(hours=1)
    event_id, slot_id = await make_slot(ctx, tenant, capacity=3, opens_at=opens_at)
    async with ctx.db.transaction() as session:
        await flow_store.publish_flow(
            session,
            tenant.org_id,
            flow_store.DEFAULT_FLOW_KEY,
            shipped_source("popup_drop"),
            now=clock.now(),
            event_id=event_id,
        )

    async def say(inbound: Inbound) -> list[OutMessage]:
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
