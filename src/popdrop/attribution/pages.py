"""Host pages for short links and promo codes: `/links` (the organization's links and
promo codes, a form to create each), `/links/{id}` (one link: its short URL, QR image,
limits and analytics drawn as CSS bars) and its QR image `/links/{id}/qr.svg|png`.

Rules these pages keep (the operator page kit's, `web.pagekit`):
- every page needs a session; reading is `attribution.service`'s rule (hosts with
  `drops:read`, a partner login only its own links and codes), creating needs
  `drops:write` (checked by the service);
- every POST carries the CSRF field and calls `check_csrf` first; a form that does not
  validate, or names another organization's event or partner, shows `/links` again with
  the reason (4xx) and writes nothing: each create runs in one transaction;
- a promo code's printed code is shown once, on the answer to its creation; the list shows
  only its first characters (the till and the poster carry the whole code);
- form times are UTC (`datetime-local` fields carry no zone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.attribution import service
from popdrop.attribution.models import Channel, PromoCode, ShortLink, TargetKind
from popdrop.attribution.schemas import (
    Bucket,
    LinkAnalytics,
    PromoCodeCreate,
    ShortLinkCreate,
)
from popdrop.core import qr
from popdrop.core.errors import PopdropError
from popdrop.events.models import Event, Partner
from popdrop.web.auth import check_csrf
from popdrop.web.pagekit import Operator, PageRoute
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False, route_class=PageRoute)

LIST_LIMIT = 200
LINK_FIELDS = (
    "target_kind", "event_id", "url", "partner_id", "channel", "utm_source", "utm_medium",
    "utm_campaign", "utm_content", "valid_from", "valid_until", "max_clicks", "fallback_url",
)  # fmt: skip
PROMO_FIELDS = ("label", "event_id", "partner_id", "channel", "discount_kind", "discount_value")
# Which form field a schema location belongs to (the link's target and tags are nested).
_FIELD_OF = {"target.url": "url", "target.id": "event_id", "target": "target_kind"}


@dataclass
class Form:
    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class LinksForms:
    link: Form = field(default_factory=Form)
    promo: Form = field(default_factory=Form)
    problem: PopdropError | None = None
    new_code: PromoCode | None = None


# ---------------------------------------------------------------- form parsing


def _text(values: dict[str, str], name: str) -> str | None:
    value = values.get(name, "").strip()
    return value or None


def _utc_time(values: dict[str, str], name: str) -> datetime | None:
    """A `datetime-local` value read as UTC; a value with its own offset keeps it."""
    value = _text(values, name)
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _FieldError(name, "a date and time, e.g. 2026-12-24T18:00") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _number(values: dict[str, str], name: str) -> int | str | None:
    value = _text(values, name)
    if value is None:
        return None
    return int(value) if value.isdigit() and len(value) < 19 else value  # schema says why not


def _discount_value(values: dict[str, str]) -> int | str | None:
    """Percent as typed; a fixed amount typed in the currency ("5" or "5.50") → cents."""
    raw = _text(values, "discount_value")
    if raw is None or values.get("discount_kind") != "fixed":
        return _number(values, "discount_value")
    whole, _, cents = raw.replace(",", ".").partition(".")
    if (
        not (whole.isdigit() and len(whole) < 12 and (cents.isdigit() or not cents))
        or len(cents) > 2
    ):
        raise _FieldError("discount_value", "an amount such as 5 or 5.50")
    return int(whole) * 100 + int(cents.ljust(2, "0") or 0)


class _FieldError(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


def _errors_of(error: ValidationError, fields: tuple[str, ...]) -> dict[str, str]:
    """Each error under the form field it belongs to; one about the whole form (e.g. the
    validity window) under `form`, shown above the button."""
    found: dict[str, str] = {}
    for item in error.errors(include_url=False):
        loc = [str(p) for p in item["loc"] if not isinstance(p, int)]
        dotted = ".".join(loc)
        name = _FIELD_OF.get(dotted) or (loc[-1] if loc else "form")
        if name not in fields:
            name = "form"
        message = str(item["msg"]).removeprefix("Value error, ")
        found.setdefault(name, message)
    return found


def link_spec(values: dict[str, str]) -> ShortLinkCreate:
    """The link the form asks for (`_FieldError` or `ValidationError` when it does not
    validate)."""
    kind = values.get("target_kind", "event")
    if kind not in (TargetKind.EVENT, TargetKind.URL):
        raise _FieldError("target_kind", "an event page or a URL")
    target: dict[str, Any] = {"kind": kind}
    if kind == TargetKind.EVENT:
        target["id"] = _number(values, "event_id")
        if target["id"] is None:
            raise _FieldError("event_id", "choose the event whose page the link opens")
    else:
        target["url"] = _text(values, "url")
        if target["url"] is None:
            raise _FieldError("url", "the address the link opens (https://…)")
    tags: dict[str, Any] = {
        "partner_id": _number(values, "partner_id"),
        "channel": _text(values, "channel"),
        **{name: _text(values, name) for name in LINK_FIELDS if name.startswith("utm_")},
    }
    if kind == TargetKind.URL:
        tags["event_id"] = _number(values, "event_id")
    return ShortLinkCreate.model_validate(
        {
            "target": target,
            "tags": {k: v for k, v in tags.items() if v is not None},
            "valid_from": _utc_time(values, "valid_from"),
            "valid_until": _utc_time(values, "valid_until"),
            "max_clicks": _number(values, "max_clicks"),
            "fallback_url": _text(values, "fallback_url"),
        }
    )


def promo_spec(values: dict[str, str]) -> PromoCodeCreate:
    data = {
        "label": _text(values, "label"),
        "event_id": _number(values, "event_id"),
        "partner_id": _number(values, "partner_id"),
        "channel": _text(values, "channel"),
        "discount_kind": _text(values, "discount_kind"),
        "discount_value": _discount_value(values),
    }
    if data["label"] is None:
        raise _FieldError("label", "a name for the code, e.g. Café counter")
    return PromoCodeCreate.model_validate({k: v for k, v in data.items() if v is not None})


async def _form_values(request: Request, ctx: Any, names: tuple[str, ...]) -> dict[str, str]:
    data = await request.form()
    check_csrf(request, ctx, data)
    return {name: str(data.get(name, ""))[:2000] for name in names}


# ---------------------------------------------------------------- reads


async def _choices(
    session: AsyncSession, principal: Principal
) -> tuple[dict[int, Event], dict[int, Partner]]:
    """The organization's events and partners, for the forms and for naming tags."""
    events = {
        e.id: e
        for e in await session.scalars(
            select(Event).where(Event.org_id == principal.org_id).order_by(Event.starts_at)
        )
    }
    partners = {
        p.id: p
        for p in await session.scalars(
            select(Partner).where(Partner.org_id == principal.org_id).order_by(Partner.id)
        )
    }
    return events, partners


