"""Input that must be refused with a reason (never a 500, never a partial write), and CSV
exports whose every cell is safe to open in a spreadsheet.

- a product card with duplicate (ignoring case and blanks) or empty variant names;
- `true`/`false` where a number is expected (`"quantity": true` read as 1 before);
- a drop's `from_email` / `from_name` with a line break (mail header injection);
- a drop template that renders 30 MB: refused at create (`template_too_large`), at
  preview for the contact that triggers it, and at send time (the message fails, no
  provider call);
- an email such as `=1+1@example.com` in a CSV export (names were neutralised, emails not).
"""

from __future__ import annotations

import csv
import io
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from popdrop.core.csvsafe import csv_text, restore_cell
from popdrop.drops.models import Drop, SendRow
from popdrop.inventory.models import Product
from popdrop.vouchers.models import VoucherBatch
from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact
from tests.audience.test_pages import HTML, login
from tests.conftest import Tenant
from tests.drops.helpers import Recorder, drop_spec, sender, started_drop
from tests.events.helpers import make_shop


async def count(ctx: AppContext, model: Any, tenant: Tenant) -> int:
    async with ctx.db.reader() as session:
        return int(
            await session.scalar(
                select(func.count()).select_from(model).where(model.org_id == tenant.org_id)
            )
            or 0
        )


def refused(response: httpx.Response, reason: str = "invalid_request") -> dict[str, Any]:
    assert 400 <= response.status_code < 500, response.text
    body: dict[str, Any] = response.json()
    assert body["reason"] == reason, body
    return body


