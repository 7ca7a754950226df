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
- A price rule's `params` must be exactly what its kind reads (`RULE_PARAMS`: names and
  ranges), else 422 `invalid_request` naming the bad field; `valid_until` after
  `valid_from`. Rules are edited or deactivated, never deleted (orders cite them).
- An event without a checkout policy row takes the defaults (`DEFAULT_POLICY`).
- Writes need `inventory:write`; reads `events:read`. Tenancy: every row is found with the
  caller's organization (`owned`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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

# What each rule kind reads from `params`: name -> (lowest, highest), and which of them
# are required. `percent` is a whole percentage; `*_minor` amounts are minor units.
_PERCENT = (1, 100)
_AMOUNT = (1, 10**12)
_COUNT = (1, 1000)


@dataclass(frozen=True)
class ParamSpec:
    required: frozenset[str]
    # Exactly one of these is required when not empty (the discount's size).
    one_of: frozenset[str]
    ranges: dict[str, tuple[int, int]]


RULE_PARAMS: dict[pricing.RuleKind, ParamSpec] = {
    # At least `min_qty` units in the cart: `percent` off, or `amount_minor` off the lot.
    pricing.RuleKind.MIN_QUANTITY: ParamSpec(
        frozenset({"min_qty"}),
        frozenset({"percent", "amount_minor"}),
        {"min_qty": _COUNT, "percent": _PERCENT, "amount_minor": _AMOUNT},
    ),
    # A cart worth at least `min_value_minor`: `percent` off, or `amount_minor` off.
    pricing.RuleKind.MIN_VALUE: ParamSpec(
        frozenset({"min_value_minor"}),
        frozenset({"percent", "amount_minor"}),
        {"min_value_minor": _AMOUNT, "percent": _PERCENT, "amount_minor": _AMOUNT},
    ),
    # For every `buy` units, `get` more at `percent` off (100 = free; 100 when left out).
    pricing.RuleKind.BUY_X_GET_Y: ParamSpec(
        frozenset({"buy", "get"}),
        frozenset(),
        {"buy": _COUNT, "get": _COUNT, "percent": _PERCENT},
    ),
    # For every `every` units, the `free` cheapest are free (`free` < `every`).
    pricing.RuleKind.CHEAPEST_FREE: ParamSpec(
        frozenset({"every", "free"}),
        frozenset(),
        {"every": (2, 1000), "free": _COUNT},
    ),
}


def rule_params_problem(kind: pricing.RuleKind, params: dict[str, int]) -> str | None:
    """Why `params` do not fit `kind` (a message naming the field), or None."""
    spec = RULE_PARAMS[kind]
    unknown = sorted(set(params) - set(spec.ranges))
    if unknown:
        return f"{kind} takes no {', '.join(unknown)} (it takes {', '.join(sorted(spec.ranges))})"
    missing = sorted(spec.required - set(params))
    if missing:
        return f"{kind} needs {', '.join(missing)}"
    if spec.one_of and len(spec.one_of & set(params)) != 1:
        return f"{kind} needs exactly one of {' or '.join(sorted(spec.one_of))}"
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name} must be a whole number"
        low, high = spec.ranges[name]
        if not low <= value <= high:
            return f"{name} must be between {low} and {high}"
    if kind == pricing.RuleKind.CHEAPEST_FREE and params["free"] >= params["every"]:
        return "free must be less than every"
    return None


def check_rule(kind: pricing.RuleKind, params: dict[str, int]) -> None:
    problem = rule_params_problem(kind, params)
    if problem is not None:
        raise PopdropError("invalid_request", problem)


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


@dataclass(frozen=True)
class BundleSpec:
    """A bundle as the pricing step reads it: its price and what is in it."""

    id: int
    title: str
    price_minor: int
    currency: str
    components: tuple[tuple[int, int], ...]  # (variant id, qty), by variant id


async def active_bundles(session: AsyncSession, org_id: int, event_id: int) -> list[BundleSpec]:
    """The bundles an event sells now (for quoting a cart: which holds make a bundle)."""
    bundles = list(
        await session.scalars(
            select(Bundle)
            .where(Bundle.org_id == org_id, Bundle.event_id == event_id, Bundle.active.is_(True))
            .order_by(Bundle.id)
        )
    )
    if not bundles:
        return []
    parts: dict[int, list[tuple[int, int]]] = {}
    for component in await session.scalars(
        select(BundleComponent)
        .where(BundleComponent.bundle_id.in_([b.id for b in bundles]))
        .order_by(BundleComponent.variant_id)
    ):
        parts.setdefault(component.bundle_id, []).append((component.variant_id, component.qty))
    return [
        BundleSpec(b.id, b.title, b.price_minor, b.currency, tuple(parts.get(b.id, ())))
        for b in bundles
    ]


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
    return PriceRuleOut(
        id=rule.id,
        event_id=rule.event_id,
        name=rule.name,
        kind=pricing.RuleKind(rule.kind),
        params=json.loads(rule.params),
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
    check_rule(spec.kind, spec.params)
    _check_window(spec.valid_from, spec.valid_until)
    rule = PriceRule(
        org_id=principal.org_id,
        event_id=event.id,
        name=spec.name,
        kind=str(spec.kind),
        params=json.dumps(spec.params, sort_keys=True),
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
    kind = changes.get("kind", pricing.RuleKind(rule.kind))
    params = changes.get("params", json.loads(rule.params))
    check_rule(pricing.RuleKind(kind), params)
    _check_window(
        changes.get("valid_from", rule.valid_from), changes.get("valid_until", rule.valid_until)
    )
    for name, value in changes.items():
        if name == "params":
            value = json.dumps(value, sort_keys=True)
        elif name in ("kind", "stacking", "applies_to"):
            value = str(value)
        setattr(rule, name, value)
    await session.flush()
    return rule_out(rule)


async def deactivate_rule(
    session: AsyncSession, principal: Principal, rule_id: int
) -> PriceRuleOut:
    return await update_rule(session, principal, rule_id, PriceRuleUpdate(active=False))


async def active_rules(
    session: AsyncSession, org_id: int, event_id: int, now: datetime
) -> list[pricing.Rule]:
    """The rules that apply to a cart priced at `now`, as the pricing engine takes them
    (budget left included), in the engine's order (priority, then id)."""
    rules = await session.scalars(
        select(PriceRule)
        .where(
            PriceRule.org_id == org_id,
            PriceRule.event_id == event_id,
            PriceRule.active.is_(True),
            (PriceRule.valid_from.is_(None)) | (PriceRule.valid_from <= now),
            (PriceRule.valid_until.is_(None)) | (PriceRule.valid_until > now),
        )
        .order_by(PriceRule.priority, PriceRule.id)
    )
    return [
        pricing.Rule(
            id=rule.id,
            name=rule.name,
            kind=pricing.RuleKind(rule.kind),
            params=json.loads(rule.params),
            stacking=pricing.Stacking(rule.stacking),
            applies_to=pricing.AppliesTo(rule.applies_to),
            priority=rule.priority,
            budget_left_minor=(
                None
                if rule.budget_minor is None
                else max(rule.budget_minor - rule.budget_spent_minor, 0)
            ),
        )
        for rule in rules
    ]


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
