"""Security headers on every response (issue 13): a CSP that allows no inline script on
every page (and the pages need none), no framing of operator pages while the public chat
page stays embeddable, HSTS and `Secure` cookies under an https base URL."""

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
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import make_shop

PASSWORD = "correct horse battery"
HTML = {"accept": "text/html,application/xhtml+xml"}
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.IGNORECASE)
INLINE_HANDLER = re.compile(r"<[a-z][^>]*\son[a-z]+\s*=", re.IGNORECASE)
JS_URL = re.compile(r"""(?:href|src|action)\s*=\s*["']?\s*javascript:""", re.IGNORECASE)


@dataclass
class Site:
    app: FastAPI
    ctx: AppContext
    tenant: Tenant
    email: str


async def make_site(ctx: AppContext) -> Site:
    tenant = await make_tenant(ctx)
    email = f"owner-{secrets.token_hex(4)}@headers.test"
    async with ctx.db.transaction() as session:
        await accounts.create_user(
            session,
            org_id=tenant.org_id,
            email=email,
            password=PASSWORD,
            role="owner",
            now=ctx.clock.now(),
        )
    return Site(create_app(ctx=ctx), ctx, tenant, email)


@pytest.fixture
async def site(ctx: AppContext) -> Site:
    return await make_site(ctx)


def client_for(app: FastAPI, base_url: str = "http://test") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=base_url, headers=HTML
    )


def csp_of(response: httpx.Response) -> dict[str, str]:
    policy = response.headers.get("content-security-policy", "")
    directives = (part.strip().split(None, 1) for part in policy.split(";") if part.strip())
    return {d[0]: d[1] if len(d) > 1 else "" for d in directives}


async def login(client: httpx.AsyncClient, email: str) -> None:
    page = await client.get("/login")
    csrf = CSRF_RE.search(page.text)
    assert csrf
    form = {"csrf": csrf.group(1), "email": email, "password": PASSWORD, "next": "/"}
    assert (await client.post("/login", data=form)).status_code == 303


def assert_common(response: httpx.Response, where: str) -> None:
    assert response.headers.get("x-content-type-options") == "nosniff", where
    # Pages that carry secrets in their URL may set a stricter one themselves.
    assert response.headers.get("referrer-policy") in ("same-origin", "no-referrer"), where
    assert "strict-transport-security" not in response.headers, where  # http base URL
    csp = csp_of(response)
    assert csp.get("object-src") == "'none'", where
    assert csp.get("base-uri") == "'none'", where


def assert_page_policy(response: httpx.Response, where: str) -> None:
    """The operator-page policy: scripts from our origin only, no framing at all."""
    assert_common(response, where)
    csp = csp_of(response)
    assert csp.get("script-src") == "'self'", where
    assert csp.get("default-src") == "'self'", where
    assert csp.get("frame-ancestors") == "'none'", where
    assert response.headers.get("x-frame-options") == "DENY", where


def assert_no_inline_script(html: str, where: str) -> None:
    """What `script-src 'self'` would block: inline scripts, handlers, javascript: URLs."""
    assert not INLINE_SCRIPT.search(html), (where, INLINE_SCRIPT.search(html))
    assert not INLINE_HANDLER.search(html), (where, INLINE_HANDLER.search(html))
    assert not JS_URL.search(html), where


async def test_every_page_has_the_headers_and_needs_no_inline_script(site: Site) -> None:
    async with client_for(site.app) as api:
        shop = await make_shop(api, site.tenant, site.ctx.clock.now())
        event = shop.event_id
    async with client_for(site.app) as anonymous:
        public = [
            "/login",
            f"/e/{event}",
            "/e/999999999",  # a 404 page
            "/vouchers",  # the redirect to the login page
            "/no-such-page",
        ]
        for path in public:
            response = await anonymous.get(path)
            assert_page_policy(response, path)
            assert_no_inline_script(response.text, path)
        # The public event page really loads its script as a file.
        page = await anonymous.get(f"/e/{event}")
        assert '<script src="/static/event-public.js"' in page.text

    pages = [
        "/vouchers",
        "/vouchers/new",
        "/events",
        f"/events/{event}",
        f"/scan/{event}",
        "/audience",
        "/audience/segments",
        "/drops",
        "/mailbox",
        "/audit",
        "/chat/console",
    ]
    async with client_for(site.app) as owner:
        await login(owner, site.email)
        for path in pages:
            response = await owner.get(path)
            assert response.status_code == 200, (path, response.status_code)
            assert_page_policy(response, path)
            assert_no_inline_script(response.text, path)
        # An htmx fragment answer carries them as well.
        fragment = await owner.get("/vouchers", headers={"hx-request": "true"})
        assert_page_policy(fragment, "htmx /vouchers")


