"""An event's catalog for checkout: micro-bundles, automatic price rules and the checkout
policy. The pricing engine (`commerce.pricing`) prices with what this module stores.

Rules:
- A bundle is variants of its own event sold together at its own price; every component
  product has the bundle's currency (one currency per cart). Components never change once
  the bundle exists (orders point at it); a bundle is deactivated, never deleted.
- `take_bundle` holds every component at one lane in the caller's transaction, inside a
  SAVEPOINT: all or none. A component that cannot be held (sold out, not enough, slot
  full, limit per person) refuses the whole bundle with that component's reason and
  nothing stays held, even when the caller goes on after catching the refusal. With a
  pickup slot each component takes its units of the lane's window (`PickupWindow.taken`
  counts units, like every hold).
- A price rule's `params` must be exactly what its kind reads (`pricing.check_rule`, the
  engine's own check, plus sane upper bounds), else 422 `invalid_request` naming the bad
  field; `valid_until` after `valid_from`; `product_ids` (products of the rule's event;
  none = every product) are kept in the params JSON under "product_ids", where the order
  service reads them. Rules are edited or deactivated, never deleted (orders cite them).
- An event without a checkout policy row takes the defaults (`DEFAULT_POLICY`).
- Writes need `inventory:write`; reads `events:read`. Tenancy: every row is found with the
  caller's organization (`owned`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.commerce import pricing
from popdrop.commerce.catalog_schemas import (
    BundleCreate,
    BundleOut,
    CheckoutPolicyIn,
    CheckoutPolicyOut,
    ComponentOut,
    PriceRuleCreate,
    PriceRuleOut,
    PriceRuleUpdate,
)
from popdrop.commerce.models import Bundle, BundleComponent, CheckoutPolicy, PriceRule
from popdrop.core.db import dialect_insert, table_of
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.tenancy import owned
from popdrop.events.models import Event, Lane
from popdrop.inventory import service as inventory
from popdrop.inventory.models import Product, Variant
from popdrop.inventory.schemas import HoldCreate, HoldOut

WRITE = "inventory:write"
READ = "events:read"

# Upper bounds the engine does not need but a host's typo should meet (a rule for
# 10,000-unit groups is a typo). The kinds' params themselves are `pricing.check_rule`'s.
_MOST = {
    "min_qty": 1000,
    "buy": 1000,
    "get": 1000,
    "every": 1000,
    "free": 1000,
    "amount_minor": 10**12,
    "min_value_minor": 10**12,
}
PRODUCT_IDS = "product_ids"  # kept in the params JSON next to the kind's integers


def check_rule(name: str, kind: pricing.RuleKind, params: dict[str, int]) -> None:
    """Refuse params that do not fit `kind` (`pricing.check_rule`, the engine's own
    rule) with 422 `invalid_request` naming the field."""
    pricing.check_rule(pricing.Rule(id=0, name=name, kind=kind, params=params))
    for field, most in _MOST.items():
        if params.get(field, 0) > most:
            raise PopdropError("invalid_request", f"rule {name!r}: {field} is at most {most}")


async def _check_products(
    session: AsyncSession, principal: Principal, event_id: int, product_ids: list[int] | None
) -> None:
    if not product_ids:
        return
    found = set(
        await session.scalars(
            select(Product.id).where(
                Product.id.in_(product_ids),
                Product.org_id == principal.org_id,
                Product.event_id == event_id,
            )
        )
    )
    for product_id in product_ids:
        if product_id not in found:
            raise not_found(f"product {product_id} of this event")


def _stored_params(params: dict[str, int], product_ids: list[int] | None) -> str:
    stored: dict[str, object] = dict(params)
    if product_ids:
        stored[PRODUCT_IDS] = sorted(set(product_ids))
    return json.dumps(stored, sort_keys=True)


def _split_params(raw: str) -> tuple[dict[str, int], list[int] | None]:
    data = json.loads(raw or "{}")
    products = data.pop(PRODUCT_IDS, None)
    return {str(k): int(v) for k, v in data.items()}, products or None


def _check_window(valid_from: datetime | None, valid_until: datetime | None) -> None:
    if valid_from is not None and valid_until is not None and valid_until <= valid_from:
        raise PopdropError("invalid_request", "valid_until must be after valid_from")


async def _event(session: AsyncSession, principal: Principal, event_id: int) -> Event:
    return await owned(session, Event, event_id, principal.org_id, what="event")


# ---------------------------------------------------------------- bundles


async def create_bundle(
    session: AsyncSession, principal: Principal, event_id: int, spec: BundleCreate
) -> BundleOut:
    principal.require(WRITE)
    event = await _event(session, principal, event_id)
    wanted = [c.variant_id for c in spec.components]
    rows = (
        await session.execute(
            select(Variant, Product)
            .join(Product, Product.id == Variant.product_id)
            .where(Variant.id.in_(wanted), Variant.org_id == principal.org_id)
        )
    ).all()
    found = {variant.id: (variant, product) for variant, product in rows}
    for variant_id in wanted:
        if variant_id not in found or found[variant_id][1].event_id != event.id:
            raise not_found(f"variant {variant_id} of this event")
    currencies = {product.currency for _, product in found.values()}
    if len(currencies) != 1:
        raise PopdropError(
            "invalid_request", "a bundle's products must share one currency", status=422
        )
    if any(product.is_sample for _, product in found.values()):
        raise PopdropError("invalid_request", "a sample cannot be part of a bundle")
    bundle = Bundle(
        org_id=principal.org_id,
        event_id=event.id,
        title=spec.title,
        price_minor=spec.price_minor,
        currency=currencies.pop(),
        active=True,
    )
    session.add(bundle)
    await session.flush()
    session.add_all(
        BundleComponent(bundle_id=bundle.id, variant_id=c.variant_id, qty=c.qty)
        for c in spec.components
    )
    await session.flush()
    return (await _bundles_out(session, principal.org_id, [bundle]))[0]


async def _bundles_out(
    session: AsyncSession, org_id: int, bundles: list[Bundle]
) -> list[BundleOut]:
    if not bundles:
        return []
    rows = (
        await session.execute(
            select(BundleComponent, Variant, Product)
            .join(Variant, Variant.id == BundleComponent.variant_id)
            .join(Product, Product.id == Variant.product_id)
            .where(BundleComponent.bundle_id.in_([b.id for b in bundles]))
            .order_by(BundleComponent.bundle_id, BundleComponent.variant_id)
        )
    ).all()
    by_bundle: dict[int, list[ComponentOut]] = {}
    for component, variant, product in rows:
        by_bundle.setdefault(component.bundle_id, []).append(
            ComponentOut(
                variant_id=variant.id,
                product_id=product.id,
                title=f"{product.title} ({variant.name})",
                qty=component.qty,
                unit_price_minor=product.price_minor,
            )
        )
    out = []
    for bundle in bundles:
        components = by_bundle.get(bundle.id, [])
        out.append(
            BundleOut(
                id=bundle.id,
                event_id=bundle.event_id,
                title=bundle.title,
                price_minor=bundle.price_minor,
                currency=bundle.currency,
                active=bundle.active,
                components=components,
                list_minor=sum(c.qty * c.unit_price_minor for c in components),
            )
        )
    return out


async def list_bundles(
    session: AsyncSession, principal: Principal, event_id: int, *, active_only: bool = False
) -> list[BundleOut]:
    principal.require(READ)
    await _event(session, principal, event_id)
    query = select(Bundle).where(Bundle.event_id == event_id, Bundle.org_id == principal.org_id)
    if active_only:
        query = query.where(Bundle.active.is_(True))
    bundles = list(await session.scalars(query.order_by(Bundle.id)))
    return await _bundles_out(session, principal.org_id, bundles)


async def get_bundle(session: AsyncSession, principal: Principal, bundle_id: int) -> BundleOut:
    principal.require(READ)
    bundle = await owned(session, Bundle, bundle_id, principal.org_id)
    return (await _bundles_out(session, principal.org_id, [bundle]))[0]


async def deactivate_bundle(
    session: AsyncSession, principal: Principal, bundle_id: int
) -> BundleOut:
    """No new sales of it; orders that have it keep it."""
    principal.require(WRITE)
    bundle = await owned(session, Bundle, bundle_id, principal.org_id, lock=True)
    bundle.active = False
    await session.flush()
    return (await _bundles_out(session, principal.org_id, [bundle]))[0]


async def take_bundle(
    session: AsyncSession,
    principal: Principal,
    *,
    bundle_id: int,
    lane_id: int,
    slot_id: int | None,
    contact_ref: str | None,
    now: datetime,
) -> list[HoldOut]:
    """Hold every component of an active bundle at one lane: all or none.

    Each component is an ordinary hold (`inventory.service.create_hold`: its own stock
    row, its pickup window, the per-person limit), taken in a SAVEPOINT of the caller's
    transaction; the first refusal rolls the savepoint back and is raised as it is
    (`sold_out`, `insufficient_stock`, `slot_full`, …) with `bundle_id` and the refused
    `variant_id` added, so nothing of the bundle stays held.
    """
    principal.require("holds:write")
    bundle = await owned(
        session, Bundle, bundle_id, principal.org_id, where=(Bundle.active.is_(True),)
    )
    await owned(
        session, Lane, lane_id, principal.org_id, what="lane of this event",
        where=(Lane.event_id == bundle.event_id,),
    )  # fmt: skip
    components = list(
        await session.scalars(
            select(BundleComponent)
            .where(BundleComponent.bundle_id == bundle.id)
            # Stock rows are locked in variant order by every bundle: no deadlock between two.
            .order_by(BundleComponent.variant_id)
        )
    )
    holds: list[HoldOut] = []
    savepoint = await session.begin_nested()
    try:
        for component in components:
            spec = HoldCreate(
                variant_id=component.variant_id,
                lane_id=lane_id,
                qty=component.qty,
                slot_id=slot_id,
                contact_ref=contact_ref,
            )
            try:
                holds.append(await inventory.create_hold(session, principal, spec, now=now))
            except PopdropError as refusal:
                refusal.detail = {
                    **refusal.detail,
                    "bundle_id": bundle.id,
                    "variant_id": component.variant_id,
                }
                raise
    except BaseException:
        await savepoint.rollback()
        raise
    await savepoint.commit()
    return holds


# ---------------------------------------------------------------- price rules


def rule_out(rule: PriceRule) -> PriceRuleOut:
    params, product_ids = _split_params(rule.params)
    return PriceRuleOut(
        id=rule.id,
        event_id=rule.event_id,
        name=rule.name,
        kind=pricing.RuleKind(rule.kind),
        params=params,
        product_ids=product_ids,
        stacking=pricing.Stacking(rule.stacking),
        applies_to=pricing.AppliesTo(rule.applies_to),
        priority=rule.priority,
        budget_minor=rule.budget_minor,
        budget_spent_minor=rule.budget_spent_minor,
        valid_from=rule.valid_from,
        valid_until=rule.valid_until,
        active=rule.active,
    )


async def create_rule(
    session: AsyncSession, principal: Principal, event_id: int, spec: PriceRuleCreate
) -> PriceRuleOut:
    principal.require(WRITE)
    event = await _event(session, principal, event_id)
    check_rule(spec.name, spec.kind, spec.params)
    _check_window(spec.valid_from, spec.valid_until)
    await _check_products(session, principal, event.id, spec.product_ids)
    rule = PriceRule(
        org_id=principal.org_id,
        event_id=event.id,
        name=spec.name,
        kind=str(spec.kind),
        params=_stored_params(spec.params, spec.product_ids),
        stacking=str(spec.stacking),
        applies_to=str(spec.applies_to),
        priority=spec.priority,
        budget_minor=spec.budget_minor,
        budget_spent_minor=0,
        valid_from=spec.valid_from,
        valid_until=spec.valid_until,
        active=True,
    )
    session.add(rule)
    await session.flush()
    return rule_out(rule)


async def list_rules(
    session: AsyncSession, principal: Principal, event_id: int
) -> list[PriceRuleOut]:
    principal.require(READ)
    await _event(session, principal, event_id)
    rules = await session.scalars(
        select(PriceRule)
        .where(PriceRule.event_id == event_id, PriceRule.org_id == principal.org_id)
        .order_by(PriceRule.priority, PriceRule.id)
    )
    return [rule_out(rule) for rule in rules]


async def update_rule(
    session: AsyncSession, principal: Principal, rule_id: int, spec: PriceRuleUpdate
) -> PriceRuleOut:
    principal.require(WRITE)
    rule = await owned(session, PriceRule, rule_id, principal.org_id, lock=True, what="price rule")
    changes: dict[str, Any] = spec.model_dump(exclude_unset=True)
    kind = pricing.RuleKind(changes.pop("kind", rule.kind))
    old_params, old_products = _split_params(rule.params)
    params = changes.pop("params", old_params)
    product_ids = changes.pop("product_ids", old_products)
    check_rule(changes.get("name", rule.name), kind, params)
    _check_window(
        changes.get("valid_from", rule.valid_from), changes.get("valid_until", rule.valid_until)
    )
    await _check_products(session, principal, rule.event_id, product_ids)
    rule.kind = str(kind)
    rule.params = _stored_params(params, product_ids)
    for name, value in changes.items():
        setattr(rule, name, str(value) if name in ("stacking", "applies_to") else value)
    await session.flush()
    return rule_out(rule)


async def deactivate_rule(
    session: AsyncSession, principal: Principal, rule_id: int
) -> PriceRuleOut:
    return await update_rule(session, principal, rule_id, PriceRuleUpdate(active=False))


# ---------------------------------------------------------------- checkout policy

DEFAULT_POLICY = CheckoutPolicyIn()
_policies = table_of(CheckoutPolicy)


def _policy_out(event_id: int, policy: CheckoutPolicy | CheckoutPolicyIn) -> CheckoutPolicyOut:
    return CheckoutPolicyOut(
        event_id=event_id,
        max_codes_per_order=policy.max_codes_per_order,
        pay_online=policy.pay_online,
        pay_at_pickup=policy.pay_at_pickup,
        code_stacking=pricing.Stacking(policy.code_stacking),
        code_applies_to=pricing.AppliesTo(policy.code_applies_to),
    )


async def checkout_policy(session: AsyncSession, org_id: int, event_id: int) -> CheckoutPolicyOut:
    """An event's checkout policy (the defaults when the host set none). No scope check:
    for the checkout path, which found the event through its own token."""
    row = await session.scalar(
        select(CheckoutPolicy).where(
            CheckoutPolicy.event_id == event_id, CheckoutPolicy.org_id == org_id
        )
    )
    return _policy_out(event_id, row if row is not None else DEFAULT_POLICY)


async def get_policy(
    session: AsyncSession, principal: Principal, event_id: int
) -> CheckoutPolicyOut:
    principal.require(READ)
    event = await _event(session, principal, event_id)
    return await checkout_policy(session, principal.org_id, event.id)


async def set_policy(
    session: AsyncSession, principal: Principal, event_id: int, spec: CheckoutPolicyIn
) -> CheckoutPolicyOut:
    principal.require(WRITE)
    event = await _event(session, principal, event_id)
    values = {
        "max_codes_per_order": spec.max_codes_per_order,
        "pay_online": spec.pay_online,
        "pay_at_pickup": spec.pay_at_pickup,
        "code_stacking": str(spec.code_stacking),
        "code_applies_to": str(spec.code_applies_to),
    }
    # One statement: two first PUTs of an event's policy never collide on its key.
    await session.execute(
        dialect_insert(session.get_bind().dialect.name, _policies)
        .values(event_id=event.id, org_id=principal.org_id, **values)
        .on_conflict_do_update(index_elements=[_policies.c.event_id], set_=values)
    )
    return _policy_out(event.id, spec)
