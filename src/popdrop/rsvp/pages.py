"""The waiting-list offer page `/w/{token}`: what the offer's email or SMS links to.

GET shows the offer (places, slot, the deadline in the event's time zone) and a Claim
button; POST claims it (the same `claim_offer` as `POST /api/v1/public/waitlist/claim`,
under the same guessing guard) and links the QR ticket. Works without JavaScript, on a
phone first. The token is signed (`core.links.waitlist_offer_url`), so it cannot be
guessed; a bad one gets a plain "this link doesn't look right" page.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.core import links
from popdrop.core.errors import PopdropError
from popdrop.events.models import Event, TimeSlot
from popdrop.rsvp import service
from popdrop.rsvp.api import created, public_guarded
from popdrop.rsvp.lifecycle import OfferStatus
from popdrop.rsvp.models import WaitlistOffer
from popdrop.vouchers import codes
from popdrop.vouchers.models import Voucher
from popdrop.web.auth import check_csrf
from popdrop.web.context import AppContext
from popdrop.web.params import Ctx
from popdrop.web.security import NO_STORE
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False)

_TROUBLE = {
    "link_invalid": "This link doesn't look right. Open the message again and tap the link.",
    "expired": "This offer has expired: the place went to the next person on the list.",
    "exhausted": "This offer was already claimed.",
    "revoked": "This offer was withdrawn.",
    "event_closed": "This event no longer takes RSVPs.",
}


async def _view(ctx: AppContext, token: str) -> dict[str, Any]:
    """The offer behind a link: event, slot and offer (`link_invalid` when none)."""
    event_id, code = links.read_waitlist_offer(ctx.signer, token)
    code_hash = ctx.signer.keyed_hash(codes.normalize(code))
    async with ctx.db.reader() as session:
        row = (
            await session.execute(
                select(WaitlistOffer, Event, TimeSlot)
                .join(Voucher, Voucher.id == WaitlistOffer.voucher_id)
                .join(Event, Event.id == WaitlistOffer.event_id)
                .join(TimeSlot, TimeSlot.id == WaitlistOffer.slot_id)
                .where(Voucher.code_hash == code_hash, WaitlistOffer.event_id == event_id)
            )
        ).first()
    if row is None:
        raise PopdropError("link_invalid", "this link is not valid")
    offer, event, slot = row
    is_open = offer.status == OfferStatus.OPEN and offer.expires_at > ctx.clock.now()
    return {"offer": offer, "event": event, "slot": slot, "code": code, "open": is_open}


def _page(request: Request, context: dict[str, Any], status: int = 200) -> Response:
    response = render(request, "rsvp/offer.html", context, status=status)
    response.headers.update(NO_STORE)
    response.headers["X-Robots-Tag"] = "noindex"
    return response


def _trouble(request: Request, error: PopdropError, view: dict[str, Any] | None) -> Response:
    context = dict(view or {})
    context["trouble"] = _TROUBLE.get(error.reason, error.message)
    context["reason"] = error.reason
    return _page(request, context, status=error.status)


@router.get("/w/{token}")
async def offer_page(request: Request, token: str, ctx: Ctx) -> Response:
    try:
        view = await _view(ctx, token)
    except PopdropError as error:
        return _trouble(request, error, None)
    if not view["open"]:
        reason = "exhausted" if view["offer"].status == OfferStatus.CLAIMED else "expired"
        return _trouble(request, PopdropError(reason, reason, status=410), view)
    return _page(request, view)


@router.post("/w/{token}")
async def offer_claim(request: Request, token: str, ctx: Ctx) -> Response:
    check_csrf(request, ctx, await request.form())
    try:
        view = await _view(ctx, token)
    except PopdropError as error:
        return _trouble(request, error, None)
    event = view["event"]

    async def call() -> service.RsvpResult:
        async def work(session: AsyncSession) -> Any:
            return await service.claim_offer(
                session, ctx.signer, event_id=event.id, code=view["code"], now=ctx.clock.now()
            )

        return await ctx.db.in_transaction(work)  # retried on a PostgreSQL deadlock

    try:
        result = await public_guarded(ctx, request, event.org_id, call)
    except PopdropError as error:
        if error.status >= 500 or error.reason == "rate_limited":
            raise
        return _trouble(request, error, view)
    return _page(request, view | {"claimed": created(ctx, result)})
