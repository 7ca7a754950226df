"""Building blocks for order tests: a shop with stock, holds, a Stripe sandbox whose
webhooks go through the app, and a fake provider for tests that skip HTTP."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from popdrop.commerce.payments import PaymentRequest, PaymentStart, RefundResult
from popdrop.commerce.stripe_sandbox import (
    SANDBOX_API_KEY,
    SANDBOX_WEBHOOK_SECRET,
    SandboxEvent,
    StripeSandbox,
)
from popdrop.core.config import Settings
from tests.conftest import SECRET, Tenant
from tests.events.helpers import Shop, make_shop

WEBHOOK = "/api/v1/payments/stripe/webhook"

__all__ = ["Shop", "make_shop"]


def sandbox_settings(database_url: str, tmp_path: Path, sandbox: StripeSandbox) -> Settings:
    """Test settings whose Stripe is the sandbox (for a module's `settings` fixture)."""
    assert sandbox.base_url
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        secret_key=SECRET,
        log_requests=False,
        log_level="WARNING",
        redis_url=None,
        stripe_secret_key=SANDBOX_API_KEY,
        stripe_api_base=sandbox.base_url,
        stripe_webhook_secrets=SANDBOX_WEBHOOK_SECRET,
        _env_file=None,  # type: ignore[call-arg]
    )


async def hold(
    client: httpx.AsyncClient,
    tenant: Tenant,
    shop: Shop,
    *,
    qty: int = 1,
    contact_ref: str | None = None,
    with_slot: bool = False,
) -> int:
    body: dict[str, Any] = {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "qty": qty}
    if contact_ref is not None:
        body["contact_ref"] = contact_ref
    if with_slot:
        body["slot_id"] = shop.slot_id
    response = await client.post("/api/v1/holds", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


async def place(
    client: httpx.AsyncClient, tenant: Tenant, hold_ids: Sequence[int], **extra: Any
) -> httpx.Response:
    body = {"hold_ids": list(hold_ids), **extra}
    return await client.post("/api/v1/orders", json=body, headers=tenant.headers)


async def placed(
    client: httpx.AsyncClient, tenant: Tenant, hold_ids: Sequence[int], **extra: Any
) -> dict[str, Any]:
    response = await place(client, tenant, hold_ids, **extra)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


async def get_order(client: httpx.AsyncClient, tenant: Tenant, order_id: int) -> dict[str, Any]:
    response = await client.get(f"/api/v1/orders/{order_id}", headers=tenant.headers)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def stock_row(client: httpx.AsyncClient, tenant: Tenant, shop: Shop) -> dict[str, int]:
    response = await client.get(
        f"/api/v1/events/{shop.event_id}/availability", headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    [row] = response.json()
    return {k: int(row[k]) for k in ("total", "held", "sold", "available")}


async def start_payment(
    client: httpx.AsyncClient, tenant: Tenant, order_id: int
) -> tuple[str, dict[str, Any]]:
    """POST /orders/{id}/pay; (the Checkout Session id, the answer)."""
    response = await client.post(f"/api/v1/orders/{order_id}/pay", headers=tenant.headers)
    assert response.status_code == 200, response.text
    order = await get_order(client, tenant, order_id)
    session_id = order["payments"][-1]["provider_ref"]
    assert session_id.startswith("cs_")
    data: dict[str, Any] = response.json()
    return session_id, data


async def deliver(
    client: httpx.AsyncClient, sandbox: StripeSandbox, events: Sequence[SandboxEvent]
) -> list[dict[str, Any]]:
    """POST sandbox events to the app's webhook, signed as Stripe signs them."""
    answers = []
    for event in events:
        response = await client.post(
            WEBHOOK,
            content=event.body,
            headers={
                "Stripe-Signature": sandbox.sign(event.body),
                "Content-Type": "application/json",
            },
        )
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


@dataclass
class FakeProvider:
    """A provider without HTTP: a session per idempotency key, refunds always succeed."""

    name: str = "stripe"
    sessions: dict[str, PaymentStart] = field(default_factory=dict)
    refunds: dict[str, RefundResult] = field(default_factory=dict)

    async def start(self, request: PaymentRequest, *, idempotency_key: str) -> PaymentStart:
        if idempotency_key not in self.sessions:
            n = len(self.sessions) + 1
            self.sessions[idempotency_key] = PaymentStart(
                provider_ref=f"cs_fake_{request.order_id}_{n}",
                redirect_url=f"https://pay.example/{n}",
                payment_intent=f"pi_fake_{request.order_id}_{n}",
            )
        return self.sessions[idempotency_key]

    async def refund(
        self, *, payment_intent: str, amount_minor: int, reason: str, idempotency_key: str
    ) -> RefundResult:
        if idempotency_key not in self.refunds:
            self.refunds[idempotency_key] = RefundResult(
                provider_ref=f"re_fake_{len(self.refunds) + 1}", status="succeeded"
            )
        return self.refunds[idempotency_key]
