"""Events and slots made directly with the ORM (independent of the events service)."""

from __future__ import annotations

import itertools
import secrets
from datetime import datetime, timedelta
from typing import Any

import httpx

from popdrop.accounts.service import ROLES, Principal
from popdrop.events.models import Event, TimeSlot
from popdrop.rsvp import service
from popdrop.rsvp.notices import OfferMade
from popdrop.web.context import AppContext
from tests.conftest import Tenant

CONSENT = "I agree to be contacted about this event."
# A person has one active RSVP per slot: each call is another guest unless told.
_guests = itertools.count(1)


async def make_slot(
    ctx: AppContext,
    tenant: Tenant,
    *,
    capacity: int,
    status: str = "published",
    opens_at: datetime | None = None,
) -> tuple[int, int]:
    """Create an event (taking RSVPs from `opens_at` when given) and one slot; return
    (event id, slot id)."""
    now = ctx.clock.now()
    async with ctx.db.transaction() as session:
        event = Event(
            org_id=tenant.org_id,
            slug=f"ev-{secrets.token_hex(6)}",
            title="Pop-up",
            description="",
            venue_name="",
            venue_address="",
            timezone="Europe/Paris",
            starts_at=now + timedelta(days=1),
            ends_at=now + timedelta(days=1, hours=4),
            opens_at=opens_at,
            status=status,
            hold_ttl_seconds=900,
            max_hold_renewals=2,
            created_at=now,
        )
        session.add(event)
        await session.flush()
        slot = TimeSlot(
            org_id=tenant.org_id,
            event_id=event.id,
            label="10:00",
            starts_at=now + timedelta(days=1),
            ends_at=now + timedelta(days=1, hours=1),
            capacity=capacity,
            taken=0,
        )
        session.add(slot)
        await session.flush()
        return event.id, slot.id


def principal_of(tenant: Tenant) -> Principal:
    return Principal(tenant.org_id, "test:operator", "owner", ROLES["owner"])


async def operator_cancel(ctx: AppContext, tenant: Tenant, rsvp_id: int) -> list[OfferMade]:
    """Cancel an RSVP as the organization's operator; the waiting-list offers it made."""
    async with ctx.db.transaction() as session:
        result = await service.cancel_rsvp(
            session,
            ctx.signer,
            principal_of(tenant),
            rsvp_id=rsvp_id,
            reason="test",
            now=ctx.clock.now(),
        )
    assert result.rsvp.status == "cancelled"
    return result.offers


async def rsvp(
    client: httpx.AsyncClient, event_id: int, slot_id: int, /, **fields: Any
) -> httpx.Response:
    body: dict[str, Any] = {
        "slot_id": slot_id,
        "email": f"guest{next(_guests)}@example.com",
        "consent": True,
        "consent_text": CONSENT,
        **fields,
    }
    return await client.post(f"/api/v1/public/events/{event_id}/rsvps", json=body)


async def slot_taken(ctx: AppContext, slot_id: int) -> int:
    async with ctx.db.reader() as session:
        slot = await session.get(TimeSlot, slot_id)
        assert slot is not None
        return slot.taken
