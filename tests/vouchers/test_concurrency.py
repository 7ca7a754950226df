"""No double spend under load: hundreds of concurrent requests through the real app,
on SQLite and (in CI) PostgreSQL with a pool of real connections."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
from sqlalchemy import func, select

from popdrop.vouchers.models import Redemption, Voucher
from popdrop.web.context import AppContext
from tests.conftest import Tenant, issue

REDEEM = "/api/v1/vouchers/redeem"


async def _storm(
    client: httpx.AsyncClient, tenant: Tenant, code: str, n: int, key: str | None = None
) -> list[httpx.Response]:
    headers = dict(tenant.headers)
    if key:
        headers["Idempotency-Key"] = key
    return await asyncio.gather(
        *(client.post(REDEEM, json={"code": code}, headers=headers) for _ in range(n))
    )


async def _redemptions(ctx: AppContext, tenant: Tenant) -> int:
    async with ctx.db.reader() as session:
        count = await session.scalar(
            select(func.count(Redemption.id)).where(Redemption.org_id == tenant.org_id)
        )
    return int(count or 0)


async def test_500_concurrent_redemptions_of_a_single_use_code(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    _, [code] = await issue(app_client, tenant)
    responses = await _storm(app_client, tenant, code, 500)
    statuses = Counter(r.status_code for r in responses)
    reasons = Counter(r.json().get("reason") for r in responses if r.status_code != 200)
    assert statuses == {200: 1, 409: 499}
    assert reasons == {"exhausted": 499}
    assert await _redemptions(ctx, tenant) == 1


async def test_200_concurrent_on_max_uses_50(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    _, [code] = await issue(app_client, tenant, max_uses=50)
    responses = await _storm(app_client, tenant, code, 200)
    assert Counter(r.status_code for r in responses) == {200: 50, 409: 150}
    uses = sorted(r.json()["uses"] for r in responses if r.status_code == 200)
    assert uses == list(range(1, 51))  # each use number handed out exactly once
    async with ctx.db.reader() as session:
        stored = await session.scalar(select(Voucher.uses).where(Voucher.org_id == tenant.org_id))
    assert stored == 50
    assert await _redemptions(ctx, tenant) == 50


async def test_100_concurrent_retries_with_one_key_redeem_once(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    _, [code] = await issue(app_client, tenant, max_uses=100)
    responses = await _storm(app_client, tenant, code, 100, key="checkout-42")
    assert {r.status_code for r in responses} == {200}
    assert len({r.text for r in responses}) == 1  # every retry got the very same answer
    assert await _redemptions(ctx, tenant) == 1


async def test_concurrent_contact_limit_holds(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    _, batch_codes = await issue(app_client, tenant, quantity=40, per_contact_limit=3)
    responses = await asyncio.gather(
        *(
            app_client.post(
                REDEEM, json={"code": c, "contact_ref": "same-person"}, headers=tenant.headers
            )
            for c in batch_codes
        )
    )
    assert Counter(r.status_code for r in responses) == {200: 3, 409: 37}
    assert await _redemptions(ctx, tenant) == 3


async def test_concurrent_budget_is_never_overspent(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    batch, batch_codes = await issue(
        app_client, tenant, quantity=60, budget_minor=2_000, cost_per_use_minor=100
    )
    responses = await asyncio.gather(
        *(app_client.post(REDEEM, json={"code": c}, headers=tenant.headers) for c in batch_codes)
    )
    assert Counter(r.status_code for r in responses) == {200: 20, 409: 40}
    detail = await app_client.get(f"/api/v1/voucher-batches/{batch['id']}", headers=tenant.headers)
    assert detail.json()["budget_spent_minor"] == 2_000


async def test_redeems_rollbacks_and_revokes_racing_stay_consistent(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    # A fresh organization (no audit chain heads yet), one multi-use code with a budget:
    # redemptions, rollbacks and a revocation of a sibling batch all at once. Locks are
    # taken in one order everywhere, so nothing deadlocks and the books still balance.
    batch, [code] = await issue(
        app_client, tenant, max_uses=1_000, budget_minor=1_000_000, cost_per_use_minor=100
    )
    sibling, _ = await issue(app_client, tenant, quantity=50, tag="side")
    first = await _storm(app_client, tenant, code, 40)
    ids = [r.json()["redemption"]["id"] for r in first]
    racers = [
        *(app_client.post(REDEEM, json={"code": code}, headers=tenant.headers) for _ in range(60)),
        *(
            app_client.post(
                f"/api/v1/redemptions/{rid}/rollback", json={"reason": "r"}, headers=tenant.headers
            )
            for rid in ids[:20]
        ),
        app_client.post(
            f"/api/v1/voucher-batches/{sibling['id']}/revoke", json={}, headers=tenant.headers
        ),
    ]
    responses = await asyncio.gather(*racers)
    assert {r.status_code for r in responses} == {200}
    detail = await app_client.get(f"/api/v1/voucher-batches/{batch['id']}", headers=tenant.headers)
    stats = detail.json()["stats"]
    assert stats["redemptions"] == 100 and stats["rolled_back"] == 20
    assert stats["uses"] == 80
    assert detail.json()["budget_spent_minor"] == 80 * 100
