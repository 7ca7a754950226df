"""Every time a person reads comes from the event's own zone, through one formatter
(`core.localtime`): the public page, the waiting-list and chat texts, SMS and Telegram.
An event in New York (EST) and one in Paris (CEST) show the hours of their own wall clock,
never a UTC hour as if it were local."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from popdrop.chat import flow_store
from popdrop.core.localtime import DASH
from popdrop.web.context import AppContext
from tests.chat.test_sms_chat import AUTH_TOKEN, replies
from tests.chat.test_telegram import (
    BOT_TOKEN,
    SECRET,
    FakeBotApi,
    bot_api,  # noqa: F401 (the fake Bot API, a fixture)
    callback_update,
    deliver,
    keyboard_of,
    message_update,
)
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import post


@dataclass(frozen=True)
class Case:
    zone: str
    starts_at: datetime  # the event's start, UTC
    slot_at: datetime  # a two-hour slot, UTC
    doors: str  # the event's start as shown
    slot: str  # the slot as shown


CASES = [
    Case(
        "America/New_York",
        datetime(2030, 1, 11, 15, tzinfo=UTC),
        datetime(2030, 1, 11, 16, tzinfo=UTC),
        "Fri 11 Jan, 10:00 EST",
        f"Fri 11 Jan, 11:00{DASH}13:00 EST",
    ),
    Case(
        "Europe/Paris",
        datetime(2030, 6, 7, 8, tzinfo=UTC),
        datetime(2030, 6, 7, 16, tzinfo=UTC),
        "Fri 07 Jun, 10:00 CEST",
        f"Fri 07 Jun, 18:00{DASH}20:00 CEST",
    ),
]
IDS = [case.zone for case in CASES]


@dataclass(frozen=True)
class Popup:
    tenant: Tenant
    event_id: int


async def popup(client: httpx.AsyncClient, ctx: AppContext, case: Case) -> Popup:
    """A published event in the case's zone, one slot, the shipped chat flow bound to it."""
    ctx.clock.set(case.starts_at - timedelta(days=4))
    tenant = await make_tenant(ctx)
    event = await post(
        client,
        tenant,
        "/api/v1/events",
        {
            "slug": "local",
            "title": "Pop-up",
            "venue_name": "Depot",
            "timezone": case.zone,
            "starts_at": case.starts_at.isoformat(),
            "ends_at": (case.starts_at + timedelta(hours=10)).isoformat(),
        },
    )
    await post(client, tenant, f"/api/v1/events/{event['id']}/status", {"status": "published"})
    slot = {
        "starts_at": case.slot_at.isoformat(),
        "ends_at": (case.slot_at + timedelta(hours=2)).isoformat(),
        "capacity": 50,
    }
    await post(client, tenant, f"/api/v1/events/{event['id']}/slots", slot)
    async with ctx.db.transaction() as session:
        await flow_store.publish_default_flow(
            session, tenant.org_id, event["id"], now=ctx.clock.now()
        )
    return Popup(tenant, event["id"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_public_page_shows_the_slot_on_the_event_clock(
    app_client: httpx.AsyncClient, ctx: AppContext, case: Case
) -> None:
    shop = await popup(app_client, ctx, case)
    page = await app_client.get(f"/e/{shop.event_id}")
    assert page.status_code == 200
    assert f'<span class="slot-time">{case.slot}</span>' in page.text


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_sms_chat_shows_doors_and_slots_on_the_event_clock(
    app_client: httpx.AsyncClient, ctx: AppContext, case: Case
) -> None:
    shop = await popup(app_client, ctx, case)
    ctx.settings = ctx.settings.model_copy(update={"sms_auth_token": AUTH_TOKEN})
    urls = await app_client.get("/api/v1/webhook-urls", headers=shop.tenant.headers)
    hook = "/" + urls.json()["twilio_inbound"].split("://", 1)[1].split("/", 1)[1]
    [hello] = await replies(app_client, hook, "+33644444444", "hi")
    assert f"Doors open {case.doors} (in 4d" in hello
    [slots] = await replies(app_client, hook, "+33644444444", "2")  # RSVP a time slot
    assert f"1) {case.slot} (50 left)" in slots, slots


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_telegram_shows_doors_and_slots_on_the_event_clock(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    case: Case,
    bot_api: FakeBotApi,  # noqa: F811
) -> None:
    shop = await popup(app_client, ctx, case)
    ctx.settings = ctx.settings.model_copy(
        update={
            "telegram_api_url": bot_api.url,
            "telegram_bot_token": BOT_TOKEN,
            "telegram_webhook_secret": SECRET,
        }
    )
    hook = f"/telegram/{shop.tenant.slug}/webhook"
    assert (await deliver(app_client, hook, message_update("/start"))).status_code == 200
    [(_, hello)] = bot_api.calls
    assert f"Doors open {case.doors}" in hello["text"]
    bot_api.calls.clear()
    pressed = callback_update(keyboard_of(hello)["RSVP a time slot"])
    assert (await deliver(app_client, hook, pressed)).status_code == 200
    keyboards = [keyboard_of(p) for m, p in bot_api.calls if "reply_markup" in p]
    assert any(f"{case.slot} (50 left)" in keyboard for keyboard in keyboards), bot_api.calls
