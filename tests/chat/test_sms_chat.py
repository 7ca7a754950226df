"""Two-way SMS chat through the Twilio inbound webhook: signature, STOP/START/HELP before
any flow (one confirmation per opt-out), carousels as numbered text, "2" picks option 2
(SQLite, and PostgreSQL when POPDROP_TEST_DATABASE_URL is set)."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import httpx
import pytest
from sqlalchemy import func, select

from popdrop.audience.models import Suppression
from popdrop.chat import flow_store
from popdrop.chat.models import Conversation
from popdrop.chat.sms import twiml
from popdrop.inventory.models import Hold
from popdrop.outbound.twilio import compute_signature
from popdrop.web.context import AppContext
from tests.conftest import Tenant
from tests.events.helpers import Shop, make_shop, post

AUTH_TOKEN = "twilio-auth-token-for-tests"
OUR_NUMBER = "+15005550006"
_sids = itertools.count(1)


@pytest.fixture
async def hook(app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant) -> str:
    """The org's signed inbound-SMS webhook path (as `GET /webhook-urls` gives it)."""
    ctx.settings = ctx.settings.model_copy(update={"sms_auth_token": AUTH_TOKEN})
    urls = (await app_client.get("/api/v1/webhook-urls", headers=tenant.headers)).json()
    inbound: str = urls["twilio_inbound"]
    return "/" + inbound.split("://", 1)[1].split("/", 1)[1]


async def text_in(
    client: httpx.AsyncClient, path: str, sender: str, body: str, *, token: str = AUTH_TOKEN
) -> httpx.Response:
    """An inbound SMS as Twilio posts it, signed with `token`."""
    params = {
        "MessageSid": f"SM{next(_sids):032x}",
        "AccountSid": "AC" + "0" * 32,
        "From": sender,
        "To": OUR_NUMBER,
        "Body": body,
        "NumMedia": "0",
    }
    url = str(client.base_url).rstrip("/") + path  # the URL the webhook sees, as Twilio signs it
    signature = compute_signature(token, url, params)
    return await client.post(path, data=params, headers={"X-Twilio-Signature": signature})


async def replies(client: httpx.AsyncClient, path: str, sender: str, body: str) -> list[str]:
    response = await text_in(client, path, sender, body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(response.content)
    assert root.tag == "Response"
    return [message.text or "" for message in root.findall("Message")]


async def publish(ctx: AppContext, tenant: Tenant, shop: Shop) -> None:
    async with ctx.db.transaction() as session:
        await flow_store.publish_default_flow(
            session, tenant.org_id, shop.event_id, now=ctx.clock.now()
        )


async def suppressions(ctx: AppContext, tenant: Tenant) -> int:
    async with ctx.db.reader() as session:
        found = await session.scalar(
            select(func.count())
            .select_from(Suppression)
            .where(Suppression.org_id == tenant.org_id, Suppression.channel == "sms")
        )
    return int(found or 0)


def test_twiml_escapes_and_answers_nothing_with_an_empty_response() -> None:
    assert twiml([]) == '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
    assert "<Message>a &lt;b&gt; &amp; c</Message>" in twiml(["a <b> & c"])


async def test_bad_signature_is_refused_and_changes_nothing(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, hook: str
) -> None:
    forged = await text_in(app_client, hook, "+33611111111", "STOP", token="not-the-token")
    assert forged.status_code == 403, forged.text
    unsigned = await app_client.post(hook, data={"From": "+33611111111", "Body": "STOP"})
    assert unsigned.status_code == 403
    assert await suppressions(ctx, tenant) == 0


@pytest.mark.parametrize("with_flow", [True, False], ids=["chat-flow", "keywords-only"])
async def test_stop_opts_out_and_is_confirmed_once(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, hook: str, with_flow: bool
) -> None:
    if with_flow:
        await publish(ctx, tenant, await make_shop(app_client, tenant, ctx.clock.now()))
    phone = "+33622222222"
    first = await replies(app_client, hook, phone, "STOP")
    assert len(first) == 1 and "unsubscribed" in first[0]
    assert await suppressions(ctx, tenant) == 1
    assert await replies(app_client, hook, phone, "stop") == []  # no second confirmation
    assert await suppressions(ctx, tenant) == 1
    assert await replies(app_client, hook, phone, "hi") == []  # no flow for an opted-out number
    help_ = await replies(app_client, hook, phone, "HELP")
    assert len(help_) == 1 and "STOP" in help_[0]
    back = await replies(app_client, hook, phone, "START")
    assert len(back) == 1 and "subscribed again" in back[0]
    assert await suppressions(ctx, tenant) == 0
    again = await replies(app_client, hook, phone, "STOP")  # a new opt-out: confirmed again
    assert len(again) == 1 and "unsubscribed" in again[0]
    if with_flow:
        hello = await replies(app_client, hook, phone, "START")
        assert "subscribed again" in hello[0]
        menu = await replies(app_client, hook, phone, "hi")
        assert len(menu) == 1 and "1) See the drop" in menu[0]


async def test_carousel_arrives_as_numbered_text_and_2_picks_the_second_item(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, hook: str
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    hoodie = await post(
        app_client,
        tenant,
        f"/api/v1/events/{shop.event_id}/products",
        {"title": "Hoodie", "price_minor": 4500, "variants": ["M"]},
    )
    stocked = await app_client.put(
        "/api/v1/stock",
        json={"variant_id": hoodie["variants"][0]["id"], "lane_id": shop.lane_id, "total": 3},
        headers=tenant.headers,
    )
    assert stocked.status_code == 200, stocked.text
    await publish(ctx, tenant, shop)
    phone = "+33633333333"

    [hello] = await replies(app_client, hook, phone, "Hello")
    assert "Weekend pop-up pops up at Old Tram Depot" in hello
    assert "1) See the drop\n2) RSVP a time slot" in hello
    [drop] = await replies(app_client, hook, phone, "1")
    lines = drop.splitlines()
    assert any(line.startswith("1) Tote bag") and line.endswith("— Reserve") for line in lines)
    assert any(line.startswith("2) Hoodie") and "(3 left)" in line for line in lines), drop
    assert "Reply with a number." in drop
    assert "<" not in drop  # plain text: no card markup reached the SMS

    [reserved] = await replies(app_client, hook, phone, "2")
    assert reserved.startswith("Hoodie is yours until"), reserved
    async with ctx.db.reader() as session:
        hold = await session.scalar(select(Hold).where(Hold.event_id == shop.event_id))
        conversation = await session.scalar(
            select(Conversation).where(
                Conversation.org_id == tenant.org_id, Conversation.channel == "sms"
            )
        )
    assert hold is not None and hold.variant_id == hoodie["variants"][0]["id"]
    assert conversation is not None and conversation.address == phone
