"""Audience pages: the operator's overview, contact, segment and import pages (`/audience`),
and the public preference / one-click unsubscribe / double opt-in pages.

Handlers stay thin: read the form, call the audience modules (contacts, consent,
segments, settings, imports and exports), render; a person's page and erasure are in
`usecases.privacy_pages`. The rules of the other operator pages hold (`PageRoute`):
- every operator page needs a session and `audience:read` (`audience:write` to change),
  so a volunteer or a partner gets a 403 page and never a contact;
- every operator POST carries the double-submit CSRF field and calls `check_csrf` first;
- a refusal is shown next to the form it belongs to (4xx), never a 500.

Public pages take a signed token (`core.links.preferences_token`, the double opt-in token):
- `POST /u/{token}` is the RFC 8058 one-click endpoint: no login, no CSRF, any body (or
  none); a GET of the same URL only shows the preferences, because mail scanners
  prefetch links and must never unsubscribe anyone;
- a bad token answers a readable page with 400 (`link_invalid`) or 410 (`link_expired`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import FormData, UploadFile

from popdrop.accounts.models import Organization
from popdrop.accounts.service import Principal
from popdrop.audience import consent as audience_consent
from popdrop.audience import contacts as audience_contacts
from popdrop.audience import exports, import_jobs, importer, unsubscribe
from popdrop.audience import segments as audience_segments
from popdrop.audience import settings as audience_settings
from popdrop.audience.lifecycle import ConsentState
from popdrop.audience.models import Contact, ContactLabel
from popdrop.audience.schemas import (
    AudienceSettingsIn,
    AudienceSettingsOut,
    Bucket,
    PreferencesIn,
    SegmentCount,
    SegmentIn,
    SegmentRules,
)
from popdrop.core import links
from popdrop.core.errors import PopdropError
from popdrop.events.models import Event
from popdrop.web.auth import check_csrf
from popdrop.web.context import AppContext
from popdrop.web.forms import Form, form_of
from popdrop.web.pagekit import Operator, PageRoute, is_htmx
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE
from popdrop.web.streaming import csv_download
from popdrop.web.templating import render, templates

router = APIRouter(include_in_schema=False, route_class=PageRoute)
public_router = APIRouter(include_in_schema=False, route_class=PageRoute)

BUCKETS: tuple[Bucket, ...] = ("hot", "warm", "cold", "never")
CHANNELS = ("email", "sms", "chat")
CONTACTS_SHOWN = 25
# Public token pages: the token in the URL is the key, so never cached, indexed or leaked.
PUBLIC_HEADERS = {**NO_STORE, "X-Robots-Tag": "noindex"}
TOPICS_OFFERED = 30


def _when_iso(value: str | None) -> str:
    """An ISO timestamp from the privacy export, shown like every other time."""
    if not value:
        return "—"
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return value


def mask(value: str | None) -> str:
    """A contact point shown on a public page: enough to recognise, not to harvest."""
    if not value:
        return ""
    if "@" in value:
        local, _, domain = value.partition("@")
        return f"{local[:1]}•••@{domain}"
    return f"{value[:3]}•••{value[-2:]}"


templates.env.filters["when_iso"] = _when_iso
templates.env.filters["mask"] = mask


# ---------------------------------------------------------------- overview


@dataclass
class Overview:
    total: int
    buckets: dict[str, int]
    consent: dict[str, dict[str, int]]  # channel → state → contacts


async def overview_counts(
    session: AsyncSession, principal: Principal, now: datetime
) -> tuple[Overview, AudienceSettingsOut]:
    """Contacts per recency bucket and per consent state, in one pass over the audience."""
    principal.require("audience:read")
    settings = await audience_settings.get_settings(session, principal.org_id)

    def tally(condition: Any) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    columns: list[Any] = [func.count()]
    columns += [
        tally(audience_settings.bucket_condition(b, now, settings.hot_days, settings.warm_days))
        for b in BUCKETS
    ]
    pairs = [(ch, state) for ch in CHANNELS for state in ConsentState]
    columns += [
        tally(getattr(Contact, audience_consent.CONSENT_COLUMN[ch]) == state) for ch, state in pairs
    ]
    row = (
        await session.execute(
            select(*columns)
            .select_from(Contact)
            .where(Contact.org_id == principal.org_id, Contact.erased_at.is_(None))
        )
    ).one()
    values = [int(v or 0) for v in row]
    consent: dict[str, dict[str, int]] = {ch: {} for ch in CHANNELS}
    for (ch, state), n in zip(pairs, values[1 + len(BUCKETS) :], strict=True):
        consent[ch][state] = n
    overview = Overview(
        total=values[0],
        buckets=dict(zip(BUCKETS, values[1 : 1 + len(BUCKETS)], strict=True)),
        consent=consent,
    )
    return overview, settings


def settings_form(settings: AudienceSettingsOut) -> Form:
    return Form(
        values={
            "hot_days": str(settings.hot_days),
            "warm_days": str(settings.warm_days),
            "help_text": settings.help_text,
            "retention_months": str(settings.retention_months or ""),
        }
    )


_NOTICES = {
    "settings": "Audience settings saved.",
    "saved": "Segment saved.",
    "deleted": "Segment deleted.",
}


async def _overview_page(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    *,
    settings_failed: Form | None = None,
    import_error: str | None = None,
    status: int = 200,
) -> Response:
    q = request.query_params.get("q", "").strip()[:100]
    tag = request.query_params.get("tag", "").strip()[:64]
    now = ctx.clock.now()
    async with ctx.db.reader() as session:
        overview, settings = await overview_counts(session, principal, now)
        found = await audience_contacts.list_contacts(
            session, principal, query=q or None, tag=tag or None, limit=CONTACTS_SHOWN
        )
        contacts = await audience_contacts.contacts_out(session, principal.org_id, found, now)
    context = {
        "principal": principal,
        "overview": overview,
        "settings": settings,
        "settings_form": settings_failed or settings_form(settings),
        "contacts": contacts,
        "shown_limit": CONTACTS_SHOWN,
        "q": q,
        "tag": tag,
        "import_error": import_error,
        "notice": _NOTICES.get(request.query_params.get("done", "")),
        "can_write": "audience:write" in principal.scopes,
    }
    return render(request, "audience/overview.html", context, status=status)


@router.get("/audience")
async def overview(request: Request, principal: Operator, ctx: Ctx) -> Response:
    principal.require("audience:read")
    return await _overview_page(request, ctx, principal)


@router.post("/audience/settings")
async def settings_save(request: Request, principal: Operator, ctx: Ctx) -> Response:
    data = await request.form()
    check_csrf(request, ctx, data)
    principal.require("audience:write")
    form = form_of(data)
    spec = form.build(
        AudienceSettingsIn,
        {
            "hot_days": form.integer("hot_days"),
            "warm_days": form.integer("warm_days"),
            "help_text": form.values.get("help_text", ""),
            "retention_months": form.integer("retention_months"),
        },
    )
    if spec is not None:
        try:
            async with ctx.db.transaction() as session:
                await audience_settings.update_settings(session, principal, spec)
        except PopdropError as error:
            if error.reason != "invalid_request":
                raise
            form.problems.append(error.message)
        else:
            return RedirectResponse("/audience?done=settings#settings", status_code=303)
    return await _overview_page(request, ctx, principal, settings_failed=form, status=422)


# ---------------------------------------------------------------- import


@router.post("/audience/import")
async def import_upload(request: Request, principal: Operator, ctx: Ctx) -> Response:
    data = await request.form()
    check_csrf(request, ctx, data)
    principal.require("audience:write")
    upload = data.get("file")
    if not isinstance(upload, UploadFile) or not upload.filename:
        return await _import_refused(request, ctx, principal, "file: choose a CSV file")
    raw = await upload.read()
    try:
        text = raw.decode("utf-8-sig")  # Excel writes a BOM
    except UnicodeDecodeError:
        return await _import_refused(
            request, ctx, principal, "file: not UTF-8 text; save the sheet as CSV UTF-8"
        )
    try:
        async with ctx.db.transaction() as session:
            job = await import_jobs.create_job(
                session, principal, filename=upload.filename, payload=text, now=ctx.clock.now()
            )
            job_id = job.id
    except PopdropError as error:
        if error.reason not in ("invalid_request", "payload_too_large"):
            raise
        return await _import_refused(request, ctx, principal, error.message)
    import_jobs.launch_job(ctx.db, ctx.signer, ctx.clock, job_id)
    return RedirectResponse(f"/audience/imports/{job_id}", status_code=303)


async def _import_refused(
    request: Request, ctx: AppContext, principal: Principal, message: str
) -> Response:
    return await _overview_page(request, ctx, principal, import_error=message, status=422)


@router.get("/audience/imports/{job_id}")
async def import_job(request: Request, job_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    """The job panel; it polls itself (htmx) until the job is done or failed."""
    principal.require("audience:read")
    async with ctx.db.reader() as session:
        job = import_jobs.job_out(await import_jobs.get_job(session, principal, job_id))
    context = {"principal": principal, "job": job, "notes": importer.NOTES}
    name = "audience/_job.html" if is_htmx(request) else "audience/import.html"
    return render(request, name, context)


# ---------------------------------------------------------------- exports


@router.get("/audience/export/contacts.csv")
async def export_contacts(principal: Operator, ctx: Ctx) -> Response:
    return await csv_download(
        ctx,
        lambda session: exports.export_contacts(session, principal, now=ctx.clock.now()),
        "contacts.csv",
    )


@router.get("/audience/export/sendable-email.csv")
async def export_sendable_email(principal: Operator, ctx: Ctx) -> Response:
    return await csv_download(
        ctx,
        lambda session: exports.export_contacts(
            session, principal, now=ctx.clock.now(), sendable="email"
        ),
        "sendable-email.csv",
    )


@router.get("/audience/export/sendable-sms.csv")
async def export_sendable_sms(principal: Operator, ctx: Ctx) -> Response:
    return await csv_download(
        ctx,
        lambda session: exports.export_contacts(
            session, principal, now=ctx.clock.now(), sendable="sms"
        ),
        "sendable-sms.csv",
    )


@router.get("/audience/export/consent.csv")
async def export_consent(principal: Operator, ctx: Ctx) -> Response:
    return await csv_download(
        ctx, lambda session: exports.export_consent(session, principal), "consent-ledger.csv"
    )


# ---------------------------------------------------------------- segments


TEXT_RULES = ("tags_any", "tags_all", "tags_none", "interests_any", "locales")


@dataclass
class RulesForm:
    """The segment editor as typed, what is wrong with it, and the rules it makes."""

    values: dict[str, str] = field(default_factory=dict)
    picked: dict[str, list[str]] = field(default_factory=dict)  # checkbox groups
    errors: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    rules: SegmentRules | None = None

    def checked(self, group: str, value: str) -> bool:
        return value in self.picked.get(group, [])


def _split(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def _rule_field(loc: tuple[int | str, ...]) -> str:
    """Where a SegmentRules error belongs on the form."""
    head = str(loc[0]) if loc else ""
    if head == "near":
        return "near_event" if len(loc) > 1 and loc[1] == "event_id" else "near_km"
    if head == "attended":
        return "attended_event"
    return head


def parse_rules(data: FormData) -> RulesForm:
    """The editor's fields to `SegmentRules`; what does not parse lands on its field."""
    form = RulesForm(
        values={k: str(v).strip() for k, v in data.items() if k != "csrf" and isinstance(v, str)},
        picked={name: [str(v) for v in data.getlist(name)] for name in ("channels", "recency")},
    )
    values = form.values
    raw: dict[str, Any] = {
        "channels": form.picked["channels"],
        "recency": form.picked["recency"],
        **{name: _split(values.get(name, "")) for name in TEXT_RULES},
    }
    near_event, near_km = values.get("near_event", ""), values.get("near_km", "")
    if near_event or near_km:
        km: float | None = None
        try:
            km = float(near_km.replace(",", "."))
        except ValueError:
            form.errors["near_km"] = "a distance in km, such as 5"
        if not near_event:
            form.errors["near_event"] = "pick the event whose venue to measure from"
        if km is not None and near_event:
            raw["near"] = {"event_id": near_event, "km": km}
    if values.get("attended") == "on":
        chosen = values.get("attended_event", "")
        raw["attended"] = {"event_ids": [chosen] if chosen else []}
    if not form.picked["channels"]:
        form.errors["channels"] = "pick at least one channel"
    try:
        rules = SegmentRules.model_validate(raw)
    except ValidationError as exc:
        for problem in exc.errors():
            name = _rule_field(tuple(problem["loc"]))
            message = str(problem["msg"]).removeprefix("Value error, ")
            if name:
                form.errors.setdefault(name, message)
            else:
                form.problems.append(message)
        return form
    form.rules = None if form.errors else rules
    return form


