"""The operator page kit every domain's pages share.

- `PageRoute` answers refusals on page routes with HTML: the error page, or the
  `_alert.html` fragment for htmx requests; a missing session on an htmx request navigates
  the whole page to /login instead of swapping the login form into a fragment.
- `Operator` is the signed-in principal of a page, kept on the request so error pages
  still show the operator's navigation.
- Display filters (`money`, `percent`, `intcomma`, `local`, `price`); QR codes come from
  `core.qr`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute

from popdrop.accounts.service import Principal
from popdrop.core.errors import PopdropError
from popdrop.core.localtime import local
from popdrop.core.money import Money
from popdrop.web.auth import LoginRequired, PagePrincipal
from popdrop.web.templating import render, templates

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class PageRoute(APIRoute):
    """Answer refusals on page routes with HTML (full page, or a fragment for htmx)."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def page_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired:
                if not is_htmx(request):
                    raise  # the app answers with a redirect to /login
                # A fragment request must not swap the login page into a fragment:
                # htmx navigates the whole page instead.
                back = urlsplit(request.headers.get("hx-current-url", "")).path or "/"
                return Response(headers={"HX-Redirect": f"/login?next={back}"})
            except PopdropError as error:
                return error_page(request, error)
            except RequestValidationError:  # e.g. /vouchers/batches/abc
                return error_page(request, PopdropError("not_found", "page not found"))

        return page_handler


async def _operator(request: Request, principal: PagePrincipal) -> Principal:
    # Kept on the request so error pages still show the operator's navigation.
    request.state.principal = principal
    return principal


Operator = Annotated[Principal, Depends(_operator)]


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def error_page(request: Request, error: PopdropError) -> Response:
    principal = getattr(request.state, "principal", None)
    name = "_alert.html" if is_htmx(request) else "error.html"
    response = render(request, name, {"error": error, "principal": principal}, status=error.status)
    response.headers.update(error.headers)
    return response


# ---------------------------------------------------------------- display helpers


def money(amount_minor: int | None, currency: str) -> str:
    return "—" if amount_minor is None else Money(amount_minor, currency).format()


def percent(part: int, whole: int) -> int:
    return 0 if whole <= 0 else min(100, round(100 * part / whole))


def intcomma(number: int) -> str:
    return f"{number:,}"


# Templates are shared with the rest of the web layer; these filters are the vault's.
templates.env.filters["money"] = money
templates.env.filters["percent"] = percent
templates.env.filters["intcomma"] = intcomma


def price(amount_minor: int, currency: str) -> str:
    return Money(amount_minor, currency).format()


templates.env.filters["local"] = local
templates.env.filters["price"] = price
