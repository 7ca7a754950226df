"""Who is calling: API tokens (Bearer) for the API, signed session cookies for pages.

Forms are CSRF-protected by a signed double-submit token: a cookie and a hidden field that
must match. Roles map to scopes in `accounts.service.ROLES`.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, Request, Response

from popdrop.accounts import service as accounts
from popdrop.accounts.service import Principal
from popdrop.core.errors import PopdropError
from popdrop.core.signing import constant_time_equal
from popdrop.web.context import AppContext, get_ctx

SESSION_COOKIE = "popdrop_session"
CSRF_COOKIE = "popdrop_csrf"
SESSION_PURPOSE = "session"
CSRF_PURPOSE = "csrf"


class LoginRequired(Exception):
    """Raised by page dependencies; answered with a redirect to /login."""


async def api_principal(
    request: Request, ctx: Annotated[AppContext, Depends(get_ctx)]
) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise PopdropError(
            "unauthorized",
            "send an API token: Authorization: Bearer pd_…",
            headers={"WWW-Authenticate": "Bearer"},
        )
    token = token.strip()
    cached = accounts.cached_token(ctx.signer, token)
    if cached is not None:  # the burst path: no pool checkout for a known token
        return cached
    async with ctx.db.reader() as session:
        return await accounts.resolve_token(
            session, ctx.signer, token, cache_ttl=ctx.settings.token_cache_seconds
        )


ApiPrincipal = Annotated[Principal, Depends(api_principal)]


def start_session(response: Response, ctx: AppContext, user_id: int) -> None:
    value = ctx.signer.sign(SESSION_PURPOSE, {"u": user_id})
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=ctx.settings.session_max_age_seconds,
        httponly=True,
        samesite="lax",
        secure=ctx.settings.base_url.startswith("https"),
    )


def end_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE)


async def page_principal(
    request: Request, ctx: Annotated[AppContext, Depends(get_ctx)]
) -> Principal:
    raw = request.cookies.get(SESSION_COOKIE)
    if not raw:
        raise LoginRequired
    try:
        data = ctx.signer.unsign(SESSION_PURPOSE, raw, max_age=ctx.settings.session_max_age_seconds)
    except PopdropError as exc:
        raise LoginRequired from exc
    async with ctx.db.reader() as session:
        user = await accounts.get_user(session, int(data.get("u", 0)))
    if user is None:
        raise LoginRequired
    return accounts.principal_for_user(user)


PagePrincipal = Annotated[Principal, Depends(page_principal)]


def csrf_token(request: Request, ctx: AppContext) -> str:
    """The current form token (reused from the cookie when valid)."""
    raw = request.cookies.get(CSRF_COOKIE)
    if raw:
        try:
            ctx.signer.unsign(CSRF_PURPOSE, raw)
            return raw
        except PopdropError:
            pass
    token = ctx.signer.sign(CSRF_PURPOSE, secrets.token_urlsafe(16))
    request.state.new_csrf = token
    return token


def attach_csrf_cookie(request: Request, response: Response) -> None:
    token = getattr(request.state, "new_csrf", None)
    if token:
        response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict")


def check_csrf(request: Request, ctx: AppContext, form: Any) -> None:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    field = str(form.get("csrf", ""))
    if not cookie or not field or not constant_time_equal(cookie, field):
        raise PopdropError("csrf_failed", "the form expired; reload the page and try again")
    ctx.signer.unsign(CSRF_PURPOSE, cookie)
