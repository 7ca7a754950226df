"""Stripe webhooks: verify the signature on the raw body, then parse into a `StripeEvent`.

Rules:
- The signature is checked on the raw bytes BEFORE the JSON is parsed, by the official
  library (`stripe.WebhookSignature.verify_header`), against every configured secret in
  turn (rotation: Stripe sends one `v1=` per active secret).
- The timestamp is checked against the app clock `now` (not `time.time()`), in both
  directions, with the configured tolerance (Stripe's default: 300 s).
- Refusals are `PopdropError` with reason `bad_signature` (missing or garbled header,
  no matching signature, body tampered) or `timestamp_outside_tolerance`; both are 400.
- Known event types are flattened into the fields the order service needs; an unknown
  type still parses (ids None) so the caller can acknowledge and ignore it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class StripeEvent:
    id: str  # "evt_…": the dedupe key
    type: str  # e.g. "checkout.session.completed"
    created: datetime
    object_id: str  # the id of data.object ("cs_…", "pi_…", "ch_…", "re_…")
    order_id: int | None
    org_id: int | None
    payment_intent: str | None
    amount_minor: int | None
    currency: str | None
    failure_code: str | None
    failure_message: str | None


def verify_and_parse(
    raw_body: bytes,
    signature_header: str | None,
    secrets: Sequence[str],
    *,
    now: datetime,
    tolerance_seconds: int = 300,
) -> StripeEvent:
    raise NotImplementedError
