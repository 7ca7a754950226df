"""Operator login and sessions as an attacker meets them (issue 13): password guessing is
throttled per account and per address with a lockout that does not tell which accounts
exist; logging out ends the session for good (a replayed cookie is refused); a CSRF token
only works in the session it was issued for."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI

from popdrop.accounts import service as accounts
from popdrop.app import build_context, create_app
from popdrop.core.config import Settings
from popdrop.web.context import AppContext
from tests.conftest import make_tenant, redis_url

PASSWORD = "correct horse battery"
HTML = {"accept": "text/html,application/xhtml+xml"}
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
ALERT_RE = re.compile(r'<p class="alert bad" role="alert" data-reason="([^"]*)">([^<]*)</p>')


@dataclass
class Site:
    app: FastAPI
    ctx: AppContext
    email: str


@pytest.fixture
async def site(ctx: AppContext) -> Site:
    tenant = await make_tenant(ctx)
    email = f"owner-{secrets.token_hex(4)}@login.test"
    async with ctx.db.transaction() as session:
        await accounts.create_user(
            session,
            org_id=tenant.org_id,
            email=email,
            password=PASSWORD,
            role="owner",
            now=ctx.clock.now(),
        )
    return Site(create_app(ctx=ctx), ctx, email)


def browser(site: Site, address: str = "203.0.113.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=site.app, client=(address, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://test", headers=HTML)


@pytest.fixture
async def client(site: Site) -> AsyncIterator[httpx.AsyncClient]:
    async with browser(site) as c:
        yield c


def csrf_of(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "page has no CSRF field"
    return match.group(1)


async def login(client: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    page = await client.get("/login")
    form = {"csrf": csrf_of(page.text), "email": email, "password": password, "next": "/"}
    return await client.post("/login", data=form)


def notice(response: httpx.Response) -> tuple[int, str, str]:
    """(status, reason, message with numbers blanked): what the person at the form sees."""
    match = ALERT_RE.search(response.text)
    assert match, response.text
    return response.status_code, match.group(1), re.sub(r"\d+", "N", match.group(2))


# ---------------------------------------------------------------- throttling


async def test_fifty_wrong_passwords_lock_the_accounts_password_login(
    site: Site, client: httpx.AsyncClient
) -> None:
    answers = [await login(client, site.email, f"wrong-{i}") for i in range(50)]
    statuses = [a.status_code for a in answers]
    limit = site.ctx.settings.login_limit_per_account
    assert statuses[:limit] == [401] * limit
    assert statuses[limit:] == [429] * (50 - limit)
    locked = answers[-1]
    assert notice(locked)[:2] == (429, "login_locked")
    # Locked for a while: the failures of this window and the one before count together.
    window = site.ctx.settings.login_window_seconds
    assert 1 <= int(locked.headers["retry-after"]) <= 2 * window

    # The right password during the lock: the same notice, and no session.
    right = await login(client, site.email, PASSWORD)
    assert notice(right) == notice(locked)
    assert "popdrop_session" not in right.headers.get("set-cookie", "")
    assert (await client.get("/vouchers")).status_code == 303  # still logged out

    # The lock is the account's, not the browser's: another address is refused too.
    async with browser(site, "198.51.100.20") as elsewhere:
        assert notice(await login(elsewhere, site.email, PASSWORD))[:2] == (429, "login_locked")


async def test_an_unknown_email_gets_the_identical_answers(
    site: Site, client: httpx.AsyncClient
) -> None:
    ghost = f"nobody-{secrets.token_hex(4)}@login.test"
    known = [notice(await login(client, site.email, "wrong password")) for _ in range(12)]
    async with browser(site, "198.51.100.21") as other:
        unknown = [notice(await login(other, ghost, "wrong password")) for _ in range(12)]
    # Same statuses, reasons and messages in the same order: before and after the lock.
    assert known == unknown
    assert known[0][:2] == (401, "unauthorized") and known[-1][:2] == (429, "login_locked")


async def test_one_address_guessing_many_accounts_is_locked_out(site: Site) -> None:
    per_address = site.ctx.settings.login_limit_per_address
    async with browser(site, "192.0.2.50") as sprayer:
        for i in range(per_address):
            wrong = await login(sprayer, f"user{i}@login.test", "Password123!")
            assert wrong.status_code == 401
        # Even a real account with its right password is refused from this address now…
        assert notice(await login(sprayer, site.email, PASSWORD))[:2] == (429, "login_locked")
    # …while its owner, elsewhere, logs in as usual.
    async with browser(site, "192.0.2.51") as owner:
        assert (await login(owner, site.email, PASSWORD)).status_code == 303


async def test_wrong_passwords_under_the_limit_do_not_lock(
    site: Site, client: httpx.AsyncClient
) -> None:
    for _ in range(site.ctx.settings.login_limit_per_account - 1):
        assert (await login(client, site.email, "wrong password")).status_code == 401
    assert (await login(client, site.email, PASSWORD)).status_code == 303


# ---------------------------------------------------------------- sessions


async def test_a_logged_out_session_cookie_is_refused(
    site: Site, client: httpx.AsyncClient
) -> None:
    assert (await login(client, site.email, PASSWORD)).status_code == 303
    cookie = client.cookies["popdrop_session"]
    async with browser(site, "198.51.100.30") as laptop:  # a second session of the account
        assert (await login(laptop, site.email, PASSWORD)).status_code == 303
        assert (await laptop.get("/vouchers")).status_code == 200

        page = await client.get("/vouchers")
        assert page.status_code == 200
        out = await client.post("/logout", data={"csrf": csrf_of(page.text)})
        assert out.status_code == 303 and out.headers["location"] == "/login"

        # The old cookie, replayed by someone who kept it: back to the login page.
        async with browser(site, "198.51.100.31") as thief:
            thief.cookies.set("popdrop_session", cookie)
            replay = await thief.get("/vouchers")
            assert replay.status_code == 303
            assert replay.headers["location"].startswith("/login")
        # Logging out ends every session of the account, the laptop's too.
        assert (await laptop.get("/vouchers")).status_code == 303

    # A fresh login works again.
    assert (await login(client, site.email, PASSWORD)).status_code == 303
    assert (await client.get("/vouchers")).status_code == 200


async def test_a_replayed_old_logout_does_not_end_a_newer_session(
    site: Site, client: httpx.AsyncClient
) -> None:
    assert (await login(client, site.email, PASSWORD)).status_code == 303
    page = await client.get("/vouchers")
    old_session = client.cookies["popdrop_session"]
    old_csrf = client.cookies["popdrop_csrf"]
    assert (await client.post("/logout", data={"csrf": csrf_of(page.text)})).status_code == 303
    assert (await login(client, site.email, PASSWORD)).status_code == 303
    async with browser(site, "198.51.100.32") as replayer:
        replayer.cookies.set("popdrop_session", old_session)
        replayer.cookies.set("popdrop_csrf", old_csrf)
        await replayer.post("/logout", data={"csrf": old_csrf})
    assert (await client.get("/vouchers")).status_code == 200


# ---------------------------------------------------------------- CSRF


async def test_a_csrf_token_from_another_session_is_refused(site: Site) -> None:
    async with browser(site) as mine, browser(site, "198.51.100.40") as theirs:
        assert (await login(mine, site.email, PASSWORD)).status_code == 303
        assert (await login(theirs, site.email, PASSWORD)).status_code == 303
        their_page = await theirs.get("/vouchers")
        their_token = csrf_of(their_page.text)
        assert (await mine.get("/vouchers")).status_code == 200

        # Their token (as cookie and field, the double submit intact) with my session.
        mine.cookies.delete("popdrop_csrf")
        mine.cookies.set("popdrop_csrf", their_token)
        forged = await mine.post("/logout", data={"csrf": their_token})
        assert forged.status_code == 403 and "csrf_failed" in forged.text
        assert (await mine.get("/vouchers")).status_code == 200  # still logged in

        # A token issued before the login (on the login page) does not survive it either.
        async with browser(site, "198.51.100.41") as fresh:
            before = csrf_of((await fresh.get("/login")).text)
            form = {"csrf": before, "email": site.email, "password": PASSWORD, "next": "/"}
            assert (await fresh.post("/login", data=form)).status_code == 303
            stale = await fresh.post("/logout", data={"csrf": before})
            assert stale.status_code == 403
            page = await fresh.get("/vouchers")
            assert csrf_of(page.text) != before
            out = await fresh.post("/logout", data={"csrf": csrf_of(page.text)})
            assert out.status_code == 303


# ---------------------------------------------------------------- across processes


async def test_the_lock_is_shared_between_processes_through_redis(
    settings: Settings, site: Site
) -> None:
    url = redis_url()
    if url is None:
        pytest.skip("set POPDROP_TEST_REDIS_URL to run the shared-lock test")
    shared = settings.model_copy(update={"redis_url": url})
    one, two = build_context(shared), build_context(shared)
    try:
        first, second = (Site(create_app(ctx=c), c, site.email) for c in (one, two))
        # Redis outlives the test: a fresh address per run keeps the per-address count of
        # an earlier run (the other database's pass) out of this one.
        address = f"2001:db8:{secrets.token_hex(2)}:{secrets.token_hex(2)}::1"
        async with browser(first, address) as a:
            for _ in range(shared.login_limit_per_account):
                assert (await login(a, site.email, "wrong password")).status_code == 401
        # Another server process (another app, its own memory) sees the same lock.
        async with browser(
            second, f"2001:db8:{secrets.token_hex(2)}:{secrets.token_hex(2)}::2"
        ) as b:
            assert notice(await login(b, site.email, PASSWORD))[:2] == (429, "login_locked")
    finally:
        for context in (one, two):
            await context.guard.counter.close()
            await context.db.dispose()
