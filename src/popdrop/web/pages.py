"""Operator login/logout and the home redirect.

A login without `next` lands on `/`, which sends each role to its home: owners and hosts
to /vouchers, volunteers and partners to /home (their events, with the scanner).

Login checks the CSRF token, then the throttle (a locked account or address is refused
before the password is looked at, so the right password does not get through either),
then the password; every failure counts. Logout ends every session of the account.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from popdrop.accounts import service as accounts
from popdrop.core.errors import PopdropError
from popdrop.web.auth import (
    check_csrf,
    end_session,
    page_principal,
    session_claims,
    start_session,
)
from popdrop.web.context import AppContext, client_address, request_ctx
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False)
Ctx = Annotated[AppContext, Depends(request_ctx)]
HOME_BY_ROLE = {
    "owner": "/vouchers",
    "host": "/vouchers",
    "volunteer": "/home",
    "partner": "/home",
}


def _safe_next(target: str | None) -> str:
    # Only same-site paths: never redirect a login to another host.
    if target and target.startswith("/") and not target.startswith("//"):
        return target
    return "/"  # the role's home


@router.get("/")
async def home(request: Request, ctx: Ctx) -> Response:
    principal = await page_principal(request, ctx)
    target = HOME_BY_ROLE.get(principal.role, "/")
    if target == "/":
        return render(request, "home.html", {"principal": principal})
    return RedirectResponse(target, status_code=303)


@router.get("/login")
async def login_form(request: Request, next: str | None = None) -> Response:
    return render(request, "login.html", {"next": _safe_next(next), "error": None})


def _throttle(ctx: AppContext) -> accounts.LoginThrottle:
    return accounts.LoginThrottle(
        ctx.guard.counter,
        ctx.signer,
        per_account=ctx.settings.login_limit_per_account,
        per_address=ctx.settings.login_limit_per_address,
        window=ctx.settings.login_window_seconds,
    )


@router.post("/login")
async def login(request: Request, ctx: Ctx) -> Response:
    form = await request.form()
    check_csrf(request, ctx, form)
    target = _safe_next(str(form.get("next", "")))
    email = str(form.get("email", ""))
    address = client_address(request)
    throttle = _throttle(ctx)
    try:
        await throttle.check(email, address)
        async with ctx.db.reader() as session:
            try:
                user = await accounts.authenticate(session, email, str(form.get("password", "")))
            except PopdropError:
                await throttle.failed(email, address)
                raise
    except PopdropError as error:
        page = render(
            request,
            "login.html",
            {"next": target, "error": error.message, "reason": error.reason, "email": email},
            status=error.status,
        )
        page.headers.update(error.headers)  # Retry-After on a lock
        return page
    response = RedirectResponse(target, status_code=303)
    start_session(response, ctx, user)
    return response


@router.post("/logout")
async def logout(request: Request, ctx: Ctx) -> Response:
    check_csrf(request, ctx, await request.form())
    claims = session_claims(request, ctx)
    if claims is not None:
        async with ctx.db.transaction() as session:
            await accounts.end_sessions(session, *claims)
    response = RedirectResponse("/login", status_code=303)
    end_session(response, ctx)
    return response
