"""Server-rendered pages of the voucher vault (Jinja2 + htmx), the audit page and the
public claim page `/v/{token}`.

Handlers stay thin: read the form, call `vouchers.service`, render. Rules that hold here:
- every operator page needs a session (`PagePrincipal`) and checks its scope, so a
  volunteer or partner gets a 403 page and never voucher data;
- every POST carries the double-submit CSRF field and calls `check_csrf` first;
- errors on these routes are always HTML (a page, or an alert fragment for htmx),
  whatever the Accept header says;
- plaintext codes exist only in the one response that issues them (`no-store`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import select

from popdrop.accounts.service import Principal
from popdrop.core import audit, links, qr
from popdrop.core.csvsafe import csv_text
from popdrop.core.errors import PopdropError
from popdrop.core.money import Money
from popdrop.core.schemas import require_clean_text
from popdrop.vouchers import codes, issue_jobs, job_pages, service
from popdrop.vouchers.api import guarded, to_csv
from popdrop.vouchers.models import VoucherBatch
from popdrop.vouchers.schemas import API_MAX_QUANTITY, JOB_THRESHOLD, BatchCreate
from popdrop.web.auth import check_csrf
from popdrop.web.context import AppContext
from popdrop.web.pagekit import Operator, PageRoute, is_htmx
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE
from popdrop.web.templating import render

# Up to JOB_THRESHOLD codes the answer shows them and carries a `data:` URL download
# (browsers cap URLs near 2 MB); above it a background job issues them and its page
# offers the CSV (`job_pages`). The form takes what one API request takes.
MAX_FORM_QUANTITY = API_MAX_QUANTITY
SHOWN_CODES = 500
AUDIT_PAGE_SIZE = 200
REDEMPTIONS_SHOWN = 100

router = APIRouter(include_in_schema=False, route_class=PageRoute)
router.include_router(job_pages.router)
# ---------------------------------------------------------------- issue form


@dataclass
class IssueForm:
    """The issue form as typed (to re-show it) and what is wrong with it, per field."""

    values: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    spec: BatchCreate | None = None
    links: bool = False

    @property
    def ok(self) -> bool:
        return self.spec is not None and not self.errors and not self.problems


DEFAULT_FORM = {
    "quantity": "100",
    "max_uses": "1",
    "tz": "UTC",
    "currency": "EUR",
    "discount_kind": "percent",
    "discount_value": "10",
}
# Where a schema field is edited on the form (the form speaks hours and major units).
_FORM_FIELD = {
    "ttl_seconds": "ttl_hours",
    "budget_minor": "budget",
    "cost_per_use_minor": "cost_per_use",
}


def parse_issue_form(form: Mapping[str, Any]) -> IssueForm:
    values = {k: str(v).strip() for k, v in form.items() if k != "csrf"}
    parsed = IssueForm(values=values, links=values.get("links") == "on")
    errors = parsed.errors
    get = values.get

    def integer(name: str) -> int | None:
        raw = get(name, "")
        if not raw:
            return None
        try:
            return int(raw.replace(",", "").replace("_", ""))
        except ValueError:
            errors[name] = "a whole number"
            return None

    def amount(name: str, currency: str) -> int | None:
        """Major units as typed ("4.50") to integer minor units, exactly (`Money.parse`)."""
        raw = get(name, "")
        if not raw:
            return None
        exponent = Money(0, currency).exponent
        try:
            return Money.parse(raw, currency).amount_minor
        except PopdropError:
            errors[name] = f"an amount like 4.50 (at most {exponent} decimals)"
            return None

    zone: ZoneInfo | None = None
    try:
        zone = ZoneInfo(get("tz") or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        errors["tz"] = "a time zone name such as UTC or Europe/Berlin"

    def moment(name: str) -> datetime | None:
        raw = get(name, "")
        if not raw or zone is None:
            return None
        try:
            local = datetime.fromisoformat(raw)
        except ValueError:
            errors[name] = "a date and time"
            return None
        # A datetime-local value has no offset: it means wall time in the chosen zone.
        return (local if local.tzinfo else local.replace(tzinfo=zone)).astimezone(UTC)

    currency = (get("currency") or "EUR").upper()
    data: dict[str, Any] = {
        "name": get("name", ""),
        "quantity": integer("quantity"),
        "max_uses": integer("max_uses"),
        "prefix": get("prefix") or None,
        "tag": get("tag") or None,
        "valid_from": moment("valid_from"),
        "valid_until": moment("valid_until"),
        "per_contact_limit": integer("per_contact_limit"),
        "currency": currency,
        "discount_kind": get("discount_kind") or "percent",
        "discount_description": get("discount_description", ""),
    }
    ttl_hours = get("ttl_hours", "")
    if ttl_hours:
        try:
            data["ttl_seconds"] = round(float(ttl_hours) * 3600)
        except (ValueError, OverflowError):  # "soon", "nan", "inf"
            errors["ttl_hours"] = "a number of hours"
    if re.fullmatch("[A-Z]{3}", currency):  # else pydantic names the currency error
        data["budget_minor"] = amount("budget", currency)
        data["cost_per_use_minor"] = amount("cost_per_use", currency)
        if data["discount_kind"] == "fixed":
            data["discount_value"] = amount("discount_value", currency)
        elif data["discount_kind"] == "percent":
            data["discount_value"] = integer("discount_value")
    # An unparsable field is left out: its own message beats pydantic's "missing".
    clean = {k: v for k, v in data.items() if v is not None and k not in errors}
    if "prefix" in clean:
        try:
            clean["prefix"] = codes.validate_prefix(clean["prefix"])
        except PopdropError as error:
            errors["prefix"] = error.message.removeprefix("prefix: ")
            del clean["prefix"]
    try:
        parsed.spec = BatchCreate.model_validate(clean)
    except ValidationError as exc:
        for problem in exc.errors():
            message = str(problem["msg"]).removeprefix("Value error, ")
            loc = [str(p) for p in problem["loc"]]
            name = _FORM_FIELD.get(loc[0], loc[0]) if loc else ""
            if not name:
                parsed.problems.append(message)
            elif name not in errors:
                errors[name] = message
    quantity = parsed.spec.quantity if parsed.spec else 0
    if quantity > MAX_FORM_QUANTITY:
        errors["quantity"] = (
            f"at most {MAX_FORM_QUANTITY:,} from this form; use `popdrop vouchers issue` for more"
        )
    return parsed


def csv_data_url(rows: list[list[str]]) -> str:
    """The download of freshly issued codes, carried in the page itself (never stored)."""
    return "data:text/csv;base64," + base64.b64encode(csv_text(rows).encode()).decode()


# ---------------------------------------------------------------- vault pages


async def _batches_page(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    *,
    notice: str | None = None,
    error: PopdropError | None = None,
    revoke_code: str = "",
) -> Response:
    async with ctx.db.reader() as session:
        batches = await service.list_batches(session, principal)
        ids = [b.id for b in batches]
        counts = await service.batch_counts(session, principal, ids)
        jobs = await issue_jobs.jobs_of(session, principal, ids)
    now = ctx.clock.now()
    context = {
        "principal": principal,
        "batches": batches,
        "counts": counts,
        "jobs": {b: issue_jobs.job_out(job, now) for b, job in jobs.items()},
        "notice": notice,
        "revoke_error": error,
        "revoke_code": revoke_code,
        "can_write": "vouchers:write" in principal.scopes,
    }
    return render(request, "vouchers/list.html", context, status=error.status if error else 200)


_NOTICES = {
    "code_revoked": "The code is revoked; its claim links stopped working.",
    "batch_revoked": "The batch is revoked; none of its codes can be redeemed any more.",
    "rolled_back": "The redemption is rolled back; the use is available again.",
}


@router.get("/vouchers")
async def batches(request: Request, principal: Operator, ctx: Ctx) -> Response:
    principal.require("vouchers:read")
    done = request.query_params.get("done", "")
    return await _batches_page(request, ctx, principal, notice=_NOTICES.get(done))


@router.get("/vouchers/search")
async def search(request: Request, principal: Operator, ctx: Ctx, code: str = "") -> Response:
    principal.require("vouchers:read")
    code = code.strip()[:64]
    voucher, error = None, None
    if code:

        async def call() -> Any:
            async with ctx.db.reader() as session:
                return await service.lookup_code(
                    session, ctx.signer, principal, code, ctx.clock.now()
                )

        try:  # the API's guessing guard: pages and API count failed lookups alike
            voucher = await guarded(ctx, request, principal, call)
        except PopdropError as refusal:  # shown in the result, with its status
            error = refusal
    context = {
        "principal": principal,
        "code": code,
        "voucher": voucher,
        "error": error,
        "can_write": "vouchers:write" in principal.scopes,
    }
    name = "vouchers/_search_result.html" if is_htmx(request) else "vouchers/search.html"
    response = render(request, name, context, status=error.status if error else 200)
    response.headers.update(error.headers if error else {})
    return response


@router.get("/vouchers/new")
async def new_batch_form(request: Request, principal: Operator) -> Response:
    principal.require("vouchers:write")
    form = IssueForm(values=dict(DEFAULT_FORM))
    return render(request, "vouchers/new.html", {"principal": principal, "form": form})


@router.post("/vouchers/new")
async def issue(request: Request, principal: Operator, ctx: Ctx) -> Response:
    form_data = await request.form()
    check_csrf(request, ctx, form_data)
    principal.require("vouchers:write")
    form = parse_issue_form(form_data)
    if form.ok and form.spec is not None and form.spec.quantity > JOB_THRESHOLD:
        return await _issue_in_background(request, ctx, principal, form)
    if form.ok and form.spec is not None:
        now = ctx.clock.now()
        try:
            async with ctx.db.transaction() as session:
                batch, issued = await service.issue_batch(
                    session,
                    ctx.signer,
                    principal,
                    form.spec,
                    now=now,
                )
        except PopdropError as error:
            if error.reason != "invalid_request":  # e.g. valid_until already past
                raise
            form.problems.append(error.message)
        else:
            return _issued_page(request, ctx, principal, batch, issued, form.links, now)
    context = {"principal": principal, "form": form}
    return render(request, "vouchers/new.html", context, status=422)


async def _issue_in_background(
    request: Request, ctx: AppContext, principal: Principal, form: IssueForm
) -> Response:
    assert form.spec is not None
    try:
        async with ctx.db.transaction() as session:
            _batch, job = await issue_jobs.create_job(
                session, principal, form.spec, with_links=form.links, now=ctx.clock.now()
            )
            job_id = job.id
    except PopdropError as error:
        if error.reason != "invalid_request":
            raise
        form.problems.append(error.message)
        context = {"principal": principal, "form": form}
        return render(request, "vouchers/new.html", context, status=422)
    issue_jobs.launch(ctx.db, ctx.signer, ctx.clock, job_id)
    return RedirectResponse(f"/vouchers/jobs/{job_id}", status_code=303)


def _issued_page(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    batch: VoucherBatch,
    issued: list[str],
    with_links: bool,
    now: datetime,
) -> Response:
    expires_at = service.link_expiry(batch, now)
    links = [
        service.make_link(ctx.signer, ctx.settings.base_url, c, expires_at=expires_at)[0]
        for c in (issued if with_links else [])
    ]
    if links:
        rows = [["code", "link"], *([c, u] for c, u in zip(issued, links, strict=True))]
    else:
        rows = [["code"], *([c] for c in issued)]
    context = {
        "principal": principal,
        "batch": service.batch_out(batch),
        "count": len(issued),
        "shown": [(c, links[i] if links else "") for i, c in enumerate(issued[:SHOWN_CODES])],
        "links": bool(links),
        "links_expire_at": expires_at,
        "csv_url": csv_data_url(rows),
        "csv_name": f"batch-{batch.id}-codes.csv",
    }
    response = render(request, "vouchers/issued.html", context, status=201)
    response.headers.update(NO_STORE)
    return response


@router.get("/vouchers/batches/{batch_id}")
async def batch_detail(
    request: Request, batch_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    principal.require("vouchers:read")
    async with ctx.db.reader() as session:
        batch = await service.get_batch(session, principal, batch_id)
        stats = await service.batch_stats(session, principal, batch_id)
        redemptions = await service.list_redemptions(
            session, principal, batch_id=batch_id, limit=REDEMPTIONS_SHOWN
        )
        job = (await issue_jobs.jobs_of(session, principal, [batch_id])).get(batch_id)
    context = {
        "principal": principal,
        "batch": service.batch_out(batch),
        "stats": stats,
        "capacity": stats.issued * batch.max_uses,
        "redemptions": redemptions,
        "shown_limit": REDEMPTIONS_SHOWN,
        "job": issue_jobs.job_out(job, ctx.clock.now()) if job else None,
        "notice": _NOTICES.get(request.query_params.get("done", "")),
        "can_write": "vouchers:write" in principal.scopes,
    }
    return render(request, "vouchers/detail.html", context)


@router.get("/vouchers/batches/{batch_id}/export.csv")
async def batch_export(batch_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    async with ctx.db.reader() as session:
        rows = await service.export_vouchers(session, principal, batch_id, ctx.clock.now())
    return Response(
        to_csv(rows),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="batch-{batch_id}-states.csv"'},
    )


def _reason(form: Mapping[str, Any], default: str) -> str:
    reason = require_clean_text(str(form.get("reason", "")).strip()[:200], "reason")
    return reason or default


@router.post("/vouchers/batches/{batch_id}/revoke")
async def batch_revoke(
    request: Request, batch_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    form = await request.form()
    check_csrf(request, ctx, form)
    async with ctx.db.transaction() as session:
        await service.revoke_batch(
            session,
            principal,
            batch_id=batch_id,
            reason=_reason(form, "revoked by operator"),
            now=ctx.clock.now(),
        )
    return RedirectResponse(f"/vouchers/batches/{batch_id}?done=batch_revoked", status_code=303)


@router.post("/vouchers/redemptions/{redemption_id}/rollback")
async def redemption_rollback(
    request: Request, redemption_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    form = await request.form()
    check_csrf(request, ctx, form)
    async with ctx.db.transaction() as session:
        done = await service.rollback(
            session,
            principal,
            redemption_id=redemption_id,
            reason=_reason(form, "rolled back by operator"),
            now=ctx.clock.now(),
        )
    return RedirectResponse(f"/vouchers/batches/{done.batch_id}?done=rolled_back", status_code=303)


@router.post("/vouchers/revoke-code")
async def code_revoke(request: Request, principal: Operator, ctx: Ctx) -> Response:
    form = await request.form()
    check_csrf(request, ctx, form)
    principal.require("vouchers:write")
    code = str(form.get("code", "")).strip()[:64]

    async def call() -> Any:
        async with ctx.db.transaction() as session:
            return await service.revoke_code(
                session,
                ctx.signer,
                principal,
                code=code,
                reason=_reason(form, "revoked by operator"),
                now=ctx.clock.now(),
            )

    try:
        await guarded(ctx, request, principal, call)
    except PopdropError as error:
        if error.reason in ("forbidden", "csrf_failed"):
            raise
        # Show the refusal next to the form, keeping what was typed.
        return await _batches_page(request, ctx, principal, error=error, revoke_code=code)
    return RedirectResponse("/vouchers?done=code_revoked", status_code=303)


# ---------------------------------------------------------------- audit


async def _latest_entries(ctx: AppContext, org_id: int) -> list[audit.AuditEntry]:
    async with ctx.db.reader() as session:
        rows = await session.scalars(
            select(audit.AuditEntry)
            .where(audit.AuditEntry.org_id == org_id)
            .order_by(audit.AuditEntry.id.desc())
            .limit(AUDIT_PAGE_SIZE)
        )
        return list(rows)


@router.get("/audit")
async def audit_page(request: Request, principal: Operator, ctx: Ctx) -> Response:
    principal.require("audit:read")
    entries = await _latest_entries(ctx, principal.org_id)
    context = {"principal": principal, "entries": entries, "limit": AUDIT_PAGE_SIZE}
    return render(request, "vouchers/audit.html", context)


@router.post("/audit/verify")
async def audit_verify(request: Request, principal: Operator, ctx: Ctx) -> Response:
    check_csrf(request, ctx, await request.form())
    principal.require("audit:read")
    async with ctx.db.reader() as session:
        result = await audit.verify(session, principal.org_id)
    if is_htmx(request):
        return render(request, "vouchers/_verify_result.html", {"result": result})
    entries = await _latest_entries(ctx, principal.org_id)
    context = {
        "principal": principal,
        "entries": entries,
        "limit": AUDIT_PAGE_SIZE,
        "result": result,
    }
    return render(request, "vouchers/audit.html", context)


# ---------------------------------------------------------------- public claim page


_CLAIM_TROUBLE = {
    "link_invalid": (
        "This link doesn't look right",
        "It may have been cut short when it was copied. Open the original message and tap "
        "the link again.",
    ),
    "link_expired": (
        "This link has expired",
        "Claim links only work for a limited time. Ask the host for a fresh one.",
    ),
    "revoked": (
        "This voucher was withdrawn",
        "The host cancelled this voucher, so it can't be used any more.",
    ),
    "expired": ("This voucher has expired", "Its validity period is over."),
    "exhausted": ("This voucher has been used", "All of its uses are taken."),
    "not_yet_valid": ("Not yet!", "This voucher isn't valid yet. Come back when it starts."),
    "unknown": ("We can't find this voucher", "It may have been removed."),
}


def _claim_trouble(request: Request, error: PopdropError) -> Response:
    title, hint = _CLAIM_TROUBLE.get(error.reason, ("This voucher can't be used", error.message))
    starts = error.detail.get("valid_from")
    context = {
        "error": error,
        "title": title,
        "hint": hint,
        "starts_at": datetime.fromisoformat(starts) if isinstance(starts, str) else None,
    }
    response = render(request, "vouchers/claim_trouble.html", context, status=error.status)
    response.headers.update(NO_STORE)
    return response


@router.get("/v/{token}")
async def claim(request: Request, token: str, ctx: Ctx) -> Response:
    try:
        async with ctx.db.reader() as session:
            view = await service.open_link(session, ctx.signer, token, ctx.clock.now())
    except PopdropError as error:
        return _claim_trouble(request, error)
    # The QR holds the claim link itself, so a phone camera opens this page.
    link = links.voucher_link_url(ctx.settings.base_url, token)
    context = {"view": view, "voucher": view.voucher, "qr": qr.svg_inline(link), "token": token}
    response = render(request, "vouchers/claim.html", context)
    response.headers.update(NO_STORE)
    response.headers["X-Robots-Tag"] = "noindex"
    return response


@router.get("/v/{token}/qr.svg")
async def claim_qr(token: str, ctx: Ctx) -> Response:
    async with ctx.db.reader() as session:
        await service.open_link(session, ctx.signer, token, ctx.clock.now())  # still valid?
    image = qr.svg_bytes(links.voucher_link_url(ctx.settings.base_url, token))
    return Response(image, media_type="image/svg+xml", headers=NO_STORE)