def rules_form(rules: SegmentRules, name: str = "") -> RulesForm:
    """The editor filled with saved rules."""
    values = {field: ", ".join(getattr(rules, field)) for field in TEXT_RULES}
    values["name"] = name
    if rules.near is not None:
        values["near_event"] = str(rules.near.event_id)
        values["near_km"] = f"{rules.near.km:g}"
    if rules.attended is not None:
        values["attended"] = "on"
        values["attended_event"] = ",".join(str(i) for i in rules.attended.event_ids[:1])
    picked: dict[str, list[str]] = {
        "channels": [str(c) for c in rules.channels],
        "recency": [str(b) for b in rules.recency],
    }
    return RulesForm(values=values, picked=picked, rules=rules)


def describe(rules: SegmentRules) -> list[str]:
    """The rules in words, for the segment list."""
    parts = [f"sendable by {' or '.join(rules.channels)}"]
    if rules.recency:
        parts.append(" / ".join(rules.recency))
    for label, values in (
        ("any tag of", rules.tags_any),
        ("all tags", rules.tags_all),
        ("none of the tags", rules.tags_none),
        ("interested in", rules.interests_any),
        ("locale", rules.locales),
    ):
        if values:
            parts.append(f"{label} {', '.join(values)}")
    if rules.near is not None:
        parts.append(f"within {rules.near.km:g} km of event {rules.near.event_id}")
    if rules.attended is not None:
        ids = rules.attended.event_ids
        parts.append(f"attended event {', '.join(map(str, ids))}" if ids else "attended an event")
    return parts


