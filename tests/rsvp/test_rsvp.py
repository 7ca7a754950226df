"""RSVPs: capacity, refusals with reasons, cancel tokens, tenancy, audit."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest
from sqlalchemy import func, select

from popdrop.core import audit
from popdrop.rsvp.models import Rsvp
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.rsvp.helpers import CONSENT, make_slot, rsvp, slot_taken


async def test_rsvp_confirms_then_refuses_a_full_slot_and_offers_the_waiting_list(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=3)
    first = await rsvp(app_client, event_id, slot_id, places=2, phone="+33 6 12 34 56 78")
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["rsvp"]["status"] == "confirmed"
    assert body["rsvp"]["places"] == 2
    assert body["rsvp"]["phone"] == "+33612345678"
    assert body["rsvp"]["consent_text"] == CONSENT
    assert body["cancel_token"]

    full = await rsvp(app_client, event_id, slot_id, places=2)
    assert full.status_code == 409
    assert full.json()["reason"] == "slot_full"
    assert full.json()["waitlist"] is True
    assert full.json()["free_places"] == 1

    joined = await rsvp(app_client, event_id, slot_id, places=2, waitlist=True)
    assert joined.status_code == 201
    assert joined.json()["rsvp"]["status"] == "waitlisted"
    # One place is still free: a party of one is confirmed even with waitlist=true.
    single = await rsvp(app_client, event_id, slot_id, waitlist=True)
    assert single.json()["rsvp"]["status"] == "confirmed"
    assert await slot_taken(ctx, slot_id) == 3


async def test_500_concurrent_rsvps_never_oversell(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    capacity = 60
    event_id, slot_id = await make_slot(ctx, tenant, capacity=capacity)
    responses = await asyncio.gather(
        *(rsvp(app_client, event_id, slot_id, email=f"g{i}@example.com") for i in range(500))
    )
    assert Counter(r.status_code for r in responses) == {201: capacity, 409: 500 - capacity}
    assert {r.json()["reason"] for r in responses if r.status_code == 409} == {"slot_full"}
    assert await slot_taken(ctx, slot_id) == capacity
    async with ctx.db.reader() as session:
        confirmed = await session.scalar(
            select(func.count(Rsvp.id)).where(Rsvp.slot_id == slot_id, Rsvp.status == "confirmed")
        )
    assert confirmed == capacity


async def test_cancel_with_token_frees_the_places(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=2)
    made = (await rsvp(app_client, event_id, slot_id, places=2)).json()
    token = made["cancel_token"]
    cancelled = await app_client.post("/api/v1/public/rsvps/cancel", json={"token": token})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert await slot_taken(ctx, slot_id) == 0
    again = await app_client.post("/api/v1/public/rsvps/cancel", json={"token": token})
    assert again.status_code == 409
    assert again.json()["reason"] == "already_cancelled"
    forged = await app_client.post("/api/v1/public/rsvps/cancel", json={"token": token + "x"})
    assert forged.status_code == 400
    assert forged.json()["reason"] == "link_invalid"


async def test_operator_cancel_and_listing(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=1)
    rsvp_id = (await rsvp(app_client, event_id, slot_id)).json()["rsvp"]["id"]
    listed = await app_client.get(f"/api/v1/events/{event_id}/rsvps", headers=tenant.headers)
    assert [r["id"] for r in listed.json()] == [rsvp_id]
    cancelled = await app_client.post(
        f"/api/v1/rsvps/{rsvp_id}/cancel",
        json={"reason": "double booking"},
        headers={**tenant.headers, "Idempotency-Key": "c-1"},
    )
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["cancel_reason"] == "double booking"
    replay = await app_client.post(
        f"/api/v1/rsvps/{rsvp_id}/cancel",
        json={"reason": "double booking"},
        headers={**tenant.headers, "Idempotency-Key": "c-1"},
    )
    assert replay.json() == cancelled.json()
    assert await slot_taken(ctx, slot_id) == 0
    got = await app_client.get(f"/api/v1/rsvps/{rsvp_id}", headers=tenant.headers)
    assert got.json()["status"] == "cancelled"
    no_token = await app_client.get(f"/api/v1/rsvps/{rsvp_id}")
    assert no_token.status_code == 401


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"email": "not-an-email"}, "invalid_request"),
        ({"email": None, "phone": "12"}, "invalid_request"),
        ({"email": None, "phone": "+1 555 000"}, "invalid_request"),
        ({"email": None}, "invalid_request"),
        ({"consent": False}, "invalid_request"),
        ({"places": 0}, "invalid_request"),
        ({"places": 11}, "invalid_request"),
        ({"places": 5}, "invalid_request"),  # more than the slot has
        ({"consent_text": "ok\x00"}, "invalid_request"),
        ({"consent_text": ""}, "invalid_request"),
        ({"slot_id": 0}, "invalid_request"),
        ({"slot_id": 2**63}, "invalid_request"),
        ({"slot_id": "x"}, "invalid_request"),
        ({"surprise": 1}, "invalid_request"),
    ],
)
async def test_bad_input_gets_a_reason(
    app_client: httpx.AsyncClient,
    tenant: Tenant,
    ctx: AppContext,
    fields: dict[str, object],
    reason: str,
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=4)
    response = await rsvp(app_client, event_id, slot_id, **fields)
    assert response.status_code == 422, response.text
    assert response.json()["reason"] == reason
    assert await slot_taken(ctx, slot_id) == 0


async def test_unknown_event_slot_and_closed_events(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=4)
    other_event, other_slot = await make_slot(ctx, tenant, capacity=4)
    assert (await rsvp(app_client, 2**62, slot_id)).status_code == 404
    assert (await rsvp(app_client, 0, slot_id)).status_code == 422
    wrong = await rsvp(app_client, event_id, other_slot)
    assert wrong.status_code == 404
    assert wrong.json()["reason"] == "not_found"
    for status in ("draft", "closed"):
        closed_event, closed_slot = await make_slot(ctx, tenant, capacity=4, status=status)
        refused = await rsvp(app_client, closed_event, closed_slot)
        assert refused.status_code == 409
        assert refused.json()["reason"] == "event_closed"
    assert other_event != event_id


async def test_tenancy_operator_routes_answer_404_across_orgs(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    intruder = await make_tenant(ctx)
    event_id, slot_id = await make_slot(ctx, tenant, capacity=2)
    rsvp_id = (await rsvp(app_client, event_id, slot_id)).json()["rsvp"]["id"]
    attempts: list[tuple[str, str, dict[str, object] | None]] = [
        ("GET", f"/api/v1/events/{event_id}/rsvps", None),
        ("GET", f"/api/v1/events/{event_id}/waitlist", None),
        ("GET", f"/api/v1/rsvps/{rsvp_id}", None),
        ("POST", f"/api/v1/rsvps/{rsvp_id}/cancel", {}),
    ]
    for method, path, body in attempts:
        response = await app_client.request(method, path, json=body, headers=intruder.headers)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["reason"] == "not_found"
    assert await slot_taken(ctx, slot_id) == 1
    own = await app_client.get(f"/api/v1/rsvps/{rsvp_id}", headers=tenant.headers)
    assert own.status_code == 200


async def test_audit_records_rsvps_and_stays_valid(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=1)
    token = (await rsvp(app_client, event_id, slot_id)).json()["cancel_token"]
    await rsvp(app_client, event_id, slot_id, waitlist=True)
    await app_client.post("/api/v1/public/rsvps/cancel", json={"token": token})
    async with ctx.db.reader() as session:
        actions = list(
            await session.scalars(
                select(audit.AuditEntry.action)
                .where(audit.AuditEntry.org_id == tenant.org_id)
                .order_by(audit.AuditEntry.id)
            )
        )
        result = await audit.verify(session, tenant.org_id)
    assert result.ok, result.describe()
    for action in ("rsvp.create", "waitlist.join", "rsvp.cancel", "waitlist.offer"):
        assert action in actions
