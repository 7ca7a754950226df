"""Per-event Ed25519 private keys, sealed at rest (`core.sealing`).

`checkin_event_keys.private_key` holds a Fernet token under a key derived from the secret
key, never the raw 32 bytes: a database dump (or a read-only SQL injection) cannot mint
tickets. The public key stays in the clear (scanners verify with it).

Rotating the secret key: start every process with the new `POPDROP_SECRET_KEY` and the
old one in `POPDROP_PREVIOUS_SECRET_KEYS` (sealed keys still open), run
`popdrop checkin rotate-keys` (reseals every key under the new one), then drop the old
key from `POPDROP_PREVIOUS_SECRET_KEYS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, update

from popdrop.checkin.models import EventKey
from popdrop.core import sealing
from popdrop.core.db import Database, table_of

PURPOSE = "check-in private key"
RAW_KEY_BYTES = 32

_keys = table_of(EventKey)


def seal_private(raw: bytes) -> bytes:
    return sealing.sealer(PURPOSE).seal(raw)


def open_private(sealed: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(sealing.sealer(PURPOSE).open(sealed))


@dataclass(frozen=True)
class Rotation:
    sealed_raw: int  # stored raw (before migration 0014 ran), now sealed
    resealed: int  # sealed under a previous secret key, now under the current one
    current: int  # already sealed under the current secret key


async def rotate_all(db: Database) -> Rotation:
    """Seal every event key under the current secret key (one transaction).

    Raises `sealing.SealError` naming nothing secret when a key opens with none of the
    configured secret keys (then nothing is written)."""
    sealer = sealing.sealer(PURPOSE)
    raw = resealed = current = 0
    async with db.transaction() as session:
        rows = (
            await session.execute(select(_keys.c.event_id, _keys.c.private_key).with_for_update())
        ).all()
        for event_id, stored in rows:
            stored = bytes(stored)
            if len(stored) == RAW_KEY_BYTES:
                new, raw = sealer.seal(stored), raw + 1
            elif sealer.is_current(stored):
                current += 1
                continue
            else:
                new, resealed = sealer.reseal(stored), resealed + 1
            await session.execute(
                update(_keys).where(_keys.c.event_id == event_id).values(private_key=new)
            )
    return Rotation(sealed_raw=raw, resealed=resealed, current=current)
