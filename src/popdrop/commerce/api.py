"""Orders REST API and the Stripe webhook (thin: parse, call the service, shape the answer).

Creating an order, marking it paid and refunding take `Idempotency-Key`. Codes typed at
checkout count against the voucher guessing guard like the vault's own routes. The
webhook reads the raw body (the signature is over the exact bytes), answers 400 to a bad
signature or an old timestamp, and 200 to duplicates and types popdrop ignores.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.commerce import orders, settlement
from popdrop.commerce.lifecycle import OrderStatus
from popdrop.commerce.payments import StripeProvider, provider_from_settings
from popdrop.commerce.schemas import (
    CancelRequest,
    MarkPaidRequest,
    OrderCreate,
    OrderOut,
    PayStart,
    Quote,
    QuoteRequest,
    RefundRequest,
    SalesSummary,
    WebhookAck,
)
from popdrop.commerce.stripe_events import verify_and_parse
from popdrop.core.csvsafe import csv_text
from popdrop.core.errors import PopdropError
from popdrop.core.ratelimit import GUESSING_REASONS
from popdrop.core.schemas import error_responses
from popdrop.web.auth import ApiPrincipal
from popdrop.web.context import AppContext, client_address
from popdrop.web.idempotent import answer_once
from popdrop.web.params import Before, Ctx, IdempotencyKey, ItemId, Limit
from popdrop.web.streaming import csv_download

router = APIRouter(prefix="/api/v1", tags=["orders"])
webhook_router = APIRouter(prefix="/api/v1", tags=["payments"])

CHECKOUT_REFUSALS = (400, 401, 403, 404, 409, 410, 422, 429)
ItemIdQuery = Annotated[int | None, Query(ge=1, le=2**62)]
_PROVIDERS: dict[tuple[str, str], StripeProvider] = {}


def stripe_provider(ctx: AppContext) -> StripeProvider | None:
    """The app's Stripe provider (one per key and API base), None when not configured."""
    settings = ctx.settings
    if not settings.stripe_secret_key:
        return None
    key = (settings.stripe_secret_key, settings.stripe_api_base)
    provider = _PROVIDERS.get(key)
    if provider is None:
        provider = provider_from_settings(settings)
        assert provider is not None
        _PROVIDERS[key] = provider
    return provider


def _no_provider() -> PopdropError:
    # 409, not 503: nothing is down, this installation takes no online payment.
    return PopdropError(
        "online_payment_off", "online payment is not set up here; pay at pickup", status=409
    )


async def _guarded_codes(ctx: AppContext, request: Request, principal: Principal) -> None:
    await ctx.guard.check(principal.org_id, client_address(request), principal=principal.actor)


async def _count_guesses(
    ctx: AppContext, request: Request, principal: Principal, reasons: list[str]
) -> None:
    for reason in reasons:
        if reason in GUESSING_REASONS:
            await ctx.guard.failed(
                principal.org_id, client_address(request), principal=principal.actor
            )


@router.post(
    "/orders/quote",
    response_model=Quote,
    responses=error_responses(*CHECKOUT_REFUSALS),
    summary="Price holds with codes (nothing written, no code consumed)",
)
async def quote(body: QuoteRequest, request: Request, principal: ApiPrincipal, ctx: Ctx) -> Quote:
    if body.codes:
        await _guarded_codes(ctx, request, principal)
    async with ctx.db.reader() as session:
        answer = await orders.quote(
            session,
            ctx.signer,
            principal,
            hold_ids=body.hold_ids,
            codes=body.codes,
            contact_ref=body.contact_ref,
            now=ctx.clock.now(),
        )
    await _count_guesses(ctx, request, principal, [r.reason for r in answer.refusals])
    return answer


