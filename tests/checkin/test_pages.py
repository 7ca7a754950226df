"""The scanner page (session + CSRF) and its check endpoint."""

from __future__ import annotations

import re
import secrets

import httpx

from popdrop.accounts import service as accounts
from popdrop.web.context import AppContext
from tests.checkin.helpers import issue, make_event
from tests.conftest import Tenant, make_tenant

PASSWORD = "scanner test password"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
HTML = {"Accept": "text/html"}


async def _user(ctx: AppContext, org_id: int, role: str) -> str:
    email = f"{role}-{secrets.token_hex(4)}@scan.test"
    async with ctx.db.transaction() as session:
        await accounts.create_user(
            session, org_id=org_id, email=email, password=PASSWORD, role=role, now=ctx.clock.now()
        )
    return email


async def _login(client: httpx.AsyncClient, email: str) -> None:
    page = await client.get("/login", headers=HTML)
    match = CSRF_RE.search(page.text)
    assert match
    form = {"csrf": match.group(1), "email": email, "password": PASSWORD, "next": "/"}
    assert (await client.post("/login", data=form)).status_code == 303


async def test_scanner_page_checks_in_with_session(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id, title="Night market")
    first = await issue(app_client, tenant, event_id)
    await issue(app_client, tenant, event_id)
    anonymous = await app_client.get(f"/scan/{event_id}", headers=HTML)
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/login")

    await _login(app_client, await _user(ctx, tenant.org_id, "volunteer"))
    page = await app_client.get(f"/scan/{event_id}", headers=HTML)
    assert page.status_code == 200
    assert "Night market" in page.text and 'id="expected">2<' in page.text
    match = CSRF_RE.search(page.text)
    assert match
    csrf = match.group(1)
    check = f"/scan/{event_id}/check"
    body = {"secret": first["secret"], "nonce": secrets.token_hex(8), "gate": "front"}

    forged = await app_client.post(check, json=body, headers={"X-CSRF-Token": "forged"})
    assert forged.status_code == 403 and forged.json()["reason"] == "csrf_failed"
    missing = await app_client.post(check, json=body)
    assert missing.status_code == 403

    ok = await app_client.post(check, json=body, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200, ok.text
    assert ok.json()["result"] == "ok"
    assert ok.json()["counts"] == {"event_id": event_id, "checked_in": 1, "expected": 2}
    body["nonce"] = secrets.token_hex(8)
    again = await app_client.post(check, json=body, headers={"X-CSRF-Token": csrf})
    assert again.status_code == 409 and again.json()["reason"] == "already_checked_in"
    assert again.json()["first_gate"] == "front"

    # Form posts work too (no JavaScript), with the csrf field.
    form = {"csrf": csrf, "secret": "nonsense", "nonce": secrets.token_hex(8)}
    bad = await app_client.post(check, data=form)
    assert bad.status_code == 422 and bad.json()["reason"] == "invalid"
    junk = await app_client.post(
        check, content=b"[1]", headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"}
    )
    assert junk.status_code == 422

    # A ticket of another event of the org is `wrong_event` at this event's scanner.
    other_event = await make_event(ctx, tenant.org_id)
    elsewhere = await issue(app_client, tenant, other_event)
    body = {"secret": elsewhere["secret"], "nonce": secrets.token_hex(8)}
    wrong = await app_client.post(check, json=body, headers={"X-CSRF-Token": csrf})
    assert wrong.status_code == 409 and wrong.json()["reason"] == "wrong_event"

    # Another org's event: not found, on the page and on the check endpoint.
    stranger = await make_tenant(ctx)
    foreign = await make_event(ctx, stranger.org_id)
    assert (await app_client.get(f"/scan/{foreign}", headers=HTML)).status_code == 404
    foreign_check = await app_client.post(
        f"/scan/{foreign}/check", json=body, headers={"X-CSRF-Token": csrf}
    )
    assert foreign_check.status_code == 404


async def test_scanner_needs_the_checkin_scope(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    await _login(app_client, await _user(ctx, tenant.org_id, "partner"))
    page = await app_client.get(f"/scan/{event_id}", headers=HTML)
    assert page.status_code == 403
    assert (await app_client.get("/scan/0", headers=HTML)).status_code in (404, 422)
