"""Scopes: events and RSVPs have their own, tokens made before the split keep working,
and the partner role (orders of its own events only) still logs in."""

from __future__ import annotations

import re
import secrets
from datetime import timedelta
from typing import Any

import httpx
import pytest

from popdrop.accounts import service as accounts
from popdrop.web.context import AppContext
from tests.conftest import Tenant, issue
from tests.rsvp.helpers import rsvp

NEW_SCOPES = frozenset({"events:read", "events:write", "rsvps:read", "rsvps:write"})
# What a token needed for events and RSVPs before they had scopes of their own.
OLD_SCOPES = frozenset({"vouchers:read", "vouchers:write"})
PASSWORD = "correct horse battery"
HTML = {"accept": "text/html,application/xhtml+xml"}
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


async def _token(ctx: AppContext, org_id: int, scopes: frozenset[str]) -> dict[str, str]:
    """A token stored with exactly these scopes (as an older release would have stored it:
    no scope validation on the way in)."""
    async with ctx.db.transaction() as session:
        _row, plaintext = await accounts.create_token(
            session,
            ctx.signer,
            org_id=org_id,
            name=f"scoped-{secrets.token_hex(3)}",
            scopes=scopes,
            created_by="test",
            now=ctx.clock.now(),
        )
    return {"Authorization": f"Bearer {plaintext}"}


async def _ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def _event_body(ctx: AppContext) -> dict[str, str]:
    now = ctx.clock.now()
    return {
        "slug": f"scoped-{secrets.token_hex(3)}",
        "title": "Scoped pop-up",
        "timezone": "Europe/Berlin",
        "starts_at": (now + timedelta(days=1)).isoformat(),
        "ends_at": (now + timedelta(days=2)).isoformat(),
    }


def test_roles_give_the_event_and_rsvp_scopes_to_owner_and_host_only() -> None:
    for role in ("owner", "host"):
        assert accounts.ROLES[role] >= NEW_SCOPES
    assert not accounts.ROLES["volunteer"] & NEW_SCOPES
    # A partner reads orders (commerce filters them to the events it partners), its own
    # POS connections and sales, and its till redeems codes; no more.
    assert accounts.ROLES["partner"] == frozenset(
        {"orders:read", "pos:read", "pos:redeem", "roi:read"}
    )
    assert {"metrics:read", "roi:read"} <= accounts.ROLES["host"]


def test_voucher_scopes_imply_event_and_rsvp_scopes_one_way() -> None:
    assert accounts.with_implied(frozenset({"vouchers:read"})) == {
        "vouchers:read",
        "events:read",
        "rsvps:read",
    }
    assert accounts.with_implied(OLD_SCOPES) >= NEW_SCOPES
    assert accounts.with_implied(NEW_SCOPES) == NEW_SCOPES  # nothing implies vouchers:*
    assert accounts.with_implied(frozenset({"vouchers:redeem"})) == {"vouchers:redeem"}


@pytest.mark.parametrize("scopes", [NEW_SCOPES, OLD_SCOPES], ids=["new-scopes", "old-vouchers"])
async def test_event_and_rsvp_routes_take_new_and_old_tokens(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, scopes: frozenset[str]
) -> None:
    headers = await _token(ctx, tenant.org_id, scopes)
    now = ctx.clock.now()
    event = await _ok(
        await app_client.post("/api/v1/events", json=_event_body(ctx), headers=headers), 201
    )
    event_id = event["id"]
    await _ok(
        await app_client.post(
            f"/api/v1/events/{event_id}/status", json={"status": "published"}, headers=headers
        )
    )
    slot = await _ok(
        await app_client.post(
            f"/api/v1/events/{event_id}/slots",
            json={
                "starts_at": (now + timedelta(days=1)).isoformat(),
                "ends_at": (now + timedelta(days=1, hours=1)).isoformat(),
                "capacity": 5,
            },
            headers=headers,
        ),
        201,
    )
    listed = (await app_client.get("/api/v1/events", headers=headers)).json()
    assert [e["id"] for e in listed] == [event_id]
    await _ok(await app_client.get("/api/v1/ical-link", headers=headers))

    booked = await rsvp(app_client, event_id, slot["id"])
    assert booked.status_code == 201, booked.text
    rsvp_id = booked.json()["rsvp"]["id"]
    rsvps = (await app_client.get(f"/api/v1/events/{event_id}/rsvps", headers=headers)).json()
    assert [r["id"] for r in rsvps] == [rsvp_id]
    await _ok(await app_client.get(f"/api/v1/events/{event_id}/waitlist", headers=headers))
    await _ok(await app_client.get(f"/api/v1/rsvps/{rsvp_id}", headers=headers))
    cancelled = await _ok(
        await app_client.post(
            f"/api/v1/rsvps/{rsvp_id}/cancel", json={"reason": "test"}, headers=headers
        )
    )
    assert cancelled["status"] == "cancelled"

    me = await _ok(await app_client.get("/api/v1/me", headers=headers))
    assert set(me["scopes"]) >= NEW_SCOPES


