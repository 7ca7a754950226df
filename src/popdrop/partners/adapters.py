"""Provider payloads → `pos.sale.v1` (pure parsing; no I/O).

Each adapter reads only the fields the contract needs from an already verified, decoded
payload; everything else (names, emails, phones, addresses, card details, notes) is never
read, so it is never stored nor logged. An event the contract has no use for (a payment
not completed yet, a refund still pending) becomes an `Ignored` with the reason, which is
recorded against its event id like any other delivery.

Square: `payment.created` / `payment.updated` (`data.object.payment`; Square does not emit
`order.created` for sales made in its Point of Sale app) and `refund.created` /
`refund.updated` (`data.object.refund`); the event id is the top-level `event_id`.
Shopify: topics `orders/create`, `orders/paid` (the order) and `refunds/create` (the
refund); the event id is the `X-Shopify-Event-Id` header (or `X-Shopify-Webhook-Id`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from popdrop.core.errors import PopdropError
from popdrop.core.money import Money
from popdrop.partners.contract import ID_PATTERN as _ID_PATTERN
from popdrop.partners.contract import PaymentMethodType, PosSaleV1


@dataclass(frozen=True)
class Ignored:
    """A verified delivery the contract has no use for; applied once all the same."""

    event_id: str
    topic: str
    reason: str


Parsed = PosSaleV1 | Ignored


def malformed(message: str, detail: dict[str, Any] | None = None) -> PopdropError:
    return PopdropError("malformed", message, detail=detail)


def contract_from(data: dict[str, Any]) -> PosSaleV1:
    """Validate `data` as pos.sale.v1; a refusal names the fields, never their values (a
    bad value may be a customer's data)."""
    try:
        return PosSaleV1.model_validate(data)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) or "(body)" for e in exc.errors()})
        raise malformed("the sale does not match pos.sale.v1", {"fields": fields}) from None


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise malformed(f"{where} is missing or not an object")
    return value


_EVENT_ID = re.compile(_ID_PATTERN)


def _event_id(value: Any) -> str | None:
    """A provider's event id, or None when missing; one that could not be stored (too
    long, odd characters) is malformed, even for an event that is then ignored."""
    text = _text(value)
    if text is not None and not _EVENT_ID.match(text):
        raise malformed("the event id is not a plain id of at most 200 characters")
    return text


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, int | str) and not isinstance(value, bool):
        return str(value)
    return None


# ---------------------------------------------------------------- Square

_SQUARE_SOURCES = {
    "CARD": PaymentMethodType.CARD,
    "CASH": PaymentMethodType.CASH,
    "WALLET": PaymentMethodType.WALLET,
    "BANK_ACCOUNT": PaymentMethodType.BANK,
    "BUY_NOW_PAY_LATER": PaymentMethodType.OTHER,
    "SQUARE_ACCOUNT": PaymentMethodType.WALLET,
    "EXTERNAL": PaymentMethodType.OTHER,
}
SQUARE_PAYMENT_TOPICS = frozenset({"payment.created", "payment.updated"})
SQUARE_REFUND_TOPICS = frozenset({"refund.created", "refund.updated"})


def _square_amount(money: Any, where: str) -> tuple[int, str]:
    money = _dict(money, where)
    amount, currency = money.get("amount"), money.get("currency")
    if not isinstance(amount, int) or isinstance(amount, bool) or not isinstance(currency, str):
        raise malformed(f"{where} needs an integer amount and a currency")
    return amount, currency


def square(body: dict[str, Any]) -> Parsed:
    """A Square webhook notification (already verified) → a sale, a refund or Ignored."""
    event_id = _event_id(body.get("event_id"))
    topic = body.get("type")
    if event_id is None or not isinstance(topic, str):
        raise malformed("a Square notification has `event_id` and `type`")
    merchant = _text(body.get("merchant_id"))
    obj = _dict(_dict(body.get("data"), "data").get("object"), "data.object")
    if topic in SQUARE_PAYMENT_TOPICS:
        payment = _dict(obj.get("payment"), "data.object.payment")
        if payment.get("status") != "COMPLETED":
            return Ignored(event_id, topic, "payment_not_completed")
        amount, currency = _square_amount(payment.get("amount_money"), "amount_money")
        total, _ = (
            _square_amount(payment["total_money"], "total_money")
            if payment.get("total_money")
            else (amount, currency)
        )
        source_type = str(payment.get("source_type") or "")
        method = _SQUARE_SOURCES.get(source_type, PaymentMethodType.OTHER)
        device = payment.get("device_details")
        return contract_from(
            {
                "source": {
                    "provider": "square",
                    "account": merchant,
                    "location": _text(payment.get("location_id")),
                    "device": _text(device.get("device_id")) if isinstance(device, dict) else None,
                },
                "external_id": _text(payment.get("id")),
                "event_id": event_id,
                "kind": "sale",
                "occurred_at": payment.get("created_at"),
                "currency": currency,
                # A payment carries no lines (they live on the order); the total is the sale.
                "lines": [],
                "totals": {"subtotal_minor": amount, "total_minor": total},
                "payment_methods": [method],
                "codes": [],
                "customer_ref": _text(payment.get("customer_id")),
            }
        )
    if topic in SQUARE_REFUND_TOPICS:
        refund = _dict(obj.get("refund"), "data.object.refund")
        if refund.get("status") != "COMPLETED":
            return Ignored(event_id, topic, "refund_not_completed")
        amount, currency = _square_amount(refund.get("amount_money"), "amount_money")
        return contract_from(
            {
                "source": {
                    "provider": "square",
                    "account": merchant,
                    "location": _text(refund.get("location_id")),
                },
                "external_id": _text(refund.get("id")),
                "event_id": event_id,
                "kind": "refund",
                "refunds": _text(refund.get("payment_id")),
                "occurred_at": refund.get("created_at"),
                "currency": currency,
                "totals": {"subtotal_minor": amount, "total_minor": amount},
            }
        )
    return Ignored(event_id, topic[:64], "topic_not_used")


