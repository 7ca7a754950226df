"""Settlement: money in (Stripe webhooks, staff at the lane), money out (refunds), and
orders that end unsold (cancel, expiry).

Rules:
- Lock order: the order row, then its hold rows, then stock rows and pickup windows
  (`commerce.units`), then voucher rows (`vouchers.service`), then rule budgets.
- Held units become sold in the transaction that records the payment (`settle_paid`). A
  payment for an order whose holds ended (expired, cancelled) takes the units again when
  the stock has them (`expired → paid`); otherwise the order moves to `refunded` with
  `status_reason = "sold_out_after_expiry"` and the whole payment is refunded through
  the provider. Never an order that is paid and cannot be handed out, never an oversell.
  A second payment for an order already paid is refunded (`duplicate_payment`).
- A code is never spent twice, a rule budget never overspent: a late payment keeps the
  price it was made at, so the order keeps its discounts (voucher uses, rule budget
  spend) for as long as a payment may still come. An order that expires with an online
  payment started (a Stripe payment `pending` or `failed`: "open") gives back its units
  only; its discounts are given back when the last open payment can no longer come:
  Stripe says so (`checkout.session.expired`, `payment_intent.canceled`), or the
  session's own end has passed (`session_expiry`: the session is created with
  `expires_at` = the hold's end, at least 31 min and at most 24 h ahead) plus
  `LAPSE_GRACE` — the worker tick sweeps those (`release_lapsed_payments`), except a
  payment Stripe reported as awaiting an asynchronous outcome. A cancel or a full refund
  gives them back at once. A payment that succeeds after its order's discounts were given
  back is not accepted at that price: the order moves to `refunded` with `status_reason =
  "discount_released"` and the whole payment is refunded (the code may be someone
  else's by then; taking it again is not attempted). An order without codes or budgeted
  rules has nothing to give back and is paid late as before.
- Stripe events are deduplicated by id (`provider_events`, unique per provider): a
  duplicate is acknowledged and changes nothing. Events come in any order: each names an
  outcome (succeeded, failed, canceled, refund), and a move the payment's or the order's
  lifecycle does not allow (failed after succeeded, a second succeeded) is ignored with
  the outcome recorded on the event row, never an error.
- Calls to the provider never run inside a database transaction. A refund is a `Refund`
  row written `pending` with the order's change; `send_pending_refunds` calls the
  provider after the commit with `Idempotency-Key: refund-<id>` (so a retry never
  refunds twice) and records its answer; the worker tick sends whatever a crash left.
  A payment is started the same way: the Checkout Session is created first (key
  `order-<id>-pay-<attempt>`), then recorded.
- Pay at pickup: staff mark the order paid at the lane (cash or their own terminal); its
  refunds are recorded as cash given back (`succeeded` at once).
- An order that ends unsold (cancelled, expired) gives back its held units, its voucher
  uses (`vouchers.service.rollback`) and its price rules' budget spend (when it expired
  with an open payment: later, see above). A full refund does the same, and puts sold
  units back on sale unless they were handed out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal, system_principal
from popdrop.attribution import service as attribution
from popdrop.commerce import funnel, receipts, units
from popdrop.commerce.lifecycle import (
    ORDER_LIFECYCLE,
    PAYMENT_LIFECYCLE,
    REFUND_LIFECYCLE,
    SOLD_STATUSES,
    OrderStatus,
    PaymentMethod,
    PaymentStatus,
    RefundStatus,
)
from popdrop.commerce.models import Order, OrderLine, Payment, ProviderEvent, Refund
from popdrop.commerce.orders import (
    give_back_budgets,
    order_out,
    order_redemptions,
    vault_principal,
)
from popdrop.commerce.payments import PaymentProvider, PaymentRequest, ProviderError
from popdrop.commerce.schemas import OrderOut, PayStart
from popdrop.commerce.stripe_events import (
    REFUND_EVENTS,
    StripeEvent,
)
from popdrop.core import links
from popdrop.core.db import Database, defer_hot_writes, dialect_insert
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.logging import log
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned
from popdrop.inventory.lifecycle import HoldStatus
from popdrop.metrics.kinds import Kind
from popdrop.vouchers import service as vault
from popdrop.vouchers.models import Redemption

STRIPE = PaymentMethod.STRIPE.value
SOLD_OUT_AFTER_EXPIRY = "sold_out_after_expiry"
SOLD_OUT_MESSAGE = (
    "Your payment arrived after your reservation ended, and the items sold out meanwhile. "
    "The full amount is refunded to your card."
)
DISCOUNT_RELEASED = "discount_released"
DISCOUNT_RELEASED_MESSAGE = (
    "Your payment arrived after your order ended and its discount was released to other "
    "customers. The full amount is refunded to your card."
)
EXPIRE_BATCH = 500
# A Checkout Session lives 30 min to 24 h (Stripe's bounds); a minute of margin each
# side for clock skew between us and the provider.
SESSION_MIN = timedelta(minutes=31)
SESSION_MAX = timedelta(hours=24) - timedelta(minutes=1)
# After a session's end, a completion already in flight may still be delivered.
LAPSE_GRACE = timedelta(minutes=15)
OPEN_PAYMENT_STATUSES = (PaymentStatus.PENDING, PaymentStatus.FAILED)

SUCCEEDED_EVENTS = frozenset(
    {
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "payment_intent.succeeded",
    }
)
FAILED_EVENTS = frozenset(
    {"checkout.session.async_payment_failed", "payment_intent.payment_failed"}
)
CANCELED_EVENTS = frozenset({"checkout.session.expired", "payment_intent.canceled"})


@dataclass
class Settled:
    """What applying a provider event (or a payment) did."""

    outcome: str
    order_id: int | None = None
    org_id: int | None = None
    refund_ids: list[int] = field(default_factory=list)


def _system(org_id: int) -> Principal:
    return system_principal(
        org_id, "system:orders", scopes=frozenset({"vouchers:redeem", "vouchers:write"})
    )


async def _lock_order(session: AsyncSession, org_id: int, order_id: int) -> Order:
    return await owned(session, Order, order_id, org_id, lock=True, fresh=True)


async def _units_of_order(session: AsyncSession, order_id: int) -> list[units.Unit]:
    return await units.units_of_order(session, order_id)


async def take_units(session: AsyncSession, order: Order, now: datetime) -> bool:
    """Make the order's units sold: its active holds converted, or, when one of them
    ended, all of them taken again from the stock (all or none)."""
    order_units = await _units_of_order(session, order.id)
    if await units.convert_active(session, order_units, now):
        return True
    conn = await session.connection()
    await units.release_active(conn, order_units, now, status=HoldStatus.EXPIRED)
    return await units.retake(session, order_units, now)


def _refund_row(
    order: Order,
    payment: Payment,
    amount: int,
    *,
    reason: str,
    note: str,
    actor: str,
    now: datetime,
) -> Refund:
    at_lane = payment.provider != STRIPE
    return Refund(
        org_id=order.org_id,
        order_id=order.id,
        payment_id=payment.id,
        amount_minor=amount,
        reason=reason[:64],
        note=(note or ("cash given back at the lane" if at_lane else ""))[:300],
        # Money taken at the lane goes back at the lane: done when recorded.
        status=RefundStatus.SUCCEEDED if at_lane else RefundStatus.PENDING,
        created_at=now,
        actor=actor,
    )


async def _end_unsold(
    session: AsyncSession,
    order: Order,
    target: OrderStatus,
    *,
    reason: str,
    message: str | None,
    acting: Principal,
    now: datetime,
    keep_discounts_while_payment_open: bool = False,
) -> None:
    """Cancel or expire a pending order: holds given back, and its voucher uses and
    budgets — unless asked to keep them while an online payment may still come."""
    order.status = ORDER_LIFECYCLE.check(OrderStatus(order.status), target, action=target.value)
    order.ended_at = now
    order.status_reason = reason[:64]
    order.status_message = message
    conn = await session.connection()
    hold_status = HoldStatus.RELEASED if target is OrderStatus.CANCELLED else HoldStatus.EXPIRED
    await units.release_active(
        conn, await _units_of_order(session, order.id), now, status=hold_status
    )
    if keep_discounts_while_payment_open and await _has_open_payment(session, order.id):
        return  # given back when the payment can no longer come (module rules)
    await _release_discounts(session, order, acting, reason=reason, now=now)


async def _has_open_payment(session: AsyncSession, order_id: int) -> bool:
    """Whether an online payment of the order may still succeed (module rules)."""
    found = await session.scalar(
        select(Payment.id)
        .where(
            Payment.order_id == order_id,
            Payment.provider == STRIPE,
            Payment.status.in_(OPEN_PAYMENT_STATUSES),
        )
        .limit(1)
    )
    return found is not None


async def _release_discounts(
    session: AsyncSession, order: Order, acting: Principal, *, reason: str, now: datetime
) -> None:
    """No payment may come any more: open attempts canceled, codes and budgets back."""
    await session.execute(
        update(Payment)
        .where(Payment.order_id == order.id, Payment.status.in_(OPEN_PAYMENT_STATUSES))
        .values(status=PaymentStatus.CANCELED, updated_at=now)
    )
    await _give_back_codes_and_budgets(session, order, acting, reason=reason, now=now)


async def _has_limited_discounts(session: AsyncSession, order: Order) -> bool:
    """Whether the order's price used something counted: a code's use, a rule budget."""
    if any(int(spent) > 0 for spent in json.loads(order.breakdown).get("rule_spend", {}).values()):
        return True
    redeemed = await session.scalar(
        select(Redemption.id)
        .where(Redemption.org_id == order.org_id, Redemption.order_ref == f"order:{order.id}")
        .limit(1)
    )
    return redeemed is not None


def session_expiry(held_until: datetime, started_at: datetime) -> datetime:
    """When a Checkout Session started at `started_at` stops taking money: the order's
    hold end, within the provider's bounds (30 min to 24 h ahead)."""
    return min(max(held_until, started_at + SESSION_MIN), started_at + SESSION_MAX)


