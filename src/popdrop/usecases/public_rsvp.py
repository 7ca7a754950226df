"""The public RSVP: book a place (or join the waiting list) and, in the same transaction,
move the known contact's engagement (an RSVP is engagement). It spans rsvp and audience,
so it lives above both."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.audience import contacts
from popdrop.audience.schemas import ActivityIn
from popdrop.core.schemas import error_responses
from popdrop.rsvp import api as rsvp_api
from popdrop.rsvp import service as rsvps
from popdrop.rsvp.schemas import RsvpCreate, RsvpCreated
from popdrop.web.params import Ctx, ItemId

router = APIRouter(prefix="/api/v1", tags=["rsvps"])


@router.post(
    "/public/events/{event_id}/rsvps",
    status_code=201,
    response_model=RsvpCreated,
    responses=error_responses(404, 409, 422, 429),
    summary="RSVP to a slot (no token); full slot: `slot_full`, or join with waitlist=true",
    description=(
        "Refused `409 not_open_yet` (with `opens_at`) before the event's opening, and "
        "`409 already_rsvped` (with `rsvp_id`, `status`) when this email or phone already "
        "has an active RSVP for the slot."
    ),
)
async def create_rsvp(
    event_id: ItemId, body: RsvpCreate, request: Request, ctx: Ctx
) -> RsvpCreated:
    org_id = await rsvp_api.event_org(ctx, event_id)

    async def call() -> rsvps.RsvpResult:
        async def work(session: AsyncSession) -> Any:
            result = await rsvps.create_rsvp(
                session,
                ctx.signer,
                event_id=event_id,
                spec=body,
                now=ctx.clock.now(),
            )
            # An RSVP is engagement: a known contact's recency moves (same transaction).
            rsvp = result.rsvp
            await contacts.record_activity(
                session,
                ctx.signer,
                org_id,
                ActivityIn(kind="rsvp", email=rsvp.email, phone=rsvp.phone, event_id=event_id),
                now=ctx.clock.now(),
            )
            return result

        return await ctx.db.in_transaction(work)  # retried on a PostgreSQL deadlock

    result = await rsvp_api.public_guarded(ctx, request, org_id, call)
    return rsvp_api.created(ctx, result)
