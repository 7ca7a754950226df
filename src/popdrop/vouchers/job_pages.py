"""The page of a background issue job (`/vouchers/jobs/{id}`): a progress bar that polls
itself (htmx) until the job ends, then the one download of its codes.

The download is a POST with the CSRF field (it wipes the job's seed: a prefetch or a
crawler must never spend it) answered with the CSV itself, `no-store`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from popdrop.vouchers import issue_jobs, service
from popdrop.vouchers.api import codes_download
from popdrop.web.auth import check_csrf
from popdrop.web.pagekit import Operator, PageRoute, is_htmx
from popdrop.web.params import Ctx, ItemId
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False, route_class=PageRoute)


@router.get("/vouchers/jobs/{job_id}")
async def issue_job(request: Request, job_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    principal.require("vouchers:read")
    async with ctx.db.reader() as session:
        job = await issue_jobs.get_job(session, principal, job_id)
        batch = await service.get_batch(session, principal, job.batch_id)
    context = {
        "principal": principal,
        "job": issue_jobs.job_out(job, ctx.clock.now()),
        "batch": service.batch_out(batch),
        "can_write": "vouchers:write" in principal.scopes,
    }
    name = "vouchers/_job.html" if is_htmx(request) else "vouchers/job.html"
    return render(request, name, context)


@router.post("/vouchers/jobs/{job_id}/codes.csv")
async def issue_job_codes(
    request: Request, job_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    check_csrf(request, ctx, await request.form())
    return await codes_download(ctx, principal, job_id)
