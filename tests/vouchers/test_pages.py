"""The voucher vault's server-rendered pages, driven like a browser over ASGI.

Self-contained on purpose (own SQLite database and app): the shared fixtures may change
shape while these pages are built.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from fastapi import FastAPI

from popdrop.accounts import service as accounts
from popdrop.accounts.service import ROLES, Principal
from popdrop.core.config import Settings
from popdrop.core.migrate import upgrade
from popdrop.vouchers import service
from popdrop.vouchers.pages import parse_issue_form
from popdrop.vouchers.schemas import BatchCreate
from popdrop.web.context import AppContext

OWNER = "owner@pages.test"
VOLUNTEER = "door@pages.test"
PASSWORD = "correct horse battery"
HTML = {"accept": "text/html,application/xhtml+xml"}
HTMX = {**HTML, "hx-request": "true"}
CODE_RE = re.compile(r'class="mono code">([^<]+)<')
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Site:
    app: FastAPI
    ctx: AppContext
    principal: Principal
    batch_id: int
    codes: list[str]
    other_batch_id: int


@pytest.fixture(scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    tmp: Path = tmp_path_factory.mktemp("pages")
    url = f"sqlite+aiosqlite:///{tmp}/t.db"
    settings = Settings(data_dir=tmp, database_url=url, log_requests=False, secret_key="x" * 40)
    await upgrade(url)
    # Imported late: the app factory reads templates relative to the package.
    from popdrop.app import create_app

    app = create_app(settings)
    ctx: AppContext = app.state.ctx
    now = ctx.clock.now()
    spec = BatchCreate(
        name="Spring drop",
        quantity=3,
        tag="spring",
        discount_kind="percent",
        discount_value=15,
        discount_description="15% off the spring collection",
    )
    async with ctx.db.transaction() as session:
        org = await accounts.create_organization(session, slug="pages", name="Pages", now=now)
        other = await accounts.create_organization(session, slug="pages-other", name="O", now=now)
        for email, role in ((OWNER, "owner"), (VOLUNTEER, "volunteer")):
            await accounts.create_user(
                session, org_id=org.id, email=email, password=PASSWORD, role=role, now=now
            )
        principal = Principal(org.id, "test:seed", "owner", ROLES["owner"])
        batch, codes = await service.issue_batch(session, ctx.signer, principal, spec, now=now)
        other_batch, _ = await service.issue_batch(
            session,
            ctx.signer,
            Principal(other.id, "test:seed", "owner", ROLES["owner"]),
            spec.model_copy(update={"name": "Other tenant secret"}),
            now=now,
        )
    yield Site(app, ctx, principal, batch.id, codes, other_batch.id)
    await ctx.db.dispose()


def client_for(site: Site) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=site.app), base_url="http://test", headers=HTML
    )


def csrf_of(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "page has no CSRF field"
    return match.group(1)


async def login(client: httpx.AsyncClient, email: str, password: str = PASSWORD) -> httpx.Response:
    page = await client.get("/login")
    form = {"csrf": csrf_of(page.text), "email": email, "password": password, "next": "/"}
    return await client.post("/login", data=form)


@pytest.fixture
async def owner(site: Site) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(site) as client:
        assert (await login(client, OWNER)).status_code == 303
        yield client


@pytest.fixture
async def volunteer(site: Site) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(site) as client:
        assert (await login(client, VOLUNTEER)).status_code == 303
        yield client


async def issue_via_form(client: httpx.AsyncClient, **fields: str) -> httpx.Response:
    page = await client.get("/vouchers/new")
    assert page.status_code == 200
    form = {
        "csrf": csrf_of(page.text),
        "name": "Form batch",
        "quantity": "5",
        "max_uses": "1",
        "tz": "UTC",
        "currency": "EUR",
        "discount_kind": "percent",
        "discount_value": "20",
        "discount_description": "20% off everything",
        **fields,
    }
    return await client.post("/vouchers/new", data=form)


def batch_id_of(issued_html: str) -> int:
    match = re.search(r'download="batch-(\d+)-codes\.csv"', issued_html)
    assert match, "no CSV download on the page"
    return int(match.group(1))


def link_path(html: str) -> str:
    match = re.search(r'href="(http[^"]+/v/[^"]+)"', html)
    assert match, "no claim link on the page"
    return urlsplit(match.group(1)).path


# ---------------------------------------------------------------- login and roles


async def test_wrong_password_gets_401_login_page(site: Site) -> None:
    async with client_for(site) as client:
        response = await login(client, OWNER, "not the password")
    assert response.status_code == 401
    assert "wrong email or password" in response.text
    assert 'name="password"' in response.text


async def test_pages_need_a_session(site: Site) -> None:
    async with client_for(site) as client:
        response = await client.get("/vouchers")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=/vouchers"


async def test_htmx_request_without_session_navigates_to_login(site: Site) -> None:
    async with client_for(site) as client:
        headers = {**HTMX, "hx-current-url": "http://test/vouchers"}
        response = await client.get("/vouchers/search", params={"code": "x"}, headers=headers)
    assert response.headers["hx-redirect"] == "/login?next=/vouchers"
    assert response.text == ""


async def test_owner_sees_batches_after_login(site: Site) -> None:
    async with client_for(site) as client:
        response = await login(client, OWNER)
        assert response.headers["location"] == "/"
        home = await client.get("/", follow_redirects=True)
    assert home.status_code == 200
    assert "Spring drop" in home.text
    assert f'href="/vouchers/batches/{site.batch_id}"' in home.text
    assert "Other tenant secret" not in home.text


async def test_volunteer_gets_403_pages_not_voucher_data(
    site: Site, volunteer: httpx.AsyncClient
) -> None:
    for path in ("/vouchers", f"/vouchers/batches/{site.batch_id}", "/vouchers/new", "/audit"):
        response = await volunteer.get(path)
        assert response.status_code == 403, path
        assert response.headers["content-type"].startswith("text/html")
        assert "Spring drop" not in response.text
        assert "forbidden" in response.text
    search = await volunteer.get("/vouchers/search", params={"code": site.codes[0]})
    assert search.status_code == 403
    assert "valid" not in search.text.replace("invalid", "")


async def test_other_tenants_batch_is_not_found(site: Site, owner: httpx.AsyncClient) -> None:
    response = await owner.get(f"/vouchers/batches/{site.other_batch_id}")
    assert response.status_code == 404
    assert "Other tenant secret" not in response.text


async def test_bad_batch_id_is_a_404_page(owner: httpx.AsyncClient) -> None:
    response = await owner.get("/vouchers/batches/not-a-number")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")


# ---------------------------------------------------------------- issuing


async def test_issue_shows_codes_once(site: Site, owner: httpx.AsyncClient) -> None:
    response = await issue_via_form(owner, name="Once only", prefix="PAGE")
    assert response.status_code == 201
    assert response.headers["cache-control"] == "no-store"
    shown = CODE_RE.findall(response.text)
    assert len(shown) == 5
    assert all(code.startswith("PAGE-") for code in shown)
    assert "will not be shown again" in response.text

    # The download carries the same codes inside the page, as a data: URL.
    match = re.search(r'href="data:text/csv;base64,([^"]+)" download="batch-\d+', response.text)
    assert match
    rows = base64.b64decode(unquote(match.group(1))).decode().split()
    assert rows == ["code", *shown]

    batch_id = batch_id_of(response.text)
    detail = await owner.get(f"/vouchers/batches/{batch_id}")
    assert detail.status_code == 200
    assert "Once only" in detail.text
    assert not any(code in detail.text for code in shown)
    listing = await owner.get("/vouchers")
    assert "Once only" in listing.text
    assert not any(code in listing.text for code in shown)

    # Every issued code is real: the search finds it valid.
    found = await owner.get("/vouchers/search", params={"code": shown[0]}, headers=HTMX)
    assert found.status_code == 200
    assert "valid" in found.text


async def test_issue_form_errors_keep_input(owner: httpx.AsyncClient) -> None:
    response = await issue_via_form(
        owner, name="Keep me", quantity="lots", prefix="IOU", valid_until="2000-01-01T10:00"
    )
    assert response.status_code == 422
    assert 'value="Keep me"' in response.text
    assert 'value="lots"' in response.text
    assert "a whole number" in response.text
    assert "prefix" in response.text
    assert "not issued" in response.text


async def test_issue_in_the_past_is_refused_on_the_form(owner: httpx.AsyncClient) -> None:
    response = await issue_via_form(owner, name="Too late", valid_until="2001-05-05T12:00")
    assert response.status_code == 422
    assert "already in the past" in response.text
    assert 'value="Too late"' in response.text


async def test_form_without_csrf_is_refused(site: Site, owner: httpx.AsyncClient) -> None:
    form = {"name": "No token", "quantity": "5"}
    response = await owner.post("/vouchers/new", data=form)
    assert response.status_code == 403
    assert "csrf_failed" in response.text
    wrong = await owner.post(
        f"/vouchers/batches/{site.batch_id}/revoke", data={"csrf": "forged", "reason": "x"}
    )
    assert wrong.status_code == 403
    listing = await owner.get("/vouchers")
    assert "No token" not in listing.text


def test_issue_form_reads_local_time_and_major_units() -> None:
    form = parse_issue_form(
        {
            "name": "Berlin evening",
            "quantity": "10",
            "valid_until": "2030-06-01T20:00",
            "tz": "Europe/Berlin",
            "ttl_hours": "1.5",
            "currency": "EUR",
            "discount_kind": "fixed",
            "discount_value": "5.50",
            "budget": "100",
        }
    )
    assert form.ok, form.errors
    assert form.spec is not None
    assert form.spec.valid_until == datetime(2030, 6, 1, 18, 0, tzinfo=UTC)
    assert form.spec.ttl_seconds == 5400
    assert form.spec.discount_value == 550
    assert form.spec.budget_minor == 10_000
    bad = parse_issue_form(
        {"name": "x", "quantity": "1", "tz": "Mars/Olympus", "budget": "1.234", "ttl_hours": "inf"}
    )
    assert set(bad.errors) >= {"tz", "budget", "ttl_hours"}
    assert not bad.ok


# ---------------------------------------------------------------- search, revoke, claim


async def test_search_shows_state_or_refusal(site: Site, owner: httpx.AsyncClient) -> None:
    found = await owner.get("/vouchers/search", params={"code": site.codes[1]}, headers=HTMX)
    assert found.status_code == 200
    assert "Spring drop" in found.text
    assert "<html" not in found.text  # a fragment for htmx
    unknown = await owner.get("/vouchers/search", params={"code": "0000-0000-0000-0"}, headers=HTMX)
    assert unknown.status_code == 404
    assert "unknown" in unknown.text
    malformed = await owner.get("/vouchers/search", params={"code": "nope"}, headers=HTMX)
    assert malformed.status_code == 422
    assert "malformed" in malformed.text
    full = await owner.get("/vouchers/search", params={"code": site.codes[1]})
    assert "<html" in full.text
    assert "Spring drop" in full.text


async def test_revoke_code_stops_its_claim_link(owner: httpx.AsyncClient) -> None:
    issued = await issue_via_form(owner, name="Linked", quantity="2", links="on")
    assert issued.status_code == 201
    code = CODE_RE.findall(issued.text)[0]
    path = link_path(issued.text)

    claim = await owner.get(path)
    assert claim.status_code == 200
    assert code in claim.text

    listing = await owner.get("/vouchers")
    revoke = await owner.post(
        "/vouchers/revoke-code",
        data={"csrf": csrf_of(listing.text), "code": code, "reason": "posted online"},
    )
    assert revoke.status_code == 303
    done = await owner.get(revoke.headers["location"])
    assert "The code is revoked" in done.text

    after = await owner.get(path)
    assert after.status_code == 410
    assert "revoked" in after.text
    assert code not in after.text
    assert after.headers["cache-control"] == "no-store"
    state = await owner.get("/vouchers/search", params={"code": code}, headers=HTMX)
    assert "posted online" in state.text


async def test_revoke_unknown_code_shows_refusal_on_the_page(owner: httpx.AsyncClient) -> None:
    listing = await owner.get("/vouchers")
    response = await owner.post(
        "/vouchers/revoke-code",
        data={"csrf": csrf_of(listing.text), "code": "0000-0000-0000-0", "reason": "x"},
    )
    assert response.status_code == 404
    assert "no such voucher code" in response.text.lower()
    assert 'value="0000-0000-0000-0"' in response.text


async def test_claim_page_shows_offer_code_and_qr(site: Site) -> None:
    url, _ = service.make_link(
        site.ctx.signer,
        "http://test",
        site.codes[2],
        expires_at=datetime(2099, 1, 1, tzinfo=UTC),
    )
    path = urlsplit(url).path
    async with client_for(site) as anonymous:
        page = await anonymous.get(path)
        qr = await anonymous.get(path + "/qr.svg")
    assert page.status_code == 200
    assert "<svg" in page.text
    assert site.codes[2] in page.text
    assert "15% off the spring collection" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert qr.status_code == 200
    assert qr.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in qr.content


async def test_tampered_claim_link_is_a_400_page(site: Site) -> None:
    url, _ = service.make_link(
        site.ctx.signer, "http://test", site.codes[0], expires_at=datetime(2099, 1, 1, tzinfo=UTC)
    )
    path = urlsplit(url).path
    tampered = path[:-3] + ("AAA" if not path.endswith("AAA") else "BBB")
    async with client_for(site) as anonymous:
        response = await anonymous.get(tampered)
        expired = await anonymous.get(
            urlsplit(
                service.make_link(
                    site.ctx.signer,
                    "http://test",
                    site.codes[0],
                    expires_at=datetime(2000, 1, 1, tzinfo=UTC),
                )[0]
            ).path
        )
        qr = await anonymous.get(tampered + "/qr.svg")
    assert response.status_code == 400
    assert "link_invalid" in response.text
    assert "<svg" not in response.text
    assert expired.status_code == 410
    assert "link_expired" in expired.text
    assert qr.status_code == 400


# ---------------------------------------------------------------- batch page actions


async def test_rollback_and_revoke_batch_from_the_detail_page(
    site: Site, owner: httpx.AsyncClient
) -> None:
    issued = await issue_via_form(
        owner, name="Returns", quantity="1", max_uses="2", cost_per_use="2.50", budget="10"
    )
    code = CODE_RE.findall(issued.text)[0]
    batch_id = batch_id_of(issued.text)
    async with site.ctx.db.transaction() as session:
        redeemed = await service.redeem(
            session,
            site.ctx.signer,
            site.principal,
            code=code,
            contact_ref="c-1",
            order_ref="order-77",
            now=site.ctx.clock.now(),
        )
    detail = await owner.get(f"/vouchers/batches/{batch_id}")
    assert "order-77" in detail.text
    assert "1 <span" in detail.text and "of 2 uses" in detail.text
    assert "Budget: 2.50 EUR of 10.00 EUR" in detail.text
    assert 'aria-valuenow="25"' in detail.text  # budget bar: 2.50 of 10.00
    rollback_action = f"/vouchers/redemptions/{redeemed.redemption.id}/rollback"
    assert rollback_action in detail.text

    rolled = await owner.post(
        rollback_action, data={"csrf": csrf_of(detail.text), "reason": "returned the tote"}
    )
    assert rolled.status_code == 303
    after = await owner.get(rolled.headers["location"])
    assert "rolled back" in after.text
    assert "returned the tote" in after.text
    assert rollback_action not in after.text

    export = await owner.get(f"/vouchers/batches/{batch_id}/export.csv")
    assert export.headers["content-type"].startswith("text/csv")
    assert export.text.splitlines()[0].startswith("voucher_id,status")
    assert code not in export.text

    revoked = await owner.post(
        f"/vouchers/batches/{batch_id}/revoke",
        data={"csrf": csrf_of(after.text), "reason": "drop cancelled"},
    )
    assert revoked.status_code == 303
    final = await owner.get(revoked.headers["location"])
    assert "The batch is revoked" in final.text
    assert "Revoke this batch" not in final.text


# ---------------------------------------------------------------- audit


async def test_audit_page_lists_entries_and_verifies(site: Site, owner: httpx.AsyncClient) -> None:
    page = await owner.get("/audit")
    assert page.status_code == 200
    assert "voucher.issue" in page.text
    assert f"batch:{site.batch_id}" in page.text
    assert f"batch:{site.other_batch_id}" not in page.text  # another tenant's entry

    verify = await owner.post("/audit/verify", data={"csrf": csrf_of(page.text)}, headers=HTMX)
    assert verify.status_code == 200
    assert re.search(r"OK \d+ entries", verify.text)
    assert 'class="alert good"' in verify.text
    no_js = await owner.post("/audit/verify", data={"csrf": csrf_of(page.text)})
    assert "<html" in no_js.text and "OK" in no_js.text
    forged = await owner.post("/audit/verify", data={"csrf": "nope"}, headers=HTMX)
    assert forged.status_code == 403
    assert "<html" not in forged.text  # an alert fragment htmx can swap in
