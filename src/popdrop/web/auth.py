"""Who is calling: API tokens (Bearer) for the API, signed session cookies for pages.

Rules this module keeps:
- A session cookie is signed and names the user and their `session_version`; a cookie with
  an older version (the account logged out since) is refused like a missing one.
- Forms are CSRF-protected by a signed double-submit token: a cookie and a hidden field (or
  `X-CSRF-Token` header) that must match. The signed token is bound to the session it was
  issued for (a keyed hash of the session cookie), so a token from another session, or from
  before a login, is refused.
- Every cookie is `Secure` when the base URL is https.
Roles map to scopes in `accounts.service.ROLES`.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from popdrop.accounts import service as accounts
from popdrop.accounts.models import User
from popdrop.accounts.service import Principal
from popdrop.core import links
from popdrop.core.errors import PopdropError
from popdrop.core.signing import constant_time_equal
from popdrop.web.context import AppContext, get_ctx, request_ctx

SESSION_COOKIE = "popdrop_session"
CSRF_COOKIE = "popdrop_csrf"


class LoginRequired(Exception):
    """Raised by page dependencies; answered with a redirect to /login."""


# The OpenAPI security scheme of every route taking an `ApiPrincipal` (Swagger's
# Authorize button). Not auto_error: a missing token answers popdrop's own 401.
BEARER = HTTPBearer(
    scheme_name="bearer",
    bearerFormat="pd_…",
    description="An API token (`popdrop token create`), sent as `Authorization: Bearer pd_…`.",
    auto_error=False,
)


async def api_principal(
    ctx: Annotated[AppContext, Depends(request_ctx)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> Principal:
    if credentials is None:
        raise PopdropError(
            "unauthorized",
            "send an API token: Authorization: Bearer pd_…",
            headers={"WWW-Authenticate": "Bearer"},
        )
    token = credentials.credentials.strip()
    cached = accounts.cached_token(ctx.signer, token)
    if cached is not None:  # the burst path: no pool checkout for a known token
        return cached
    pending = ctx.token_lookups.get(token)
    if pending is None:
        pending = asyncio.ensure_future(_resolve(ctx, token))
        ctx.token_lookups[token] = pending
        pending.add_done_callback(lambda _: ctx.token_lookups.pop(token, None))
    # Shielded: one waiter's cancelled request must not cancel the others' look-up.
    principal: Principal = await asyncio.shield(pending)
    return principal


async def _resolve(ctx: AppContext, token: str) -> Principal:
    async with ctx.db.reader() as session:
        return await accounts.resolve_token(
            session, ctx.signer, token, cache_ttl=ctx.settings.token_cache_seconds
        )


ApiPrincipal = Annotated[Principal, Depends(api_principal)]


def _secure(ctx: AppContext) -> bool:
    return ctx.settings.base_url.startswith("https://")


def start_session(response: Response, ctx: AppContext, user: User) -> None:
    value = links.session_token(ctx.signer, user.id, user.session_version)
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=ctx.settings.session_max_age_seconds,
        httponly=True,
        samesite="lax",
        secure=_secure(ctx),
    )


def session_claims(request: Request, ctx: AppContext) -> tuple[int, int] | None:
    """(user id, session version) of a validly signed, unexpired session cookie."""
    raw = request.cookies.get(SESSION_COOKIE)
    if not raw:
        return None
    return links.read_session(ctx.signer, raw, ctx.settings.session_max_age_seconds)


def end_session(response: Response, ctx: AppContext) -> None:
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="lax", secure=_secure(ctx))


async def page_principal(
    request: Request, ctx: Annotated[AppContext, Depends(request_ctx)]
) -> Principal:
    claims = session_claims(request, ctx)
    if claims is None:
        raise LoginRequired
    async with ctx.db.reader() as session:
        user = await accounts.session_user(session, *claims)
    if user is None:
        raise LoginRequired
    return accounts.principal_for_user(user)


PagePrincipal = Annotated[Principal, Depends(page_principal)]


def _binding(request: Request, ctx: AppContext) -> str:
    """What a CSRF token is bound to: the session cookie as sent (or "anonymous")."""
    raw = request.cookies.get(SESSION_COOKIE, "")
    return links.session_binding(ctx.signer, raw)


def _bound(request: Request, ctx: AppContext, token: str) -> bool:
    binding = links.read_csrf_binding(ctx.signer, token)
    return binding is not None and constant_time_equal(binding, _binding(request, ctx))


def csrf_token(request: Request, ctx: AppContext) -> str:
    """The current form token: reused from the cookie while it is bound to this session."""
    raw = request.cookies.get(CSRF_COOKIE)
    if raw and _bound(request, ctx, raw):
        return raw
    token: str | None = getattr(request.state, "new_csrf", None)
    if token is None:  # one new token per request, however many fragments render
        token = links.csrf_token(ctx.signer, _binding(request, ctx))
        request.state.new_csrf = token
    return token


def attach_csrf_cookie(request: Request, response: Response) -> None:
    token = getattr(request.state, "new_csrf", None)
    if token:
        response.set_cookie(
            CSRF_COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=_secure(get_ctx(request)),
        )


def check_csrf(request: Request, ctx: AppContext, form: Any) -> None:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    field = str(form.get("csrf", ""))
    if (
        not cookie
        or not field
        or not constant_time_equal(cookie, field)
        or not _bound(request, ctx, cookie)
    ):
        raise PopdropError("csrf_failed", "the form expired; reload the page and try again")