async def _give_back_codes_and_budgets(
    session: AsyncSession, order: Order, acting: Principal, *, reason: str, now: datetime
) -> None:
    for redemption_id in await order_redemptions(session, order.org_id, order.id):
        await vault.rollback(
            session, acting, redemption_id=redemption_id, reason=f"order {reason}"[:200], now=now
        )
    await give_back_budgets(session, json.loads(order.breakdown))


# ---------------------------------------------------------------- cancel, expire


async def cancel_order(
    session: AsyncSession,
    principal: Principal,
    order_id: int,
    *,
    reason: str = "cancelled",
    now: datetime,
) -> OrderOut:
    """Cancel a pending order: its units go back on sale, its codes can be used again."""
    principal.require("orders:write")
    order = await _lock_order(session, principal.org_id, order_id)
    await _end_unsold(
        session, order, OrderStatus.CANCELLED, reason=reason, message=None,
        acting=vault_principal(principal), now=now,
    )  # fmt: skip
    await session.flush()
    return await order_out(session, order)


async def expire_due(db: Database, now: datetime) -> int:
    """Expire pending orders whose price hold has ended (the holds lapsed unpaid); the
    number expired. Safe to run anywhere, any number of times."""
    async with db.reader() as session:
        due = list(
            (
                await session.execute(
                    select(Order.id, Order.org_id)
                    .where(Order.status == OrderStatus.PENDING, Order.price_held_until <= now)
                    .order_by(Order.id)
                    .limit(EXPIRE_BATCH)
                )
            ).tuples()
        )
    expired = 0
    for order_id, org_id in due:

        async def expire(
            session: AsyncSession, order_id: int = order_id, org_id: int = org_id
        ) -> bool:
            order = await _lock_order(session, org_id, order_id)
            if order.status != OrderStatus.PENDING or order.price_held_until > now:
                return False  # paid or changed meanwhile
            await _end_unsold(
                session, order, OrderStatus.EXPIRED, reason="hold_expired",
                message="The reservation ended before the payment arrived.",
                acting=_system(org_id), now=now, keep_discounts_while_payment_open=True,
            )  # fmt: skip
            return True

        if await db.in_transaction(expire):
            expired += 1
    return expired


