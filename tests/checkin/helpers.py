"""Seeding for check-in tests: events through the ORM, tickets and scans through the API."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

import httpx

from popdrop.events.models import Event
from popdrop.web.context import AppContext
from tests.conftest import Tenant


def live_event(org_id: int, now: datetime, **fields: Any) -> Event:
    """A live event starting now for four hours (any column overridden by `fields`)."""
    values: dict[str, Any] = {
        "org_id": org_id,
        "slug": f"ev-{secrets.token_hex(4)}",
        "title": "Corner pop-up",
        "description": "Sneakers, coffee; and friends",
        "venue_name": "Corner Shop",
        "venue_address": "1 Main Street, Springfield",
        "timezone": "Europe/Paris",
        "starts_at": now,
        "ends_at": now + timedelta(hours=4),
        "status": "live",
        "hold_ttl_seconds": 900,
        "max_hold_renewals": 2,
        "created_at": now,
    }
    return Event(**{**values, **fields})


async def make_event(
    ctx: AppContext,
    org_id: int,
    *,
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
    title: str = "Corner pop-up",
) -> int:
    now = ctx.clock.now()
    starts_at = starts_at or now - timedelta(minutes=30)
    async with ctx.db.transaction() as session:
        event = live_event(
            org_id,
            now,
            title=title,
            starts_at=starts_at,
            ends_at=ends_at or starts_at + timedelta(hours=4),
        )
        session.add(event)
        await session.flush()
        return event.id


async def issue(
    client: httpx.AsyncClient,
    tenant: Tenant,
    event_id: int,
    subject_id: int | None = None,
    kind: str = "rsvp",
) -> dict[str, Any]:
    body = {
        "event_id": event_id,
        "subject_kind": kind,
        "subject_id": subject_id or secrets.randbelow(10**9) + 1,
        "holder_ref": "ada@example.test",
    }
    response = await client.post("/api/v1/tickets", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


async def scan(
    client: httpx.AsyncClient, tenant: Tenant, secret: str, nonce: str | None = None, **extra: Any
) -> httpx.Response:
    body = {"secret": secret, "nonce": nonce or secrets.token_hex(12), **extra}
    return await client.post("/api/v1/checkins", json=body, headers=tenant.headers)
