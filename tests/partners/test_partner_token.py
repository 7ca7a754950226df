"""A partner's API token (created `--for` the partner's login) sees only that partner's POS
sales and orders over the API, like the partner's own login; a plain token with the same
scopes sees the organization's (SQLite, and PostgreSQL when set)."""

from __future__ import annotations

import httpx
from sqlalchemy import func, select, update

from popdrop.accounts import service as accounts
from popdrop.accounts.service import ROLES
from popdrop.core.clock import FrozenClock
from popdrop.partners.models import PosConnection, PosSale
from popdrop.web.context import AppContext
from tests.conftest import Tenant
from tests.partners.helpers import (
    SQUARE_PAYMENT,
    make_till,
    send_square,
    send_standard,
    standard_sale,
)


async def _token(
    ctx: AppContext, tenant: Tenant, clock: FrozenClock, acts_for: str | None
) -> dict[str, str]:
    async with ctx.db.transaction() as session:
        _row, plaintext = await accounts.create_token(
            session,
            ctx.signer,
            org_id=tenant.org_id,
            name="till reports",
            scopes=ROLES["partner"],
            created_by="test",
            now=clock.now(),
            acts_for=acts_for,
        )
    return {"Authorization": f"Bearer {plaintext}"}


async def test_a_partner_token_sees_only_its_partners_sales(
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

    pat = await _token(ctx, tenant, clock, "Pat@Corner.example")
    seen = await app_client.get("/api/v1/pos/sales", headers=pat)
    assert seen.status_code == 200
    assert [sale["partner_id"] for sale in seen.json()] == [ours.partner_id]

    plain = await _token(ctx, tenant, clock, None)
    everything = await app_client.get("/api/v1/pos/sales", headers=plain)
    assert sorted(sale["partner_id"] for sale in everything.json()) == sorted(
        [ours.partner_id, theirs.partner_id]
    )

    nobody = await _token(ctx, tenant, clock, "stranger@nowhere.example")
    assert (await app_client.get("/api/v1/pos/sales", headers=nobody)).json() == []


async def test_a_token_for_a_partner_is_made_over_the_api(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    made = await app_client.post(
        "/api/v1/tokens",
        json={"name": "corner till", "scopes": ["pos:read"], "acts_for": "pat@corner.example"},
        headers=tenant.headers,
    )
    assert made.status_code == 201, made.text
    bad = await app_client.post(
        "/api/v1/tokens",
        json={"name": "corner till", "scopes": ["pos:read"], "acts_for": "not an email"},
        headers=tenant.headers,
    )
    assert bad.status_code == 422 and bad.json()["reason"]


async def test_a_secret_the_server_cannot_open_answers_503_not_500(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, ctx: AppContext
) -> None:
    """After a change of the server's secret key without POPDROP_PREVIOUS_SECRET_KEYS a
    till's sealed secret cannot be opened: the delivery is refused as a server-side 503
    the till retries, never a 500, and nothing is recorded."""
    till = await make_till(app_client, tenant, clock.now(), slug="sealed")
    async with ctx.db.transaction() as session:
        await session.execute(
            update(PosConnection)
            .where(PosConnection.id == till.standard)
            .values(secrets_sealed=b"sealed under a key this server no longer has")
        )
    answer = await send_standard(app_client, till, standard_sale(), clock.now())
    assert answer.status_code == 503 and answer.json()["reason"] == "secret_unreadable"
    async with ctx.db.reader() as session:
        counted = select(func.count()).select_from(PosSale).where(PosSale.org_id == tenant.org_id)
        assert await session.scalar(counted) == 0
