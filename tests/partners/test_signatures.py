"""Signature checks on raw bytes: Square (URL + body), Shopify (body), Standard Webhooks
(id.timestamp.body, 5-minute tolerance both ways, several secrets)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest

from popdrop.core.errors import PopdropError
from popdrop.partners import signatures

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
BODY = b'{"id": 1}'


def _b64(key: bytes, message: bytes) -> str:
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


def _reason(call: object) -> str:
    with pytest.raises(PopdropError) as refused:
        call()  # type: ignore[operator]
    assert refused.value.status == 401
    return refused.value.reason


def test_square_signs_url_and_body() -> None:
    url = "https://example.test/pos/square/1"
    good = _b64(b"k1", url.encode() + BODY)
    signatures.verify_square(BODY, good, url, ["k0", "k1"])
    assert (
        _reason(lambda: signatures.verify_square(BODY, good, url + "?x", ["k1"])) == "bad_signature"
    )
    assert (
        _reason(lambda: signatures.verify_square(BODY + b" ", good, url, ["k1"])) == "bad_signature"
    )
    assert _reason(lambda: signatures.verify_square(BODY, None, url, ["k1"])) == "missing_signature"


def test_shopify_signs_the_raw_body() -> None:
    good = _b64(b"secret", BODY)
    signatures.verify_shopify(BODY, good, ["secret"])
    # Same JSON, other bytes: refused (the check never re-serialises).
    assert (
        _reason(lambda: signatures.verify_shopify(b'{"id":1}', good, ["secret"])) == "bad_signature"
    )


def test_standard_webhooks_reference_vector() -> None:
    # The Standard Webhooks specification's example secret and message.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    webhook_id, timestamp = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert signatures.sign_standard(secret, webhook_id, timestamp, body) == expected
    signatures.verify_standard(
        body,
        webhook_id=webhook_id,
        timestamp=str(timestamp),
        signature=f"v1,bm90LXRoaXM= {expected}",
        secrets_=[secret],
        now=datetime.fromtimestamp(timestamp, UTC),
    )


@pytest.mark.parametrize("skew", [timedelta(seconds=-301), timedelta(seconds=301)])
def test_standard_tolerance_is_five_minutes_either_way(skew: timedelta) -> None:
    secret = signatures.new_standard_secret()
    sent = int((NOW + skew).timestamp())
    sig = signatures.sign_standard(secret, "m1", sent, BODY)

    def check() -> None:
        signatures.verify_standard(
            BODY, webhook_id="m1", timestamp=str(sent), signature=sig, secrets_=[secret], now=NOW
        )

    assert _reason(check) == "stale_timestamp"


def test_standard_rotation_accepts_either_secret_and_binds_the_id() -> None:
    old, new = signatures.new_standard_secret(), signatures.new_standard_secret()
    sent = int(NOW.timestamp())
    for secret in (old, new):
        sig = signatures.sign_standard(secret, "m1", sent, BODY)
        signatures.verify_standard(
            BODY, webhook_id="m1", timestamp=str(sent), signature=sig, secrets_=[new, old], now=NOW
        )
    sig = signatures.sign_standard(new, "m1", sent, BODY)

    def other_id() -> None:
        signatures.verify_standard(
            BODY, webhook_id="m2", timestamp=str(sent), signature=sig, secrets_=[new], now=NOW
        )

    assert _reason(other_id) == "bad_signature"