@router.post(
    "/orders",
    status_code=201,
    response_model=OrderOut,
    responses=error_responses(*CHECKOUT_REFUSALS),
    summary="Place an order from holds; codes are redeemed in the same transaction",
)
async def place_order(
    body: OrderCreate,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    now = ctx.clock.now()
    if body.codes:
        await _guarded_codes(ctx, request, principal)

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        order = await orders.place_order(session, ctx.signer, principal, body, now=now)
        return 201, order.model_dump(mode="json")

    try:
        status, payload = await answer_once(
            ctx, request, principal, idempotency_key, body, operation, scope="orders:write"
        )
    except PopdropError as error:
        await _count_guesses(ctx, request, principal, [error.reason])
        raise
    return JSONResponse(payload, status_code=status)


@router.get(
    "/orders",
    response_model=list[OrderOut],
    responses=error_responses(401, 403, 422),
    summary="Orders, newest first (a partner sees its events' orders only)",
)
async def list_orders(
    principal: ApiPrincipal,
    ctx: Ctx,
    event_id: ItemIdQuery = None,
    lane_id: ItemIdQuery = None,
    status: OrderStatus | None = None,
    limit: Limit = 100,
    before: Before = None,
) -> list[OrderOut]:
    async with ctx.db.reader() as session:
        return await orders.list_orders(
            session,
            principal,
            event_id=event_id,
            status=status,
            lane_id=lane_id,
            limit=limit,
            before_id=before,
        )


CSV_COLUMNS = (
    "id", "short_code", "event_id", "status", "status_reason", "source", "source_ref",
    "lane_id", "slot_id", "contact_ref", "receipt_email", "receipt_phone", "currency",
    "subtotal_minor", "discount_minor", "total_minor", "refunded_minor", "codes",
    "payment_method", "created_at", "paid_at", "picked_up_at", "ended_at",
)  # fmt: skip
EXPORT_PAGE = 500


@router.get(
    "/orders.csv",
    responses={200: {"content": {"text/csv": {}}}, **error_responses(401, 403, 422)},
    response_class=Response,
    summary="CSV export of orders (cells neutralised against spreadsheet formulas)",
)
async def export_orders(
    principal: ApiPrincipal,
    ctx: Ctx,
    event_id: ItemIdQuery = None,
    status: OrderStatus | None = None,
) -> Response:
    async def open_export(session: AsyncSession) -> AsyncIterator[str]:
        first = await orders.list_orders(
            session, principal, event_id=event_id, status=status, limit=EXPORT_PAGE
        )

        async def chunks() -> AsyncIterator[str]:
            yield csv_text([CSV_COLUMNS])
            page = first
            while page:
                yield csv_text(_csv_row(order) for order in page)
                if len(page) < EXPORT_PAGE:
                    return
                page = await orders.list_orders(
                    session, principal, event_id=event_id, status=status,
                    limit=EXPORT_PAGE, before_id=page[-1].id,
                )  # fmt: skip

        return chunks()

    return await csv_download(ctx, open_export, "orders.csv")


def _csv_row(order: OrderOut) -> list[Any]:
    data = order.model_dump(mode="json")
    data["codes"] = " ".join(order.codes)
    return [data.get(column) for column in CSV_COLUMNS]


@router.get(
    "/orders/{order_id}",
    response_model=OrderOut,
    responses=error_responses(401, 403, 404, 422),
)
async def get_order(order_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> OrderOut:
    async with ctx.db.reader() as session:
        return await orders.get_order(session, principal, order_id)


@router.get(
    "/events/{event_id}/sales",
    response_model=SalesSummary,
    responses=error_responses(401, 403, 404, 422),
    summary="Paid orders, revenue and average checkout value of an event",
)
async def sales(event_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> SalesSummary:
    async with ctx.db.reader() as session:
        return await orders.sales_summary(session, principal, event_id)


@router.post(
    "/orders/{order_id}/pay",
    response_model=PayStart,
    responses=error_responses(401, 403, 404, 409, 410, 422, 502),
    summary="Start an online payment: the provider's hosted page to send the customer to",
)
async def pay(order_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> PayStart:
    provider = stripe_provider(ctx)
    if provider is None:
        raise _no_provider()
    return await settlement.start_online_payment(
        ctx.db,
        principal,
        order_id,
        provider,
        signer=ctx.signer,
        base_url=ctx.settings.base_url,
        now=ctx.clock.now(),
    )


@router.post(
    "/orders/{order_id}/mark-paid",
    response_model=OrderOut,
    responses=error_responses(401, 403, 404, 409, 422),
    summary="Staff took the money at the lane (cash or their own terminal)",
)
async def mark_paid(
    order_id: ItemId,
    body: MarkPaidRequest,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    now = ctx.clock.now()
    scope = "orders:write" if "orders:write" in principal.scopes else "orders:pickup"

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        order = await settlement.mark_paid_at_lane(
            session, principal, order_id, tender=body.tender, now=now, signer=ctx.signer
        )
        return 200, order.model_dump(mode="json")

    status, payload = await answer_once(
        ctx, request, principal, idempotency_key, body, operation, scope=scope
    )
    return JSONResponse(payload, status_code=status)


@router.post(
    "/orders/{order_id}/cancel",
    response_model=OrderOut,
    responses=error_responses(401, 403, 404, 409, 422),
    summary="Cancel a pending order: units back on sale, codes usable again",
)
async def cancel(
    order_id: ItemId, body: CancelRequest, principal: ApiPrincipal, ctx: Ctx
) -> OrderOut:
    now = ctx.clock.now()

    async def work(session: AsyncSession) -> OrderOut:
        return await settlement.cancel_order(
            session, principal, order_id, reason=body.reason, now=now
        )

    return await ctx.db.in_transaction(work)


@router.post(
    "/orders/{order_id}/refunds",
    response_model=OrderOut,
    responses=error_responses(401, 403, 404, 409, 422),
    summary="Refund part or all of a paid order (through the provider, or cash back)",
)
async def refund(
    order_id: ItemId,
    body: RefundRequest,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    now = ctx.clock.now()
    sent: dict[str, list[int]] = {}

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        order, refund_ids = await settlement.refund_order(
            session,
            principal,
            order_id,
            amount_minor=body.amount_minor,
            reason=body.reason,
            note=body.note,
            now=now,
            signer=ctx.signer,
        )
        sent["ids"] = refund_ids
        return 200, order.model_dump(mode="json")

    status, payload = await answer_once(
        ctx, request, principal, idempotency_key, body, operation, scope="orders:write"
    )
    provider = stripe_provider(ctx)
    if sent.get("ids") and provider is not None:
        await settlement.send_pending_refunds(ctx.db, provider, now=now, refund_ids=sent["ids"])
        async with ctx.db.reader() as session:
            fresh = await orders.get_order(session, principal, order_id)
        payload = fresh.model_dump(mode="json")
    return JSONResponse(payload, status_code=status)


@webhook_router.post(
    "/payments/stripe/webhook",
    response_model=WebhookAck,
    responses=error_responses(400, 413, 422),
    summary="Stripe webhook: signed events, applied once each, in any order",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def stripe_webhook(request: Request, ctx: Ctx) -> WebhookAck:
    raw = await request.body()
    secrets = [s.strip() for s in ctx.settings.stripe_webhook_secrets.split(",") if s.strip()]
    now = ctx.clock.now()
    event = verify_and_parse(
        raw,
        request.headers.get("Stripe-Signature"),
        secrets,
        now=now,
        tolerance_seconds=ctx.settings.stripe_webhook_tolerance_seconds,
    )
    settled = await settlement.handle_stripe_event(
        ctx.db, event, stripe_provider(ctx), now=now, signer=ctx.signer
    )
    return WebhookAck(received=True, outcome=settled.outcome)
