"""Scheduled and host messages leave through their channels (the worker tick's
`chat.tasks.deliver_due`): an SMS reminder is texted, a host reply reaches an open web
socket (in this process, or in another one through the Redis relay), and nobody who sent
STOP gets anything."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from popdrop.chat import host, live
from popdrop.chat import service as chat
from popdrop.chat.tasks import ChatChannels, deliver_due
from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.messaging.transports import OutboundSms, SendResult
from popdrop.web.app import build_context, create_app
from popdrop.web.context import AppContext
from tests.chat.test_service import deps, say, shop_with_flow
from tests.conftest import Tenant, redis_url

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


def relay_url() -> str:
    url = redis_url()
    if url is None:
        pytest.skip("Redis run: set POPDROP_TEST_REDIS_URL (CI does)")
    return url


async def test_a_reply_for_a_socket_open_elsewhere_goes_through_the_redis_relay(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    url = relay_url()
    await shop_with_flow(app_client, ctx, tenant)
    text = "Your size is back, come by the counter."
    await conversation_with_a_host_reply(ctx, tenant, "visitor-elsewhere", text)
    listener = Redis.from_url(url)
    relay = live.Relay(url)
    try:
        async with listener.pubsub() as pubsub:  # stands for the server process holding it
            await pubsub.subscribe(live.RELAY_CHANNEL)
            assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
            done = await deliver_due(
                ctx.db,
                deps(ctx),
                ChatChannels(web_relay=relay),
                now=ctx.clock.now(),
                org_id=tenant.org_id,
            )
            assert done == {"web:relayed": 1}
            payload: dict[str, Any] = {}
            while payload.get("org_id") != tenant.org_id:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                assert message is not None, "nothing was published"
                payload = json.loads(message["data"])
        assert payload["address"] == chat.normalize_address("web", "visitor-elsewhere")
        assert payload["frame"]["messages"][0]["text"] == text
    finally:
        await relay.close()
        await listener.aclose()


PUBLISH_FROM_ANOTHER_PROCESS = """
import asyncio, sys
from popdrop.chat import live

async def main() -> None:
    relay = live.Relay(sys.argv[1])
    frame = {"type": "messages", "messages": [{"kind": "text", "text": sys.argv[4]}]}
    print(await relay.publish(int(sys.argv[2]), sys.argv[3], frame))
    await relay.close()

asyncio.run(main())
"""


async def test_the_server_hands_relayed_pushes_to_its_sockets(
    settings: Settings, clock: FrozenClock
) -> None:
    """`popdrop serve` with POPDROP_REDIS_URL listens to the relay while it runs: a push
    published by another process reaches the socket open here."""
    url = relay_url()
    context = build_context(settings.model_copy(update={"redis_url": url}), clock=clock)
    app = create_app(ctx=context)
    org_id, address = 987_654, "visitor-on-this-server"
    frames: list[dict[str, Any]] = []

    async def send(frame: dict[str, Any]) -> None:
        frames.append(frame)

    live.register(org_id, address, send)
    probe = Redis.from_url(url)
    try:
        async with app.router.lifespan_context(app):
            for _ in range(100):  # the listener subscribes in the background
                [(_name, subscribers)] = await probe.pubsub_numsub(live.RELAY_CHANNEL)
                if subscribers:
                    break
                await asyncio.sleep(0.05)
            publisher = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                PUBLISH_FROM_ANOTHER_PROCESS,
                url,
                str(org_id),
                address,
                "Doors open now",
                stdout=asyncio.subprocess.PIPE,
            )
            out, _err = await asyncio.wait_for(publisher.communicate(), 60)
            assert publisher.returncode == 0 and int(out) >= 1
            for _ in range(100):
                if frames:
                    break
                await asyncio.sleep(0.05)
    finally:
        live.unregister(org_id, address, send)
        await probe.aclose()
    assert frames == [
        {"type": "messages", "messages": [{"kind": "text", "text": "Doors open now"}]}
    ]
