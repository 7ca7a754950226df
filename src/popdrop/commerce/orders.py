"""Orders: a quote from holds, an order placed from them, reads, cancel, the sales summary.

Rules:
- An order is made of active, unexpired holds of ONE event, ONE lane and ONE pickup
  window, none of them in an order already (`order_lines.hold_id` is unique: two
  checkouts racing for a hold end with one order and a `hold_taken`).
- `quote` and `place_order` build the same cart (`_checkout`): list prices, the bundles
  whose components the holds cover exactly, the event's active price rules (inside their
  validity, with what is left of their budgets), the codes checked by the voucher vault
  (`vouchers.service.validate`: nothing consumed by a quote), the event's checkout
  policy (defaults when it has none: one code, both ways to pay). `commerce.pricing`
  prices it; the breakdown is stored on the order, so the price shown holds until the
  holds end even if the host changes prices. A held unit's list price is the product's
  price when the hold was taken (`inventory.models.ProductPrice` keeps the earlier
  prices), or the current one if the host has cut it since: the lower of the two. A
  checkout that sends the total it showed (`expected_total_minor`) is refused with
  `price_changed` when the price moved between the quote and the order (a cut, a rule or
  a code that ended), so nobody pays a price they did not see.
- `place_order` is ONE transaction: lock the holds (id order: hold rows before stock, as
  inventory), price, spend the rule budgets (a conditional UPDATE each; a budget spent
  meanwhile → priced again without it), write the order and its lines, redeem every
  applied code with `order_ref = "order:<id>"`. Any refusal (a code used meanwhile, a
  budget, a hold taken) rolls everything back and tells the customer why.
- A total of 0 (a sample, a fully discounted order) is paid at once: the holds become
  sold and a `Payment` of 0 is recorded with provider `pay_at_pickup` and tender `free`
  (nothing to collect). Pay at pickup: the order stays pending and its holds are kept
  until the end of its pickup window (the slot's end, else the event's end) so staff can
  take the money at the lane. Both get their receipt (`commerce.receipts`) queued in the
  order's transaction; an online payment's receipt is queued when it settles.
- Codes act through the vault on the caller's behalf: the order scopes (`orders:write`)
  are what the caller needs; the vault sees the same actor.
- A partner (role `partner`) reads only the orders of events it partners or staffs.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, false, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.models import User
from popdrop.accounts.service import Principal, partner_email, system_principal
from popdrop.attribution import service as attribution
from popdrop.attribution.models import SaleTouch
from popdrop.commerce import funnel, pricing, receipts, units
from popdrop.commerce.lifecycle import (
    ORDER_LIFECYCLE,
    SOLD_STATUSES,
    OrderStatus,
    PaymentMethod,
    PaymentStatus,
)
from popdrop.commerce.models import (
    Bundle,
    BundleComponent,
    CheckoutPolicy,
    Order,
    OrderLine,
    Payment,
    PriceRule,
    Refund,
)
from popdrop.commerce.schemas import (
    BreakdownOut,
    LaneOut,
    OrderCreate,
    OrderLineOut,
    OrderOut,
    PaymentOut,
    Quote,
    RefundOut,
    RefusalOut,
    SalesSummary,
    WindowOut,
)
from popdrop.core.db import table_of
from popdrop.core.errors import REASON_STATUS, PopdropError, not_found
from popdrop.core.logging import log
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned
from popdrop.events.models import Event, Lane, Partner, StaffAssignment, TimeSlot
from popdrop.inventory.lifecycle import HoldStatus
from popdrop.inventory.models import Hold, Product, ProductPrice, Variant
from popdrop.metrics.kinds import Kind
from popdrop.vouchers import service as vault
from popdrop.vouchers.codes import ALPHABET, check_char
from popdrop.vouchers.models import Redemption

# Budgets spent meanwhile by other checkouts: price again at most this many times.
BUDGET_ATTEMPTS = 3


def hold_taken() -> PopdropError:
    return PopdropError("hold_taken", "this reservation is already in an order", status=409)


def vault_principal(principal: Principal) -> Principal:
    """The caller acting on the voucher vault for an order (same org, same actor)."""
    return system_principal(
        principal.org_id,
        principal.actor,
        scopes=frozenset({"vouchers:redeem", "vouchers:write"}),
        role=principal.role,
    )


# ---------------------------------------------------------------- the cart


@dataclass(frozen=True)
class Policy:
    max_codes: int = 1
    pay_online: bool = True
    pay_at_pickup: bool = True
    code_stacking: pricing.Stacking = pricing.Stacking.STACKABLE
    code_applies_to: pricing.AppliesTo = pricing.AppliesTo.DISCOUNTED

    def methods(self) -> list[PaymentMethod]:
        return [
            m
            for m, on in (
                (PaymentMethod.STRIPE, self.pay_online),
                (PaymentMethod.PAY_AT_PICKUP, self.pay_at_pickup),
            )
            if on
        ]


@dataclass
class Checkout:
    """Everything one checkout of some holds is priced from."""

    event: Event
    lane: Lane
    slot: TimeSlot | None
    holds: list[tuple[Hold, Variant, Product]]
    policy: Policy
    currency: str
    items: tuple[pricing.Item, ...]
    bundles: tuple[pricing.BundleUse, ...]
    bundle_ids: dict[str, int]
    rules: list[PriceRule]
    codes: tuple[pricing.Code, ...]
    typed_by_ref: dict[str, str]  # voucher id → the code as typed
    refusals: list[pricing.Refusal] = field(default_factory=list)

    @property
    def hold_expires_at(self) -> datetime:
        return min(hold.expires_at for hold, _, _ in self.holds)

    @property
    def window_end(self) -> datetime:
        return self.slot.ends_at if self.slot is not None else self.event.ends_at

    def cart(self, budgets: dict[int, int | None]) -> pricing.Cart:
        return pricing.Cart(
            currency=self.currency,
            items=self.items,
            bundles=self.bundles,
            rules=tuple(_rule(r, budgets.get(r.id)) for r in self.rules),
            codes=self.codes,
            max_codes=self.policy.max_codes,
        )


def _rule(row: PriceRule, budget_left: int | None) -> pricing.Rule:
    params, product_ids = _rule_params(row)
    return pricing.Rule(
        id=row.id,
        name=row.name,
        kind=pricing.RuleKind(row.kind),
        params=params,
        stacking=pricing.Stacking(row.stacking),
        applies_to=pricing.AppliesTo(row.applies_to),
        priority=row.priority,
        budget_left_minor=budget_left,
        product_ids=product_ids,
    )


def _rule_params(row: PriceRule) -> tuple[dict[str, int], frozenset[int] | None]:
    raw = json.loads(row.params or "{}")
    products = raw.pop("product_ids", None)
    product_ids = frozenset(int(p) for p in products) if products else None
    return {str(k): v for k, v in raw.items()}, product_ids


def _usable_rule(row: PriceRule) -> bool:
    """A rule the engine can run (a rule with params that do not fit its kind is skipped
    and logged: a host's typo must not stop every checkout)."""
    try:
        pricing.check_rule(_rule(row, None))
    except (PopdropError, ValueError, TypeError, AttributeError) as exc:
        log.warning("price rule skipped", rule=row.id, error=repr(exc))
        return False
    return True


def _budget_left(row: PriceRule) -> int | None:
    if row.budget_minor is None:
        return None
    return max(row.budget_minor - row.budget_spent_minor, 0)


def _short_code() -> str:
    data = "".join(secrets.choice(ALPHABET) for _ in range(8))
    return data + check_char(data)


def format_short_code(code: str | None) -> str | None:
    return None if code is None else f"{code[:4]}-{code[4:8]}-{code[8:]}"


_sibling_variants = table_of(Variant).alias("siblings")
_SIBLINGS = (
    select(func.count(_sibling_variants.c.id))
    .where(_sibling_variants.c.product_id == Product.id)
    .correlate(Product)
    .scalar_subquery()
)
_IN_ORDER = select(OrderLine.id).where(OrderLine.hold_id == Hold.id).correlate(Hold).exists()


async def _load_holds(
    session: AsyncSession,
    principal: Principal,
    hold_ids: Sequence[int],
    now: datetime,
    *,
    lock: bool,
) -> tuple[list[tuple[Hold, Variant, Product]], dict[int, int]]:
    """The holds (with variant and product) of an order to be, checked; and how many
    variants each product has (a title names the variant only when there is a choice)."""
    ids = sorted(set(hold_ids))
    if len(ids) != len(hold_ids):
        raise PopdropError("invalid_request", "a reservation is listed twice")
    query = (
        select(Hold, Variant, Product, _SIBLINGS, _IN_ORDER)
        .join(Variant, Variant.id == Hold.variant_id)
        .join(Product, Product.id == Variant.product_id)
        .where(Hold.id.in_(ids), Hold.org_id == principal.org_id)
        .order_by(Hold.id)
    )
    if lock:
        query = query.with_for_update(of=Hold)
    rows = list((await session.execute(query)).tuples())
    if len(rows) != len(ids):
        raise not_found("reservation")
    first = rows[0][0]
    for hold, _, _, _, in_order in rows:
        if hold.event_id != first.event_id:
            raise PopdropError("invalid_request", "an order takes reservations of one event")
        if hold.lane_id != first.lane_id:
            raise PopdropError("invalid_request", "an order takes reservations of one lane")
        if hold.slot_id != first.slot_id:
            raise PopdropError(
                "invalid_request", "an order takes reservations of one pickup window"
            )
        if in_order or hold.status == HoldStatus.CONVERTED:
            raise hold_taken()
        if hold.status == HoldStatus.EXPIRED or (
            hold.status == HoldStatus.ACTIVE and hold.expires_at <= now
        ):
            raise PopdropError("hold_expired", "this reservation has expired; reserve again")
        if hold.status != HoldStatus.ACTIVE:
            raise PopdropError("conflict", f"this reservation is {hold.status}")
    siblings = {product.id: int(count or 1) for _, _, product, count, _ in rows}
    return [(h, v, p) for h, v, p, _, _ in rows], siblings


async def _held_prices(
    session: AsyncSession, holds: Sequence[tuple[Hold, Variant, Product]]
) -> dict[int, int]:
    """Each hold's unit price: the lower of the price in effect when it was taken (the
    earliest `product_prices` row ending at or after its `created_at`: a tie goes to the
    earlier price; else the current price) and the current price — a raise never reaches
    an earlier holder, a cut does."""
    product_ids = {product.id for _, _, product in holds}
    history: dict[int, list[tuple[datetime, int]]] = {}
    for product_id, until, price in await session.execute(
        select(ProductPrice.product_id, ProductPrice.until, ProductPrice.price_minor)
        .where(ProductPrice.product_id.in_(product_ids))
        .order_by(ProductPrice.product_id, ProductPrice.until, ProductPrice.id)
    ):
        history.setdefault(product_id, []).append((until, price))
    prices: dict[int, int] = {}
    for hold, _, product in holds:
        held = next(
            (price for until, price in history.get(product.id, []) if until >= hold.created_at),
            product.price_minor,
        )
        prices[hold.id] = min(held, product.price_minor)
    return prices


def _policy(row: CheckoutPolicy | None) -> Policy:
    if row is None:
        return Policy()
    return Policy(
        max_codes=row.max_codes_per_order,
        pay_online=row.pay_online,
        pay_at_pickup=row.pay_at_pickup,
        code_stacking=pricing.Stacking(row.code_stacking),
        code_applies_to=pricing.AppliesTo(row.code_applies_to),
    )


async def _place(
    session: AsyncSession, event_id: int, lane_id: int, slot_id: int | None
) -> tuple[Event, Lane, TimeSlot | None, CheckoutPolicy | None]:
    """The event, lane, slot and checkout policy of the holds, in one round trip."""
    slot_match = TimeSlot.id == slot_id if slot_id is not None else false()
    row = (
        await session.execute(
            select(Event, Lane, TimeSlot, CheckoutPolicy)
            .select_from(Event)
            .join(Lane, Lane.id == lane_id)
            .outerjoin(TimeSlot, slot_match)
            .outerjoin(CheckoutPolicy, CheckoutPolicy.event_id == Event.id)
            .where(Event.id == event_id)
        )
    ).one()
    return row[0], row[1], row[2], row[3]


def _item_title(product: Product, variant: Variant, siblings: int) -> str:
    return f"{product.title} ({variant.name})" if variant.name and siblings > 1 else product.title


async def _match_bundles(
    session: AsyncSession, event_id: int, currency: str, items: list[pricing.Item]
) -> tuple[list[pricing.Item], tuple[pricing.BundleUse, ...], dict[str, int]]:
    """Bundles whose components the holds cover exactly (one hold per component, of its
    variant and quantity), greedily in bundle id order."""
    rows = (
        await session.execute(
            select(Bundle, BundleComponent.variant_id, BundleComponent.qty)
            .join(BundleComponent, BundleComponent.bundle_id == Bundle.id)
            .where(
                Bundle.event_id == event_id,
                Bundle.active.is_(True),
                Bundle.currency == currency,
            )
            .order_by(Bundle.id)
        )
    ).tuples()
    by_id: dict[int, Bundle] = {}
    components: dict[int, list[tuple[int, int]]] = {}
    for bundle_row, variant_id, qty in rows:
        by_id[bundle_row.id] = bundle_row
        components.setdefault(bundle_row.id, []).append((variant_id, qty))
    if not by_id:
        return items, (), {}
    bundles = list(by_id.values())
    free = {item.key: item for item in items}
    uses: list[pricing.BundleUse] = []
    assigned: dict[str, str] = {}
    bundle_ids: dict[str, int] = {}
    for bundle in bundles:
        wanted = sorted(components.get(bundle.id, []))
        if not wanted:
            continue
        while True:
            picked: list[str] = []
            for variant_id, qty in wanted:
                key = next(
                    (
                        k
                        for k, it in sorted(free.items())
                        if k not in picked and it.variant_id == variant_id and it.qty == qty
                    ),
                    None,
                )
                if key is None:
                    break
                picked.append(key)
            if len(picked) != len(wanted):
                break
            use_key = f"b{len(uses) + 1}"
            uses.append(
                pricing.BundleUse(
                    key=use_key,
                    bundle_id=bundle.id,
                    title=bundle.title,
                    price_minor=bundle.price_minor,
                    item_keys=tuple(picked),
                )
            )
            bundle_ids[use_key] = bundle.id
            for key in picked:
                assigned[key] = use_key
                del free[key]
    out = [
        pricing.Item(**{**item.__dict__, "bundle_key": assigned.get(item.key)}) for item in items
    ]
    return out, tuple(uses), bundle_ids


async def _codes(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    typed: Sequence[str],
    *,
    currency: str,
    policy: Policy,
    contact_ref: str | None,
    now: datetime,
) -> tuple[list[pricing.Code], dict[str, str], list[pricing.Refusal]]:
    found: list[pricing.Code] = []
    typed_by_ref: dict[str, str] = {}
    refusals: list[pricing.Refusal] = []
    acting = vault_principal(principal)
    for text in typed:
        try:
            voucher = await vault.validate(
                session, signer, acting, code=text, contact_ref=contact_ref, now=now
            )
        except PopdropError as refusal:
            refusals.append(pricing.Refusal(text, refusal.reason, refusal.message))
            continue
        discount = voucher.discount
        if discount.kind == "fixed" and discount.currency != currency:
            refusals.append(
                pricing.Refusal(text, "wrong_currency", f"this code is in {discount.currency}")
            )
            continue
        ref = str(voucher.id)
        if ref in typed_by_ref:
            refusals.append(pricing.Refusal(text, "duplicate_code", "this code is entered twice"))
            continue
        code = pricing.Code(
            ref=ref,
            label=discount.description or voucher.batch_name,
            kind=pricing.CodeKind(discount.kind),
            value=discount.value,
            stacking=policy.code_stacking,
            applies_to=policy.code_applies_to,
        )
        try:
            pricing.check_code(code)
        except PopdropError as bad:
            refusals.append(pricing.Refusal(text, "no_effect", bad.message))
            continue
        typed_by_ref[ref] = text
        found.append(code)
    return found, typed_by_ref, refusals


async def checkout_of(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    *,
    hold_ids: Sequence[int],
    codes: Sequence[str],
    contact_ref: str | None,
    now: datetime,
    lock: bool = False,
) -> Checkout:
    """The cart of these holds and codes, with everything it is priced from."""
    holds, siblings = await _load_holds(session, principal, hold_ids, now, lock=lock)
    first = holds[0][0]
    event, lane, slot, policy_row = await _place(
        session, first.event_id, first.lane_id, first.slot_id
    )
    currencies = {product.currency for _, _, product in holds}
    if len(currencies) != 1:
        raise PopdropError("invalid_request", "an order is in one currency")
    currency = currencies.pop()
    unit_prices = await _held_prices(session, holds)
    items = [
        pricing.Item(
            key=f"h{hold.id}",
            product_id=product.id,
            variant_id=variant.id,
            title=_item_title(product, variant, siblings.get(product.id, 1)),
            qty=hold.qty,
            unit_price_minor=unit_prices[hold.id],
            unit_cost_minor=product.unit_cost_minor,
            floor_bp=product.margin_floor_bp,
            floor_minor=product.margin_floor_minor,
        )
        for hold, variant, product in holds
    ]
    items, bundles, bundle_ids = await _match_bundles(session, event.id, currency, items)
    rules = [
        row
        for row in await session.scalars(
            select(PriceRule)
            .where(
                PriceRule.event_id == event.id,
                PriceRule.org_id == principal.org_id,
                PriceRule.active.is_(True),
                or_(PriceRule.valid_from.is_(None), PriceRule.valid_from <= now),
                or_(PriceRule.valid_until.is_(None), PriceRule.valid_until > now),
            )
            .order_by(PriceRule.id)
        )
        if _usable_rule(row) and _budget_left(row) != 0
    ]
    policy = _policy(policy_row)
    found, typed_by_ref, refusals = await _codes(
        session, signer, principal, codes, currency=currency, policy=policy,
        contact_ref=contact_ref, now=now,
    )  # fmt: skip
    return Checkout(
        event=event,
        lane=lane,
        slot=slot,
        holds=holds,
        policy=policy,
        currency=currency,
        items=tuple(items),
        bundles=bundles,
        bundle_ids=bundle_ids,
        rules=rules,
        codes=tuple(found),
        typed_by_ref=typed_by_ref,
        refusals=refusals,
    )


def _refusals_out(checkout: Checkout, breakdown: pricing.Breakdown) -> list[RefusalOut]:
    engine = [
        RefusalOut(ref=checkout.typed_by_ref.get(r.ref, r.ref), reason=r.reason, message=r.message)
        for r in breakdown.refused_codes
    ]
    vault_refusals = [
        RefusalOut(ref=r.ref, reason=r.reason, message=r.message) for r in checkout.refusals
    ]
    return vault_refusals + engine


def breakdown_out(data: dict[str, Any]) -> BreakdownOut:
    return BreakdownOut.model_validate(data)


def _window(checkout: Checkout) -> WindowOut:
    if checkout.slot is not None:
        slot = checkout.slot
        return WindowOut(
            slot_id=slot.id, label=slot.label, starts_at=slot.starts_at, ends_at=slot.ends_at
        )
    event = checkout.event
    return WindowOut(slot_id=None, label="", starts_at=event.starts_at, ends_at=event.ends_at)


async def quote(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    *,
    hold_ids: Sequence[int],
    codes: Sequence[str],
    now: datetime,
    contact_ref: str | None = None,
) -> Quote:
    """The price of these holds with these codes, nothing written or consumed."""
    principal.require("orders:write")
    checkout = await checkout_of(
        session, signer, principal, hold_ids=hold_ids, codes=codes, contact_ref=contact_ref, now=now
    )
    budgets = {r.id: _budget_left(r) for r in checkout.rules}
    breakdown = pricing.price(checkout.cart(budgets))
    lane = checkout.lane
    return Quote(
        event_id=checkout.event.id,
        currency=checkout.currency,
        breakdown=breakdown_out(breakdown.to_json()),
        refusals=_refusals_out(checkout, breakdown),
        hold_expires_at=checkout.hold_expires_at,
        lane=LaneOut(id=lane.id, name=lane.name, pickup_point=lane.pickup_point),
        window=_window(checkout),
        payment_methods=checkout.policy.methods(),
        max_codes=checkout.policy.max_codes,
    )


# ---------------------------------------------------------------- place


_rules = table_of(PriceRule)
_SPEND = (
    update(_rules)
    .where(
        _rules.c.id == bindparam("r_id"),
        or_(
            _rules.c.budget_minor.is_(None),
            _rules.c.budget_spent_minor + bindparam("spend") <= _rules.c.budget_minor,
        ),
    )
    .values(budget_spent_minor=_rules.c.budget_spent_minor + bindparam("spend"))
    .returning(_rules.c.id)
)
_UNSPEND = (
    update(_rules)
    .where(_rules.c.id == bindparam("r_id"))
    .values(budget_spent_minor=_rules.c.budget_spent_minor - bindparam("spend"))
)


async def _spend_budgets(session: AsyncSession, spend: dict[int, int]) -> bool:
    """Spend each rule's share; all or nothing (False when a budget ran out meanwhile)."""
    conn = await session.connection()
    done: list[tuple[int, int]] = []
    for rule_id, amount in sorted(spend.items()):
        if amount <= 0:
            continue
        if (await conn.execute(_SPEND, {"r_id": rule_id, "spend": amount})).first() is None:
            for spent_id, spent in done:
                await conn.execute(_UNSPEND, {"r_id": spent_id, "spend": spent})
            return False
        done.append((rule_id, amount))
    return True


async def give_back_budgets(session: AsyncSession, breakdown: dict[str, Any]) -> None:
    """An order that ends unsold gives its rules' spend back to their budgets."""
    conn = await session.connection()
    for rule_id, amount in sorted(dict(breakdown.get("rule_spend", {})).items()):
        if int(amount) > 0:
            await conn.execute(_UNSPEND, {"r_id": int(rule_id), "spend": int(amount)})


def _code_refusal(refusal: pricing.Refusal | RefusalOut, typed: str) -> PopdropError:
    return PopdropError(
        refusal.reason,
        f"code {typed}: {refusal.message}",
        status=REASON_STATUS.get(refusal.reason, 409),
        detail={"code": typed},
    )


async def _priced(session: AsyncSession, checkout: Checkout) -> pricing.Breakdown:
    """Price and spend the rule budgets; a budget another checkout spent meanwhile is read
    again and the cart priced again with what is left."""
    rule_ids = [r.id for r in checkout.rules]
    budgets = {r.id: _budget_left(r) for r in checkout.rules}
    for _ in range(BUDGET_ATTEMPTS):
        breakdown = pricing.price(checkout.cart(budgets))
        if await _spend_budgets(session, dict(breakdown.rule_spend)):
            return breakdown
        fresh = await session.execute(
            select(PriceRule.id, PriceRule.budget_minor, PriceRule.budget_spent_minor)
            .where(PriceRule.id.in_(rule_ids))
            .execution_options(populate_existing=True)
        )
        budgets = {
            rid: (None if budget is None else max(budget - spent, 0))
            for rid, budget, spent in fresh
        }
    raise PopdropError("conflict", "the offers changed while you checked out; try again")


async def place_order(
    session: AsyncSession, signer: Signer, principal: Principal, spec: OrderCreate, *, now: datetime
) -> OrderOut:
    """Place an order from holds (see the module rules). Refusals write nothing."""
    principal.require("orders:write")
    checkout = await checkout_of(
        session, signer, principal, hold_ids=spec.hold_ids, codes=spec.codes,
        contact_ref=spec.contact_ref, now=now, lock=True,
    )  # fmt: skip
    if checkout.refusals:
        first = checkout.refusals[0]
        raise _code_refusal(first, first.ref)
    policy = checkout.policy
    method = PaymentMethod(spec.payment_method)
    if method not in policy.methods():
        raise PopdropError(
            "invalid_request", f"this event does not take {method.value.replace('_', ' ')}"
        )
    breakdown = await _priced(session, checkout)
    if breakdown.refused_codes:
        first_refusal = breakdown.refused_codes[0]
        raise _code_refusal(
            first_refusal, checkout.typed_by_ref.get(first_refusal.ref, first_refusal.ref)
        )
    if spec.expected_total_minor is not None and spec.expected_total_minor != breakdown.total_minor:
        raise PopdropError(
            "price_changed",
            "the price changed since it was shown; check the new total",
            status=409,
            detail={"total_minor": breakdown.total_minor, "shown_minor": spec.expected_total_minor},
        )
    free = breakdown.total_minor == 0
    held_until = checkout.hold_expires_at
    if method is PaymentMethod.PAY_AT_PICKUP and not free:
        held_until = max(held_until, checkout.window_end)
    labels = {code.ref: code.label for code in checkout.codes}
    order = Order(
        org_id=principal.org_id,
        event_id=checkout.event.id,
        status=OrderStatus.PENDING,
        source=spec.source,
        source_ref=spec.source_ref,
        lane_id=checkout.lane.id,
        slot_id=checkout.slot.id if checkout.slot is not None else None,
        contact_ref=spec.contact_ref,
        receipt_email=spec.receipt_email,
        receipt_phone=spec.receipt_phone,
        currency=checkout.currency,
        subtotal_minor=breakdown.subtotal_minor,
        discount_minor=breakdown.discount_minor,
        total_minor=breakdown.total_minor,
        refunded_minor=0,
        breakdown=json.dumps(breakdown.to_json()),
        codes=json.dumps([labels.get(ref, ref) for ref in breakdown.applied_codes]),
        click_ids=json.dumps(spec.click_ids),
        payment_method=PaymentMethod.PAY_AT_PICKUP if free else method,
        short_code=_short_code(),
        pickup_generation=1,
        price_held_until=held_until,
        created_at=now,
        created_by=principal.actor,
    )
    session.add(order)
    try:
        await session.flush()
    except IntegrityError:  # the same short code in this event (40 bits: rare): refuse cleanly
        raise PopdropError("conflict", "please try again") from None
    by_key = {item.key: item for item in checkout.items}
    hold_of = {f"h{hold.id}": hold for hold, _, _ in checkout.holds}
    lines = []
    for line in breakdown.lines:
        item = by_key[line.key]
        lines.append(
            OrderLine(
                org_id=principal.org_id,
                order_id=order.id,
                hold_id=hold_of[line.key].id,
                product_id=item.product_id,
                variant_id=item.variant_id,
                bundle_id=checkout.bundle_ids.get(item.bundle_key) if item.bundle_key else None,
                title=line.title,
                qty=line.qty,
                unit_price_minor=line.unit_price_minor,
                list_minor=line.list_minor,
                discount_minor=line.list_minor - line.final_minor,
                final_minor=line.final_minor,
                unit_cost_minor=item.unit_cost_minor,
                refunded_qty=0,
            )
        )
    session.add_all(lines)
    try:
        await session.flush()
    except IntegrityError:  # a racing checkout put one of these holds in its order first
        raise hold_taken() from None
    acting = vault_principal(principal)
    for ref in breakdown.applied_codes:
        typed = checkout.typed_by_ref[ref]
        try:
            await vault.redeem(
                session, signer, acting, code=typed, contact_ref=spec.contact_ref,
                order_ref=f"order:{order.id}", now=now,
            )  # fmt: skip
        except PopdropError as refusal:
            raise PopdropError(
                refusal.reason,
                f"code {typed}: {refusal.message}",
                status=refusal.status,
                detail={"code": typed, **refusal.detail},
            ) from None
    typed_codes = [checkout.typed_by_ref[ref] for ref in breakdown.applied_codes]
    touches: list[SaleTouch] = []
    if typed_codes or spec.click_ids:  # what brought the sale, while its codes are at hand
        touches = await attribution.attribute_sale(
            session, org_id=principal.org_id, sale_kind="order", sale_id=order.id,
            event_id=order.event_id, amount_minor=order.total_minor, currency=order.currency,
            occurred_at=now, codes=typed_codes, click_ids=spec.click_ids, signer=signer,
        )  # fmt: skip
    hold_units = [  # locked and active: checked above
        units.Unit(h.id, h.stock_id, h.lane_id, h.slot_id, h.qty, h.status)
        for h, _, _ in checkout.holds
    ]
    conn = await session.connection()
    payments: list[Payment] = []
    if free:
        converted = await units.convert_active(session, hold_units, now)
        assert converted, "the holds are locked and active"
        payments.append(
            Payment(
                org_id=principal.org_id,
                order_id=order.id,
                provider=PaymentMethod.PAY_AT_PICKUP,
                amount_minor=0,
                currency=order.currency,
                status=PaymentStatus.SUCCEEDED,
                tender="free",
                created_at=now,
                updated_at=now,
                actor=principal.actor,
            )
        )
        session.add_all(payments)
        order.status = ORDER_LIFECYCLE.check(OrderStatus.PENDING, OrderStatus.PAID)
        order.paid_at = now
    elif method is PaymentMethod.PAY_AT_PICKUP:
        await units.extend_until(conn, hold_units, held_until)
    await session.flush()
    # The funnel, before the commit's late writes of the stock rows (`units`).
    await funnel.record(
        session, signer, order, Kind.CHECKOUT_STARTED, now=now, value=order.total_minor,
        touches=touches,
    )  # fmt: skip
    if free:
        await funnel.record(session, signer, order, Kind.ORDER_PAID, now=now, touches=touches)
    if free or method is PaymentMethod.PAY_AT_PICKUP:  # settled or reserved: the receipt
        await receipts.enqueue_receipt(session, order, now=now)
    return _out(order, lines, payments, [])  # all in hand: no reads back


# ---------------------------------------------------------------- reads


async def order_out(session: AsyncSession, order: Order) -> OrderOut:
    outs = await orders_out(session, [order])
    return outs[0]


async def orders_out(session: AsyncSession, orders: Sequence[Order]) -> list[OrderOut]:
    ids = [o.id for o in orders]
    lines: dict[int, list[OrderLine]] = {}
    payments: dict[int, list[Payment]] = {}
    refunds: dict[int, list[Refund]] = {}
    if ids:
        for line in await session.scalars(
            select(OrderLine).where(OrderLine.order_id.in_(ids)).order_by(OrderLine.id)
        ):
            lines.setdefault(line.order_id, []).append(line)
        for pay in await session.scalars(
            select(Payment).where(Payment.order_id.in_(ids)).order_by(Payment.id)
        ):
            payments.setdefault(pay.order_id, []).append(pay)
        for refund in await session.scalars(
            select(Refund).where(Refund.order_id.in_(ids)).order_by(Refund.id)
        ):
            refunds.setdefault(refund.order_id, []).append(refund)
    return [
        _out(o, lines.get(o.id, []), payments.get(o.id, []), refunds.get(o.id, [])) for o in orders
    ]


def _out(
    o: Order, lines: Sequence[OrderLine], payments: Sequence[Payment], refunds: Sequence[Refund]
) -> OrderOut:
    return OrderOut(
        id=o.id,
        event_id=o.event_id,
        status=OrderStatus(o.status),
        source=o.source,
        source_ref=o.source_ref,
        lane_id=o.lane_id,
        slot_id=o.slot_id,
        contact_ref=o.contact_ref,
        receipt_email=o.receipt_email,
        receipt_phone=o.receipt_phone,
        currency=o.currency,
        subtotal_minor=o.subtotal_minor,
        discount_minor=o.discount_minor,
        total_minor=o.total_minor,
        refunded_minor=o.refunded_minor,
        codes=list(json.loads(o.codes or "[]")),
        payment_method=PaymentMethod(o.payment_method) if o.payment_method else None,
        short_code=format_short_code(o.short_code),
        price_held_until=o.price_held_until,
        created_at=o.created_at,
        paid_at=o.paid_at,
        ready_at=o.ready_at,
        picked_up_at=o.picked_up_at,
        ended_at=o.ended_at,
        status_reason=o.status_reason,
        status_message=o.status_message,
        lines=[OrderLineOut.model_validate(line, from_attributes=True) for line in lines],
        payments=[PaymentOut.model_validate(p, from_attributes=True) for p in payments],
        refunds=[RefundOut.model_validate(r, from_attributes=True) for r in refunds],
        breakdown=breakdown_out(json.loads(o.breakdown)),
    )


def _partner_events(principal: Principal) -> Any:
    """The events a partner user works at (partner rows naming their login, or staffing)."""
    email = partner_email(principal)
    partnered = select(Partner.event_id).where(
        Partner.org_id == principal.org_id, func.lower(Partner.contact_email) == email.lower()
    )
    staffed = (
        select(StaffAssignment.event_id)
        .join(User, User.id == StaffAssignment.user_id)
        .where(StaffAssignment.org_id == principal.org_id, func.lower(User.email) == email.lower())
    )
    return partnered.union(staffed)


def _visible(query: Select[Any], principal: Principal) -> Select[Any]:
    query = query.where(Order.org_id == principal.org_id)
    if principal.role == "partner":
        query = query.where(Order.event_id.in_(_partner_events(principal)))
    return query


def _can_read(principal: Principal) -> None:
    if not ({"orders:read", "orders:write", "orders:pickup"} & principal.scopes):
        principal.require("orders:read")


async def get_order(session: AsyncSession, principal: Principal, order_id: int) -> OrderOut:
    _can_read(principal)
    order = await session.scalar(_visible(select(Order).where(Order.id == order_id), principal))
    if order is None:
        raise not_found("order")
    return await order_out(session, order)


async def list_orders(
    session: AsyncSession,
    principal: Principal,
    *,
    event_id: int | None = None,
    status: OrderStatus | None = None,
    lane_id: int | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[OrderOut]:
    """Newest first; a partner sees its events' orders only."""
    _can_read(principal)
    query = _visible(select(Order), principal)
    if event_id is not None:
        query = query.where(Order.event_id == event_id)
    if status is not None:
        query = query.where(Order.status == status)
    if lane_id is not None:
        query = query.where(Order.lane_id == lane_id)
    if before_id is not None:
        query = query.where(Order.id < before_id)
    rows = list(await session.scalars(query.order_by(Order.id.desc()).limit(limit)))
    return await orders_out(session, rows)


async def sales_summary(session: AsyncSession, principal: Principal, event_id: int) -> SalesSummary:
    """Paid orders, revenue (less refunds) and average checkout value of an event."""
    _can_read(principal)
    if principal.role == "partner":
        allowed = await session.scalar(
            select(Event.id).where(Event.id == event_id, Event.id.in_(_partner_events(principal)))
        )
        if allowed is None:
            raise not_found("event")
    await owned(session, Event, event_id, principal.org_id)
    counts: dict[str, int] = dict(
        list(
            (
                await session.execute(
                    select(Order.status, func.count())
                    .where(Order.org_id == principal.org_id, Order.event_id == event_id)
                    .group_by(Order.status)
                )
            ).tuples()
        )
    )
    sold = [s.value for s in SOLD_STATUSES]
    totals = (
        await session.execute(
            select(
                func.count(),
                func.coalesce(func.sum(Order.total_minor), 0),
                func.coalesce(func.sum(Order.refunded_minor), 0),
                func.min(Order.currency),
            ).where(
                Order.org_id == principal.org_id,
                Order.event_id == event_id,
                Order.status.in_(sold),
            )
        )
    ).one()
    refunded_orders = (
        await session.execute(
            select(
                func.coalesce(func.sum(Order.refunded_minor), 0), func.min(Order.currency)
            ).where(
                Order.org_id == principal.org_id,
                Order.event_id == event_id,
                Order.status == OrderStatus.REFUNDED,
            )
        )
    ).one()
    units_sold = await session.scalar(
        select(func.coalesce(func.sum(OrderLine.qty - OrderLine.refunded_qty), 0))
        .join(Order, Order.id == OrderLine.order_id)
        .where(Order.org_id == principal.org_id, Order.event_id == event_id, Order.status.in_(sold))
    )
    paid, gross, refunded_part, currency = totals
    return SalesSummary(
        event_id=event_id,
        currency=currency or refunded_orders[1],
        paid_orders=int(paid),
        revenue_minor=int(gross) - int(refunded_part),
        average_minor=int(gross) // int(paid) if paid else 0,
        refunded_minor=int(refunded_part) + int(refunded_orders[0]),
        units_sold=int(units_sold or 0),
        by_status={str(k): int(v) for k, v in counts.items()},
    )


async def order_redemptions(session: AsyncSession, org_id: int, order_id: int) -> list[int]:
    """The live voucher redemptions of an order (what a cancel or a refund gives back)."""
    return list(
        await session.scalars(
            select(Redemption.id).where(
                Redemption.org_id == org_id,
                Redemption.order_ref == f"order:{order_id}",
                Redemption.rolled_back_at.is_(None),
            )
        )
    )
