"""Payment providers: the interface checkout codes against, and Stripe behind it.

Rules:
- A provider starts a payment (a hosted page the customer is redirected to) and refunds
  one; the *outcome* of a payment never comes back from `start` — it arrives as a signed
  webhook (see `stripe_events`), in any order, possibly twice.
- Every create call carries an idempotency key chosen by the caller (one per order /
  refund), so a retried request never makes a second session or a second refund.
- Money is integer minor units; the currency goes to Stripe in lower case.
- Every provider failure becomes one `ProviderError` (reason `payment_provider_error`)
  that carries the provider's own code (`card_declined`, `amount_too_large`, …) so the
  order and the war room can show why; nothing from the `stripe` library leaks out.
- Stripe is reached through the official `stripe` library; its API base is a setting, so
  tests and `popdrop demo` point it at the local sandbox (`stripe_sandbox`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import stripe

from popdrop.core.errors import PopdropError

if TYPE_CHECKING:
    from popdrop.core.config import Settings


@dataclass(frozen=True)
class PaymentRequest:
    """What to charge for one order."""

    order_id: int
    org_id: int
    amount_minor: int
    currency: str
    description: str
    lines: tuple[tuple[str, int, int], ...]  # (title, quantity, line total in minor units)
    success_url: str
    cancel_url: str
    customer_email: str | None = None
    # When the hosted page stops taking money (Stripe: 30 min to 24 h ahead); None leaves
    # the provider's default (24 h). Settlement knows from it when a payment can no
    # longer come.
    expires_at: datetime | None = None


@dataclass(frozen=True)
class PaymentStart:
    """Where to send the customer: the provider's hosted page for this payment."""

    provider_ref: str  # the Checkout Session id ("cs_…")
    redirect_url: str
    payment_intent: str | None = None  # "pi_…" when the provider already knows it


@dataclass(frozen=True)
class RefundResult:
    provider_ref: str  # the refund id ("re_…")
    status: str  # "succeeded" | "pending" | "failed"
    failure_code: str | None = None


