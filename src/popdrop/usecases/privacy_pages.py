"""A person's page: what is held about them everywhere (the right of access, the same as
the JSON download), their consent ledger, and erasure behind a confirmation step."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from popdrop.accounts.service import Principal
from popdrop.audience import consent, contact_points, contacts
from popdrop.core.errors import PopdropError
from popdrop.usecases import privacy
from popdrop.web.auth import check_csrf
from popdrop.web.context import AppContext
from popdrop.web.pagekit import Operator, PageRoute
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False, route_class=PageRoute)
_NOTICES = {
    "erased": "This person is erased: their email, phone and name are gone everywhere; "
    "their activity stays, anonymous, and their contact points stay suppressed.",
}


@router.get("/audience/contacts/{contact_id}")
async def contact_page(
    request: Request, contact_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    return await _contact_page(request, ctx, principal, contact_id)


async def _contact_page(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    contact_id: int,
    *,
    confirm_erase: bool = False,
    error: PopdropError | None = None,
) -> Response:
    principal.require("audience:read")
    now = ctx.clock.now()
    async with ctx.db.reader() as session:
        contact = await contact_points.get_contact(session, principal, contact_id)
        view = await contacts.contact_view(session, contact, now)
        ledger = await consent.consent_history(session, principal, contact_id)
        # The page shows exactly what the JSON download holds (the right of access).
        held = await privacy.export_contact(session, principal, contact_id, now=now)
    context = {
        "principal": principal,
        "contact": view,
        "ledger": ledger,
        "held": held,
        "confirm_erase": confirm_erase and view.erased_at is None,
        "error": error,
        "notice": _NOTICES.get(request.query_params.get("done", "")),
        "can_write": "audience:write" in principal.scopes,
    }
    response = render(
        request, "audience/contact.html", context, status=error.status if error else 200
    )
    response.headers.update(NO_STORE)
    return response


@router.get("/audience/contacts/{contact_id}/export.json")
async def contact_export(contact_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    async with ctx.db.reader() as session:
        held = await privacy.export_contact(session, principal, contact_id, now=ctx.clock.now())
    return Response(
        json.dumps(held, indent=2, ensure_ascii=False),
        media_type="application/json",
        headers={
            "Content-Disposition": f'attachment; filename="contact-{contact_id}.json"',
            **NO_STORE,
        },
    )


@router.get("/audience/contacts/{contact_id}/erase")
async def erase_confirm(
    request: Request, contact_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    """The confirmation step: the contact page with the irreversible button spelled out."""
    principal.require("audience:write")
    return await _contact_page(request, ctx, principal, contact_id, confirm_erase=True)


@router.post("/audience/contacts/{contact_id}/erase")
async def erase(request: Request, contact_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    check_csrf(request, ctx, await request.form())
    principal.require("audience:write")
    try:
        async with ctx.db.transaction() as session:
            await privacy.erase_contact(
                session,
                ctx.signer,
                principal,
                contact_id,
                now=ctx.clock.now(),
            )
    except PopdropError as error:
        if error.reason != "conflict":  # e.g. already erased: shown on the page
            raise
        return await _contact_page(request, ctx, principal, contact_id, error=error)
    return RedirectResponse(f"/audience/contacts/{contact_id}?done=erased", status_code=303)