async def release_lapsed_payments(db: Database, now: datetime) -> int:
    """Give back the codes and budget spend of expired orders whose open payments can no
    longer come (their session ended `LAPSE_GRACE` ago, and Stripe never said it awaits an
    asynchronous outcome); the number of orders released. Safe to run anywhere, any
    number of times: the order row lock decides, and only the last open payment's end
    releases."""
    awaiting = (
        select(ProviderEvent.id)
        .where(
            ProviderEvent.provider == STRIPE,
            ProviderEvent.object_ref == Payment.provider_ref,
            ProviderEvent.outcome == "awaiting_payment",
        )
        .exists()
    )
    async with db.reader() as session:
        candidates = list(
            (
                await session.execute(
                    select(Order.id, Order.org_id, Order.price_held_until, Payment.created_at)
                    .join(Payment, Payment.order_id == Order.id)
                    .where(
                        Order.status == OrderStatus.EXPIRED,
                        Payment.provider == STRIPE,
                        Payment.status.in_(OPEN_PAYMENT_STATUSES),
                        # No session lives less than SESSION_MIN: a cheap first cut.
                        Payment.created_at <= now - SESSION_MIN - LAPSE_GRACE,
                        ~(awaiting & (Payment.status == PaymentStatus.PENDING)),
                    )
                    .order_by(Order.id)
                    .limit(EXPIRE_BATCH)
                )
            ).tuples()
        )
    lapsed: dict[int, int] = {}
    for order_id, org_id, held_until, started_at in candidates:
        if session_expiry(held_until, started_at) + LAPSE_GRACE <= now:
            lapsed[order_id] = org_id
    released = 0
    for order_id, org_id in lapsed.items():

        async def release(
            session: AsyncSession, order_id: int = order_id, org_id: int = org_id
        ) -> bool:
            order = await _lock_order(session, org_id, order_id)
            if order.status != OrderStatus.EXPIRED or not await _has_open_payment(
                session, order.id
            ):
                return False  # paid, or released, meanwhile
            open_payments = list(
                await session.scalars(
                    select(Payment)
                    .where(
                        Payment.order_id == order.id,
                        Payment.status.in_(OPEN_PAYMENT_STATUSES),
                    )
                    .with_for_update()
                    .execution_options(populate_existing=True)
                )
            )
            for payment in open_payments:
                if session_expiry(order.price_held_until, payment.created_at) + LAPSE_GRACE > now:
                    return False  # another attempt may still be paid
                if payment.status == PaymentStatus.PENDING and payment.provider_ref:
                    waiting = await session.scalar(
                        select(ProviderEvent.id)
                        .where(
                            ProviderEvent.provider == STRIPE,
                            ProviderEvent.object_ref == payment.provider_ref,
                            ProviderEvent.outcome == "awaiting_payment",
                        )
                        .limit(1)
                    )
                    if waiting is not None:
                        return False  # an asynchronous method: its outcome will come
            await _release_discounts(
                session, order, _system(org_id), reason="payment_lapsed", now=now
            )
            return True

        if await db.in_transaction(release):
            released += 1
    return released


