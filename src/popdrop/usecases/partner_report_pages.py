"""The partner ROI report over HTTP (the figures: `usecases.partner_report`).

Operator and partner pages (a session; `roi:read`; a partner login opens only its own
partner's report, anyone else's answers 404 like a missing one):
  GET  /reports/events/{event_id}/partners/{partner_id}        the page
  GET  /reports/events/{event_id}/partners/{partner_id}.pdf    the same template as PDF
  GET  /reports/events/{event_id}/partners/{partner_id}.csv    the same figures as CSV
  POST /reports/events/{event_id}/partners/{partner_id}/link   mint a share link (form)
Public, the signed expiring link (`core.links.partner_report_url`), no login:
  GET  /reports/{token}, /reports/{token}.pdf, /reports/{token}.csv
  (expired: a 410 page; bad: 400; its partner gone: 404 — each with its reason)
API (token; `roi:read`, same partner rule):
  GET  /api/v1/reports/events/{event_id}/partners/{partner_id}        JSON
  POST /api/v1/reports/events/{event_id}/partners/{partner_id}/link   {url, expires_at}

Rules: every read folds the pending funnel log first, so the report shows every sale
committed before the request. The PDF is rendered by WeasyPrint in a worker thread (a
document takes a few hundred milliseconds; the event loop keeps serving meanwhile), at
most two at a time, and loads no file or URL.
Answers are `no-store` and send no referrer: a share link is a bearer credential.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from popdrop.accounts.service import Principal
from popdrop.core import links
from popdrop.core.errors import PopdropError
from popdrop.core.schemas import error_responses
from popdrop.metrics import rollups
from popdrop.usecases import partner_report as reports
from popdrop.web.auth import ApiPrincipal, check_csrf
from popdrop.web.context import AppContext
from popdrop.web.pagekit import Operator, PageRoute
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE
from popdrop.web.templating import render, templates

router = APIRouter()
public_router = APIRouter(include_in_schema=False)
_pages = APIRouter(include_in_schema=False, route_class=PageRoute)
_api = APIRouter(prefix="/api/v1", tags=["reports"])

# PDFs render in threads of their own, a few at a time: a burst of downloads neither
# blocks the event loop nor takes the threads other sync work runs in.
_PDF_THREADS = anyio.CapacityLimiter(2)
TEMPLATE = "reports/partner.html"
PDF_BASE = "reports/_pdf.html"
_HEADERS = {**NO_STORE, "X-Robots-Tag": "noindex"}
_TROUBLE = {
    "link_invalid": "This link doesn't look right: ask whoever shared it for a new one.",
    "link_expired": "This report link has expired: ask whoever shared it for a new one.",
    "not_found": "This report is no longer available.",
}


def _report_path(event_id: int, partner_id: int) -> str:
    return f"/reports/events/{event_id}/partners/{partner_id}"


def _filename(report: reports.PartnerReport, ext: str) -> str:
    return f"partner-report-{report.event_id}-{report.partner_id}.{ext}"


# ---------------------------------------------------------------- loading


async def _for_principal(
    ctx: AppContext, principal: Principal, event_id: int, partner_id: int
) -> tuple[reports.Target, reports.PartnerReport]:
    await rollups.fold_pending(ctx.db)
    async with ctx.db.reader() as session:
        target = await reports.target_for(session, principal, event_id, partner_id)
        return target, await reports.build(session, target, now=ctx.clock.now())


async def _for_link(
    ctx: AppContext, token: str
) -> tuple[links.PartnerReportLink, reports.PartnerReport]:
    link = links.read_partner_report(ctx.signer, token, now=ctx.clock.now())
    await rollups.fold_pending(ctx.db)
    async with ctx.db.reader() as session:
        target = await reports.target_of_link(session, link)
        return link, await reports.build(session, target, now=ctx.clock.now())


# ---------------------------------------------------------------- rendering


def _pdf_bytes(html: str) -> bytes:
    import weasyprint  # type: ignore[import-untyped]  # heavy (Pango): loaded on first use

    # No protocol allowed: the styles and the chart are inline, and nothing in a report
    # may make the server open a file or a URL.
    fetcher = weasyprint.urls.URLFetcher(allowed_protocols=())
    pdf: bytes = weasyprint.HTML(string=html, url_fetcher=fetcher).write_pdf()
    return pdf


async def _pdf(report: reports.PartnerReport) -> Response:
    html = templates.env.get_template(TEMPLATE).render(
        report=report, base=PDF_BASE, mode="pdf", base_path=""
    )
    body = await anyio.to_thread.run_sync(_pdf_bytes, html, limiter=_PDF_THREADS)
    return Response(
        body,
        media_type="application/pdf",
        headers={
            "Content-Disposition": f'inline; filename="{_filename(report, "pdf")}"',
            **_HEADERS,
        },
    )


def _csv(report: reports.PartnerReport) -> Response:
    return Response(
        reports.csv_of(report),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{_filename(report, "csv")}"',
            **_HEADERS,
        },
    )


def _page(
    request: Request, report: reports.PartnerReport, status: int = 200, **context: Any
) -> Response:
    data = {
        "report": report,
        "base": "layout.html",
        "mode": "page",
        "default_days": reports.LINK_DAYS,
        **context,
    }
    response = render(request, TEMPLATE, data, status=status)
    response.headers.update(_HEADERS)
    return response


def _trouble(request: Request, error: PopdropError) -> Response:
    """A public link that does not open: a page with the reason (400, 404 or 410)."""
    shown = PopdropError(error.reason, _TROUBLE.get(error.reason, error.message))
    response = render(request, "error.html", {"error": shown}, status=error.status)
    response.headers.update(_HEADERS)
    return response


# ---------------------------------------------------------------- operator and partner pages


@_pages.get("/reports/events/{event_id}/partners/{partner_id}.pdf")
async def report_pdf(
    event_id: ItemId, partner_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    _, report = await _for_principal(ctx, principal, event_id, partner_id)
    return await _pdf(report)


@_pages.get("/reports/events/{event_id}/partners/{partner_id}.csv")
async def report_csv(
    event_id: ItemId, partner_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    _, report = await _for_principal(ctx, principal, event_id, partner_id)
    return _csv(report)


@_pages.get("/reports/events/{event_id}/partners/{partner_id}")
async def report_page(
    request: Request, event_id: ItemId, partner_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    _, report = await _for_principal(ctx, principal, event_id, partner_id)
    return _page(request, report, principal=principal, base_path=_report_path(event_id, partner_id))


@_pages.post("/reports/events/{event_id}/partners/{partner_id}/link")
async def share_from_page(
    request: Request, event_id: ItemId, partner_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    form = await request.form()
    check_csrf(request, ctx, form)
    try:
        spec = reports.ShareLinkIn.model_validate({"days": str(form.get("days", ""))})
    except ValidationError:
        raise PopdropError("invalid_request", "a link lives 1 to 365 days") from None
    target, report = await _for_principal(ctx, principal, event_id, partner_id)
    shared = reports.share_link(
        ctx.signer, ctx.settings.base_url, target, now=ctx.clock.now(), days=spec.days
    )
    return _page(
        request,
        report,
        status=201,
        principal=principal,
        base_path=_report_path(event_id, partner_id),
        shared=shared,
        default_days=spec.days,
    )


# ---------------------------------------------------------------- the shared link


@public_router.get("/reports/{token}.pdf")
async def shared_pdf(request: Request, token: str, ctx: Ctx) -> Response:
    try:
        _, report = await _for_link(ctx, token)
    except PopdropError as error:
        return _trouble(request, error)
    return await _pdf(report)


@public_router.get("/reports/{token}.csv")
async def shared_csv(request: Request, token: str, ctx: Ctx) -> Response:
    try:
        _, report = await _for_link(ctx, token)
    except PopdropError as error:
        return _trouble(request, error)
    return _csv(report)


@public_router.get("/reports/{token}")
async def shared_page(request: Request, token: str, ctx: Ctx) -> Response:
    try:
        link, report = await _for_link(ctx, token)
    except PopdropError as error:
        return _trouble(request, error)
    return _page(
        request, report, mode="public", base_path=f"/reports/{token}", expires_at=link.expires_at
    )


# ---------------------------------------------------------------- API


@_api.get(
    "/reports/events/{event_id}/partners/{partner_id}",
    response_model=reports.PartnerReport,
    responses=error_responses(401, 403, 404, 422),
    summary="A partner's ROI report for one event (small counts suppressed)",
)
async def report_json(
    event_id: ItemId, partner_id: ItemId, principal: ApiPrincipal, ctx: Ctx
) -> reports.PartnerReport:
    _, report = await _for_principal(ctx, principal, event_id, partner_id)
    return report


@_api.post(
    "/reports/events/{event_id}/partners/{partner_id}/link",
    status_code=201,
    response_model=reports.ShareLink,
    responses=error_responses(401, 403, 404, 422),
    summary="A signed link that opens the report without a login until it expires",
)
async def report_link(
    event_id: ItemId,
    partner_id: ItemId,
    principal: ApiPrincipal,
    ctx: Ctx,
    body: reports.ShareLinkIn | None = None,
) -> Response:
    async with ctx.db.reader() as session:
        target = await reports.target_for(session, principal, event_id, partner_id)
    shared = reports.share_link(
        ctx.signer,
        ctx.settings.base_url,
        target,
        now=ctx.clock.now(),
        days=(body or reports.ShareLinkIn()).days,
    )
    return Response(
        shared.model_dump_json(), status_code=201, media_type="application/json", headers=NO_STORE
    )


router.include_router(_api)
router.include_router(_pages)
