"""Catalog REST API: bundles (and holding one), price rules, the checkout policy, samples.

Thin: parse, call `commerce.catalog` / `commerce.samples`, shape the answer. Writes need
`inventory:write` (samples: `orders:pickup`), reads `events:read` (sample costs:
`orders:read`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.commerce import catalog, samples
from popdrop.commerce.catalog_schemas import (
    BundleCreate,
    BundleHoldCreate,
    BundleHolds,
    BundleOut,
    CheckoutPolicyIn,
    CheckoutPolicyOut,
    PriceRuleCreate,
    PriceRuleOut,
    PriceRuleUpdate,
    SampleCosts,
    SampleGive,
    SampleOut,
)
from popdrop.core.schemas import error_responses
from popdrop.web.auth import ApiPrincipal
from popdrop.web.idempotent import respond_once
from popdrop.web.params import Ctx, IdempotencyKey, ItemId

router = APIRouter(prefix="/api/v1", tags=["catalog"])
WRITE_REFUSALS = error_responses(401, 403, 404, 409, 422)
READ_REFUSALS = error_responses(401, 403, 404)


# ---------------------------------------------------------------- bundles


@router.post(
    "/events/{event_id}/bundles",
    status_code=201,
    response_model=BundleOut,
    responses=WRITE_REFUSALS,
    summary="Create a micro-bundle: variants of this event sold together at one price",
)
async def create_bundle(
    event_id: ItemId, body: BundleCreate, principal: ApiPrincipal, ctx: Ctx
) -> BundleOut:
    async with ctx.db.transaction() as session:
        return await catalog.create_bundle(session, principal, event_id, body)


@router.get("/events/{event_id}/bundles", response_model=list[BundleOut], responses=READ_REFUSALS)
async def list_bundles(event_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> list[BundleOut]:
    async with ctx.db.reader() as session:
        return await catalog.list_bundles(session, principal, event_id)


@router.get("/bundles/{bundle_id}", response_model=BundleOut, responses=READ_REFUSALS)
async def get_bundle(bundle_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> BundleOut:
    async with ctx.db.reader() as session:
        return await catalog.get_bundle(session, principal, bundle_id)


@router.post("/bundles/{bundle_id}/deactivate", response_model=BundleOut, responses=WRITE_REFUSALS)
async def deactivate_bundle(bundle_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> BundleOut:
    async with ctx.db.transaction() as session:
        return await catalog.deactivate_bundle(session, principal, bundle_id)


@router.post(
    "/bundles/{bundle_id}/holds",
    status_code=201,
    response_model=BundleHolds,
    responses=error_responses(401, 403, 404, 409, 410, 422),
    summary="Hold every component of a bundle at a lane: all or none "
    "(a sold-out component refuses the bundle with its reason)",
)
async def take_bundle(
    bundle_id: ItemId,
    body: BundleHoldCreate,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    now = ctx.clock.now()

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        holds = await catalog.take_bundle(
            session,
            principal,
            bundle_id=bundle_id,
            lane_id=body.lane_id,
            slot_id=body.slot_id,
            contact_ref=body.contact_ref,
            now=now,
        )
        return 201, BundleHolds(bundle_id=bundle_id, holds=holds).model_dump(mode="json")

    return await respond_once(
        ctx, request, principal, idempotency_key, body, operation, scope="holds:write"
    )


# ---------------------------------------------------------------- price rules


@router.post(
    "/events/{event_id}/price-rules",
    status_code=201,
    response_model=PriceRuleOut,
    responses=WRITE_REFUSALS,
    summary="Create an automatic discount (kinds and params: docs/checkout.md)",
)
async def create_rule(
    event_id: ItemId, body: PriceRuleCreate, principal: ApiPrincipal, ctx: Ctx
) -> PriceRuleOut:
    async with ctx.db.transaction() as session:
        return await catalog.create_rule(session, principal, event_id, body)


@router.get(
    "/events/{event_id}/price-rules", response_model=list[PriceRuleOut], responses=READ_REFUSALS
)
async def list_rules(event_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> list[PriceRuleOut]:
    async with ctx.db.reader() as session:
        return await catalog.list_rules(session, principal, event_id)


@router.patch("/price-rules/{rule_id}", response_model=PriceRuleOut, responses=WRITE_REFUSALS)
async def update_rule(
    rule_id: ItemId, body: PriceRuleUpdate, principal: ApiPrincipal, ctx: Ctx
) -> PriceRuleOut:
    async with ctx.db.transaction() as session:
        return await catalog.update_rule(session, principal, rule_id, body)


@router.post(
    "/price-rules/{rule_id}/deactivate", response_model=PriceRuleOut, responses=WRITE_REFUSALS
)
async def deactivate_rule(rule_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> PriceRuleOut:
    async with ctx.db.transaction() as session:
        return await catalog.deactivate_rule(session, principal, rule_id)


# ---------------------------------------------------------------- checkout policy


@router.get(
    "/events/{event_id}/checkout-policy",
    response_model=CheckoutPolicyOut,
    responses=READ_REFUSALS,
)
async def get_policy(event_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> CheckoutPolicyOut:
    async with ctx.db.reader() as session:
        return await catalog.get_policy(session, principal, event_id)


@router.put(
    "/events/{event_id}/checkout-policy",
    response_model=CheckoutPolicyOut,
    responses=WRITE_REFUSALS,
)
async def set_policy(
    event_id: ItemId, body: CheckoutPolicyIn, principal: ApiPrincipal, ctx: Ctx
) -> CheckoutPolicyOut:
    async with ctx.db.transaction() as session:
        return await catalog.set_policy(session, principal, event_id, body)


# ---------------------------------------------------------------- samples


@router.post(
    "/samples",
    status_code=201,
    response_model=SampleOut,
    responses=WRITE_REFUSALS,
    summary="Hand out a zero-cost sample at a lane (one per person per campaign: "
    "409 already_sampled; 409 sold_out)",
)
async def give_sample(body: SampleGive, principal: ApiPrincipal, ctx: Ctx) -> SampleOut:
    async with ctx.db.transaction() as session:
        grant = await samples.give_sample(
            session,
            ctx.signer,
            principal,
            product_id=body.product_id,
            campaign=body.campaign,
            contact_ref=body.contact_ref,
            allocated_to=body.allocated_to,
            drop_id=body.drop_id,
            segment=body.segment,
            conversation_id=body.conversation_id,
            lane_id=body.lane_id,
            now=ctx.clock.now(),
        )
        return samples.sample_out(grant)


@router.get(
    "/events/{event_id}/samples",
    response_model=SampleCosts,
    responses=READ_REFUSALS,
    summary="What an event's samples cost, per allocation, and the latest ones given",
)
async def sample_costs(event_id: ItemId, principal: ApiPrincipal, ctx: Ctx) -> SampleCosts:
    async with ctx.db.reader() as session:
        return await samples.sample_costs(session, principal, event_id, signer=ctx.signer)
