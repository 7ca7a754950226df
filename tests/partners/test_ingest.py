"""POS deliveries through the real app: each provider's documented example → the right
sale; bad signatures refused with a reason; replays applied once; refunds reverse the
sale, in any order; attribution told in the same transaction."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import func, select

from popdrop.core.clock import FrozenClock
from popdrop.partners.models import PosEvent, PosRefund, PosSale
from popdrop.web.context import AppContext
from tests.conftest import Tenant
from tests.partners.helpers import (
    SHOPIFY_ORDER,
    SHOPIFY_REFUND,
    SQUARE_PAYMENT,
    SQUARE_REFUND,
    make_till,
    send_shopify,
    send_square,
    send_standard,
    square_event,
    standard_sale,
)

Calls = list[tuple[str, dict[str, Any]]]


async def sales(client: httpx.AsyncClient, tenant: Tenant) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/pos/sales", headers=tenant.headers)
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


async def count(ctx: AppContext, model: Any, org_id: int) -> int:
    async with ctx.db.reader() as session:
        return int(await session.scalar(select(func.count()).where(model.org_id == org_id)) or 0)


async def test_square_payment_example_becomes_one_sale_attributed(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, attribution_calls: Calls
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    response = await send_square(app_client, till, SQUARE_PAYMENT)
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "sale_recorded"
    [sale] = await sales(app_client, tenant)
    assert sale["provider"] == "square"
    assert sale["external_id"] == "KkAkhdMsgzn59SM8A89WgKwekxLZY"
    assert (sale["currency"], sale["total_minor"], sale["status"]) == ("USD", 100, "active")
    assert sale["payment_methods"] == ["card"]
    assert sale["partner_id"] == till.partner_id and sale["event_id"] == till.event_id
    [(what, call)] = attribution_calls
    assert what == "attribute"
    assert call["sale_kind"] == "pos_sale" and call["sale_id"] == sale["id"]
    assert call["amount_minor"] == 100 and call["event_id"] == till.event_id


async def test_shopify_order_example_keeps_lines_totals_and_codes(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, attribution_calls: Calls
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    response = await send_shopify(app_client, till, "orders/create", "e-1", SHOPIFY_ORDER)
    assert response.status_code == 200, response.text
    [sale] = await sales(app_client, tenant)
    assert sale["external_id"] == "820982911946154508"
    assert (sale["subtotal_minor"], sale["discount_minor"], sale["tax_minor"]) == (
        39800,
        1000,
        1500,
    )
    assert sale["total_minor"] == 40300 and sale["code_count"] == 1
    assert sale["lines"] == [
        {"sku": "IPOD2008PINK", "quantity": 1, "unit_price_minor": 19900, "discount_minor": 0},
        {"sku": "IPOD2008PINK", "quantity": 1, "unit_price_minor": 19900, "discount_minor": 1000},
    ]
    [(_, call)] = attribution_calls
    assert list(call["codes"]) == ["SPRING-DROP"]
    # orders/paid for the same order: one sale, not two.
    again = await send_shopify(app_client, till, "orders/paid", "e-2", SHOPIFY_ORDER)
    assert again.json()["outcome"] == "sale_already_recorded"
    assert len(await sales(app_client, tenant)) == 1


async def test_standard_webhook_sale(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    response = await send_standard(app_client, till, standard_sale(), clock.now())
    assert response.status_code == 200, response.text
    [sale] = await sales(app_client, tenant)
    assert (sale["provider"], sale["location"], sale["total_minor"]) == (
        "lightspeed",
        "loc-1",
        6000,
    )
    assert [line["sku"] for line in sale["lines"]] == ["TEE-M", "CAP"]


async def test_bad_signatures_are_refused_with_a_reason_and_write_nothing(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    now = clock.now()
    refusals = [
        await send_square(app_client, till, SQUARE_PAYMENT, key="not-the-key"),
        await send_shopify(app_client, till, "orders/create", "e-1", SHOPIFY_ORDER, secret="wrong"),
        await send_standard(app_client, till, standard_sale(), now, secret="whsec_" + "QUJD" * 8),
        await app_client.post(f"/pos/square/{till.square}", json=SQUARE_PAYMENT),
    ]
    assert [(r.status_code, r.json()["reason"]) for r in refusals] == [
        (401, "bad_signature"),
        (401, "bad_signature"),
        (401, "bad_signature"),
        (401, "missing_signature"),
    ]
    stale = [
        await send_standard(
            app_client, till, standard_sale(), now, timestamp=int(now.timestamp()) - 301
        ),
        await send_standard(
            app_client, till, standard_sale(), now, timestamp=int(now.timestamp()) + 301
        ),
    ]
    assert [(r.status_code, r.json()["reason"]) for r in stale] == [(401, "stale_timestamp")] * 2
    # A signature over a different URL (Square signs URL + body) is refused too.
    other = await app_client.post(
        f"/pos/square/{till.square}",
        content=b"{}",
        headers={"x-square-hmacsha256-signature": "AAAA"},
    )
    assert other.json()["reason"] == "bad_signature"
    assert await count(ctx, PosSale, tenant.org_id) == 0
    assert await count(ctx, PosEvent, tenant.org_id) == 0


async def test_malformed_but_signed_is_422_with_reason(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    broken = standard_sale(totals={"total_minor": -5, "subtotal_minor": 1})
    response = await send_standard(app_client, till, broken, clock.now())
    assert response.status_code == 422
    assert response.json()["reason"] == "malformed"
    assert "totals.total_minor" in response.json()["fields"]
    refund_without_sale = standard_sale(kind="refund")
    response = await send_standard(app_client, till, refund_without_sale, clock.now())
    assert response.status_code == 422
    assert await count(ctx, PosEvent, tenant.org_id) == 0


async def test_a_replay_is_applied_once(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext,
    attribution_calls: Calls,
) -> None:  # fmt: skip
    till = await make_till(app_client, tenant, clock.now())
    outcomes = [
        (await send_square(app_client, till, SQUARE_PAYMENT)).json()["outcome"] for _ in range(3)
    ]
    assert outcomes == ["sale_recorded", "duplicate", "duplicate"]
    assert await count(ctx, PosSale, tenant.org_id) == 1
    assert len(attribution_calls) == 1
    # The same Standard Webhooks event delivered twice (a retry after a timeout).
    for _ in range(2):
        assert (
            await send_standard(app_client, till, standard_sale(), clock.now())
        ).status_code == 200
    assert await count(ctx, PosSale, tenant.org_id) == 2


async def test_square_refund_reverses_the_sale(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, attribution_calls: Calls
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    await send_square(app_client, till, SQUARE_PAYMENT)
    response = await send_square(app_client, till, SQUARE_REFUND)
    assert response.json()["outcome"] == "refund_applied"
    [sale] = await sales(app_client, tenant)
    assert (sale["status"], sale["refunded_minor"]) == ("reversed", 100)
    assert attribution_calls[-1] == (
        "reverse",
        {
            "org_id": tenant.org_id,
            "sale_kind": "pos_sale",
            "sale_id": sale["id"],
            "amount_minor": 100,
        },
    )
    # refund.updated for the same refund: nothing more is taken back.
    updated = square_event(SQUARE_REFUND, type="refund.updated", event_id="refund-upd-1")
    assert (await send_square(app_client, till, updated)).json()[
        "outcome"
    ] == "refund_already_recorded"
    assert [c for c, _ in attribution_calls].count("reverse") == 1


async def test_shopify_partial_then_full_refund(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    await send_shopify(app_client, till, "orders/create", "e-1", SHOPIFY_ORDER)
    await send_shopify(app_client, till, "refunds/create", "e-2", SHOPIFY_REFUND)
    [sale] = await sales(app_client, tenant)
    assert (sale["status"], sale["refunded_minor"]) == ("partially_refunded", 10000)
    rest = {
        **SHOPIFY_REFUND,
        "id": 890088186047892320,
        "transactions": [{**SHOPIFY_REFUND["transactions"][0], "amount": "303.00"}],
    }
    await send_shopify(app_client, till, "refunds/create", "e-3", rest)
    [sale] = await sales(app_client, tenant)
    assert (sale["status"], sale["refunded_minor"]) == ("reversed", 40300)


async def test_out_of_order_refund_before_sale_and_update_before_create(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext,
    attribution_calls: Calls,
) -> None:  # fmt: skip
    till = await make_till(app_client, tenant, clock.now())
    early = await send_square(app_client, till, SQUARE_REFUND)
    assert early.json()["outcome"] == "refund_waiting"
    assert await sales(app_client, tenant) == []
    updated = square_event(SQUARE_PAYMENT, type="payment.updated", event_id="upd-1")
    assert (await send_square(app_client, till, updated)).json()[
        "outcome"
    ] == "sale_recorded+refunds"
    created = await send_square(app_client, till, SQUARE_PAYMENT)  # the late create
    assert created.json()["outcome"] == "sale_already_recorded"
    [sale] = await sales(app_client, tenant)
    assert (sale["status"], sale["refunded_minor"]) == ("reversed", 100)
    assert [c for c, _ in attribution_calls] == ["attribute", "reverse"]
    async with ctx.db.reader() as session:
        refund = await session.scalar(select(PosRefund).where(PosRefund.org_id == tenant.org_id))
    assert refund is not None and refund.sale_id == sale["id"]


async def test_payment_not_completed_is_ignored_then_completed_counts(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    approved = square_event(SQUARE_PAYMENT, status="APPROVED", event_id="ev-approved")
    response = await send_square(app_client, till, approved)
    assert response.json()["outcome"] == "ignored:payment_not_completed"
    assert await sales(app_client, tenant) == []
    done = square_event(SQUARE_PAYMENT, type="payment.updated", event_id="ev-completed")
    assert (await send_square(app_client, till, done)).json()["outcome"] == "sale_recorded"


async def test_secret_rotation_keeps_the_previous_secret_until_the_next(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    old = till.standard_secret
    url = f"/api/v1/pos/connections/{till.standard}/secrets"
    first = (await app_client.post(url, json={}, headers=tenant.headers)).json()
    assert first["connection"]["secrets"] == 2
    new = first["secret"]
    now = clock.now()
    for n, secret in enumerate((old, new)):
        sale = standard_sale(external_id=f"R-{n}", event_id=f"rot-{n}")
        assert (await send_standard(app_client, till, sale, now, secret=secret)).status_code == 200
    await app_client.post(url, json={}, headers=tenant.headers)  # again: the oldest goes
    late = standard_sale(external_id="R-9", event_id="rot-9")
    refused = await send_standard(app_client, till, late, now, secret=old)
    assert refused.json()["reason"] == "bad_signature"


async def test_a_disabled_connection_answers_not_found(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    response = await app_client.post(
        f"/api/v1/pos/connections/{till.square}/disable", headers=tenant.headers
    )
    assert response.status_code == 200 and response.json()["disabled_at"]
    assert (await send_square(app_client, till, SQUARE_PAYMENT)).status_code == 404


async def test_the_clock_decides_staleness(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    signed_at = clock.now()
    clock.advance(timedelta(minutes=4))
    ok = await send_standard(
        app_client, till, standard_sale(), clock.now(), timestamp=int(signed_at.timestamp())
    )
    assert ok.status_code == 200
    clock.advance(timedelta(minutes=2))
    late = standard_sale(event_id="late-1", external_id="L-1")
    stale = await send_standard(
        app_client, till, late, clock.now(), timestamp=int(signed_at.timestamp())
    )
    assert stale.json()["reason"] == "stale_timestamp"


async def test_an_unstorable_event_id_is_malformed_even_when_ignored(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    odd = square_event(SQUARE_PAYMENT, status="PENDING", event_id="x" * 201)
    response = await send_square(app_client, till, odd)
    assert (response.status_code, response.json()["reason"]) == (422, "malformed")
    topic = await send_shopify(app_client, till, "orders/create", "a b", SHOPIFY_ORDER)
    assert (topic.status_code, topic.json()["reason"]) == (422, "malformed")
