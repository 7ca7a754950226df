"""The path to a visit and a sale lands in the funnel log, through the real APIs: an RSVP,
a hold, an order placed, paid (at the lane and by Stripe), failed, refunded and picked
up, a check-in, a till's sale and refund, a sample; each once (a second scan, a replayed
delivery add nothing), tagged and valued, never naming an email. Erasing a contact
blanks its person in the log; retention deletes old log rows and keeps the rollups."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from popdrop.commerce.models import Payment
from popdrop.commerce.stripe_sandbox import StripeSandbox
from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.metrics import log, rollups
from popdrop.metrics.models import FunnelEvent, FunnelRollup
from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact
from tests.commerce.helpers import (
    deliver,
    hold,
    make_shop,
    placed,
    sandbox_settings,
    start_payment,
)
from tests.commerce.test_samples import give, sample_shop
from tests.conftest import Tenant, issue
from tests.events.helpers import post
from tests.partners.helpers import SQUARE_PAYMENT, SQUARE_REFUND, make_till, send_square
from tests.rsvp.helpers import make_slot, rsvp


@pytest.fixture
async def sandbox(clock: FrozenClock) -> AsyncIterator[StripeSandbox]:
    box = StripeSandbox(clock=clock, retry_delays=())
    async with box.serving():
        yield box


@pytest.fixture
def settings(database_url: str, tmp_path: Path, sandbox: StripeSandbox) -> Settings:
    return sandbox_settings(database_url, tmp_path, sandbox)


async def logged(ctx: AppContext, org_id: int, kind: str | None = None) -> list[FunnelEvent]:
    async with ctx.db.reader() as session:
        query = select(FunnelEvent).where(FunnelEvent.org_id == org_id)
        if kind is not None:
            query = query.where(FunnelEvent.kind == kind)
        return list(await session.scalars(query.order_by(FunnelEvent.id)))


def tags(row: FunnelEvent) -> dict[str, Any]:
    return {
        name: getattr(row, name)
        for name in (
            "kind", "channel", "event_id", "partner_id", "lane_id", "label", "subject",
            "value", "currency",
        )
    }  # fmt: skip


def no_contact_points(rows: list[FunnelEvent], *points: str) -> None:
    for row in rows:
        for point in points:
            assert point.lower() not in repr(tags(row) | {"p": row.person}).lower()


async def test_an_rsvp_and_its_first_check_in(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=1)
    made = await rsvp(app_client, event_id, slot_id, email="Guest.One@Example.com")
    assert made.status_code == 201, made.text
    body = made.json()
    waiting = await rsvp(app_client, event_id, slot_id, waitlist=True)
    assert waiting.json()["rsvp"]["status"] == "waitlisted"

    [row] = await logged(ctx, tenant.org_id)  # the waiting one is not confirmed: no event
    assert tags(row) == {
        "kind": "rsvp", "channel": "web", "event_id": event_id, "partner_id": None,
        "lane_id": None, "label": "", "subject": f"rsvp:{body['rsvp']['id']}", "value": 0,
        "currency": "",
    }  # fmt: skip
    guest = log.person_of_point(ctx.signer, "guest.one@example.com", None)
    assert row.person == guest
    no_contact_points([row], "guest.one")

    # Doors open two hours before the event (a day from now).
    clock.advance(timedelta(hours=23))
    secret = body["ticket_url"].rsplit("/", 1)[1]
    first = await app_client.post(
        "/api/v1/checkins", json={"secret": secret, "nonce": "nonce-0001"}, headers=tenant.headers
    )
    assert (first.status_code, first.json().get("result")) == (200, "ok"), first.text
    for nonce in ("nonce-0001", "nonce-0002"):  # a replay, then the same ticket scanned again
        again = await app_client.post(
            "/api/v1/checkins", json={"secret": secret, "nonce": nonce}, headers=tenant.headers
        )
        assert again.json()["result"] in ("ok", "already_checked_in")
    [visit] = await logged(ctx, tenant.org_id, "visit")
    assert tags(visit) | {"at": visit.at} == {
        "kind": "visit", "channel": "", "event_id": event_id, "partner_id": None,
        "lane_id": None, "label": "", "subject": f"rsvp:{body['rsvp']['id']}", "value": 0,
        "currency": "", "at": clock.now(),
    }  # fmt: skip
    assert visit.person == guest  # the RSVP's person: a funnel follows them to the door


async def test_holds_on_both_paths_and_a_refusal(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=2, window=5)
    burst = await hold(app_client, tenant, shop, contact_ref="contact:42")  # one statement
    slotted = await hold(app_client, tenant, shop, with_slot=True)  # one transaction
    refused = await app_client.post(
        "/api/v1/holds",
        json={"variant_id": shop.variant_id, "lane_id": shop.lane_id},
        headers=tenant.headers,
    )
    assert refused.json()["reason"] == "sold_out"
    rows = await logged(ctx, tenant.org_id)
    assert [(tags(r), r.person, r.at) for r in rows] == [
        (
            {
                "kind": "hold", "channel": "api", "event_id": shop.event_id, "partner_id": None,
                "lane_id": shop.lane_id, "label": "", "subject": f"hold:{hold_id}", "value": 0,
                "currency": "",
            },
            person,
            clock.now(),
        )
        for hold_id, person in ((burst, "c:42"), (slotted, None))
    ]  # fmt: skip


async def test_an_order_placed_paid_refunded_and_picked_up_once(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)],
        receipt_email="Ann@Example.test", source="web",
    )  # fmt: skip
    paid = await app_client.post(
        f"/api/v1/orders/{order['id']}/mark-paid", json={"tender": "card"}, headers=tenant.headers
    )
    assert paid.status_code == 200, paid.text
    refunded = await app_client.post(
        f"/api/v1/orders/{order['id']}/refunds",
        json={"amount_minor": 400, "reason": "scratched"},
        headers=tenant.headers,
    )
    assert refunded.status_code == 200, refunded.text
    clock.advance(timedelta(days=1))  # the event's door hours: pickup opens
    for _ in range(2):  # handed out, then the same code again
        await app_client.post(
            "/api/v1/pickup/scan",
            json={"lane_id": shop.lane_id, "code": order["short_code"]},
            headers=tenant.headers,
        )
    rows = await logged(ctx, tenant.org_id)
    rows = [r for r in rows if r.kind != "hold"]
    common = {
        "channel": "web", "event_id": shop.event_id, "partner_id": None,
        "lane_id": shop.lane_id, "label": "", "subject": f"order:{order['id']}",
        "currency": "EUR",
    }  # fmt: skip
    assert [tags(r) for r in rows] == [
        {"kind": "checkout_started", "value": 1500, **common},
        {"kind": "order_paid", "value": 1500, **common},
        {"kind": "order_refunded", "value": 400, **common},
        {"kind": "order_picked_up", "value": 0, **common},
    ]
    assert {r.person for r in rows} == {log.person_of_point(ctx.signer, "ann@example.test", None)}
    no_contact_points(rows, "ann@example")


async def test_a_free_order_by_a_chat_contact_is_paid_at_once(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    _, [code] = await issue(app_client, tenant, discount_kind="percent", discount_value=100)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], codes=[code],
        contact_ref="contact:7", source="chat",
    )  # fmt: skip
    rows = [r for r in await logged(ctx, tenant.org_id) if r.subject == f"order:{order['id']}"]
    assert [(r.kind, r.value, r.channel, r.person) for r in rows] == [
        ("checkout_started", 0, "chat", "c:7"),
        ("order_paid", 0, "chat", "c:7"),
    ]


async def test_stripe_failure_then_payment(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    sandbox: StripeSandbox,
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], payment_method="stripe",
        contact_ref="contact:9",
    )  # fmt: skip
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    declined = await sandbox.decline(session_id)
    await deliver(app_client, sandbox, declined)
    paid = await sandbox.pay(session_id)
    answers = await deliver(app_client, sandbox, [*paid, *paid])  # Stripe retries: once
    assert [a["outcome"] for a in answers].count("paid") == 1
    rows = [r for r in await logged(ctx, tenant.org_id) if r.kind != "hold"]
    assert [r.kind for r in rows] == ["checkout_started", "payment_failed", "order_paid"]
    failed, done = rows[1], rows[2]
    assert failed.label and len(failed.label) <= 24 and failed.value == 1500
    async with ctx.db.reader() as session:
        code = await session.scalar(
            select(Payment.failure_code).where(Payment.order_id == order["id"])
        )
    assert failed.label == (code or "")[:24]
    assert (done.value, done.currency, done.person, done.lane_id) == (
        1500, "EUR", "c:9", shop.lane_id,
    )  # fmt: skip


async def test_a_till_sale_and_refund_once_each(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    outcomes = [
        (await send_square(app_client, till, SQUARE_PAYMENT)).json()["outcome"] for _ in range(2)
    ]
    assert outcomes == ["sale_recorded", "duplicate"]
    for _ in range(2):
        await send_square(app_client, till, SQUARE_REFUND)
    rows = await logged(ctx, tenant.org_id)
    sale = (await app_client.get("/api/v1/pos/sales", headers=tenant.headers)).json()[0]
    common = {
        "channel": "", "event_id": till.event_id, "partner_id": till.partner_id,
        "lane_id": None, "label": "square", "subject": f"pos_sale:{sale['id']}",
        "value": 100, "currency": "USD",
    }  # fmt: skip
    assert [tags(r) for r in rows] == [
        {**common, "kind": "pos_sale"},
        {**common, "kind": "pos_refund"},
    ]


async def test_a_sample_with_its_cost_and_partner(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop, product_id, _ = await sample_shop(app_client, tenant, clock)
    partner = await post(
        app_client, tenant, f"/api/v1/events/{shop.event_id}/partners", {"name": "Bakery"}
    )
    given = await app_client.post(
        "/api/v1/samples",
        json=give(shop, product_id, "ann@example.test", allocated_to=f"partner:{partner['id']}",
                  drop_id=7, segment="hot"),
        headers=tenant.headers,
    )  # fmt: skip
    assert given.status_code == 201, given.text
    [row] = await logged(ctx, tenant.org_id, "sample_given")
    assert tags(row) == {
        "kind": "sample_given", "channel": "", "event_id": shop.event_id,
        "partner_id": partner["id"], "lane_id": shop.lane_id, "label": "",
        "subject": f"sample:{given.json()['id']}", "value": 250, "currency": "EUR",
    }  # fmt: skip
    assert (row.drop_id, row.segment) == (7, "hot")
    assert row.person == log.person_of_point(ctx.signer, "ann@example.test", None)


async def test_erase_blanks_the_person_and_keeps_the_counts(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    contact = await add_contact(app_client, tenant, email="erase.me@example.com")
    event_id, slot_id = await make_slot(ctx, tenant, capacity=5)
    assert (await rsvp(app_client, event_id, slot_id, email="erase.me@example.com")).is_success
    assert (await rsvp(app_client, event_id, slot_id, email="stays@example.com")).is_success
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    await hold(app_client, tenant, shop, contact_ref=f"contact:{contact['id']}")
    await hold(app_client, tenant, shop, contact_ref="contact:999999")
    before = await logged(ctx, tenant.org_id)
    mine = {f"c:{contact['id']}", log.person_of_point(ctx.signer, "erase.me@example.com", None)}
    assert sum(r.person in mine for r in before) == 2

    erased = await app_client.post(
        f"/api/v1/contacts/{contact['id']}/erase", headers=tenant.headers
    )
    assert erased.status_code == 200, erased.text
    assert erased.json()["scrubbed"]["funnel_events"] == 2
    after = await logged(ctx, tenant.org_id)
    assert [(r.id, r.kind) for r in after] == [(r.id, r.kind) for r in before]
    assert [r.person for r in after] == [None if r.person in mine else r.person for r in before]
    assert log.person_of_point(ctx.signer, "stays@example.com", None) in {r.person for r in after}


async def test_retention_deletes_old_log_rows_and_keeps_the_rollups(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    start = clock.now()
    shop = await make_shop(app_client, tenant, start, units=5)
    for _ in range(3):
        await hold(app_client, tenant, shop)
    await rollups.fold_pending(ctx.db)
    clock.set(start + timedelta(days=400))
    await hold(app_client, tenant, shop)  # recent: kept
    await app_client.put(
        "/api/v1/audience/settings",
        json={"hot_days": 7, "warm_days": 60, "retention_months": 12},
        headers=tenant.headers,
    )
    purged = await app_client.post("/api/v1/contacts/purge", json={}, headers=tenant.headers)
    assert purged.status_code == 200, purged.text
    assert purged.json()["funnel_events_deleted"] == 3
    [kept] = await logged(ctx, tenant.org_id)
    assert kept.at == clock.now()
    async with ctx.db.reader() as session:
        counted = await session.scalar(
            select(func.sum(FunnelRollup.n)).where(
                FunnelRollup.org_id == tenant.org_id, FunnelRollup.grain == 1
            )
        )
    assert counted == 3  # the old holds still count in the rollups


async def test_a_sale_by_a_partners_code_names_the_partner(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    partner = await post(
        app_client, tenant, f"/api/v1/events/{shop.event_id}/partners", {"name": "Bakery"}
    )
    promo = await post(
        app_client,
        tenant,
        "/api/v1/promo-codes",
        {"label": "Bakery counter", "event_id": shop.event_id, "partner_id": partner["id"]},
    )
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], codes=[promo["code"]]
    )
    paid = await app_client.post(
        f"/api/v1/orders/{order['id']}/mark-paid", json={"tender": "cash"}, headers=tenant.headers
    )
    assert paid.status_code == 200, paid.text
    rows = [r for r in await logged(ctx, tenant.org_id) if r.subject == f"order:{order['id']}"]
    assert [(r.kind, r.partner_id, r.value) for r in rows] == [
        ("checkout_started", partner["id"], order["total_minor"]),
        ("order_paid", partner["id"], order["total_minor"]),
    ]