# ---------------------------------------------------------------- Shopify

SHOPIFY_ORDER_TOPICS = frozenset({"orders/create", "orders/paid"})
SHOPIFY_REFUND_TOPIC = "refunds/create"
_SHOPIFY_UNPAID = frozenset({"pending", "authorized", "voided", "expired"})


def _shopify_money(value: Any, currency: str, where: str) -> int:
    if value is None or value == "":
        return 0
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise malformed(f"{where} is not an amount")
    try:
        return Money.parse(str(value), currency).amount_minor
    except PopdropError:
        raise malformed(f"{where} is not an amount in {currency}") from None


def _shopify_method(gateway: str) -> PaymentMethodType:
    name = gateway.lower()
    if "cash" in name:
        return PaymentMethodType.CASH
    if "gift" in name:
        return PaymentMethodType.GIFT_CARD
    if name in {"shopify_payments", "stripe"} or "card" in name:
        return PaymentMethodType.CARD
    if "pay" in name:  # apple pay, shop pay, paypal …
        return PaymentMethodType.WALLET
    return PaymentMethodType.OTHER


def shopify(
    topic: str | None, event_id: str | None, shop: str | None, body: dict[str, Any]
) -> Parsed:
    """A Shopify webhook (already verified): topic and ids from its headers."""
    event_id = _event_id(event_id)
    if not topic or not event_id:
        raise malformed("X-Shopify-Topic and X-Shopify-Event-Id are needed")
    if topic in SHOPIFY_ORDER_TOPICS:
        currency = body.get("currency")
        if not isinstance(currency, str):
            raise malformed("an order has a currency")
        if body.get("financial_status") in _SHOPIFY_UNPAID:
            return Ignored(event_id, topic, "order_not_paid")
        lines = []
        for item in body.get("line_items") or []:
            item = _dict(item, "line_items[]")
            lines.append(
                {
                    "sku": _text(item.get("sku")),
                    "quantity": item.get("quantity"),
                    "unit_price_minor": _shopify_money(item.get("price"), currency, "price"),
                    "discount_minor": _shopify_money(
                        item.get("total_discount"), currency, "total_discount"
                    ),
                }
            )
        codes = [
            c["code"]
            for c in body.get("discount_codes") or []
            if isinstance(c, dict) and isinstance(c.get("code"), str)
        ]
        gateways = [g for g in body.get("payment_gateway_names") or [] if isinstance(g, str)]
        customer = body.get("customer")
        return contract_from(
            {
                "source": {
                    "provider": "shopify",
                    "account": shop,
                    "location": _text(body.get("location_id")),
                    "device": _text(body.get("device_id")),
                },
                "external_id": _text(body.get("id")),
                "event_id": event_id,
                "kind": "sale",
                "occurred_at": body.get("created_at"),
                "currency": currency,
                "lines": lines,
                "totals": {
                    "subtotal_minor": _shopify_money(
                        body.get("subtotal_price"), currency, "subtotal_price"
                    ),
                    "discount_minor": _shopify_money(
                        body.get("total_discounts"), currency, "total_discounts"
                    ),
                    "tax_minor": _shopify_money(body.get("total_tax"), currency, "total_tax"),
                    "total_minor": _shopify_money(body.get("total_price"), currency, "total_price"),
                },
                "payment_methods": sorted({_shopify_method(g) for g in gateways}),
                "codes": codes,
                "customer_ref": _text(customer.get("id")) if isinstance(customer, dict) else None,
            }
        )
    if topic == SHOPIFY_REFUND_TOPIC:
        money = [
            t
            for t in body.get("transactions") or []
            if isinstance(t, dict) and t.get("kind") == "refund" and t.get("status") == "success"
        ]
        if not money:
            return Ignored(event_id, topic, "refund_without_money")
        currency = money[0].get("currency")
        if not isinstance(currency, str):
            raise malformed("a refund transaction has a currency")
        amount = sum(_shopify_money(t.get("amount"), currency, "amount") for t in money)
        return contract_from(
            {
                "source": {"provider": "shopify", "account": shop},
                "external_id": _text(body.get("id")),
                "event_id": event_id,
                "kind": "refund",
                "refunds": _text(body.get("order_id")),
                "occurred_at": body.get("created_at") or body.get("processed_at"),
                "currency": currency,
                "totals": {"subtotal_minor": amount, "total_minor": amount},
            }
        )
    return Ignored(event_id, topic[:64], "topic_not_used")
