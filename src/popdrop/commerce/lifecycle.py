"""The lives of an order, a payment and a refund, as data.

Order:

    pending ──pay──▶ paid ──ready──▶ ready ──hand out──▶ picked_up
       │               │               │                    │
       ├─cancel─▶ cancelled            └──────refund────────┴─▶ refunded
       └─expire─▶ expired       paid ──refund──▶ refunded

- `pending`: the order holds its units (its holds are active) and waits for a payment,
  or for staff at the lane (pay at pickup: it stays pending until staff mark it paid,
  within the hold's life).
- `paid`: the units are sold (the holds converted in the payment's transaction).
- `ready`: staff set it aside at the lane; `picked_up`: handed out (final unless refunded).
- A partial refund keeps the status and adds to `refunded_minor`; a refund of what is
  left moves the order to `refunded`. `expired`: the hold lapsed with no payment.
- A payment that arrives for an expired or cancelled order takes the units again when
  they are there (`expired → paid`), or is refunded at once (`expired → refunded`), so
  no order is ever paid without its units.

Pure: no I/O; pages and tests import it.
"""

from __future__ import annotations

from enum import StrEnum

from popdrop.core.lifecycle import Lifecycle


class OrderStatus(StrEnum):
    PENDING = "pending"
    PAID = "paid"
    READY = "ready"
    PICKED_UP = "picked_up"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REFUNDED = "refunded"


ORDER_LIFECYCLE: Lifecycle[OrderStatus] = Lifecycle(
    "order",
    OrderStatus,
    {
        OrderStatus.PENDING: frozenset(
            {OrderStatus.PAID, OrderStatus.CANCELLED, OrderStatus.EXPIRED}
        ),
        OrderStatus.PAID: frozenset(
            {OrderStatus.READY, OrderStatus.PICKED_UP, OrderStatus.REFUNDED}
        ),
        OrderStatus.READY: frozenset({OrderStatus.PICKED_UP, OrderStatus.REFUNDED}),
        OrderStatus.PICKED_UP: frozenset({OrderStatus.REFUNDED}),
        # A late payment: units taken again (paid) or the money sent back (refunded).
        OrderStatus.EXPIRED: frozenset({OrderStatus.PAID, OrderStatus.REFUNDED}),
        OrderStatus.CANCELLED: frozenset({OrderStatus.PAID, OrderStatus.REFUNDED}),
        OrderStatus.REFUNDED: frozenset(),
    },
)
# Orders whose units are sold: what pickup, reports and the lane view count.
SOLD_STATUSES = frozenset({OrderStatus.PAID, OrderStatus.READY, OrderStatus.PICKED_UP})


class PaymentStatus(StrEnum):
    PENDING = "pending"  # created at the provider, waiting for the customer
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # with the provider's reason code; the customer may try again
    CANCELED = "canceled"  # the order ended before the customer paid


PAYMENT_LIFECYCLE: Lifecycle[PaymentStatus] = Lifecycle(
    "payment",
    PaymentStatus,
    {
        PaymentStatus.PENDING: frozenset(
            {PaymentStatus.SUCCEEDED, PaymentStatus.FAILED, PaymentStatus.CANCELED}
        ),
        # A failed attempt can still succeed later (a retried card on the same intent).
        PaymentStatus.FAILED: frozenset({PaymentStatus.SUCCEEDED, PaymentStatus.CANCELED}),
        PaymentStatus.SUCCEEDED: frozenset(),
        PaymentStatus.CANCELED: frozenset({PaymentStatus.SUCCEEDED}),
    },
)


class RefundStatus(StrEnum):
    PENDING = "pending"  # asked of the provider, not confirmed yet
    SUCCEEDED = "succeeded"
    FAILED = "failed"


REFUND_LIFECYCLE: Lifecycle[RefundStatus] = Lifecycle(
    "refund",
    RefundStatus,
    {
        RefundStatus.PENDING: frozenset({RefundStatus.SUCCEEDED, RefundStatus.FAILED}),
        RefundStatus.SUCCEEDED: frozenset(),
        RefundStatus.FAILED: frozenset(),
    },
)


class PaymentMethod(StrEnum):
    STRIPE = "stripe"
    PAY_AT_PICKUP = "pay_at_pickup"


class OrderSource(StrEnum):
    CHAT = "chat"  # a chat's checkout link
    WEB = "web"  # the public event page's buy button
    LANE = "lane"  # a host or volunteer at the lane
    API = "api"
