"""The life of a POS sale, as data.

    active ──partial refund──▶ partially_refunded ──rest refunded──▶ reversed
       └─────────────────full refund──────────────────────────────────▲

A refund adds to the sale's `refunded_minor`; when that reaches the total the sale is
`reversed` (final). A refund that arrives before its sale waits (`PosRefund.sale_id` is
null) and is applied when the sale arrives.

Pure: no I/O.
"""

from __future__ import annotations

from enum import StrEnum

from popdrop.core.lifecycle import Lifecycle


class PosSaleStatus(StrEnum):
    ACTIVE = "active"
    PARTIALLY_REFUNDED = "partially_refunded"
    REVERSED = "reversed"


POS_SALE_LIFECYCLE: Lifecycle[PosSaleStatus] = Lifecycle(
    "POS sale",
    PosSaleStatus,
    {
        PosSaleStatus.ACTIVE: frozenset({PosSaleStatus.PARTIALLY_REFUNDED, PosSaleStatus.REVERSED}),
        PosSaleStatus.PARTIALLY_REFUNDED: frozenset({PosSaleStatus.REVERSED}),
        PosSaleStatus.REVERSED: frozenset(),
    },
)


def status_after_refund(total_minor: int, refunded_minor: int) -> PosSaleStatus:
    """The status a sale's refunds so far put it in."""
    if refunded_minor <= 0:
        return PosSaleStatus.ACTIVE
    if refunded_minor >= total_minor:
        return PosSaleStatus.REVERSED
    return PosSaleStatus.PARTIALLY_REFUNDED


class PosProvider(StrEnum):
    SQUARE = "square"
    SHOPIFY = "shopify"
    STANDARD = "standard"  # Standard Webhooks carrying pos.sale.v1 as the body