async def test_events_read_alone_reads_events_and_nothing_else(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    _batch, codes = await issue(app_client, tenant)
    reader = await _token(ctx, tenant.org_id, frozenset({"events:read"}))
    assert (await app_client.get("/api/v1/events", headers=reader)).status_code == 200

    refused = [
        await app_client.post("/api/v1/vouchers/redeem", json={"code": codes[0]}, headers=reader),
        await app_client.get("/api/v1/voucher-batches", headers=reader),
        await app_client.post("/api/v1/events", json=_event_body(ctx), headers=reader),
        await app_client.get("/api/v1/rsvps/1", headers=reader),
    ]
    for response in refused:
        assert (response.status_code, response.json()["reason"]) == (403, "forbidden"), (
            response.request.url
        )
    # The code was not touched: its owner still redeems it.
    redeemed = await app_client.post(
        "/api/v1/vouchers/redeem", json={"code": codes[0]}, headers=tenant.headers
    )
    assert redeemed.status_code == 200, redeemed.text


async def test_tokens_are_made_with_the_new_scopes_and_not_the_retired_one(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    made = await app_client.post(
        "/api/v1/tokens",
        json={"name": "calendar", "scopes": ["events:read", "rsvps:read"]},
        headers=tenant.headers,
    )
    assert made.status_code == 201, made.text
    assert made.json()["scopes"] == ["events:read", "rsvps:read"]
    retired = await app_client.post(
        "/api/v1/tokens",
        json={"name": "report", "scopes": ["reports:read"]},
        headers=tenant.headers,
    )
    assert (retired.status_code, retired.json()["reason"]) == (422, "invalid_request")


async def _login(client: httpx.AsyncClient, ctx: AppContext, org_id: int, role: str) -> None:
    email = f"{role}-{secrets.token_hex(4)}@scopes.test"
    async with ctx.db.transaction() as session:
        await accounts.create_user(
            session, org_id=org_id, email=email, password=PASSWORD, role=role, now=ctx.clock.now()
        )
    page = await client.get("/login", headers=HTML)
    match = CSRF_RE.search(page.text)
    assert match
    form = {"csrf": match.group(1), "email": email, "password": PASSWORD, "next": "/"}
    assert (await client.post("/login", data=form, headers=HTML)).status_code == 303


async def test_partner_logs_in_and_sees_no_event_page(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await _login(app_client, ctx, tenant.org_id, "partner")
    landing = await app_client.get("/", headers=HTML)
    assert landing.status_code == 303 and landing.headers["location"] == "/home"
    home = await app_client.get("/home", headers=HTML)
    assert home.status_code == 200 and "partner" in home.text
    assert 'href="/events"' not in home.text and 'href="/vouchers"' not in home.text
    refused = await app_client.get("/events", headers=HTML)
    assert refused.status_code == 403 and "events:read" in refused.text


async def test_host_session_reaches_the_event_pages(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await _login(app_client, ctx, tenant.org_id, "host")
    page = await app_client.get("/events", headers=HTML)
    assert page.status_code == 200, page.text
    assert 'href="/events"' in page.text
