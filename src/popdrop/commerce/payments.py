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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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
    """Stripe Checkout Sessions (mode=payment) and refunds through the official client."""

    name = "stripe"

    def __init__(self, secret_key: str, api_base: str = "https://api.stripe.com") -> None:
        self.secret_key = secret_key
        self.api_base = api_base.rstrip("/")

    async def start(self, request: PaymentRequest, *, idempotency_key: str) -> PaymentStart:
        raise NotImplementedError

    async def refund(
        self, *, payment_intent: str, amount_minor: int, reason: str, idempotency_key: str
    ) -> RefundResult:
        raise NotImplementedError


def provider_from_settings(settings: Settings) -> StripeProvider | None:
    """The Stripe provider, or None when no secret key is configured (pay at pickup only)."""
    if not settings.stripe_secret_key:
        return None
    return StripeProvider(settings.stripe_secret_key, settings.stripe_api_base)


__all__: list[str] = [
    "PaymentProvider",
    "PaymentRequest",
    "PaymentStart",
    "ProviderError",
    "RefundResult",
    "StripeProvider",
    "provider_from_settings",
]
