"""Pickup: the order QR is signed by the event key and checked offline (never a ticket,
and a ticket is never an order), every refusal reason at the lane, one hand-out under
concurrent scans, the lane's queue, the QR image, and a full pickup window refusing the
hold an order would need."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from popdrop.checkin import tickets
from popdrop.commerce import pickup
from popdrop.commerce.models import Order, OrderLine
from popdrop.core import links
from popdrop.core.clock import FrozenClock
from popdrop.vouchers.codes import ALPHABET, check_char
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import Shop, make_shop, post

SCAN = "/api/v1/pickup/scan"


def new_code() -> str:
    data = "".join(secrets.choice(ALPHABET) for _ in range(8))
    return data + check_char(data)


async def make_order(
    ctx: AppContext,
    tenant: Tenant,
    shop: Shop,
    *,
    status: str = "paid",
    lane_id: int | None = None,
    slot: bool = True,
    method: str = "stripe",
    total: int = 3000,
    sign: bool = True,
) -> tuple[int, str, str]:
    """An order row with two lines, as the order service leaves it; (id, secret, code)."""
    now = ctx.clock.now()
    code = new_code()
    async with ctx.db.transaction() as session:
        order = Order(
            org_id=tenant.org_id, event_id=shop.event_id, status=status, source="api",
            lane_id=lane_id or shop.lane_id, slot_id=shop.slot_id if slot else None,
            currency="EUR", subtotal_minor=total, total_minor=total, payment_method=method,
            short_code=code, pickup_generation=1, price_held_until=now, created_at=now,
            created_by="test", paid_at=now if status in ("paid", "ready") else None,
        )  # fmt: skip
        session.add(order)
        await session.flush()
        for title, qty in (("Tote bag", 2), ("Mug", 1)):
            session.add(
                OrderLine(
                    org_id=tenant.org_id, order_id=order.id, product_id=shop.product_id,
                    variant_id=shop.variant_id, title=title, qty=qty, unit_price_minor=1000,
                    list_minor=qty * 1000, final_minor=qty * 1000,
                )
            )  # fmt: skip
        secret = await pickup.order_secret(session, order, now=now) if sign else ""
        return order.id, secret, code


async def scan(
    client: httpx.AsyncClient, tenant: Tenant, lane_id: int, **body: Any
) -> httpx.Response:
    return await client.post(SCAN, json={"lane_id": lane_id, **body}, headers=tenant.headers)


def in_window(clock: FrozenClock) -> None:
    """make_shop's slot starts a day from the test's start."""
    clock.advance(timedelta(days=1, minutes=10))


async def test_an_order_secret_is_checked_offline_and_is_never_a_ticket(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    order_id, secret, _ = await make_order(ctx, tenant, shop)
    assert len(secret) == pickup.SECRET_CHARS
    key = await app_client.get(
        f"/api/v1/events/{shop.event_id}/checkin-key", headers=tenant.headers
    )
    assert key.status_code == 200, key.text
    public = tickets.base64_decode(key.json()["public_key"])

    result, claim = pickup.verify_offline(public, secret, event_id=shop.event_id)
    assert result == "ok" and claim is not None
    assert (claim.event_id, claim.order_id, claim.generation) == (shop.event_id, order_id, 1)
    assert pickup.verify_offline(public, secret, {order_id: 2})[0] == "revoked"
    assert pickup.verify_offline(public, secret, event_id=shop.event_id + 1)[0] == "invalid"
    forged = secret[:-2] + ("AA" if secret[-2:] != "AA" else "BB")
    assert pickup.verify_offline(public, forged)[0] == "invalid"
    # An order secret is no ticket, offline or at the door.
    assert tickets.verify_offline(public, secret)[0] == "invalid"
    door = await app_client.post(
        "/api/v1/checkins",
        json={"secret": secret, "nonce": secrets.token_hex(8), "event_id": shop.event_id},
        headers=tenant.headers,
    )
    assert door.json()["result"] == "invalid", door.text

    # A ticket of the same event is no order, offline or at the lane.
    issued = await post(
        app_client, tenant, "/api/v1/tickets",
        {"event_id": shop.event_id, "subject_kind": "rsvp", "subject_id": 1},
    )  # fmt: skip
    ticket = issued["secret"]
    assert tickets.verify_offline(public, ticket)[0] == "ok"
    assert pickup.verify_offline(public, ticket)[0] == "invalid"
    in_window(clock)
    lane = await scan(app_client, tenant, shop.lane_id, secret=ticket)
    assert (lane.status_code, lane.json()["result"]) == (422, "invalid")
    assert "ticket" in lane.json()["message"]


async def test_every_reason_at_the_lane(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    other_lane = await post(
        app_client, tenant, f"/api/v1/events/{shop.event_id}/lanes", {"name": "Back door"}
    )
    paid_id, paid, paid_code = await make_order(ctx, tenant, shop)

    # Before the window (the slot starts in a day, pickup opens 30 minutes before).
    early = await scan(app_client, tenant, shop.lane_id, secret=paid)
    assert (early.status_code, early.json()["reason"]) == (409, "outside_window")
    assert "CET" in early.json()["message"]  # the window in the event's time zone
    clock.advance(timedelta(days=1) - pickup.EARLY_GRACE)  # the grace: now it opens
    wrong_lane = await scan(app_client, tenant, other_lane["id"], secret=paid)
    assert (wrong_lane.status_code, wrong_lane.json()["reason"]) == (409, "wrong_lane")
    assert "Front desk" in wrong_lane.json()["message"]

    ok = await scan(app_client, tenant, shop.lane_id, secret=paid)
    assert ok.status_code == 200, ok.text
    answer = ok.json()
    assert (answer["result"], answer["status"], answer["order_id"]) == ("ok", "picked_up", paid_id)
    assert [(line["title"], line["qty"]) for line in answer["lines"]] == [
        ("Tote bag", 2),
        ("Mug", 1),
    ]
    # The same scan again (or its typed code) changes nothing and says when and by whom.
    for again in (
        await scan(app_client, tenant, shop.lane_id, secret=paid),
        await scan(app_client, tenant, shop.lane_id, code=paid_code.lower()),
    ):
        assert (again.status_code, again.json()["reason"]) == (409, "already_picked_up")
        assert again.json()["picked_up_by"] and again.json()["picked_up_at"]
        assert "already picked up" in again.json()["message"]

    # Typed short codes: any case, with dashes; a typo or an unknown code is invalid.
    ready_id, _, ready_code = await make_order(ctx, tenant, shop, status="ready")
    typed = tickets.format_short_code(ready_code).lower()
    by_code = await scan(app_client, tenant, shop.lane_id, code=typed)
    assert (by_code.status_code, by_code.json()["order_id"]) == (200, ready_id)
    typo = ready_code[:-1] + ("0" if ready_code[-1] != "0" else "1")
    for wrong in (typo, new_code(), "hello"):
        refused = await scan(app_client, tenant, shop.lane_id, code=wrong)
        assert (refused.status_code, refused.json()["result"]) == (422, "invalid"), wrong

    pending_id, pending, _ = await make_order(
        ctx, tenant, shop, status="pending", method="pay_at_pickup", total=4250
    )
    unpaid = await scan(app_client, tenant, shop.lane_id, secret=pending)
    assert (unpaid.status_code, unpaid.json()["reason"]) == (409, "not_paid")
    assert unpaid.json()["total_minor"] == 4250 and "42.50" in unpaid.json()["message"]

    for status, code in (("refunded", 410), ("cancelled", 410), ("expired", 410)):
        _, ended, _ = await make_order(ctx, tenant, shop, status=status)
        refused = await scan(app_client, tenant, shop.lane_id, secret=ended)
        assert (refused.status_code, refused.json()["reason"]) == (code, status)

    # An order of another event of this organization; another org's lane knows nothing.
    other = await make_shop(app_client, tenant, clock.now(), slug="second-event")
    _, elsewhere, _ = await make_order(ctx, tenant, other)
    foreign = await scan(app_client, tenant, shop.lane_id, secret=elsewhere)
    assert (foreign.status_code, foreign.json()["reason"]) == (409, "wrong_event")
    stranger = await make_tenant(ctx)
    stranger_shop = await make_shop(app_client, stranger, clock.now(), slug="theirs")
    theirs = await scan(app_client, stranger, stranger_shop.lane_id, secret=pending)
    assert (theirs.status_code, theirs.json()["result"]) == (422, "invalid")
    assert theirs.json()["order_id"] is None  # nothing said about our order

    # A re-issued QR: the older secret stops working.
    async with ctx.db.transaction() as session:
        await session.execute(
            update(Order).where(Order.id == pending_id).values(pickup_generation=2)
        )
    stale = await scan(app_client, tenant, shop.lane_id, secret=pending)
    assert (stale.status_code, stale.json()["result"]) == (422, "invalid")

    # Past the window and its grace.
    clock.advance(
        timedelta(hours=1) + pickup.EARLY_GRACE + pickup.LATE_GRACE + timedelta(minutes=1)
    )
    _, late, _ = await make_order(ctx, tenant, shop)
    too_late = await scan(app_client, tenant, shop.lane_id, secret=late)
    assert (too_late.status_code, too_late.json()["reason"]) == (409, "outside_window")
    # Without a slot: the event's door hours (the event lasts a day from the slot's start).
    _, any_time, _ = await make_order(ctx, tenant, shop, slot=False)
    assert (await scan(app_client, tenant, shop.lane_id, secret=any_time)).status_code == 200


async def test_two_scanners_hand_an_order_out_once(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock, backend: str
) -> None:
    if backend != "postgresql":
        pytest.skip("concurrency is proven on PostgreSQL (SQLite serialises writers)")
    shop = await make_shop(app_client, tenant, clock.now())
    order_id, secret, _ = await make_order(ctx, tenant, shop)
    in_window(clock)
    answers = await asyncio.gather(
        *(scan(app_client, tenant, shop.lane_id, secret=secret) for _ in range(10))
    )
    assert Counter(a.json()["result"] for a in answers) == {"ok": 1, "already_picked_up": 9}
    async with ctx.db.reader() as session:
        status = await session.scalar(select(Order.status).where(Order.id == order_id))
    assert status == "picked_up"


async def test_the_lane_queue_and_the_qr_image(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), window=10)
    paid_id, _, _ = await make_order(ctx, tenant, shop)
    pending_id, _, pending_code = await make_order(
        ctx, tenant, shop, status="pending", method="pay_at_pickup"
    )
    await make_order(ctx, tenant, shop, status="pending")  # online, unpaid: not in the queue
    loose_id, _, _ = await make_order(ctx, tenant, shop, slot=False)
    done_id, done, _ = await make_order(ctx, tenant, shop)
    in_window(clock)
    assert (await scan(app_client, tenant, shop.lane_id, secret=done)).status_code == 200

    url = f"/api/v1/events/{shop.event_id}/pickup/lanes/{shop.lane_id}/queue"
    queue = await app_client.get(url, headers=tenant.headers)
    assert queue.status_code == 200, queue.text
    data = queue.json()
    assert data["lane_name"] == "Front desk"
    first, loose = data["windows"]
    assert first["slot_id"] == shop.slot_id and loose["slot_id"] is None
    assert [o["order_id"] for o in first["orders"]] == [paid_id, pending_id]
    assert first["picked_up"] == 1 and first["capacity"] == 10
    assert "CET" in first["label"]
    assert first["orders"][1]["short_code"] == tickets.format_short_code(pending_code)
    assert first["orders"][0]["lines"] == [
        {"title": "Tote bag", "qty": 2},
        {"title": "Mug", "qty": 1},
    ]
    assert [o["order_id"] for o in loose["orders"]] == [loose_id]
    volunteer = await make_tenant(ctx, frozenset({"checkin", "orders:pickup"}))
    hidden = await app_client.get(url, headers=volunteer.headers)
    assert hidden.status_code == 404  # another org's volunteer

    token = links.order_view_url(ctx.signer, "http://test", paid_id, tenant.org_id).rsplit("/", 1)[
        1
    ]
    svg = await app_client.get(f"/orders/view/{token}/qr.svg")
    assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml"
    png = await app_client.get(f"/orders/view/{token}/qr.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert (
        pickup.order_qr_url("http://test/", token, "png")
        == f"http://test/orders/view/{token}/qr.png"
    )
    picked = links.order_view_url(ctx.signer, "http://test", done_id, tenant.org_id)
    gone = await app_client.get(f"/orders/view/{picked.rsplit('/', 1)[1]}/qr.svg")
    assert gone.status_code == 404  # handed out: no QR to show any more
    forged = await app_client.get("/orders/view/nonsense/qr.svg")
    assert forged.status_code == 400


async def test_an_order_for_a_full_pickup_window_cannot_be_placed(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), window=1)
    body = {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "slot_id": shop.slot_id}
    first = await app_client.post("/api/v1/holds", json=body, headers=tenant.headers)
    assert first.status_code == 201, first.text
    # The window holds one unit: the next hold for it is refused, so no order can hold it.
    full = await app_client.post("/api/v1/holds", json=body, headers=tenant.headers)
    assert (full.status_code, full.json()["reason"]) == (409, "slot_full")
    placed = await app_client.post(
        "/api/v1/orders",
        json={"hold_ids": [first.json()["id"]], "payment_method": "pay_at_pickup"},
        headers=tenant.headers,
    )
    assert placed.status_code == 201, placed.text
    order = placed.json()
    # Paid at the lane, then handed out there: the order service and pickup together.
    in_window(clock)
    code = order["short_code"]
    unpaid = await scan(app_client, tenant, shop.lane_id, code=code)
    assert unpaid.json()["reason"] == "not_paid", unpaid.text
    paid = await app_client.post(
        f"/api/v1/orders/{order['id']}/mark-paid", json={"tender": "cash"}, headers=tenant.headers
    )
    assert paid.status_code == 200, paid.text
    handed = await scan(app_client, tenant, shop.lane_id, code=code)
    assert (handed.status_code, handed.json()["result"]) == (200, "ok"), handed.text


async def test_the_first_qr_of_an_event_is_drawn_from_a_reader(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    """The confirmation page and the receipt read the order in a read-only session: the
    event's key, when it has none yet, is made and kept in a transaction of its own."""
    shop = await make_shop(app_client, tenant, clock.now())
    order_id, _, _ = await make_order(ctx, tenant, shop, sign=False)
    token = links.order_view_url(ctx.signer, "http://test", order_id, tenant.org_id)
    first = await app_client.get(f"/orders/view/{token.rsplit('/', 1)[1]}/qr.png")
    assert first.status_code == 200, first.text
    async with ctx.db.reader() as session:
        order = await session.get(Order, order_id)
        assert order is not None
        secret = await pickup.order_secret(session, order, now=clock.now())
    key = await app_client.get(
        f"/api/v1/events/{shop.event_id}/checkin-key", headers=tenant.headers
    )
    public = tickets.base64_decode(key.json()["public_key"])
    assert pickup.verify_offline(public, secret, event_id=shop.event_id)[0] == "ok"
    in_window(clock)
    handed = await scan(app_client, tenant, shop.lane_id, secret=secret)
    assert handed.json()["result"] == "ok", handed.text
