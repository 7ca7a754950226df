"""The vault's batch list shows what was really issued and redeemed: a drop's batch is
made with no codes (one comes per recipient at send time), so its `quantity` is 0 while
its codes exist — the list counted `quantity` and showed 0."""

from __future__ import annotations

import re

import httpx

from popdrop.accounts import service as accounts
from popdrop.vouchers import service
from popdrop.vouchers.schemas import BatchCreate
from popdrop.web.context import AppContext
from tests.conftest import Tenant, issue, make_tenant
from tests.events.test_pages import HTML, login


def cells_of(listing: str, batch_id: int) -> tuple[str, str]:
    row = re.search(rf'<tr data-batch="{batch_id}">(.*?)</tr>', listing, re.S)
    assert row, f"batch {batch_id} is not listed"
    issued = re.search(r'class="num issued">\s*([\d,]+)', row.group(1))
    redeemed = re.search(r'class="num redeemed">\s*([\d,]+)', row.group(1))
    assert issued and redeemed
    return issued.group(1), redeemed.group(1)


async def test_a_drops_batch_lists_the_codes_its_recipients_got(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    owner = accounts.system_principal(tenant.org_id, "test:drops", role="owner")
    now = ctx.clock.now()
    async with ctx.db.transaction() as session:
        # As drops.service makes it: no codes at creation.
        batch, _ = await service.issue_batch(
            session,
            ctx.signer,
            owner,
            BatchCreate(name="Drop: spring", quantity=1).model_copy(update={"quantity": 0}),
            now=now,
        )
        # As the send pipeline issues them: one per recipient.
        issued = await service.issue_derived(
            session, ctx.signer, batch, ["contact:1", "contact:2", "contact:3"], now=now
        )
    first, second = (issued[f"contact:{n}"][1] for n in (1, 2))
    for code in (first, second):
        done = await app_client.post(
            "/api/v1/vouchers/redeem", json={"code": code}, headers=tenant.headers
        )
        assert done.status_code == 200, done.text
    back = await app_client.post(
        f"/api/v1/redemptions/{done.json()['redemption']['id']}/rollback",
        json={"reason": "returned"},
        headers=tenant.headers,
    )
    assert back.status_code == 200, back.text
    plain, _codes = await issue(app_client, tenant, quantity=4)

    await login(app_client, ctx, tenant, "owner")
    listing = await app_client.get("/vouchers", headers=HTML)
    assert listing.status_code == 200
    assert cells_of(listing.text, batch.id) == ("3", "1")  # a rolled-back use is not counted
    assert cells_of(listing.text, plain["id"]) == ("4", "0")


async def test_counts_stay_within_the_organization(ctx: AppContext, tenant: Tenant) -> None:
    owner = accounts.system_principal(tenant.org_id, "test:counts", role="owner")
    async with ctx.db.transaction() as session:
        batch, _ = await service.issue_batch(
            session, ctx.signer, owner, BatchCreate(name="Mine", quantity=2), now=ctx.clock.now()
        )
    other = await make_tenant(ctx)
    stranger = accounts.system_principal(other.org_id, "test:counts", role="owner")
    async with ctx.db.reader() as session:
        assert (await service.batch_counts(session, owner, [batch.id]))[batch.id].issued == 2
        assert (await service.batch_counts(session, stranger, [batch.id]))[batch.id].issued == 0
