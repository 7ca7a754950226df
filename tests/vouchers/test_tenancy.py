"""A token of one organization never reads or touches another's vouchers."""

from __future__ import annotations

import re

import httpx
from fastapi.routing import APIRoute

from popdrop.web.context import AppContext
from tests.conftest import Tenant, issue, make_tenant


async def test_every_voucher_route_answers_404_across_tenants(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    intruder = await make_tenant(ctx)
    batch, [code, other] = await issue(app_client, tenant, quantity=2)
    redeemed = await app_client.post(
        "/api/v1/vouchers/redeem", json={"code": other}, headers=tenant.headers
    )
    redemption_id = redeemed.json()["redemption"]["id"]
    voucher_id = redeemed.json()["redemption"]["voucher_id"]
    batch_id = batch["id"]

    attempts = {
        ("GET", "/api/v1/voucher-batches/{batch_id}"): (
            f"/api/v1/voucher-batches/{batch_id}",
            None,
        ),
        ("POST", "/api/v1/voucher-batches/{batch_id}/revoke"): (
            f"/api/v1/voucher-batches/{batch_id}/revoke",
            {},
        ),
        ("GET", "/api/v1/voucher-batches/{batch_id}/export"): (
            f"/api/v1/voucher-batches/{batch_id}/export",
            None,
        ),
        ("POST", "/api/v1/vouchers/redeem"): ("/api/v1/vouchers/redeem", {"code": code}),
        ("POST", "/api/v1/vouchers/validate"): ("/api/v1/vouchers/validate", {"code": code}),
        ("POST", "/api/v1/vouchers/lookup"): ("/api/v1/vouchers/lookup", {"code": code}),
        ("GET", "/api/v1/vouchers/{voucher_id}"): (f"/api/v1/vouchers/{voucher_id}", None),
        ("POST", "/api/v1/vouchers/{voucher_id}/revoke"): (
            f"/api/v1/vouchers/{voucher_id}/revoke",
            {},
        ),
        ("POST", "/api/v1/vouchers/revoke"): ("/api/v1/vouchers/revoke", {"code": code}),
        ("POST", "/api/v1/vouchers/links"): ("/api/v1/vouchers/links", {"code": code}),
        ("POST", "/api/v1/redemptions/{redemption_id}/rollback"): (
            f"/api/v1/redemptions/{redemption_id}/rollback",
            {"reason": "steal"},
        ),
    }
    for (method, _template), (url, body) in attempts.items():
        response = await app_client.request(method, url, json=body, headers=intruder.headers)
        assert response.status_code == 404, (method, url, response.text)
        assert response.json()["reason"] in {"not_found", "unknown"}

    # Listing routes answer 200 but show nothing of the other organization.
    for url in (
        "/api/v1/voucher-batches",
        "/api/v1/redemptions",
        f"/api/v1/redemptions?batch_id={batch_id}",
    ):
        response = await app_client.get(url, headers=intruder.headers)
        assert response.status_code == 200 and response.json() == [], url
    tag = await app_client.post(
        "/api/v1/vouchers/revoke-tag", json={"tag": "any"}, headers=intruder.headers
    )
    assert tag.json() == {"revoked": 0}

    # Nothing changed for the owner.
    still = await app_client.post(
        "/api/v1/vouchers/redeem", json={"code": code}, headers=tenant.headers
    )
    assert still.status_code == 200

    # Every id-addressed voucher route of the app is covered above.
    app = app_client._transport.app  # type: ignore[attr-defined]
    id_routes = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute)
        and re.search(r"voucher|redemption", route.path)
        and "{" in route.path
        for method in route.methods
    }
    assert id_routes <= set(attempts), id_routes - set(attempts)


async def test_scopes_limit_what_a_token_can_do(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    _, [_code] = await issue(app_client, tenant)
    pos = await make_tenant(ctx, scopes=frozenset({"vouchers:redeem"}))
    response = await app_client.post(
        "/api/v1/voucher-batches", json={"name": "x", "quantity": 1}, headers=pos.headers
    )
    assert (response.status_code, response.json()["reason"]) == (403, "forbidden")
    missing = await app_client.get("/api/v1/voucher-batches")
    assert (missing.status_code, missing.json()["reason"]) == (401, "unauthorized")
    forged = await app_client.get(
        "/api/v1/voucher-batches", headers={"Authorization": "Bearer pd_forged"}
    )
    assert forged.status_code == 401


async def test_a_revoked_token_stops_working(app_client: httpx.AsyncClient, tenant: Tenant) -> None:
    created = await app_client.post(
        "/api/v1/tokens", json={"name": "pos", "scopes": ["vouchers:read"]}, headers=tenant.headers
    )
    assert created.status_code == 201
    token = created.json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert (await app_client.get("/api/v1/voucher-batches", headers=headers)).status_code == 200
    listed = await app_client.get("/api/v1/tokens", headers=tenant.headers)
    assert token not in listed.text  # shown once, never listed
    gone = await app_client.delete(f"/api/v1/tokens/{created.json()['id']}", headers=tenant.headers)
    assert gone.status_code == 204
    assert (await app_client.get("/api/v1/voucher-batches", headers=headers)).status_code == 401
