"""Events: a host sets one up, moves it through its life, shares its calendar."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import make_shop, post
from tests.server import running_server


async def test_event_life_and_bad_moves(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), status="draft")
    url = f"/api/v1/events/{shop.event_id}/status"
    skip = await app_client.post(url, json={"status": "live"}, headers=tenant.headers)
    assert (skip.status_code, skip.json()["reason"]) == (409, "invalid_transition")
    for status in ("published", "live", "closed"):
        moved = await app_client.post(url, json={"status": status}, headers=tenant.headers)
        assert moved.json()["status"] == status
    back = await app_client.post(url, json={"status": "published"}, headers=tenant.headers)
    assert back.status_code == 409
    dup = await app_client.post(
        "/api/v1/events",
        json={
            "slug": "pop-up",
            "title": "x",
            "starts_at": clock.now().isoformat(),
            "ends_at": (clock.now() + timedelta(hours=1)).isoformat(),
        },
        headers=tenant.headers,
    )
    assert (dup.status_code, dup.json()["reason"]) == (409, "conflict")


async def test_bad_event_input_is_refused(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    base = {
        "slug": "ok-slug",
        "title": "t",
        "starts_at": clock.now().isoformat(),
        "ends_at": (clock.now() + timedelta(hours=1)).isoformat(),
    }
    for change in (
        {"timezone": "Mars/Olympus"},
        {"ends_at": clock.now().isoformat()},
        {"starts_at": "2026-12-01T10:00:00"},
        {"slug": "Bad Slug"},
        {"latitude": 123},
    ):
        response = await app_client.post(
            "/api/v1/events", json={**base, **change}, headers=tenant.headers
        )
        assert (response.status_code, response.json()["reason"]) == (422, "invalid_request"), change


async def test_ical_feed_lists_published_events(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    await make_shop(app_client, tenant, clock.now(), slug="shown")
    await make_shop(app_client, tenant, clock.now(), status="draft", slug="hidden")
    link = (await app_client.get("/api/v1/ical-link", headers=tenant.headers)).json()["url"]
    feed = await app_client.get(link.split("://", 1)[1].split("/", 1)[1].join(["/", ""]))
    assert feed.status_code == 200
    assert feed.headers["content-type"].startswith("text/calendar")
    text = feed.text
    assert text.startswith("BEGIN:VCALENDAR\r\n") and text.endswith("END:VCALENDAR\r\n")
    assert text.count("BEGIN:VEVENT") == 1
    assert "SUMMARY:Weekend pop-up" in text and "LOCATION:Old Tram Depot" in text
    tampered = await app_client.get("/ical/nope.ics")
    assert tampered.status_code == 400


async def test_events_are_tenant_private(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    intruder = await make_tenant(ctx)
    for method, url, body in (
        ("GET", f"/api/v1/events/{shop.event_id}", None),
        ("POST", f"/api/v1/events/{shop.event_id}/status", {"status": "closed"}),
        ("GET", f"/api/v1/events/{shop.event_id}/slots", None),
        ("GET", f"/api/v1/events/{shop.event_id}/lanes", None),
        ("POST", f"/api/v1/events/{shop.event_id}/lanes", {"name": "x"}),
        ("POST", f"/api/v1/lanes/{shop.lane_id}/windows", {"slot_id": shop.slot_id, "capacity": 1}),
        ("POST", f"/api/v1/events/{shop.event_id}/partners", {"name": "x"}),
        ("POST", f"/api/v1/events/{shop.event_id}/products", {"title": "x", "price_minor": 1}),
    ):
        response = await app_client.request(method, url, json=body, headers=intruder.headers)
        assert response.status_code == 404, (method, url, response.text)
    mine = await app_client.get("/api/v1/events", headers=intruder.headers)
    assert mine.json() == []


async def test_availability_stream_sends_live_stock(tmp_path: Path) -> None:
    # A real server: the in-process ASGI transport buffers whole bodies, and SSE never ends.
    with running_server(tmp_path) as server:
        assert server.cli("org", "create", "sse", "SSE").returncode == 0
        created = server.cli(
            "token", "create", "--org", "sse", "--name", "t",
            "--scope", "vouchers:write", "--scope", "vouchers:read",
            "--scope", "inventory:write", "--scope", "holds:write",
        )  # fmt: skip
        tenant = Tenant(0, "sse", created.stdout.strip())
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            shop = await make_shop(client, tenant, datetime.now(UTC), units=4)
            url = f"/e/{shop.event_id}/availability/stream"
            async with client.stream("GET", url) as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                seen = ""
                async for chunk in stream.aiter_text():
                    seen += chunk
                    if seen.count("event: availability") == 1 and '"available": 4' in seen:
                        # Stock drops after a hold made through the API: the stream says so.
                        await post(
                            client,
                            tenant,
                            "/api/v1/holds",
                            {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "qty": 3},
                        )
                    if '"available": 1' in seen:
                        break
        assert seen.count("event: availability") == 2


async def test_a_host_edits_event_details(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    url = f"/api/v1/events/{shop.event_id}"
    later = clock.now() + timedelta(days=3)
    changed = await app_client.patch(
        url,
        json={"title": "Moved pop-up", "timezone": "Europe/Paris", "ends_at": later.isoformat()},
        headers=tenant.headers,
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert (body["title"], body["timezone"], body["slug"]) == (
        "Moved pop-up",
        "Europe/Paris",
        "pop-up",
    )
    assert body["venue_name"] == "Old Tram Depot"  # untouched fields stay
    backwards = await app_client.patch(
        url, json={"ends_at": clock.now().isoformat()}, headers=tenant.headers
    )
    assert (backwards.status_code, backwards.json()["reason"]) == (422, "invalid_request")
    assert (await app_client.get(url, headers=tenant.headers)).json()["ends_at"] == body["ends_at"]
    for bad in ({"slug": "new"}, {"timezone": "Nowhere/Land"}, {"hold_ttl_seconds": 5}):
        refused = await app_client.patch(url, json=bad, headers=tenant.headers)
        assert refused.status_code == 422, bad
    intruder = await make_tenant(ctx)
    stolen = await app_client.patch(url, json={"title": "x"}, headers=intruder.headers)
    assert stolen.status_code == 404