@dataclass
class EventChoice:
    id: int
    title: str
    has_venue: bool


async def _event_choices(session: AsyncSession, org_id: int) -> list[EventChoice]:
    rows = await session.execute(
        select(Event.id, Event.title, Event.latitude, Event.longitude)
        .where(Event.org_id == org_id)
        .order_by(Event.starts_at.desc())
        .limit(200)
    )
    return [
        EventChoice(eid, title, lat is not None and lon is not None)
        for eid, title, lat, lon in rows
    ]


async def _count(
    ctx: AppContext, principal: Principal, rules: SegmentRules
) -> tuple[SegmentCount | None, PopdropError | None]:
    try:
        async with ctx.db.reader() as session:
            counted = await audience_segments.count_segment(
                session, principal, rules, now=ctx.clock.now()
            )
    except PopdropError as error:
        if error.reason not in ("invalid_request", "not_found"):
            raise
        return None, error  # e.g. "near" an event without coordinates: shown in the preview
    return counted, None


async def _segments_page(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    *,
    form: RulesForm | None = None,
    status: int = 200,
) -> Response:
    principal.require("audience:read")
    async with ctx.db.reader() as session:
        segments = [
            audience_segments.segment_out(s)
            for s in await audience_segments.list_segments(session, principal)
        ]
        events = await _event_choices(session, principal.org_id)
        settings = await audience_settings.get_settings(session, principal.org_id)
    form = form or rules_form(SegmentRules())
    count, count_error = (None, None)
    if form.rules is not None:
        count, count_error = await _count(ctx, principal, form.rules)
    context = {
        "principal": principal,
        "segments": [(s, describe(s.rules)) for s in segments],
        "form": form,
        "events": events,
        "settings": settings,
        "count": count,
        "count_error": count_error,
        "action": "/audience/segments",
        "notice": _NOTICES.get(request.query_params.get("done", "")),
        "can_write": "audience:write" in principal.scopes,
    }
    return render(request, "audience/segments.html", context, status=status)


