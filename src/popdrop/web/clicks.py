"""First-party click ids: a short link hands the landing page `?pd_click=<id>`; the page
keeps the first and the latest id in this browser's cookies for the attribution window,
and an order placed from this browser carries both (first touch, last touch).

Only the random click id travels: no person, no link or campaign names, nothing to
unseal. An id that is not shaped like one is ignored, never an error.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response

from popdrop.core.links import CLICK_PARAM

FIRST_CLICK_COOKIE = "pd_first_click"
LAST_CLICK_COOKIE = "pd_last_click"
ATTRIBUTION_WINDOW_DAYS = 30
_CLICK_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


def valid_click_id(value: str | None) -> str | None:
    return value if value and _CLICK_ID.match(value) else None


def remember_click(request: Request, response: Response, *, secure: bool) -> None:
    """On a landing page: keep the click id of the URL, if any, as this browser's latest
    click (and as its first one when it has none yet inside the window)."""
    click_id = valid_click_id(request.query_params.get(CLICK_PARAM))
    if click_id is None:
        return
    names = [LAST_CLICK_COOKIE]
    if valid_click_id(request.cookies.get(FIRST_CLICK_COOKIE)) is None:
        names.append(FIRST_CLICK_COOKIE)
    for name in names:
        response.set_cookie(
            name,
            click_id,
            max_age=ATTRIBUTION_WINDOW_DAYS * 24 * 3600,
            httponly=True,
            samesite="lax",
            secure=secure,
        )


def click_ids_of(request: Request) -> list[str]:
    """This browser's clicks inside the window, first then latest (one when they agree);
    the URL's own click counts as the latest, so a first visit that buys at once is
    attributed too."""
    first = valid_click_id(request.cookies.get(FIRST_CLICK_COOKIE))
    latest = valid_click_id(request.query_params.get(CLICK_PARAM)) or valid_click_id(
        request.cookies.get(LAST_CLICK_COOKIE)
    )
    ids = [click for click in (first or latest, latest) if click]
    return list(dict.fromkeys(ids))