# ---------------------------------------------------------------- paid


async def _reverse_attribution(session: AsyncSession, order: Order, amount_minor: int) -> None:
    """Money going back takes the same amount off what the order's touches brought."""
    await attribution.reverse_sale(
        session, org_id=order.org_id, sale_kind="order", sale_id=order.id, amount_minor=amount_minor
    )


async def _record_paid(order: Order, now: datetime) -> None:
    order.status = ORDER_LIFECYCLE.check(OrderStatus(order.status), OrderStatus.PAID)
    order.paid_at = now
    order.ended_at = None


async def settle_paid(
    session: AsyncSession,
    order: Order,
    payment: Payment,
    *,
    discounts_held: bool,
    actor: str,
    now: datetime,
    signer: Signer | None = None,
) -> Settled:
    """A payment succeeded (its row already says so): sell the units, or give the money
    back when they are gone or the order's discounts were given back (see the module
    rules). `discounts_held`: the order still counted its codes and budget spend when the
    payment came (`_discounts_held`, read before this payment's row changed). The order
    row is locked."""
    status = OrderStatus(order.status)
    if status in SOLD_STATUSES or status is OrderStatus.REFUNDED:
        # The order was paid by another payment (or refunded since): this money goes back.
        refund = _refund_row(
            order, payment, payment.amount_minor, reason="duplicate_payment",
            note="a second payment for an order already settled", actor=actor, now=now,
        )  # fmt: skip
        session.add(refund)
        await session.flush()
        return Settled("refunded_duplicate_payment", order.id, order.org_id, [refund.id])
    if not discounts_held and await _has_limited_discounts(session, order):
        # The price counted a code's use (or a budget) given back since: it may be someone
        # else's now, so this price is no longer on offer. The money goes back.
        return await _refund_all(
            session, order, payment, reason=DISCOUNT_RELEASED, message=DISCOUNT_RELEASED_MESSAGE,
            note="paid after the order ended; its discount was given back", actor=actor, now=now,
        )  # fmt: skip
    if await take_units(session, order, now):
        await _record_paid(order, now)
        if status is not OrderStatus.PENDING:
            order.status_reason = f"paid_after_{status.value}"
            order.status_message = None
        await session.flush()
        await receipts.enqueue_receipt(session, order, now=now)
        await funnel.record(
            session, signer, order, Kind.ORDER_PAID, now=now, value=payment.amount_minor,
            currency=payment.currency,
        )  # fmt: skip
        return Settled("paid", order.id, order.org_id)
    # The units are gone: the order cannot be handed out, so the money goes back.
    if status is OrderStatus.PENDING:
        await _end_unsold(
            session, order, OrderStatus.EXPIRED, reason=SOLD_OUT_AFTER_EXPIRY,
            message=SOLD_OUT_MESSAGE, acting=_system(order.org_id), now=now,
        )  # fmt: skip
    elif discounts_held:  # ended with a payment open: its discounts are free now
        await _release_discounts(
            session, order, _system(order.org_id), reason=SOLD_OUT_AFTER_EXPIRY, now=now
        )
    return await _refund_all(
        session, order, payment, reason=SOLD_OUT_AFTER_EXPIRY, message=SOLD_OUT_MESSAGE,
        note="paid after the reservation ended; sold out", actor=actor, now=now,
    )  # fmt: skip


async def _refund_all(
    session: AsyncSession,
    order: Order,
    payment: Payment,
    *,
    reason: str,
    message: str,
    note: str,
    actor: str,
    now: datetime,
) -> Settled:
    """An ended order that cannot be sold at this payment: `refunded`, all of it back."""
    order.status = ORDER_LIFECYCLE.check(OrderStatus(order.status), OrderStatus.REFUNDED)
    order.status_reason = reason
    order.status_message = message
    order.ended_at = now
    order.refunded_minor = order.refunded_minor + payment.amount_minor
    await _reverse_attribution(session, order, payment.amount_minor)
    refund = _refund_row(
        order, payment, payment.amount_minor, reason=reason, note=note, actor=actor, now=now
    )
    session.add(refund)
    await session.flush()
    outcome = "refunded_sold_out" if reason == SOLD_OUT_AFTER_EXPIRY else f"refunded_{reason}"
    return Settled(outcome, order.id, order.org_id, [refund.id])


