"""Grouped redemption (`service.redeem_now`, PostgreSQL group commit): concurrent requests
share one statement, and each still gets the answer it would get alone; the audit chains
stay whole. On SQLite the same requests go one by one (the same assertions hold)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx
from sqlalchemy import func, select

from popdrop.core import audit
from popdrop.vouchers import codes, service
from popdrop.vouchers.models import Redemption, Voucher
from popdrop.web.context import AppContext
from tests.conftest import Tenant, issue, make_tenant

REDEEM = "/api/v1/vouchers/redeem"


async def _redeem_all(
    client: httpx.AsyncClient, tenant: Tenant, bodies: list[dict[str, object]]
) -> list[httpx.Response]:
    return await asyncio.gather(
        *(client.post(REDEEM, json=body, headers=tenant.headers) for body in bodies)
    )


async def _verify(ctx: AppContext) -> audit.VerifyResult:
    async with ctx.db.reader() as session:
        return await audit.verify(session)


def _group_items(ctx: AppContext) -> int:
    return sum(g.items for (db, _), g in service._GROUPS.items() if db == id(ctx.db))


async def test_concurrent_redemptions_of_one_single_use_code_give_one_success(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, backend: str
) -> None:
    _, [code] = await issue(app_client, tenant)
    responses = await _redeem_all(app_client, tenant, [{"code": code}] * 60)
    assert Counter(r.status_code for r in responses) == {200: 1, 409: 59}
    assert {r.json()["reason"] for r in responses if r.status_code == 409} == {"exhausted"}
    async with ctx.db.reader() as session:
        uses = await session.scalar(select(Voucher.uses).where(Voucher.org_id == tenant.org_id))
        count = await session.scalar(
            select(func.count(Redemption.id)).where(Redemption.org_id == tenant.org_id)
        )
    assert (uses, count) == (1, 1)
    verified = await _verify(ctx)
    assert verified.ok, verified.describe()


async def test_concurrent_distinct_codes_all_succeed_with_whole_audit_chains(
    app_client: httpx.AsyncClient, ctx: AppContext, backend: str
) -> None:
    tenants = [await make_tenant(ctx) for _ in range(2)]  # two orgs in the same groups
    asked: list[tuple[Tenant, str]] = []
    for tenant in tenants:
        _, batch_codes = await issue(app_client, tenant, quantity=120)
        asked += [(tenant, c) for c in batch_codes]
    before = _group_items(ctx)
    responses = await asyncio.gather(
        *(
            app_client.post(
                REDEEM,
                json={"code": code, "order_ref": f"order-{n}", "contact_ref": f"c{n}@x.test"},
                headers=tenant.headers,
            )
            for n, (tenant, code) in enumerate(asked)
        )
    )
    assert [r.status_code for r in responses] == [200] * len(asked), responses[0].text
    answers = [r.json() for r in responses]
    assert len({a["redemption"]["id"] for a in answers}) == len(asked)
    assert len({a["redemption"]["voucher_id"] for a in answers}) == len(asked)
    assert all(a["uses"] == 1 and a["remaining_uses"] == 0 for a in answers)
    for n, answer in enumerate(answers):
        assert answer["redemption"]["order_ref"] == f"order-{n}"
        assert answer["redemption"]["contact_ref"] == f"c{n}@x.test"
    if backend == "postgresql":  # they went to PostgreSQL in groups, not one by one
        assert _group_items(ctx) - before == len(asked)
    verified = await _verify(ctx)
    assert verified.ok, verified.describe()
    # Every redemption has its ledger entry on its voucher's chain, naming it.
    async with ctx.db.reader() as session:
        entries = (
            await session.scalars(
                select(audit.AuditEntry).where(audit.AuditEntry.action == "voucher.redeem")
            )
        ).all()
    by_subject = {(e.org_id, e.subject): e for e in entries}
    for (tenant, _), answer in zip(asked, answers, strict=True):
        voucher_id = answer["redemption"]["voucher_id"]
        entry = by_subject[(tenant.org_id, f"voucher:{voucher_id}")]
        assert entry.chain == audit.chain_for(f"voucher:{voucher_id}")
        payload = json.loads(entry.payload)
        assert payload["redemption"] == answer["redemption"]["id"]
        assert payload["order_ref"] == answer["redemption"]["order_ref"]
        assert payload["contact"] != answer["redemption"]["contact_ref"]  # a digest only


async def test_a_group_mixing_refusals_and_policies_answers_each_as_alone(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    _, plain = await issue(app_client, tenant, quantity=20)
    _, limited = await issue(app_client, tenant, quantity=10, per_contact_limit=2)
    _, budgeted = await issue(
        app_client,
        tenant,
        quantity=10,
        budget_minor=300,
        cost_per_use_minor=100,
        currency="EUR",
        discount_kind="fixed",
        discount_value=100,
    )
    bodies: list[dict[str, object]] = [{"code": c} for c in plain]
    bodies += [{"code": c, "contact_ref": "same-person"} for c in limited]
    bodies += [{"code": c} for c in budgeted]
    bodies += [
        {"code": plain[0]},
        {"code": codes.format_code(codes.new_code(""))},
    ]  # a repeat, an unknown
    responses = await _redeem_all(app_client, tenant, bodies)
    reasons = Counter("ok" if r.status_code == 200 else r.json()["reason"] for r in responses)
    assert reasons == {
        "ok": 20 + 2 + 3,
        "contact_limit": 8,
        "budget_exhausted": 7,
        "exhausted": 1,
        "unknown": 1,
    }, reasons
    verified = await _verify(ctx)
    assert verified.ok, verified.describe()
