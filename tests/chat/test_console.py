"""The host console pages over ASGI (SQLite, and PostgreSQL when
POPDROP_TEST_DATABASE_URL is set): the live list, take over / reply / hand back, drop-off
and funnel, broadcasts and host addresses, tenancy and roles."""

from __future__ import annotations

import httpx

from popdrop.chat import host
from popdrop.chat.models import Conversation
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.audience.test_pages import HTML, HTMX, csrf_of, login
from tests.chat.test_service import say, shop_with_flow, texts
from tests.conftest import Tenant, make_tenant


async def post(client: httpx.AsyncClient, url: str, page: str, **data: str) -> httpx.Response:
    return await client.post(url, data={"csrf": csrf_of(page), **data}, headers=HTML)


async def test_list_take_over_reply_and_hand_back(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    hello = await say(ctx, tenant, "hi", address="web-console")
    assert hello.conversation_id is not None
    conv_id = hello.conversation_id
    await login(app_client, ctx, tenant, "owner")

    page = await app_client.get("/chat/console", headers=HTML)
    assert page.status_code == 200, page.text
    assert f'data-id="{conv_id}"' in page.text and "waiting input" in page.text
    assert "What would you like to do?" in page.text  # the last message
    assert 'href="/chat/console"' in page.text  # the nav entry
    assert 'hx-trigger="every 3s"' in page.text
    assert 'data-node="greet"' in page.text and "Chat→RSVP" in page.text
    live = await app_client.get("/chat/console", headers=HTMX)
    assert (
        live.status_code == 200 and "<html" not in live.text and f'data-id="{conv_id}"' in live.text
    )

    detail = await app_client.get(f"/chat/console/{conv_id}", headers=HTML)
    assert detail.status_code == 200 and "Take over" in detail.text
    taken = await post(app_client, f"/chat/console/{conv_id}/take-over", detail.text)
    assert taken.status_code == 303
    quiet = await say(ctx, tenant, "is the tote still there?", address="web-console")
    assert quiet.status == "handed_off" and quiet.messages == []  # no flow reply

    detail = await app_client.get(f"/chat/console/{conv_id}", headers=HTML)
    assert "handed off" in detail.text and "is the tote still there?" in detail.text
    replied = await post(
        app_client, f"/chat/console/{conv_id}/reply", detail.text, text="Yes, 3 left at the door!"
    )
    assert replied.status_code == 303
    detail = await app_client.get(f"/chat/console/{conv_id}", headers=HTML)
    assert "host (queued)" in detail.text and "Yes, 3 left at the door!" in detail.text
    async with ctx.db.transaction() as session:
        [delivery] = await host.take_outbox(session, org_id=tenant.org_id)
    assert delivery.address == "web-console"
    assert texts(delivery.messages) == "Yes, 3 left at the door!"
    empty = await post(app_client, f"/chat/console/{conv_id}/reply", detail.text, text="  ")
    assert empty.status_code == 422 and "1 to 2000 characters" in empty.text

    back = await post(app_client, f"/chat/console/{conv_id}/hand-back", detail.text)
    assert back.status_code == 303
    resumed = await say(ctx, tenant, "drop", address="web-console")
    assert resumed.status == "waiting_input" and resumed.messages

    pinned = await post(app_client, f"/chat/console/{conv_id}/pin", detail.text, product_id="x")
    assert pinned.status_code == 422
    detail = await app_client.get(f"/chat/console/{conv_id}", headers=HTML)
    product_id = detail.text.split('<option value="')[1].split('"')[0]
    pinned = await post(
        app_client, f"/chat/console/{conv_id}/pin", detail.text, product_id=product_id
    )
    assert pinned.status_code == 303
    detail = await app_client.get(f"/chat/console/{conv_id}", headers=HTML)
    assert "[card] Tote bag (10 left)" in detail.text


async def test_hosts_and_broadcast_from_the_console(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    await say(ctx, tenant, "hi", address="web-b")
    await login(app_client, ctx, tenant, "owner")
    page = await app_client.get("/chat/console", headers=HTML)
    added = await post(
        app_client, "/chat/console/hosts", page.text, channel="sms", address="+33600000009"
    )
    assert added.status_code == 303
    page = await app_client.get("/chat/console", headers=HTML)
    assert 'data-testid="host"' in page.text
    stats = await say(ctx, tenant, "/stats", channel="sms", address="+33600000009")
    assert "RSVPs" in texts(stats.messages)
    sent = await post(app_client, "/chat/console/broadcast", page.text, text="Doors open!")
    assert sent.status_code == 303
    result = await app_client.get(sent.headers["location"], headers=HTML)
    assert "Broadcast queued for 0; skipped 1 (1 no consent)." in result.text
    async with ctx.db.reader() as session:
        [row] = await host.list_hosts(session, tenant.org_id)
    removed = await post(app_client, f"/chat/console/hosts/{row.id}/delete", page.text)
    assert removed.status_code == 303
    stats = await say(ctx, tenant, "/stats", channel="sms", address="+33600000009")
    assert "RSVPs" not in texts(stats.messages)


async def test_another_organization_gets_404_and_roles_403(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    hello = await say(ctx, tenant, "hi", address="web-private")
    conv_id = hello.conversation_id
    other = await make_tenant(ctx)
    await login(app_client, ctx, other, "owner")
    page = await app_client.get("/chat/console", headers=HTML)
    assert page.status_code == 200 and f'data-id="{conv_id}"' not in page.text
    assert (await app_client.get(f"/chat/console/{conv_id}", headers=HTML)).status_code == 404
    taken = await post(app_client, f"/chat/console/{conv_id}/take-over", page.text)
    assert taken.status_code == 404
    async with ctx.db.reader() as session:
        row = await session.get(Conversation, conv_id)
    assert row is not None and row.status == "waiting_input"

    for role in ("volunteer", "partner"):
        client = httpx.AsyncClient(transport=app_client._transport, base_url="http://test")
        async with client:
            await login(client, ctx, tenant, role)
            denied = await client.get("/chat/console", headers=HTML)
            assert denied.status_code == 403
            assert (await client.get(f"/chat/console/{conv_id}", headers=HTML)).status_code == 403
            assert 'href="/chat/console"' not in denied.text
