"""Editing and removing an event's slots, lanes, pickup windows and product cards over
the API: never below what is taken (409 capacity_below_taken), never removing what is
used (409 in_use), nothing half-written, and only within the caller's organization."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import func, select

from popdrop.chat.models import ChatPin
from popdrop.core.clock import FrozenClock
from popdrop.events.models import PickupWindow, TimeSlot
from popdrop.inventory import service as inventory_service
from popdrop.inventory.models import Hold
from popdrop.rsvp.models import Rsvp
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import Shop, make_shop, post
from tests.rsvp.helpers import rsvp


def _refusal(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json().get("reason", "")


async def _hold(client: httpx.AsyncClient, tenant: Tenant, shop: Shop, **more: object) -> int:
    body = {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "qty": 1, **more}
    return int((await post(client, tenant, "/api/v1/holds", body))["id"])


async def _windows(ctx: AppContext, slot_id: int) -> list[PickupWindow]:
    async with ctx.db.reader() as session:
        rows = await session.scalars(select(PickupWindow).where(PickupWindow.slot_id == slot_id))
        return list(rows)


async def test_slot_edits_never_go_below_the_places_taken(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    url = f"/api/v1/slots/{shop.slot_id}"
    for _ in range(3):
        assert (await rsvp(app_client, shop.event_id, shop.slot_id)).status_code == 201

    edited = await app_client.patch(url, json={"label": "Early birds", "capacity": 3},
                                    headers=tenant.headers)  # fmt: skip
    assert edited.status_code == 200, edited.text
    assert (edited.json()["label"], edited.json()["capacity"], edited.json()["taken"]) == (
        "Early birds", 3, 3,
    )  # fmt: skip

    below = await app_client.patch(url, json={"capacity": 2}, headers=tenant.headers)
    assert _refusal(below) == (409, "capacity_below_taken")
    assert (below.json()["taken"], below.json()["capacity"]) == (3, 2)
    slots = await app_client.get(f"/api/v1/events/{shop.event_id}/slots", headers=tenant.headers)
    assert slots.json()[0]["capacity"] == 3  # unchanged

    # Times move together; an end before the start is refused, null is refused.
    start = datetime.fromisoformat(edited.json()["starts_at"]).astimezone(UTC)
    moved = await app_client.patch(
        url,
        json={"starts_at": (start + timedelta(hours=2)).isoformat(),
              "ends_at": (start + timedelta(hours=3)).isoformat()},
        headers=tenant.headers,
    )  # fmt: skip
    assert moved.status_code == 200, moved.text
    backwards = await app_client.patch(
        url, json={"ends_at": start.isoformat()}, headers=tenant.headers
    )
    assert _refusal(backwards) == (422, "invalid_request")
    assert (
        await app_client.patch(url, json={"capacity": None}, headers=tenant.headers)
    ).status_code == 422


async def test_a_slot_in_use_stays_and_an_empty_one_goes(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), window=5)
    booked = await rsvp(app_client, shop.event_id, shop.slot_id)
    assert booked.status_code == 201
    url = f"/api/v1/slots/{shop.slot_id}"
    taken = await app_client.delete(url, headers=tenant.headers)
    assert _refusal(taken) == (409, "in_use")

    # Cancelled: no place is taken, but the RSVP is the slot's history; and the removal
    # refused by the database's reference leaves the slot's pickup window in place.
    cancel = await app_client.post(
        f"/api/v1/rsvps/{booked.json()['rsvp']['id']}/cancel", json={}, headers=tenant.headers
    )
    assert cancel.status_code == 200, cancel.text
    history = await app_client.delete(url, headers=tenant.headers)
    assert _refusal(history) == (409, "in_use")
    assert "RSVP" in history.json()["message"]
    assert len(await _windows(ctx, shop.slot_id)) == 1

    empty = await post(
        app_client, tenant, f"/api/v1/events/{shop.event_id}/slots",
        {"starts_at": clock.now().isoformat(),
         "ends_at": (clock.now() + timedelta(hours=1)).isoformat(), "capacity": 4},
    )  # fmt: skip
    await post(app_client, tenant, f"/api/v1/lanes/{shop.lane_id}/windows",
               {"slot_id": empty["id"], "capacity": 2})  # fmt: skip
    gone = await app_client.delete(f"/api/v1/slots/{empty['id']}", headers=tenant.headers)
    assert gone.status_code == 204, gone.text
    slots = await app_client.get(f"/api/v1/events/{shop.event_id}/slots", headers=tenant.headers)
    assert [s["id"] for s in slots.json()] == [shop.slot_id]
    assert await _windows(ctx, empty["id"]) == []


async def test_pickup_window_capacity_and_removal(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    window = await post(app_client, tenant, f"/api/v1/lanes/{shop.lane_id}/windows",
                        {"slot_id": shop.slot_id, "capacity": 3})  # fmt: skip
    url = f"/api/v1/windows/{window['id']}"
    hold_id = await _hold(app_client, tenant, shop, qty=2, slot_id=shop.slot_id)

    below = await app_client.patch(url, json={"capacity": 1}, headers=tenant.headers)
    assert _refusal(below) == (409, "capacity_below_taken")
    assert below.json()["taken"] == 2
    edited = await app_client.patch(url, json={"capacity": 2}, headers=tenant.headers)
    assert edited.status_code == 200 and edited.json()["capacity"] == 2
    full = await app_client.post(
        "/api/v1/holds",
        json={"variant_id": shop.variant_id, "lane_id": shop.lane_id, "slot_id": shop.slot_id},
        headers=tenant.headers,
    )
    assert _refusal(full) == (409, "slot_full")  # the new capacity holds

    assert _refusal(await app_client.delete(url, headers=tenant.headers)) == (409, "in_use")
    released = await app_client.post(f"/api/v1/holds/{hold_id}/release", headers=tenant.headers)
    assert released.status_code == 200
    assert (await app_client.delete(url, headers=tenant.headers)).status_code == 204
    assert (await app_client.delete(url, headers=tenant.headers)).status_code == 404


async def test_lane_rename_and_removal(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    url = f"/api/v1/lanes/{shop.lane_id}"
    renamed = await app_client.patch(
        url, json={"name": "Back door", "pickup_point": "Yard"}, headers=tenant.headers
    )
    assert renamed.status_code == 200
    assert (renamed.json()["name"], renamed.json()["pickup_point"]) == ("Back door", "Yard")
    hold_id = await _hold(app_client, tenant, shop)
    assert _refusal(await app_client.delete(url, headers=tenant.headers)) == (409, "in_use")
    # Even released, the hold is the lane's history: it stays.
    await app_client.post(f"/api/v1/holds/{hold_id}/release", headers=tenant.headers)
    assert _refusal(await app_client.delete(url, headers=tenant.headers)) == (409, "in_use")

    # A lane with stock but never held goes, its stock with it; a hold there is a 404.
    spare = await post(app_client, tenant, f"/api/v1/events/{shop.event_id}/lanes",
                       {"name": "Pop-up stand"})  # fmt: skip
    stocked = await app_client.put(
        "/api/v1/stock",
        json={"variant_id": shop.variant_id, "lane_id": spare["id"], "total": 5},
        headers=tenant.headers,
    )
    assert stocked.status_code == 200
    try_hold = {"variant_id": shop.variant_id, "lane_id": spare["id"]}
    assert (await app_client.post("/api/v1/holds", json={**try_hold, "qty": 9},
                                  headers=tenant.headers)).status_code == 409  # fmt: skip
    gone = await app_client.delete(f"/api/v1/lanes/{spare['id']}", headers=tenant.headers)
    assert gone.status_code == 204, gone.text
    lanes = await app_client.get(f"/api/v1/events/{shop.event_id}/lanes", headers=tenant.headers)
    assert [lane["id"] for lane in lanes.json()] == [shop.lane_id]
    late = await app_client.post("/api/v1/holds", json=try_hold, headers=tenant.headers)
    assert late.status_code == 404


async def test_product_edit_and_removal(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    url = f"/api/v1/products/{shop.product_id}"
    edited = await app_client.patch(
        url, json={"title": "Linen tote", "price_minor": 1800}, headers=tenant.headers
    )
    assert edited.status_code == 200, edited.text
    body = edited.json()
    assert (body["title"], body["price_minor"], body["currency"]) == ("Linen tote", 1800, "EUR")
    assert [v["id"] for v in body["variants"]] == [shop.variant_id]
    refused = await app_client.patch(url, json={"limit_per_contact": 1}, headers=tenant.headers)
    assert refused.status_code == 422  # fixed once created: holds cache it

    hold_id = await _hold(app_client, tenant, shop)
    await app_client.post(f"/api/v1/holds/{hold_id}/convert", headers=tenant.headers)
    assert _refusal(await app_client.delete(url, headers=tenant.headers)) == (409, "in_use")

    poster = {"title": "Poster", "price_minor": 500, "variants": ["A2", "A3"]}
    fresh = await post(app_client, tenant, f"/api/v1/events/{shop.event_id}/products", poster)
    for variant in fresh["variants"]:
        stock = {"variant_id": variant["id"], "lane_id": shop.lane_id, "total": 4}
        assert (await app_client.put("/api/v1/stock", json=stock,
                                     headers=tenant.headers)).status_code == 200  # fmt: skip
    # Pinned in the chat: a reference from a higher floor, refused whole.
    async with ctx.db.transaction() as session:
        session.add(ChatPin(org_id=tenant.org_id, event_id=shop.event_id, product_id=fresh["id"],
                            pinned_at=clock.now(), pinned_by="test"))  # fmt: skip
    pinned = await app_client.delete(f"/api/v1/products/{fresh['id']}", headers=tenant.headers)
    assert _refusal(pinned) == (409, "in_use")
    availability = await app_client.get(
        f"/api/v1/events/{shop.event_id}/availability", headers=tenant.headers
    )
    assert len(availability.json()) == 3  # its stock rows are all still there
    async with ctx.db.transaction() as session:
        pin = await session.get(ChatPin, (tenant.org_id, shop.event_id))
        await session.delete(pin)
    gone = await app_client.delete(f"/api/v1/products/{fresh['id']}", headers=tenant.headers)
    assert gone.status_code == 204
    products = await app_client.get(
        f"/api/v1/events/{shop.event_id}/products", headers=tenant.headers
    )
    assert [p["id"] for p in products.json()] == [shop.product_id]


async def test_another_organization_gets_404_for_every_part(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    window = await post(app_client, tenant, f"/api/v1/lanes/{shop.lane_id}/windows",
                        {"slot_id": shop.slot_id, "capacity": 3})  # fmt: skip
    other = await make_tenant(ctx)
    for url, body in (
        (f"/api/v1/slots/{shop.slot_id}", {"capacity": 99}),
        (f"/api/v1/lanes/{shop.lane_id}", {"name": "Mine now"}),
        (f"/api/v1/windows/{window['id']}", {"capacity": 99}),
        (f"/api/v1/products/{shop.product_id}", {"title": "Mine now"}),
    ):
        assert (await app_client.patch(url, json=body, headers=other.headers)).status_code == 404
        assert (await app_client.delete(url, headers=other.headers)).status_code == 404
    slots = await app_client.get(f"/api/v1/events/{shop.event_id}/slots", headers=tenant.headers)
    assert slots.json()[0]["capacity"] == 50


async def test_capacity_cuts_racing_rsvps_and_holds_never_oversell(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    """Lowering capacity while people book: each cut either lands at or above what is
    taken at that moment or is refused, and what is taken never exceeds the capacity."""
    shop = await make_shop(app_client, tenant, clock.now(), units=100)
    window = await post(app_client, tenant, f"/api/v1/lanes/{shop.lane_id}/windows",
                        {"slot_id": shop.slot_id, "capacity": 40})  # fmt: skip
    hold = {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "slot_id": shop.slot_id}
    bookings = [rsvp(app_client, shop.event_id, shop.slot_id) for _ in range(40)]
    holds = [app_client.post("/api/v1/holds", json=hold, headers=tenant.headers) for _ in range(40)]
    cuts = [
        app_client.patch(f"/api/v1/slots/{shop.slot_id}", json={"capacity": c},
                         headers=tenant.headers)
        for c in (30, 20, 15)
    ] + [
        app_client.patch(f"/api/v1/windows/{window['id']}", json={"capacity": c},
                         headers=tenant.headers)
        for c in (30, 20, 15)
    ]  # fmt: skip
    answers = await asyncio.gather(*bookings, *holds, *cuts)
    assert {a.status_code for a in answers} <= {200, 201, 409}
    refused = {a.json()["reason"] for a in answers if a.status_code == 409}
    assert refused <= {"slot_full", "capacity_below_taken"}
    async with ctx.db.reader() as session:
        slot = await session.get(TimeSlot, shop.slot_id)
        held = await session.get(PickupWindow, window["id"])
        assert slot is not None and held is not None
        confirmed = await session.scalar(
            select(func.coalesce(func.sum(Rsvp.places), 0)).where(
                Rsvp.slot_id == slot.id, Rsvp.status == "confirmed"
            )
        )
        active = await session.scalar(
            select(func.coalesce(func.sum(Hold.qty), 0)).where(
                Hold.slot_id == slot.id, Hold.status == "active"
            )
        )
    assert confirmed == slot.taken <= slot.capacity
    assert active == held.taken <= held.capacity
    assert slot.taken == sum(1 for a in answers[:40] if a.status_code == 201)


async def test_a_hold_on_stock_removed_by_another_process_is_a_404(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    """Another server process still has the removed stock in its hold-target cache: its
    next hold there is a 404, not a 500."""
    shop = await make_shop(app_client, tenant, clock.now(), units=0)
    body = {"variant_id": shop.variant_id, "lane_id": shop.lane_id}
    tried = await app_client.post("/api/v1/holds", json=body, headers=tenant.headers)
    assert _refusal(tried) == (409, "sold_out")  # the target is cached now
    key = (str(ctx.db.engine.url), tenant.org_id, shop.variant_id, shop.lane_id)
    stale = inventory_service._TARGETS.get(key)
    assert stale is not None
    gone = await app_client.delete(f"/api/v1/products/{shop.product_id}", headers=tenant.headers)
    assert gone.status_code == 204
    inventory_service._TARGETS.put(key, stale)  # as the other process still has it
    for extra in ({}, {"contact_ref": "ada@example.com"}):
        late = await app_client.post("/api/v1/holds", json={**body, **extra},
                                     headers=tenant.headers)  # fmt: skip
        assert _refusal(late) == (404, "not_found")
    keyed = await app_client.post(
        "/api/v1/holds", json=body, headers={**tenant.headers, "Idempotency-Key": "k1"}
    )
    assert _refusal(keyed) == (404, "not_found")