@router.get("/audience/segments")
async def segments(request: Request, principal: Operator, ctx: Ctx) -> Response:
    return await _segments_page(request, ctx, principal)


async def _save_segment(
    request: Request, ctx: AppContext, principal: Principal, segment_id: int | None
) -> Response:
    data = await request.form()
    check_csrf(request, ctx, data)
    principal.require("audience:write")
    form = parse_rules(data)
    name = form.values.get("name", "")
    if not name:
        form.errors["name"] = "give the segment a name"
    elif len(name) > 200:
        form.errors["name"] = "at most 200 characters"
    if form.rules is not None and not form.errors:
        try:
            async with ctx.db.transaction() as session:
                segment = await audience_segments.save_segment(
                    session,
                    principal,
                    SegmentIn(name=name, rules=form.rules),
                    now=ctx.clock.now(),
                    segment_id=segment_id,
                )
                saved_id = segment.id
        except PopdropError as error:
            if error.reason not in ("conflict", "invalid_request", "not_found") or (
                error.reason == "not_found" and "segment" in error.message
            ):
                raise
            form.problems.append(error.message)
        else:
            return RedirectResponse(f"/audience/segments/{saved_id}?done=saved", status_code=303)
    if segment_id is None:
        return await _segments_page(request, ctx, principal, form=form, status=422)
    return await _segment_page(request, ctx, principal, segment_id, form=form, status=422)


