"""Drops REST API, provider webhooks and the click redirect (thin).

Scopes `drops:read` / `drops:write`. Provider webhooks (delivery feedback, inbound SMS,
SMS status callbacks) carry no bearer token: their URL holds a signed token naming the
organization (`GET /api/v1/webhook-urls`), and each must also prove its origin (Twilio's
`X-Twilio-Signature`; the SNS signature or the shared secret for feedback) or get 403.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response

from popdrop.attribution import redirects
from popdrop.attribution.clicks import recorder_for
from popdrop.audience import contact_points
from popdrop.audience import settings as audience_settings
from popdrop.core import links
from popdrop.core.db import after_commit
from popdrop.core.errors import not_found
from popdrop.core.schemas import error_responses
from popdrop.drops import content, outcomes, service, shortlinks
from popdrop.drops.lifecycle import DropStatus
from popdrop.drops.schemas import DropCreate, DropOut, SeedOverride, WarRoom
from popdrop.outbound import feedback, twilio, webhooks
from popdrop.outbound.factory import make_transports
from popdrop.web.auth import ApiPrincipal
from popdrop.web.context import AppContext
from popdrop.web.params import Ctx, ItemId

router = APIRouter(prefix="/api/v1", tags=["drops"])
public_router = APIRouter(include_in_schema=False)
WRITE_ERRORS = error_responses(401, 403, 404, 409, 422)
# A drop link's target holds the UTM and the click id: no cache, no referrer onwards.
_REDIRECT_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


async def _out(ctx: AppContext, drop_id: int, principal: Any) -> DropOut:
    async with ctx.db.reader() as session:
        return await service.drop_out(session, await service.get_drop(session, principal, drop_id))


@router.post("/drops", status_code=201, response_model=DropOut, responses=WRITE_ERRORS)
async def create_drop(body: DropCreate, principal: ApiPrincipal, ctx: Ctx) -> DropOut:
    async with ctx.db.transaction() as session:
        drop = await service.create_drop(
            session,
            ctx.signer,
            principal,
            body,
            now=ctx.clock.now(),
        )
        return await service.drop_out(session, drop)


@router.get("/drops", response_model=list[DropOut], responses=error_responses(401, 403))
async def list_drops(principal: ApiPrincipal, ctx: Ctx) -> list[DropOut]:
    async with ctx.db.reader() as session:
        return [
            await service.drop_out(session, d) for d in await service.list_drops(session, principal)
        ]


@router.get("/drops/{drop_id}", response_model=DropOut, responses=WRITE_ERRORS)
async def get_drop(drop_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> DropOut:
    return await _out(ctx, drop_id, principal)


@router.post(
    "/drops/{drop_id}/seed-test",
    response_model=DropOut,
    responses=WRITE_ERRORS,
    summary="Send to the seed list, then check every link and every seed voucher",
)
async def seed_test(
    drop_id: ItemId, request: Request, principal: ApiPrincipal, ctx: Ctx
) -> DropOut:
    email, sms = make_transports(ctx.settings, ctx.db, ctx.clock)
    base = links.root(ctx.settings.base_url)
    app_client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=request.app), base_url=base, timeout=10
    )

    async def check_url(url: str) -> tuple[bool, str]:
        # Our own pages are asked in-process; other hosts cannot be fetched from here, so
        # they only have to be well-formed http(s) URLs.
        if url.startswith(base + "/"):
            answer = await app_client.get(url[len(base) :], follow_redirects=False)
            return answer.status_code < 400, f"HTTP {answer.status_code}"
        parts = httpx.URL(url)
        ok = parts.scheme in ("http", "https") and bool(parts.host)
        return ok, "external: well-formed" if ok else "malformed URL"

    try:
        drop = await service.run_seed_test(
            ctx.db,
            ctx.signer,
            principal,
            drop_id,
            base_url=ctx.settings.base_url,
            transports=service.SeedTransports(email, sms),
            check_url=check_url,
            now=ctx.clock.now(),
        )
        async with ctx.db.reader() as session:
            return await service.drop_out(session, drop)
    finally:
        await app_client.aclose()
        await email.close()
        await sms.close()


@router.post("/drops/{drop_id}/seed-override", response_model=DropOut, responses=WRITE_ERRORS)
async def seed_override(
    drop_id: ItemId, body: SeedOverride, principal: ApiPrincipal, ctx: Ctx
) -> DropOut:
    async with ctx.db.transaction() as session:
        drop = await service.override_seed(
            session, principal, drop_id, reason=body.reason, now=ctx.clock.now()
        )
        return await service.drop_out(session, drop)


@router.post(
    "/drops/{drop_id}/start",
    response_model=DropOut,
    responses=WRITE_ERRORS,
    summary="Freeze the recipients and send (blocked until the seed test passed)",
)
async def start(drop_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> DropOut:
    async with ctx.db.transaction() as session:
        drop = await service.start_drop(session, principal, drop_id, now=ctx.clock.now())
        out = await service.drop_out(session, drop)
        if ctx.worker is not None and out.status == DropStatus.SENDING:
            after_commit(session, partial(ctx.worker.send_drop.kiq, drop_id))
    return out


@router.post("/drops/{drop_id}/{action}", response_model=DropOut, responses=WRITE_ERRORS)
async def change_state(
    drop_id: ItemId,
    action: Literal["pause", "resume", "cancel"],
    principal: ApiPrincipal,
    ctx: Ctx,
) -> DropOut:
    async with ctx.db.transaction() as session:
        drop = await service.set_state(session, principal, drop_id, action, now=ctx.clock.now())
        return await service.drop_out(session, drop)


@router.get(
    "/drops/{drop_id}/preview",
    responses=WRITE_ERRORS,
    summary=(
        "Render the drop for one contact (no voucher is issued, no link is tracked); the "
        "SMS segment count is of the SMS as sent, its short links in place"
    ),
)
async def preview(
    drop_id: ItemId,
    contact_id: Annotated[int, Query(ge=1, le=2**62)],  # a query parameter, not the path's
    principal: ApiPrincipal,
    ctx: Ctx,
    variant: str | None = None,
) -> dict[str, Any]:
    async with ctx.db.reader() as session:
        drop = await service.get_drop(session, principal, drop_id)
        contact = await contact_points.get_contact(session, principal, contact_id)
        variants = {v.name: v for v in await service.variants_of(session, drop.id)}
        chosen = variants.get(variant or "") or next(iter(variants.values()))
        settings = await audience_settings.get_settings(session, principal.org_id)
        event = await service.event_of(session, drop)
    compiled = content.compile_variant(chosen.content)
    now = ctx.clock.now()
    bucket = audience_settings.bucket_of(
        contact.last_engaged_at, now, settings.hot_days, settings.warm_days
    )
    links = content.Links(ctx.signer, ctx.settings.base_url, drop, None, contact)
    values = content.context_for(drop, contact, event, (0, "PREVIEW-CODE"), links)
    sms_links = content.Links(
        ctx.signer,
        ctx.settings.base_url,
        drop,
        None,
        contact,
        slug_of=content.preview_slug,
        short_base_url=ctx.settings.short_links_base,
    )
    sms_values = content.context_for(drop, contact, event, (0, "PREVIEW-CODE"), sms_links)
    answer: dict[str, Any] = {"variant": chosen.name, "bucket": bucket}
    if "email" in drop.channels.split():
        email = compiled.render_email(bucket, values, links)
        answer["email"] = {"subject": email.subject, "text": email.text, "html": email.html}
    if "sms" in drop.channels.split():
        sms = compiled.render_sms(bucket, sms_values, sms_links)
        answer["sms"] = {"body": sms.body, "segments": sms.segments, "encoding": sms.encoding}
    return answer


@router.get("/drops/{drop_id}/war-room", response_model=WarRoom, responses=WRITE_ERRORS)
async def war_room(drop_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> WarRoom:
    async with ctx.db.reader() as session:
        return await outcomes.war_room(session, principal, drop_id)


@router.get(
    "/webhook-urls",
    responses=error_responses(401, 403),
    summary="Where to point each provider's delivery feedback and SMS webhooks",
)
async def webhook_urls(principal: ApiPrincipal, ctx: Ctx) -> dict[str, str]:
    principal.require("drops:write")
    return links.webhook_urls(
        ctx.signer, ctx.settings.base_url, principal.org_id, feedback.PROVIDERS
    )


@router.post(
    "/feedback/{provider}/{token}",
    responses=error_responses(400, 422),
    summary="Delivery feedback: Amazon SES (SNS), SendGrid, Postmark or generic",
)
async def provider_feedback(
    provider: Literal["ses", "sendgrid", "postmark", "generic"],
    token: str,
    request: Request,
    ctx: Ctx,
) -> dict[str, Any]:
    org_id = links.read_webhook(ctx.signer, token)
    body = await request.body()
    settings = ctx.settings
    await feedback.authenticate(
        provider,
        body,
        dict(request.headers),
        feedback.WebhookSecrets.parse(
            settings.feedback_webhook_secret,
            settings.feedback_sns_topic_arns,
            insecure=settings.insecure_webhooks,
        ),
        query_token=request.query_params.get("token"),
    )
    parsed = feedback.parse_webhook(provider, body, dict(request.headers))
    async with ctx.db.transaction() as session:
        counts = await outcomes.apply_feedback(
            session, ctx.signer, org_id, parsed.events, now=ctx.clock.now()
        )
    # An SNS subscription is confirmed by fetching SubscribeURL; this host cannot reach AWS,
    # so the URL is handed back for an operator (or a proxy) to open.
    return {"events": counts, "subscribe_url": parsed.subscribe_url}


@router.post("/sms/{token}/status", include_in_schema=False, status_code=204)
async def sms_status(token: str, request: Request, ctx: Ctx) -> Response:
    org_id = links.read_webhook(ctx.signer, token)
    callback = twilio.parse_status_callback(await webhooks.twilio_params(ctx.settings, request))
    async with ctx.db.transaction() as session:
        await outcomes.apply_sms_status(session, org_id, callback, now=ctx.clock.now())
    return Response(status_code=204)


@public_router.get("/r/{token}")
async def click(token: str, request: Request, ctx: Ctx) -> Response:
    """A tracked link: record the click (the drop's outcome and an attribution click),
    then send the person on (UTM kept, `pd_click` added)."""
    drop_id, row_id, url = links.read_click(ctx.signer, token)
    async with ctx.db.transaction() as session:
        location = await shortlinks.follow_tracked(
            session,
            ctx.signer,
            recorder_for(ctx.db),
            drop_id=drop_id,
            send_row_id=row_id,
            url=url,
            now=ctx.clock.now(),
            method=request.method,
            headers=request.headers,
        )
    return RedirectResponse(location, status_code=302, headers=_REDIRECT_HEADERS)


@public_router.api_route("/s/{slug}/{recipient}", methods=["GET", "HEAD"])
async def sms_click(slug: str, recipient: str, request: Request, ctx: Ctx) -> Response:
    """A drop SMS link: the drop's short link and the recipient (send row) under a MAC.
    A recipient part that does not check out is dropped: the shared link `/s/{slug}`
    (with its guessing guard) answers instead."""
    row_id = links.read_drop_recipient(ctx.signer, slug, recipient)
    if row_id is None or not redirects.SLUG_RE.match(slug):
        return RedirectResponse(f"/s/{slug}", status_code=302, headers=_REDIRECT_HEADERS)
    recorder = recorder_for(ctx.db)
    now = ctx.clock.now()
    async with ctx.db.transaction() as session:
        view = redirects.cached_view(slug, ctx.db.url) or await redirects.load_view(
            session, slug, ctx.settings.base_url, recorder, ctx.db.url
        )
        if view is None:
            raise not_found("short link")
        location = await shortlinks.follow_sms(
            session,
            ctx.signer,
            recorder,
            view,
            send_row_id=row_id,
            now=now,
            method=request.method,
            headers=request.headers,
        )
    return RedirectResponse(location, status_code=302, headers=_REDIRECT_HEADERS)
