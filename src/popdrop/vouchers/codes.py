"""Voucher code format: Crockford base32, 60 random bits, Luhn mod 32 check character.

Printed as `[PREFIX-]XXXX-XXXX-XXXX-C`. On input, case, dashes and spaces do not matter and
the look-alikes O→0, I/L→1 are folded (Crockford decoding), so a code read aloud or typed
from paper works; a wrong check character is refused before any database lookup.
"""

from __future__ import annotations

import re
import secrets

from popdrop.core.errors import PopdropError

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_VALUE = {ch: i for i, ch in enumerate(ALPHABET)}
_FOLD = str.maketrans({"O": "0", "I": "1", "L": "1", "-": None, " ": None})
BODY_CHARS = 12  # 12 x 5 bits = 60 bits from `secrets`
BODY_BITS = BODY_CHARS * 5
MAX_PREFIX = 6
_PREFIX = re.compile(f"^[{ALPHABET}]{{1,{MAX_PREFIX}}}$")


def check_char(text: str) -> str:
    """Luhn mod N (N=32): catches every single-character error and adjacent swaps."""
    factor, total = 2, 0
    for ch in reversed(text):
        addend = factor * _VALUE[ch]
        total += addend // 32 + addend % 32
        factor = 1 if factor == 2 else 2
    return ALPHABET[(32 - total % 32) % 32]


def _check_holds(text: str) -> bool:
    factor, total = 1, 0
    for ch in reversed(text):
        addend = factor * _VALUE[ch]
        total += addend // 32 + addend % 32
        factor = 1 if factor == 2 else 2
    return total % 32 == 0


def validate_prefix(prefix: str | None) -> str:
    if not prefix:
        return ""
    folded = prefix.upper()
    if not _PREFIX.match(folded):
        raise PopdropError(
            "invalid_request",
            f"prefix: 1-{MAX_PREFIX} characters from {ALPHABET} (no I, L, O, U)",
        )
    return folded


def body_from_int(value: int) -> str:
    chars = []
    for _ in range(BODY_CHARS):
        value, digit = divmod(value, 32)
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))


def new_code(prefix: str = "") -> str:
    """A fresh normalized code (prefix + body + check), no dashes."""
    core = prefix + body_from_int(secrets.randbits(BODY_BITS))
    return core + check_char(core)


def derived_code(prefix: str, mac: bytes) -> str:
    """A code whose body comes from a MAC (re-derivable for one recipient at send time)."""
    core = prefix + body_from_int(int.from_bytes(mac[:8], "big") >> (64 - BODY_BITS))
    return core + check_char(core)


def format_code(normalized: str) -> str:
    """`PREFIX-XXXX-XXXX-XXXX-C` for people."""
    prefix = normalized[: len(normalized) - BODY_CHARS - 1]
    body = normalized[len(prefix) : -1]
    groups = [body[i : i + 4] for i in range(0, BODY_CHARS, 4)]
    parts = ([prefix] if prefix else []) + groups + [normalized[-1]]
    return "-".join(parts)


def normalize(raw: str) -> str:
    """Canonical form of user input, or `malformed` with what is wrong."""
    if not isinstance(raw, str) or len(raw) > 64:
        raise PopdropError("malformed", "a voucher code has 13 to 19 characters")
    folded = raw.strip().upper().translate(_FOLD)
    if not BODY_CHARS + 1 <= len(folded) <= BODY_CHARS + 1 + MAX_PREFIX:
        raise PopdropError("malformed", "a voucher code has 13 to 19 characters")
    bad = sorted({ch for ch in folded if ch not in _VALUE})
    if bad:
        raise PopdropError("malformed", f"characters not used in codes: {''.join(bad)}")
    if not _check_holds(folded):
        raise PopdropError(
            "malformed", "the check character does not match: a character is mistyped"
        )
    return folded
