"""An RSVP becomes a QR ticket, and its check-in becomes the RSVP's tracked visit."""

from __future__ import annotations

import secrets
from datetime import timedelta

import httpx
from sqlalchemy import select

from popdrop.checkin.models import Visit
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.conftest import Tenant
from tests.rsvp.helpers import make_slot, rsvp


def secret_of(url: str) -> str:
    return url.rsplit("/t/", 1)[1]


async def scan(client: httpx.AsyncClient, tenant: Tenant, secret: str) -> httpx.Response:
    body = {"secret": secret, "nonce": secrets.token_hex(8), "gate": "front"}
    return await client.post("/api/v1/checkins", json=body, headers=tenant.headers)


async def test_rsvp_ticket_checks_in_as_a_visit_of_that_rsvp(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=5)
    created = await rsvp(app_client, event_id, slot_id, email="ada@example.org")
    assert created.status_code == 201, created.text
    ticket_url = created.json()["ticket_url"]
    assert ticket_url and "/t/" in ticket_url
    page = await app_client.get(f"/t/{secret_of(ticket_url)}")
    assert page.status_code == 200 and "<svg" in page.text

    clock.advance(timedelta(days=1, minutes=10))  # the doors are open
    first = await scan(app_client, tenant, secret_of(ticket_url))
    assert first.status_code == 200 and first.json()["result"] == "ok", first.text
    again = await scan(app_client, tenant, secret_of(ticket_url))
    assert again.json()["reason"] == "already_checked_in"
    async with ctx.db.reader() as session:
        visit = await session.scalar(select(Visit).where(Visit.org_id == tenant.org_id))
    assert visit is not None
    assert (visit.subject_kind, visit.subject_id) == ("rsvp", created.json()["rsvp"]["id"])


async def test_a_cancelled_rsvp_ticket_is_refused_at_the_door(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=5)
    created = (await rsvp(app_client, event_id, slot_id, email="bob@example.org")).json()
    cancelled = await app_client.post(
        "/api/v1/public/rsvps/cancel", json={"token": created["cancel_token"]}
    )
    assert cancelled.status_code == 200, cancelled.text
    clock.advance(timedelta(days=1, minutes=10))
    refused = await scan(app_client, tenant, secret_of(created["ticket_url"]))
    assert (refused.status_code, refused.json()["reason"]) == (410, "cancelled")


async def test_waitlisted_rsvps_get_no_ticket(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=1)
    assert (await rsvp(app_client, event_id, slot_id)).json()["ticket_url"]
    waiting = await rsvp(app_client, event_id, slot_id, email="w@example.org", waitlist=True)
    assert waiting.status_code == 201 and waiting.json()["ticket_url"] is None
