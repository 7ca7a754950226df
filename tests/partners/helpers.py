"""Building blocks for POS tests: a partner with till connections, and deliveries signed
the way each provider signs them, from their documented example payloads."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from popdrop.partners.signatures import sign_standard
from tests.conftest import Tenant
from tests.events.helpers import post

SQUARE_KEY = "square-signature-key-abc123"
SHOPIFY_SECRET = "shopify-app-secret-xyz789"
SQUARE_URL = "https://popdrop.example/pos/square/hooks"


@dataclass
class Till:
    event_id: int
    partner_id: int
    square: int
    shopify: int
    standard: int
    standard_secret: str


async def make_till(
    client: httpx.AsyncClient,
    tenant: Tenant,
    now: datetime,
    *,
    slug: str = "pos-pop-up",
    partner_email: str = "till@corner.example",
) -> Till:
    from datetime import timedelta

    event = await post(
        client,
        tenant,
        "/api/v1/events",
        {
            "slug": slug,
            "title": "POS pop-up",
            "timezone": "Europe/Berlin",
            "starts_at": (now + timedelta(days=1)).isoformat(),
            "ends_at": (now + timedelta(days=2)).isoformat(),
        },
    )
    partner = await post(
        client,
        tenant,
        f"/api/v1/events/{event['id']}/partners",
        {"name": "Corner shop", "contact_email": partner_email},
    )
    made = {}
    for provider, extra in (
        ("square", {"secret": SQUARE_KEY, "notification_url": SQUARE_URL}),
        ("shopify", {"secret": SHOPIFY_SECRET}),
        ("standard", {}),
    ):
        made[provider] = await post(
            client,
            tenant,
            "/api/v1/pos/connections",
            {"partner_id": partner["id"], "provider": provider, **extra},
        )
    return Till(
        event["id"],
        partner["id"],
        made["square"]["connection"]["id"],
        made["shopify"]["connection"]["id"],
        made["standard"]["connection"]["id"],
        made["standard"]["secret"],
    )


def _b64_hmac(key: str, message: bytes) -> str:
    return base64.b64encode(hmac.new(key.encode(), message, hashlib.sha256).digest()).decode()


async def send_square(
    client: httpx.AsyncClient, till: Till, body: dict[str, Any], *, key: str = SQUARE_KEY
) -> httpx.Response:
    raw = json.dumps(body).encode()
    signature = _b64_hmac(key, SQUARE_URL.encode() + raw)
    return await client.post(
        f"/pos/square/{till.square}",
        content=raw,
        headers={"content-type": "application/json", "x-square-hmacsha256-signature": signature},
    )


async def send_shopify(
    client: httpx.AsyncClient,
    till: Till,
    topic: str,
    event_id: str,
    body: dict[str, Any],
    *,
    secret: str = SHOPIFY_SECRET,
) -> httpx.Response:
    raw = json.dumps(body).encode()
    return await client.post(
        f"/pos/shopify/{till.shopify}",
        content=raw,
        headers={
            "content-type": "application/json",
            "X-Shopify-Topic": topic,
            "X-Shopify-Hmac-Sha256": _b64_hmac(secret, raw),
            "X-Shopify-Shop-Domain": "corner-shop.myshopify.com",
            "X-Shopify-Event-Id": event_id,
            "X-Shopify-Webhook-Id": f"wh-{event_id}",
            "X-Shopify-API-Version": "2025-04",
        },
    )


async def send_standard(
    client: httpx.AsyncClient,
    till: Till,
    body: dict[str, Any],
    now: datetime,
    *,
    secret: str | None = None,
    webhook_id: str = "msg_1",
    timestamp: int | None = None,
) -> httpx.Response:
    raw = json.dumps(body).encode()
    sent = int(now.timestamp()) if timestamp is None else timestamp
    return await client.post(
        f"/pos/webhooks/{till.standard}",
        content=raw,
        headers={
            "content-type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(sent),
            "webhook-signature": sign_standard(
                secret or till.standard_secret, webhook_id, sent, raw
            ),
        },
    )


# Square's documented `payment.created` / `payment.updated` notification (Payments API
# webhooks reference), trimmed to the fields a POS-app card payment carries.
SQUARE_PAYMENT: dict[str, Any] = {
    "merchant_id": "6SSW7HV8K2ST5",
    "type": "payment.created",
    "event_id": "13b867cf-db3d-4b1c-90b6-2f32a9d78124",
    "created_at": "2020-02-06T21:27:30.792Z",
    "data": {
        "type": "payment",
        "id": "KkAkhdMsgzn59SM8A89WgKwekxLZY",
        "object": {
            "payment": {
                "id": "KkAkhdMsgzn59SM8A89WgKwekxLZY",
                "created_at": "2020-02-06T21:27:30.792Z",
                "updated_at": "2020-02-06T21:27:30.998Z",
                "amount_money": {"amount": 100, "currency": "USD"},
                "total_money": {"amount": 100, "currency": "USD"},
                "approved_money": {"amount": 100, "currency": "USD"},
                "status": "COMPLETED",
                "source_type": "CARD",
                "card_details": {
                    "status": "CAPTURED",
                    "card": {
                        "card_brand": "VISA",
                        "last_4": "1111",
                        "exp_month": 11,
                        "exp_year": 2022,
                        "fingerprint": "sq-1-Hxim77tbdcbGejOejnoAklBVJed2YFLTmirfl8Q5XZzO",
                        "card_type": "DEBIT",
                        "bin": "411111",
                    },
                    "entry_method": "KEYED",
                    "cvv_status": "CVV_ACCEPTED",
                    "avs_status": "AVS_ACCEPTED",
                },
                "location_id": "NAQ1FHV6ZJ8YV",
                "order_id": "03O3USaPaAaFnI6kkwB1JxGgBsUZY",
                "risk_evaluation": {
                    "created_at": "2020-02-06T21:27:30.998Z",
                    "risk_level": "NORMAL",
                },
                "receipt_number": "KkAk",
                "receipt_url": "https://squareup.com/receipt/preview/KkAk",
                "version_token": "TPtNEOBOa6Qq6E3C3IjckSVOM6b3hMbfhjvTxHBQUsB6o",
            }
        },
    },
}

# Square's documented `refund.created` notification.
SQUARE_REFUND: dict[str, Any] = {
    "merchant_id": "6SSW7HV8K2ST5",
    "type": "refund.created",
    "event_id": "bc316346-6691-4243-88ed-6d651a0d0c47",
    "created_at": "2020-02-06T21:27:41.852Z",
    "data": {
        "type": "refund",
        "id": "KkAkhdMsgzn59SM8A89WgKwekxLZY_ptNBVqHYxt5gAdfcobBe4u1AZsXhoz06KTtuq9Ls24P",
        "object": {
            "refund": {
                "id": "KkAkhdMsgzn59SM8A89WgKwekxLZY_ptNBVqHYxt5gAdfcobBe4u1AZsXhoz06KTtuq9Ls24P",
                "created_at": "2020-02-06T21:27:41.836Z",
                "updated_at": "2020-02-06T21:27:41.846Z",
                "amount_money": {"amount": 100, "currency": "USD"},
                "status": "COMPLETED",
                "location_id": "NAQ1FHV6ZJ8YV",
                "order_id": "haOyDuHiqtAXMk0d8pDKXpL7Jg4F",
                "payment_id": "KkAkhdMsgzn59SM8A89WgKwekxLZY",
                "version": 9,
            }
        },
    },
}

# Shopify's documented `orders/create` sample payload (Admin API webhooks reference),
# trimmed, with the customer and address blocks it carries.
SHOPIFY_ORDER: dict[str, Any] = {
    "id": 820982911946154508,
    "admin_graphql_api_id": "gid://shopify/Order/820982911946154508",
    "browser_ip": None,
    "buyer_accepts_marketing": True,
    "contact_email": "jon@example.com",
    "created_at": "2021-12-31T19:00:00-05:00",
    "currency": "USD",
    "current_total_price": "403.00",
    "discount_codes": [{"code": "SPRING-DROP", "amount": "10.00", "type": "fixed_amount"}],
    "email": "jon@example.com",
    "financial_status": "paid",
    "name": "#9999",
    "note": None,
    "payment_gateway_names": ["visa", "bogus"],
    "phone": None,
    "source_name": "pos",
    "location_id": 655441491,
    "subtotal_price": "398.00",
    "total_discounts": "10.00",
    "total_price": "403.00",
    "total_tax": "15.00",
    "billing_address": {
        "first_name": "Steve",
        "address1": "123 Shipping Street",
        "phone": "555-555-SHIP",
        "city": "Shippington",
        "zip": "40003",
        "province": "Kentucky",
        "country": "United States",
        "last_name": "Shipper",
        "name": "Steve Shipper",
    },
    "customer": {
        "id": 115310627314723954,
        "email": "john@example.com",
        "first_name": "John",
        "last_name": "Smith",
        "phone": None,
    },
    "line_items": [
        {
            "id": 866550311766439020,
            "name": "IPod Nano - 8GB",
            "price": "199.00",
            "product_id": 632910392,
            "quantity": 1,
            "sku": "IPOD2008PINK",
            "title": "IPod Nano - 8GB",
            "total_discount": "0.00",
        },
        {
            "id": 141249953214522974,
            "name": "IPod Nano - 8GB",
            "price": "199.00",
            "product_id": 632910392,
            "quantity": 1,
            "sku": "IPOD2008PINK",
            "title": "IPod Nano - 8GB",
            "total_discount": "10.00",
        },
    ],
}

# Shopify's documented `refunds/create` sample payload, trimmed.
SHOPIFY_REFUND: dict[str, Any] = {
    "id": 890088186047892319,
    "order_id": 820982911946154508,
    "created_at": "2021-12-31T19:00:00-05:00",
    "note": "Things were damaged",
    "restock": False,
    "refund_line_items": [],
    "transactions": [
        {
            "id": 1,
            "order_id": 820982911946154508,
            "kind": "refund",
            "gateway": "bogus",
            "status": "success",
            "amount": "100.00",
            "currency": "USD",
        }
    ],
}


def standard_sale(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "contract": "pos.sale.v1",
        "source": {
            "provider": "lightspeed",
            "account": "acct-1",
            "location": "loc-1",
            "device": "till-2",
        },
        "external_id": "S-1001",
        "event_id": "evt-1001",
        "kind": "sale",
        "occurred_at": "2026-12-03T10:15:00+01:00",
        "currency": "EUR",
        "lines": [
            {"sku": "TEE-M", "quantity": 2, "unit_price_minor": 2500, "discount_minor": 500},
            {"sku": "CAP", "quantity": 1, "unit_price_minor": 1500},
        ],
        "totals": {
            "subtotal_minor": 6500,
            "discount_minor": 500,
            "tax_minor": 0,
            "total_minor": 6000,
        },
        "payment_methods": ["card"],
        "codes": ["SPRING-DROP"],
    }
    body.update(changes)
    return body


def square_event(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of a Square notification with top-level or object fields changed."""
    body = copy.deepcopy(base)
    kind = "payment" if "payment" in body["data"]["object"] else "refund"
    for key, value in changes.items():
        if key in ("event_id", "type"):
            body[key] = value
        else:
            body["data"]["object"][kind][key] = value
    return body