def _target_label(link: ShortLink, events: dict[int, Event]) -> str:
    if link.target_kind == TargetKind.URL:
        return link.target_url or ""
    if link.target_kind == TargetKind.EVENT and link.target_id in events:
        return f"event page: {events[link.target_id].title}"
    return f"{link.target_kind} #{link.target_id}"


async def _links_page(
    request: Request,
    ctx: Any,
    principal: Principal,
    forms: LinksForms | None = None,
    *,
    status: int = 200,
) -> Response:
    forms = forms or LinksForms()
    async with ctx.db.reader() as session:
        rows = await service.list_links(session, principal, limit=LIST_LIMIT)
        promos = await service.list_promo_codes(session, principal, limit=LIST_LIMIT)
        events, partners = await _choices(session, principal)
    context = {
        "principal": principal,
        "links": rows,
        "promos": promos,
        "events": events,
        "partners": partners,
        "targets": {link.id: _target_label(link, events) for link in rows},
        "event_options": [(e.id, e.title) for e in events.values()],
        "partner_options": [
            (p.id, f"{p.name} · {events[p.event_id].title}" if p.event_id in events else p.name)
            for p in partners.values()
        ],
        "channel_options": [(c.value, c.value) for c in Channel],
        "forms": forms,
        "can_write": "drops:write" in principal.scopes,
    }
    return render(request, "attribution/links.html", context, status=status)


@router.get("/links")
async def links_page(request: Request, principal: Operator, ctx: Ctx) -> Response:
    return await _links_page(request, ctx, principal)


