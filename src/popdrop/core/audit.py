"""The append-only, hash-chained audit ledger.

Each organization's ledger is a number of parallel hash chains, so concurrent writers
queue per chain instead of on one global lock. An entry lands on the chain picked by its
subject (one subject's history stays in order on one chain). The number of chains is a
deployment constant (`Settings.audit_chains`), given to the ledger once per process at
start-up with `configure` (the app, worker, CLI and demo do it); callers never pass it.
Verification does not depend on it: `verify` walks whatever chains exist, so a changed
count still verifies (later entries of a subject may then land on another chain).

Each entry stores `hash = sha256(prev_hash || entry_digest)`, where the entry digest
covers every field, including the digest of its payload. `verify` recomputes every
chain and checks that each chain's head matches its last entry, so an edited, inserted
or dropped entry shows.
On PostgreSQL a trigger (see the migration) refuses UPDATE, DELETE and TRUNCATE.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.dml import Update
from sqlalchemy.sql.elements import ColumnElement

from popdrop.core.config import DEFAULT_AUDIT_CHAINS
from popdrop.core.db import (
    AUDIT_WRITE_ORDER,
    Base,
    BigId,
    UTCDateTime,
    defer_write,
    dialect_insert,
    table_of,
)

GENESIS = "0" * 64


class AuditEntry(Base):
    __tablename__ = "audit_entries"
    __table_args__ = (UniqueConstraint("org_id", "chain", "seq"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    chain: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(200), index=True)
    payload: Mapped[str] = mapped_column(Text)
    payload_digest: Mapped[str] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    __tablename__ = "audit_heads"

    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    chain: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def payload_digest(payload_text: str) -> str:
    return hashlib.sha256(payload_text.encode()).hexdigest()


def entry_digest(entry: AuditEntry) -> str:
    """Digest of every field of an entry but its own links."""
    fields = {
        "org": entry.org_id,
        "chain": entry.chain,
        "seq": entry.seq,
        "at": entry.at.isoformat(),
        "actor": entry.actor,
        "action": entry.action,
        "subject": entry.subject,
        "payload": entry.payload_digest,
    }
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()


def expected_hash(prev_hash: str, entry: AuditEntry) -> str:
    return chain_hash(prev_hash, entry_digest(entry))


def chain_hash(prev_hash: str, digest: str) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + bytes.fromhex(digest)).hexdigest()


_configured_chains = DEFAULT_AUDIT_CHAINS


def configure(*, chains: int) -> None:
    """Set the number of chains per organization for this process.

    Called once at start-up by every entry point (`app.build_context`, the worker, the
    CLI, the demo) with `Settings.audit_chains`; until then the ledger uses the settings'
    default. The value is per process: building a context from other settings configures
    the ledger anew.
    """
    if chains < 1:
        raise ValueError(f"audit chains must be at least 1, not {chains}")
    global _configured_chains  # one deployment constant, set at start-up
    _configured_chains = chains


def chain_count() -> int:
    """The number of chains per organization this process writes to."""
    return _configured_chains


def chain_for(subject: str) -> int:
    """`kind:<number>` subjects go to chain number % chain_count() (the database can
    compute that too, see vouchers.service); any other subject by a checksum."""
    chains = _configured_chains
    _kind, _, ident = subject.partition(":")
    if ident.isascii() and ident.isdigit():  # not "³": str.isdigit() says yes to it
        return int(ident) % chains
    return zlib.crc32(subject.encode()) % chains


_heads = table_of(AuditHead)
_entries_table = table_of(AuditEntry)
# Built once: the append runs on every redemption, so it must not rebuild statements.
# Bumping `seq` locks the head row until commit and returns the *previous* hash (the
# UPDATE leaves `hash` alone); the new hash is written once computed.
_BUMP_HEAD = (
    update(_heads)
    .where(_heads.c.org_id == bindparam("h_org"), _heads.c.chain == bindparam("h_chain"))
    .values(seq=_heads.c.seq + 1)
    .returning(_heads.c.seq, _heads.c.hash)
)


def bump_head_statement(chain: ColumnElement[int]) -> Update:
    """`_BUMP_HEAD` for a chain computed in SQL (for statements fused with the caller's)."""
    return (
        update(_heads)
        .where(_heads.c.org_id == bindparam("h_org"), _heads.c.chain == chain)
        .values(seq=_heads.c.seq + 1)
        .returning(_heads.c.seq, _heads.c.hash)
    )


_SET_HEAD = (
    update(_heads)
    .where(_heads.c.org_id == bindparam("h_org"), _heads.c.chain == bindparam("h_chain"))
    .values(hash=bindparam("h_hash"))
)
_ENTRY_COLUMNS = (
    "org_id", "chain", "seq", "at", "actor", "action", "subject", "payload",
    "payload_digest", "prev_hash", "hash",
)  # fmt: skip
# Own parameter names: in the fused statement below, names equal to audit_heads columns
# would otherwise be taken as SET values of the head update.
_INSERT_ENTRY = insert(_entries_table).values(
    {name: bindparam(f"e_{name}", type_=_entries_table.c[name].type) for name in _ENTRY_COLUMNS}
)
# PostgreSQL: the head's new hash and the entry in one round trip.
_SET_HEAD_AND_INSERT = _INSERT_ENTRY.add_cte(_SET_HEAD.cte("set_head"))


async def append(
    session: AsyncSession,
    *,
    org_id: int,
    actor: str,
    action: str,
    subject: str,
    payload: dict[str, Any],
    at: datetime,
) -> None:
    """Append one entry inside the caller's transaction, on its subject's chain.

    The chain head stays row-locked until the caller commits, so entries of one chain
    are appended one at a time and in order. In a transaction that defers hot writes
    (`db.defer_hot_writes`) the append runs just before the commit.
    """
    chain = chain_for(subject)

    async def write() -> None:
        conn = await session.connection()
        seq, prev = await bump_head(conn, org_id, chain)
        await write_entry(
            conn,
            org_id=org_id,
            chain=chain,
            seq=seq,
            prev=prev,
            actor=actor,
            action=action,
            subject=subject,
            payload=payload,
            at=at,
        )

    if not defer_write(session, (AUDIT_WRITE_ORDER, chain), write):
        await write()


async def bump_head(conn: AsyncConnection, org_id: int, chain: int) -> tuple[int, str]:
    """Lock a chain head and take its next sequence number; return (seq, previous hash)."""
    head = {"h_org": org_id, "h_chain": chain}
    bumped = (await conn.execute(_BUMP_HEAD, head)).first()
    if bumped is None:  # the chain's first entry: create its head, then take it
        await conn.execute(
            dialect_insert(conn.dialect.name, _heads)
            .values(org_id=org_id, chain=chain, seq=0, hash=GENESIS)
            .on_conflict_do_nothing()
        )
        bumped = (await conn.execute(_BUMP_HEAD, head)).first()
        assert bumped is not None
    return int(bumped[0]), str(bumped[1])


async def write_entry(
    conn: AsyncConnection,
    *,
    org_id: int,
    chain: int,
    seq: int,
    prev: str,
    actor: str,
    action: str,
    subject: str,
    payload: dict[str, Any],
    at: datetime,
) -> str:
    """Write the entry for a head already bumped by this transaction, and the new head."""
    text = canonical_json(payload)
    entry = AuditEntry(
        org_id=org_id,
        chain=chain,
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        subject=subject,
        payload=text,
        payload_digest=payload_digest(text),
        prev_hash=prev,
    )
    own = expected_hash(prev, entry)
    row = {
        "e_org_id": org_id,
        "e_chain": chain,
        "e_seq": seq,
        "e_at": at,
        "e_actor": actor,
        "e_action": action,
        "e_subject": subject,
        "e_payload": text,
        "e_payload_digest": entry.payload_digest,
        "e_prev_hash": prev,
        "e_hash": own,
    }
    head = {"h_org": org_id, "h_chain": chain, "h_hash": own}
    if conn.dialect.name == "postgresql":
        await conn.execute(_SET_HEAD_AND_INSERT, {**row, **head})
    else:
        await conn.execute(_SET_HEAD, head)
        await conn.execute(_INSERT_ENTRY, row)
    return own


@dataclass
class VerifyResult:
    ok: bool
    entries: int
    broken_entry_id: int | None = None
    org_id: int | None = None
    chain: int | None = None
    seq: int | None = None
    problem: str | None = None

    def describe(self) -> str:
        if self.ok:
            return f"OK {self.entries} entries"
        return (
            f"BROKEN at entry id={self.broken_entry_id} org={self.org_id} chain={self.chain} "
            f"seq={self.seq}: {self.problem}"
        )


async def _entries(session: AsyncSession, org_id: int | None) -> AsyncIterator[AuditEntry]:
    query = select(AuditEntry).order_by(AuditEntry.org_id, AuditEntry.chain, AuditEntry.seq)
    if org_id is not None:
        query = query.where(AuditEntry.org_id == org_id)
    result = await session.stream_scalars(query.execution_options(yield_per=2000))
    async for entry in result:
        yield entry


async def verify(session: AsyncSession, org_id: int | None = None) -> VerifyResult:
    """Walk every chain (or one organization's, for a tenant's own page); report the first
    entry whose content or link does not hold."""
    head_query = select(AuditHead)
    if org_id is not None:
        head_query = head_query.where(AuditHead.org_id == org_id)
    heads = {(h.org_id, h.chain): (h.seq, h.hash) for h in (await session.scalars(head_query))}
    count = 0
    current: tuple[int, int] | None = None
    prev = GENESIS
    expected_seq = 1
    seen: set[tuple[int, int]] = set()

    def broken(entry: AuditEntry, problem: str) -> VerifyResult:
        return VerifyResult(False, count, entry.id, entry.org_id, entry.chain, entry.seq, problem)

    async for entry in _entries(session, org_id):
        key = (entry.org_id, entry.chain)
        if key != current:
            if current is not None and heads.get(current) != (expected_seq - 1, prev):
                return _head_mismatch(current, count)
            current, prev, expected_seq = key, GENESIS, 1
            seen.add(key)
        if entry.seq != expected_seq:
            return broken(entry, f"sequence gap: expected seq {expected_seq}")
        if entry.prev_hash != prev:
            return broken(entry, "previous-hash link does not match the entry before it")
        if payload_digest(entry.payload) != entry.payload_digest:
            return broken(entry, "payload does not match its digest")
        if expected_hash(prev, entry) != entry.hash:
            return broken(entry, "entry hash does not match its content")
        prev = entry.hash
        expected_seq += 1
        count += 1
    if current is not None and heads.get(current) != (expected_seq - 1, prev):
        return _head_mismatch(current, count)
    for key, (seq, _hash) in heads.items():
        if key not in seen and seq != 0:
            return _head_mismatch(key, count)
    return VerifyResult(True, count)


def _head_mismatch(key: tuple[int, int], count: int) -> VerifyResult:
    return VerifyResult(
        False,
        count,
        org_id=key[0],
        chain=key[1],
        problem="chain head does not match its last entry (entries dropped or added)",
    )