@router.post("/audience/segments")
async def segment_create(request: Request, principal: Operator, ctx: Ctx) -> Response:
    return await _save_segment(request, ctx, principal, None)


@router.post("/audience/segments/preview")
async def segment_preview(request: Request, principal: Operator, ctx: Ctx) -> Response:
    """The live count: the editor posts itself here on every change (htmx)."""
    data = await request.form()
    check_csrf(request, ctx, data)
    principal.require("audience:read")
    form = parse_rules(data)
    count, count_error = (None, None)
    if form.rules is not None:
        count, count_error = await _count(ctx, principal, form.rules)
    context = {"form": form, "count": count, "count_error": count_error}
    return render(request, "audience/_preview.html", context)


async def _segment_page(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    segment_id: int,
    *,
    form: RulesForm | None = None,
    status: int = 200,
) -> Response:
    principal.require("audience:read")
    async with ctx.db.reader() as session:
        segment = audience_segments.segment_out(
            await audience_segments.get_segment(session, principal, segment_id)
        )
        events = await _event_choices(session, principal.org_id)
        settings = await audience_settings.get_settings(session, principal.org_id)
    form = form or rules_form(segment.rules, segment.name)
    count, count_error = (None, None)
    if form.rules is not None:
        count, count_error = await _count(ctx, principal, form.rules)
    context = {
        "principal": principal,
        "segment": segment,
        "form": form,
        "events": events,
        "settings": settings,
        "count": count,
        "count_error": count_error,
        "action": f"/audience/segments/{segment_id}",
        "notice": _NOTICES.get(request.query_params.get("done", "")),
        "can_write": "audience:write" in principal.scopes,
    }
    return render(request, "audience/segment.html", context, status=status)


