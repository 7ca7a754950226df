"""Chat flows outside the demo (SQLite, and PostgreSQL when POPDROP_TEST_DATABASE_URL is
set): the flows API (versions, YAML, publish with line errors, Idempotency-Key, scopes,
tenancy), running conversations keeping their version, a new organization starting from
the shipped flow, the flow page, and the console naming a booked visitor."""

from __future__ import annotations

from datetime import timedelta

import httpx
from sqlalchemy import select

from popdrop.accounts.service import ROLES
from popdrop.chat import flow_store, turn
from popdrop.chat.engine import Inbound
from popdrop.chat.flow import shipped_source
from popdrop.chat.models import Conversation, FlowVersion
from popdrop.chat.sms import answer_sms
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.audience.test_pages import HTML, csrf_of, login
from tests.chat.test_service import buttons, deps, say, texts
from tests.chat.test_telegram import (
    BOT_TOKEN,
    SECRET,
    FakeBotApi,
    bot_api,  # noqa: F401 (a fixture)
    deliver,
    message_update,
)
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import make_shop

BROKEN = "start: a\nnodes:\n  a: {type: jump, to: b}\n"
WELCOME = shipped_source("popup_drop").replace(
    '"Hi! {event.title} pops up at {event.venue}."', '"Welcome back to {event.title}!"'
)


async def publish_api(
    client: httpx.AsyncClient, tenant: Tenant, source: str, **extra: object
) -> httpx.Response:
    return await client.post(
        "/api/v1/chat/flows", json={"source": source, **extra}, headers=tenant.headers
    )


