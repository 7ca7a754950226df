"""A closed-loop load generator for multi-step buyers: hold → order → payment confirmation.

Rules:
- Each of `clients` keep-alive connections takes the next buyer and runs its steps one
  after the other, reading every answer (status and JSON body: the next step needs the
  ids). Buyers run concurrently across connections, never within one.
- A buyer stops at the first answer that is not the expected success: a 409 `sold_out`
  hold is the normal end of a buyer who came too late; anything else is counted by step
  and status (a 5xx is a server error the bench fails on).
- The payment step is either staff at the lane (`POST /orders/{id}/mark-paid`, pay at
  pickup) or online (`POST /orders/{id}/pay` makes a Checkout Session at the provider,
  then a `checkout.session.completed` webhook is delivered as Stripe sends it: the same
  JSON shape, signed `t=…,v1=HMAC-SHA256(secret, "t.body")` with the endpoint secret,
  timestamped now). The buyer is paid when the answer says so (`status: paid`, or the
  webhook's `outcome: paid`).
- `run` is picklable: run it in its own process (like `_loadgen.run`), so the generator
  never shares an event loop or a core's time slice accounting with the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from _loadgen import HOST

LANE = "lane"
STRIPE = "stripe"


@dataclass(frozen=True)
class CheckoutSpec:
    """What every buyer buys and how it pays."""

    token: str
    variant_id: int
    lane_id: int
    org_id: int
    payment: str  # LANE or STRIPE
    webhook_secret: str = ""
    key_prefix: str = "buyer"  # Idempotency-Key prefix: distinct per phase


@dataclass
class FlowResult:
    started: float = 0.0
    paid_at: list[float] = field(default_factory=list)  # perf_counter when each buyer was paid
    sequences: list[float] = field(default_factory=list)  # seconds, hold sent → paid answer
    statuses: Counter[str] = field(default_factory=Counter)  # "step status" → count
    outcomes: Counter[str] = field(default_factory=Counter)  # how each buyer ended
    steps: dict[str, list[float]] = field(default_factory=dict)  # step → seconds per answer
    errors: int = 0  # connection failures
    buyers: int = 0

    @property
    def paid(self) -> int:
        return len(self.paid_at)

    @property
    def server_errors(self) -> int:
        return sum(n for key, n in self.statuses.items() if int(key.rsplit(" ", 1)[1]) >= 500)

    def percentile_ms(self, q: float, step: str | None = None) -> float:
        """A percentile of whole sequences (hold sent → paid), or of one step's answers."""
        values = self.sequences if step is None else self.steps.get(step, [])
        if not values:
            return 0.0
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _request(
    port: int,
    path: str,
    body: bytes,
    *,
    token: str | None,
    key: str | None = None,
    extra: str = "",
) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    if key is not None:
        head += f"Idempotency-Key: {key}\r\n"
    head += extra
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def _read(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the server closes the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    body = await reader.readexactly(length) if length else b""
    return status, body, close


def stripe_signature(secret: str, body: bytes, at: int) -> str:
    """The Stripe-Signature header Stripe sends for `body` signed at `at`."""
    digest = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


def session_completed(session_id: str, order: dict[str, Any], org_id: int, at: int) -> bytes:
    """A `checkout.session.completed` event as Stripe sends it for a paid card session
    (the shape `stripe_sandbox` sends: metadata from the session create, a new intent)."""
    order_id = str(order["id"])
    session = {
        "id": session_id,
        "object": "checkout.session",
        "amount_subtotal": order["total_minor"],
        "amount_total": order["total_minor"],
        "client_reference_id": order_id,
        "created": at,
        "currency": str(order["currency"]).lower(),
        "livemode": False,
        "metadata": {"order_id": order_id, "org_id": str(org_id)},
        "mode": "payment",
        "payment_intent": "pi_" + secrets.token_hex(12),
        "payment_method_types": ["card"],
        "payment_status": "paid",
        "status": "complete",
    }
    event = {
        "id": "evt_" + secrets.token_hex(12),
        "object": "event",
        "api_version": "2024-06-20",
        "created": at,
        "data": {"object": session},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": "checkout.session.completed",
    }
    return json.dumps(event, separators=(",", ":")).encode()


class _Stop(Exception):
    """The buyer ends here (sold out, or an unexpected answer: counted already)."""


async def _drive(port: int, spec: CheckoutSpec, buyers: int, clients: int) -> FlowResult:
    result = FlowResult(buyers=buyers)
    hold_body = json.dumps({"variant_id": spec.variant_id, "lane_id": spec.lane_id}).encode()
    pay_method = "stripe" if spec.payment == STRIPE else "pay_at_pickup"
    cursor = iter(range(buyers))
    result.started = time.perf_counter()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)

        async def call(step: str, request: bytes, expected: int) -> dict[str, Any]:
            nonlocal reader, writer
            sent_at = time.perf_counter()
            try:
                writer.write(request)
                status, body, close = await _read(reader)
            except (OSError, asyncio.IncompleteReadError):
                result.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
                result.outcomes[f"{step}: connection error"] += 1
                raise _Stop from None
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
            result.statuses[f"{step} {status}"] += 1
            result.steps.setdefault(f"{step} {status}", []).append(time.perf_counter() - sent_at)
            answer = json.loads(body) if body else {}
            if status != expected:
                reason = answer.get("reason", "?") if isinstance(answer, dict) else "?"
                result.outcomes[f"{step}: {status} {reason}"] += 1
                raise _Stop
            return answer if isinstance(answer, dict) else {}

        async def buy(n: int) -> None:
            began = time.perf_counter()
            hold = await call(
                "hold", _request(port, "/api/v1/holds", hold_body, token=spec.token), 201
            )
            order_body = json.dumps(
                {"hold_ids": [hold["id"]], "payment_method": pay_method, "contact_ref": f"b{n}"}
            ).encode()
            order = await call(
                "order",
                _request(
                    port,
                    "/api/v1/orders",
                    order_body,
                    token=spec.token,
                    key=f"{spec.key_prefix}-{n}-order",
                ),
                201,
            )
            if spec.payment == LANE:
                paid = await call(
                    "mark-paid",
                    _request(
                        port,
                        f"/api/v1/orders/{order['id']}/mark-paid",
                        b'{"tender":"card"}',
                        token=spec.token,
                        key=f"{spec.key_prefix}-{n}-paid",
                    ),
                    200,
                )
                ok = paid.get("status") == "paid"
            else:
                started = await call(
                    "pay",
                    _request(port, f"/api/v1/orders/{order['id']}/pay", b"", token=spec.token),
                    200,
                )
                session_id = str(started["redirect_url"]).rstrip("/").rsplit("/", 1)[-1]
                at = int(time.time())
                event = session_completed(session_id, order, spec.org_id, at)
                signature = stripe_signature(spec.webhook_secret, event, at)
                hook = await call(
                    "webhook",
                    _request(
                        port,
                        "/api/v1/payments/stripe/webhook",
                        event,
                        token=None,
                        extra=f"Stripe-Signature: {signature}\r\n",
                    ),
                    200,
                )
                ok = hook.get("outcome") == "paid"
            done = time.perf_counter()
            if not ok:
                result.outcomes["not paid"] += 1
                return
            result.outcomes["paid"] += 1
            result.paid_at.append(done)
            result.sequences.append(done - began)

        try:
            while (n := next(cursor, None)) is not None:
                try:
                    await buy(n)
                except _Stop:
                    continue
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(clients)))
    return result


def run(port: int, spec: CheckoutSpec, buyers: int, clients: int) -> FlowResult:
    """Entry point for a worker process: `buyers` buyers over `clients` connections."""
    main = _drive(port, spec, buyers, clients)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
