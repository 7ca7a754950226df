"""Scheduled and host messages leave through their channels (the worker tick's
`chat.tasks.deliver_due`): an SMS reminder is texted, a host reply reaches an open web
socket (in this process, or in another one through the Redis relay), and nobody who sent
STOP gets anything."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from popdrop.app import build_context, create_app
from popdrop.chat import console, conversations, host, inbox, live, web
from popdrop.chat.models import WebInbox
from popdrop.chat.tasks import ChatChannels, deliver_due
from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.outbound.transports import OutboundSms, SendResult
from popdrop.web.context import AppContext
from tests.chat.test_service import deps, say, shop_with_flow
from tests.chat.test_web import Socket, app_of
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
    assert "/s/" in " ".join(getattr(m, "text", "") for m in booked.messages)  # SMS: short


async def conversation_with_a_host_reply(
    ctx: AppContext, tenant: Tenant, address: str, text: str
) -> None:
    started = await say(ctx, tenant, "hi", address=address)
    assert started.conversation_id is not None
    async with ctx.db.transaction() as session:
        await host.queue_reply(
            session, tenant.org_id, started.conversation_id, text=text, now=ctx.clock.now()
        )


async def tick(
    ctx: AppContext,
    tenant: Tenant,
    channels: ChatChannels | None = None,
    now: datetime | None = None,
) -> Counter[str]:
    """One worker tick's chat delivery for this organization (the clock's now by default)."""
    return await deliver_due(
        ctx.db,
        deps(ctx),
        channels or ChatChannels(),
        now=now or ctx.clock.now(),
        org_id=tenant.org_id,
    )


async def test_an_sms_reminder_is_texted_once_from_the_chat_number(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    await book_by_sms(ctx, tenant)
    sms = RecordingSms()
    channels = ChatChannels(sms=sms, sms_from=FROM)
    now = clock.now()

    early = await tick(ctx, tenant, channels, now)
    assert sms.sent == [] and not early

    later = now + timedelta(hours=22)  # the flow reminds two hours before the slot
    done = await tick(ctx, tenant, channels, later)
    assert done == {"sms:sent": 1}
    [reminder] = sms.sent
    assert (reminder.to, reminder.from_number) == (PHONE, FROM)
    assert "Reminder: your visit" in reminder.body
    again = await tick(ctx, tenant, channels, later)
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
        await tick(ctx, tenant, channels, at)
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

    address = conversations.normalize_address("web", "visitor-live")
    live.register(tenant.org_id, address, send)
    try:
        done = await tick(ctx, tenant)
    finally:
        live.unregister(tenant.org_id, address, send)
    assert done == {"web:sent": 1}
    [frame] = frames
    assert frame["type"] == "messages" and frame["pushed"] is True
    assert frame["messages"][0]["text"] == text
    assert await kept_rows(ctx, tenant) == 0  # handed over: nothing waits for a later visit


async def kept_rows(ctx: AppContext, tenant: Tenant) -> int:
    """Web messages kept for this organization's visitors (the suite shares the database)."""
    query = select(func.count()).select_from(WebInbox).where(WebInbox.org_id == tenant.org_id)
    async with ctx.db.reader() as session:
        return int(await session.scalar(query) or 0)