async def test_flows_api_versions_yaml_and_line_errors(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    listed = await app_client.get("/api/v1/chat/flows", headers=tenant.headers)
    assert listed.status_code == 200, listed.text
    assert listed.json() == {
        "key": "popup_drop",
        "current": None,
        "shipped_default": True,
        "versions": [],
    }
    current = await app_client.get("/api/v1/chat/flows/current", headers=tenant.headers)
    assert current.status_code == 200 and current.headers["content-type"].startswith(
        "application/yaml"
    )
    assert current.headers["popdrop-flow-version"] == "0"
    assert current.text == shipped_source("popup_drop")

    bad = await publish_api(app_client, tenant, BROKEN)
    assert bad.status_code == 422
    body = bad.json()
    assert body["reason"] == "invalid_flow"
    assert body["message"] == "line 3: nodes.a.to: unknown node 'b'"
    assert body["errors"] == [{"line": 3, "field": "nodes.a.to", "message": "unknown node 'b'"}]
    yaml_error = await publish_api(app_client, tenant, "start: a\nnodes: [\n")
    assert yaml_error.status_code == 422 and yaml_error.json()["errors"][0]["line"] is not None

    shop = await make_shop(app_client, tenant, ctx.clock.now())
    key = {"Idempotency-Key": "publish-1", **tenant.headers}
    first = await app_client.post(
        "/api/v1/chat/flows", json={"source": WELCOME, "event_id": shop.event_id}, headers=key
    )
    assert first.status_code == 201, first.text
    again = await app_client.post(
        "/api/v1/chat/flows", json={"source": WELCOME, "event_id": shop.event_id}, headers=key
    )
    assert again.status_code == 201 and again.json() == first.json()  # one version, not two
    assert first.json()["version"] == 1 and first.json()["event_id"] == shop.event_id
    assert first.json()["title"] == "Pop-up drop" and first.json()["created_by"].startswith(
        "token:"
    )
    second = await publish_api(app_client, tenant, shipped_source("popup_drop"))
    assert second.status_code == 201 and second.json()["version"] == 2
    assert second.json()["event_id"] is None

    listed = await app_client.get("/api/v1/chat/flows", headers=tenant.headers)
    assert listed.json()["current"] == 2 and not listed.json()["shipped_default"]
    assert [v["version"] for v in listed.json()["versions"]] == [2, 1]
    one = await app_client.get("/api/v1/chat/flows/1", headers=tenant.headers)
    assert one.status_code == 200 and one.text == WELCOME
    assert one.headers["popdrop-flow-version"] == "1"
    current = await app_client.get("/api/v1/chat/flows/current", headers=tenant.headers)
    assert current.headers["popdrop-flow-version"] == "2"
    missing = await app_client.get("/api/v1/chat/flows/9", headers=tenant.headers)
    assert missing.status_code == 404 and missing.json()["reason"] == "not_found"
    huge = await app_client.get(f"/api/v1/chat/flows/{2**40}", headers=tenant.headers)
    assert huge.status_code == 422

    # An event of another organization is not ours to bind; a bad key is a 422.
    other = await make_tenant(ctx)
    theirs = await make_shop(app_client, other, ctx.clock.now())
    foreign = await publish_api(app_client, tenant, WELCOME, event_id=theirs.event_id)
    assert foreign.status_code == 404
    bad_key = await publish_api(app_client, tenant, WELCOME, key="Not A Key")
    assert bad_key.status_code == 422
    assert (await app_client.get("/api/v1/chat/flows/1", headers=other.headers)).status_code == 404
    async with ctx.db.reader() as session:
        versions = await flow_store.list_versions(session, tenant.org_id, "popup_drop")
    assert [v.version for v in versions] == [2, 1]  # no refused publish left a row


def alias_bomb(levels: int = 7) -> str:
    """Each level repeats the one before ten times: 10**levels values once expanded."""
    lines, previous = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"], "a0"
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [{', '.join(['*' + previous] * 10)}]")
        previous = f"a{level}"
    return "\n".join([*lines, "start: s", "nodes: {s: {type: end}}", ""])


async def test_a_hostile_file_is_refused_quickly(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    bomb = await publish_api(app_client, tenant, alias_bomb())
    assert bomb.status_code == 422, bomb.text
    assert "aliases expand to more than" in bomb.json()["message"]
    for deep in ("[" * 3000, "a: " + "{b: " * 200 + "1" + "}" * 200):
        nested = await publish_api(app_client, tenant, deep)
        assert nested.status_code == 422 and "nested too deeply" in nested.json()["message"]
    nul = await publish_api(app_client, tenant, "start: a\x00")
    assert nul.status_code == 422
    control = await publish_api(app_client, tenant, "}J\x9e\U00109c79")  # found by fuzzing
    assert control.status_code == 422 and control.json()["reason"] == "invalid_flow"


async def test_flows_api_scopes(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    reader = await make_tenant(ctx, frozenset({"chat:read"}))
    assert (await app_client.get("/api/v1/chat/flows", headers=reader.headers)).status_code == 200
    refused = await publish_api(app_client, reader, WELCOME)
    assert refused.status_code == 403 and refused.json()["reason"] == "forbidden"
    nobody = await make_tenant(ctx, frozenset({"vouchers:read"}))
    assert (await app_client.get("/api/v1/chat/flows", headers=nobody.headers)).status_code == 403
    current = await app_client.get("/api/v1/chat/flows/current", headers=nobody.headers)
    assert current.status_code == 403
    assert "chat:write" in ROLES["host"] and "chat:write" not in ROLES["volunteer"]


async def test_a_running_conversation_keeps_its_version(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    v1 = await publish_api(app_client, tenant, shipped_source("popup_drop"), event_id=shop.event_id)
    assert v1.json()["version"] == 1
    hello = await say(ctx, tenant, "hi", address="keeps-v1")
    assert "pops up at Old Tram Depot" in texts(hello.messages)
    v2 = await publish_api(app_client, tenant, WELCOME, event_id=shop.event_id)
    assert v2.json()["version"] == 2
    # Mid-session the conversation answers from version 1 (its buttons still resolve).
    menu = await say(ctx, tenant, "menu", address="keeps-v1")
    assert "What would you like to do?" in texts(menu.messages)
    slots = await say(ctx, tenant, Inbound.button(buttons(menu.messages)["RSVP a time slot"]))
    assert slots.messages
    newcomer = await say(ctx, tenant, "hi", address="starts-on-v2")
    assert "Welcome back to Weekend pop-up!" in texts(newcomer.messages)
    async with ctx.db.reader() as session:
        rows = {
            c.address: c.flow_version
            for c in await session.scalars(
                select(Conversation).where(Conversation.org_id == tenant.org_id)
            )
        }
    assert rows["keeps-v1"] == 1 and rows["starts-on-v2"] == 2

    clock.advance(timedelta(days=3, seconds=1))  # the session is over: the next one is v2
    async with ctx.db.transaction() as session:
        await turn.expire_sessions(session, now=clock.now(), org_id=tenant.org_id)
    fresh = await say(ctx, tenant, "hi", address="keeps-v1")
    assert "Welcome back to Weekend pop-up!" in texts(fresh.messages)


async def test_a_new_organization_chats_on_the_shipped_flow(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    # No open event yet: nothing to offer, no flow starts; SMS answers keywords only.
    async with ctx.db.transaction() as session:
        quiet = await answer_sms(
            session, deps(ctx), org_id=tenant.org_id, sender="+33611111111", body="hi",
            now=ctx.clock.now(),
        )  # fmt: skip
        helped = await answer_sms(
            session, deps(ctx), org_id=tenant.org_id, sender="+33611111111", body="HELP",
            now=ctx.clock.now(),
        )  # fmt: skip
    assert quiet == [] and len(helped) == 1 and "STOP" in helped[0]

    shop = await make_shop(app_client, tenant, ctx.clock.now())
    hello = await say(ctx, tenant, "hi", address="first-visitor")
    assert "Hi! Weekend pop-up pops up at Old Tram Depot." in texts(hello.messages)
    assert "See the drop" in buttons(hello.messages)
    async with ctx.db.transaction() as session:
        [sms] = await answer_sms(
            session, deps(ctx), org_id=tenant.org_id, sender="+33611111111", body="hi",
            now=ctx.clock.now(),
        )  # fmt: skip
    assert "1) See the drop" in sms

    async with ctx.db.reader() as session:
        [stored] = await session.scalars(
            select(FlowVersion).where(FlowVersion.org_id == tenant.org_id)
        )
        conv = await session.scalar(
            select(Conversation).where(
                Conversation.org_id == tenant.org_id, Conversation.address == "first-visitor"
            )
        )
    assert stored.version == 1 and stored.event_id is None
    assert stored.created_by == flow_store.SHIPPED_BY
    assert conv is not None and conv.event_id == shop.event_id and conv.flow_version == 1

    # The slot picker offers the event's slots: the whole flow runs, not only STOP/HELP.
    slots = await say(ctx, tenant, "rsvp", address="first-visitor")
    assert "(50 left)" in texts(slots.messages) or any(
        b.endswith("(50 left)") for b in buttons(slots.messages)
    )


async def test_a_new_organization_answers_on_telegram_with_the_shipped_flow(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    bot_api: FakeBotApi,  # noqa: F811 (the fixture imported above)
) -> None:
    ctx.settings = ctx.settings.model_copy(
        update={
            "telegram_api_url": bot_api.url,
            "telegram_bot_token": BOT_TOKEN,
            "telegram_webhook_secret": SECRET,
        }
    )
    await make_shop(app_client, tenant, ctx.clock.now())
    answered = await deliver(app_client, f"/telegram/{tenant.slug}/webhook", message_update("hi"))
    assert answered.status_code == 200, answered.text
    sent = " ".join(str(params.get("text", "")) for _method, params in bot_api.calls)
    assert "Weekend pop-up pops up at Old Tram Depot" in sent


async def test_the_console_names_a_booked_visitor(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await make_shop(app_client, tenant, ctx.clock.now())
    address = "booking-visitor"
    await say(ctx, tenant, "hi", address=address)
    slots = await say(ctx, tenant, "rsvp", address=address)
    first_slot = next(iter(buttons(slots.messages).values()))
    await say(ctx, tenant, Inbound.button(first_slot), address=address)
    confirm = await say(ctx, tenant, "ana@example.com", address=address)
    booked = await say(
        ctx, tenant, Inbound.button(buttons(confirm.messages)["Yes, book it"]), address=address
    )
    assert "You are in for" in texts(booked.messages)
    browsing = await say(ctx, tenant, "hi", address="just-browsing")

    await login(app_client, ctx, tenant, "owner")
    page = await app_client.get("/chat/console", headers=HTML)
    assert page.status_code == 200
    row = page.text.split(f'href="/chat/console/{booked.conversation_id}"')[1].split("</a>")[0]
    assert "ana@example.com" in row and "anonymous" not in row
    other = page.text.split(f'href="/chat/console/{browsing.conversation_id}"')[1]
    assert other.split("</a>")[0].strip(">").startswith("anonymous")
    detail = await app_client.get(f"/chat/console/{booked.conversation_id}", headers=HTML)
    assert "ana@example.com" in detail.text


async def test_the_flow_page_checks_publishes_and_lists_versions(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    await login(app_client, ctx, tenant, "host")
    console = await app_client.get("/chat/console", headers=HTML)
    assert 'href="/chat/flows"' in console.text  # linked from the console

    page = await app_client.get("/chat/flows", headers=HTML)
    assert page.status_code == 200
    assert "shipped flow" in page.text and "Weekend pop-up" in page.text
    assert "Hi! {event.title} pops up at {event.venue}." in page.text  # the YAML to edit
    assert 'name="viewport"' in page.text

    form = {"csrf": csrf_of(page.text), "source": BROKEN, "event_id": "", "action": "publish"}
    refused = await app_client.post("/chat/flows", data=form, headers=HTML)
    assert refused.status_code == 422
    assert 'data-line="3"' in refused.text  # the error sits next to its line
    line = refused.text.split('data-line="3"')[1].split("</li>")[0]
    assert "nodes.a.to: unknown node" in line and "b" in line
    assert "{type: jump, to: b}" in refused.text  # the text as sent, to fix
    async with ctx.db.reader() as session:
        assert await flow_store.list_versions(session, tenant.org_id, "popup_drop") == []

    checked = await app_client.post(
        "/chat/flows", data={**form, "source": WELCOME, "action": "check"}, headers=HTML
    )
    assert checked.status_code == 200 and "is valid" in checked.text
    published = await app_client.post(
        "/chat/flows",
        data={**form, "action": "publish", "event_id": str(shop.event_id)},
        files={"file": ("flow.yaml", WELCOME.encode(), "application/yaml")},
        headers=HTML,
    )
    assert published.status_code == 303, published.text
    assert published.headers["location"] == "/chat/flows?published=1"
    page = await app_client.get("/chat/flows?published=1", headers=HTML)
    assert "Version 1 published." in page.text and 'data-version="1"' in page.text
    assert "New conversations start on version 1." in page.text
    hello = await say(ctx, tenant, "hi")
    assert "Welcome back to Weekend pop-up!" in texts(hello.messages)
    edit = await app_client.get("/chat/flows?from=1", headers=HTML)
    assert "Welcome back to {event.title}!" in edit.text

    no_csrf = await app_client.post("/chat/flows", data={"source": WELCOME}, headers=HTML)
    assert no_csrf.status_code == 403


async def test_the_flow_page_is_for_chat_readers(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await login(app_client, ctx, tenant, "volunteer")
    page = await app_client.get("/chat/flows", headers=HTML)
    assert page.status_code == 403
