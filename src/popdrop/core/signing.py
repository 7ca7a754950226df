"""The one signer (itsdangerous) and the one keyed hash (HMAC-SHA256), both from the secret key.

Every signed value carries a purpose, so a session cookie can never pass as a voucher link.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from popdrop.core.errors import PopdropError


class Signer:
    def __init__(self, secret_key: bytes) -> None:
        self._secret_key = secret_key
        self._hash_key = hmac.new(secret_key, b"popdrop keyed hash v1", hashlib.sha256).digest()
        self._serializers: dict[str, URLSafeTimedSerializer] = {}

    def _serializer(self, purpose: str) -> URLSafeTimedSerializer:
        serializer = self._serializers.get(purpose)
        if serializer is None:
            serializer = URLSafeTimedSerializer(self._secret_key, salt=f"popdrop.{purpose}")
            self._serializers[purpose] = serializer
        return serializer

    def sign(self, purpose: str, payload: Any) -> str:
        return str(self._serializer(purpose).dumps(payload))

    def unsign(self, purpose: str, token: str, max_age: int | None = None) -> Any:
        """Return the payload, or raise `link_invalid` / `link_expired`."""
        try:
            return self._serializer(purpose).loads(token, max_age=max_age)
        except SignatureExpired as exc:
            raise PopdropError("link_expired", "this link has expired") from exc
        except BadSignature as exc:
            raise PopdropError("link_invalid", "this link is not valid") from exc

    def keyed_hash(self, value: str) -> bytes:
        """HMAC-SHA256 of a secret (voucher code, API token) for storage and lookup."""
        return hmac.digest(self._hash_key, value.encode(), "sha256")

    def mac(self, purpose: str, value: str) -> bytes:
        """A purpose-bound MAC, used to derive values (e.g. per-recipient codes)."""
        return hmac.new(self._secret_key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
