"""Fairness at the door of an RSVP: nothing before the event's `opens_at` (an RSVP, a
waiting-list join, a waiting-list claim), everything at it; one active RSVP per person
(email or phone) and slot, even when the same person sends two at once."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from zoneinfo import ZoneInfo

import httpx
from sqlalchemy import func, select

from popdrop.core.clock import FrozenClock
from popdrop.events.models import TimeSlot
from popdrop.rsvp.models import Rsvp
from popdrop.web.context import AppContext
from tests.conftest import Tenant
from tests.rsvp.helpers import make_slot, operator_cancel, rsvp, slot_taken

CLAIM = "/api/v1/public/waitlist/claim"
ZONE = ZoneInfo("Europe/Paris")  # make_slot's event


async def test_an_rsvp_before_opens_at_is_refused_and_at_opens_at_it_is_taken(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    opens_at = clock.now() + timedelta(hours=1)
    event_id, slot_id = await make_slot(ctx, tenant, capacity=5, opens_at=opens_at)

    early = await rsvp(app_client, event_id, slot_id, email="early@example.com")
    assert early.status_code == 409
    refusal = early.json()
    assert refusal["reason"] == "not_open_yet"
    assert refusal["opens_at"] == opens_at.isoformat()
    # The message says when, in the event's own time zone (Europe/Paris).
    assert opens_at.astimezone(ZONE).strftime("%H:%M") in refusal["message"]
    joining = await rsvp(app_client, event_id, slot_id, email="early@example.com", waitlist=True)
    assert joining.json()["reason"] == "not_open_yet"  # nor the waiting list
    clock.set(opens_at - timedelta(seconds=1))
    assert (await rsvp(app_client, event_id, slot_id)).json()["reason"] == "not_open_yet"
    assert await slot_taken(ctx, slot_id) == 0

    clock.set(opens_at)
    on_time = await rsvp(app_client, event_id, slot_id, email="early@example.com")
    assert on_time.status_code == 201, on_time.text
    assert on_time.json()["rsvp"]["status"] == "confirmed"
    assert await slot_taken(ctx, slot_id) == 1


async def test_a_waiting_list_claim_before_opens_at_is_refused_and_at_opens_at_it_confirms(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=1)
    holder = (await rsvp(app_client, event_id, slot_id)).json()["rsvp"]["id"]
    waiting = await rsvp(app_client, event_id, slot_id, email="wait@example.com", waitlist=True)
    [offer] = await operator_cancel(ctx, tenant, holder)
    assert offer.rsvp_id == waiting.json()["rsvp"]["id"]
    # The organizer moves the opening later while the offer is out.
    opens_at = clock.now() + timedelta(minutes=30)
    moved = await app_client.patch(
        f"/api/v1/events/{event_id}",
        json={"opens_at": opens_at.isoformat()},
        headers=tenant.headers,
    )
    assert moved.status_code == 200, moved.text

    body = {"event_id": event_id, "code": offer.code}
    early = await app_client.post(CLAIM, json=body)
    assert (early.status_code, early.json()["reason"]) == (409, "not_open_yet")
    clock.set(opens_at)
    claimed = await app_client.post(CLAIM, json=body)
    assert claimed.status_code == 200, claimed.text
    assert claimed.json()["rsvp"]["status"] == "confirmed"


async def test_a_second_rsvp_of_the_same_person_and_slot_is_refused_naming_the_first(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=1)
    other_slot = await _second_slot(ctx, slot_id)
    first = await rsvp(
        app_client, event_id, slot_id, email="Ann@Example.com", phone="+33 6 12 34 56 78"
    )
    first_id = first.json()["rsvp"]["id"]

    for contact in (
        {"email": "ann@example.com"},  # the same email, written otherwise
        {"email": "other@example.com", "phone": "+33612345678"},  # the same phone
    ):
        again = await rsvp(app_client, event_id, slot_id, **contact)
        assert again.status_code == 409, again.text
        answer = again.json()
        assert answer["reason"] == "already_rsvped"
        assert (answer["rsvp_id"], answer["status"]) == (first_id, "confirmed")
    # The slot is full now: still `already_rsvped` (not `slot_full`), waiting list or not.
    for waitlist in (False, True):
        full = await rsvp(app_client, event_id, slot_id, email="ann@example.com", waitlist=waitlist)
        assert full.json()["reason"] == "already_rsvped"
    assert await slot_taken(ctx, slot_id) == 1

    # Another slot of the same event is another booking.
    elsewhere = await rsvp(app_client, event_id, other_slot, email="ann@example.com")
    assert elsewhere.status_code == 201, elsewhere.text
    # A cancelled RSVP does not block a new one.
    cancelled = await app_client.post(
        "/api/v1/public/rsvps/cancel", json={"token": first.json()["cancel_token"]}
    )
    assert cancelled.status_code == 200, cancelled.text
    back = await rsvp(app_client, event_id, slot_id, email="ann@example.com")
    assert back.status_code == 201, back.text
    assert back.json()["rsvp"]["status"] == "confirmed"


async def test_the_same_person_sending_ten_rsvps_at_once_gets_one(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=50)
    answers = await asyncio.gather(
        *(rsvp(app_client, event_id, slot_id, email="twice@example.com") for _ in range(10))
    )
    assert Counter(a.status_code for a in answers) == {201: 1, 409: 9}
    assert {a.json()["reason"] for a in answers if a.status_code == 409} == {"already_rsvped"}
    assert await slot_taken(ctx, slot_id) == 1
    async with ctx.db.reader() as session:
        count = await session.scalar(
            select(func.count(Rsvp.id)).where(
                Rsvp.org_id == tenant.org_id, Rsvp.email == "twice@example.com"
            )
        )
    assert count == 1


async def _second_slot(ctx: AppContext, slot_id: int) -> int:
    """Another slot of the same event, right after `slot_id`."""
    async with ctx.db.transaction() as session:
        first = await session.get(TimeSlot, slot_id)
        assert first is not None
        slot = TimeSlot(
            org_id=first.org_id,
            event_id=first.event_id,
            label="later",
            starts_at=first.ends_at,
            ends_at=first.ends_at + timedelta(hours=1),
            capacity=5,
            taken=0,
        )
        session.add(slot)
        await session.flush()
        return slot.id
