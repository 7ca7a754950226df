"""The `/partners/sales` host page over ASGI: POS sales (refunds visible) and tills,
connecting a till through the form (its webhook URL and a generated secret shown once),
refusals as 4xx pages that write nothing, and a partner login that sees only its own."""

from __future__ import annotations

import re
from typing import Any

import httpx
from sqlalchemy import func, select

from popdrop.partners.models import PosConnection
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.events.test_pages import HTML, csrf_of, login
from tests.partners.helpers import make_till, send_standard, standard_sale

PAGE = "/partners/sales"


async def connections(ctx: AppContext, org_id: int) -> int:
    async with ctx.db.reader() as session:
        found = await session.scalar(select(func.count()).where(PosConnection.org_id == org_id))
    return int(found or 0)


async def connect(
    client: httpx.AsyncClient, fields: dict[str, Any], csrf: str | None = None
) -> httpx.Response:
    if csrf is None:
        page = await client.get(PAGE, headers=HTML)
        assert page.status_code == 200, page.text
        csrf = csrf_of(page.text)
    data = {"csrf": csrf, **{k: str(v) for k, v in fields.items()}}
    return await client.post(f"{PAGE}/connections", data=data, headers=HTML)


async def two_partners_selling(client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant) -> Any:
    """Our partner (the `partner` login's email) sold twice, one refunded; another
    partner of another event sold once."""
    now = ctx.clock.now()
    ours = await make_till(
        client, tenant, now, slug="ours", partner_email=f"partner-{tenant.slug}@pages.test"
    )
    theirs = await make_till(client, tenant, now, slug="theirs", partner_email="x@other.example")
    sent = [
        (ours, standard_sale(), "m1"),
        (ours, standard_sale(external_id="S-1002", event_id="evt-1002", codes=[]), "m2"),
        (
            ours,
            standard_sale(
                kind="refund", refunds="S-1001", external_id="R-1", event_id="evt-r1",
                lines=[],
                totals={"subtotal_minor": 1500, "total_minor": 1500},
            ),
            "m3",
        ),
        (theirs, standard_sale(external_id="T-9", event_id="evt-t9"), "m4"),
    ]  # fmt: skip
    for till, body, webhook_id in sent:
        answer = await send_standard(client, till, body, now, webhook_id=webhook_id)
        assert answer.status_code == 200, answer.text
    return ours, theirs


async def test_host_sees_sales_refunds_and_tills(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    ours, theirs = await two_partners_selling(app_client, ctx, tenant)
    await login(app_client, ctx, tenant, "owner")
    page = await app_client.get(PAGE, headers=HTML)
    assert page.status_code == 200, page.text
    text = page.text
    assert 'href="/partners/sales"' in text  # the nav names the page
    rows = re.findall(r'<tr data-sale="\d+" data-status="([a-z_]+)">', text)
    assert sorted(rows) == ["active", "active", "partially_refunded"]
    assert re.search(r'id="sale-count">3<', text)
    assert "\u221215.00 EUR refunded" in text  # on the refunded sale's row
    assert 'id="refunded-total">15.00 EUR<' in text
    assert text.count("Corner shop") >= 2  # each till's partner is named
    for till in (ours, theirs):
        assert f"/pos/webhooks/{till.standard}" in text
        assert f"/pos/square/{till.square}" in text
    assert ours.standard_secret not in text  # a stored secret is never shown
    assert 'id="new-connection"' in text


async def test_host_connects_a_till_and_sees_the_secret_once(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    ours, _ = await two_partners_selling(app_client, ctx, tenant)
    other = await make_tenant(ctx)
    foreign = await make_till(app_client, other, ctx.clock.now(), slug="foreign")
    await login(app_client, ctx, tenant, "owner")
    before = await connections(ctx, tenant.org_id)
    refusals: list[tuple[dict[str, Any], int, str]] = [
        ({"provider": "standard"}, 422, "choose the partner"),
        ({"partner_id": ours.partner_id, "provider": "clover"}, 422, "Input should be"),
        ({"partner_id": ours.partner_id, "provider": "square"}, 422, "needs the secret"),
        ({"partner_id": ours.partner_id, "provider": "standard", "account_id": "a b"}, 422, ""),
        ({"partner_id": foreign.partner_id, "provider": "standard"}, 404, "not found"),
        ({"partner_id": "x", "provider": "standard"}, 422, ""),
    ]
    for fields, status, message in refusals:
        answer = await connect(app_client, fields)
        assert answer.status_code == status, (fields, answer.text)
        assert message in answer.text and 'id="new-connection"' in answer.text
    typed = await connect(
        app_client, {"partner_id": ours.partner_id, "provider": "square", "secret": "short"}
    )
    assert typed.status_code == 422 and "short" not in re.findall(r'value="([^"]*)"', typed.text)
    forged = await connect(
        app_client, {"partner_id": ours.partner_id, "provider": "standard"}, csrf="x"
    )
    assert forged.status_code == 403
    assert await connections(ctx, tenant.org_id) == before

    made = await connect(
        app_client,
        {"partner_id": ours.partner_id, "provider": "standard", "location_id": "loc-9"},
    )
    assert made.status_code == 201, made.text
    assert made.headers["cache-control"] == "no-store"
    secret = re.search(r'id="created-secret"[^>]*>([^<]+)<', made.text).group(1)  # type: ignore[union-attr]
    assert secret.startswith("whsec_")
    url = re.search(r'id="created-url"[^>]*>([^<]+)<', made.text).group(1)  # type: ignore[union-attr]
    assert re.fullmatch(r"https?://[^/]+/pos/webhooks/\d+", url)
    assert await connections(ctx, tenant.org_id) == before + 1
    again = await app_client.get(PAGE, headers=HTML)
    assert secret not in again.text and url in again.text and "location loc-9" in again.text

    given = await connect(
        app_client,
        {"partner_id": ours.partner_id, "provider": "shopify", "secret": "shopify-secret-1"},
    )
    assert given.status_code == 201 and 'id="created-secret"' not in given.text
    assert "shopify-secret-1" not in given.text


async def test_a_partner_sees_only_its_own_sales_and_tills(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    ours, theirs = await two_partners_selling(app_client, ctx, tenant)
    await login(app_client, ctx, tenant, "partner")
    page = await app_client.get(PAGE, headers=HTML)
    assert page.status_code == 200, page.text
    assert len(re.findall(r"<tr data-sale=", page.text)) == 2
    assert f"/pos/webhooks/{ours.standard}" in page.text
    assert f"/pos/webhooks/{theirs.standard}" not in page.text
    assert 'id="new-connection"' not in page.text
    before = await connections(ctx, tenant.org_id)
    tried = await connect(
        app_client, {"partner_id": ours.partner_id, "provider": "standard"}, csrf_of(page.text)
    )
    assert tried.status_code == 403 and "forbidden" in tried.text
    assert await connections(ctx, tenant.org_id) == before
    # A volunteer has no POS scope at all.
    volunteer = httpx.AsyncClient(transport=app_client._transport, base_url=app_client.base_url)
    async with volunteer:
        await login(volunteer, ctx, tenant, "volunteer")
        assert (await volunteer.get(PAGE, headers=HTML)).status_code == 403
