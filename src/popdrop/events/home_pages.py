"""The role home page `/home`: where a login lands when its role has no other home.

- A volunteer sees the events they are on the staff of, each with a **Scanner** button
  (one click to `/scan/{event_id}`, the check-in page) and their gate.
- A partner sees the events it partners (`events.staffing`: the partner row's contact
  email is the login's email) or is on the staff of.
- An owner or host (who lands on /vouchers) sees every event of the organization here,
  with its workspace, guest list and scanner.
Reads only the caller's organization; needs a session (the login page otherwise).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from popdrop.accounts.service import Principal
from popdrop.events import service
from popdrop.events.staffing import WorkedEvent, events_of_user
from popdrop.web.auth import session_claims
from popdrop.web.pagekit import Operator, PageRoute
from popdrop.web.params import Ctx
from popdrop.web.security import NO_STORE
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False, route_class=PageRoute)
SCAN_SCOPE = "checkin"  # the scanner's scope (checkin.service.SCAN_SCOPE, a floor above)


def _runs_events(principal: Principal) -> bool:
    return "events:read" in principal.scopes


@router.get("/home")
async def home(request: Request, principal: Operator, ctx: Ctx) -> Response:
    claims = session_claims(request, ctx)
    user_id = claims[0] if claims else 0
    async with ctx.db.reader() as session:
        if _runs_events(principal):
            worked = [WorkedEvent(e) for e in await service.list_events(session, principal)]
        else:
            worked = await events_of_user(session, principal, user_id)
    context = {
        "principal": principal,
        "worked": worked,
        "can_scan": SCAN_SCOPE in principal.scopes,
        "runs_events": _runs_events(principal),
    }
    response = render(request, "events/home.html", context)
    response.headers.update(NO_STORE)
    return response
