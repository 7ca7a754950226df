"""Operator login/logout and the home redirect."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from popdrop.accounts import service as accounts
from popdrop.core.errors import PopdropError
from popdrop.web.auth import check_csrf, end_session, page_principal, start_session
from popdrop.web.context import AppContext, get_ctx
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False)
Ctx = Annotated[AppContext, Depends(get_ctx)]
HOME_BY_ROLE = {"owner": "/vouchers", "host": "/vouchers", "volunteer": "/", "partner": "/"}


def _safe_next(target: str | None) -> str:
    # Only same-site paths: never redirect a login to another host.
    if target and target.startswith("/") and not target.startswith("//"):
        return target
    return "/vouchers"


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


@router.post("/login")
async def login(request: Request, ctx: Ctx) -> Response:
    form = await request.form()
    check_csrf(request, ctx, form)
    target = _safe_next(str(form.get("next", "")))
    try:
        async with ctx.db.reader() as session:
            user = await accounts.authenticate(
                session, str(form.get("email", "")), str(form.get("password", ""))
            )
    except PopdropError as error:
        return render(
            request,
            "login.html",
            {"next": target, "error": error.message, "email": form.get("email", "")},
            status=401,
        )
    response = RedirectResponse(target, status_code=303)
    start_session(response, ctx, user.id)
    return response


@router.post("/logout")
async def logout(request: Request, ctx: Ctx) -> Response:
    check_csrf(request, ctx, await request.form())
    response = RedirectResponse("/login", status_code=303)
    end_session(response)
    return response
