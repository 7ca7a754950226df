"""A local fake Stripe ("the sandbox") that speaks Stripe's wire format.

A dev and test tool, not a service: `StripeProvider` (through the official `stripe`
library, its API base pointed here), the webhook route, the tests and `popdrop demo`
talk to it as they would to api.stripe.com. Never expose it beyond loopback or a LAN
demo: the control endpoints have no authentication.

What it speaks (only what popdrop uses):
- `POST /v1/checkout/sessions` — form-encoded with Stripe's bracket notation
  (`line_items[0][price_data][unit_amount]=1200`), `Authorization: Bearer sk_…`;
  unknown parameters, missing ones and bad integers are refused like Stripe does.
  `GET /v1/checkout/sessions/{id}`, `GET …/{id}/line_items`, `POST …/{id}/expire`.
- `POST /v1/refunds` (`payment_intent` or `charge`, optional `amount`, `reason`,
  `metadata`): more than what is left → HTTP 400 `amount_too_large`, nothing left →
  `charge_already_refunded`. `GET /v1/refunds/{id}`, `GET /v1/payment_intents/{id}`,
  `GET /v1/charges/{id}`.
- `Idempotency-Key`: the first successful answer is stored and replayed for the same key
  and body (`Idempotent-Replayed: true`); the same key with other parameters → 400
  `idempotency_error`. Errors are not stored (Stripe stores only what started executing).
- Errors are Stripe's JSON: `{"error": {"type", "code", "message", "param"}}` with
  Stripe's HTTP statuses (400, 401, 402, 404), so the library raises its own exceptions.
- Objects look like Stripe's (`object`, ids `cs_test_…`, `pi_…`, `ch_…`, `re_…`,
  `evt_…`, amounts in minor units, lower-case currency, `metadata`). As in current
  Stripe, a session's `payment_intent` is null until the customer pays (or is declined).

The hosted page `GET /pay/{session_id}` is a plain HTML form (no JavaScript, fits a
phone) with a card number field and Pay / Decline buttons. Test cards as in Stripe:
4242 4242 4242 4242 pays; 4000 0000 0000 9995 → insufficient_funds,
4000 0000 0000 0002 → generic_decline, 4000 0000 0000 9987 → lost_card,
4000 0000 0000 0069 → expired_card. Pay sends `checkout.session.completed` then
`payment_intent.succeeded` and redirects (303) to `success_url` with
`{CHECKOUT_SESSION_ID}` filled in; a decline sends `payment_intent.payment_failed` with
`last_payment_error` and shows the page again with the message. A refund sends
`charge.refunded` and `refund.updated`; expiring a session sends
`checkout.session.expired`.

Webhooks are signed like Stripe's (`Stripe-Signature: t=…,v1=…`, HMAC-SHA256 of
"t.body" with each configured `whsec_` secret — two during a rotation), re-signed on
every attempt, POSTed with httpx and retried on a non-2xx or a connection error.
Events from the hosted page and the pay control are delivered before the answer (the
customer lands on a paid order); events caused by an API call (refund, expire) are
delivered in the background, because the caller may hold a lock the webhook handler
needs (real Stripe is asynchronous too) — `await sandbox.settle()` waits for them.

Control endpoints for tests (`/_sandbox/…`, JSON): pay / decline / expire a session
without a browser, list events and their deliveries, read one, re-send one (replay),
hold deliveries back and release them in a chosen order, settle a pending refund, and
change the webhook URL or the next refund's status. The same controls exist as methods
on `StripeSandbox` for tests running in its event loop.

Run it: `StripeSandbox.serving()` (async context manager, uvicorn on a loopback port in
the current loop), `StripeSandbox.serving_in_thread()` (its own thread and loop, for a
subprocess app), `serve_sandbox(host, port, webhook_url, secret)` (until cancelled;
what `popdrop demo` uses), or `python -m popdrop.commerce.stripe_sandbox --port 12111
--webhook-url http://127.0.0.1:8000/api/v1/payments/stripe/webhook`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import html
import json
import re
import secrets
import socket
import string
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
import stripe
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from popdrop.core.clock import Clock, SystemClock

SANDBOX_API_KEY = "sk_test_popdrop_sandbox"
SANDBOX_WEBHOOK_SECRET = "whsec_popdrop_sandbox_secret"  # noqa: S105  # a public test value
DEFAULT_RETRY_DELAYS = (0.1, 0.5, 2.0)  # seconds before attempts 2, 3, 4
SESSION_TTL_SECONDS = 24 * 3600  # Stripe's default Checkout Session life
SUCCESS_CARD = "4242424242424242"
# Stripe's test cards that decline: card number → (code, decline_code, message).
DECLINE_CARDS: dict[str, tuple[str, str | None, str]] = {
    "4000000000009995": (
        "card_declined",
        "insufficient_funds",
        "Your card has insufficient funds.",
    ),
    "4000000000000002": ("card_declined", "generic_decline", "Your card was declined."),
    "4000000000009987": ("card_declined", "lost_card", "Your card was declined."),
    "4000000000000069": ("expired_card", None, "Your card has expired."),
}
DECLINE_BUTTON = "4000000000009995"  # the Decline button: insufficient funds

SESSION_PARAMS = frozenset(
    {
        "mode",
        "line_items",
        "success_url",
        "cancel_url",
        "client_reference_id",
        "metadata",
        "payment_intent_data",
        "customer_email",
        "expires_at",
        "expand",
        "payment_method_types",
        "locale",
        "submit_type",
    }
)
INTENT_DATA_PARAMS = frozenset(
    {"metadata", "description", "capture_method", "receipt_email", "statement_descriptor"}
)
REFUND_PARAMS = frozenset({"payment_intent", "charge", "amount", "reason", "metadata", "expand"})
REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})


class StripeApiError(Exception):
    """A refusal answered in Stripe's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        error_type: str = "invalid_request_error",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"type": error_type, "message": message}
        if code:
            self.body["code"] = code
            self.body["doc_url"] = f"https://docs.stripe.com/error-codes/{code.replace('_', '-')}"
        if param:
            self.body["param"] = param
        self.body.update(extra or {})

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body}, status_code=self.status)


