"""The privacy API: a person's data (access), erasure, and retention purges."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import Field

from popdrop.audience.schemas import EraseResult, PurgeResult
from popdrop.core.schemas import StrictInput, error_responses
from popdrop.usecases import privacy
from popdrop.web.auth import ApiPrincipal
from popdrop.web.params import Ctx, ItemId

router = APIRouter(prefix="/api/v1", tags=["audience"])
READ_ERRORS = error_responses(401, 403, 404, 422)
WRITE_ERRORS = error_responses(401, 403, 404, 409, 422)


@router.get(
    "/contacts/{contact_id}/export",
    responses=READ_ERRORS,
    summary="Everything held about this person (GDPR access), as JSON",
)
async def export_contact(contact_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> JSONResponse:
    async with ctx.db.reader() as session:
        data = await privacy.export_contact(session, principal, contact_id, now=ctx.clock.now())
    return JSONResponse(
        data,
        headers={"Content-Disposition": f'attachment; filename="contact-{contact_id}.json"'},
    )


@router.post(
    "/contacts/{contact_id}/erase",
    response_model=EraseResult,
    responses=WRITE_ERRORS,
    summary="Erase a person: PII removed everywhere, activity kept anonymous, suppressed",
)
async def erase_contact(contact_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> EraseResult:
    async with ctx.db.transaction() as session:
        return await privacy.erase_contact(
            session,
            ctx.signer,
            principal,
            contact_id,
            now=ctx.clock.now(),
        )


class PurgeRequest(StrictInput):
    months: int | None = Field(default=None, ge=1, le=240)


@router.post(
    "/contacts/purge",
    response_model=PurgeResult,
    responses=WRITE_ERRORS,
    summary="Retention: erase contacts not engaged for N months (default: the rule set)",
)
async def purge(body: PurgeRequest, principal: ApiPrincipal, ctx: Ctx) -> PurgeResult:
    async with ctx.db.transaction() as session:
        return await privacy.purge_inactive(
            session,
            ctx.signer,
            principal,
            now=ctx.clock.now(),
            months=body.months,
        )
