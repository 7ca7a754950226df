"""Building blocks for tests that need an event with stock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx

from tests.conftest import Tenant


@dataclass
class Shop:
    event_id: int
    lane_id: int
    slot_id: int
    product_id: int
    variant_id: int


async def post(client: httpx.AsyncClient, tenant: Tenant, url: str, body: Any) -> dict[str, Any]:
    response = await client.post(url, json=body, headers=tenant.headers)
    assert response.status_code in (200, 201), (url, response.text)
    data: dict[str, Any] = response.json()
    return data


async def make_shop(
    client: httpx.AsyncClient,
    tenant: Tenant,
    now: datetime,
    *,
    units: int = 10,
    status: str = "published",
    window: int | None = None,
    limit_per_contact: int | None = None,
    slug: str = "pop-up",
) -> Shop:
    event = await post(
        client,
        tenant,
        "/api/v1/events",
        {
            "slug": slug,
            "title": "Weekend pop-up",
            "timezone": "Europe/Berlin",
            "venue_name": "Old Tram Depot",
            "starts_at": (now + timedelta(days=1)).isoformat(),
            "ends_at": (now + timedelta(days=2)).isoformat(),
            "hold_ttl_seconds": 600,
        },
    )
    if status != "draft":
        await post(client, tenant, f"/api/v1/events/{event['id']}/status", {"status": "published"})
    if status in ("live", "closed"):
        await post(client, tenant, f"/api/v1/events/{event['id']}/status", {"status": status})
    slot = await post(
        client,
        tenant,
        f"/api/v1/events/{event['id']}/slots",
        {
            "starts_at": (now + timedelta(days=1)).isoformat(),
            "ends_at": (now + timedelta(days=1, hours=1)).isoformat(),
            "capacity": 50,
        },
    )
    lane = await post(client, tenant, f"/api/v1/events/{event['id']}/lanes", {"name": "Front desk"})
    if window is not None:
        await post(
            client,
            tenant,
            f"/api/v1/lanes/{lane['id']}/windows",
            {"slot_id": slot["id"], "capacity": window},
        )
    product = await post(
        client,
        tenant,
        f"/api/v1/events/{event['id']}/products",
        {
            "title": "Tote bag",
            "price_minor": 1500,
            "variants": ["one size"],
            "limit_per_contact": limit_per_contact,
        },
    )
    variant_id = product["variants"][0]["id"]
    response = await client.put(
        "/api/v1/stock",
        json={"variant_id": variant_id, "lane_id": lane["id"], "total": units},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    return Shop(event["id"], lane["id"], slot["id"], product["id"], variant_id)