# --- product cards -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "variants",
    [["M", "M"], ["S", " s "], ["one size", "One Size"], [""], ["  "], ["M", ""], [True]],
    ids=["same", "case-and-blanks", "case", "empty", "blank", "one-empty", "bool"],
)
async def test_product_variants_must_be_named_and_distinct(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, variants: list[Any]
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    before = await count(ctx, Product, tenant)
    response = await app_client.post(
        f"/api/v1/events/{shop.event_id}/products",
        json={"title": "Hoodie", "price_minor": 4500, "variants": variants},
        headers=tenant.headers,
    )
    refused(response)
    assert await count(ctx, Product, tenant) == before


async def test_variant_names_are_trimmed(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    response = await app_client.post(
        f"/api/v1/events/{shop.event_id}/products",
        json={"title": "Hoodie", "price_minor": 4500, "variants": [" S ", "M"]},
        headers=tenant.headers,
    )
    assert response.status_code == 201, response.text
    assert [v["name"] for v in response.json()["variants"]] == ["S", "M"]


# --- booleans are not numbers ----------------------------------------------------------------


async def test_a_boolean_quantity_is_refused_and_issues_nothing(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    for body in (
        {"name": "spring", "quantity": True},
        {"name": "spring", "quantity": 5, "max_uses": True},
        {"name": "spring", "quantity": 5, "discount_value": False},
    ):
        response = await app_client.post(
            "/api/v1/voucher-batches", json=body, headers=tenant.headers
        )
        assert "true/false" in refused(response)["message"]
    assert await count(ctx, VoucherBatch, tenant) == 0
    ok = await app_client.post(
        "/api/v1/voucher-batches", json={"name": "spring", "quantity": 1}, headers=tenant.headers
    )
    assert ok.status_code == 201, ok.text


async def test_a_boolean_hold_quantity_or_stock_total_is_refused(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    hold = await app_client.post(
        "/api/v1/holds",
        json={"variant_id": shop.variant_id, "lane_id": shop.lane_id, "qty": True},
        headers=tenant.headers,
    )
    refused(hold)
    stock = await app_client.put(
        "/api/v1/stock",
        json={"variant_id": shop.variant_id, "lane_id": shop.lane_id, "total": True},
        headers=tenant.headers,
    )
    refused(stock)


# --- drops -------------------------------------------------------------------------------------


def drop_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = drop_spec().model_dump(mode="json", exclude_none=True)
    body.update(overrides)
    return body


@pytest.mark.parametrize(
    "fields",
    [
        {"from_email": "drops@popdrop.test\r\nBcc: everyone@example.com"},
        {"from_email": "drops@popdrop.test\nX-Injected: 1"},
        {"from_email": "a@popdrop.test, b@popdrop.test"},
        {"from_email": "Shop <drops@popdrop.test>"},
        {"from_name": "Tram Depot\r\nBcc: everyone@example.com"},
        {"sms_from": "+1500555\n0006"},
    ],
    ids=["crlf", "lf", "two-addresses", "display-name", "name-crlf", "sms-from-lf"],
)
async def test_header_fields_of_a_drop_refuse_line_breaks(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, fields: dict[str, str]
) -> None:
    response = await app_client.post(
        "/api/v1/drops", json=drop_body(**fields), headers=tenant.headers
    )
    refused(response)
    assert await count(ctx, Drop, tenant) == 0


HUGE = '{{ "x" * 30000000 }}'
# Renders 30 MB only for one contact: passes the create-time trial, fails later.
HUGE_FOR_BOOM = '{% if first_name == "Boom" %}{{ "x" * 30000000 }}{% endif %}Hi'


@pytest.mark.parametrize(
    "content",
    [
        {"email": {"default": {"subject": "Hi", "text": HUGE}}},
        {"email": {"default": {"subject": "Hi", "text": "t", "html": HUGE}}},
        {"email": {"default": {"subject": HUGE, "text": "t"}}},
        {"email": {"default": {"subject": "Hi", "text": "{{ range(100000)|join('x' * 9999) }}"}}},
        {
            "email": {
                "default": {
                    "subject": "Hi",
                    "text": "{% for i in range(99999) %}{{ 'y' * 999 }}{% endfor %}",
                }
            }
        },
    ],
    ids=["text", "html", "subject", "join", "loop"],
)
async def test_a_template_rendering_30_mb_is_refused_at_create(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, content: dict[str, Any]
) -> None:
    body = drop_body(variants=[{"name": "A", "content": content}])
    response = await app_client.post("/api/v1/drops", json=body, headers=tenant.headers)
    assert response.status_code == 422, response.text
    assert response.json()["reason"] == "template_too_large"
    assert await count(ctx, Drop, tenant) == 0


async def test_a_template_too_large_for_one_contact_is_refused_at_preview_and_send(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    boom = await add_contact(app_client, tenant, email="boom@example.com", first_name="Boom")
    ana = await add_contact(app_client, tenant, email="ana@example.com", first_name="Ana")
    content = {"email": {"default": {"subject": "Hi", "text": HUGE_FOR_BOOM}}}
    body = drop_body(variants=[{"name": "A", "content": content}])
    created = await app_client.post("/api/v1/drops", json=body, headers=tenant.headers)
    assert created.status_code == 201, created.text
    drop_id = created.json()["id"]
    url = f"/api/v1/drops/{drop_id}/preview"
    fine = await app_client.get(url, params={"contact_id": ana["id"]}, headers=tenant.headers)
    assert fine.status_code == 200, fine.text
    assert fine.json()["email"]["text"].startswith("Hi")
    big = await app_client.get(url, params={"contact_id": boom["id"]}, headers=tenant.headers)
    assert big.status_code == 422, big.text[:300]
    assert big.json()["reason"] == "template_too_large"

    # At send time: Boom's message fails without a provider call, Ana's goes out.
    spec = drop_spec(variants=[{"name": "A", "content": content}])
    await started_drop(ctx, tenant, spec)
    email = Recorder()
    await sender(ctx, email, org=tenant).run_until_idle()
    assert email.to() == ["ana@example.com"]
    async with ctx.db.reader() as session:
        rows = (
            await session.execute(
                select(SendRow.status, SendRow.outcome).where(
                    SendRow.org_id == tenant.org_id, SendRow.contact_id == boom["id"]
                )
            )
        ).all()
    assert len(rows) == 1 and rows[0][0] == "failed"
    assert "characters" in (rows[0][1] or "")


# --- CSV exports -------------------------------------------------------------------------------


async def test_every_csv_export_column_is_neutralised(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await add_contact(
        app_client,
        tenant,
        email="=1+1@example.com",
        phone="+33612345678",
        first_name="@SUM(A1)",
        tags=["-2+3"],
    )
    await login(app_client, ctx, tenant, "owner")
    for path in ("/audience/export/contacts.csv", "/audience/export/sendable-email.csv"):
        response = await app_client.get(path, headers=HTML)
        assert response.status_code == 200
        rows = list(csv.reader(io.StringIO(response.text)))
        cells = [cell for row in rows[1:] for cell in row]
        assert "'=1+1@example.com" in cells, path
        assert "'@SUM(A1)" in cells and "'-2+3" in cells
        assert "+33612345678" in cells  # a plain number, kept for the round trip
        formulas = [c for c in cells if c[:1] in ("=", "@", "\t", "\r")]
        assert formulas == [], formulas


def test_csv_cells_and_their_round_trip() -> None:
    text = csv_text([["=1+1@example.com", "+33612345678", "-5", "-x", "\tA", None, 3, "ok"]])
    row = next(csv.reader(io.StringIO(text)))
    assert row == ["'=1+1@example.com", "+33612345678", "-5", "'-x", "'\tA", "", "3", "ok"]
    assert [restore_cell(c) for c in row[:5]] == [
        "=1+1@example.com",
        "+33612345678",
        "-5",
        "-x",
        "\tA",
    ]
    assert restore_cell("'quoted") == "'quoted"
