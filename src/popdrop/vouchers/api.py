"""Voucher vault REST API (thin: parse, call the service, shape the answer)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import iterate_in_threadpool

from popdrop.accounts.service import Principal
from popdrop.core.csvsafe import csv_text
from popdrop.core.errors import PopdropError
from popdrop.core.ratelimit import GUESSING_REASONS
from popdrop.core.schemas import error_responses
from popdrop.vouchers import issue_jobs, service
from popdrop.vouchers.schemas import (
    JOB_THRESHOLD,
    BatchDetail,
    BatchIssueRequest,
    BatchOut,
    IssuedBatch,
    IssueJobAccepted,
    IssueJobOut,
    LinkOut,
    LinkRequest,
    RedeemRequest,
    RedeemResult,
    RedemptionOut,
    RevokeCodeRequest,
    RevokeRequest,
    RevokeResult,
    RevokeTagRequest,
    RollbackRequest,
    ValidateRequest,
    VoucherOut,
)
from popdrop.web.auth import ApiPrincipal
from popdrop.web.context import AppContext, client_address
from popdrop.web.idempotent import answer_once, respond_once
from popdrop.web.params import Before, Ctx, IdempotencyKey, ItemId, Limit
from popdrop.web.security import NO_STORE

router = APIRouter(prefix="/api/v1", tags=["vouchers"])

REDEMPTIONS = Counter("popdrop_voucher_redemptions_total", "Redemption attempts", ["result"])
REDEMPTIONS_OK = REDEMPTIONS.labels("ok")
REDEEM_REFUSALS = (400, 401, 403, 404, 409, 410, 422, 429)


async def guarded(ctx: AppContext, request: Request, principal: Principal, call: Any) -> Any:
    """Refuse callers that guessed too much; count their unknown/malformed codes. The
    caller is counted by its own token (or operator), never with public traffic, so a flood
    of forged public requests cannot stop a till."""
    address = client_address(request)
    await ctx.guard.check(principal.org_id, address, principal=principal.actor)
    try:
        return await call()
    except PopdropError as error:
        if error.reason in GUESSING_REASONS:
            await ctx.guard.failed(principal.org_id, address, principal=principal.actor)
        raise


# ---------------------------------------------------------------- batches


@router.post(
    "/voucher-batches",
    status_code=201,
    response_model=IssuedBatch,
    responses={
        202: {
            "model": IssueJobAccepted,
            "description": f"Above {JOB_THRESHOLD:,} codes: the batch is issued in the "
            "background; follow `job.progress_url`, then download `job.download_url` once.",
        },
        **error_responses(401, 403, 409, 422),
    },
    summary="Issue a batch of codes (plaintext returned this once)",
)
async def issue_batch(
    body: BatchIssueRequest,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
    links: Annotated[bool, Query(description="Also return a signed claim link per code")] = False,
) -> Response:
    now = ctx.clock.now()
    if body.quantity > JOB_THRESHOLD:
        return await _issue_in_background(body, request, principal, ctx, idempotency_key, links)
    shown: dict[str, Any] = {}

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        batch, codes = await service.issue_batch(
            session,
            ctx.signer,
            principal,
            body,
            now=now,
        )
        shown["codes"] = codes
        if links:
            expiry = service.link_expiry(batch, now)
            shown["links"] = [
                service.make_link(ctx.signer, ctx.settings.base_url, c, expires_at=expiry)[0]
                for c in codes
            ]
        # The stored answer (for retries) never holds plaintext codes.
        return 201, {"batch": service.batch_out(batch).model_dump(mode="json"), "codes": []}

    status, payload = await answer_once(
        ctx, request, principal, idempotency_key, body, operation, scope="vouchers:write"
    )
    if shown:
        payload = {**payload, "codes": shown["codes"], "links": shown.get("links")}
    else:
        payload = {**payload, "replayed": True}
    return JSONResponse(payload, status_code=status)


async def _issue_in_background(
    body: BatchIssueRequest,
    request: Request,
    principal: Principal,
    ctx: AppContext,
    idempotency_key: str | None,
    links: bool,
) -> Response:
    """202 with the batch and its queued job; the job starts in this process at once (the
    worker tick would also find it), and a retry with the same key gets the same job."""
    now = ctx.clock.now()

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        batch, job = await issue_jobs.create_job(
            session, principal, body, with_links=links, now=now
        )
        out = issue_jobs.job_out(job, now)
        accepted = IssueJobAccepted(batch=service.batch_out(batch), job=out)
        return 202, accepted.model_dump(mode="json")

    status, payload = await answer_once(
        ctx, request, principal, idempotency_key, body, operation, scope="vouchers:write"
    )
    job = payload.get("job")
    if status == 202 and isinstance(job, dict):
        issue_jobs.launch(ctx.db, ctx.signer, ctx.clock, int(job["id"]))
        return JSONResponse(payload, status_code=202, headers={"Location": job["progress_url"]})
    return JSONResponse(payload, status_code=status)


@router.get(
    "/voucher-batches/jobs/{job_id}",
    response_model=IssueJobOut,
    responses=error_responses(401, 403, 404),
    summary="A background issue job: status and progress (codes issued of total)",
)
async def get_issue_job(job_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> IssueJobOut:
    async with ctx.db.reader() as session:
        job = await issue_jobs.get_job(session, principal, job_id)
        return issue_jobs.job_out(job, ctx.clock.now())


@router.get(
    "/voucher-batches/jobs/{job_id}/codes.csv",
    responses={200: {"content": {"text/csv": {}}}, **error_responses(401, 403, 404, 409, 410)},
    response_class=Response,
    summary="The plaintext codes of a done job, as CSV: one download, then only hashes remain",
)
async def download_job_codes(job_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> Response:
    return await codes_download(ctx, principal, job_id)


async def codes_download(ctx: AppContext, principal: Principal, job_id: int) -> Response:
    """The one download of a job's codes (API and page): the seed is wiped and the
    download audited in one transaction, then the CSV is made and streamed."""
    async with ctx.db.transaction() as session:
        sheet = await issue_jobs.take_codes(session, principal, job_id, now=ctx.clock.now())
    return StreamingResponse(
        iterate_in_threadpool(issue_jobs.sheet_csv(ctx.signer, ctx.settings.base_url, sheet)),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="batch-{sheet.batch.id}-codes.csv"',
            **NO_STORE,
        },
    )


@router.get("/voucher-batches", response_model=list[BatchOut], responses=error_responses(401, 403))
async def list_batches(
    principal: ApiPrincipal, ctx: Ctx, limit: Limit = 100, before: Before = None
) -> list[BatchOut]:
    async with ctx.db.reader() as session:
        rows = await service.list_batches(session, principal, limit=limit, before_id=before)
    return [service.batch_out(b) for b in rows]


@router.get(
    "/voucher-batches/{batch_id}",
    response_model=BatchDetail,
    responses=error_responses(401, 403, 404),
)
async def get_batch(batch_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> BatchDetail:
    async with ctx.db.reader() as session:
        batch = await service.get_batch(session, principal, batch_id)
        stats = await service.batch_stats(session, principal, batch.id)
    return BatchDetail(**service.batch_out(batch).model_dump(), stats=stats)


@router.post(
    "/voucher-batches/{batch_id}/revoke",
    response_model=RevokeResult,
    responses=error_responses(401, 403, 404, 422),
)
async def revoke_batch(
    batch_id: ItemId, body: RevokeRequest, principal: ApiPrincipal, ctx: Ctx
) -> RevokeResult:
    async with ctx.db.transaction() as session:
        count = await service.revoke_batch(
            session,
            principal,
            batch_id=batch_id,
            reason=body.reason,
            now=ctx.clock.now(),
        )
    return RevokeResult(revoked=count)


@router.get(
    "/voucher-batches/{batch_id}/export",
    responses={200: {"content": {"text/csv": {}}}, **error_responses(401, 403, 404)},
    response_class=Response,
    summary="CSV of every code's state (codes themselves are never stored)",
)
async def export_batch(batch_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> Response:
    async with ctx.db.reader() as session:
        rows = await service.export_vouchers(session, principal, batch_id, ctx.clock.now())
    return Response(
        to_csv(rows),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="batch-{batch_id}.csv"'},
    )


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    return csv_text([columns, *([row.get(c) for c in columns] for row in rows)])


# ---------------------------------------------------------------- codes


@router.post(
    "/vouchers/redeem",
    response_model=RedeemResult,
    responses=error_responses(*REDEEM_REFUSALS),
    summary="Redeem a code once; safe to retry with Idempotency-Key",
)
async def redeem(
    body: RedeemRequest,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    now = ctx.clock.now()
    asked: dict[str, Any] = {
        "code": body.code, "contact_ref": body.contact_ref, "order_ref": body.order_ref, "now": now
    }  # fmt: skip

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        result = await service.redeem(session, ctx.signer, principal, **asked)
        return 200, result.model_dump(mode="json")

    async def call() -> tuple[int, dict[str, Any] | bytes]:
        if idempotency_key is None:  # nothing to store: grouped with concurrent redemptions
            principal.require("vouchers:redeem")
            result = await service.redeem_now(ctx.db, ctx.signer, principal, **asked)
            return 200, result.model_dump_json().encode()  # what JSONResponse would send
        return await answer_once(
            ctx, request, principal, idempotency_key, body, operation, scope="vouchers:redeem"
        )

    try:
        status, payload = await guarded(ctx, request, principal, call)
    except PopdropError as error:
        REDEMPTIONS.labels(error.reason).inc()
        raise
    if isinstance(payload, bytes):
        REDEMPTIONS_OK.inc()
        return Response(payload, media_type="application/json")
    REDEMPTIONS.labels("ok" if status == 200 else str(payload.get("reason"))).inc()
    return JSONResponse(payload, status_code=status)


@router.post(
    "/vouchers/validate",
    response_model=VoucherOut,
    responses=error_responses(*REDEEM_REFUSALS),
    summary="Dry run of redeem: same checks and reasons, nothing consumed",
)
async def validate(
    body: ValidateRequest, request: Request, principal: ApiPrincipal, ctx: Ctx
) -> VoucherOut:
    async def call() -> VoucherOut:
        async with ctx.db.reader() as session:
            return await service.validate(
                session,
                ctx.signer,
                principal,
                code=body.code,
                contact_ref=body.contact_ref,
                now=ctx.clock.now(),
            )

    result: VoucherOut = await guarded(ctx, request, principal, call)
    return result


@router.post(
    "/vouchers/lookup",
    response_model=VoucherOut,
    responses=error_responses(401, 403, 404, 422, 429),
    summary="Find a code's voucher and state (operator search)",
)
async def lookup(
    body: ValidateRequest, request: Request, principal: ApiPrincipal, ctx: Ctx
) -> VoucherOut:
    async def call() -> VoucherOut:
        async with ctx.db.reader() as session:
            return await service.lookup_code(
                session, ctx.signer, principal, body.code, ctx.clock.now()
            )

    result: VoucherOut = await guarded(ctx, request, principal, call)
    return result


@router.get(
    "/vouchers/{voucher_id}", response_model=VoucherOut, responses=error_responses(401, 403, 404)
)
async def get_voucher(voucher_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> VoucherOut:
    async with ctx.db.reader() as session:
        return await service.get_voucher(session, principal, voucher_id, ctx.clock.now())


@router.post(
    "/vouchers/{voucher_id}/revoke",
    response_model=RevokeResult,
    responses=error_responses(401, 403, 404, 422),
)
async def revoke_voucher(
    voucher_id: ItemId, body: RevokeRequest, principal: ApiPrincipal, ctx: Ctx
) -> RevokeResult:
    async with ctx.db.transaction() as session:
        count = await service.revoke_voucher(
            session,
            principal,
            voucher_id=voucher_id,
            reason=body.reason,
            now=ctx.clock.now(),
        )
    return RevokeResult(revoked=count)


@router.post(
    "/vouchers/revoke",
    response_model=RevokeResult,
    responses=error_responses(401, 403, 404, 422, 429),
    summary="Revoke one code by its text",
)
async def revoke_code(
    body: RevokeCodeRequest, request: Request, principal: ApiPrincipal, ctx: Ctx
) -> RevokeResult:
    async def call() -> int:
        async with ctx.db.transaction() as session:
            return await service.revoke_code(
                session,
                ctx.signer,
                principal,
                code=body.code,
                reason=body.reason,
                now=ctx.clock.now(),
            )

    return RevokeResult(revoked=await guarded(ctx, request, principal, call))


@router.post(
    "/vouchers/revoke-tag",
    response_model=RevokeResult,
    responses=error_responses(401, 403, 422),
    summary="Revoke every code of every batch with this tag",
)
async def revoke_tag(body: RevokeTagRequest, principal: ApiPrincipal, ctx: Ctx) -> RevokeResult:
    async with ctx.db.transaction() as session:
        count = await service.revoke_tag(
            session,
            principal,
            tag=body.tag,
            reason=body.reason,
            now=ctx.clock.now(),
        )
    return RevokeResult(revoked=count)


@router.post(
    "/vouchers/links",
    response_model=LinkOut,
    responses=error_responses(401, 403, 404, 410, 422, 429),
    summary="A signed, expiring claim link /v/{token} for a code",
)
async def make_link(
    body: LinkRequest, request: Request, principal: ApiPrincipal, ctx: Ctx
) -> LinkOut:
    now = ctx.clock.now()

    async def call() -> VoucherOut:
        async with ctx.db.reader() as session:
            return await service.lookup_code(session, ctx.signer, principal, body.code, now)

    voucher: VoucherOut = await guarded(ctx, request, principal, call)
    expires_at = now + timedelta(seconds=body.ttl_seconds)
    if voucher.valid_until is not None:
        expires_at = min(expires_at, voucher.valid_until)
    url, expires_at = service.make_link(
        ctx.signer, ctx.settings.base_url, body.code, expires_at=expires_at
    )
    return LinkOut(url=url, expires_at=expires_at)


# ---------------------------------------------------------------- redemptions


@router.get("/redemptions", response_model=list[RedemptionOut], responses=error_responses(401, 403))
async def list_redemptions(
    principal: ApiPrincipal,
    ctx: Ctx,
    batch_id: Before = None,
    voucher_id: Before = None,
    limit: Limit = 100,
    before: Before = None,
) -> list[RedemptionOut]:
    async with ctx.db.reader() as session:
        rows = await service.list_redemptions(
            session,
            principal,
            batch_id=batch_id,
            voucher_id=voucher_id,
            limit=limit,
            before_id=before,
        )
    return [service.redemption_out(r) for r in rows]


@router.post(
    "/redemptions/{redemption_id}/rollback",
    response_model=RedemptionOut,
    responses=error_responses(401, 403, 404, 409, 422),
    summary="Give a use back (a return), with a reason",
)
async def rollback(
    redemption_id: ItemId,
    body: RollbackRequest,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    now = ctx.clock.now()

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        result = await service.rollback(
            session,
            principal,
            redemption_id=redemption_id,
            reason=body.reason,
            now=now,
        )
        return 200, result.model_dump(mode="json")

    return await respond_once(
        ctx, request, principal, idempotency_key, body, operation, scope="vouchers:write"
    )