async def _discounts_held(session: AsyncSession, order: Order) -> bool:
    """Whether the order still counts its codes' uses and budget spend: pending, or
    ended while a payment was open (module rules). Read before a payment's row changes."""
    if order.status == OrderStatus.PENDING:
        return True
    return order.status == OrderStatus.EXPIRED and await _has_open_payment(session, order.id)


async def mark_paid_at_lane(
    session: AsyncSession,
    principal: Principal,
    order_id: int,
    *,
    tender: str,
    now: datetime,
    signer: Signer | None = None,
) -> OrderOut:
    """Staff took the money at the lane (cash or their own card terminal)."""
    if not ({"orders:pickup", "orders:write"} & principal.scopes):
        principal.require("orders:pickup")
    if tender not in ("cash", "card"):
        raise PopdropError("invalid_request", "tender: cash or card")
    order = await _lock_order(session, principal.org_id, order_id)
    ORDER_LIFECYCLE.check(OrderStatus(order.status), OrderStatus.PAID, action="mark paid")
    if not await take_units(session, order, now):
        raise PopdropError(
            "sold_out", "the units of this order are gone: take no money", status=409
        )
    session.add(
        Payment(
            org_id=order.org_id,
            order_id=order.id,
            provider=PaymentMethod.PAY_AT_PICKUP,
            amount_minor=order.total_minor,
            currency=order.currency,
            status=PaymentStatus.SUCCEEDED,
            tender=tender,
            created_at=now,
            updated_at=now,
            actor=principal.actor,
        )
    )
    await _record_paid(order, now)
    await session.flush()
    await receipts.enqueue_receipt(session, order, now=now)  # once per order and channel
    await funnel.record(session, signer, order, Kind.ORDER_PAID, now=now, value=order.total_minor)
    return await order_out(session, order)


# ---------------------------------------------------------------- online payment


async def start_online_payment(
    db: Database,
    principal: Principal,
    order_id: int,
    provider: PaymentProvider,
    *,
    signer: Signer,
    base_url: str,
    now: datetime,
) -> PayStart:
    """Create the provider's hosted payment page for a pending order and record the
    attempt. The provider call runs outside any transaction (module rules)."""
    principal.require("orders:write")
    attempts_so_far = (
        select(func.count(Payment.id)).where(Payment.order_id == Order.id).scalar_subquery()
    )
    async with db.reader() as session:
        found = (
            await session.execute(
                select(Order, attempts_so_far).where(
                    Order.id == order_id, Order.org_id == principal.org_id
                )
            )
        ).first()
        if found is None:
            raise not_found("order")
        order, attempts = found[0], int(found[1] or 0)
        if order.status != OrderStatus.PENDING:
            raise ORDER_LIFECYCLE.refusal(OrderStatus(order.status), None, action="pay for")
        if order.price_held_until <= now:
            raise PopdropError("hold_expired", "this order's reservation has ended; order again")
        if order.total_minor <= 0:
            raise PopdropError("conflict", "there is nothing to pay for this order")
        lines = list(
            await session.scalars(
                select(OrderLine).where(OrderLine.order_id == order.id).order_by(OrderLine.id)
            )
        )
    view = links.order_view_url(signer, base_url, order.id, order.org_id)
    request = PaymentRequest(
        order_id=order.id,
        org_id=order.org_id,
        amount_minor=order.total_minor,
        currency=order.currency,
        description=f"Order {order.id}",
        lines=tuple((line.title, line.qty, line.final_minor) for line in lines),
        success_url=view,
        cancel_url=view,
        customer_email=order.receipt_email,
        # The page stops taking money when the hold ends (within the provider's bounds), so
        # a payment's lapse is known and its codes can be given back (module rules).
        expires_at=session_expiry(order.price_held_until, now),
    )
    started = await provider.start(request, idempotency_key=f"order-{order.id}-pay-{attempts + 1}")
    async with db.transaction() as session:
        inserted = await session.execute(
            dialect_insert(db.dialect, Payment)
            .values(
                org_id=order.org_id,
                order_id=order.id,
                provider=STRIPE,
                provider_ref=started.provider_ref,
                payment_intent=started.payment_intent,
                amount_minor=order.total_minor,
                currency=order.currency,
                status=PaymentStatus.PENDING,
                created_at=now,
                updated_at=now,
                actor=principal.actor,
            )
            .on_conflict_do_nothing()
            .returning(Payment.id)
        )
        payment_id = inserted.scalar_one_or_none()
        if payment_id is None:  # the same attempt twice (a double click): one row
            payment_id = await session.scalar(
                select(Payment.id).where(
                    Payment.provider == STRIPE, Payment.provider_ref == started.provider_ref
                )
            )
    assert payment_id is not None
    return PayStart(order_id=order.id, payment_id=payment_id, redirect_url=started.redirect_url)


