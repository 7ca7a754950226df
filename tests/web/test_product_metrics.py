"""Prometheus counters for drops, chat and holds (issue 15), read from `/metrics` with
Prometheus' own parser: a drop's messages by channel and outcome, chat turns by channel,
holds placed and refused with their reason. Counters are per process and shared by the
tests of a run, so each check compares before and after."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from popdrop.web.context import AppContext
from tests.chat.test_service import shop_with_flow
from tests.chat.test_web import Socket, app_of
from tests.conftest import Tenant, make_tenant
from tests.drops.helpers import Recorder, drop_spec, sender, started_drop
from tests.events.helpers import make_shop

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_drop_messages_are_counted_by_channel_and_outcome(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    for i in range(3):
        contact = {"email": f"fan{i}@example.com", "consents": []}
        contact["consents"] = [
            {"channel": "email", "wording": "Drops by email", "source": "form", "proof": "form"}
        ]
        made = await app_client.post("/api/v1/contacts", json=contact, headers=tenant.headers)
        assert made.status_code in (200, 201), made.text
    before = await scrape(app_client)
    await started_drop(ctx, tenant, drop_spec())
    email = Recorder()
    await sender(ctx, email, org=tenant).run_until_idle()
    after = await scrape(app_client)
    assert len(email.sent) == 3
    sent = grew(before, after, "popdrop_drop_messages_total", channel="email", result="sent")
    assert sent == 3


async def test_chat_turns_are_counted_by_channel(
    app_client: httpx.AsyncClient, ctx: AppContext
) -> None:
    tenant = await make_tenant(ctx)
    await shop_with_flow(app_client, ctx, tenant)
    before = await scrape(app_client)
    async with Socket(app_of(ctx), f"/ws/chat/{tenant.slug}") as ws:
        assert (await ws.receive())["type"] == "ready"
        assert (await ws.turn({"type": "start", "id": 1}))["type"] == "messages"
        assert (await ws.turn({"type": "text", "id": 2, "text": "hi"}))["type"] == "messages"
    after = await scrape(app_client)
    assert grew(before, after, "popdrop_chat_turns_total", channel="web") >= 2


async def test_holds_placed_and_refused_are_counted(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now(), units=2)
    hold = {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "qty": 2}
    before = await scrape(app_client)
    placed = await app_client.post("/api/v1/holds", json=hold, headers=tenant.headers)
    assert placed.status_code == 201, placed.text
    refused = await app_client.post("/api/v1/holds", json=hold, headers=tenant.headers)
    assert refused.status_code == 409, refused.text
    reason = refused.json()["reason"]
    # With a slot, take_hold hands over to create_hold: still counted once.
    slotted = {**hold, "slot_id": shop.slot_id}
    again = await app_client.post("/api/v1/holds", json=slotted, headers=tenant.headers)
    assert again.json()["reason"] == reason
    after = await scrape(app_client)
    assert grew(before, after, "popdrop_holds_total", result="placed") == 1
    assert grew(before, after, "popdrop_holds_total", result=reason) == 2
