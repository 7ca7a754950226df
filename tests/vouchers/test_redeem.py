"""Redemption through the HTTP API: every reason, TTL, dry run, rollback, idempotency."""

from __future__ import annotations

from datetime import timedelta

import httpx

from popdrop.core.clock import FrozenClock
from popdrop.vouchers import codes
from tests.conftest import Tenant, issue

REDEEM = "/api/v1/vouchers/redeem"


async def redeem(client: httpx.AsyncClient, tenant: Tenant, code: str, **extra: object):
    headers = dict(tenant.headers)
    key = extra.pop("key", None)
    if key:
        headers["Idempotency-Key"] = str(key)
    return await client.post(REDEEM, json={"code": code, **extra}, headers=headers)


async def test_a_code_redeems_once_then_is_exhausted(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    _batch, [code] = await issue(
        app_client, tenant, discount_kind="percent", discount_value=15, prefix="WKND"
    )
    assert code.startswith("WKND-")
    first = await redeem(app_client, tenant, code.lower().replace("-", ""), order_ref="o-1")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["remaining_uses"] == 0
    assert body["discount"]["kind"] == "percent" and body["discount"]["value"] == 15
    assert body["redemption"]["order_ref"] == "o-1"
    again = await redeem(app_client, tenant, code)
    assert again.status_code == 409
    assert again.json()["reason"] == "exhausted"


async def test_refusal_reasons(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    now = clock.now()
    _, [code] = await issue(app_client, tenant)
    wrong_check = code[:-1] + ("0" if code[-1] != "0" else "1")
    assert (await redeem(app_client, tenant, wrong_check)).json()["reason"] == "malformed"
    assert (await redeem(app_client, tenant, "hello")).json()["reason"] == "malformed"
    unknown = codes.format_code(codes.new_code())
    response = await redeem(app_client, tenant, unknown)
    assert (response.status_code, response.json()["reason"]) == (404, "unknown")

    _, [later] = await issue(app_client, tenant, valid_from=(now + timedelta(hours=1)).isoformat())
    response = await redeem(app_client, tenant, later)
    assert (response.status_code, response.json()["reason"]) == (409, "not_yet_valid")
    clock.advance(timedelta(hours=1))
    assert (await redeem(app_client, tenant, later)).status_code == 200

    _, [short] = await issue(
        app_client, tenant, valid_until=(clock.now() + timedelta(minutes=5)).isoformat()
    )
    clock.advance(timedelta(minutes=5))
    response = await redeem(app_client, tenant, short)
    assert (response.status_code, response.json()["reason"]) == (410, "expired")

    _, [revoked] = await issue(app_client, tenant)
    response = await app_client.post(
        "/api/v1/vouchers/revoke",
        json={"code": revoked, "reason": "leaked"},
        headers=tenant.headers,
    )
    assert response.json() == {"revoked": 1}
    response = await redeem(app_client, tenant, revoked)
    assert (response.status_code, response.json()["reason"]) == (410, "revoked")


async def test_ttl_counts_from_issue(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    _, [code] = await issue(app_client, tenant, ttl_seconds=8 * 3600)
    clock.advance(timedelta(hours=7, minutes=59))
    lookup = await app_client.post(
        "/api/v1/vouchers/validate", json={"code": code}, headers=tenant.headers
    )
    assert lookup.status_code == 200 and lookup.json()["status"] == "valid"
    clock.advance(timedelta(minutes=1))
    assert (await redeem(app_client, tenant, code)).json()["reason"] == "expired"


async def test_per_contact_limit_and_budget(app_client: httpx.AsyncClient, tenant: Tenant) -> None:
    _, batch_codes = await issue(app_client, tenant, quantity=4, per_contact_limit=2)
    assert (await redeem(app_client, tenant, batch_codes[0], contact_ref="c1")).status_code == 200
    assert (await redeem(app_client, tenant, batch_codes[1], contact_ref="c1")).status_code == 200
    third = await redeem(app_client, tenant, batch_codes[2], contact_ref="c1")
    assert (third.status_code, third.json()["reason"]) == (409, "contact_limit")
    # The refused attempt consumed nothing: another contact can still use that code.
    assert (await redeem(app_client, tenant, batch_codes[2], contact_ref="c2")).status_code == 200

    batch, money_codes = await issue(
        app_client,
        tenant,
        quantity=3,
        budget_minor=1000,
        discount_kind="fixed",
        discount_value=500,
        currency="EUR",
    )
    assert batch["cost_per_use_minor"] == 500
    assert (await redeem(app_client, tenant, money_codes[0])).status_code == 200
    assert (await redeem(app_client, tenant, money_codes[1])).status_code == 200
    over = await redeem(app_client, tenant, money_codes[2])
    assert (over.status_code, over.json()["reason"]) == (409, "budget_exhausted")
    detail = (
        await app_client.get(f"/api/v1/voucher-batches/{batch['id']}", headers=tenant.headers)
    ).json()
    assert detail["budget_spent_minor"] == 1000
    assert detail["stats"]["uses"] == 2


async def test_validate_is_a_dry_run(app_client: httpx.AsyncClient, tenant: Tenant) -> None:
    _, [code] = await issue(app_client, tenant)
    for _ in range(3):
        response = await app_client.post(
            "/api/v1/vouchers/validate", json={"code": code}, headers=tenant.headers
        )
        assert response.status_code == 200 and response.json()["uses"] == 0
    assert (await redeem(app_client, tenant, code)).status_code == 200
    response = await app_client.post(
        "/api/v1/vouchers/validate", json={"code": code}, headers=tenant.headers
    )
    assert response.json()["reason"] == "exhausted"


async def test_rollback_gives_the_use_back_once(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    batch, [code] = await issue(
        app_client, tenant, per_contact_limit=1, budget_minor=300, cost_per_use_minor=300
    )
    redemption = (await redeem(app_client, tenant, code, contact_ref="c")).json()["redemption"]
    url = f"/api/v1/redemptions/{redemption['id']}/rollback"
    undone = await app_client.post(url, json={"reason": "returned"}, headers=tenant.headers)
    assert undone.status_code == 200 and undone.json()["rollback_reason"] == "returned"
    twice = await app_client.post(url, json={"reason": "again"}, headers=tenant.headers)
    assert (twice.status_code, twice.json()["reason"]) == (409, "already_rolled_back")
    # Use, contact allowance and budget are all back.
    assert (await redeem(app_client, tenant, code, contact_ref="c")).status_code == 200
    history = await app_client.get(
        f"/api/v1/redemptions?batch_id={batch['id']}", headers=tenant.headers
    )
    assert [r["rolled_back_at"] is None for r in history.json()] == [True, False]


async def test_idempotent_retry_returns_the_same_answer(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    _, [code, other] = await issue(app_client, tenant, quantity=2, max_uses=5)
    first = await redeem(app_client, tenant, code, key="k-1")
    second = await redeem(app_client, tenant, code, key="k-1")
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert first.json()["uses"] == 1
    reused = await redeem(app_client, tenant, other, key="k-1")
    assert (reused.status_code, reused.json()["reason"]) == (422, "idempotency_key_reused")
    # Refusals are answers too: a retried refusal stays the same refusal.
    bad = codes.format_code(codes.new_code())
    assert (await redeem(app_client, tenant, bad, key="k-2")).json()["reason"] == "unknown"
    assert (await redeem(app_client, tenant, bad, key="k-2")).json()["reason"] == "unknown"


async def test_revoking_a_batch_or_a_tag_stops_every_code(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    batch, batch_codes = await issue(app_client, tenant, quantity=3)
    response = await app_client.post(
        f"/api/v1/voucher-batches/{batch['id']}/revoke", json={}, headers=tenant.headers
    )
    assert response.json() == {"revoked": 3}
    assert (await redeem(app_client, tenant, batch_codes[0])).json()["reason"] == "revoked"
    _, _tagged_a = await issue(app_client, tenant, quantity=2, tag="sat")
    _, tagged_b = await issue(app_client, tenant, quantity=2, tag="sat")
    _, untagged = await issue(app_client, tenant, quantity=1, tag="sun")
    response = await app_client.post(
        "/api/v1/vouchers/revoke-tag", json={"tag": "sat"}, headers=tenant.headers
    )
    assert response.json() == {"revoked": 4}
    assert (await redeem(app_client, tenant, tagged_b[1])).json()["reason"] == "revoked"
    assert (await redeem(app_client, tenant, untagged[0])).status_code == 200


async def test_export_lists_states_without_codes(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    batch, batch_codes = await issue(app_client, tenant, quantity=3)
    await redeem(app_client, tenant, batch_codes[0])
    response = await app_client.get(
        f"/api/v1/voucher-batches/{batch['id']}/export", headers=tenant.headers
    )
    assert response.headers["content-type"].startswith("text/csv")
    lines = response.text.strip().splitlines()
    assert lines[0].startswith("voucher_id,status,uses")
    assert sorted(line.split(",")[1] for line in lines[1:]) == ["exhausted", "valid", "valid"]
    for code in batch_codes:
        assert code not in response.text and code.replace("-", "") not in response.text


async def test_issue_replay_never_reveals_codes_again(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    body = {"name": "once", "quantity": 2}
    headers = {**tenant.headers, "Idempotency-Key": "issue-1"}
    first = await app_client.post("/api/v1/voucher-batches", json=body, headers=headers)
    again = await app_client.post("/api/v1/voucher-batches", json=body, headers=headers)
    assert len(first.json()["codes"]) == 2
    assert again.status_code == 201
    assert again.json()["codes"] == [] and again.json()["replayed"] is True
    assert again.json()["batch"]["id"] == first.json()["batch"]["id"]
