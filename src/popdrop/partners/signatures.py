"""Signature checks of inbound POS deliveries, on the raw bytes, before any parsing.

- Square: `x-square-hmacsha256-signature` = base64(HMAC-SHA256(signature key,
  notification URL + raw body)).
- Shopify: `X-Shopify-Hmac-Sha256` = base64(HMAC-SHA256(app secret, raw body)).
- Standard Webhooks: `webhook-signature` is a space-separated list of `v1,<base64>`, each
  HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{raw body}` under the key a
  `whsec_<base64>` secret carries; the timestamp must be within 5 minutes of our clock,
  either way.

Every check accepts any of the connection's secrets (more than one during rotation) and
compares in constant time. A refusal is 401 with a machine-readable reason:
`missing_signature`, `bad_signature`, `stale_timestamp`. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from collections.abc import Sequence
from datetime import datetime

from popdrop.core.errors import PopdropError

STANDARD_TOLERANCE_SECONDS = 300
STANDARD_SECRET_PREFIX = "whsec_"  # noqa: S105 (a public marker, not a secret)
_UNAUTHORIZED = 401


def _refuse(reason: str, message: str) -> PopdropError:
    return PopdropError(reason, message, status=_UNAUTHORIZED)


def _b64_hmac(key: bytes, message: bytes) -> bytes:
    return base64.b64encode(hmac.digest(key, message, "sha256"))


def _matches(given: str | None, expected: Sequence[bytes]) -> bool:
    if not given:
        return False
    raw = given.strip().encode()
    # Every candidate is compared (no early exit on the first secret that fails).
    return any([hmac.compare_digest(raw, candidate) for candidate in expected])


def verify_square(
    raw: bytes, signature: str | None, notification_url: str, keys: Sequence[str]
) -> None:
    if not signature:
        raise _refuse("missing_signature", "x-square-hmacsha256-signature is missing")
    url = notification_url.encode()
    if not _matches(signature, [_b64_hmac(k.encode(), url + raw) for k in keys]):
        raise _refuse("bad_signature", "the Square signature does not match")


def verify_shopify(raw: bytes, signature: str | None, secrets_: Sequence[str]) -> None:
    if not signature:
        raise _refuse("missing_signature", "X-Shopify-Hmac-Sha256 is missing")
    if not _matches(signature, [_b64_hmac(s.encode(), raw) for s in secrets_]):
        raise _refuse("bad_signature", "the Shopify signature does not match")


def standard_key(secret: str) -> bytes:
    """The HMAC key a `whsec_<base64>` secret carries."""
    body = secret.removeprefix(STANDARD_SECRET_PREFIX)
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error as exc:
        raise ValueError("a Standard Webhooks secret is whsec_ followed by base64") from exc


def new_standard_secret() -> str:
    """A fresh `whsec_` secret: 32 random bytes."""
    return STANDARD_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign_standard(secret: str, webhook_id: str, timestamp: int, raw: bytes) -> str:
    """The `webhook-signature` a sender puts on `raw` (what tests and the bench send)."""
    content = f"{webhook_id}.{timestamp}.".encode() + raw
    return "v1," + _b64_hmac(standard_key(secret), content).decode()


def verify_standard(
    raw: bytes,
    *,
    webhook_id: str | None,
    timestamp: str | None,
    signature: str | None,
    secrets_: Sequence[str],
    now: datetime,
    tolerance_seconds: int = STANDARD_TOLERANCE_SECONDS,
) -> None:
    if not webhook_id or not timestamp or not signature:
        raise _refuse(
            "missing_signature", "webhook-id, webhook-timestamp and webhook-signature are needed"
        )
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise _refuse("stale_timestamp", "webhook-timestamp is not a Unix time") from None
    if abs(now.timestamp() - sent_at) > tolerance_seconds:
        raise _refuse("stale_timestamp", "webhook-timestamp is more than 5 minutes off")
    content = f"{webhook_id}.{sent_at}.".encode() + raw
    expected = [_b64_hmac(standard_key(s), content) for s in secrets_]
    given = [
        part.split(",", 1)[1].encode()
        for part in signature.split()
        if part.startswith("v1,") and len(part) < 200
    ]
    if not any(hmac.compare_digest(g, e) for g in given for e in expected):
        raise _refuse("bad_signature", "no webhook-signature matches")