# ---------------------------------------------------------------- webhooks


async def _payment_of(
    session: AsyncSession, event: StripeEvent, order: Order | None, *, lock: bool
) -> Payment | None:
    """The attempt an event is about: by its session, its intent, or (the intent not
    known yet) the order's latest attempt without one. Locked when asked (the order row
    is locked first, always)."""

    async def first(query: Any) -> Payment | None:
        if lock:
            query = query.with_for_update().execution_options(populate_existing=True)
        found: Payment | None = await session.scalar(query)
        return found

    if event.object_id.startswith("cs_"):
        found = await first(
            select(Payment).where(
                Payment.provider == STRIPE, Payment.provider_ref == event.object_id
            )
        )
        if found is not None:
            return found
    if event.payment_intent:
        found = await first(
            select(Payment).where(
                Payment.provider == STRIPE, Payment.payment_intent == event.payment_intent
            )
        )
        if found is not None:
            return found
    if order is not None:
        return await first(
            select(Payment)
            .where(
                Payment.order_id == order.id,
                Payment.provider == STRIPE,
                Payment.payment_intent.is_(None),
            )
            .order_by(Payment.id.desc())
            .limit(1)
        )
    return None


def _kind(event: StripeEvent) -> str:
    if event.type in SUCCEEDED_EVENTS:
        if event.type == "checkout.session.completed" and event.status not in (
            None, "paid", "no_payment_required",
        ):  # fmt: skip
            return "awaiting"  # an asynchronous method: the outcome comes later
        return "succeeded"
    if event.type in FAILED_EVENTS:
        return "failed"
    if event.type in CANCELED_EVENTS:
        return "canceled"
    if event.type in REFUND_EVENTS:
        return "refund"
    return "ignored"


async def apply_stripe_event(
    session: AsyncSession, event: StripeEvent, *, now: datetime, signer: Signer | None = None
) -> Settled:
    """Apply one verified Stripe event, at most once (see the module rules). Refunds it
    decides are returned for `send_pending_refunds` to send after the commit."""
    inserted = await session.execute(
        dialect_insert(session.get_bind().dialect.name, ProviderEvent)
        .values(
            provider=STRIPE,
            event_id=event.id[:200],
            type=event.type[:100],
            org_id=None,
            object_ref=event.object_id[:200] or None,
            provider_created_at=event.created,
            received_at=now,
            outcome="",
        )
        .on_conflict_do_nothing()
        .returning(ProviderEvent.id)
    )
    row_id = inserted.scalar_one_or_none()
    if row_id is None:
        return Settled("duplicate")
    settled = await _apply(session, event, now, signer)
    await session.execute(
        update(ProviderEvent)
        .where(ProviderEvent.id == row_id)
        .values(outcome=settled.outcome[:64], org_id=settled.org_id)
    )
    return settled


