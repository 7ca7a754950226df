"""Receipts: what a customer gets once an order is paid (or reserved to pay at pickup),
by email and by SMS, through the notification outbox.

Rules:
- `enqueue_receipt` runs in the transaction that settled the order: the receipt leaves
  if, and only if, that transaction commits (`outbound.outbox.enqueue`), once per order
  and channel (subject `order:<id>`, kind `order_receipt`): one INSERT, nothing else on
  the checkout's path.
- The row carries only the order id; the text is rendered at send time (`render`, hooked
  into the drainer by `usecases.notify`) from the order as it is then: an order that
  ended meanwhile (cancelled, expired, refunded) sends nothing.
- The email has the lines, discounts, total, the lane and its pickup point, the pickup
  window in the event's time zone (`core.localtime`), the typed pickup code and the
  confirmation link (`links.order_view_url`, which shows the QR, and the QR image
  itself). The SMS is one short text with the window, the code and that link.
- Consent: a receipt answers a purchase, not marketing; the drainer still skips an
  address suppressed for its channel (an opt-out, STOP, a bounce, an erase).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.commerce import pickup
from popdrop.commerce.lifecycle import OrderStatus, PaymentMethod
from popdrop.commerce.models import Order, OrderLine
from popdrop.core import links
from popdrop.core.errors import PopdropError
from popdrop.core.identity import normalize_email, normalize_phone
from popdrop.core.money import Money
from popdrop.core.signing import Signer
from popdrop.events.models import Event, Lane, TimeSlot
from popdrop.outbound import outbox

RECEIPT_NOTICE = "order_receipt"  # the outbox kind
# Ended orders send nothing (a receipt for money given back would confuse).
_SENDABLE = frozenset({OrderStatus.PAID, OrderStatus.READY, OrderStatus.PICKED_UP})


def _deliverable(normalize: Callable[[str], str], raw: str | None) -> str | None:
    """The address as the drainer will read it, or None when it cannot be one (a row the
    drainer cannot parse would fail at every attempt)."""
    if not raw:
        return None
    try:
        return normalize(raw)
    except PopdropError:
        return None


def receipt_notices(order: Order) -> list[outbox.Notice]:
    """The receipt by email and/or SMS, whatever the order gave (addresses that are not
    valid ones are left out)."""
    subject = f"order:{order.id}"
    payload = {"order": order.id}
    points = (
        (outbox.Channel.EMAIL, _deliverable(normalize_email, order.receipt_email)),
        (outbox.Channel.SMS, _deliverable(normalize_phone, order.receipt_phone)),
    )
    return [
        outbox.Notice(order.org_id, RECEIPT_NOTICE, subject, channel, address, payload)
        for channel, address in points
        if address
    ]


async def enqueue_receipt(session: AsyncSession, order: Order, *, now: datetime) -> None:
    """Queue the order's receipt in the caller's transaction (sent after it commits)."""
    await outbox.enqueue(session, receipt_notices(order), now=now)


@dataclass(frozen=True)
class Receipt:
    subject: str  # unused by SMS
    text: str


def _sendable(order: Order) -> bool:
    status = OrderStatus(order.status)
    return status in _SENDABLE or (
        status == OrderStatus.PENDING and order.payment_method == PaymentMethod.PAY_AT_PICKUP
    )


def _money(amount_minor: int, currency: str) -> str:
    return Money(amount_minor, currency).format()


def _discounts(order: Order) -> list[tuple[str, int]]:
    """(name, amount) of every discount on the order, from its stored breakdown."""
    try:
        breakdown = json.loads(order.breakdown or "{}")
        named: dict[str, int] = {}
        for line in breakdown.get("lines", []):
            for adjustment in line.get("adjustments", []):
                amount = int(adjustment.get("amount_minor", 0))
                if amount:
                    name = str(adjustment.get("name") or "Discount")
                    named[name] = named.get(name, 0) + amount
        return list(named.items())
    except (ValueError, TypeError, AttributeError):
        return []


async def render(
    session: AsyncSession,
    org_id: int,
    order_id: int,
    *,
    sms: bool,
    signer: Signer,
    base_url: str,
    now: datetime,
) -> Receipt | None:
    """The receipt of an order as it is now; None when it ended (nothing to send)."""
    found = (
        await session.execute(
            select(Order, Event, Lane)
            .join(Event, Event.id == Order.event_id)
            .join(Lane, Lane.id == Order.lane_id)
            .where(Order.id == order_id, Order.org_id == org_id)
        )
    ).first()
    if found is None:
        return None
    order, event, lane = found
    if not _sendable(order):
        return None
    slot = await session.get(TimeSlot, order.slot_id) if order.slot_id is not None else None
    window = pickup.window_label(event, slot)
    code = pickup.format_code(order.short_code) or f"#{order.id}"
    view_url = links.order_view_url(signer, base_url, order.id, org_id)
    total = _money(order.total_minor, order.currency)
    to_pay = order.status == OrderStatus.PENDING
    where = lane.name + (f" ({lane.pickup_point})" if lane.pickup_point else "")
    if sms:
        state = f"reserved, pay {total} at pickup" if to_pay else f"paid {total}"
        text = (
            f"{event.title}: order {code} {state}. Pick it up at {where}, {window}. "
            f"Your QR: {view_url}"
        )
        return Receipt(subject="", text=text)
    lines = list(
        await session.scalars(
            select(OrderLine).where(OrderLine.order_id == order.id).order_by(OrderLine.id)
        )
    )
    rows = [
        f"  {line.qty} x {line.title}: {_money(line.final_minor, order.currency)}" for line in lines
    ]
    rows += [f"  {name}: -{_money(amount, order.currency)}" for name, amount in _discounts(order)]
    head = (
        f"Your order at {event.title} is reserved: pay {total} when you pick it up."
        if to_pay
        else f"Thank you! Your order at {event.title} is paid."
    )
    text = "\n".join(
        [
            head,
            "",
            f"Order {code}",
            *rows,
            f"  Total: {total}" + (" (to pay at pickup)" if to_pay else " (paid)"),
            "",
            f"Pick it up at: {where}",
            f"When: {window}",
            f"Pickup code: {code}",
            "",
            "Show this QR code at the lane (or tell them the pickup code):",
            view_url,
            f"QR image: {pickup.order_qr_url(base_url, view_url.rsplit('/', 1)[1], 'png')}",
            "",
        ]
    )
    return Receipt(subject=f"Your order {code} at {event.title}", text=text)
