"""The partners API: hosts connect tills, a partner sees only its own connections and
sales, and a till validates and redeems vault codes (idempotent, per connection)."""

from __future__ import annotations

import asyncio

import httpx

from popdrop.accounts import service as accounts
from popdrop.accounts.service import ROLES, Principal
from popdrop.core.clock import FrozenClock
from popdrop.core.errors import PopdropError
from popdrop.partners import service
from popdrop.partners.lifecycle import PosProvider
from popdrop.web.context import AppContext
from tests.conftest import Tenant, issue, make_tenant
from tests.partners.helpers import (
    SQUARE_PAYMENT,
    make_till,
    send_square,
    send_standard,
    standard_sale,
)


def _partner(tenant: Tenant, email: str) -> Principal:
    """A partner's login (role `partner`), as its session stands for it."""
    return Principal(tenant.org_id, f"user:{email}", "partner", ROLES["partner"])


async def test_a_partner_sees_only_its_own_connections_and_sales(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    ours = await make_till(
        app_client, tenant, clock.now(), slug="ours", partner_email="pat@corner.example"
    )
    theirs = await make_till(
        app_client, tenant, clock.now(), slug="theirs", partner_email="kim@other.example"
    )
    await send_square(app_client, ours, SQUARE_PAYMENT)
    await send_standard(app_client, theirs, standard_sale(), clock.now())
    host = await app_client.get("/api/v1/pos/sales", headers=tenant.headers)
    assert len(host.json()) == 2
    pat = _partner(tenant, "pat@corner.example")
    async with ctx.db.reader() as session:
        seen = await service.list_sales(session, pat)
        connections = await service.list_connections(session, pat)
        assert {c.partner_id for c in connections} == {ours.partner_id}
        assert (await service.connection_of(session, pat, ours.standard)).id == ours.standard
        try:
            await service.connection_of(session, pat, theirs.standard)
        except PopdropError as error:
            assert error.reason == "not_found"
        else:
            raise AssertionError("a partner used another partner's till")
    assert [s.partner_id for s in seen] == [ours.partner_id]
    # A partner cannot connect tills.
    async with ctx.db.transaction() as session:
        try:
            await service.create_connection(
                session, pat, partner_id=ours.partner_id, provider=PosProvider.STANDARD,
                account_id=None, location_id=None, notification_url=None, secret=None,
                base_url="http://test", now=clock.now(),
            )  # fmt: skip
        except PopdropError as error:
            assert error.reason == "forbidden"
        else:
            raise AssertionError("a partner connected a till")
    # Another organization sees none of it.
    other = await make_tenant(ctx)
    assert (await app_client.get("/api/v1/pos/sales", headers=other.headers)).json() == []


async def test_secrets_are_never_shown_again(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    listed = await app_client.get("/api/v1/pos/connections", headers=tenant.headers)
    assert till.standard_secret not in listed.text and "square-signature-key" not in listed.text
    urls = {c["provider"]: c["delivery_url"] for c in listed.json()}
    assert urls["standard"].endswith(f"/pos/webhooks/{till.standard}")


async def test_a_connection_needs_the_provider_secret_and_an_own_partner(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    no_secret = await app_client.post(
        "/api/v1/pos/connections",
        json={"partner_id": till.partner_id, "provider": "shopify"},
        headers=tenant.headers,
    )
    assert (no_secret.status_code, no_secret.json()["reason"]) == (422, "invalid_request")
    other = await make_tenant(ctx)
    foreign = await app_client.post(
        "/api/v1/pos/connections",
        json={"partner_id": till.partner_id, "provider": "standard"},
        headers=other.headers,
    )
    assert foreign.status_code == 404


async def test_the_till_validates_then_redeems_once_with_a_key(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    _, [code] = await issue(app_client, tenant)
    pat = await make_tenant_token(ctx, tenant, frozenset({"pos:redeem"}))
    base = f"/api/v1/pos/connections/{till.standard}/codes"
    valid = await app_client.post(f"{base}/validate", json={"code": code}, headers=pat)
    assert valid.status_code == 200, valid.text
    keyed = {**pat, "Idempotency-Key": "till-sale-77"}
    answers = await asyncio.gather(
        *(
            app_client.post(f"{base}/redeem", json={"code": code, "order_ref": "77"}, headers=keyed)
            for _ in range(10)
        )
    )
    assert {r.status_code for r in answers} == {200}
    assert len({r.text for r in answers}) == 1
    again = await app_client.post(f"{base}/redeem", json={"code": code}, headers=pat)
    assert (again.status_code, again.json()["reason"]) == (409, "exhausted")
    redemptions = await app_client.get("/api/v1/redemptions", headers=tenant.headers)
    [one] = redemptions.json()
    assert one["order_ref"] == f"pos:{till.standard}:77"


async def test_the_till_needs_pos_redeem_and_its_own_organizations_connection(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    till = await make_till(app_client, tenant, clock.now())
    _, [code] = await issue(app_client, tenant)
    url = f"/api/v1/pos/connections/{till.standard}/codes/redeem"
    # vouchers:redeem alone does not reach the till route, and pos:redeem does not reach
    # the rest of the vault.
    vault_only = await make_tenant_token(ctx, tenant, frozenset({"vouchers:redeem"}))
    assert (await app_client.post(url, json={"code": code}, headers=vault_only)).status_code == 403
    till_only = await make_tenant_token(ctx, tenant, frozenset({"pos:redeem"}))
    batches = await app_client.get("/api/v1/voucher-batches", headers=till_only)
    assert batches.status_code == 403
    other = await make_tenant(ctx)
    foreign = await app_client.post(url, json={"code": code}, headers=other.headers)
    assert foreign.status_code == 404


async def make_tenant_token(
    ctx: AppContext, tenant: Tenant, scopes: frozenset[str]
) -> dict[str, str]:
    async with ctx.db.transaction() as session:
        _row, token = await accounts.create_token(
            session,
            ctx.signer,
            org_id=tenant.org_id,
            name="till",
            scopes=scopes,
            created_by="test",
            now=ctx.clock.now(),
        )
    return {"Authorization": f"Bearer {token}"}
