"""REST API and public routes of the partners domain (thin: verify, parse, call the
service, shape the answer).

Public (no login; the signature is the credential, checked on the raw body before
anything is parsed): `POST /pos/square/{id}`, `/pos/shopify/{id}`, `/pos/webhooks/{id}`.
API (token): connections (hosts), POS sales (a partner sees its own), and the till's
validate / redeem of vault codes through a connection.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.core.errors import PopdropError
from popdrop.core.schemas import error_responses
from popdrop.partners import adapters, service, signatures
from popdrop.partners.adapters import Parsed
from popdrop.partners.lifecycle import PosProvider
from popdrop.partners.models import PosConnection
from popdrop.partners.schemas import (
    ConnectionCreate,
    ConnectionCreated,
    ConnectionOut,
    DeliveryAck,
    PosLineOut,
    PosSaleOut,
    SecretRotate,
)
from popdrop.vouchers import service as vault
from popdrop.vouchers.api import REDEEM_REFUSALS, guarded
from popdrop.vouchers.schemas import RedeemRequest, RedeemResult, ValidateRequest, VoucherOut
from popdrop.web.auth import ApiPrincipal
from popdrop.web.context import AppContext
from popdrop.web.idempotent import answer_once
from popdrop.web.params import Before, Ctx, IdempotencyKey, ItemId, Limit

router = APIRouter(prefix="/api/v1/pos", tags=["partners"])
public_router = APIRouter(prefix="/pos", tags=["partners"])

MAX_BODY = 512 * 1024
_RAW_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}
DELIVERY_REFUSALS = error_responses(401, 404, 409, 413, 422, 503)


# ---------------------------------------------------------------- deliveries


async def _raw(request: Request) -> bytes:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise PopdropError("payload_too_large", "a POS delivery is at most 512 KiB")
    return raw


def _json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise adapters.malformed("the body is not JSON") from None
    if not isinstance(body, dict):
        raise adapters.malformed("the body is a JSON object")
    return body


async def _open(
    ctx: AppContext, connection_id: int, provider: PosProvider
) -> tuple[PosConnection, list[str]]:
    async with ctx.db.reader() as session:
        return await service.connection_for_delivery(session, connection_id, provider)


async def _apply(
    ctx: AppContext, connection: PosConnection, parsed: Parsed, topic: str
) -> DeliveryAck:
    now = ctx.clock.now()

    async def work(session: AsyncSession) -> service.Ingested:
        return await service.ingest(session, ctx.signer, connection, parsed, topic=topic, now=now)

    done = await ctx.db.in_transaction(work)
    return DeliveryAck(outcome=done.outcome, sale_id=done.sale_id)


@public_router.post(
    "/square/{connection_id}",
    response_model=DeliveryAck,
    responses=DELIVERY_REFUSALS,
    summary="Square webhook (payment.*, refund.*): signed over the notification URL + body",
    openapi_extra=_RAW_BODY,
)
async def square_delivery(connection_id: ItemId, request: Request, ctx: Ctx) -> DeliveryAck:
    raw = await _raw(request)
    connection, keys = await _open(ctx, connection_id, PosProvider.SQUARE)
    signatures.verify_square(
        raw,
        request.headers.get("x-square-hmacsha256-signature"),
        connection.notification_url or service.delivery_url(ctx.settings.base_url, connection),
        keys,
    )
    body = _json(raw)
    parsed = adapters.square(body)
    return await _apply(ctx, connection, parsed, str(body.get("type")))


@public_router.post(
    "/shopify/{connection_id}",
    response_model=DeliveryAck,
    responses=DELIVERY_REFUSALS,
    summary="Shopify webhook (orders/create, orders/paid, refunds/create): HMAC of the raw body",
    openapi_extra=_RAW_BODY,
)
async def shopify_delivery(connection_id: ItemId, request: Request, ctx: Ctx) -> DeliveryAck:
    raw = await _raw(request)
    connection, keys = await _open(ctx, connection_id, PosProvider.SHOPIFY)
    signatures.verify_shopify(raw, request.headers.get("x-shopify-hmac-sha256"), keys)
    headers = request.headers
    topic = headers.get("x-shopify-topic")
    event_id = headers.get("x-shopify-event-id") or headers.get("x-shopify-webhook-id")
    parsed = adapters.shopify(topic, event_id, headers.get("x-shopify-shop-domain"), _json(raw))
    return await _apply(ctx, connection, parsed, topic or "")


@public_router.post(
    "/webhooks/{connection_id}",
    response_model=DeliveryAck,
    responses=DELIVERY_REFUSALS,
    summary="Any till: Standard Webhooks signature, body = pos.sale.v1",
    openapi_extra=_RAW_BODY,
)
async def standard_delivery(connection_id: ItemId, request: Request, ctx: Ctx) -> DeliveryAck:
    raw = await _raw(request)
    connection, secrets = await _open(ctx, connection_id, PosProvider.STANDARD)
    signatures.verify_standard(
        raw,
        webhook_id=request.headers.get("webhook-id"),
        timestamp=request.headers.get("webhook-timestamp"),
        signature=request.headers.get("webhook-signature"),
        secrets_=secrets,
        now=ctx.clock.now(),
    )
    sale = adapters.contract_from(_json(raw))
    return await _apply(ctx, connection, sale, f"pos.{sale.kind}")


# ---------------------------------------------------------------- connections


def _connection_out(ctx: AppContext, connection: PosConnection) -> ConnectionOut:
    return ConnectionOut(**service.describe(connection, ctx.settings.base_url))


@router.post(
    "/connections",
    status_code=201,
    response_model=ConnectionCreated,
    responses=error_responses(401, 403, 404, 422),
    summary="Connect a partner's till (a generated secret is shown this once)",
)
async def create_connection(
    body: ConnectionCreate, principal: ApiPrincipal, ctx: Ctx
) -> ConnectionCreated:
    async with ctx.db.transaction() as session:
        made = await service.create_connection(
            session,
            principal,
            partner_id=body.partner_id,
            provider=body.provider,
            account_id=body.account_id,
            location_id=body.location_id,
            notification_url=body.notification_url,
            secret=body.secret,
            base_url=ctx.settings.base_url,
            now=ctx.clock.now(),
        )
        out = _connection_out(ctx, made.connection)
    return ConnectionCreated(connection=out, secret=made.secret)


@router.get("/connections", response_model=list[ConnectionOut], responses=error_responses(401, 403))
async def list_connections(principal: ApiPrincipal, ctx: Ctx) -> list[ConnectionOut]:
    async with ctx.db.reader() as session:
        rows = await service.list_connections(session, principal)
        return [_connection_out(ctx, c) for c in rows]


@router.post(
    "/connections/{connection_id}/secrets",
    response_model=ConnectionCreated,
    responses=error_responses(401, 403, 404, 422),
    summary="Rotate: a new secret first, the previous one still verifies until the next",
)
async def rotate_secret(
    connection_id: ItemId, body: SecretRotate, principal: ApiPrincipal, ctx: Ctx
) -> ConnectionCreated:
    async with ctx.db.transaction() as session:
        connection, secret = await service.rotate_secret(
            session, principal, connection_id, secret=body.secret
        )
        out = _connection_out(ctx, connection)
    return ConnectionCreated(connection=out, secret=secret)


@router.post(
    "/connections/{connection_id}/disable",
    response_model=ConnectionOut,
    responses=error_responses(401, 403, 404),
)
async def disable_connection(
    connection_id: ItemId, principal: ApiPrincipal, ctx: Ctx
) -> ConnectionOut:
    async with ctx.db.transaction() as session:
        connection = await service.disable_connection(
            session, principal, connection_id, now=ctx.clock.now()
        )
        return _connection_out(ctx, connection)


# ---------------------------------------------------------------- sales


@router.get("/sales", response_model=list[PosSaleOut], responses=error_responses(401, 403))
async def list_sales(
    principal: ApiPrincipal,
    ctx: Ctx,
    event_id: Before = None,
    connection_id: Before = None,
    limit: Limit = 100,
    before: Before = None,
) -> list[PosSaleOut]:
    async with ctx.db.reader() as session:
        rows = await service.list_sales(
            session,
            principal,
            event_id=event_id,
            connection_id=connection_id,
            limit=limit,
            before_id=before,
        )
        lines = await service.lines_of(session, [s.id for s in rows])
    return [
        PosSaleOut(
            id=s.id,
            connection_id=s.connection_id,
            partner_id=s.partner_id,
            event_id=s.event_id,
            provider=s.provider,
            external_id=s.external_id,
            location=s.location,
            occurred_at=s.occurred_at,
            currency=s.currency,
            subtotal_minor=s.subtotal_minor,
            discount_minor=s.discount_minor,
            tax_minor=s.tax_minor,
            total_minor=s.total_minor,
            refunded_minor=s.refunded_minor,
            status=s.status,
            payment_methods=[m for m in s.payment_methods.split(",") if m],
            code_count=s.code_count,
            lines=[
                PosLineOut(
                    sku=line.sku,
                    quantity=line.quantity,
                    unit_price_minor=line.unit_price_minor,
                    discount_minor=line.discount_minor,
                )
                for line in lines.get(s.id, [])
            ],
        )
        for s in rows
    ]


# ---------------------------------------------------------------- the till's codes


def _till(principal: Principal) -> Principal:
    """`pos:redeem` lets a till validate and redeem vault codes, and nothing else of the
    vault: the vault's own checks run with exactly that permission."""
    principal.require("pos:redeem")
    return replace(principal, scopes=frozenset({"vouchers:redeem"}))


