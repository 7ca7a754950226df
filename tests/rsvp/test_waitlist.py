"""Waiting list: offers on cancel, expiry passing the place on, claims, party sizes.

Rule under test (see docs/rsvp.md): freed places go to the first waiting entry, in order
of arrival, whose party fits; larger parties keep their position for a later offer.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select

from popdrop.core.clock import FrozenClock
from popdrop.rsvp import tasks
from popdrop.rsvp.notices import OfferMade
from popdrop.vouchers import codes
from popdrop.vouchers.models import Voucher
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.rsvp.helpers import make_slot, operator_cancel, rsvp, slot_taken

CLAIM = "/api/v1/public/waitlist/claim"


async def _sweep(ctx: AppContext) -> list[OfferMade]:
    return await tasks.sweep_expired_offers(ctx.db, ctx.signer, ctx.clock)


async def _waitlist(client: httpx.AsyncClient, tenant: Tenant, event_id: int) -> dict[str, Any]:
    response = await client.get(f"/api/v1/events/{event_id}/waitlist", headers=tenant.headers)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def _status(client: httpx.AsyncClient, tenant: Tenant, rsvp_id: int) -> str:
    response = await client.get(f"/api/v1/rsvps/{rsvp_id}", headers=tenant.headers)
    return str(response.json()["status"])


async def test_cancel_offers_the_place_expiry_passes_it_on_and_a_claim_confirms(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=1)
    holder = (await rsvp(app_client, event_id, slot_id)).json()["rsvp"]["id"]
    first = await rsvp(app_client, event_id, slot_id, email="first@example.com", waitlist=True)
    clock.advance(timedelta(seconds=1))
    second = await rsvp(app_client, event_id, slot_id, email="second@example.com", waitlist=True)
    first_id, second_id = first.json()["rsvp"]["id"], second.json()["rsvp"]["id"]
    assert first.json()["rsvp"]["status"] == second.json()["rsvp"]["status"] == "waitlisted"

    # A cancel in the full slot: the first waiting contact gets a voucher, place held.
    [offer] = await operator_cancel(ctx, tenant, holder)
    assert offer.rsvp_id == first_id
    assert offer.email == "first@example.com"
    assert offer.expires_at == ctx.clock.now() + timedelta(hours=2)
    assert await slot_taken(ctx, slot_id) == 1  # held for the offer
    listing = await _waitlist(app_client, tenant, event_id)
    assert [(e["rsvp_id"], e["status"], e["position"]) for e in listing["entries"]] == [
        (first_id, "offered", None),
        (second_id, "waitlisted", 1),
    ]
    assert listing["entries"][0]["offer"]["status"] == "open"
    assert offer.code not in str(listing)  # the code is never shown
    # Meanwhile nobody else can take the held place.
    late = await rsvp(app_client, event_id, slot_id, email="late@example.com")
    assert late.json()["reason"] == "slot_full"

    # Unclaimed past its TTL: the sweep revokes it and the next contact gets one.
    clock.advance(timedelta(hours=2, seconds=1))
    [next_offer] = await _sweep(ctx)
    assert next_offer.rsvp_id == second_id
    assert await _status(app_client, tenant, first_id) == "lapsed"
    assert await slot_taken(ctx, slot_id) == 1
    async with ctx.db.reader() as session:
        revoked = await session.scalar(
            select(Voucher.revoked_at).where(
                Voucher.code_hash == ctx.signer.keyed_hash(codes.normalize(offer.code))
            )
        )
    assert revoked is not None

    stale = await app_client.post(CLAIM, json={"event_id": event_id, "code": offer.code})
    assert stale.status_code == 410
    assert stale.json()["reason"] == "expired"

    claimed = await app_client.post(CLAIM, json={"event_id": event_id, "code": next_offer.code})
    assert claimed.status_code == 200, claimed.text
    assert claimed.json()["rsvp"]["id"] == second_id
    assert claimed.json()["rsvp"]["status"] == "confirmed"
    assert claimed.json()["cancel_token"]
    again = await app_client.post(CLAIM, json={"event_id": event_id, "code": next_offer.code})
    assert again.status_code == 409
    assert again.json()["reason"] == "exhausted"
    assert await slot_taken(ctx, slot_id) == 1
    assert (await _waitlist(app_client, tenant, event_id))["entries"] == []


async def test_a_party_that_does_not_fit_is_skipped_and_keeps_its_place(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=2)
    a = (await rsvp(app_client, event_id, slot_id)).json()["rsvp"]["id"]
    b = (await rsvp(app_client, event_id, slot_id)).json()["rsvp"]["id"]
    pair = (await rsvp(app_client, event_id, slot_id, places=2, waitlist=True)).json()["rsvp"]
    clock.advance(timedelta(seconds=1))
    solo = (await rsvp(app_client, event_id, slot_id, waitlist=True)).json()["rsvp"]

    [offer] = await operator_cancel(ctx, tenant, a)  # one place free: the pair does not fit
    assert offer.rsvp_id == solo["id"]
    assert offer.places == 1
    listing = await _waitlist(app_client, tenant, event_id)
    waiting = [e for e in listing["entries"] if e["status"] == "waitlisted"]
    assert [(e["rsvp_id"], e["position"], e["places"]) for e in waiting] == [(pair["id"], 1, 2)]

    # The solo claims; then b cancels: one place free, still too small for the pair.
    claimed = await app_client.post(CLAIM, json={"event_id": event_id, "code": offer.code})
    assert claimed.status_code == 200
    assert await operator_cancel(ctx, tenant, b) == []
    assert await slot_taken(ctx, slot_id) == 1
    # The solo cancels too: two places free, now the pair gets them.
    [pair_offer] = await operator_cancel(ctx, tenant, solo["id"])
    assert (pair_offer.rsvp_id, pair_offer.places) == (pair["id"], 2)
    assert await slot_taken(ctx, slot_id) == 2


async def test_capacity_freed_without_a_cancel_is_offered_lazily(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    """An offer that expires with nobody waiting releases its places to everyone."""
    event_id, slot_id = await make_slot(ctx, tenant, capacity=1)
    holder = (await rsvp(app_client, event_id, slot_id)).json()["rsvp"]["id"]
    waiting = (await rsvp(app_client, event_id, slot_id, waitlist=True)).json()["rsvp"]["id"]
    [offer] = await operator_cancel(ctx, tenant, holder)
    assert offer.rsvp_id == waiting
    clock.advance(timedelta(hours=3))
    # No sweep ran: the next RSVP of the event sweeps lazily and gets the place.
    walk_in = await rsvp(app_client, event_id, slot_id, email="walkin@example.com")
    assert walk_in.status_code == 201, walk_in.text
    assert walk_in.json()["rsvp"]["status"] == "confirmed"
    assert await _status(app_client, tenant, waiting) == "lapsed"
    assert await slot_taken(ctx, slot_id) == 1


async def test_guest_cancelling_an_open_offer_passes_it_on(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=1)
    holder = (await rsvp(app_client, event_id, slot_id)).json()["rsvp"]["id"]
    first = (await rsvp(app_client, event_id, slot_id, waitlist=True)).json()
    clock.advance(timedelta(seconds=1))
    second = (await rsvp(app_client, event_id, slot_id, waitlist=True)).json()
    [offer] = await operator_cancel(ctx, tenant, holder)
    assert offer.rsvp_id == first["rsvp"]["id"]
    left = await app_client.post(
        "/api/v1/public/rsvps/cancel", json={"token": first["cancel_token"]}
    )
    assert left.json()["status"] == "cancelled"
    assert await _status(app_client, tenant, second["rsvp"]["id"]) == "offered"
    withdrawn = await app_client.post(CLAIM, json={"event_id": event_id, "code": offer.code})
    assert withdrawn.status_code == 410
    assert withdrawn.json()["reason"] == "revoked"
    assert await slot_taken(ctx, slot_id) == 1


async def test_claim_refusals_and_tenancy(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    intruder = await make_tenant(ctx)
    event_id, slot_id = await make_slot(ctx, tenant, capacity=1)
    other_event, _ = await make_slot(ctx, intruder, capacity=1)
    holder = (await rsvp(app_client, event_id, slot_id)).json()["rsvp"]["id"]
    await rsvp(app_client, event_id, slot_id, waitlist=True)
    [offer] = await operator_cancel(ctx, tenant, holder)

    cross = await app_client.post(CLAIM, json={"event_id": other_event, "code": offer.code})
    assert cross.status_code == 404
    assert cross.json()["reason"] == "unknown"
    for body, status, reason in [
        ({"event_id": event_id, "code": "nope"}, 422, "malformed"),
        ({"event_id": event_id}, 422, "invalid_request"),
        ({"event_id": 0, "code": offer.code}, 422, "invalid_request"),
        ({"event_id": 2**62, "code": offer.code}, 404, "not_found"),
        ({"event_id": event_id, "code": offer.code + "\x00"}, 422, "invalid_request"),
    ]:
        response = await app_client.post(CLAIM, json=body)
        assert (response.status_code, response.json()["reason"]) == (status, reason), body
    hidden = await app_client.get(f"/api/v1/events/{event_id}/waitlist", headers=intruder.headers)
    assert hidden.status_code == 404
    ok = await app_client.post(CLAIM, json={"event_id": event_id, "code": offer.code})
    assert ok.status_code == 200