@router.post("/links")
async def create_link(request: Request, principal: Operator, ctx: Ctx) -> Response:
    values = await _form_values(request, ctx, LINK_FIELDS)
    form = Form(values)
    try:
        spec = link_spec(values)
    except _FieldError as error:
        form.errors[error.name] = error.message
    except ValidationError as error:
        form.errors.update(_errors_of(error, LINK_FIELDS))
    if form.errors:
        return await _links_page(request, ctx, principal, LinksForms(link=form), status=422)
    try:
        async with ctx.db.transaction() as session:
            link = await service.create_short_link(session, principal, spec, now=ctx.clock.now())
            link_id = link.id
    except PopdropError as error:
        if error.reason in ("forbidden", "csrf_failed"):
            raise
        forms = LinksForms(link=form, problem=error)
        return await _links_page(request, ctx, principal, forms, status=error.status)
    return RedirectResponse(f"/links/{link_id}?created=1", status_code=303)


@router.post("/links/promo-codes")
async def create_promo_code(request: Request, principal: Operator, ctx: Ctx) -> Response:
    values = await _form_values(request, ctx, PROMO_FIELDS)
    form = Form(values)
    try:
        spec = promo_spec(values)
    except _FieldError as error:
        form.errors[error.name] = error.message
    except ValidationError as error:
        form.errors.update(_errors_of(error, PROMO_FIELDS))
    if form.errors:
        return await _links_page(request, ctx, principal, LinksForms(promo=form), status=422)
    try:
        async with ctx.db.transaction() as session:
            promo = await service.create_promo_code(
                session, principal, spec, now=ctx.clock.now(), signer=ctx.signer
            )
    except PopdropError as error:
        if error.reason in ("forbidden", "csrf_failed"):
            raise
        forms = LinksForms(promo=form, problem=error)
        return await _links_page(request, ctx, principal, forms, status=error.status)
    # The code is shown on this answer only (a reload does not post again: no-store).
    response = await _links_page(request, ctx, principal, LinksForms(new_code=promo), status=201)
    response.headers.update(NO_STORE)
    return response


# ---------------------------------------------------------------- one link


@dataclass(frozen=True)
class Bar:
    key: str
    clicks: int
    pct: int


def bars(buckets: list[Bucket]) -> list[Bar]:
    """Buckets as bars scaled to the largest one (a bar of a count > 0 is never empty)."""
    top = max((b.clicks for b in buckets), default=0)
    return [
        Bar(b.key or "unknown", b.clicks, max(2, round(100 * b.clicks / top)) if top else 0)
        for b in buckets
    ]


def _state(link: ShortLink, now: datetime) -> str:
    if link.valid_from is not None and now < link.valid_from:
        return "not yet valid"
    if link.valid_until is not None and now >= link.valid_until:
        return "expired"
    if link.max_clicks is not None and link.clicks >= link.max_clicks:
        return "used up"
    return "live"


@router.get("/links/{link_id}")
async def link_page(request: Request, link_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    async with ctx.db.reader() as session:
        link = await service.get_link(session, principal, link_id)
        analytics: LinkAnalytics = await service.link_analytics(session, link)
        events, partners = await _choices(session, principal)
    context = {
        "principal": principal,
        "link": link,
        "short_url": service.short_url(ctx.settings.short_links_base, link.slug),
        "target": _target_label(link, events),
        "event": events.get(link.event_id) if link.event_id else None,
        "partner": partners.get(link.partner_id) if link.partner_id else None,
        "analytics": analytics,
        "by_day": bars(analytics.by_day),
        "by_channel": bars(analytics.by_channel),
        "by_device": bars(analytics.by_device_class),
        "by_referrer": bars(analytics.by_referrer_host),
        "state": _state(link, ctx.clock.now()),
        "created": request.query_params.get("created") == "1",
    }
    return render(request, "attribution/link.html", context)


@router.get("/links/{link_id}/qr.{fmt}")
async def link_qr(link_id: ItemId, fmt: str, principal: Operator, ctx: Ctx) -> Response:
    if fmt not in ("svg", "png"):
        raise PopdropError("not_found", "page not found")
    async with ctx.db.reader() as session:
        link = await service.get_link(session, principal, link_id)
    url = service.short_url(ctx.settings.short_links_base, link.slug)
    if fmt == "png":
        return Response(qr.png_bytes(url), media_type="image/png", headers=NO_STORE)
    return Response(qr.svg_bytes(url), media_type="image/svg+xml", headers=NO_STORE)
