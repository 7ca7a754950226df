"""Chat over SMS sends short links: the checkout and ticket links are `/s/...` URLs that
redirect to the working pages, store no secret, and an order placed through one is
attributed to the conversation. Web chat keeps the full links."""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

import httpx
from sqlalchemy import func, select

from popdrop.attribution.models import SaleTouch, ShortLink
from popdrop.chat.models import Conversation
from popdrop.commerce.models import Order
from popdrop.web.context import AppContext
from tests.attribution.helpers import flushed, visit
from tests.chat.test_sms_chat import hook, publish, replies  # noqa: F401 (fixture)
from tests.chat.test_web import Socket, app_of, labels, shop_with_flow
from tests.commerce.test_checkout_pages import send
from tests.conftest import Tenant
from tests.events.helpers import make_shop
from tests.events.test_pages import HTML

SHORT = re.compile(r"https?://[^\s]+/s/[A-Za-z0-9_-]{11}")


async def test_sms_chat_sends_short_links_that_lead_to_working_pages_and_attribute(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    hook: str,  # noqa: F811
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    await publish(ctx, tenant, shop)
    phone = "+33644444444"
    await replies(app_client, hook, phone, "Hello")
    await replies(app_client, hook, phone, "1")
    reserved = "\n".join(await replies(app_client, hook, phone, "1"))
    urls = SHORT.findall(reserved)
    assert len(urls) == 2, reserved  # the checkout link and the visit ticket, both short
    assert "/checkout/" not in reserved and "/t/" not in reserved
    async with ctx.db.reader() as session:
        conversation = await session.scalar(
            select(Conversation).where(
                Conversation.org_id == tenant.org_id, Conversation.channel == "sms"
            )
        )
        assert conversation is not None
        stored = list(
            await session.scalars(select(ShortLink).where(ShortLink.org_id == tenant.org_id))
        )
    assert sorted(link.target_kind for link in stored) == ["checkout", "ticket"]
    for link in stored:  # no secret kept: only the row the link points to
        assert link.target_url is None and link.target_id is not None
        assert link.channel == "sms" and link.conversation_id == conversation.id
        assert link.event_id == shop.event_id

    destinations = {}
    for url in urls:
        slug = urlsplit(url).path.rsplit("/", 1)[1]
        response = await visit(app_client, slug)
        assert response.status_code == 302, response.text
        destinations[urlsplit(response.headers["location"]).path] = response.headers["location"]
    ticket_path = next(p for p in destinations if not p.startswith("/checkout/"))
    ticket_page = await app_client.get(destinations[ticket_path], headers=HTML)
    assert ticket_page.status_code == 200, ticket_page.text
    assert "Weekend pop-up" in ticket_page.text
    checkout_location = next(v for p, v in destinations.items() if p.startswith("/checkout/"))
    await flushed(ctx)  # the click is written before the sale, as it is in production

    location = urlsplit(checkout_location)
    page = await app_client.get(f"{location.path}?{location.query}", headers=HTML)
    assert page.status_code == 200, page.text
    placed = await send(app_client, location.path, {"action": "pickup"}, page)
    assert placed.status_code == 303, placed.text
    async with ctx.db.reader() as session:
        order_id = await session.scalar(select(Order.id).where(Order.org_id == tenant.org_id))
        touches = list(
            await session.scalars(
                select(SaleTouch).where(
                    SaleTouch.sale_kind == "order", SaleTouch.sale_id == order_id
                )
            )
        )
    assert {t.touch for t in touches} == {"first", "last"}
    for touch in touches:
        assert touch.via == "click" and touch.channel == "sms"
        assert touch.conversation_id == conversation.id


async def test_web_chat_keeps_full_links(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    async with Socket(app_of(ctx), f"/ws/chat/{tenant.slug}") as ws:
        await ws.receive()
        hello = await ws.turn({"type": "start", "id": 1})
        drop = await ws.turn({"type": "button", "payload": labels(hello)["See the drop"]})
        reserved = await ws.turn({"type": "button", "payload": labels(drop)["Reserve"]})
    assert "/checkout/" in json.dumps(reserved), reserved
    assert "/s/" not in json.dumps(reserved)
    async with ctx.db.reader() as session:
        stored = await session.scalar(select(func.count()).where(ShortLink.org_id == tenant.org_id))
    assert stored == 0


async def test_sms_short_links_use_the_short_host_when_one_is_set(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    hook: str,  # noqa: F811
) -> None:
    ctx.settings = ctx.settings.model_copy(update={"short_base_url": "https://go.example"})
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    await publish(ctx, tenant, shop)
    phone = "+33666666666"
    await replies(app_client, hook, phone, "Hello")
    await replies(app_client, hook, phone, "1")
    reserved = "\n".join(await replies(app_client, hook, phone, "1"))
    assert len(re.findall(r"https://go\.example/s/[\w-]{11}", reserved)) == 2, reserved