@router.get("/audience/segments/{segment_id}")
async def segment_detail(
    request: Request, segment_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    return await _segment_page(request, ctx, principal, segment_id)


@router.post("/audience/segments/{segment_id}")
async def segment_update(
    request: Request, segment_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    return await _save_segment(request, ctx, principal, segment_id)


@router.post("/audience/segments/{segment_id}/delete")
async def segment_delete(
    request: Request, segment_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    check_csrf(request, ctx, await request.form())
    async with ctx.db.transaction() as session:
        await audience_segments.delete_segment(session, principal, segment_id)
    return RedirectResponse("/audience/segments?done=deleted", status_code=303)


@router.get("/audience/segments/{segment_id}/count")
async def segment_count(
    request: Request, segment_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    """The list's counts load one by one after the page (a segment is evaluated when used)."""
    async with ctx.db.reader() as session:
        segment = audience_segments.segment_out(
            await audience_segments.get_segment(session, principal, segment_id)
        )
    count, count_error = await _count(ctx, principal, segment.rules)
    return render(request, "audience/_count.html", {"count": count, "count_error": count_error})


@router.get("/audience/segments/{segment_id}/export.csv")
async def segment_export(segment_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    async def open_export(session: AsyncSession) -> AsyncIterator[str]:
        segment = audience_segments.segment_out(
            await audience_segments.get_segment(session, principal, segment_id)
        )
        return await exports.export_contacts(
            session, principal, now=ctx.clock.now(), rules=segment.rules
        )

    return await csv_download(ctx, open_export, f"segment-{segment_id}.csv")


# ---------------------------------------------------------------- public pages


_LINK_TROUBLE = {
    "link_invalid": (
        "This link doesn't look right",
        "It may have been cut short when it was copied, or it is no longer in use. Open the "
        "original email and use its link again.",
    ),
    "link_expired": (
        "This link has expired",
        "Confirmation links work for 7 days. Sign up again to get a fresh one.",
    ),
}


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def _link_trouble(request: Request, error: PopdropError) -> Response:
    title, hint = _LINK_TROUBLE.get(error.reason, ("This link can't be used", error.message))
    if not _wants_html(request) and request.method == "POST":
        return PlainTextResponse(
            f"{title}. reason: {error.reason}", status_code=error.status, headers=PUBLIC_HEADERS
        )
    context = {"error": error, "title": title, "hint": hint}
    response = render(request, "audience/link_trouble.html", context, status=error.status)
    response.headers.update(PUBLIC_HEADERS)
    return response


def _public(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    response = render(request, name, context, status=status)
    response.headers.update(PUBLIC_HEADERS)
    return response


async def _org_name(session: AsyncSession, org_id: int) -> str:
    name = await session.scalar(select(Organization.name).where(Organization.id == org_id))
    return str(name or "")


async def _topics(session: AsyncSession, contact: Contact) -> list[str]:
    """Topics on offer: the organization's most common interests plus the person's own."""
    rows = await session.scalars(
        select(ContactLabel.value)
        .where(ContactLabel.org_id == contact.org_id, ContactLabel.kind == "interest")
        .group_by(ContactLabel.value)
        .order_by(func.count().desc(), ContactLabel.value)
        .limit(TOPICS_OFFERED)
    )
    return sorted(set(rows))


async def _preferences_page(
    request: Request,
    ctx: AppContext,
    token: str,
    *,
    problems: list[str] | None = None,
    status: int = 200,
) -> Response:
    try:
        async with ctx.db.reader() as session:
            contact = await unsubscribe.contact_from_token(session, ctx.signer, token)
            view = await audience_contacts.contact_view(session, contact, ctx.clock.now())
            topics = sorted({*await _topics(session, contact), *view.interests})
            org = await _org_name(session, contact.org_id)
    except PopdropError as error:
        return _link_trouble(request, error)
    context = {
        "contact": view,
        "token": token,
        "org": org,
        "topics": topics,
        "problems": problems or [],
        "notice": request.query_params.get("done", ""),
    }
    return _public(request, "audience/preferences.html", context, status=status)


@public_router.get("/u/{token}")
async def preferences(request: Request, token: str, ctx: Ctx) -> Response:
    return await _preferences_page(request, ctx, token)


@public_router.post("/u/{token}")
async def one_click_unsubscribe(request: Request, token: str, ctx: Ctx) -> Response:
    """RFC 8058: `List-Unsubscribe=One-Click` or no body at all; the body is never read, so
    any content type works, and there is no CSRF check (the signed token is the key)."""
    try:
        async with ctx.db.transaction() as session:
            contact = await unsubscribe.one_click_unsubscribe(
                session, ctx.signer, token, now=ctx.clock.now()
            )
            org = await _org_name(session, contact.org_id)
    except PopdropError as error:
        return _link_trouble(request, error)
    if not _wants_html(request):
        return PlainTextResponse(
            "You are unsubscribed from email. No more emails will be sent to you.",
            headers=PUBLIC_HEADERS,
        )
    context = {"org": org, "token": token, "what": "unsubscribed"}
    return _public(request, "audience/public_done.html", context)


@public_router.post("/p/{token}")
async def preferences_save(request: Request, token: str, ctx: Ctx) -> Response:
    data = await request.form()
    try:
        check_csrf(request, ctx, data)
    except PopdropError as error:
        return await _preferences_page(request, ctx, token, problems=[error.message], status=403)
    raw = {
        "email": data.get("email") == "on",
        "sms": data.get("sms") == "on",
        "topics": [str(t) for t in data.getlist("topics")],
        "frequency": str(data.get("frequency") or "all"),
    }
    try:
        prefs = PreferencesIn.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return await _preferences_page(request, ctx, token, problems=problems, status=422)
    try:
        async with ctx.db.transaction() as session:
            await unsubscribe.save_preferences(
                session, ctx.signer, token, prefs, now=ctx.clock.now()
            )
    except PopdropError as error:
        if error.reason in ("link_invalid", "link_expired"):
            return _link_trouble(request, error)
        if error.status >= 500:
            raise
        return await _preferences_page(
            request, ctx, token, problems=[error.message], status=error.status
        )
    return RedirectResponse(f"/u/{token}?done=saved", status_code=303, headers=PUBLIC_HEADERS)


@public_router.get("/c/{token}")
async def confirm(request: Request, token: str, ctx: Ctx) -> Response:
    """The double opt-in link: pending → granted, then a thank-you page."""
    try:
        async with ctx.db.transaction() as session:
            contact = await audience_consent.confirm_double_opt_in(
                session, ctx.signer, token, now=ctx.clock.now()
            )
            org = await _org_name(session, contact.org_id)
            prefs = links.preferences_token(ctx.signer, contact.org_id, contact.id)
    except PopdropError as error:
        return _link_trouble(request, error)
    context = {"org": org, "token": prefs, "what": "confirmed"}
    return _public(request, "audience/public_done.html", context)
