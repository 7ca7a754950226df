"""Stripe webhooks: verify the signature on the raw body, then parse into a `StripeEvent`.

Rules:
- The signature is checked on the raw bytes BEFORE the JSON is parsed, by the official
  library (`stripe.WebhookSignature.verify_header`), against every configured secret in
  turn (rotation: Stripe sends one `v1=` per active secret, and the library accepts the
  header when any of them matches).
- The timestamp is checked here against the app clock `now` (not `time.time()`, which
  is all the library knows), in both directions, with the configured tolerance
  (Stripe's default: 300 s); the library is asked for the HMAC only.
- Refusals are `PopdropError` with reason `bad_signature` (missing or garbled header, no
  matching signature, body tampered, no secret configured) or
  `timestamp_outside_tolerance`; neither reason is in the status table, so both are 400.
  A body that is signed but not a Stripe event is `malformed` (422).
- Known event types are flattened into the fields the order service needs; order and org
  ids come from the object's metadata (set by `StripeProvider.start`). An unknown type
  still parses, with its ids None, so the caller can acknowledge and ignore it.
- Stripe retries and reorders: the caller dedupes on `StripeEvent.id` and decides from
  the event's content, never from arrival order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import stripe

from popdrop.core.errors import PopdropError


@dataclass(frozen=True)
class StripeEvent:
    id: str  # "evt_…": the dedupe key
    type: str  # e.g. "checkout.session.completed"
    created: datetime
    object_id: str  # the id of data.object ("cs_…", "pi_…", "ch_…", "re_…")
    order_id: int | None
    org_id: int | None
    payment_intent: str | None
    amount_minor: (
        int | None
    )  # session: amount_total; intent: amount; charge: amount_refunded; refund: amount
    currency: str | None  # upper case ISO code, like popdrop's Money
    failure_code: str | None  # last_payment_error.code ("card_declined"), a refund's failure_reason
    failure_message: str | None
    decline_code: str | None = None  # last_payment_error.decline_code ("insufficient_funds")
    # The object's own status: a session's payment_status ("paid" | "unpaid" |
    # "no_payment_required"), an intent's or a refund's status, "refunded" for a fully
    # refunded charge ("succeeded" while partly refunded).
    status: str | None = None


# Events whose data.object is a Checkout Session.
SESSION_EVENTS = frozenset(
    {
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "checkout.session.async_payment_failed",
        "checkout.session.expired",
    }
)
INTENT_EVENTS = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_intent.canceled",
        "payment_intent.processing",
    }
)
CHARGE_EVENTS = frozenset({"charge.refunded", "charge.succeeded", "charge.failed"})
REFUND_EVENTS = frozenset({"refund.created", "refund.updated", "refund.failed"})


def _bad_signature(message: str) -> PopdropError:
    return PopdropError("bad_signature", message)


def _header_timestamp(header: str) -> int:
    """The `t=` of a Stripe-Signature header (the library checked it is there)."""
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            try:
                return int(value)
            except ValueError:
                break
    raise _bad_signature("Stripe-Signature has no valid timestamp")


def verify_signature(
    raw_body: bytes,
    signature_header: str | None,
    secrets: Sequence[str],
    *,
    now: datetime,
    tolerance_seconds: int = 300,
) -> None:
    """Refuse the body unless one of `secrets` signed it within the tolerance of `now`."""
    if not signature_header or not signature_header.strip():
        raise _bad_signature("the Stripe-Signature header is missing")
    usable = [secret.strip() for secret in secrets if secret and secret.strip()]
    if not usable:
        raise _bad_signature("no Stripe webhook secret is configured")
    try:
        raw_body.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_signature(
            "the body is not UTF-8, so it cannot carry a valid signature"
        ) from None
    for secret in usable:
        try:
            # tolerance=None: the HMAC only; the timestamp is checked against `now` below.
            stripe.WebhookSignature.verify_header(raw_body, signature_header, secret, None)
        except stripe.SignatureVerificationError:
            continue
        break
    else:
        raise _bad_signature("no signature in Stripe-Signature matches a configured secret")
    signed_at = _header_timestamp(signature_header)
    skew = abs(now.timestamp() - signed_at)
    if skew > tolerance_seconds:
        raise PopdropError(
            "timestamp_outside_tolerance",
            f"the webhook was signed {int(skew)} s away from now (tolerance {tolerance_seconds} s)",
        )


def verify_and_parse(
    raw_body: bytes,
    signature_header: str | None,
    secrets: Sequence[str],
    *,
    now: datetime,
    tolerance_seconds: int = 300,
) -> StripeEvent:
    """Verify, then parse one webhook body into a `StripeEvent`."""
    verify_signature(
        raw_body, signature_header, secrets, now=now, tolerance_seconds=tolerance_seconds
    )
    try:
        payload = json.loads(raw_body)
    except ValueError:
        raise PopdropError("malformed", "the webhook body is not JSON") from None
    return parse_event(payload)


def parse_event(payload: Any) -> StripeEvent:
    """A verified Stripe event (the decoded JSON body) as a `StripeEvent`."""
    if not isinstance(payload, Mapping) or payload.get("object") != "event":
        raise PopdropError("malformed", "the webhook body is not a Stripe event")
    event_id, event_type, created = payload.get("id"), payload.get("type"), payload.get("created")
    data = payload.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if (
        not isinstance(event_id, str)
        or not isinstance(event_type, str)
        or not isinstance(created, int)
        or not isinstance(obj, Mapping)
    ):
        raise PopdropError("malformed", "the Stripe event lacks id, type, created or data.object")
    fields = _object_fields(event_type, obj)
    return StripeEvent(
        id=event_id,
        type=event_type,
        created=datetime.fromtimestamp(created, UTC),
        object_id=_str(obj.get("id")) or "",
        **fields,
    )


def _object_fields(event_type: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened fields of data.object for the event types popdrop acts on."""
    raw_metadata = obj.get("metadata")
    metadata: Mapping[str, Any] = raw_metadata if isinstance(raw_metadata, Mapping) else {}
    ids = {"order_id": _int_id(metadata, "order_id"), "org_id": _int_id(metadata, "org_id")}
    currency = _str(obj.get("currency"))
    common = {
        **ids,
        "currency": currency.upper() if currency else None,
        "failure_code": None,
        "failure_message": None,
        "decline_code": None,
    }
    if event_type in SESSION_EVENTS:
        if ids["order_id"] is None:  # a session made elsewhere still names its order
            reference = _str(obj.get("client_reference_id"))
            ids["order_id"] = int(reference) if reference and reference.isdigit() else None
            common["order_id"] = ids["order_id"]
        return {
            **common,
            "payment_intent": _expandable_id(obj.get("payment_intent")),
            "amount_minor": _int(obj.get("amount_total")),
            "status": _str(obj.get("payment_status")),
        }
    if event_type in INTENT_EVENTS:
        error = obj.get("last_payment_error")
        if isinstance(error, Mapping):
            common["failure_code"] = _str(error.get("code"))
            common["decline_code"] = _str(error.get("decline_code"))
            common["failure_message"] = _str(error.get("message"))
        return {
            **common,
            "payment_intent": _str(obj.get("id")),
            "amount_minor": _int(obj.get("amount")),
            "status": _str(obj.get("status")),
        }
    if event_type in CHARGE_EVENTS:
        common["failure_code"] = _str(obj.get("failure_code"))
        common["failure_message"] = _str(obj.get("failure_message"))
        fully = obj.get("refunded") is True
        return {
            **common,
            "payment_intent": _expandable_id(obj.get("payment_intent")),
            "amount_minor": _int(
                obj.get("amount_refunded") if event_type == "charge.refunded" else obj.get("amount")
            ),
            "status": "refunded" if fully else _str(obj.get("status")),
        }
    if event_type in REFUND_EVENTS:
        common["failure_code"] = _str(obj.get("failure_reason"))
        return {
            **common,
            "payment_intent": _expandable_id(obj.get("payment_intent")),
            "amount_minor": _int(obj.get("amount")),
            "status": _str(obj.get("status")),
        }
    # Unknown to popdrop: parsed so the caller can acknowledge it, with nothing to act on.
    return {
        **common,
        "order_id": None,
        "org_id": None,
        "currency": None,
        "payment_intent": None,
        "amount_minor": None,
        "status": _str(obj.get("status")),
    }


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _expandable_id(value: Any) -> str | None:
    """An id field Stripe may send as the id or, when expanded, as the object."""
    if isinstance(value, Mapping):
        return _str(value.get("id"))
    return _str(value)


def _int_id(metadata: Mapping[str, Any], key: str) -> int | None:
    value = metadata.get(key)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None