@router.post(
    "/connections/{connection_id}/codes/validate",
    response_model=VoucherOut,
    responses=error_responses(*REDEEM_REFUSALS),
    summary="The till checks a code (same checks and reasons as redeem, nothing consumed)",
)
async def till_validate(
    connection_id: ItemId,
    body: ValidateRequest,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
) -> VoucherOut:
    till = _till(principal)

    async def call() -> VoucherOut:
        async with ctx.db.reader() as session:
            await service.connection_of(session, principal, connection_id, scope="pos:redeem")
            return await vault.validate(
                session,
                ctx.signer,
                till,
                code=body.code,
                contact_ref=body.contact_ref,
                now=ctx.clock.now(),
            )

    result: VoucherOut = await guarded(ctx, request, principal, call)
    return result


@router.post(
    "/connections/{connection_id}/codes/redeem",
    response_model=RedeemResult,
    responses=error_responses(*REDEEM_REFUSALS),
    summary="The till redeems a code once; safe to retry with Idempotency-Key",
)
async def till_redeem(
    connection_id: ItemId,
    body: RedeemRequest,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    till = _till(principal)
    now = ctx.clock.now()

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        connection = await service.connection_of(
            session, principal, connection_id, scope="pos:redeem"
        )
        result = await vault.redeem(
            session,
            ctx.signer,
            till,
            code=body.code,
            contact_ref=body.contact_ref,
            order_ref=service.till_order_ref(connection, body.order_ref),
            now=now,
        )
        return 200, result.model_dump(mode="json")

    async def call() -> tuple[int, dict[str, Any]]:
        return await answer_once(
            ctx, request, principal, idempotency_key, body, operation, scope="pos:redeem"
        )

    status, payload = await guarded(ctx, request, principal, call)
    return JSONResponse(payload, status_code=status)
