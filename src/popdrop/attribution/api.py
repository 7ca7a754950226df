"""REST API and public routes of the attribution domain (thin: parse, call, shape).

Public (no token):
  GET|HEAD /s/{slug}                      the short-link redirect (302); never waits for
                                          the click write (`clicks.ClickRecorder`)
Operator (token; `drops:write` to create, `drops:read` to read; a partner login reads
only its own links and codes, `orders:read` reads a sale's touches):
  POST /api/v1/links, GET /api/v1/links, GET /api/v1/links/{id} (with analytics),
  GET  /api/v1/links/{id}/qr.png | qr.svg
  POST /api/v1/promo-codes, GET /api/v1/promo-codes
  GET  /api/v1/attribution/sales/{sale_kind}/{sale_id}

Unknown slugs count as guesses (the guessing guard, per client address only, so a flood
from many addresses cannot lock everyone out): past the limit, 429 `rate_limited`. Only
a slug missing from the process cache is looked up and guarded; a cached one costs no
database read and no counter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.attribution import agents, redirects, service
from popdrop.attribution.clicks import recorder_for
from popdrop.attribution.models import BEARER_KINDS
from popdrop.attribution.schemas import (
    PromoCodeCreate,
    PromoCodeOut,
    SaleTouchOut,
    ShortLinkCreate,
    ShortLinkDetail,
    ShortLinkOut,
)
from popdrop.core import qr
from popdrop.core.errors import not_found
from popdrop.core.ratelimit import address_key
from popdrop.core.schemas import error_responses
from popdrop.web.auth import ApiPrincipal
from popdrop.web.context import AppContext, client_address
from popdrop.web.idempotent import respond_once
from popdrop.web.params import Before, Ctx, IdempotencyKey, ItemId, Limit
from popdrop.web.security import NO_STORE

router = APIRouter(prefix="/api/v1", tags=["attribution"])
public_router = APIRouter(include_in_schema=False)
WRITE_ERRORS = error_responses(401, 403, 404, 409, 422)
READ_ERRORS = error_responses(401, 403, 404, 422)
# The organization unknown slugs are counted under (a guess names none).
NO_ORG = 0
OptionalId = Annotated[int | None, Query(ge=1, le=2**62)]
_REDIRECT_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


# ---------------------------------------------------------------- redirect


async def _guess_checked(ctx: AppContext, request: Request, slug: str) -> redirects.LinkView:
    address = client_address(request)
    who = f"short-link:{address_key(address)}"
    await ctx.guard.check(NO_ORG, address, principal=who)
    view = None
    if redirects.SLUG_RE.match(slug):
        async with ctx.db.reader() as session:
            view = await redirects.load_view(
                session, slug, ctx.settings.base_url, recorder_for(ctx.db), ctx.db.url
            )
    if view is None:
        await ctx.guard.failed(NO_ORG, address, principal=who)
        raise not_found("short link")
    return view


@public_router.api_route("/s/{slug}", methods=["GET", "HEAD"])
async def redirect(slug: str, request: Request) -> Response:
    """Send the browser to the link's target (UTM and `pd_click` added) and record the
    click in memory; bots are sent on but not counted."""
    # The context straight from the app, not through a dependency: a sync dependency
    # costs a thread hop per request, a noticeable share of this hot path.
    ctx: AppContext = request.app.state.ctx
    view = redirects.cached_view(slug, ctx.db.url) or await _guess_checked(ctx, request, slug)
    recorder = recorder_for(ctx.db)
    now = ctx.clock.now()
    decision = redirects.decide(view, recorder, now)
    if decision.refusal is not None:
        raise decision.refusal
    location = decision.location
    if decision.counted:
        if view.kind in BEARER_KINDS:
            async with ctx.db.reader() as session:
                location = await redirects.bearer_target(
                    session, ctx.signer, view, ctx.settings.base_url, now
                )
        headers = request.headers
        user_agent = headers.get("user-agent", "")
        if agents.is_bot(request.method, user_agent, headers):
            recorder.bot_hit(view.id)
        else:
            click = redirects.click_of(
                view,
                at=now,
                device_class=agents.device_class(user_agent),
                referer=headers.get("referer"),
            )
            recorder.record(click)
            assert location is not None
            location = redirects.add_click(location, click.click_id)
    assert location is not None
    return Response(status_code=302, headers={"Location": location, **_REDIRECT_HEADERS})


# ---------------------------------------------------------------- short links


def _base(ctx: AppContext) -> str:
    return ctx.settings.short_links_base


@router.post(
    "/links",
    status_code=201,
    response_model=ShortLinkOut,
    responses=WRITE_ERRORS,
    summary="Create a short link (target, UTM, tags, validity, max clicks, fallback)",
)
async def create_link(
    body: ShortLinkCreate,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        link = await service.create_short_link(session, principal, body, now=ctx.clock.now())
        return 201, service.link_out(link, _base(ctx)).model_dump(mode="json")

    return await respond_once(
        ctx, request, principal, idempotency_key, body, operation, scope=service.WRITE_SCOPE
    )


@router.get(
    "/links",
    response_model=list[ShortLinkOut],
    responses=READ_ERRORS,
    summary="Short links, newest first (a partner sees its own)",
)
async def list_links(
    principal: ApiPrincipal,
    ctx: Ctx,
    event_id: OptionalId = None,
    drop_id: OptionalId = None,
    limit: Limit = 100,
    before: Before = None,
) -> list[ShortLinkOut]:
    async with ctx.db.reader() as session:
        rows = await service.list_links(
            session,
            principal,
            event_id=event_id,
            drop_id=drop_id,
            limit=limit,
            before_id=before,
        )
        return [service.link_out(link, _base(ctx)) for link in rows]


@router.get(
    "/links/{link_id}",
    response_model=ShortLinkDetail,
    responses=READ_ERRORS,
    summary="A short link with its analytics (day, hour, channel, device, referrer host)",
)
async def get_link(link_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> ShortLinkDetail:
    async with ctx.db.reader() as session:
        link = await service.get_link(session, principal, link_id)
        analytics = await service.link_analytics(session, link)
        out = service.link_out(link, _base(ctx))
    return ShortLinkDetail(**out.model_dump(), analytics=analytics)


@router.get(
    "/links/{link_id}/qr.{fmt}",
    responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}, **READ_ERRORS},
    summary="The QR code of a short link (PNG or SVG)",
)
async def link_qr(
    link_id: ItemId, fmt: Literal["png", "svg"], principal: ApiPrincipal, ctx: Ctx
) -> Response:
    async with ctx.db.reader() as session:
        link = await service.get_link(session, principal, link_id)
    url = service.short_url(_base(ctx), link.slug)
    if fmt == "png":
        return Response(qr.png_bytes(url), media_type="image/png", headers=NO_STORE)
    return Response(qr.svg_bytes(url), media_type="image/svg+xml", headers=NO_STORE)


# ---------------------------------------------------------------- promo codes


@router.post(
    "/promo-codes",
    status_code=201,
    response_model=PromoCodeOut,
    responses=WRITE_ERRORS,
    summary="Issue an attributable multi-use promo code from the vault (or tag a batch)",
)
async def create_promo_code(
    body: PromoCodeCreate,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        promo = await service.create_promo_code(
            session, principal, body, now=ctx.clock.now(), signer=ctx.signer
        )
        return 201, service.promo_out(promo).model_dump(mode="json")

    return await respond_once(
        ctx, request, principal, idempotency_key, body, operation, scope=service.WRITE_SCOPE
    )


@router.get(
    "/promo-codes",
    response_model=list[PromoCodeOut],
    responses=READ_ERRORS,
    summary="Promo codes, newest first (a partner sees its own)",
)
async def list_promo_codes(
    principal: ApiPrincipal,
    ctx: Ctx,
    event_id: OptionalId = None,
    limit: Limit = 100,
    before: Before = None,
) -> list[PromoCodeOut]:
    async with ctx.db.reader() as session:
        rows = await service.list_promo_codes(
            session, principal, event_id=event_id, limit=limit, before_id=before
        )
        return [service.promo_out(p) for p in rows]


# ---------------------------------------------------------------- attribution


@router.get(
    "/attribution/sales/{sale_kind}/{sale_id}",
    response_model=list[SaleTouchOut],
    responses=READ_ERRORS,
    summary="The first and last touch of a sale (what brought it)",
)
async def sale_touches(
    sale_kind: Literal["order", "pos_sale"], sale_id: ItemId, principal: ApiPrincipal, ctx: Ctx
) -> list[SaleTouchOut]:
    async with ctx.db.reader() as session:
        found = await service.sale_touches(session, principal, sale_kind, sale_id)
        return [service.touch_out(t) for t in found]
