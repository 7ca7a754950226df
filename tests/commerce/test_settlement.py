"""Orders paid through the Stripe sandbox, its webhooks posted to the app: paid with units
sold, failures stored with the provider's code, duplicates applied once, events out of
order, late payments (units taken again, or refunded automatically), refunds, pay at
pickup; a single-use code never spent twice by a late payment (kept while the payment
may come, given back when it cannot)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from popdrop.commerce import settlement
from popdrop.commerce.stripe_sandbox import StripeSandbox
from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.outbound.outbox import Notification
from popdrop.vouchers.models import Redemption
from popdrop.web.context import AppContext
from tests.commerce.helpers import (
    WEBHOOK,
    deliver,
    get_order,
    hold,
    make_shop,
    place,
    placed,
    sandbox_settings,
    start_payment,
    stock_row,
)
from tests.conftest import Tenant, issue
from tests.events.helpers import post


@pytest.fixture
async def sandbox(clock: FrozenClock) -> AsyncIterator[StripeSandbox]:
    box = StripeSandbox(clock=clock, retry_delays=())  # no webhook URL: tests deliver
    async with box.serving():
        yield box


@pytest.fixture
def settings(database_url: str, tmp_path: Path, sandbox: StripeSandbox) -> Settings:
    return sandbox_settings(database_url, tmp_path, sandbox)


async def receipts_of(ctx: AppContext, order_id: int) -> list[str]:
    async with ctx.db.reader() as session:
        return list(
            await session.scalars(
                select(Notification.channel).where(
                    Notification.kind == "order_receipt",
                    Notification.subject == f"order:{order_id}",
                )
            )
        )


async def test_pay_online_sells_the_units_once(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    sandbox: StripeSandbox,
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    hold_id = await hold(app_client, tenant, shop, qty=2)
    order = await placed(
        app_client, tenant, [hold_id], payment_method="stripe", receipt_email="ann@example.com"
    )
    assert (order["status"], order["total_minor"]) == ("pending", 3000)
    assert len(order["short_code"]) == 11  # K7QM-4XT2-9
    assert await receipts_of(ctx, order["id"]) == []  # not paid yet
    session_id, started = await start_payment(app_client, tenant, order["id"])
    assert started["redirect_url"].startswith(sandbox.base_url or "")

    events = await sandbox.pay(session_id)
    answers = await deliver(app_client, sandbox, events)
    assert answers[0]["outcome"] == "paid"
    paid = await get_order(app_client, tenant, order["id"])
    assert paid["status"] == "paid" and paid["paid_at"]
    assert paid["payments"][0]["status"] == "succeeded"
    assert paid["payments"][0]["payment_intent"].startswith("pi_")
    assert await receipts_of(ctx, order["id"]) == ["email"]  # queued with the payment
    assert await stock_row(app_client, tenant, shop) == {
        "total": 5, "held": 0, "sold": 2, "available": 3,
    }  # fmt: skip

    # Stripe retries: the same events again change nothing.
    again = await deliver(app_client, sandbox, events)
    assert {a["outcome"] for a in again} == {"duplicate"}
    assert (await stock_row(app_client, tenant, shop))["sold"] == 2

    # A partial refund goes through the provider and keeps the order paid.
    refunded = await app_client.post(
        f"/api/v1/orders/{order['id']}/refunds",
        json={"amount_minor": 1000, "reason": "damaged"},
        headers={**tenant.headers, "Idempotency-Key": "refund-1"},
    )
    assert refunded.status_code == 200, refunded.text
    body = refunded.json()
    assert (body["status"], body["refunded_minor"]) == ("paid", 1000)
    assert body["refunds"][0]["provider_ref"].startswith("re_")
    assert body["refunds"][0]["status"] == "succeeded"
    assert [r["amount"] for r in sandbox.refunds.values()] == [1000]


async def test_a_declined_card_is_stored_with_its_code_and_can_be_retried(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, sandbox: StripeSandbox
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], payment_method="stripe"
    )
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    await deliver(app_client, sandbox, await sandbox.decline(session_id))
    failed = await get_order(app_client, tenant, order["id"])
    assert failed["status"] == "pending"
    payment = failed["payments"][0]
    assert payment["status"] == "failed"
    assert payment["failure_code"] == "card_declined"
    assert "insufficient" in (payment["failure_message"] or "")

    second, _ = await start_payment(app_client, tenant, order["id"])
    assert second != session_id
    await deliver(app_client, sandbox, await sandbox.pay(second))
    assert (await get_order(app_client, tenant, order["id"]))["status"] == "paid"


async def test_events_out_of_order_end_in_the_right_state(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, sandbox: StripeSandbox
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], payment_method="stripe"
    )
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    declined = await sandbox.decline(session_id)
    succeeded = await sandbox.pay(session_id)
    # Success first, then the older failure: the failure must not undo the payment.
    answers = await deliver(app_client, sandbox, [*reversed(succeeded), *declined])
    assert answers[0]["outcome"] == "paid"
    assert answers[-1]["outcome"].startswith("ignored_failed")
    final = await get_order(app_client, tenant, order["id"])
    assert final["status"] == "paid"
    assert final["payments"][0]["status"] == "succeeded"
    assert (await stock_row(app_client, tenant, shop))["sold"] == 1


async def test_bad_signatures_and_old_timestamps_are_refused(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, sandbox: StripeSandbox
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], payment_method="stripe"
    )
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    [event, *_] = await sandbox.pay(session_id)
    forged = await app_client.post(
        WEBHOOK,
        content=event.body.replace(b'"paid"', b'"unpaid"'),
        headers={"Stripe-Signature": sandbox.sign(event.body)},
    )
    assert (forged.status_code, forged.json()["reason"]) == (400, "bad_signature")
    unsigned = await app_client.post(WEBHOOK, content=event.body)
    assert unsigned.status_code == 400
    old = int(clock.now().timestamp()) - 301
    stale = await app_client.post(
        WEBHOOK, content=event.body, headers={"Stripe-Signature": sandbox.sign(event.body, old)}
    )
    assert (stale.status_code, stale.json()["reason"]) == (400, "timestamp_outside_tolerance")
    assert (await get_order(app_client, tenant, order["id"]))["status"] == "pending"
    # The genuine delivery still works afterwards (nothing was recorded for the refusals).
    assert (await deliver(app_client, sandbox, [event]))[0]["outcome"] == "paid"


async def test_a_late_payment_takes_the_units_again_when_they_are_there(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    sandbox: StripeSandbox,
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=2)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], payment_method="stripe"
    )
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    clock.advance(timedelta(seconds=601))  # past the hold's TTL
    assert await settlement.expire_due(ctx.db, clock.now()) >= 1  # ours, maybe others'
    assert (await get_order(app_client, tenant, order["id"]))["status"] == "expired"
    assert (await stock_row(app_client, tenant, shop))["held"] == 0

    await deliver(app_client, sandbox, await sandbox.pay(session_id))
    late = await get_order(app_client, tenant, order["id"])
    assert (late["status"], late["status_reason"]) == ("paid", "paid_after_expired")
    assert await stock_row(app_client, tenant, shop) == {
        "total": 2, "held": 0, "sold": 1, "available": 1,
    }  # fmt: skip


async def test_a_late_payment_after_a_sell_out_is_refunded_through_the_provider(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, sandbox: StripeSandbox
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=1)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], payment_method="stripe"
    )
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    clock.advance(timedelta(seconds=601))
    # Someone else takes the only unit (their hold gives the expired one back first).
    await hold(app_client, tenant, shop)

    answers = await deliver(app_client, sandbox, await sandbox.pay(session_id))
    assert answers[0]["outcome"] == "refunded_sold_out"
    final = await get_order(app_client, tenant, order["id"])
    assert final["status"] == "refunded"
    assert final["status_reason"] == "sold_out_after_expiry"
    assert "refunded" in final["status_message"]
    assert final["refunded_minor"] == final["total_minor"] == 1500
    [refund] = final["refunds"]
    assert refund["status"] == "succeeded" and refund["provider_ref"].startswith("re_")
    assert [r["amount"] for r in sandbox.refunds.values()] == [1500]
    assert await stock_row(app_client, tenant, shop) == {
        "total": 1,
        "held": 1,
        "sold": 0,
        "available": 0,
    }  # fmt: skip  (never oversold: the other buyer keeps the unit)


async def test_pay_at_pickup_keeps_the_units_until_the_window_and_staff_take_the_money(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3, window=5)
    hold_id = await hold(app_client, tenant, shop, with_slot=True)
    order = await placed(app_client, tenant, [hold_id], payment_method="pay_at_pickup")
    assert order["status"] == "pending"
    clock.advance(timedelta(hours=2))  # far past the hold's TTL, before the slot ends
    assert (await stock_row(app_client, tenant, shop))["held"] == 1

    paid = await app_client.post(
        f"/api/v1/orders/{order['id']}/mark-paid",
        json={"tender": "cash"},
        headers={**tenant.headers, "Idempotency-Key": "lane-1"},
    )
    assert paid.status_code == 200, paid.text
    assert paid.json()["status"] == "paid"
    assert paid.json()["payments"][0]["tender"] == "cash"
    replay = await app_client.post(
        f"/api/v1/orders/{order['id']}/mark-paid",
        json={"tender": "cash"},
        headers={**tenant.headers, "Idempotency-Key": "lane-1"},
    )
    assert replay.status_code == 200 and len(replay.json()["payments"]) == 1
    twice = await app_client.post(
        f"/api/v1/orders/{order['id']}/mark-paid", json={"tender": "cash"}, headers=tenant.headers
    )
    assert (twice.status_code, twice.json()["reason"]) == (409, "invalid_transition")
    assert (await stock_row(app_client, tenant, shop))["sold"] == 1

    # Cash back: a partial refund, then the rest; the unit goes back on sale.
    part = await app_client.post(
        f"/api/v1/orders/{order['id']}/refunds", json={"amount_minor": 500}, headers=tenant.headers
    )
    assert (part.json()["status"], part.json()["refunded_minor"]) == ("paid", 500)
    too_much = await app_client.post(
        f"/api/v1/orders/{order['id']}/refunds", json={"amount_minor": 5000}, headers=tenant.headers
    )
    assert too_much.status_code == 422
    rest = await app_client.post(
        f"/api/v1/orders/{order['id']}/refunds", json={}, headers=tenant.headers
    )
    body = rest.json()
    assert (body["status"], body["refunded_minor"]) == ("refunded", 1500)
    assert [r["status"] for r in body["refunds"]] == ["succeeded", "succeeded"]
    assert await stock_row(app_client, tenant, shop) == {
        "total": 3, "held": 0, "sold": 0, "available": 3,
    }  # fmt: skip


async def test_a_second_payment_for_a_paid_order_is_sent_back(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, sandbox: StripeSandbox
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], payment_method="stripe"
    )
    # Two tabs: two Checkout Sessions, and the customer pays in both.
    first, _ = await start_payment(app_client, tenant, order["id"])
    second, _ = await start_payment(app_client, tenant, order["id"])
    assert first != second
    await deliver(app_client, sandbox, await sandbox.pay(first))
    answers = await deliver(app_client, sandbox, await sandbox.pay(second))
    assert answers[0]["outcome"] == "refunded_duplicate_payment"
    final = await get_order(app_client, tenant, order["id"])
    assert (final["status"], final["refunded_minor"]) == ("paid", 0)
    assert [p["status"] for p in final["payments"]] == ["succeeded", "succeeded"]
    [refund] = final["refunds"]
    assert (refund["reason"], refund["status"], refund["amount_minor"]) == (
        "duplicate_payment", "succeeded", 1500,
    )  # fmt: skip
    assert refund["payment_id"] == final["payments"][1]["id"]
    assert (await stock_row(app_client, tenant, shop))["sold"] == 1


async def test_a_late_payment_needs_its_pickup_window_too(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    sandbox: StripeSandbox,
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5, window=1)
    order = await placed(
        app_client,
        tenant,
        [await hold(app_client, tenant, shop, with_slot=True)],
        payment_method="stripe",
    )
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    clock.advance(timedelta(seconds=601))
    assert await settlement.expire_due(ctx.db, clock.now()) >= 1  # ours, maybe others'
    await hold(app_client, tenant, shop, with_slot=True)  # the window's one place, taken
    answers = await deliver(app_client, sandbox, await sandbox.pay(session_id))
    assert answers[0]["outcome"] == "refunded_sold_out"  # units left, but no place to hand out
    assert await stock_row(app_client, tenant, shop) == {
        "total": 5, "held": 1, "sold": 0, "available": 4,
    }  # fmt: skip


# ---------------------------------------------------------------- a code is spent once


async def code_status(client: httpx.AsyncClient, tenant: Tenant, code: str) -> str:
    response = await client.post(
        "/api/v1/vouchers/validate", json={"code": code}, headers=tenant.headers
    )
    body = response.json()
    return str(body.get("status") or body.get("reason"))


async def live_uses(ctx: AppContext, batch_id: int) -> int:
    """The uses of a batch's codes counted now (redemptions not given back)."""
    async with ctx.db.reader() as session:
        return int(
            await session.scalar(
                select(func.count(Redemption.id)).where(
                    Redemption.batch_id == batch_id, Redemption.rolled_back_at.is_(None)
                )
            )
            or 0
        )


