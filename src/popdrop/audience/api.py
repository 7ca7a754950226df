"""Audience REST API (thin: parse, call the service, shape the answer).

Contacts, consent, activity, inbound keywords (STOP/START/HELP/YES), segments, privacy
(export, erase, retention purge), CSV import jobs and streamed CSV exports. Scopes:
`audience:read`, `audience:write`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.audience import (
    consent,
    contact_points,
    contacts,
    exports,
    import_jobs,
    keywords,
    segments,
    settings,
)
from popdrop.audience.schemas import (
    ActivityIn,
    AudienceSettingsIn,
    AudienceSettingsOut,
    ConsentChange,
    ConsentChanged,
    ConsentEventOut,
    ContactCreated,
    ContactIn,
    ContactList,
    ContactOut,
    ContactPatch,
    ImportJobOut,
    InboundMessage,
    InboundResult,
    SegmentCount,
    SegmentIn,
    SegmentOut,
    SegmentRules,
)
from popdrop.core import links
from popdrop.core.errors import PopdropError
from popdrop.core.schemas import error_responses, require_clean_text
from popdrop.web.auth import ApiPrincipal
from popdrop.web.context import AppContext
from popdrop.web.idempotent import respond_once
from popdrop.web.params import Before, Ctx, IdempotencyKey, ItemId, Limit
from popdrop.web.streaming import csv_download

router = APIRouter(prefix="/api/v1", tags=["audience"])
READ_ERRORS = error_responses(401, 403, 404, 422)
WRITE_ERRORS = error_responses(401, 403, 404, 409, 422)


async def _view(session: AsyncSession, ctx: AppContext, contact: Any) -> ContactOut:
    return await contacts.contact_view(session, contact, ctx.clock.now())


# ---------------------------------------------------------------- contacts


@router.post(
    "/contacts",
    status_code=201,
    response_model=ContactCreated,
    responses=WRITE_ERRORS,
    summary="Add a contact, or merge into the one with the same email/phone (200)",
)
async def upsert_contact(
    body: ContactIn,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        contact, created = await contacts.upsert_contact(
            session, ctx.signer, principal, body, now=ctx.clock.now()
        )
        out = ContactCreated(contact=await _view(session, ctx, contact), created=created)
        return (201 if created else 200), out.model_dump(mode="json")

    return await respond_once(
        ctx, request, principal, idempotency_key, body, operation, scope="audience:write"
    )


@router.get("/contacts", response_model=ContactList, responses=READ_ERRORS)
async def list_contacts(
    principal: ApiPrincipal,
    ctx: Ctx,
    q: Annotated[str | None, Query(max_length=254)] = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 50,
    before: Before = None,
) -> ContactList:
    async with ctx.db.reader() as session:
        found = await contacts.list_contacts(
            session, principal, query=q, tag=tag, limit=limit, before=before
        )
        items = await contacts.contacts_out(session, principal.org_id, found, ctx.clock.now())
    return ContactList(items=items, next_before=found[-1].id if len(found) == limit else None)


@router.get("/contacts/{contact_id}", response_model=ContactOut, responses=READ_ERRORS)
async def get_contact(contact_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> ContactOut:
    async with ctx.db.reader() as session:
        return await _view(
            session, ctx, await contact_points.get_contact(session, principal, contact_id)
        )


@router.patch("/contacts/{contact_id}", response_model=ContactOut, responses=WRITE_ERRORS)
async def patch_contact(
    contact_id: ItemId, body: ContactPatch, principal: ApiPrincipal, ctx: Ctx
) -> ContactOut:
    async with ctx.db.transaction() as session:
        contact = await contacts.patch_contact(
            session, principal, contact_id, body, now=ctx.clock.now()
        )
        return await _view(session, ctx, contact)


@router.post(
    "/contacts/{contact_id}/consents",
    response_model=ConsentChanged,
    responses=WRITE_ERRORS,
    summary="Grant, revoke or request (double opt-in) consent on one channel",
)
async def change_consent(
    contact_id: ItemId, body: ConsentChange, principal: ApiPrincipal, ctx: Ctx
) -> ConsentChanged:
    async with ctx.db.transaction() as session:
        event = await consent.set_consent(
            session, ctx.signer, principal, contact_id, body, now=ctx.clock.now()
        )
        contact = await contact_points.get_contact(session, principal, contact_id)
        confirm_url = None
        if body.action == "request" and body.channel == "email":
            confirm_url = links.consent_confirm_url(
                ctx.signer, ctx.settings.base_url, contact.org_id, contact.id, body.channel
            )
        return ConsentChanged(
            contact=await _view(session, ctx, contact),
            event=consent.consent_event_out(event) if event else None,
            confirm_url=confirm_url,
        )


@router.get(
    "/contacts/{contact_id}/consents",
    response_model=list[ConsentEventOut],
    responses=READ_ERRORS,
    summary="The contact's consent ledger: every grant, request and revoke",
)
async def consent_history(
    contact_id: ItemId, principal: ApiPrincipal, ctx: Ctx
) -> list[ConsentEventOut]:
    async with ctx.db.reader() as session:
        events = await consent.consent_history(session, principal, contact_id)
        return [consent.consent_event_out(e) for e in events]


@router.post(
    "/contacts/activity",
    responses=WRITE_ERRORS,
    summary="Record a click, chat, RSVP, visit or purchase (moves last_engaged_at forward)",
)
async def record_activity(body: ActivityIn, principal: ApiPrincipal, ctx: Ctx) -> dict[str, Any]:
    principal.require("audience:write")
    async with ctx.db.transaction() as session:
        contact_id = await contacts.record_activity(
            session, ctx.signer, principal.org_id, body, now=ctx.clock.now()
        )
    return {"contact_id": contact_id, "recorded": contact_id is not None}


# ---------------------------------------------------------------- keywords, settings


@router.post(
    "/audience/inbound",
    response_model=InboundResult,
    responses=WRITE_ERRORS,
    summary="An inbound SMS/chat text: STOP, START, HELP and YES act before any flow",
)
async def inbound(body: InboundMessage, principal: ApiPrincipal, ctx: Ctx) -> InboundResult:
    principal.require("audience:write")
    async with ctx.db.transaction() as session:
        return await keywords.handle_inbound(
            session,
            ctx.signer,
            org_id=principal.org_id,
            channel=body.channel,
            sender=body.sender,
            text=body.text,
            now=ctx.clock.now(),
        )


@router.get("/audience/settings", response_model=AudienceSettingsOut, responses=READ_ERRORS)
async def get_settings(principal: ApiPrincipal, ctx: Ctx) -> AudienceSettingsOut:
    principal.require("audience:read")
    async with ctx.db.reader() as session:
        return await settings.get_settings(session, principal.org_id)


@router.put("/audience/settings", response_model=AudienceSettingsOut, responses=WRITE_ERRORS)
async def put_settings(
    body: AudienceSettingsIn, principal: ApiPrincipal, ctx: Ctx
) -> AudienceSettingsOut:
    async with ctx.db.transaction() as session:
        return await settings.update_settings(session, principal, body)


# ---------------------------------------------------------------- segments


@router.get("/segments", response_model=list[SegmentOut], responses=READ_ERRORS)
async def list_segments(principal: ApiPrincipal, ctx: Ctx) -> list[SegmentOut]:
    async with ctx.db.reader() as session:
        return [segments.segment_out(s) for s in await segments.list_segments(session, principal)]


@router.post("/segments", status_code=201, response_model=SegmentOut, responses=WRITE_ERRORS)
async def create_segment(body: SegmentIn, principal: ApiPrincipal, ctx: Ctx) -> SegmentOut:
    async with ctx.db.transaction() as session:
        segment = await segments.save_segment(session, principal, body, now=ctx.clock.now())
        return segments.segment_out(segment)


@router.get("/segments/{segment_id}", response_model=SegmentOut, responses=READ_ERRORS)
async def get_segment(segment_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> SegmentOut:
    async with ctx.db.reader() as session:
        return segments.segment_out(await segments.get_segment(session, principal, segment_id))


@router.put("/segments/{segment_id}", response_model=SegmentOut, responses=WRITE_ERRORS)
async def update_segment(
    segment_id: ItemId, body: SegmentIn, principal: ApiPrincipal, ctx: Ctx
) -> SegmentOut:
    async with ctx.db.transaction() as session:
        segment = await segments.save_segment(
            session, principal, body, now=ctx.clock.now(), segment_id=segment_id
        )
        return segments.segment_out(segment)


@router.delete("/segments/{segment_id}", status_code=204, responses=WRITE_ERRORS)
async def delete_segment(segment_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> None:
    async with ctx.db.transaction() as session:
        await segments.delete_segment(session, principal, segment_id)


@router.post(
    "/segments/preview",
    response_model=SegmentCount,
    responses=READ_ERRORS,
    summary="Count who unsaved rules reach right now (total, per channel, per bucket)",
)
async def preview_segment(body: SegmentRules, principal: ApiPrincipal, ctx: Ctx) -> SegmentCount:
    async with ctx.db.reader() as session:
        return await segments.count_segment(session, principal, body, now=ctx.clock.now())


@router.get("/segments/{segment_id}/count", response_model=SegmentCount, responses=READ_ERRORS)
async def count_segment(segment_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> SegmentCount:
    async with ctx.db.reader() as session:
        segment = segments.segment_out(await segments.get_segment(session, principal, segment_id))
        return await segments.count_segment(session, principal, segment.rules, now=ctx.clock.now())


@router.get(
    "/segments/{segment_id}/export.csv",
    responses=READ_ERRORS,
    summary="The segment's contacts as CSV (minimal fields), streamed",
)
async def export_segment(
    segment_id: ItemId, principal: ApiPrincipal, ctx: Ctx
) -> StreamingResponse:
    async def open_export(session: AsyncSession) -> Any:
        segment = segments.segment_out(await segments.get_segment(session, principal, segment_id))
        return await exports.export_contacts(
            session, principal, now=ctx.clock.now(), rules=segment.rules
        )

    return await csv_download(ctx, open_export, f"segment-{segment_id}.csv")


# ---------------------------------------------------------------- import, export

MAX_IMPORT_BYTES = 1_000_000  # bigger files: `popdrop contacts import` (no cap, progress bar)


@router.post(
    "/contact-imports",
    status_code=202,
    response_model=ImportJobOut,
    responses=error_responses(401, 403, 413, 422),
    summary="Import contacts from a CSV body (text/csv); runs in the background",
)
async def start_import(
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    filename: Annotated[str, Query(max_length=200)] = "upload.csv",
) -> ImportJobOut:
    principal.require("audience:write")
    raw = await request.body()
    if len(raw) > MAX_IMPORT_BYTES:
        raise PopdropError(
            "payload_too_large", "over 1 MB: use `popdrop contacts import` for big files"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PopdropError("invalid_request", "the file must be UTF-8 text") from exc
    require_clean_text(text, "file")
    require_clean_text(filename, "filename")
    async with ctx.db.transaction() as session:
        job = await import_jobs.create_job(
            session, principal, filename=filename, payload=text, now=ctx.clock.now()
        )
        out = import_jobs.job_out(job)
    import_jobs.launch_job(ctx.db, ctx.signer, ctx.clock, job.id)
    return out


@router.get(
    "/contact-imports/{job_id}",
    response_model=ImportJobOut,
    responses=READ_ERRORS,
    summary="An import job: progress, counts and the row-level report",
)
async def get_import(job_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> ImportJobOut:
    async with ctx.db.reader() as session:
        return import_jobs.job_out(await import_jobs.get_job(session, principal, job_id))


@router.get(
    "/exports/contacts.csv",
    responses=READ_ERRORS,
    summary="Contacts as CSV (all, or only those sendable on a channel right now), streamed",
)
async def export_contacts(
    principal: ApiPrincipal, ctx: Ctx, sendable: Literal["email", "sms"] | None = None
) -> StreamingResponse:
    async def open_export(session: AsyncSession) -> Any:
        return await exports.export_contacts(
            session, principal, now=ctx.clock.now(), sendable=sendable
        )

    name = f"contacts-sendable-{sendable}.csv" if sendable else "contacts.csv"
    return await csv_download(ctx, open_export, name)


@router.get(
    "/exports/consents.csv",
    responses=READ_ERRORS,
    summary="The consent ledger as CSV, streamed",
)
async def export_consents(principal: ApiPrincipal, ctx: Ctx) -> StreamingResponse:
    async def open_export(session: AsyncSession) -> Any:
        return await exports.export_consent(session, principal)

    return await csv_download(ctx, open_export, "consent-ledger.csv")
