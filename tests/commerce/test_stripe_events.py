"""Stripe webhook verification and parsing: the signature is checked on the raw body with
the official library, the timestamp against the app clock, several secrets for rotation."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe

from popdrop.commerce.stripe_events import StripeEvent, verify_and_parse
from popdrop.core.errors import PopdropError

NOW = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)
SECRET = "whsec_current_0123456789"
OLD_SECRET = "whsec_previous_9876543210"


def event_body(event_type: str, obj: dict[str, Any], event_id: str = "evt_1") -> bytes:
    payload = {
        "id": event_id,
        "object": "event",
        "api_version": "2026-10-28",
        "created": int(NOW.timestamp()),
        "data": {"object": obj},
        "livemode": False,
        "type": event_type,
    }
    return json.dumps(payload).encode()


SESSION = {
    "id": "cs_test_abc",
    "object": "checkout.session",
    "amount_total": 2500,
    "currency": "eur",
    "client_reference_id": "41",
    "metadata": {"order_id": "41", "org_id": "7"},
    "payment_intent": "pi_123",
    "payment_status": "paid",
    "status": "complete",
}


def header(body: bytes, secret: str = SECRET, at: datetime = NOW) -> str:
    # The official library signs exactly as Stripe does.
    return str(
        stripe.WebhookSignature.generate_signature_header(
            body.decode(), secret, timestamp=int(at.timestamp())
        )
    )


def refused(body: bytes, sig: str | None, secrets: list[str], **kwargs: Any) -> PopdropError:
    with pytest.raises(PopdropError) as caught:
        verify_and_parse(body, sig, secrets, now=kwargs.pop("now", NOW), **kwargs)
    return caught.value


def test_a_signed_checkout_completion_parses_with_order_and_org() -> None:
    body = event_body("checkout.session.completed", SESSION)
    event = verify_and_parse(body, header(body), [SECRET], now=NOW)
    assert event == StripeEvent(
        id="evt_1",
        type="checkout.session.completed",
        created=NOW,
        object_id="cs_test_abc",
        order_id=41,
        org_id=7,
        payment_intent="pi_123",
        amount_minor=2500,
        currency="EUR",
        failure_code=None,
        failure_message=None,
        decline_code=None,
        status="paid",
    )


def test_a_signature_made_with_another_secret_is_refused_with_400() -> None:
    body = event_body("checkout.session.completed", SESSION)
    error = refused(body, header(body, secret="whsec_someone_else"), [SECRET])
    assert (error.reason, error.status) == ("bad_signature", 400)


def test_a_tampered_body_is_refused() -> None:
    body = event_body("checkout.session.completed", SESSION)
    sig = header(body)
    tampered = body.replace(b'"amount_total": 2500', b'"amount_total": 1')
    assert tampered != body
    assert refused(tampered, sig, [SECRET]).reason == "bad_signature"


@pytest.mark.parametrize("sig", [None, "", "garbage", "t=notanumber,v1=abc", "t=1,v0=abc"])
def test_a_missing_or_garbled_header_is_refused(sig: str | None) -> None:
    body = event_body("checkout.session.completed", SESSION)
    error = refused(body, sig, [SECRET])
    assert (error.reason, error.status) == ("bad_signature", 400)


def test_no_configured_secret_refuses_everything() -> None:
    body = event_body("checkout.session.completed", SESSION)
    assert refused(body, header(body), []).reason == "bad_signature"
    assert refused(body, header(body), ["", "  "]).reason == "bad_signature"


@pytest.mark.parametrize("offset", [-301, 301, -3600])
def test_a_timestamp_outside_the_tolerance_either_way_is_refused(offset: int) -> None:
    body = event_body("checkout.session.completed", SESSION)
    sig = header(body, at=NOW + timedelta(seconds=offset))
    error = refused(body, sig, [SECRET])
    assert (error.reason, error.status) == ("timestamp_outside_tolerance", 400)


@pytest.mark.parametrize("offset", [-299, 0, 299])
def test_a_timestamp_inside_the_tolerance_is_accepted(offset: int) -> None:
    body = event_body("checkout.session.completed", SESSION)
    sig = header(body, at=NOW + timedelta(seconds=offset))
    assert verify_and_parse(body, sig, [SECRET], now=NOW).id == "evt_1"


def test_the_tolerance_is_configurable() -> None:
    body = event_body("checkout.session.completed", SESSION)
    sig = header(body, at=NOW - timedelta(seconds=100))
    error = refused(body, sig, [SECRET], tolerance_seconds=60)
    assert error.reason == "timestamp_outside_tolerance"


def test_the_app_clock_decides_not_the_wall_clock() -> None:
    # Signed in 2026 relative to NOW: valid at NOW, stale at the same moment a day later.
    body = event_body("checkout.session.completed", SESSION)
    sig = header(body)
    assert verify_and_parse(body, sig, [SECRET], now=NOW).id == "evt_1"
    later = NOW + timedelta(days=1)
    assert refused(body, sig, [SECRET], now=later).reason == "timestamp_outside_tolerance"


def two_signature_header(body: bytes) -> str:
    """What Stripe sends while a secret is being rolled: one v1 per active secret."""
    at = int(NOW.timestamp())
    signed = f"{at}.".encode() + body
    sigs = [hmac.new(s.encode(), signed, hashlib.sha256).hexdigest() for s in (OLD_SECRET, SECRET)]
    return f"t={at},v1={sigs[0]},v1={sigs[1]}"


@pytest.mark.parametrize("configured", [[SECRET], [OLD_SECRET], [OLD_SECRET, SECRET]])
def test_during_rotation_either_configured_secret_accepts(configured: list[str]) -> None:
    body = event_body("checkout.session.completed", SESSION)
    assert verify_and_parse(body, two_signature_header(body), configured, now=NOW).order_id == 41


def test_during_rotation_the_second_configured_secret_is_tried() -> None:
    body = event_body("checkout.session.completed", SESSION)
    sig = header(body, secret=SECRET)
    assert verify_and_parse(body, sig, [OLD_SECRET, SECRET], now=NOW).id == "evt_1"
    assert refused(body, two_signature_header(body), ["whsec_neither"]).reason == "bad_signature"


def test_a_signed_body_that_is_not_an_event_is_malformed() -> None:
    body = b"not json at all"
    assert refused(body, header(body), [SECRET]).reason == "malformed"
    listing = json.dumps({"object": "list", "data": []}).encode()
    assert refused(listing, header(listing), [SECRET]).reason == "malformed"


def parse(event_type: str, obj: dict[str, Any]) -> StripeEvent:
    body = event_body(event_type, obj)
    return verify_and_parse(body, header(body), [SECRET], now=NOW)


def test_a_failed_payment_carries_stripes_code_decline_code_and_message() -> None:
    event = parse(
        "payment_intent.payment_failed",
        {
            "id": "pi_9",
            "object": "payment_intent",
            "amount": 2500,
            "currency": "eur",
            "status": "requires_payment_method",
            "metadata": {"order_id": "41", "org_id": "7"},
            "last_payment_error": {
                "type": "card_error",
                "code": "card_declined",
                "decline_code": "insufficient_funds",
                "message": "Your card has insufficient funds.",
            },
        },
    )
    assert (event.order_id, event.payment_intent, event.amount_minor) == (41, "pi_9", 2500)
    assert (event.failure_code, event.decline_code) == ("card_declined", "insufficient_funds")
    assert event.failure_message == "Your card has insufficient funds."


def test_a_refunded_charge_reports_everything_refunded_so_far() -> None:
    event = parse(
        "charge.refunded",
        {
            "id": "ch_1",
            "object": "charge",
            "amount": 2500,
            "amount_refunded": 1000,
            "currency": "eur",
            "payment_intent": "pi_9",
            "refunded": False,
            "status": "succeeded",
            "metadata": {"order_id": "41", "org_id": "7"},
        },
    )
    assert (event.object_id, event.payment_intent, event.amount_minor) == ("ch_1", "pi_9", 1000)
    assert event.status == "succeeded"  # partly refunded


def test_a_failed_refund_carries_its_failure_reason() -> None:
    event = parse(
        "refund.updated",
        {
            "id": "re_1",
            "object": "refund",
            "amount": 500,
            "currency": "eur",
            "payment_intent": "pi_9",
            "status": "failed",
            "failure_reason": "expired_or_canceled_card",
            "metadata": {"order_id": "41", "org_id": "7"},
        },
    )
    assert (event.object_id, event.amount_minor, event.status) == ("re_1", 500, "failed")
    assert event.failure_code == "expired_or_canceled_card"


def test_an_expired_session_without_metadata_finds_its_order_by_reference() -> None:
    obj = {**SESSION, "metadata": {}, "payment_status": "unpaid", "payment_intent": None}
    event = parse("checkout.session.expired", obj)
    assert (event.order_id, event.org_id, event.payment_intent) == (41, None, None)


def test_an_unknown_event_type_parses_with_nothing_to_act_on() -> None:
    event = parse(
        "customer.created", {"id": "cus_1", "object": "customer", "metadata": {"order_id": "41"}}
    )
    assert (event.type, event.object_id) == ("customer.created", "cus_1")
    assert (event.order_id, event.org_id, event.payment_intent, event.amount_minor) == (
        None,
        None,
        None,
        None,
    )


def test_garbage_metadata_ids_are_none_not_a_crash() -> None:
    event = parse(
        "checkout.session.completed",
        {**SESSION, "client_reference_id": None, "metadata": {"order_id": "x1", "org_id": 7}},
    )
    assert (event.order_id, event.org_id) == (None, None)