async def test_a_code_stays_spent_while_a_late_payment_may_still_come(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    sandbox: StripeSandbox,
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    batch, [code] = await issue(app_client, tenant, discount_kind="percent", discount_value=10)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], codes=[code],
        payment_method="stripe",
    )  # fmt: skip
    assert order["total_minor"] == 1350
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    clock.advance(timedelta(seconds=601))  # past the hold, well within the session
    assert await settlement.expire_due(ctx.db, clock.now()) >= 1
    assert (await get_order(app_client, tenant, order["id"]))["status"] == "expired"
    assert (await stock_row(app_client, tenant, shop))["held"] == 0  # the units go back

    # The customer may still pay at 10 % off: nobody else gets the single-use code.
    assert await code_status(app_client, tenant, code) == "exhausted"
    other_hold = await hold(app_client, tenant, shop)
    refused = await place(app_client, tenant, [other_hold], codes=[code], payment_method="stripe")
    assert (refused.status_code, refused.json()["reason"]) == (409, "exhausted")

    await deliver(app_client, sandbox, await sandbox.pay(session_id))
    late = await get_order(app_client, tenant, order["id"])
    assert (late["status"], late["status_reason"]) == ("paid", "paid_after_expired")
    assert late["total_minor"] == 1350 and late["refunds"] == []
    assert await live_uses(ctx, batch["id"]) == 1  # the code counted once
    assert await code_status(app_client, tenant, code) == "exhausted"
    assert (await stock_row(app_client, tenant, shop))["sold"] == 1


