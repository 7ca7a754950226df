"""Host pages for partners' tills: `/partners/sales` lists the POS connections (with the
URL each till posts to) and the POS sales (time, partner, total, codes seen, status,
refunds), and lets a host connect a till for an event's partner.

Rules these pages keep (the operator page kit's, `web.pagekit`):
- every page needs a session; reading needs `pos:read`, connecting `pos:write` (checked
  by `partners.service`); a partner login sees only its own connections and sales (the
  service filters with `partners_of`) and no form;
- the POST carries the CSRF field and calls `check_csrf` first; a form that does not
  validate, or names another organization's partner, shows the page again with the
  reason (4xx) and writes nothing;
- a generated secret (Standard Webhooks) is shown once, on the answer to the creation;
  the page never shows a stored secret, only how many verify deliveries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import select

from popdrop.accounts.service import Principal
from popdrop.core.errors import PopdropError
from popdrop.events.models import Event, Partner
from popdrop.partners import service
from popdrop.partners.lifecycle import PosProvider
from popdrop.partners.models import PosConnection
from popdrop.partners.schemas import ConnectionCreate
from popdrop.web.auth import check_csrf
from popdrop.web.pagekit import Operator, PageRoute
from popdrop.web.params import Ctx
from popdrop.web.security import NO_STORE
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False, route_class=PageRoute)

SALES_SHOWN = 200
FIELDS = ("partner_id", "provider", "account_id", "location_id", "notification_url", "secret")


@dataclass
class Form:
    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Created:
    connection: PosConnection
    delivery_url: str
    secret: str | None


def _connection_spec(values: dict[str, str]) -> ConnectionCreate:
    data: dict[str, Any] = {k: v.strip() for k, v in values.items() if v.strip()}
    if "partner_id" not in data:
        raise _FieldError("partner_id", "choose the partner whose till this is")
    return ConnectionCreate.model_validate(data)


class _FieldError(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


async def _page(
    request: Request,
    ctx: Any,
    principal: Principal,
    *,
    form: Form | None = None,
    problem: PopdropError | None = None,
    created: Created | None = None,
    status: int = 200,
) -> Response:
    base = ctx.settings.base_url
    async with ctx.db.reader() as session:
        connections = await service.list_connections(session, principal)
        sales = await service.list_sales(session, principal, limit=SALES_SHOWN)
        partners = {
            p.id: p
            for p in await session.scalars(
                select(Partner).where(Partner.org_id == principal.org_id).order_by(Partner.id)
            )
        }
        events = {
            e.id: e
            for e in await session.scalars(select(Event).where(Event.org_id == principal.org_id))
        }
    if principal.role == "partner":  # name only its own partner rows
        own = {c.partner_id for c in connections} | {s.partner_id for s in sales}
        partners = {i: p for i, p in partners.items() if i in own}
    refunded = sum(s.refunded_minor for s in sales)
    context = {
        "principal": principal,
        "connections": connections,
        "delivery_urls": {c.id: service.delivery_url(base, c) for c in connections},
        "secret_counts": {c.id: len(service.open_secrets(c)) for c in connections},
        "sales": sales,
        "partners": partners,
        "events": events,
        "partner_options": [
            (p.id, f"{p.name} · {events[p.event_id].title}" if p.event_id in events else p.name)
            for p in partners.values()
        ],
        "providers": [(p.value, p.value) for p in PosProvider],
        "form": form or Form({"provider": PosProvider.STANDARD.value}),
        "problem": problem,
        "created": created,
        "totals": {
            "sales": len(sales),
            "currency": sales[0].currency if sales else "EUR",
            "total_minor": sum(s.total_minor for s in sales),
            "refunded_minor": refunded,
        },
        "can_write": "pos:write" in principal.scopes,
    }
    return render(request, "partners/sales.html", context, status=status)


@router.get("/partners/sales")
async def sales_page(request: Request, principal: Operator, ctx: Ctx) -> Response:
    return await _page(request, ctx, principal)


@router.post("/partners/sales/connections")
async def create_connection(request: Request, principal: Operator, ctx: Ctx) -> Response:
    data = await request.form()
    check_csrf(request, ctx, data)
    principal.require("pos:write")
    values = {name: str(data.get(name, ""))[:500] for name in FIELDS}
    form = Form(values)
    try:
        spec = _connection_spec(values)
    except _FieldError as error:
        form.errors[error.name] = error.message
    except ValidationError as error:
        for item in error.errors(include_url=False):
            name = str(item["loc"][0]) if item["loc"] else "partner_id"
            form.errors.setdefault(name, str(item["msg"]).removeprefix("Value error, "))
    if form.errors:
        form.values["secret"] = ""  # a typed secret is never echoed back
        return await _page(request, ctx, principal, form=form, status=422)
    base = ctx.settings.base_url
    try:
        async with ctx.db.transaction() as session:
            made = await service.create_connection(
                session,
                principal,
                partner_id=spec.partner_id,
                provider=spec.provider,
                account_id=spec.account_id,
                location_id=spec.location_id,
                notification_url=spec.notification_url,
                secret=spec.secret,
                base_url=base,
                now=ctx.clock.now(),
            )
            created = Created(
                made.connection, service.delivery_url(base, made.connection), made.secret
            )
    except PopdropError as error:
        if error.reason in ("forbidden", "csrf_failed"):
            raise
        form.values["secret"] = ""
        return await _page(request, ctx, principal, form=form, problem=error, status=error.status)
    response = await _page(request, ctx, principal, created=created, status=201)
    response.headers.update(NO_STORE)  # the secret is on this answer only
    return response