def _missing(kind: str, object_id: object, param: str) -> StripeApiError:
    return StripeApiError(
        404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param
    )


@dataclass
class Delivery:
    at: int  # unix seconds (sandbox clock)
    status: int | None  # HTTP status, None on a connection error
    error: str | None = None


@dataclass
class SandboxEvent:
    id: str
    type: str
    created: int
    object_id: str
    body: bytes  # the exact JSON sent (and signed)
    deliveries: list[Delivery] = field(default_factory=list)
    held: bool = False

    @property
    def delivered(self) -> bool:
        return any(d.status is not None and 200 <= d.status < 300 for d in self.deliveries)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "created": self.created,
            "object_id": self.object_id,
            "held": self.held,
            "delivered": self.delivered,
            "deliveries": [
                {"at": d.at, "status": d.status, "error": d.error} for d in self.deliveries
            ],
        }


def decode_form(body: bytes) -> dict[str, Any]:
    """Stripe's form encoding (`a[b][0][c]=v`) back into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(body.decode("utf-8"), keep_blank_values=True):
        parts = re.findall(r"\[([^\[\]]*)\]", key)
        head = key.split("[", 1)[0]
        node = root
        path = [head, *parts]
        for index, part in enumerate(path):
            last = index == len(path) - 1
            if part == "":  # `a[]=v`: append
                part = str(sum(1 for k in node if k.isdigit()))
            if last:
                node[part] = value
            else:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise StripeApiError(400, f"Invalid parameter: {key}", param=key)
                node = child
    result: dict[str, Any] = _lists(root)
    return result


def _lists(node: Any) -> Any:
    """Dicts keyed 0..n-1 become lists (how Stripe encodes arrays)."""
    if not isinstance(node, dict):
        return node
    converted = {key: _lists(value) for key, value in node.items()}
    if converted and all(key.isdigit() for key in converted):
        return [converted[key] for key in sorted(converted, key=int)]
    return converted


def _new_id(prefix: str, length: int = 24) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(length))


def _int_param(params: Mapping[str, Any], name: str, *, label: str | None = None) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    raise StripeApiError(
        400, "Invalid integer: " + str(value), code="parameter_invalid_integer", param=label or name
    )


def _metadata(value: Any, param: str) -> dict[str, str]:
    if value is None or value == "":
        return {}
    if not isinstance(value, dict) or len(value) > 50:
        raise StripeApiError(400, "Invalid metadata", code="parameter_invalid_empty", param=param)
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > 40 or len(item) > 500:
            raise StripeApiError(400, f"Invalid metadata value for {key}", param=f"{param}[{key}]")
    return dict(value)


def _unknown(params: Mapping[str, Any], allowed: frozenset[str], prefix: str = "") -> None:
    for key in params:
        if key not in allowed:
            name = f"{prefix}[{key}]" if prefix else key
            raise StripeApiError(
                400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name
            )


class StripeSandbox:
    """The fake Stripe: its state, its ASGI `app`, its controls and its webhook sender."""

    def __init__(
        self,
        *,
        api_key: str = SANDBOX_API_KEY,
        webhook_secrets: Sequence[str] = (SANDBOX_WEBHOOK_SECRET,),
        webhook_url: str | None = None,
        clock: Clock | None = None,
        public_url: str | None = None,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        webhook_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`webhook_transport`: send webhooks through it instead of the network, e.g.
        `httpx.ASGITransport(app)` for an app under test without a server (then any
        `webhook_url` host works, e.g. http://testserver/api/v1/payments/stripe/webhook)."""
        self.api_key = api_key
        self.webhook_transport = webhook_transport
        self.webhook_secrets = list(webhook_secrets)
        self.webhook_url = webhook_url
        self.clock: Clock = clock or SystemClock()
        self.public_url = public_url.rstrip("/") if public_url else None
        self.retry_delays = tuple(retry_delays)
        self.base_url: str | None = None  # set by serving()
        self.hold_webhooks = False  # True: events are recorded, not sent, until released
        self.refund_status = "succeeded"  # the status new refunds get ("pending" to test)
        self.sessions: dict[str, dict[str, Any]] = {}
        self.line_items: dict[str, list[dict[str, Any]]] = {}
        self.intent_data: dict[str, dict[str, Any]] = {}  # session id → payment_intent_data
        self.intents: dict[str, dict[str, Any]] = {}
        self.charges: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.events: list[SandboxEvent] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every API call
        self._idempotent: dict[str, tuple[str, bytes, int, bytes]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self.app = Starlette(routes=self._routes())

    # ---- time and ids -------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock.now().timestamp())

    # ---- the API (Stripe's wire format) -------------------------------------------

    def _routes(self) -> list[Route]:
        return [
            Route("/v1/checkout/sessions", self._api(self._create_session), methods=["POST"]),
            Route("/v1/checkout/sessions/{id}", self._api(self._get_session), methods=["GET"]),
            Route(
                "/v1/checkout/sessions/{id}/line_items",
                self._api(self._get_line_items),
                methods=["GET"],
            ),
            Route(
                "/v1/checkout/sessions/{id}/expire",
                self._api(self._expire_session_api),
                methods=["POST"],
            ),
            Route("/v1/payment_intents/{id}", self._api(self._get_intent), methods=["GET"]),
            Route("/v1/charges/{id}", self._api(self._get_charge), methods=["GET"]),
            Route("/v1/refunds", self._api(self._create_refund), methods=["POST"]),
            Route("/v1/refunds/{id}", self._api(self._get_refund), methods=["GET"]),
            Route("/pay/{id}", self._page, methods=["GET", "POST"]),
            Route("/_sandbox/sessions/{id}/pay", self._control_pay, methods=["POST"]),
            Route("/_sandbox/sessions/{id}/decline", self._control_decline, methods=["POST"]),
            Route("/_sandbox/sessions/{id}/expire", self._control_expire, methods=["POST"]),
            Route("/_sandbox/events", self._control_events, methods=["GET"]),
            Route("/_sandbox/events/{id}", self._control_event, methods=["GET"]),
            Route("/_sandbox/events/{id}/send", self._control_send, methods=["POST"]),
            Route("/_sandbox/hold", self._control_hold, methods=["POST"]),
            Route("/_sandbox/release", self._control_release, methods=["POST"]),
            Route("/_sandbox/refunds/{id}/settle", self._control_settle_refund, methods=["POST"]),
            Route("/_sandbox/config", self._control_config, methods=["POST"]),
        ]

    def _api(self, handler: Callable[[Request, dict[str, Any]], Any]) -> Callable[[Request], Any]:
        """Auth, form decoding, idempotency and Stripe's error shape around one endpoint."""

        async def endpoint(request: Request) -> Response:
            self.requests.append((request.method, request.url.path))
            if not self._authorized(request):
                given = _bearer(request) or ""
                return StripeApiError(
                    401,
                    f"Invalid API Key provided: {given[:8]}****{given[-4:]}",
                    error_type="invalid_request_error",
                ).response()
            body = await request.body()
            key = request.headers.get("idempotency-key")
            route = f"{request.method} {request.url.path}"
            if request.method == "POST" and key:
                stored = self._idempotent.get(key)
                if stored is not None:
                    if (stored[0], stored[1]) != (route, body):
                        return StripeApiError(
                            400,
                            "Keys for idempotent requests can only be used with the same "
                            "parameters they were first used with. Try using a key other "
                            f"than '{key}' if you meant to execute a different request.",
                            error_type="idempotency_error",
                        ).response()
                    return Response(
                        stored[3],
                        status_code=stored[2],
                        media_type="application/json",
                        headers={"Idempotent-Replayed": "true", "Idempotency-Key": key},
                    )
            try:
                params = decode_form(body) if request.method == "POST" else {}
                result = await handler(request, params)
            except StripeApiError as error:
                return error.response()
            payload = json.dumps(result).encode()
            headers = {"Request-Id": _new_id("req_", 14)}
            if request.method == "POST" and key:
                self._idempotent[key] = (route, body, 200, payload)
                headers["Idempotency-Key"] = key
            return Response(payload, media_type="application/json", headers=headers)

        return endpoint

    def _authorized(self, request: Request) -> bool:
        given = _bearer(request)
        return given is not None and hmac.compare_digest(given, self.api_key)

    async def _create_session(self, request: Request, params: dict[str, Any]) -> dict[str, Any]:
        _unknown(params, SESSION_PARAMS)
        mode = params.get("mode")
        if not mode:
            raise StripeApiError(
                400, "Missing required param: mode.", code="parameter_missing", param="mode"
            )
        if mode != "payment":
            raise StripeApiError(
                400, f"The sandbox only knows mode=payment, not {mode}", param="mode"
            )
        for name in ("success_url",):
            if not params.get(name):
                raise StripeApiError(
                    400, f"Missing required param: {name}.", code="parameter_missing", param=name
                )
        items = params.get("line_items")
        if not isinstance(items, list) or not items:
            raise StripeApiError(
                400,
                "Missing required param: line_items.",
                code="parameter_missing",
                param="line_items",
            )
        lines, currency = self._line_items(items)
        total = sum(line["amount_total"] for line in lines)
        if total <= 0:
            raise StripeApiError(
                400,
                "The Checkout Session's total amount due must be greater than zero.",
                code="amount_too_small",
                param="line_items",
            )
        intent_data = params.get("payment_intent_data") or {}
        if not isinstance(intent_data, dict):
            raise StripeApiError(400, "Invalid object", param="payment_intent_data")
        _unknown(intent_data, INTENT_DATA_PARAMS, "payment_intent_data")
        intent_data = {
            **intent_data,
            "metadata": _metadata(intent_data.get("metadata"), "payment_intent_data[metadata]"),
        }
        now = self._now()
        expires_at = _int_param(params, "expires_at") or now + SESSION_TTL_SECONDS
        if not now + 1800 <= expires_at <= now + SESSION_TTL_SECONDS:
            raise StripeApiError(
                400,
                "The `expires_at` timestamp must be between 30 minutes and 24 hours from "
                "Checkout Session creation.",
                code="parameter_invalid_integer",
                param="expires_at",
            )
        session_id = _new_id("cs_test_", 40)
        base = self.public_url or str(request.base_url).rstrip("/")
        session = {
            "id": session_id,
            "object": "checkout.session",
            "amount_subtotal": total,
            "amount_total": total,
            "cancel_url": params.get("cancel_url"),
            "client_reference_id": params.get("client_reference_id") or None,
            "created": now,
            "currency": currency,
            "customer": None,
            "customer_details": None,
            "customer_email": params.get("customer_email") or None,
            "expires_at": expires_at,
            "livemode": False,
            "locale": params.get("locale"),
            "metadata": _metadata(params.get("metadata"), "metadata"),
            "mode": "payment",
            "payment_intent": None,
            "payment_method_types": ["card"],
            "payment_status": "unpaid",
            "status": "open",
            "success_url": params["success_url"],
            "url": f"{base}/pay/{session_id}",
        }
        self.sessions[session_id] = session
        self.line_items[session_id] = lines
        self.intent_data[session_id] = intent_data
        return session

    def _line_items(self, items: list[Any]) -> tuple[list[dict[str, Any]], str]:
        lines: list[dict[str, Any]] = []
        currencies: set[str] = set()
        for index, item in enumerate(items):
            label = f"line_items[{index}]"
            if not isinstance(item, dict):
                raise StripeApiError(400, "Invalid object", param=label)
            _unknown(item, frozenset({"quantity", "price_data", "price"}), label)
            if "price" in item:
                raise StripeApiError(
                    400,
                    f"No such price: '{item['price']}'",
                    code="resource_missing",
                    param=f"{label}[price]",
                )
            quantity = _int_param(item, "quantity", label=f"{label}[quantity]")
            if quantity is None or quantity < 1:
                raise StripeApiError(
                    400,
                    "Quantity must be at least 1.",
                    code="parameter_invalid_integer",
                    param=f"{label}[quantity]",
                )
            price = item.get("price_data")
            if not isinstance(price, dict):
                raise StripeApiError(
                    400,
                    f"Missing required param: {label}[price_data].",
                    code="parameter_missing",
                    param=f"{label}[price_data]",
                )
            _unknown(
                price,
                frozenset({"currency", "unit_amount", "product_data"}),
                f"{label}[price_data]",
            )
            currency = str(price.get("currency") or "")
            if not re.fullmatch(r"[a-z]{3}", currency):
                raise StripeApiError(
                    400,
                    f"Invalid currency: {currency}",
                    code="parameter_invalid_string",
                    param=f"{label}[price_data][currency]",
                )
            unit = _int_param(price, "unit_amount", label=f"{label}[price_data][unit_amount]")
            if unit is None or unit < 0:
                raise StripeApiError(
                    400,
                    "unit_amount must be a non-negative integer",
                    code="parameter_invalid_integer",
                    param=f"{label}[price_data][unit_amount]",
                )
            product = price.get("product_data")
            name = product.get("name") if isinstance(product, dict) else None
            if not name:
                raise StripeApiError(
                    400,
                    f"Missing required param: {label}[price_data][product_data][name].",
                    code="parameter_missing",
                    param=f"{label}[price_data][product_data][name]",
                )
            currencies.add(currency)
            lines.append(
                {
                    "id": _new_id("li_"),
                    "object": "item",
                    "amount_subtotal": unit * quantity,
                    "amount_total": unit * quantity,
                    "currency": currency,
                    "description": name,
                    "quantity": quantity,
                    "price": {"object": "price", "unit_amount": unit, "currency": currency},
                }
            )
        if len(currencies) != 1:
            raise StripeApiError(400, "All line items must share one currency.", param="line_items")
        return lines, currencies.pop()

    def _session(self, session_id: str) -> dict[str, Any]:
        session = self.sessions.get(session_id)
        if session is None:
            raise _missing("checkout.session", session_id, "session")
        return session

    async def _get_session(self, request: Request, params: dict[str, Any]) -> dict[str, Any]:
        return self._session(request.path_params["id"])

    async def _get_line_items(self, request: Request, params: dict[str, Any]) -> dict[str, Any]:
        session = self._session(request.path_params["id"])
        return {
            "object": "list",
            "data": self.line_items[session["id"]],
            "has_more": False,
            "url": f"/v1/checkout/sessions/{session['id']}/line_items",
        }

    async def _expire_session_api(self, request: Request, params: dict[str, Any]) -> dict[str, Any]:
        session = self._session(request.path_params["id"])
        self.expire_session(session["id"], background=True)
        return session

    async def _get_intent(self, request: Request, params: dict[str, Any]) -> dict[str, Any]:
        intent = self.intents.get(request.path_params["id"])
        if intent is None:
            raise _missing("payment_intent", request.path_params["id"], "intent")
        return intent

    async def _get_charge(self, request: Request, params: dict[str, Any]) -> dict[str, Any]:
        charge = self.charges.get(request.path_params["id"])
        if charge is None:
            raise _missing("charge", request.path_params["id"], "charge")
        return charge

    async def _get_refund(self, request: Request, params: dict[str, Any]) -> dict[str, Any]:
        refund = self.refunds.get(request.path_params["id"])
        if refund is None:
            raise _missing("refund", request.path_params["id"], "refund")
        return refund

    async def _create_refund(self, request: Request, params: dict[str, Any]) -> dict[str, Any]:
        _unknown(params, REFUND_PARAMS)
        charge = self._refundable_charge(params)
        left = charge["amount"] - charge["amount_refunded"]
        if left <= 0:
            raise StripeApiError(
                400,
                f"Charge {charge['id']} has already been refunded.",
                code="charge_already_refunded",
            )
        amount = _int_param(params, "amount")
        if amount is None:
            amount = left
        if amount <= 0:
            raise StripeApiError(
                400,
                "Invalid positive integer",
                code="parameter_invalid_integer",
                param="amount",
            )
        if amount > left:
            raise StripeApiError(
                400,
                f"Refund amount ({amount} {charge['currency']}) is greater than unrefunded "
                f"amount on charge ({left} {charge['currency']})",
                code="amount_too_large",
                param="amount",
            )
        reason = params.get("reason") or None
        if reason is not None and reason not in REFUND_REASONS:
            raise StripeApiError(
                400,
                "Invalid reason: must be one of duplicate, fraudulent, or requested_by_customer",
                param="reason",
            )
        refund = {
            "id": _new_id("re_"),
            "object": "refund",
            "amount": amount,
            "charge": charge["id"],
            "created": self._now(),
            "currency": charge["currency"],
            "failure_reason": None,
            "metadata": {**charge["metadata"], **_metadata(params.get("metadata"), "metadata")},
            "payment_intent": charge["payment_intent"],
            "reason": reason,
            "status": self.refund_status,
        }
        self.refunds[refund["id"]] = refund
        # The money is counted as refunded at once (Stripe does the same for pending
        # refunds); a failed refund gives it back.
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
        charge["refunds"]["data"].insert(0, refund)
        charge["refunds"]["total_count"] += 1
        self._emit_later(
            [self._event("charge.refunded", charge), self._event("refund.updated", refund)]
        )
        return refund

    def _refundable_charge(self, params: Mapping[str, Any]) -> dict[str, Any]:
        if params.get("charge"):
            charge = self.charges.get(str(params["charge"]))
            if charge is None:
                raise _missing("charge", params["charge"], "charge")
            return charge
        intent_id = params.get("payment_intent")
        if not intent_id:
            raise StripeApiError(
                400,
                "One of the following params should be provided for this request: "
                "payment_intent or charge.",
                code="parameter_missing",
                param="payment_intent",
            )
        intent = self.intents.get(str(intent_id))
        if intent is None:
            raise _missing("payment_intent", intent_id, "payment_intent")
        if intent["status"] != "succeeded" or not intent["latest_charge"]:
            raise StripeApiError(
                400,
                f"This PaymentIntent ({intent_id}) does not have a successful charge to refund.",
                code="payment_intent_unexpected_state",
                param="payment_intent",
            )
        return self.charges[intent["latest_charge"]]

    # ---- what the customer (or a test) does ------------------------------------------

    def _intent_for(self, session: dict[str, Any]) -> dict[str, Any]:
        """The session's PaymentIntent, made on the first attempt to pay (as Stripe does)."""
        if session["payment_intent"]:
            return self.intents[session["payment_intent"]]
        data = self.intent_data.get(session["id"], {})
        intent = {
            "id": _new_id("pi_"),
            "object": "payment_intent",
            "amount": session["amount_total"],
            "amount_received": 0,
            "capture_method": "automatic",
            "created": self._now(),
            "currency": session["currency"],
            "description": data.get("description"),
            "last_payment_error": None,
            "latest_charge": None,
            "livemode": False,
            "metadata": dict(data.get("metadata") or {}),
            "payment_method_types": ["card"],
            "status": "requires_payment_method",
        }
        self.intents[intent["id"]] = intent
        session["payment_intent"] = intent["id"]
        return intent

    def _open_session(self, session_id: str) -> dict[str, Any]:
        session = self._session(session_id)
        if session["status"] == "open" and session["expires_at"] <= self._now():
            self.expire_session(session_id, background=True)
        if session["status"] != "open":
            raise StripeApiError(
                400,
                f"This Checkout Session is {session['status']}: it can no longer be paid.",
                code="checkout_session_not_open",
            )
        return session

    def _complete(self, session_id: str) -> list[SandboxEvent]:
        session = self._open_session(session_id)
        intent = self._intent_for(session)
        charge = {
            "id": _new_id("ch_"),
            "object": "charge",
            "amount": intent["amount"],
            "amount_captured": intent["amount"],
            "amount_refunded": 0,
            "captured": True,
            "created": self._now(),
            "currency": intent["currency"],
            "livemode": False,
            "metadata": dict(intent["metadata"]),
            "paid": True,
            "payment_intent": intent["id"],
            "refunded": False,
            "refunds": {"object": "list", "data": [], "has_more": False, "total_count": 0},
            "status": "succeeded",
        }
        self.charges[charge["id"]] = charge
        intent.update(
            status="succeeded",
            amount_received=intent["amount"],
            latest_charge=charge["id"],
            last_payment_error=None,
        )
        session.update(
            status="complete",
            payment_status="paid",
            customer_details={"email": session["customer_email"]},
        )
        return [
            self._event("checkout.session.completed", session),
            self._event("payment_intent.succeeded", intent),
        ]

    def _decline(self, session_id: str, card: str) -> tuple[list[SandboxEvent], str]:
        session = self._open_session(session_id)
        intent = self._intent_for(session)
        code, decline_code, message = DECLINE_CARDS[card]
        error: dict[str, Any] = {"type": "card_error", "code": code, "message": message}
        if decline_code:
            error["decline_code"] = decline_code
        intent.update(status="requires_payment_method", last_payment_error=error)
        return [self._event("payment_intent.payment_failed", intent)], message

    def expire_session(self, session_id: str, *, background: bool = False) -> SandboxEvent:
        """Expire an open session (`checkout.session.expired`)."""
        session = self._session(session_id)
        if session["status"] != "open":
            raise StripeApiError(
                400,
                f"Only Checkout Sessions with a status of 'open' can be expired; this one "
                f"is {session['status']}.",
                code="checkout_session_not_open",
            )
        session.update(status="expired", url=None)
        event = self._event("checkout.session.expired", session)
        if background:
            self._emit_later([event])
        return event

    async def pay(self, session_id: str, *, card: str = SUCCESS_CARD) -> list[SandboxEvent]:
        """What the hosted page's Pay does: pay (or decline, for a decline test card) and
        deliver the events before returning them."""
        card = re.sub(r"\D", "", card)
        if card in DECLINE_CARDS:
            events, _ = self._decline(session_id, card)
        else:
            events = self._complete(session_id)
        await self._emit(events)
        return events

    async def decline(self, session_id: str, *, card: str = DECLINE_BUTTON) -> list[SandboxEvent]:
        events, _ = self._decline(session_id, re.sub(r"\D", "", card))
        await self._emit(events)
        return events

    async def expire(self, session_id: str) -> SandboxEvent:
        event = self.expire_session(session_id)
        await self._emit([event])
        return event

    def settle_refund(
        self, refund_id: str, status: str, *, failure_reason: str | None = None
    ) -> list[SandboxEvent]:
        """Move a pending refund to succeeded or failed (`refund.updated`; a failed one
        gives the amount back to the charge)."""
        refund = self.refunds.get(refund_id)
        if refund is None:
            raise _missing("refund", refund_id, "refund")
        if status not in ("succeeded", "failed", "canceled"):
            raise StripeApiError(400, f"unknown refund status {status}", param="status")
        refund["status"] = status
        if status != "succeeded":
            refund["failure_reason"] = failure_reason or "unknown"
            charge = self.charges[refund["charge"]]
            charge["amount_refunded"] -= refund["amount"]
            charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
        events = [self._event("refund.updated", refund)]
        self._emit_later(events)
        return events

    # ---- events and their delivery -------------------------------------------------------

    def _event(self, event_type: str, obj: dict[str, Any]) -> SandboxEvent:
        created = self._now()
        event_id = _new_id("evt_")
        payload = {
            "id": event_id,
            "object": "event",
            "api_version": stripe.api_version,
            "created": created,
            "data": {"object": json.loads(json.dumps(obj))},  # a snapshot, as Stripe sends
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }
        event = SandboxEvent(
            id=event_id,
            type=event_type,
            created=created,
            object_id=obj["id"],
            body=json.dumps(payload).encode(),
            held=self.hold_webhooks,
        )
        self.events.append(event)
        return event

    def event(self, event_id: str) -> SandboxEvent:
        for event in self.events:
            if event.id == event_id:
                return event
        raise _missing("event", event_id, "id")

    def events_of(self, event_type: str) -> list[SandboxEvent]:
        return [event for event in self.events if event.type == event_type]

    def sign(self, body: bytes, timestamp: int | None = None) -> str:
        """The Stripe-Signature header for `body`: one v1 per configured secret."""
        at = self._now() if timestamp is None else timestamp
        signed = f"{at}.".encode() + body
        parts = [f"t={at}"]
        for secret in self.webhook_secrets:
            digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
            parts.append(f"v1={digest}")
        return ",".join(parts)

    async def _emit(self, events: Sequence[SandboxEvent]) -> None:
        for event in events:
            if not event.held:
                await self.deliver(event.id)

    def _emit_later(self, events: Sequence[SandboxEvent]) -> None:
        if all(event.held for event in events):
            return
        task = asyncio.get_running_loop().create_task(self._emit(events))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait until every background delivery is done (tests)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            self._http = httpx.AsyncClient(timeout=15.0, transport=self.webhook_transport)
            self._http_loop = loop
        return self._http

    async def deliver(self, event_id: str, *, retry: bool = True) -> int | None:
        """POST one event to the webhook URL (signed afresh per attempt), retrying on a
        non-2xx answer or a connection error. Also how a test replays an event. Returns
        the last HTTP status (None: no URL, or never reached)."""
        event = self.event(event_id)
        event.held = False
        if not self.webhook_url:
            return None
        status: int | None = None
        delays = (0.0, *self.retry_delays) if retry else (0.0,)
        for delay in delays:
            if delay:
                await asyncio.sleep(delay)
            headers = {
                "Content-Type": "application/json; charset=utf-8",
                "Stripe-Signature": self.sign(event.body),
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            }
            try:
                response = await self._client().post(
                    self.webhook_url, content=event.body, headers=headers
                )
            except httpx.HTTPError as error:
                event.deliveries.append(Delivery(self._now(), None, type(error).__name__))
                status = None
                continue
            status = response.status_code
            event.deliveries.append(Delivery(self._now(), status))
            if 200 <= status < 300:
                break
        return status

    async def release(
        self, event_ids: Sequence[str] | None = None, *, reverse: bool = False
    ) -> list[SandboxEvent]:
        """Stop holding webhooks and send the held events: those named, in that order, or
        every held one in creation order (reversed with `reverse`)."""
        self.hold_webhooks = False
        if event_ids is None:
            chosen = [event for event in self.events if event.held]
            if reverse:
                chosen.reverse()
        else:
            chosen = [self.event(event_id) for event_id in event_ids]
        for event in chosen:
            await self.deliver(event.id)
        return chosen

    # ---- the hosted payment page ------------------------------------------------------------

    async def _page(self, request: Request) -> Response:
        session_id = request.path_params["id"]
        session = self.sessions.get(session_id)
        if session is None:
            return HTMLResponse(_page_html(None, [], "This payment page does not exist."), 404)
        if session["status"] == "open" and session["expires_at"] <= self._now():
            self.expire_session(session_id, background=True)
        message = None
        if request.method == "POST":
            form = dict(parse_qsl((await request.body()).decode("utf-8")))
            card = re.sub(r"\D", "", form.get("card", "")) or SUCCESS_CARD
            if form.get("action") == "decline":
                card = card if card in DECLINE_CARDS else DECLINE_BUTTON
            try:
                if card in DECLINE_CARDS:
                    events, message = self._decline(session_id, card)
                    await self._emit(events)
                else:
                    await self._emit(self._complete(session_id))
                    return RedirectResponse(_success_url(session), status_code=303)
            except StripeApiError as error:
                message = str(error)
        return HTMLResponse(_page_html(session, self.line_items[session_id], message))

    # ---- control endpoints (tests, demo) -------------------------------------------------

    async def _control_pay(self, request: Request) -> Response:
        body = await _json(request)
        try:
            events = await self.pay(
                request.path_params["id"], card=str(body.get("card", "")) or SUCCESS_CARD
            )
        except StripeApiError as error:
            return error.response()
        return JSONResponse({"events": [event.summary() for event in events]})

    async def _control_decline(self, request: Request) -> Response:
        body = await _json(request)
        try:
            events = await self.decline(
                request.path_params["id"], card=str(body.get("card", DECLINE_BUTTON))
            )
        except (StripeApiError, KeyError) as error:
            return StripeApiError(400, f"cannot decline: {error}").response()
        return JSONResponse({"events": [event.summary() for event in events]})

    async def _control_expire(self, request: Request) -> Response:
        try:
            event = await self.expire(request.path_params["id"])
        except StripeApiError as error:
            return error.response()
        return JSONResponse({"events": [event.summary()]})

    async def _control_events(self, request: Request) -> Response:
        await self.settle()
        kind = request.query_params.get("type")
        chosen = [e for e in self.events if kind is None or e.type == kind]
        return JSONResponse({"events": [event.summary() for event in chosen]})

    async def _control_event(self, request: Request) -> Response:
        try:
            event = self.event(request.path_params["id"])
        except StripeApiError as error:
            return error.response()
        return Response(event.body, media_type="application/json")

    async def _control_send(self, request: Request) -> Response:
        try:
            status = await self.deliver(request.path_params["id"], retry=False)
        except StripeApiError as error:
            return error.response()
        return JSONResponse({"status": status})

    async def _control_hold(self, request: Request) -> Response:
        body = await _json(request)
        self.hold_webhooks = bool(body.get("hold", True))
        return JSONResponse({"hold": self.hold_webhooks})

    async def _control_release(self, request: Request) -> Response:
        body = await _json(request)
        ids = body.get("ids")
        try:
            released = await self.release(
                [str(i) for i in ids] if isinstance(ids, list) else None,
                reverse=bool(body.get("reverse")),
            )
        except StripeApiError as error:
            return error.response()
        return JSONResponse({"events": [event.summary() for event in released]})

    async def _control_settle_refund(self, request: Request) -> Response:
        body = await _json(request)
        try:
            events = self.settle_refund(
                request.path_params["id"],
                str(body.get("status", "succeeded")),
                failure_reason=body.get("failure_reason"),
            )
        except StripeApiError as error:
            return error.response()
        await self.settle()
        return JSONResponse({"events": [event.summary() for event in events]})

    async def _control_config(self, request: Request) -> Response:
        body = await _json(request)
        if "webhook_url" in body:
            self.webhook_url = body["webhook_url"] or None
        if body.get("refund_status") in ("succeeded", "pending"):
            self.refund_status = body["refund_status"]
        return JSONResponse({"webhook_url": self.webhook_url, "refund_status": self.refund_status})

    # ---- serving -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serving(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve on `host:port` (0: a free port) in the current loop; yields the base URL
        (also `self.base_url`), to give as `stripe_api_base`."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.base_url = f"http://{host}:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("the Stripe sandbox stopped before it started")
                await asyncio.sleep(0.01)
            yield self.base_url
        finally:
            await self.settle()
            server.should_exit = True
            await task
            sock.close()
            await self.aclose()

    @contextlib.contextmanager
    def serving_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """Serve from a thread with its own event loop (for an app in another process or
        a synchronous test); drive it through the `/_sandbox/` control endpoints."""
        ready = threading.Event()
        state: dict[str, Any] = {}

        async def run() -> None:
            stop = asyncio.Event()
            state["loop"], state["stop"] = asyncio.get_running_loop(), stop
            try:
                async with self.serving(host, port) as url:
                    state["url"] = url
                    ready.set()
                    await stop.wait()
            except BaseException as error:
                state["error"] = error
                ready.set()
                raise

        thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
        thread.start()
        ready.wait(30)
        if "url" not in state:
            raise RuntimeError(f"the Stripe sandbox did not start: {state.get('error')}")
        try:
            yield state["url"]
        finally:
            state["loop"].call_soon_threadsafe(state["stop"].set)
            thread.join(30)

    async def aclose(self) -> None:
        client, self._http = self._http, None
        if client is not None:
            await client.aclose()


def sandbox_settings() -> dict[str, str]:
    """The secrets the sandbox uses by default, as popdrop settings (field names)."""
    return {
        "stripe_secret_key": SANDBOX_API_KEY,
        "stripe_webhook_secrets": SANDBOX_WEBHOOK_SECRET,
    }


async def serve_sandbox(
    host: str,
    port: int,
    webhook_url: str | None,
    secret: str = SANDBOX_WEBHOOK_SECRET,
    *,
    api_key: str = SANDBOX_API_KEY,
    public_url: str | None = None,
    started: Callable[[StripeSandbox], None] | None = None,
) -> None:
    """Run a sandbox on `host:port` until cancelled (`popdrop demo`). Point the app at it
    with POPDROP_STRIPE_API_BASE=http://host:port, POPDROP_STRIPE_SECRET_KEY=`api_key`,
    POPDROP_STRIPE_WEBHOOK_SECRETS=`secret`. `public_url` is the address a phone uses
    for the hosted page when `host` is not reachable from it."""
    sandbox = StripeSandbox(
        api_key=api_key,
        webhook_secrets=[secret],
        webhook_url=webhook_url,
        public_url=public_url,
    )
    async with sandbox.serving(host, port):
        if started is not None:
            started(sandbox)
        await asyncio.Event().wait()  # until cancelled


async def _json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _success_url(session: Mapping[str, Any]) -> str:
    return str(session["success_url"]).replace("{CHECKOUT_SESSION_ID}", session["id"])


def _money(minor: int, currency: str) -> str:
    zero_decimal = {"jpy", "krw", "vnd", "clp", "isk", "huf", "twd", "ugx"}
    if currency in zero_decimal:
        return f"{minor} {currency.upper()}"
    return f"{minor / 100:.2f} {currency.upper()}"


def _page_html(
    session: Mapping[str, Any] | None, lines: Sequence[Mapping[str, Any]], message: str | None
) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<title>Pay — Stripe sandbox</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:28rem;margin:0 auto;padding:1rem}",
        "table{width:100%;border-collapse:collapse}td{padding:.3rem 0}",
        "td.n{text-align:right}.total{font-weight:bold;border-top:1px solid #ccc}",
        "input{width:100%;font-size:1.2rem;padding:.5rem;box-sizing:border-box}",
        "button{width:100%;font-size:1.2rem;padding:.8rem;margin-top:.6rem;border:0;",
        "border-radius:.4rem}.pay{background:#635bff;color:#fff}.decline{background:#eee}",
        ".msg{background:#fde2e1;color:#8a1c1c;padding:.6rem;border-radius:.4rem}",
        ".note{color:#666;font-size:.85rem}</style></head><body>",
        "<p class='note'>Stripe sandbox — test mode, no real money moves.</p>",
    ]
    if session is None:
        parts.append(f"<p class='msg' role='alert'>{esc(message or '')}</p></body></html>")
        return "".join(parts)
    currency = session["currency"]
    parts.append("<h1>Checkout</h1><table>")
    for line in lines:
        parts.append(
            f"<tr><td>{esc(str(line['description']))} &times; {line['quantity']}</td>"
            f"<td class='n'>{_money(line['amount_total'], currency)}</td></tr>"
        )
    parts.append(
        f"<tr class='total'><td>Total</td>"
        f"<td class='n' id='total'>{_money(session['amount_total'], currency)}</td></tr></table>"
    )
    if message:
        parts.append(f"<p class='msg' role='alert' id='message'>{esc(message)}</p>")
    if session["status"] == "open":
        parts.append(
            f"<form method='post' action='/pay/{esc(session['id'])}'>"
            "<label for='card'>Card number</label>"
            f"<input id='card' name='card' inputmode='numeric' autocomplete='off' "
            f"value='{SUCCESS_CARD[:4]} {SUCCESS_CARD[4:8]} {SUCCESS_CARD[8:12]} "
            f"{SUCCESS_CARD[12:]}'>"
            "<button class='pay' name='action' value='pay'>Pay</button>"
            "<button class='decline' name='action' value='decline'>Decline</button></form>"
            "<p class='note'>4000 0000 0000 9995 declines (insufficient funds).</p>"
        )
    elif session["status"] == "complete":
        parts.append(f"<p>Paid. <a href='{esc(_success_url(session))}'>Back to the shop</a></p>")
    else:
        parts.append("<p class='msg' role='alert'>This payment page has expired.</p>")
    if session.get("cancel_url") and session["status"] == "open":
        parts.append(f"<p><a href='{esc(str(session['cancel_url']))}'>Cancel and go back</a></p>")
    parts.append("</body></html>")
    return "".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the local Stripe sandbox.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--webhook-url", default=None)
    parser.add_argument("--secret", default=SANDBOX_WEBHOOK_SECRET)
    parser.add_argument("--api-key", default=SANDBOX_API_KEY)
    parser.add_argument("--public-url", default=None)
    args = parser.parse_args(argv)
    print(  # a command-line tool tells where it listens
        f"Stripe sandbox on http://{args.host}:{args.port} "
        f"(key {args.api_key}, webhooks → {args.webhook_url or 'nowhere'})",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve_sandbox(
                args.host,
                args.port,
                args.webhook_url,
                args.secret,
                api_key=args.api_key,
                public_url=args.public_url,
            )
        )


if __name__ == "__main__":
    main()