async def test_the_session_expired_event_gives_the_code_to_the_next_customer(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    sandbox: StripeSandbox,
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    batch, [code] = await issue(app_client, tenant, discount_kind="percent", discount_value=10)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], codes=[code],
        payment_method="stripe",
    )  # fmt: skip
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    clock.advance(timedelta(seconds=601))
    assert await settlement.expire_due(ctx.db, clock.now()) >= 1
    assert await code_status(app_client, tenant, code) == "exhausted"

    # Stripe says the page can no longer be paid: the code is free again.
    [answer] = await deliver(app_client, sandbox, [await sandbox.expire(session_id)])
    assert answer["outcome"] == "payment_canceled_discount_released"
    ended = await get_order(app_client, tenant, order["id"])
    assert ended["status"] == "expired"
    assert ended["payments"][0]["status"] == "canceled"
    assert await code_status(app_client, tenant, code) == "valid"
    assert await live_uses(ctx, batch["id"]) == 0
    nxt = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], codes=[code],
        payment_method="stripe",
    )  # fmt: skip
    assert nxt["total_minor"] == 1350
    assert await live_uses(ctx, batch["id"]) == 1


async def test_the_tick_gives_the_code_back_once_the_session_has_lapsed(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    sandbox: StripeSandbox,
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    _, [code] = await issue(app_client, tenant, discount_kind="percent", discount_value=10)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], codes=[code],
        payment_method="stripe",
    )  # fmt: skip
    started = clock.now()
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    # The page stops taking money soon after the hold (Stripe's minimum: 30 minutes).
    session_end = started + settlement.SESSION_MIN
    assert sandbox.sessions[session_id]["expires_at"] == int(session_end.timestamp())
    clock.advance(timedelta(seconds=601))
    assert await settlement.expire_due(ctx.db, clock.now()) >= 1

    # No expired event arrives (a lost webhook): the tick decides from the session's end.
    clock.advance(session_end - clock.now())  # ended, but a completion may be in flight
    await settlement.release_lapsed_payments(ctx.db, clock.now())  # the sweep is global
    assert await code_status(app_client, tenant, code) == "exhausted"
    clock.advance(settlement.LAPSE_GRACE)
    assert await settlement.release_lapsed_payments(ctx.db, clock.now()) >= 1
    assert await settlement.release_lapsed_payments(ctx.db, clock.now()) == 0  # once
    assert await code_status(app_client, tenant, code) == "valid"
    lapsed = await get_order(app_client, tenant, order["id"])
    assert lapsed["status"] == "expired" and lapsed["payments"][0]["status"] == "canceled"


