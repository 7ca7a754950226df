"""Fairness of holds: nothing is held before the event's `opens_at` (on the burst path and
on the transactional one), and one person cannot get past a product's per-person limit
by holding through two lanes at once."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

import httpx
from sqlalchemy import func, select

from popdrop.core.clock import FrozenClock
from popdrop.inventory.models import Hold
from popdrop.web.context import AppContext
from tests.conftest import Tenant
from tests.events.helpers import Shop, make_shop, post

HOLDS = "/api/v1/holds"


async def _open_at(client: httpx.AsyncClient, tenant: Tenant, shop: Shop, at: str) -> None:
    moved = await client.patch(
        f"/api/v1/events/{shop.event_id}", json={"opens_at": at}, headers=tenant.headers
    )
    assert moved.status_code == 200, moved.text


async def test_a_hold_before_opens_at_is_refused_and_at_opens_at_it_is_made(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), limit_per_contact=2)
    opens_at = clock.now() + timedelta(hours=1)
    await _open_at(app_client, tenant, shop, opens_at.isoformat())
    bodies = {
        # The burst path (one statement) and the transactional one (a retry key).
        "burst": ({"variant_id": shop.variant_id, "lane_id": shop.lane_id}, {}),
        "keyed": (
            {"variant_id": shop.variant_id, "lane_id": shop.lane_id},
            {"Idempotency-Key": "hold-before-opening"},
        ),
        "limited": (
            {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "contact_ref": "ann"},
            {},
        ),
    }
    for name, (body, extra) in bodies.items():
        early = await app_client.post(HOLDS, json=body, headers={**tenant.headers, **extra})
        assert early.status_code == 409, (name, early.text)
        assert early.json()["reason"] == "not_open_yet", name
        assert early.json()["opens_at"] == opens_at.isoformat()

    clock.set(opens_at)
    for name, (body, extra) in bodies.items():
        extra = {k: v + "-again" for k, v in extra.items()}
        made = await app_client.post(HOLDS, json=body, headers={**tenant.headers, **extra})
        assert made.status_code == 201, (name, made.text)


async def test_one_person_cannot_pass_the_limit_through_two_lanes_at_once(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=50, limit_per_contact=2)
    back = await post(
        app_client, tenant, f"/api/v1/events/{shop.event_id}/lanes", {"name": "Back door"}
    )
    stocked = await app_client.put(
        "/api/v1/stock",
        json={"variant_id": shop.variant_id, "lane_id": back["id"], "total": 50},
        headers=tenant.headers,
    )
    assert stocked.status_code == 200, stocked.text
    lanes = (shop.lane_id, back["id"])

    async def hold(i: int) -> httpx.Response:
        body = {"variant_id": shop.variant_id, "lane_id": lanes[i % 2], "contact_ref": "ann"}
        return await app_client.post(HOLDS, json=body, headers=tenant.headers)

    answers = await asyncio.gather(*(hold(i) for i in range(24)))
    assert Counter(a.status_code for a in answers) == {201: 2, 409: 22}
    assert {a.json()["reason"] for a in answers if a.status_code == 409} == {"limit_per_contact"}
    async with ctx.db.reader() as session:
        held = await session.scalar(
            select(func.sum(Hold.qty)).where(
                Hold.org_id == tenant.org_id, Hold.contact_ref == "ann", Hold.status == "active"
            )
        )
    assert held == 2
    # Someone else still gets theirs.
    other = await app_client.post(
        HOLDS,
        json={"variant_id": shop.variant_id, "lane_id": back["id"], "contact_ref": "bob"},
        headers=tenant.headers,
    )
    assert other.status_code == 201, other.text