class ProviderError(PopdropError):
    """The payment provider refused or could not be reached.

    `code` is the provider's machine-readable code (Stripe's `error.code`, e.g.
    `card_declined`, `amount_too_large`, or `api_connection_error` when unreachable);
    `decline_code` is set for card declines.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        decline_code: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(
            "payment_provider_error",
            message,
            status=502,
            detail={"provider_code": code, "decline_code": decline_code},
        )
        self.code = code
        self.decline_code = decline_code
        self.http_status = http_status


class PaymentProvider(Protocol):
    name: str

    async def start(self, request: PaymentRequest, *, idempotency_key: str) -> PaymentStart: ...

    async def refund(
        self, *, payment_intent: str, amount_minor: int, reason: str, idempotency_key: str
    ) -> RefundResult: ...


class StripeProvider:
    """Stripe Checkout Sessions (mode=payment) and refunds through the official client.

    The client is made per event loop: its httpx pool belongs to the loop that opened it
    (tests run one loop per test; the app one for its life).
    """

    name = "stripe"

    def __init__(
        self,
        secret_key: str,
        api_base: str = "https://api.stripe.com",
        *,
        timeout_seconds: float = 20.0,
        max_network_retries: int = 2,
    ) -> None:
        self.secret_key = secret_key
        self.api_base = api_base.rstrip("/")
        self.timeout_seconds = timeout_seconds
        self.max_network_retries = max_network_retries
        self._client: stripe.StripeClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> stripe.StripeClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = stripe.StripeClient(
                self.secret_key,
                base_addresses={"api": self.api_base},
                http_client=stripe.HTTPXClient(timeout=self.timeout_seconds),
                # Retries are safe: every create carries the caller's idempotency key.
                max_network_retries=self.max_network_retries,
            )
            self._client_loop = loop
        return self._client

    async def start(self, request: PaymentRequest, *, idempotency_key: str) -> PaymentStart:
        params = checkout_session_params(request)
        try:
            session = await self.client().v1.checkout.sessions.create_async(
                params,  # type: ignore[arg-type]  # a plain dict of the documented params
                {"idempotency_key": idempotency_key},
            )
        except stripe.StripeError as error:
            raise provider_error(error) from error
        if not session.url:
            raise ProviderError("api_error", "Stripe returned a Checkout Session without a url")
        intent = session.payment_intent
        intent_id = intent if isinstance(intent, str) or intent is None else intent.id
        return PaymentStart(
            provider_ref=session.id, redirect_url=session.url, payment_intent=intent_id
        )

    async def refund(
        self, *, payment_intent: str, amount_minor: int, reason: str, idempotency_key: str
    ) -> RefundResult:
        if amount_minor <= 0:
            raise PopdropError("invalid_request", "a refund needs a positive amount")
        params: dict[str, Any] = {
            "payment_intent": payment_intent,
            "amount": amount_minor,
            # Stripe takes only its own three reasons; popdrop's words go in metadata.
            "metadata": {"reason": reason[:500]},
        }
        if reason in STRIPE_REFUND_REASONS:
            params["reason"] = reason
        try:
            refund = await self.client().v1.refunds.create_async(
                params,  # type: ignore[arg-type]
                {"idempotency_key": idempotency_key},
            )
        except stripe.StripeError as error:
            raise provider_error(error) from error
        return RefundResult(
            provider_ref=refund.id,
            status=REFUND_STATUS.get(refund.status or "", "pending"),
            failure_code=getattr(refund, "failure_reason", None),
        )

    async def aclose(self) -> None:
        """Close the HTTP pool (the app calls it at shutdown; tests may)."""
        client, self._client = self._client, None
        if client is not None:
            http_client = client._requestor._client  # the library has no public close
            if http_client is not None:
                await http_client.close_async()  # type: ignore[no-untyped-call]


STRIPE_REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
# Stripe's refund statuses in the three popdrop tells apart.
REFUND_STATUS = {
    "succeeded": "succeeded",
    "pending": "pending",
    "requires_action": "pending",
    "failed": "failed",
    "canceled": "failed",
}


def checkout_session_params(request: PaymentRequest) -> dict[str, Any]:
    """The Checkout Session create params for `request` (Stripe's documented names).

    Each line goes as quantity x unit price when its total divides evenly; otherwise
    (a discount split that leaves a remainder) as one unit of the line total named
    "title x qty", so Stripe's total is exactly popdrop's. When the lines do not add up
    to the amount (an order-level adjustment), one line for the whole amount is sent.
    """
    if request.amount_minor <= 0:
        raise PopdropError("invalid_request", "an online payment needs a positive amount")
    currency = request.currency.lower()
    metadata = {"order_id": str(request.order_id), "org_id": str(request.org_id)}
    lines = [line for line in request.lines if line[1] > 0 and line[2] >= 0]
    if not lines or sum(total for _, _, total in lines) != request.amount_minor:
        lines = [(request.description, 1, request.amount_minor)]
    line_items = []
    for title, quantity, total in lines:
        if total % quantity == 0:
            name, count, unit = title, quantity, total // quantity
        else:
            name, count, unit = f"{title} x {quantity}", 1, total
        line_items.append(
            {
                "quantity": count,
                "price_data": {
                    "currency": currency,
                    "unit_amount": unit,
                    "product_data": {"name": (name or "Item")[:250]},
                },
            }
        )
    params: dict[str, Any] = {
        "mode": "payment",
        "line_items": line_items,
        "success_url": request.success_url,
        "cancel_url": request.cancel_url,
        "client_reference_id": str(request.order_id),
        "metadata": metadata,
        "payment_intent_data": {
            "metadata": metadata,
            "description": request.description[:1000],
        },
    }
    if request.customer_email:
        params["customer_email"] = request.customer_email
    if request.expires_at is not None:
        params["expires_at"] = int(request.expires_at.timestamp())
    return params


def provider_error(error: stripe.StripeError) -> ProviderError:
    """One `ProviderError` for every failure of the stripe library, keeping Stripe's code."""
    body = error.json_body if isinstance(error.json_body, dict) else {}
    detail = body.get("error") if isinstance(body.get("error"), dict) else {}
    decline_code = detail.get("decline_code") if isinstance(detail, dict) else None
    if isinstance(error, stripe.APIConnectionError):
        code = "api_connection_error"
    elif isinstance(error, stripe.AuthenticationError):
        code = error.code or "authentication_error"
    elif isinstance(error, stripe.RateLimitError):
        code = error.code or "rate_limit"
    elif isinstance(error, stripe.IdempotencyError):
        code = error.code or "idempotency_error"
    else:  # an error without a code keeps its type ("invalid_request_error")
        error_type = detail.get("type") if isinstance(detail, dict) else None
        code = error.code or (error_type if isinstance(error_type, str) else None) or "api_error"
    message = error.user_message or str(error) or code
    return ProviderError(
        code,
        f"payment provider: {message}",
        decline_code=decline_code if isinstance(decline_code, str) else None,
        http_status=error.http_status,
    )


def provider_from_settings(settings: Settings) -> StripeProvider | None:
    """The Stripe provider, or None when no secret key is configured (pay at pickup only)."""
    if not settings.stripe_secret_key:
        return None
    return StripeProvider(settings.stripe_secret_key, settings.stripe_api_base)
