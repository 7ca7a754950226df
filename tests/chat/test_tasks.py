"""Scheduled and host messages leave through their channels (the worker tick's
`chat.tasks.deliver_due`): an SMS reminder is texted, a host reply reaches an open web
socket, and nobody who sent STOP gets anything."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx

from popdrop.chat import host, live
from popdrop.chat import service as chat
from popdrop.chat.tasks import ChatChannels, deliver_due
from popdrop.core.clock import FrozenClock
from popdrop.messaging.transports import OutboundSms, SendResult
from popdrop.web.context import AppContext
from tests.chat.test_service import deps, say, shop_with_flow
from tests.conftest import Tenant

PHONE = "+33612345670"
FROM = "+15005550006"


class RecordingSms:
    """An SmsTransport that keeps what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[OutboundSms] = []

    async def send(self, message: OutboundSms) -> SendResult:
        self.sent.append(message)
        return SendResult(True, provider_id=f"SM{len(self.sent)}")

    async def close(self) -> None:
        return None


async def book_by_sms(ctx: AppContext, tenant: Tenant) -> None:
    await say(ctx, tenant, "Hello", channel="sms", address=PHONE)
    await say(ctx, tenant, "2", channel="sms", address=PHONE)  # RSVP a time slot
    await say(ctx, tenant, "1", channel="sms", address=PHONE)  # the first slot
    booked = await say(ctx, tenant, "1", channel="sms", address=PHONE)  # Yes, book it
    assert "/t/" in " ".join(getattr(m, "text", "") for m in booked.messages)


async def conversation_with_a_host_reply(
    ctx: AppContext, tenant: Tenant, address: str, text: str
) -> None:
    started = await say(ctx, tenant, "hi", address=address)
    assert started.conversation_id is not None
    async with ctx.db.transaction() as session:
        await host.queue_reply(
            session, tenant.org_id, started.conversation_id, text=text, now=ctx.clock.now()
        )


async def test_an_sms_reminder_is_texted_once_from_the_chat_number(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    await book_by_sms(ctx, tenant)
    sms = RecordingSms()
    channels = ChatChannels(sms=sms, sms_from=FROM)
    now = clock.now()

    early = await deliver_due(ctx.db, deps(ctx), channels, now=now, org_id=tenant.org_id)
    assert sms.sent == [] and not early

    later = now + timedelta(hours=22)  # the flow reminds two hours before the slot
    done = await deliver_due(ctx.db, deps(ctx), channels, now=later, org_id=tenant.org_id)
    assert done == {"sms:sent": 1}
    [reminder] = sms.sent
    assert (reminder.to, reminder.from_number) == (PHONE, FROM)
    assert "Reminder: your visit" in reminder.body
    again = await deliver_due(ctx.db, deps(ctx), channels, now=later, org_id=tenant.org_id)
    assert not again and len(sms.sent) == 1  # taken once


async def test_stop_before_the_reminder_means_no_text(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    await book_by_sms(ctx, tenant)
    await say(ctx, tenant, "STOP", channel="sms", address=PHONE)
    sms = RecordingSms()
    channels = ChatChannels(sms=sms, sms_from=FROM)
    for hours in (22, 48):
        at = clock.now() + timedelta(hours=hours)
        await deliver_due(ctx.db, deps(ctx), channels, now=at, org_id=tenant.org_id)
    assert sms.sent == []


async def test_a_host_reply_reaches_the_open_web_socket(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    text = "Hi, it's Mia from the shop: we have your size."
    await conversation_with_a_host_reply(ctx, tenant, "visitor-live", text)
    frames: list[dict[str, Any]] = []

    async def send(frame: dict[str, Any]) -> None:
        frames.append(frame)

    address = chat.normalize_address("web", "visitor-live")
    live.register(tenant.org_id, address, send)
    try:
        done = await deliver_due(
            ctx.db, deps(ctx), ChatChannels(), now=ctx.clock.now(), org_id=tenant.org_id
        )
    finally:
        live.unregister(tenant.org_id, address, send)
    assert done == {"web:sent": 1}
    [frame] = frames
    assert frame["type"] == "messages"
    assert frame["messages"][0]["text"] == text


async def test_a_visitor_who_left_is_counted_offline(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    await conversation_with_a_host_reply(ctx, tenant, "visitor-gone", "Still there?")
    done = await deliver_due(
        ctx.db, deps(ctx), ChatChannels(), now=ctx.clock.now(), org_id=tenant.org_id
    )
    assert done == {"web:offline": 1}
