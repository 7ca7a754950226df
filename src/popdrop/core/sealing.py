"""Data sealed at rest under keys derived from the secret key (the `cryptography` package).

A `Sealer` for a purpose derives one key per secret key with HKDF-SHA256 (`info` names the
purpose, so two purposes never share a key) and seals with Fernet (AES-128-CBC and
HMAC-SHA256, a random IV, a versioned token). It opens tokens sealed under the current
secret key or any previous one (`POPDROP_PREVIOUS_SECRET_KEYS`), and `reseal` moves a
token to the current key: that is the rotation path (see `popdrop checkin rotate-keys`).

The process's keys are set once at start-up (`configure`); until then they are read from
the environment's settings (`Settings()`), which is what every entry point runs on.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from popdrop.core.config import Settings


class SealError(Exception):
    """A sealed value none of the configured secret keys opens (or not a sealed value)."""


def _fernet(secret_key: bytes, purpose: str) -> Fernet:
    raw = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=f"popdrop sealing v1: {purpose}".encode(),
    ).derive(secret_key)
    return Fernet(base64.urlsafe_b64encode(raw))


class Sealer:
    def __init__(self, purpose: str, secret_key: bytes, previous: Sequence[bytes] = ()) -> None:
        self.purpose = purpose
        self._current = _fernet(secret_key, purpose)
        self._any = MultiFernet(
            [self._current, *(_fernet(k, purpose) for k in previous if k != secret_key)]
        )

    def seal(self, data: bytes) -> bytes:
        return self._current.encrypt(data)

    def open(self, token: bytes) -> bytes:
        try:
            return self._any.decrypt(token)
        except InvalidToken as exc:
            raise SealError(
                f"a sealed {self.purpose} is not readable with the secret key nor with "
                "POPDROP_PREVIOUS_SECRET_KEYS"
            ) from exc

    def is_current(self, token: bytes) -> bool:
        """True when `token` is sealed under the current secret key."""
        try:
            self._current.decrypt(token)
        except InvalidToken:
            return False
        return True

    def reseal(self, token: bytes) -> bytes:
        """`token` sealed again under the current secret key (rotation)."""
        try:
            return self._any.rotate(token)
        except InvalidToken as exc:
            raise SealError(f"a sealed {self.purpose} cannot be opened to reseal it") from exc


_keys: tuple[bytes, tuple[bytes, ...]] | None = None


def configure(secret_key: bytes, previous: Sequence[bytes] = ()) -> None:
    """Set this process's secret key and the previous ones (called by the entry points)."""
    global _keys  # one deployment constant, set at start-up
    _keys = (secret_key, tuple(previous))


def configure_from(settings: Settings) -> None:
    configure(settings.resolved_secret_key, settings.resolved_previous_secret_keys)


def sealer(purpose: str) -> Sealer:
    """The sealer for `purpose` under the configured keys (or the environment's)."""
    if _keys is None:
        configure_from(Settings())
    assert _keys is not None
    return _sealer(purpose, *_keys)


@cache
def _sealer(purpose: str, secret_key: bytes, previous: tuple[bytes, ...]) -> Sealer:
    return Sealer(purpose, secret_key, previous)