async def test_api_health_static_and_refusals_have_the_headers(site: Site) -> None:
    async with client_for(site.app) as client:
        answers = {
            "api": await client.get("/api/v1/events", headers=site.tenant.headers),
            "api 401": await client.get("/api/v1/events"),
            "api 404": await client.get("/api/v1/no-such-thing"),
            "healthz": await client.get("/healthz"),
            "static": await client.get("/static/popdrop.css"),
            "413": await client.post(
                "/api/v1/events",
                content=b"x" * (site.ctx.settings.max_body_bytes + 1),
                headers={**site.tenant.headers, "content-type": "application/json"},
            ),
        }
        assert answers["413"].status_code == 413
        for where, response in answers.items():
            assert_page_policy(response, where)


async def test_the_public_chat_page_is_embeddable_and_the_rest_is_not(site: Site) -> None:
    async with client_for(site.app) as client:
        chat = await client.get(f"/chat/{site.tenant.slug}")
        assert chat.status_code == 200
        assert_common(chat, "chat page")
        csp = csp_of(chat)
        assert csp.get("frame-ancestors") == "*"  # any site may iframe the chat page
        assert "x-frame-options" not in chat.headers
        assert csp.get("script-src") == "'self'"  # still no inline script
        assert_no_inline_script(chat.text, "chat page")
        # The widget script that third-party pages load with a script tag.
        widget = await client.get("/static/chat-widget.js")
        assert widget.status_code == 200
        assert "cross-origin-resource-policy" not in widget.headers

        # The operator console under /chat/ is not embeddable.
        await login(client, site.email)
        console = await client.get("/chat/console")
        assert console.status_code == 200
        assert_page_policy(console, "/chat/console")


async def test_api_docs_run_under_the_page_policy_from_local_files(site: Site) -> None:
    async with client_for(site.app) as client:
        docs = await client.get("/api/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert_page_policy(docs, "/api/docs")  # no exception: no CDN, no inline script
        assert_no_inline_script(docs.text, "/api/docs")
        assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
        assert assets and all(url.startswith("/") for url in assets), assets
        for url in assets:
            assert (await client.get(url)).status_code == 200, url
        spec = await client.get("/api/openapi.json")
        assert spec.status_code == 200 and spec.headers.get("x-content-type-options") == "nosniff"


@pytest.fixture
async def https_site(settings: Settings) -> AsyncIterator[Site]:
    https = settings.model_copy(update={"base_url": "https://popdrop.example"})
    context = build_context(https)
    yield await make_site(context)
    await context.guard.counter.close()
    await context.db.dispose()


async def test_an_https_base_url_gives_secure_cookies_and_hsts(https_site: Site) -> None:
    async with client_for(https_site.app, "https://popdrop.example") as client:
        page = await client.get("/login")
        assert page.headers["strict-transport-security"].startswith("max-age=")
        set_cookies = page.headers.get_list("set-cookie")
        assert any(c.startswith("popdrop_csrf=") for c in set_cookies)
        await login(client, https_site.email)
        home = await client.get("/vouchers")
        assert home.status_code == 200
        assert home.headers["strict-transport-security"].startswith("max-age=")
        logout_form = CSRF_RE.search(home.text)
        assert logout_form
        out = await client.post("/logout", data={"csrf": logout_form.group(1)})
    # Every cookie set on the way (CSRF, session, the session's deletion) is Secure.
    seen = [*set_cookies, *out.headers.get_list("set-cookie")]
    async with client_for(https_site.app, "https://popdrop.example") as again:
        page = await again.get("/login")
        csrf = CSRF_RE.search(page.text)
        assert csrf
        form = {
            "csrf": csrf.group(1),
            "email": https_site.email,
            "password": PASSWORD,
            "next": "/",
        }
        seen += page.headers.get_list("set-cookie")
        seen += (await again.post("/login", data=form)).headers.get_list("set-cookie")
    names = {c.split("=", 1)[0] for c in seen}
    assert {"popdrop_csrf", "popdrop_session"} <= names
    for cookie in seen:
        flags = {f.strip().lower() for f in cookie.split(";")[1:]}
        assert "secure" in flags, cookie
        assert "httponly" in flags, cookie