async def test_a_payment_after_the_code_was_given_back_is_refunded_not_sold_cheap(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    sandbox: StripeSandbox,
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    batch, [code] = await issue(app_client, tenant, discount_kind="percent", discount_value=10)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], codes=[code],
        payment_method="stripe",
    )  # fmt: skip
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    cancelled = await app_client.post(
        f"/api/v1/orders/{order['id']}/cancel", json={}, headers=tenant.headers
    )
    assert cancelled.status_code == 200, cancelled.text
    # The code is given back at once and someone else uses it.
    other = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], codes=[code],
        payment_method="stripe",
    )  # fmt: skip
    assert other["discount_minor"] == 150

    # The first customer still pays in the tab left open: not at the code's price.
    answers = await deliver(app_client, sandbox, await sandbox.pay(session_id))
    assert answers[0]["outcome"] == "refunded_discount_released"
    final = await get_order(app_client, tenant, order["id"])
    assert (final["status"], final["status_reason"]) == ("refunded", "discount_released")
    assert "discount" in final["status_message"] and "refunded" in final["status_message"]
    assert final["refunded_minor"] == 1350
    [refund] = final["refunds"]
    assert refund["status"] == "succeeded" and refund["provider_ref"].startswith("re_")
    assert [r["amount"] for r in sandbox.refunds.values()] == [1350]
    assert await live_uses(ctx, batch["id"]) == 1  # the other customer's use only
    assert await stock_row(app_client, tenant, shop) == {
        "total": 5,
        "held": 1,
        "sold": 0,
        "available": 4,
    }  # fmt: skip  (nothing sold to the refunded order)