async def _apply(
    session: AsyncSession, event: StripeEvent, now: datetime, signer: Signer | None
) -> Settled:
    kind = _kind(event)
    if kind == "ignored":
        return Settled("ignored_type")
    if kind == "refund":
        return await _apply_refund(session, event, now)
    order: Order | None = None
    if event.order_id is not None and event.org_id is not None:
        order = await session.scalar(
            select(Order)
            .where(Order.id == event.order_id, Order.org_id == event.org_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    if order is None:  # no metadata: find the order through the payment, then lock both
        unlocked = await _payment_of(session, event, None, lock=False)
        if unlocked is not None:
            order = await _lock_order(session, unlocked.org_id, unlocked.order_id)
    if order is None:
        return Settled("unknown_order")
    payment = await _payment_of(session, event, order, lock=True)
    if payment is not None and payment.order_id != order.id:
        return Settled("payment_of_another_order", order.id, order.org_id)
    # Read before this payment's row changes (or is made): see `settle_paid`.
    discounts_held = kind == "succeeded" and await _discounts_held(session, order)
    if payment is None:
        if kind != "succeeded":
            return Settled(f"{kind}_without_payment", order.id, order.org_id)
        # Money arrived for an attempt we never recorded (a crash after the provider call).
        payment = Payment(
            org_id=order.org_id,
            order_id=order.id,
            provider=STRIPE,
            provider_ref=event.object_id if event.object_id.startswith("cs_") else None,
            payment_intent=event.payment_intent,
            amount_minor=event.amount_minor
            if event.amount_minor is not None
            else order.total_minor,
            currency=event.currency or order.currency,
            status=PaymentStatus.PENDING,
            created_at=now,
            updated_at=now,
            actor="stripe",
        )
        session.add(payment)
        await session.flush()
    if payment.payment_intent is None and event.payment_intent:
        payment.payment_intent = event.payment_intent
    current = PaymentStatus(payment.status)
    if kind == "awaiting":
        return Settled("awaiting_payment", order.id, order.org_id)
    if kind == "succeeded":
        if current is PaymentStatus.SUCCEEDED:
            return Settled("already_succeeded", order.id, order.org_id)
        payment.status = PAYMENT_LIFECYCLE.check(current, PaymentStatus.SUCCEEDED)
        payment.updated_at = now
        return await settle_paid(
            session, order, payment, discounts_held=discounts_held, actor="stripe", now=now,
            signer=signer,
        )  # fmt: skip
    target = PaymentStatus.FAILED if kind == "failed" else PaymentStatus.CANCELED
    if current is target and kind == "failed":
        pass  # a later failure of the same attempt: keep its newest reason
    elif not PAYMENT_LIFECYCLE.allows(current, target):
        return Settled(f"ignored_{kind}_after_{current.value}", order.id, order.org_id)
    payment.status = target
    payment.updated_at = now
    if kind == "failed":
        payment.failure_code = (event.failure_code or event.decline_code or "payment_failed")[:64]
        message = event.failure_message or ""
        if event.decline_code and event.decline_code != payment.failure_code:
            message = f"{message} ({event.decline_code})".strip()
        payment.failure_message = message[:300] or None
        await funnel.record(
            session, signer, order, Kind.PAYMENT_FAILED, now=now, value=payment.amount_minor,
            currency=payment.currency, label=payment.failure_code,
        )  # fmt: skip
    elif order.status == OrderStatus.EXPIRED:
        await session.flush()
        if not await _has_open_payment(session, order.id):
            # The last payment that could come will not: the discounts are free again.
            await _give_back_codes_and_budgets(
                session, order, _system(order.org_id), reason="payment_expired", now=now
            )
            return Settled("payment_canceled_discount_released", order.id, order.org_id)
    return Settled(f"payment_{target.value}", order.id, order.org_id)


async def _apply_refund(session: AsyncSession, event: StripeEvent, now: datetime) -> Settled:
    if not event.object_id.startswith("re_"):
        return Settled("refund_noted")
    refund = await session.scalar(
        select(Refund).where(Refund.provider_ref == event.object_id).with_for_update()
    )
    if refund is None:
        return Settled("unknown_refund")
    target = {
        "succeeded": RefundStatus.SUCCEEDED,
        "failed": RefundStatus.FAILED,
        "canceled": RefundStatus.FAILED,
    }.get(event.status or ("failed" if event.type == "refund.failed" else ""))
    current = RefundStatus(refund.status)
    if target is None or target is current or not REFUND_LIFECYCLE.allows(current, target):
        return Settled(f"refund_{current.value}", refund.order_id, refund.org_id)
    refund.status = target
    if target is RefundStatus.FAILED:
        refund.failure_code = (event.failure_code or "refund_failed")[:64]
        await _refund_failed(session, refund)
    return Settled(f"refund_{target.value}", refund.order_id, refund.org_id)


async def handle_stripe_event(
    db: Database,
    event: StripeEvent,
    provider: PaymentProvider | None,
    *,
    now: datetime,
    signer: Signer | None = None,
) -> Settled:
    """Apply an event in its own transaction, then send the refunds it decided."""

    async def work(session: AsyncSession) -> Settled:
        # The stock rows a sale moves are hot: written just before the commit.
        defer_hot_writes(session)
        return await apply_stripe_event(session, event, now=now, signer=signer)

    settled = await db.in_transaction(work)
    if settled.refund_ids and provider is not None:
        await send_pending_refunds(db, provider, now=now, refund_ids=settled.refund_ids)
    return settled


# ---------------------------------------------------------------- refunds


async def refund_order(
    session: AsyncSession,
    principal: Principal,
    order_id: int,
    *,
    amount_minor: int | None,
    reason: str,
    note: str = "",
    now: datetime,
    signer: Signer | None = None,
) -> tuple[OrderOut, list[int]]:
    """Refund part or all of a paid order; the Refund ids to send to the provider after
    the commit (`send_pending_refunds`). A full refund ends the order `refunded`."""
    principal.require("orders:write")
    order = await _lock_order(session, principal.org_id, order_id)
    status = OrderStatus(order.status)
    if status not in SOLD_STATUSES:
        raise ORDER_LIFECYCLE.refusal(status, None, action="refund")
    left = order.total_minor - order.refunded_minor
    amount = left if amount_minor is None else amount_minor
    if amount > left:
        raise PopdropError(
            "invalid_request", f"at most {left} can be refunded", detail={"refundable_minor": left}
        )
    refund_ids: list[int] = []
    if amount > 0:
        payment = await session.scalar(
            select(Payment)
            .where(
                Payment.order_id == order.id,
                Payment.status == PaymentStatus.SUCCEEDED,
                Payment.amount_minor > 0,
            )
            .order_by(Payment.id)
            .limit(1)
        )
        if payment is None:
            raise PopdropError("conflict", "no payment of this order to refund")
        if payment.provider == STRIPE and not payment.payment_intent:
            raise PopdropError("conflict", "the payment is not confirmed by the provider yet")
        refund = _refund_row(
            order, payment, amount, reason=reason, note=note, actor=principal.actor, now=now
        )
        session.add(refund)
        await session.flush()
        if refund.status == RefundStatus.PENDING:
            refund_ids.append(refund.id)
    order.refunded_minor = order.refunded_minor + amount
    await _reverse_attribution(session, order, amount)
    if amount > 0:
        await funnel.record(session, signer, order, Kind.ORDER_REFUNDED, now=now, value=amount)
    if order.refunded_minor >= order.total_minor:
        order.status = ORDER_LIFECYCLE.check(status, OrderStatus.REFUNDED, action="refund")
        order.ended_at = now
        order.status_reason = reason[:64]
        if status is not OrderStatus.PICKED_UP:  # not handed out: back on sale
            conn = await session.connection()
            await units.return_sold(conn, await _units_of_order(session, order.id))
            await session.execute(
                update(OrderLine)
                .where(OrderLine.order_id == order.id)
                .values(refunded_qty=OrderLine.qty)
            )
        await _give_back_codes_and_budgets(
            session, order, vault_principal(principal), reason="refunded", now=now
        )
    await session.flush()
    return await order_out(session, order), refund_ids


async def _refund_failed(session: AsyncSession, refund: Refund) -> None:
    """The provider will not send this money back: a partly refunded order counts it as
    not refunded again (it may be refunded anew); an order already `refunded` (final)
    keeps its status and says so, for the host to settle by hand."""
    order = await _lock_order(session, refund.org_id, refund.order_id)
    if order.status == OrderStatus.REFUNDED:
        order.status_message = (
            f"The refund of {refund.amount_minor} failed at the provider "
            f"({refund.failure_code}); settle it by hand."
        )[:300]
    else:
        order.refunded_minor = max(order.refunded_minor - refund.amount_minor, 0)


async def send_pending_refunds(
    db: Database,
    provider: PaymentProvider,
    *,
    now: datetime,
    refund_ids: Sequence[int] | None = None,
    limit: int = 200,
) -> int:
    """Ask the provider for refunds recorded but not sent yet; the number sent. A refund
    the provider could not be reached for stays pending for the next tick."""
    async with db.reader() as session:
        query = (
            select(Refund.id, Refund.amount_minor, Payment.payment_intent)
            .join(Payment, Payment.id == Refund.payment_id)
            .where(
                Refund.status == RefundStatus.PENDING,
                Refund.provider_ref.is_(None),
                Payment.provider == STRIPE,
            )
            .order_by(Refund.id)
            .limit(limit)
        )
        if refund_ids is not None:
            query = query.where(Refund.id.in_(list(refund_ids)))
        due = list((await session.execute(query)).tuples())
    sent = 0
    for refund_id, amount, payment_intent in due:
        if not payment_intent:
            log.warning("refund waits for its payment intent", refund=refund_id)
            continue
        try:
            result = await provider.refund(
                payment_intent=payment_intent,
                amount_minor=amount,
                reason="requested_by_customer",
                idempotency_key=f"refund-{refund_id}",
            )
        except ProviderError as error:
            final = (
                error.http_status is not None
                and 400 <= error.http_status < 500
                and error.http_status != 429
            )
            log.warning("refund not sent", refund=refund_id, code=error.code, final=final)
            if final:
                async with db.transaction() as session:
                    failed = await session.scalar(
                        select(Refund)
                        .where(Refund.id == refund_id, Refund.status == RefundStatus.PENDING)
                        .with_for_update()
                    )
                    if failed is not None:
                        failed.status = RefundStatus.FAILED
                        failed.failure_code = error.code[:64]
                        await _refund_failed(session, failed)
            continue
        status = {
            "succeeded": RefundStatus.SUCCEEDED,
            "failed": RefundStatus.FAILED,
        }.get(result.status, RefundStatus.PENDING)
        async with db.transaction() as session:
            await session.execute(
                update(Refund)
                .where(Refund.id == refund_id, Refund.provider_ref.is_(None))
                .values(
                    provider_ref=result.provider_ref,
                    status=status,
                    failure_code=(result.failure_code or None),
                )
            )
        sent += 1
    return sent
