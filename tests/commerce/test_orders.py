"""Orders from holds: the quote (nothing consumed), placing (codes redeemed in the order's
transaction, rule budgets spent, bundles priced), the refusals a customer can act on,
cancel / refund / expiry giving units, codes and budgets back, free orders paid at once,
what a partner sees, the CSV export and the sales summary."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import update

from popdrop.accounts.service import ROLES, Principal
from popdrop.commerce import orders, settlement
from popdrop.core.clock import FrozenClock
from popdrop.core.errors import PopdropError
from popdrop.inventory.models import Product
from popdrop.web.context import AppContext
from tests.commerce.helpers import get_order, hold, make_shop, place, placed, stock_row
from tests.conftest import Tenant, issue
from tests.events.helpers import post


async def code_status(client: httpx.AsyncClient, tenant: Tenant, code: str) -> str:
    response = await client.post(
        "/api/v1/vouchers/validate", json={"code": code}, headers=tenant.headers
    )
    body: dict[str, Any] = response.json()
    return str(body.get("status") or body.get("reason"))


async def test_a_quote_prices_codes_and_consumes_nothing(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=10)
    hold_id = await hold(app_client, tenant, shop, qty=2)
    _, [code] = await issue(app_client, tenant, discount_kind="percent", discount_value=10)
    response = await app_client.post(
        "/api/v1/orders/quote",
        json={"hold_ids": [hold_id], "codes": [code, "ZZZZ-ZZZZ-ZZZZ"]},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    quote = response.json()
    breakdown = quote["breakdown"]
    assert (breakdown["subtotal_minor"], breakdown["discount_minor"]) == (3000, 300)
    assert breakdown["total_minor"] == 2700
    [line] = breakdown["lines"]
    [adjustment] = line["adjustments"]
    assert adjustment["source"] == "code" and adjustment["amount_minor"] == 300
    assert adjustment["why"]  # every discount says why it applies
    assert [(r["ref"], r["reason"]) for r in quote["refusals"]] == [("ZZZZ-ZZZZ-ZZZZ", "malformed")]
    assert quote["lane"]["id"] == shop.lane_id
    assert quote["payment_methods"] == ["stripe", "pay_at_pickup"]
    assert quote["hold_expires_at"]
    assert await code_status(app_client, tenant, code) == "valid"  # nothing consumed


async def test_a_code_is_redeemed_by_the_order_and_given_back_on_cancel(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=10)
    _, [code] = await issue(app_client, tenant, discount_kind="percent", discount_value=10)
    first = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], codes=[code], contact_ref="ann"
    )
    assert (first["total_minor"], first["discount_minor"]) == (1350, 150)
    assert first["codes"] == ["10% off"]
    assert first["lines"][0]["discount_minor"] == 150
    assert await code_status(app_client, tenant, code) == "exhausted"

    other_hold = await hold(app_client, tenant, shop)
    refused = await place(app_client, tenant, [other_hold], codes=[code])
    assert (refused.status_code, refused.json()["reason"]) == (409, "exhausted")
    assert code in refused.json()["message"]  # the customer is told which code and why
    # Nothing was written: the hold can still be ordered without the code.
    assert (await placed(app_client, tenant, [other_hold]))["total_minor"] == 1500

    cancelled = await app_client.post(
        f"/api/v1/orders/{first['id']}/cancel", json={}, headers=tenant.headers
    )
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert await code_status(app_client, tenant, code) == "valid"
    assert (await stock_row(app_client, tenant, shop))["held"] == 1  # only the other order's
    again = await app_client.post(
        f"/api/v1/orders/{first['id']}/cancel", json={}, headers=tenant.headers
    )
    assert (again.status_code, again.json()["reason"]) == (409, "invalid_transition")


async def test_a_full_refund_gives_the_code_and_the_units_back(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=4)
    _, [code] = await issue(app_client, tenant, discount_kind="fixed", discount_value=500)
    order = await placed(app_client, tenant, [await hold(app_client, tenant, shop)], codes=[code])
    assert order["total_minor"] == 1000
    paid = await app_client.post(
        f"/api/v1/orders/{order['id']}/mark-paid", json={"tender": "card"}, headers=tenant.headers
    )
    assert paid.json()["status"] == "paid"
    assert (await stock_row(app_client, tenant, shop))["sold"] == 1
    refunded = await app_client.post(
        f"/api/v1/orders/{order['id']}/refunds",
        json={"reason": "changed_mind"},
        headers={**tenant.headers, "Idempotency-Key": "r-1"},
    )
    assert refunded.status_code == 200, refunded.text
    body = refunded.json()
    assert (body["status"], body["refunded_minor"], body["status_reason"]) == (
        "refunded", 1000, "changed_mind",
    )  # fmt: skip
    assert body["lines"][0]["refunded_qty"] == 1
    assert await code_status(app_client, tenant, code) == "valid"
    assert await stock_row(app_client, tenant, shop) == {
        "total": 4, "held": 0, "sold": 0, "available": 4,
    }  # fmt: skip


async def test_a_free_order_is_paid_at_once(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    _, [code] = await issue(app_client, tenant, discount_kind="percent", discount_value=100)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], codes=[code],
        payment_method="stripe",
    )  # fmt: skip
    assert (order["status"], order["total_minor"]) == ("paid", 0)
    [payment] = order["payments"]
    assert (payment["provider"], payment["tender"], payment["amount_minor"]) == (
        "pay_at_pickup", "free", 0,
    )  # fmt: skip
    assert (await stock_row(app_client, tenant, shop))["sold"] == 1


async def test_holds_refusals_and_idempotent_creation(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    hold_id = await hold(app_client, tenant, shop)
    keyed = {**tenant.headers, "Idempotency-Key": "order-a"}
    body = {"hold_ids": [hold_id]}
    first = await app_client.post("/api/v1/orders", json=body, headers=keyed)
    replay = await app_client.post("/api/v1/orders", json=body, headers=keyed)
    assert first.status_code == replay.status_code == 201
    assert first.json()["id"] == replay.json()["id"]
    taken = await place(app_client, tenant, [hold_id])
    assert (taken.status_code, taken.json()["reason"]) == (409, "hold_taken")

    stale = await hold(app_client, tenant, shop)
    clock.advance(timedelta(seconds=601))
    expired = await place(app_client, tenant, [stale])
    assert (expired.status_code, expired.json()["reason"]) == (410, "hold_expired")
    missing = await place(app_client, tenant, [2**40])
    assert missing.status_code == 404
    twice = await place(app_client, tenant, [hold_id, hold_id])
    assert twice.status_code == 422

    other = await make_shop(app_client, tenant, clock.now(), units=5, slug="other-shop")
    mixed = await place(
        app_client,
        tenant,
        [await hold(app_client, tenant, shop), await hold(app_client, tenant, other)],
    )
    assert (mixed.status_code, mixed.json()["reason"]) == (422, "invalid_request")


async def test_bundles_and_rule_budgets(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=10)
    cap = await post(
        app_client, tenant, f"/api/v1/events/{shop.event_id}/products",
        {"title": "Cap", "price_minor": 1000, "variants": ["one size"]},
    )  # fmt: skip
    cap_variant = cap["variants"][0]["id"]
    stocked = await app_client.put(
        "/api/v1/stock",
        json={"variant_id": cap_variant, "lane_id": shop.lane_id, "total": 10},
        headers=tenant.headers,
    )
    assert stocked.status_code == 200
    bundle = await post(
        app_client, tenant, f"/api/v1/events/{shop.event_id}/bundles",
        {"title": "Tote + cap", "price_minor": 2000,
         "components": [{"variant_id": shop.variant_id}, {"variant_id": cap_variant}]},
    )  # fmt: skip
    holds = await post(
        app_client, tenant, f"/api/v1/bundles/{bundle['id']}/holds", {"lane_id": shop.lane_id}
    )
    order = await placed(app_client, tenant, [h["id"] for h in holds["holds"]])
    assert (order["subtotal_minor"], order["total_minor"]) == (2500, 2000)
    assert {line["bundle_id"] for line in order["lines"]} == {bundle["id"]}
    assert sum(line["final_minor"] for line in order["lines"]) == 2000

    rule = await post(
        app_client, tenant, f"/api/v1/events/{shop.event_id}/price-rules",
        {"name": "Two or more", "kind": "min_quantity",
         "params": {"min_qty": 2, "percent": 10}, "budget_minor": 200},
    )  # fmt: skip
    big = await placed(app_client, tenant, [await hold(app_client, tenant, shop, qty=2)])
    assert big["discount_minor"] == 200  # 10 % of 3000 is 300; the budget had 200
    assert big["breakdown"]["rule_spend"] == {str(rule["id"]): 200}
    spent = await app_client.get(
        f"/api/v1/events/{shop.event_id}/price-rules", headers=tenant.headers
    )
    assert spent.json()[0]["budget_spent_minor"] == 200
    after = await placed(app_client, tenant, [await hold(app_client, tenant, shop, qty=2)])
    assert after["discount_minor"] == 0  # the budget is spent
    await app_client.post(f"/api/v1/orders/{big['id']}/cancel", json={}, headers=tenant.headers)
    back = await app_client.get(
        f"/api/v1/events/{shop.event_id}/price-rules", headers=tenant.headers
    )
    assert back.json()[0]["budget_spent_minor"] == 0


async def test_the_expiry_sweep_ends_unpaid_orders_and_gives_codes_back(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=2)
    _, [code] = await issue(app_client, tenant, discount_kind="fixed", discount_value=100)
    order = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop)], codes=[code],
        payment_method="stripe",
    )  # fmt: skip
    # The sweep is global (the session's database holds other tests' orders): look at ours.
    await settlement.expire_due(ctx.db, clock.now())
    assert (await get_order(app_client, tenant, order["id"]))["status"] == "pending"
    clock.advance(timedelta(seconds=601))
    assert await settlement.expire_due(ctx.db, clock.now()) >= 1
    assert await settlement.expire_due(ctx.db, clock.now()) == 0  # nothing due twice
    expired = await get_order(app_client, tenant, order["id"])
    assert (expired["status"], expired["status_reason"]) == ("expired", "hold_expired")
    assert await code_status(app_client, tenant, code) == "valid"
    assert (await stock_row(app_client, tenant, shop))["held"] == 0


async def test_a_partner_sees_only_the_orders_of_its_events(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    ours = await make_shop(app_client, tenant, clock.now(), units=3, slug="partnered")
    theirs = await make_shop(app_client, tenant, clock.now(), units=3, slug="not-partnered")
    await post(
        app_client, tenant, f"/api/v1/events/{ours.event_id}/partners",
        {"name": "Corner shop", "contact_email": "Pat@Corner.example"},
    )  # fmt: skip
    visible = await placed(app_client, tenant, [await hold(app_client, tenant, ours)])
    hidden = await placed(app_client, tenant, [await hold(app_client, tenant, theirs)])
    partner = Principal(tenant.org_id, "user:pat@corner.example", "partner", ROLES["partner"])
    async with ctx.db.reader() as session:
        seen = await orders.list_orders(session, partner)
        assert [o.id for o in seen] == [visible["id"]]
        assert (await orders.get_order(session, partner, visible["id"])).id == visible["id"]
        try:
            await orders.get_order(session, partner, hidden["id"])
        except PopdropError as refusal:
            assert refusal.reason == "not_found"
        else:
            raise AssertionError("a partner read another event's order")
        summary = await orders.sales_summary(session, partner, ours.event_id)
        assert summary.by_status == {"pending": 1}
        try:
            await orders.sales_summary(session, partner, theirs.event_id)
        except PopdropError as refusal:
            assert refusal.reason == "not_found"
        else:
            raise AssertionError("a partner read another event's sales")
        try:
            await settlement.cancel_order(session, partner, visible["id"], now=clock.now())
        except PopdropError as refusal:
            assert refusal.reason == "forbidden"
        else:
            raise AssertionError("a partner cancelled an order")
    owner_view = await app_client.get("/api/v1/orders", headers=tenant.headers)
    assert {o["id"] for o in owner_view.json()} >= {visible["id"], hidden["id"]}


async def test_csv_export_and_sales_summary(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=5)
    first = await placed(
        app_client, tenant, [await hold(app_client, tenant, shop, qty=2)],
        contact_ref="=HYPERLINK(\"http://evil\")",
    )  # fmt: skip
    second = await placed(app_client, tenant, [await hold(app_client, tenant, shop)])
    for order in (first, second):
        paid = await app_client.post(
            f"/api/v1/orders/{order['id']}/mark-paid", json={}, headers=tenant.headers
        )
        assert paid.status_code == 200, paid.text
    await app_client.post(
        f"/api/v1/orders/{second['id']}/refunds", json={"amount_minor": 500}, headers=tenant.headers
    )
    exported = await app_client.get(
        f"/api/v1/orders.csv?event_id={shop.event_id}", headers=tenant.headers
    )
    assert exported.status_code == 200
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [int(r["id"]) for r in rows] == [second["id"], first["id"]]
    by_id = {int(r["id"]): r for r in rows}
    assert by_id[first["id"]]["contact_ref"].startswith("'=")  # not a formula
    assert by_id[second["id"]]["refunded_minor"] == "500"

    sales = await app_client.get(f"/api/v1/events/{shop.event_id}/sales", headers=tenant.headers)
    assert sales.status_code == 200, sales.text
    summary = sales.json()
    assert summary["paid_orders"] == 2
    assert summary["revenue_minor"] == 3000 + 1500 - 500
    assert summary["average_minor"] == (3000 + 1500) // 2
    assert summary["units_sold"] == 3


async def test_a_price_changed_since_the_quote_is_not_charged_unseen(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=3)
    hold_id = await hold(app_client, tenant, shop)
    quoted = await app_client.post(
        "/api/v1/orders/quote", json={"hold_ids": [hold_id]}, headers=tenant.headers
    )
    shown = quoted.json()["breakdown"]["total_minor"]
    async with ctx.db.transaction() as session:  # the host raises the price meanwhile
        await session.execute(
            update(Product).where(Product.id == shop.product_id).values(price_minor=1800)
        )
    refused = await place(app_client, tenant, [hold_id], expected_total_minor=shown)
    assert (refused.status_code, refused.json()["reason"]) == (409, "price_changed")
    assert refused.json()["total_minor"] == 1800
    order = await placed(app_client, tenant, [hold_id], expected_total_minor=1800)
    assert order["total_minor"] == 1800