async def test_a_visitor_who_left_gets_the_reply_when_they_come_back(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    token, visitor = web.new_visitor(ctx.signer, tenant.org_id)
    text = "Still there? Your size is back."
    await conversation_with_a_host_reply(ctx, tenant, visitor, text)
    done = await tick(ctx, tenant)
    assert done == {"web:kept": 1}
    app = app_of(ctx)
    path, query = f"/ws/chat/{tenant.slug}", f"visitor={token}"
    async with Socket(app, path, query) as ws:
        ready = await ws.receive()
        assert ready["type"] == "ready" and ready["resumed"] is True
        missed = await ws.receive()
        assert missed["type"] == "messages" and missed["pushed"] is True
        assert [m["text"] for m in missed["messages"]] == [text]
    async with Socket(app, path, query) as ws:  # once: the next visit starts clean
        assert (await ws.receive())["type"] == "ready"
        assert await ws.turn({"type": "ping"}) == {"type": "pong"}
    assert await kept_rows(ctx, tenant) == 0


async def test_redis_down_keeps_the_message_and_the_tick_goes_on(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    await conversation_with_a_host_reply(ctx, tenant, "visitor-a", "First reply")
    await conversation_with_a_host_reply(ctx, tenant, "visitor-b", "Second reply")
    unreachable = live.Relay("redis://127.0.0.1:1/0")  # nothing listens on port 1
    try:
        done = await tick(ctx, tenant, ChatChannels(web_relay=unreachable))
    finally:
        await unreachable.close()
    assert done == {"web:kept": 2}  # both kept for their visitors' next connect
    assert await kept_rows(ctx, tenant) == 2


async def test_kept_messages_go_with_an_erased_person(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    _token, visitor = web.new_visitor(ctx.signer, tenant.org_id)
    await conversation_with_a_host_reply(ctx, tenant, visitor, "Ana, your bag is ready.")
    now = ctx.clock.now()
    await tick(ctx, tenant, now=now)
    assert await kept_rows(ctx, tenant) == 1
    async with ctx.db.transaction() as session:
        erased = await console.erase_person(
            session, ctx.signer, tenant.org_id, contact_id=None, email=visitor, now=now
        )
    assert len(erased) == 1 and await kept_rows(ctx, tenant) == 0


async def test_kept_messages_expire_after_a_week(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    await conversation_with_a_host_reply(ctx, tenant, "visitor-never-back", "Hello?")
    await tick(ctx, tenant)
    assert await kept_rows(ctx, tenant) == 1
    later = clock.now() + inbox.KEEP_FOR - timedelta(seconds=1)
    await tick(ctx, tenant, now=later)
    assert await kept_rows(ctx, tenant) == 1
    gone = clock.now() + inbox.KEEP_FOR + timedelta(seconds=1)
    await tick(ctx, tenant, now=gone)
    assert await kept_rows(ctx, tenant) == 0


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
            done = await tick(ctx, tenant, ChatChannels(web_relay=relay))
            assert done == {"web:relayed": 1}
            payload: dict[str, Any] = {}
            while payload.get("org_id") != tenant.org_id:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                assert message is not None, "nothing was published"
                payload = json.loads(message["data"])
        assert payload["address"] == conversations.normalize_address("web", "visitor-elsewhere")
        async with ctx.db.reader() as session:
            body = await session.scalar(
                select(WebInbox.body).where(WebInbox.id == payload["inbox_id"])
            )
        assert body is not None and json.loads(body)[0]["text"] == text  # kept till taken
    finally:
        await relay.close()
        await listener.aclose()


PUBLISH_FROM_ANOTHER_PROCESS = """
import asyncio, sys
from popdrop.chat import live

async def main() -> None:
    relay = live.Relay(sys.argv[1])
    print(await relay.publish(int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
    await relay.close()

asyncio.run(main())
"""


async def test_the_server_hands_relayed_messages_to_its_sockets(
    app_client: httpx.AsyncClient,
    settings: Settings,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
) -> None:
    """`popdrop serve` with POPDROP_REDIS_URL listens to the relay while it runs: a kept
    message announced by another process reaches the socket open here, once."""
    url = relay_url()
    await shop_with_flow(app_client, ctx, tenant)
    await conversation_with_a_host_reply(ctx, tenant, "visitor-on-this-server", "Doors open")
    kept_by_worker = await tick(ctx, tenant)  # a tick elsewhere: no socket there, no relay
    assert kept_by_worker == {"web:kept": 1}
    async with ctx.db.reader() as session:
        inbox_id = await session.scalar(select(WebInbox.id).where(WebInbox.org_id == tenant.org_id))
    server = build_context(settings.model_copy(update={"redis_url": url}), clock=clock)
    app = create_app(ctx=server)
    address = conversations.normalize_address("web", "visitor-on-this-server")
    frames: list[dict[str, Any]] = []

    async def send(frame: dict[str, Any]) -> None:
        frames.append(frame)

    live.register(tenant.org_id, address, send)
    probe = Redis.from_url(url)
    try:
        async with app.router.lifespan_context(app):
            for _ in range(100):  # the listener subscribes in the background
                [(_name, subscribers)] = await probe.pubsub_numsub(live.RELAY_CHANNEL)
                if subscribers:
                    break
                await asyncio.sleep(0.05)
            for _announce in range(2):  # the second announcement finds the row taken
                publisher = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    PUBLISH_FROM_ANOTHER_PROCESS,
                    url,
                    str(tenant.org_id),
                    address,
                    str(inbox_id),
                    stdout=asyncio.subprocess.PIPE,
                )
                out, _err = await asyncio.wait_for(publisher.communicate(), 60)
                assert publisher.returncode == 0 and int(out) >= 1
                for _ in range(100):
                    if frames:
                        break
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
    finally:
        live.unregister(tenant.org_id, address, send)
        await probe.aclose()
    assert [f["messages"][0]["text"] for f in frames] == ["Doors open"]
    assert await kept_rows(ctx, tenant) == 0