async def test_a_rule_budget_stays_spent_while_a_late_payment_may_come(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    sandbox: StripeSandbox,
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=10)
    rule = await post(
        app_client, tenant, f"/api/v1/events/{shop.event_id}/price-rules",
        {"name": "Two or more", "kind": "min_quantity",
         "params": {"min_qty": 2, "percent": 10}, "budget_minor": 300},
    )  # fmt: skip
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop, qty=2)],
        payment_method="stripe",
    )  # fmt: skip
    assert order["breakdown"]["rule_spend"] == {str(rule["id"]): 300}
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    clock.advance(timedelta(seconds=601))
    assert await settlement.expire_due(ctx.db, clock.now()) >= 1
    # The budget is not handed to the next buyer while the first may still pay.
    nxt = await placed(app_client, tenant, [await hold(app_client, tenant, shop, qty=2)])
    assert nxt["discount_minor"] == 0

    await deliver(app_client, sandbox, await sandbox.pay(session_id))
    late = await get_order(app_client, tenant, order["id"])
    assert (late["status"], late["total_minor"]) == ("paid", 2700)
    rules = await app_client.get(
        f"/api/v1/events/{shop.event_id}/price-rules", headers=tenant.headers
    )
    assert rules.json()[0]["budget_spent_minor"] == 300  # never more than its budget


async def test_a_late_payment_after_a_sell_out_gives_the_kept_code_back(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    sandbox: StripeSandbox,
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=1)
    batch, [code] = await issue(app_client, tenant, discount_kind="percent", discount_value=10)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], codes=[code],
        payment_method="stripe",
    )  # fmt: skip
    session_id, _ = await start_payment(app_client, tenant, order["id"])
    clock.advance(timedelta(seconds=601))
    assert await settlement.expire_due(ctx.db, clock.now()) >= 1
    await hold(app_client, tenant, shop)  # someone else takes the only unit
    assert await code_status(app_client, tenant, code) == "exhausted"  # still kept

    answers = await deliver(app_client, sandbox, await sandbox.pay(session_id))
    assert answers[0]["outcome"] == "refunded_sold_out"
    final = await get_order(app_client, tenant, order["id"])
    assert (final["status"], final["refunded_minor"]) == ("refunded", 1350)
    # No payment can come any more: the code is free for the next customer.
    assert await code_status(app_client, tenant, code) == "valid"
    assert await live_uses(ctx, batch["id"]) == 0
