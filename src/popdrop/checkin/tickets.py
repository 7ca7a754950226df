"""Ticket secrets: a compact payload signed with the event's Ed25519 key.

A secret is base64url (no padding) of `payload || signature` where the payload is
`version (1 byte) | event_id (8) | ticket_id (8) | generation (4) | issued epoch (4)`,
big-endian, and the signature is Ed25519 (64 bytes) over the payload: 89 bytes, 119
characters, which fits a QR code at error level M comfortably.

Anyone with the event's public key can verify a secret offline (`verify_offline`); the
database is only needed for state (checked in, cancelled, revoked, re-issued). A re-issue
bumps `generation`, so the older secret stops working: the server compares generations,
and an offline scanner learns the current ones with the revocation list.

Ed25519 signatures are deterministic, so the secret of a ticket can be rebuilt from the
ticket row at any time: it is never stored.

A ticket also has a short code for people to type when no camera reads the QR: 8
characters of Crockford's base32 (no I, L, O or U) taken from a hash of the secret's
signature, and a check character (Luhn mod 32, as voucher codes have), shown grouped as
`K7QM-4XT2-9`. Being derived from the signature, it changes with every re-issue like the
secret does; the server stores it with the ticket (unique per event) to find its ticket.
`parse_short_code` accepts any case, dashes and spaces, and I/L for 1 and O for 0.

Nothing here touches the database; this module is usable on its own (scanner apps).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from popdrop.vouchers.codes import ALPHABET, check_char

VERSION = 1
_PAYLOAD = struct.Struct(">BQQII")
PAYLOAD_BYTES = _PAYLOAD.size  # 25
SIGNATURE_BYTES = 64
SECRET_BYTES = PAYLOAD_BYTES + SIGNATURE_BYTES
SECRET_CHARS = (SECRET_BYTES * 4 + 2) // 3  # 119, base64url without padding
MAX_ID = 2**62

OfflineReason = Literal["ok", "invalid", "revoked"]

# Crockford's base32 and Luhn mod 32, as voucher codes have them.
_VALUE = {char: index for index, char in enumerate(ALPHABET)}
_VALUE.update({"I": 1, "L": 1, "O": 0})  # what people type for 1 and 0
CODE_DATA_CHARS = 8  # 40 bits
SHORT_CODE_CHARS = CODE_DATA_CHARS + 1  # with the check character
_CODE_DOMAIN = b"popdrop ticket short code v1\x00"
_SEPARATORS = str.maketrans("", "", "- \t")


@dataclass(frozen=True)
class TicketClaim:
    """What a secret says, before anyone checked the signature."""

    event_id: int
    ticket_id: int
    generation: int
    issued_epoch: int
    payload: bytes
    signature: bytes


def new_keypair() -> tuple[bytes, bytes]:
    """(private, public) raw 32-byte keys for one event."""
    private = Ed25519PrivateKey.generate()
    raw_private = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    raw_public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return raw_private, raw_public


def sign(
    private_key: bytes | Ed25519PrivateKey,
    *,
    event_id: int,
    ticket_id: int,
    generation: int,
    issued_epoch: int,
) -> str:
    key = (
        private_key
        if isinstance(private_key, Ed25519PrivateKey)
        else Ed25519PrivateKey.from_private_bytes(private_key)
    )
    payload = _PAYLOAD.pack(VERSION, event_id, ticket_id, generation, issued_epoch)
    return b64encode(payload + key.sign(payload))


def parse(secret: str) -> TicketClaim | None:
    """Split a secret into its claim; None when it cannot be one (no signature check)."""
    if len(secret) != SECRET_CHARS or not secret.isascii():
        return None
    try:
        raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != SECRET_BYTES or b64encode(raw) != secret:  # one spelling per secret
        return None
    payload, signature = raw[:PAYLOAD_BYTES], raw[PAYLOAD_BYTES:]
    version, event_id, ticket_id, generation, issued = _PAYLOAD.unpack(payload)
    if version != VERSION or not (1 <= event_id <= MAX_ID and 1 <= ticket_id <= MAX_ID):
        return None
    return TicketClaim(event_id, ticket_id, generation, issued, payload, signature)


def public_key_of(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def signature_ok(public_key: Ed25519PublicKey, claim: TicketClaim) -> bool:
    try:
        public_key.verify(claim.signature, claim.payload)
    except InvalidSignature:
        return False
    return True


def verify_offline(
    public_key: bytes | Ed25519PublicKey,
    secret: str,
    revoked_ids: Collection[int] = (),
    generations: Mapping[int, int] | None = None,
    *,
    event_id: int | None = None,
) -> tuple[OfflineReason, TicketClaim | None]:
    """Check a secret with only the event's public key and the synced revocation list.

    Returns ("ok", claim), ("invalid", None) for anything forged, malformed or signed for
    another event, or ("revoked", claim) for a revoked/cancelled ticket or a secret older
    than the ticket's current generation. Double entry cannot be seen offline: the
    scanner uploads its scans (`POST /api/v1/checkins/batch`) and the server decides.
    """
    claim = parse(secret)
    if claim is None or (event_id is not None and claim.event_id != event_id):
        return "invalid", None
    key = public_key if isinstance(public_key, Ed25519PublicKey) else public_key_of(public_key)
    if not signature_ok(key, claim):
        return "invalid", None
    if claim.ticket_id in revoked_ids:
        return "revoked", claim
    if generations is not None and generations.get(claim.ticket_id, 0) != claim.generation:
        return "revoked", claim
    return "ok", claim


def short_code(secret: str) -> str:
    """The short code of a secret (9 characters, no dashes; `format_short_code` groups it)."""
    raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    digest = int.from_bytes(hashlib.sha256(_CODE_DOMAIN + raw[PAYLOAD_BYTES:]).digest()[:5])
    data = "".join(ALPHABET[(digest >> shift) & 31] for shift in range(35, -1, -5))
    return data + check_char(data)


def printed_short_code(secret: str) -> str | None:
    """The grouped short code of a secret, as printed under its QR; None when `secret`
    is not shaped like one (nothing to print)."""
    return None if parse(secret) is None else format_short_code(short_code(secret))


def format_short_code(code: str) -> str:
    """`K7QM4XT29` -> `K7QM-4XT2-9` (how it is printed)."""
    return f"{code[:4]}-{code[4:8]}-{code[8:]}"


def looks_like_short_code(text: str) -> bool:
    """True when `text` is shaped like a short code (9 base32 characters once dashes and
    spaces are gone), right check character or not; a 119-character secret never is."""
    plain = text.translate(_SEPARATORS).upper()
    return len(plain) == SHORT_CODE_CHARS and all(c in _VALUE for c in plain)


def parse_short_code(text: str) -> str | None:
    """The canonical short code typed as `text`, or None when its check character is wrong."""
    if not looks_like_short_code(text):
        return None
    plain = text.translate(_SEPARATORS).upper()
    canonical = "".join(ALPHABET[_VALUE[c]] for c in plain)
    data, check = canonical[:CODE_DATA_CHARS], canonical[CODE_DATA_CHARS:]
    return canonical if check_char(data) == check else None


def b64encode(raw: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def base64_decode(text: str) -> bytes:
    """base64url without padding (the public key in the check-in key document)."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
