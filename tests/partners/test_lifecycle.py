"""A POS sale's statuses: refunds only move it forward, and the amount decides where."""

from __future__ import annotations

import copy

import pytest

from popdrop.core.errors import PopdropError
from popdrop.partners import adapters
from popdrop.partners.adapters import Ignored
from popdrop.partners.contract import PosSaleV1
from popdrop.partners.lifecycle import POS_SALE_LIFECYCLE, PosSaleStatus, status_after_refund
from tests.partners.helpers import SHOPIFY_ORDER, SHOPIFY_REFUND


def test_a_reversed_sale_is_final_and_nothing_goes_back_to_active() -> None:
    assert POS_SALE_LIFECYCLE.terminal == {PosSaleStatus.REVERSED}
    for source, target, allowed in POS_SALE_LIFECYCLE.pairs():
        assert allowed == (target != PosSaleStatus.ACTIVE and source != PosSaleStatus.REVERSED)
    with pytest.raises(PopdropError) as refused:
        POS_SALE_LIFECYCLE.check(PosSaleStatus.REVERSED, PosSaleStatus.ACTIVE)
    assert refused.value.reason == "invalid_transition"


@pytest.mark.parametrize(
    ("refunded", "status"),
    [(0, "active"), (1, "partially_refunded"), (5999, "partially_refunded"), (6000, "reversed")],
)
def test_status_after_refund(refunded: int, status: str) -> None:
    assert status_after_refund(6000, refunded) == status


def test_shopify_unpaid_orders_are_ignored_and_gateways_become_types() -> None:
    pending = {**SHOPIFY_ORDER, "financial_status": "pending"}
    assert adapters.shopify("orders/create", "e1", "shop", pending) == Ignored(
        "e1", "orders/create", "order_not_paid"
    )
    cash = {**SHOPIFY_ORDER, "payment_gateway_names": ["Cash", "shopify_payments", "gift_card"]}
    sale = adapters.shopify("orders/paid", "e2", "shop", cash)
    assert isinstance(sale, PosSaleV1)
    assert [m.value for m in sale.payment_methods] == ["card", "cash", "gift_card"]


def test_a_shopify_refund_without_money_is_ignored() -> None:
    restock_only = copy.deepcopy(SHOPIFY_REFUND)
    restock_only["transactions"] = []
    parsed = adapters.shopify("refunds/create", "e3", "shop", restock_only)
    assert isinstance(parsed, Ignored) and parsed.reason == "refund_without_money"


def test_a_zero_decimal_currency_keeps_whole_units() -> None:
    yen = {
        **SHOPIFY_ORDER,
        "currency": "JPY",
        "subtotal_price": "3980",
        "total_price": "3980",
        "total_discounts": "0",
        "total_tax": "0",
        "line_items": [{"sku": "A", "quantity": 1, "price": "3980", "total_discount": "0"}],
    }
    sale = adapters.shopify("orders/create", "e4", "shop", yen)
    assert isinstance(sale, PosSaleV1) and sale.totals.total_minor == 3980
    with pytest.raises(PopdropError) as refused:
        adapters.shopify("orders/create", "e5", "shop", {**yen, "total_price": "39.80"})
    assert refused.value.reason == "malformed"
