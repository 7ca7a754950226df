"""The Stripe webhook route: the same event delivered ten times at once is applied once;
types popdrop does not use and events about unknown orders are acknowledged (200) so
Stripe stops retrying; a refund the provider confirms later is settled by its event."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from popdrop.accounts.service import system_principal
from popdrop.commerce import settlement
from popdrop.commerce import tasks as commerce_tasks
from popdrop.commerce.stripe_sandbox import StripeSandbox
from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.web.context import AppContext
from tests.commerce.helpers import (
    WEBHOOK,
    deliver,
    get_order,
    hold,
    make_shop,
    placed,
    sandbox_settings,
    start_payment,
    stock_row,
)
from tests.conftest import Tenant


@pytest.fixture
async def sandbox(clock: FrozenClock) -> AsyncIterator[StripeSandbox]:
    box = StripeSandbox(clock=clock, retry_delays=())
    async with box.serving():
        yield box


@pytest.fixture
def settings(database_url: str, tmp_path: Path, sandbox: StripeSandbox) -> Settings:
    return sandbox_settings(database_url, tmp_path, sandbox)


async def post_signed(
    client: httpx.AsyncClient, sandbox: StripeSandbox, body: bytes
) -> httpx.Response:
    return await client.post(
        WEBHOOK, content=body, headers={"Stripe-Signature": sandbox.sign(body)}
    )


async def test_ten_simultaneous_deliveries_of_one_event_apply_it_once(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, sandbox: StripeSandbox
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], payment_method="stripe"
    )
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    completed, *_ = await sandbox.pay(session_id)
    answers = await asyncio.gather(
        *(post_signed(app_client, sandbox, completed.body) for _ in range(10))
    )
    assert {a.status_code for a in answers} == {200}
    outcomes = Counter(a.json()["outcome"] for a in answers)
    assert outcomes == {"paid": 1, "duplicate": 9}
    assert (await stock_row(app_client, tenant, shop))["sold"] == 1
    assert (await get_order(app_client, tenant, order["id"]))["status"] == "paid"


async def test_other_types_and_unknown_orders_are_acknowledged(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, sandbox: StripeSandbox
) -> None:
    created = int(clock.now().timestamp())
    other_type = json.dumps(
        {"id": "evt_other_1", "object": "event", "type": "customer.created", "created": created,
         "data": {"object": {"id": "cus_1", "object": "customer"}}}
    ).encode()  # fmt: skip
    answer = await post_signed(app_client, sandbox, other_type)
    assert (answer.status_code, answer.json()["outcome"]) == (200, "ignored_type")

    unknown = json.dumps(
        {"id": "evt_unknown_1", "object": "event", "type": "payment_intent.succeeded",
         "created": created,
         "data": {"object": {"id": "pi_nobody", "object": "payment_intent", "amount": 100,
                             "currency": "eur", "status": "succeeded",
                             "metadata": {"order_id": "999999", "org_id": str(tenant.org_id)}}}}
    ).encode()  # fmt: skip
    answer = await post_signed(app_client, sandbox, unknown)
    assert (answer.status_code, answer.json()["outcome"]) == (200, "unknown_order")


async def test_a_refund_confirmed_later_is_settled_by_its_event(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, sandbox: StripeSandbox
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], payment_method="stripe"
    )
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    await deliver(app_client, sandbox, await sandbox.pay(session_id))
    sandbox.refund_status = "pending"
    refunded = await app_client.post(
        f"/api/v1/orders/{order['id']}/refunds", json={}, headers=tenant.headers
    )
    assert refunded.status_code == 200, refunded.text
    [refund] = refunded.json()["refunds"]
    assert (refund["status"], refunded.json()["status"]) == ("pending", "refunded")
    assert (await stock_row(app_client, tenant, shop))["sold"] == 0

    sandbox.settle_refund(refund["provider_ref"], "succeeded")
    await sandbox.settle()
    answers = await deliver(app_client, sandbox, sandbox.events_of("refund.updated"))
    assert answers[-1]["outcome"] == "refund_succeeded"
    final = await get_order(app_client, tenant, order["id"])
    assert final["refunds"][0]["status"] == "succeeded"


async def test_a_partial_refund_the_provider_fails_counts_as_not_refunded(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, sandbox: StripeSandbox
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], payment_method="stripe"
    )
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    await deliver(app_client, sandbox, await sandbox.pay(session_id))
    sandbox.refund_status = "pending"
    part = await app_client.post(
        f"/api/v1/orders/{order['id']}/refunds", json={"amount_minor": 400}, headers=tenant.headers
    )
    assert part.json()["refunded_minor"] == 400
    [refund] = part.json()["refunds"]
    sandbox.settle_refund(refund["provider_ref"], "failed", failure_reason="lost_or_stolen_card")
    await sandbox.settle()
    await deliver(app_client, sandbox, sandbox.events_of("refund.updated"))
    final = await get_order(app_client, tenant, order["id"])
    assert (final["status"], final["refunded_minor"]) == ("paid", 0)
    assert final["refunds"][0]["status"] == "failed"
    assert final["refunds"][0]["failure_code"] == "lost_or_stolen_card"


async def test_the_worker_tick_sends_a_refund_a_crash_left_unsent(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    sandbox: StripeSandbox,
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], payment_method="stripe"
    )
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    await deliver(app_client, sandbox, await sandbox.pay(session_id))
    owner = system_principal(tenant.org_id, "test:refund", role="owner")
    async with ctx.db.transaction() as session:  # recorded, then the process "dies"
        _, refund_ids = await settlement.refund_order(
            session, owner, order["id"], amount_minor=None, reason="crash", now=clock.now()
        )
    assert len(refund_ids) == 1 and sandbox.refunds == {}
    first = await commerce_tasks.tick(ctx.db, ctx.settings, ctx.clock)
    assert first.get("refunds_sent") == 1
    again = await commerce_tasks.tick(ctx.db, ctx.settings, ctx.clock)
    assert "refunds_sent" not in again  # sent once
    [refund] = (await get_order(app_client, tenant, order["id"]))["refunds"]
    assert refund["status"] == "succeeded" and refund["provider_ref"].startswith("re_")
    assert [r["amount"] for r in sandbox.refunds.values()] == [1500]
