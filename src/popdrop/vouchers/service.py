"""Voucher vault operations. Every function takes the caller's session and `now`.

Consuming a use is one conditional `UPDATE vouchers SET uses = uses + 1 WHERE … AND
uses < max_uses … RETURNING`: the database serialises concurrent redemptions on the row,
so a code can never be spent more often than `max_uses`. Per-contact limits and budgets
are further conditional updates in the same transaction; any refusal rolls back all.

`redeem_now` (the API's path without an Idempotency-Key) runs a redemption in a
transaction of its own; on PostgreSQL concurrent ones share one (group commit, see
"grouped redeem" below) with the same conditions in the statement, and anything the group
does not take goes down `redeem` alone, so every caller gets the answer it would get alone.

Over 900 lines on purpose: it is one aggregate, the vault. Issue, redeem, rollback, revoke,
reads and claim links share the batch policy cache, the code lookup and the status rules
(`_find`, `_status`, `_refuse`, `_policy`); splitting them would export those internals
and let a second copy of a redemption rule grow elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, String, bindparam, func, insert, or_, select, text, true, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from popdrop.accounts.service import Principal
from popdrop.core import audit, links
from popdrop.core.cache import ProcessCache
from popdrop.core.db import Database, UTCDateTime, dialect_insert, table_of
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.group_commit import GroupCommit, GroupFailed, for_loop
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned
from popdrop.vouchers import codes
from popdrop.vouchers.models import Redemption, Voucher, VoucherBatch, VoucherContactUse
from popdrop.vouchers.schemas import (
    BatchCreate,
    BatchOut,
    BatchStats,
    Discount,
    RedeemResult,
    RedemptionOut,
    VoucherOut,
)

INSERT_CHUNK = 5_000
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BatchPolicy:
    """The parts of a batch that never change after issue, so they can be cached."""

    org_id: int
    name: str
    per_contact_limit: int | None
    budget_minor: int | None
    cost_per_use_minor: int
    discount: Discount


# Keyed by (database, batch id): a process may talk to more than one database (tests).
_POLICIES: ProcessCache[tuple[str, int], BatchPolicy] = ProcessCache(maxsize=4_096)


def discount_of(batch: VoucherBatch) -> Discount:
    return Discount(
        kind=batch.discount_kind,
        value=batch.discount_value,
        currency=batch.currency,
        description=batch.discount_description or describe_discount(batch),
    )


def describe_discount(batch: VoucherBatch) -> str:
    if batch.discount_kind == "percent":
        return f"{batch.discount_value}% off"
    if batch.discount_kind == "fixed":
        from popdrop.core.money import Money

        return f"{Money(batch.discount_value, batch.currency)} off"
    return "a free item"


def batch_out(batch: VoucherBatch) -> BatchOut:
    return BatchOut(
        id=batch.id,
        name=batch.name,
        tag=batch.tag,
        prefix=batch.prefix,
        quantity=batch.quantity,
        max_uses=batch.max_uses,
        valid_from=batch.valid_from,
        valid_until=batch.valid_until,
        ttl_seconds=batch.ttl_seconds,
        per_contact_limit=batch.per_contact_limit,
        currency=batch.currency,
        budget_minor=batch.budget_minor,
        budget_spent_minor=batch.budget_spent_minor,
        cost_per_use_minor=batch.cost_per_use_minor,
        discount=discount_of(batch),
        event_ref=batch.event_ref,
        offer_ref=batch.offer_ref,
        created_at=batch.created_at,
        revoked_at=batch.revoked_at,
    )


async def _policy(session: AsyncSession, batch_id: int) -> BatchPolicy:
    key = (str(session.get_bind().engine.url), batch_id)
    policy = _POLICIES.get(key)
    if policy is None:
        batch = await session.get(VoucherBatch, batch_id)
        if batch is None:
            raise not_found("batch")
        policy = BatchPolicy(
            org_id=batch.org_id,
            name=batch.name,
            per_contact_limit=batch.per_contact_limit,
            budget_minor=batch.budget_minor,
            cost_per_use_minor=batch.cost_per_use_minor,
            discount=discount_of(batch),
        )
        _POLICIES.put(key, policy)
    return policy


# ---------------------------------------------------------------- issue


async def new_batch(
    session: AsyncSession, principal: Principal, spec: BatchCreate, *, now: datetime
) -> VoucherBatch:
    """The batch row of `spec`, checked and flushed, without codes (`issue_batch` and the
    background issue jobs add them)."""
    principal.require("vouchers:write")
    prefix = codes.validate_prefix(spec.prefix)
    valid_until = spec.valid_until
    if valid_until is not None and valid_until <= now:
        raise PopdropError("invalid_request", "valid_until is already in the past")
    batch = VoucherBatch(
        org_id=principal.org_id,
        name=spec.name,
        tag=spec.tag,
        prefix=prefix,
        quantity=spec.quantity,
        max_uses=spec.max_uses,
        valid_from=spec.valid_from,
        valid_until=valid_until,
        ttl_seconds=spec.ttl_seconds,
        per_contact_limit=spec.per_contact_limit,
        currency=spec.currency,
        budget_minor=spec.budget_minor,
        budget_spent_minor=0,
        cost_per_use_minor=spec.effective_cost_minor,
        discount_kind=spec.discount_kind,
        discount_value=spec.discount_value,
        discount_description=spec.discount_description,
        event_ref=spec.event_ref,
        offer_ref=spec.offer_ref,
        created_at=now,
        created_by=principal.actor,
    )
    session.add(batch)
    await session.flush()
    return batch


def voucher_row(batch: VoucherBatch, code_hash: bytes, *, now: datetime) -> dict[str, Any]:
    """The `vouchers` row of one code of `batch` issued at `now` (a code of a revoked
    batch is born revoked: the offer is over)."""
    return {
        "org_id": batch.org_id,
        "batch_id": batch.id,
        "code_hash": code_hash,
        "uses": 0,
        "max_uses": batch.max_uses,
        "valid_from": batch.valid_from,
        "valid_until": _voucher_until(batch.valid_until, batch.ttl_seconds, now),
        "issued_at": now,
        "revoked_at": batch.revoked_at,
    }


async def issue_batch(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    spec: BatchCreate,
    *,
    now: datetime,
    progress: Progress | None = None,
) -> tuple[VoucherBatch, list[str]]:
    """Create a batch and its codes; return the plaintext codes (the only time they exist)."""
    batch = await new_batch(session, principal, spec, now=now)
    prefix = batch.prefix
    plaintext: list[str] = []
    seen: set[bytes] = set()
    digest = hashlib.sha256()
    table = _vouchers
    while len(plaintext) < spec.quantity:
        rows: list[dict[str, Any]] = []
        while len(rows) < INSERT_CHUNK and len(plaintext) < spec.quantity:
            code = codes.new_code(prefix)
            code_hash = signer.keyed_hash(code)
            if code_hash in seen:  # 2^-60 per pair; cheap to rule out within a batch
                continue
            seen.add(code_hash)
            digest.update(code_hash)
            plaintext.append(code)
            rows.append(voucher_row(batch, code_hash, now=now))
        await session.execute(table.insert(), rows)
        if progress:
            progress(len(plaintext), spec.quantity)
    await audit_issue(session, principal, batch, now=now, code_hashes_sha256=digest.hexdigest())
    return batch, [codes.format_code(c) for c in plaintext]


async def audit_issue(
    session: AsyncSession,
    principal: Principal,
    batch: VoucherBatch,
    *,
    now: datetime,
    **more: str | int,
) -> None:
    """The `voucher.issue` ledger entry of a batch (and `more` about how it was issued)."""
    await audit.append(
        session,
        org_id=principal.org_id,
        actor=principal.actor,
        action="voucher.issue",
        subject=f"batch:{batch.id}",
        payload={
            "batch": batch.id,
            "name": batch.name,
            "quantity": batch.quantity,
            "max_uses": batch.max_uses,
            **more,
        },
        at=now,
    )


async def issue_derived(
    session: AsyncSession,
    signer: Signer,
    batch: VoucherBatch,
    subjects: Sequence[str],
    *,
    now: datetime,
) -> dict[str, tuple[int, str]]:
    """The single-use codes of recipients of an open batch (a drop's per-recipient
    vouchers), one per subject: each derived from a MAC of (batch, subject), so sending
    again after a crash hands out the same code instead of a second one. One insert and
    one read for the lot. Returns {subject: (voucher id, formatted code)}."""
    if not subjects:
        return {}
    by_hash: dict[bytes, tuple[str, str]] = {}
    for subject in subjects:
        code = codes.derived_code(batch.prefix, links.derived_code_mac(signer, batch.id, subject))
        by_hash[signer.keyed_hash(code)] = (subject, codes.format_code(code))
    conn = await session.connection()
    # executemany of one cached statement: a multi-row VALUES would be compiled afresh for
    # every batch (1,800 bind parameters for 200 codes), which cost more than the insert.
    await conn.execute(
        dialect_insert(conn.dialect.name, _vouchers).on_conflict_do_nothing(
            index_elements=["code_hash"]
        ),
        [voucher_row(batch, code_hash, now=now) for code_hash in by_hash],
    )
    found = await conn.execute(
        select(Voucher.id, Voucher.code_hash).where(Voucher.code_hash.in_(list(by_hash)))
    )
    issued: dict[str, tuple[int, str]] = {}
    for voucher_id, code_hash in found:
        subject, code = by_hash[bytes(code_hash)]
        issued[subject] = (int(voucher_id), code)
    return issued


def _voucher_until(
    valid_until: datetime | None, ttl_seconds: int | None, issued_at: datetime
) -> datetime | None:
    """A code expires at the batch end or `ttl` after its issue, whichever comes first."""
    candidates = [t for t in (valid_until,) if t is not None]
    if ttl_seconds:
        candidates.append(issued_at + timedelta(seconds=ttl_seconds))
    return min(candidates) if candidates else None


# ---------------------------------------------------------------- redeem


def _status(voucher: Voucher, now: datetime) -> str:
    if voucher.revoked_at is not None:
        return "revoked"
    if voucher.valid_from is not None and voucher.valid_from > now:
        return "not_yet_valid"
    if voucher.valid_until is not None and voucher.valid_until <= now:
        return "expired"
    if voucher.uses >= voucher.max_uses:
        return "exhausted"
    return "valid"


_REFUSAL_TEXT = {
    "revoked": "this code was revoked",
    "not_yet_valid": "this code is not valid yet",
    "expired": "this code has expired",
    "exhausted": "this code has been used up",
}


def _refuse(voucher: Voucher, now: datetime) -> PopdropError:
    status = _status(voucher, now)
    detail: dict[str, Any] = {}
    if status == "not_yet_valid" and voucher.valid_from:
        detail["valid_from"] = voucher.valid_from.isoformat()
    if status == "expired" and voucher.valid_until:
        detail["valid_until"] = voucher.valid_until.isoformat()
    return PopdropError(status, _REFUSAL_TEXT.get(status, "not usable"), detail=detail)


async def _find(session: AsyncSession, org_id: int, code_hash: bytes) -> Voucher:
    voucher = await session.scalar(
        select(Voucher).where(Voucher.code_hash == code_hash, Voucher.org_id == org_id)
    )
    if voucher is None:
        raise PopdropError("unknown", "no such voucher code")
    return voucher


_vouchers = table_of(Voucher)
_batches = table_of(VoucherBatch)
_now = bindparam("now", type_=UTCDateTime())
# Built once at import: redemption is the hot path and must not rebuild statements.
_TAKE_USE = (
    update(_vouchers)
    .where(
        _vouchers.c.code_hash == bindparam("v_code_hash"),
        _vouchers.c.org_id == bindparam("v_org_id"),
        _vouchers.c.revoked_at.is_(None),
        _vouchers.c.uses < _vouchers.c.max_uses,
        or_(_vouchers.c.valid_from.is_(None), _vouchers.c.valid_from <= _now),
        or_(_vouchers.c.valid_until.is_(None), _vouchers.c.valid_until > _now),
    )
    .values(uses=_vouchers.c.uses + 1)
    .returning(_vouchers.c.id, _vouchers.c.batch_id, _vouchers.c.uses, _vouchers.c.max_uses)
)
_SPEND_BUDGET = (
    update(_batches)
    .where(
        _batches.c.id == bindparam("b_id"),
        _batches.c.budget_spent_minor + bindparam("cost") <= _batches.c.budget_minor,
    )
    .values(budget_spent_minor=_batches.c.budget_spent_minor + bindparam("cost"))
    .returning(_batches.c.id)
)
_redemptions = table_of(Redemption)
_INSERT_REDEMPTION = insert(_redemptions).returning(_redemptions.c.id)

# PostgreSQL: take the use, record the redemption and lock the audit chain head in one
# round trip. The chain is voucher id % audit.chain_count(), as `audit.chain_for("voucher:<id>")`.
_taken = _TAKE_USE.cte("taken")
_RECORDED_COLUMNS = [
    "org_id", "voucher_id", "batch_id", "contact_ref", "order_ref", "cost_minor",
    "redeemed_at", "actor",
]  # fmt: skip
_recorded = (
    insert(_redemptions)
    .from_select(
        _RECORDED_COLUMNS,
        select(
            bindparam("v_org_id"),
            _taken.c.id,
            _taken.c.batch_id,
            bindparam("r_contact", type_=String()),
            bindparam("r_order", type_=String()),
            _batches.c.cost_per_use_minor,
            _now,
            bindparam("r_actor", type_=String()),
        ).select_from(_taken.join(_batches, _batches.c.id == _taken.c.batch_id)),
    )
    .returning(_redemptions.c.id, _redemptions.c.cost_minor)
    .cte("recorded")
)
_head = audit.bump_head_statement(
    select(_taken.c.id % bindparam("n_chains", type_=Integer())).scalar_subquery()
).cte("head")
_REDEEM_FUSED = select(
    _taken.c.id,
    _taken.c.batch_id,
    _taken.c.uses,
    _taken.c.max_uses,
    _recorded.c.id,
    _recorded.c.cost_minor,
    _head.c.seq,
    _head.c.hash,
).select_from(_taken.join(_recorded, true()).outerjoin(_head, true()))


@dataclass(frozen=True)
class _Taken:
    voucher_id: int
    batch_id: int
    uses: int
    max_uses: int
    redemption_id: int
    cost: int
    head: tuple[int, str] | None  # (seq, previous hash) when the chain head is locked


async def _take_use(
    conn: AsyncConnection,
    session: AsyncSession,
    principal: Principal,
    code_hash: bytes,
    *,
    contact_ref: str | None,
    order_ref: str | None,
    now: datetime,
) -> _Taken | None:
    if conn.dialect.name == "postgresql":
        row = (
            await conn.execute(
                _REDEEM_FUSED,
                {
                    "v_code_hash": code_hash,
                    "v_org_id": principal.org_id,
                    "now": now,
                    "r_contact": contact_ref,
                    "r_order": order_ref,
                    "r_actor": principal.actor,
                    "n_chains": audit.chain_count(),
                    "h_org": principal.org_id,
                },
            )
        ).first()
        if row is None:
            return None
        head = (int(row[6]), str(row[7])) if row[6] is not None else None
        return _Taken(row[0], row[1], row[2], row[3], row[4], row[5], head)
    taken = (
        await conn.execute(
            _TAKE_USE, {"v_code_hash": code_hash, "v_org_id": principal.org_id, "now": now}
        )
    ).first()
    if taken is None:
        return None
    voucher_id, batch_id, uses, max_uses = taken
    cost = (await _policy(session, batch_id)).cost_per_use_minor
    redemption_id = (
        await conn.execute(
            _INSERT_REDEMPTION,
            {
                "org_id": principal.org_id,
                "voucher_id": voucher_id,
                "batch_id": batch_id,
                "contact_ref": contact_ref,
                "order_ref": order_ref,
                "cost_minor": cost,
                "redeemed_at": now,
                "actor": principal.actor,
                "rolled_back_at": None,
                "rollback_reason": None,
            },
        )
    ).scalar_one()
    return _Taken(voucher_id, batch_id, uses, max_uses, redemption_id, cost, None)


async def redeem(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    *,
    code: str,
    contact_ref: str | None,
    order_ref: str | None,
    now: datetime,
) -> RedeemResult:
    principal.require("vouchers:redeem")
    code_hash = signer.keyed_hash(codes.normalize(code))
    conn = await session.connection()
    taken = await _take_use(
        conn,
        session,
        principal,
        code_hash,
        contact_ref=contact_ref,
        order_ref=order_ref,
        now=now,
    )
    if taken is None:
        raise _refuse(await _find(session, principal.org_id, code_hash), now)
    # Lock order, everywhere: voucher row -> audit chain head -> contact counter -> batch.
    subject = f"voucher:{taken.voucher_id}"
    chain = audit.chain_for(subject)
    seq, prev = taken.head or await audit.bump_head(conn, principal.org_id, chain)
    policy = await _policy(session, taken.batch_id)
    if policy.per_contact_limit is not None and contact_ref is not None:
        await _take_contact_use(session, taken.batch_id, contact_ref, policy.per_contact_limit)
    if policy.budget_minor is not None and taken.cost:
        spent = await conn.execute(_SPEND_BUDGET, {"b_id": taken.batch_id, "cost": taken.cost})
        if spent.first() is None:
            raise PopdropError("budget_exhausted", "the budget of this offer is spent")
    await audit.write_entry(
        conn,
        org_id=principal.org_id,
        chain=chain,
        seq=seq,
        prev=prev,
        actor=principal.actor,
        action="voucher.redeem",
        subject=subject,
        payload=_redeem_payload(taken, contact_digest(signer, contact_ref), order_ref),
        at=now,
    )
    return _redeem_result(taken, policy, contact_ref, order_ref, now)


# ---------------------------------------------------------------- grouped redeem
#
# On PostgreSQL, `redeem_now` hands a redemption to this process's group commit
# (`core.group_commit`): the redemptions that arrive while the previous group is being
# written go to PostgreSQL together, in one transaction of two statements. The first takes
# every code's use, records every redemption and bumps the audit chain heads (locked in
# (org, chain) order, after the voucher rows: the lock order of `redeem`), arrays in and one
# row out per redemption taken; the second writes the chain entries and the new heads, each
# entry hashed in Python exactly as `audit.write_entry` does, in arrival order per chain.
# A request whose code the group did not take (unknown, used up, expired, a batch with a
# per-contact limit or a budget, the same code twice in one group) took no effect and goes
# down `redeem` in a transaction of its own, so it gets the answer it would get alone;
# a group that fails rolls back as a whole and each of its requests does the same.

_GROUP_REDEEM = text(
    """
WITH asked AS (
    SELECT * FROM unnest(
        CAST(:i AS integer[]), CAST(:code_hash AS bytea[]), CAST(:org_id AS bigint[]),
        CAST(:contact_ref AS varchar[]), CAST(:order_ref AS varchar[]),
        CAST(:actor AS varchar[]), CAST(:now AS timestamptz[])
    ) AS a(i, code_hash, org_id, contact_ref, order_ref, actor, now)
),
taken AS (
    UPDATE vouchers AS v SET uses = v.uses + 1
    FROM asked AS a, voucher_batches AS b
    WHERE v.code_hash = a.code_hash AND v.org_id = a.org_id AND b.id = v.batch_id
      AND v.revoked_at IS NULL AND v.uses < v.max_uses
      AND (v.valid_from IS NULL OR v.valid_from <= a.now)
      AND (v.valid_until IS NULL OR v.valid_until > a.now)
      AND (b.per_contact_limit IS NULL OR a.contact_ref IS NULL)
      AND (b.budget_minor IS NULL OR b.cost_per_use_minor = 0)
    RETURNING a.i, a.org_id, a.contact_ref, a.order_ref, a.actor, a.now,
              v.id, v.batch_id, v.uses, v.max_uses, b.cost_per_use_minor AS cost
),
recorded AS (
    INSERT INTO redemptions (org_id, voucher_id, batch_id, contact_ref, order_ref,
                             cost_minor, redeemed_at, actor)
    SELECT org_id, id, batch_id, contact_ref, order_ref, cost, now, actor FROM taken
    RETURNING id, voucher_id
),
counts AS (
    SELECT org_id, id % :chains AS chain, count(*) AS n FROM taken GROUP BY 1, 2
),
locked AS MATERIALIZED (
    SELECT h.org_id, h.chain FROM audit_heads AS h
    JOIN counts AS c ON c.org_id = h.org_id AND c.chain = h.chain
    ORDER BY h.org_id, h.chain
    FOR UPDATE OF h
),
head AS (
    UPDATE audit_heads AS h SET seq = h.seq + c.n
    FROM counts AS c, locked AS l
    WHERE h.org_id = c.org_id AND h.chain = c.chain
      AND l.org_id = h.org_id AND l.chain = h.chain
    RETURNING h.org_id, h.chain, h.seq - c.n AS base, h.hash
)
SELECT t.i, t.id, t.batch_id, t.uses, t.max_uses, t.cost, r.id, hd.base, hd.hash
FROM taken AS t
JOIN recorded AS r ON r.voucher_id = t.id
LEFT JOIN head AS hd ON hd.org_id = t.org_id AND hd.chain = t.id % :chains
"""
)
_GROUP_AUDIT = text(
    """
WITH set_head AS (
    UPDATE audit_heads AS h SET hash = u.hash
    FROM unnest(CAST(:h_org AS bigint[]), CAST(:h_chain AS integer[]),
                CAST(:h_hash AS varchar[])) AS u(org_id, chain, hash)
    WHERE h.org_id = u.org_id AND h.chain = u.chain
)
INSERT INTO audit_entries (org_id, chain, seq, at, actor, action, subject, payload,
                           payload_digest, prev_hash, hash)
SELECT * FROM unnest(
    CAST(:org_id AS bigint[]), CAST(:chain AS integer[]), CAST(:seq AS integer[]),
    CAST(:at AS timestamptz[]), CAST(:actor AS varchar[]), CAST(:action AS varchar[]),
    CAST(:subject AS varchar[]), CAST(:payload AS text[]), CAST(:digest AS varchar[]),
    CAST(:prev AS varchar[]), CAST(:hash AS varchar[])
)
"""
)
_HEADS_OF_ORG = text(
    """
INSERT INTO audit_heads (org_id, chain, seq, hash)
SELECT :org_id, c, 0, :genesis FROM generate_series(0, :chains - 1) AS c
ON CONFLICT DO NOTHING
"""
)


_ENTRY_PARAMS = (
    "org_id", "chain", "seq", "at", "actor", "action", "subject", "payload", "digest", "prev",
    "hash",
)  # fmt: skip


@dataclass(frozen=True)
class _Ask:
    org_id: int
    actor: str
    code_hash: bytes
    contact_ref: str | None
    contact: str | None  # its keyed digest, for the ledger
    order_ref: str | None
    now: datetime


@dataclass(frozen=True)
class _Granted:
    taken: _Taken
    policy: BatchPolicy


_GROUPS: dict[tuple[int, asyncio.AbstractEventLoop], GroupCommit[_Ask, _Granted | None]] = {}
# (database url, org, chain count) whose every chain head exists: heads are never deleted.
_HEADS_READY: ProcessCache[tuple[str, int, int], bool] = ProcessCache(maxsize=4_096)
GROUP_MAX = 256  # redemptions in one group statement


def _group(db: Database) -> GroupCommit[_Ask, _Granted | None]:
    async def flush(asks: Sequence[_Ask]) -> list[_Granted | BaseException | None]:
        return list(await _flush_group(db, asks))

    return for_loop(_GROUPS, id(db), lambda: GroupCommit(flush, max_batch=GROUP_MAX))


async def _ready_heads(db: Database, org_ids: set[int]) -> None:
    """Every audit chain head of these organizations exists (made once, committed apart:
    a head at seq 0 with the genesis hash is what a chain's first entry would make)."""
    chains = audit.chain_count()
    missing = [o for o in sorted(org_ids) if _HEADS_READY.get((db.url, o, chains)) is None]
    if not missing:
        return
    async with db.transaction() as session:
        for org_id in missing:
            await session.execute(
                _HEADS_OF_ORG, {"org_id": org_id, "genesis": audit.GENESIS, "chains": chains}
            )
    for org_id in missing:
        _HEADS_READY.put((db.url, org_id, chains), True)


async def _flush_group(db: Database, asks: Sequence[_Ask]) -> list[_Granted | None]:
    await _ready_heads(db, {a.org_id for a in asks})
    chains = audit.chain_count()
    # Voucher rows are locked in code-hash order (the join follows the arrays), so two
    # groups holding the same codes rarely cross; a deadlock is retried all the same.
    order = sorted(range(len(asks)), key=lambda k: asks[k].code_hash)
    params: dict[str, Any] = {
        "i": order,
        "code_hash": [asks[k].code_hash for k in order],
        "org_id": [asks[k].org_id for k in order],
        "contact_ref": [asks[k].contact_ref for k in order],
        "order_ref": [asks[k].order_ref for k in order],
        "actor": [asks[k].actor for k in order],
        "now": [asks[k].now for k in order],
        "chains": chains,
    }

    async def work(session: AsyncSession) -> list[_Granted | None]:
        conn = await session.connection()
        rows = (await conn.execute(_GROUP_REDEEM, params)).all()
        granted: list[_Granted | None] = [None] * len(asks)
        by_chain: dict[tuple[int, int], list[Any]] = {}
        for row in rows:
            if row[7] is None:  # a head that should exist does not: let each go alone
                _HEADS_READY.pop((db.url, asks[row[0]].org_id, chains))
                raise RuntimeError("audit chain head missing")
            by_chain.setdefault((asks[row[0]].org_id, int(row[1]) % chains), []).append(row)
        entries: list[tuple[Any, ...]] = []
        heads: dict[str, list[Any]] = {"h_org": [], "h_chain": [], "h_hash": []}
        for (org_id, chain), chain_rows in sorted(by_chain.items()):
            chain_rows.sort(key=lambda r: r[0])  # arrival order on the chain
            seq, prev = int(chain_rows[0][7]), str(chain_rows[0][8])
            for i, voucher_id, batch_id, uses, max_uses, cost, redemption_id, _, _ in chain_rows:
                ask = asks[i]
                seq += 1
                taken = _Taken(
                    int(voucher_id), int(batch_id), int(uses), int(max_uses),
                    int(redemption_id), int(cost), (seq, prev),
                )  # fmt: skip
                granted[i] = _Granted(taken, await _policy(session, taken.batch_id))
                payload = audit.canonical_json(_redeem_payload(taken, ask.contact, ask.order_ref))
                entry = audit.AuditEntry(
                    org_id=org_id,
                    chain=chain,
                    seq=seq,
                    at=ask.now,
                    actor=ask.actor,
                    action="voucher.redeem",
                    subject=f"voucher:{voucher_id}",
                    payload=payload,
                    payload_digest=audit.payload_digest(payload),
                    prev_hash=prev,
                )
                own = audit.expected_hash(prev, entry)
                entries.append(
                    (org_id, chain, seq, ask.now, ask.actor, entry.action, entry.subject,
                     payload, entry.payload_digest, prev, own)
                )  # fmt: skip
                prev = own
            heads["h_org"].append(org_id)
            heads["h_chain"].append(chain)
            heads["h_hash"].append(prev)
        if rows:
            columns = dict(zip(_ENTRY_PARAMS, map(list, zip(*entries, strict=True)), strict=True))
            await conn.execute(_GROUP_AUDIT, {**columns, **heads})
        committing.append(True)  # from here on a failure may be a commit that happened
        return granted

    committing: list[bool] = []
    try:
        return await db.in_transaction(work)
    except Exception as exc:
        if committing:
            raise _CommitUnknown from exc
        raise


class _CommitUnknown(Exception):
    """The group's commit failed without saying whether it happened: its requests must not
    be run again (a multi-use code would be spent twice); they answer with the error."""


async def redeem_now(
    db: Database,
    signer: Signer,
    principal: Principal,
    *,
    code: str,
    contact_ref: str | None,
    order_ref: str | None,
    now: datetime,
) -> RedeemResult:
    """`redeem` in a transaction of its own: the same checks, answers and ledger entry. On
    PostgreSQL it is grouped with this process's concurrent redemptions (see above)."""
    principal.require("vouchers:redeem")

    async def alone(session: AsyncSession) -> RedeemResult:
        return await redeem(
            session,
            signer,
            principal,
            code=code,
            contact_ref=contact_ref,
            order_ref=order_ref,
            now=now,
        )

    if db.dialect != "postgresql":
        return await db.in_transaction(alone)
    ask = _Ask(
        org_id=principal.org_id,
        actor=principal.actor,
        code_hash=signer.keyed_hash(codes.normalize(code)),
        contact_ref=contact_ref,
        contact=contact_digest(signer, contact_ref),
        order_ref=order_ref,
        now=now,
    )
    try:
        granted = await _group(db).submit(ask)
    except GroupFailed as failed:
        unknown = failed.__cause__
        if isinstance(unknown, _CommitUnknown) and unknown.__cause__ is not None:
            raise unknown.__cause__ from None
        granted = None  # rolled back: nothing of it happened
    if granted is None:
        return await db.in_transaction(alone)
    return _redeem_result(granted.taken, granted.policy, contact_ref, order_ref, now)


def _redeem_payload(taken: _Taken, contact: str | None, order_ref: str | None) -> dict[str, Any]:
    return {
        "redemption": taken.redemption_id,
        "use": taken.uses,
        # A keyed digest, not the reference itself: the ledger is append-only and a
        # contact ref may be an email that must be erasable.
        "contact": contact,
        "order_ref": order_ref,
        "cost_minor": taken.cost,
    }


def _redeem_result(
    taken: _Taken,
    policy: BatchPolicy,
    contact_ref: str | None,
    order_ref: str | None,
    now: datetime,
) -> RedeemResult:
    return RedeemResult(
        redemption=RedemptionOut(
            id=taken.redemption_id,
            voucher_id=taken.voucher_id,
            batch_id=taken.batch_id,
            contact_ref=contact_ref,
            order_ref=order_ref,
            cost_minor=taken.cost,
            redeemed_at=now,
        ),
        uses=taken.uses,
        max_uses=taken.max_uses,
        remaining_uses=taken.max_uses - taken.uses,
        discount=policy.discount,
    )


def contact_digest(signer: Signer, contact_ref: str | None) -> str | None:
    if contact_ref is None:
        return None
    return signer.keyed_hash(f"contact-ref:{contact_ref}").hex()[:24]


async def _take_contact_use(
    session: AsyncSession, batch_id: int, contact_ref: str, limit: int
) -> None:
    table = VoucherContactUse.__table__
    stmt = dialect_insert(session.get_bind().dialect.name, table).values(
        batch_id=batch_id, contact_ref=contact_ref, uses=1
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[table.c.batch_id, table.c.contact_ref],
        set_={"uses": table.c.uses + 1},
        where=table.c.uses < limit,
    ).returning(table.c.uses)
    if (await session.execute(stmt)).first() is None:
        raise PopdropError("contact_limit", f"this contact already used this offer {limit} time(s)")


async def validate(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    *,
    code: str,
    contact_ref: str | None,
    now: datetime,
) -> VoucherOut:
    """Dry run of `redeem`: the same checks and reasons, nothing consumed."""
    principal.require("vouchers:redeem")
    voucher = await _find(session, principal.org_id, signer.keyed_hash(codes.normalize(code)))
    if _status(voucher, now) != "valid":
        raise _refuse(voucher, now)
    policy = await _policy(session, voucher.batch_id)
    if policy.per_contact_limit is not None and contact_ref is not None:
        used = await session.scalar(
            select(VoucherContactUse.uses).where(
                VoucherContactUse.batch_id == voucher.batch_id,
                VoucherContactUse.contact_ref == contact_ref,
            )
        )
        if (used or 0) >= policy.per_contact_limit:
            raise PopdropError("contact_limit", "this contact has used this offer up")
    if policy.budget_minor is not None and policy.cost_per_use_minor:
        batch = await session.get(VoucherBatch, voucher.batch_id)
        assert batch is not None
        if batch.budget_spent_minor + policy.cost_per_use_minor > policy.budget_minor:
            raise PopdropError("budget_exhausted", "the budget of this offer is spent")
    return voucher_out(voucher, policy, now)


def voucher_out(voucher: Voucher, policy: BatchPolicy, now: datetime) -> VoucherOut:
    return VoucherOut(
        id=voucher.id,
        batch_id=voucher.batch_id,
        batch_name=policy.name,
        status=_status(voucher, now),
        uses=voucher.uses,
        max_uses=voucher.max_uses,
        valid_from=voucher.valid_from,
        valid_until=voucher.valid_until,
        issued_at=voucher.issued_at,
        revoked_at=voucher.revoked_at,
        revoke_reason=voucher.revoke_reason,
        discount=policy.discount,
    )


async def rollback(
    session: AsyncSession,
    principal: Principal,
    *,
    redemption_id: int,
    reason: str,
    now: datetime,
) -> RedemptionOut:
    """Give a use back (a return): the redemption stays on record, marked rolled back."""
    principal.require("vouchers:write")
    row = (
        await session.execute(
            update(Redemption)
            .where(
                Redemption.id == redemption_id,
                Redemption.org_id == principal.org_id,
                Redemption.rolled_back_at.is_(None),
            )
            .values(rolled_back_at=now, rollback_reason=reason)
            .returning(Redemption)
        )
    ).scalar_one_or_none()
    if row is None:
        await owned(session, Redemption, redemption_id, principal.org_id)
        raise PopdropError("already_rolled_back", "this redemption was already rolled back")
    conn = await session.connection()
    await conn.execute(
        update(_vouchers).where(_vouchers.c.id == row.voucher_id).values(uses=_vouchers.c.uses - 1)
    )
    subject = f"voucher:{row.voucher_id}"
    chain = audit.chain_for(subject)
    seq, prev = await audit.bump_head(conn, principal.org_id, chain)
    if row.contact_ref is not None:
        await conn.execute(
            update(VoucherContactUse)
            .where(
                VoucherContactUse.batch_id == row.batch_id,
                VoucherContactUse.contact_ref == row.contact_ref,
            )
            .values(uses=VoucherContactUse.uses - 1)
        )
    if row.cost_minor:
        await conn.execute(
            update(_batches)
            .where(_batches.c.id == row.batch_id, _batches.c.budget_minor.is_not(None))
            .values(budget_spent_minor=_batches.c.budget_spent_minor - row.cost_minor)
        )
    await audit.write_entry(
        conn,
        org_id=principal.org_id,
        chain=chain,
        seq=seq,
        prev=prev,
        actor=principal.actor,
        action="voucher.rollback",
        subject=subject,
        payload={"redemption": row.id, "reason": reason},
        at=now,
    )
    return redemption_out(row)


def redemption_out(row: Redemption) -> RedemptionOut:
    return RedemptionOut(
        id=row.id,
        voucher_id=row.voucher_id,
        batch_id=row.batch_id,
        contact_ref=row.contact_ref,
        order_ref=row.order_ref,
        cost_minor=row.cost_minor,
        redeemed_at=row.redeemed_at,
        rolled_back_at=row.rolled_back_at,
        rollback_reason=row.rollback_reason,
    )


# ---------------------------------------------------------------- revoke


async def _revoke_where(
    session: AsyncSession,
    principal: Principal,
    conditions: Sequence[Any],
    *,
    subject: str,
    reason: str,
    now: datetime,
) -> int:
    result = await session.execute(
        update(Voucher)
        .where(Voucher.org_id == principal.org_id, Voucher.revoked_at.is_(None), *conditions)
        .values(revoked_at=now, revoke_reason=reason)
        .returning(Voucher.id)
    )
    count = len(result.all())
    await audit.append(
        session,
        org_id=principal.org_id,
        actor=principal.actor,
        action="voucher.revoke",
        subject=subject,
        payload={"revoked": count, "reason": reason},
        at=now,
    )
    return count


async def revoke_code(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    *,
    code: str,
    reason: str,
    now: datetime,
) -> int:
    principal.require("vouchers:write")
    voucher = await _find(session, principal.org_id, signer.keyed_hash(codes.normalize(code)))
    return await revoke_voucher(session, principal, voucher_id=voucher.id, reason=reason, now=now)


async def revoke_voucher(
    session: AsyncSession,
    principal: Principal,
    *,
    voucher_id: int,
    reason: str,
    now: datetime,
) -> int:
    principal.require("vouchers:write")
    await owned(session, Voucher, voucher_id, principal.org_id)
    return await _revoke_where(
        session,
        principal,
        [Voucher.id == voucher_id],
        subject=f"voucher:{voucher_id}",
        reason=reason,
        now=now,
    )


async def revoke_batch(
    session: AsyncSession,
    principal: Principal,
    *,
    batch_id: int,
    reason: str,
    now: datetime,
) -> int:
    principal.require("vouchers:write")
    await get_batch(session, principal, batch_id)
    count = await _revoke_where(
        session,
        principal,
        [Voucher.batch_id == batch_id],
        subject=f"batch:{batch_id}",
        reason=reason,
        now=now,
    )
    await _mark_batches_revoked(session, [_batches.c.id == batch_id], now)
    return count


async def _mark_batches_revoked(
    session: AsyncSession, conditions: Sequence[Any], now: datetime
) -> None:
    # Batch rows last: the lock order is voucher rows -> audit head -> batch.
    await session.execute(
        update(_batches).where(*conditions, _batches.c.revoked_at.is_(None)).values(revoked_at=now)
    )


async def revoke_tag(
    session: AsyncSession,
    principal: Principal,
    *,
    tag: str,
    reason: str,
    now: datetime,
) -> int:
    principal.require("vouchers:write")
    batch_ids = select(VoucherBatch.id).where(
        VoucherBatch.org_id == principal.org_id, VoucherBatch.tag == tag
    )
    count = await _revoke_where(
        session,
        principal,
        [Voucher.batch_id.in_(batch_ids)],
        subject=f"tag:{tag}",
        reason=reason,
        now=now,
    )
    await _mark_batches_revoked(session, [_batches.c.id.in_(batch_ids)], now)
    return count


# ---------------------------------------------------------------- read


async def get_batch(session: AsyncSession, principal: Principal, batch_id: int) -> VoucherBatch:
    principal.require("vouchers:read")
    return await owned(session, VoucherBatch, batch_id, principal.org_id, what="batch")


async def list_batches(
    session: AsyncSession, principal: Principal, *, limit: int = 100, before_id: int | None = None
) -> list[VoucherBatch]:
    principal.require("vouchers:read")
    query = select(VoucherBatch).where(VoucherBatch.org_id == principal.org_id)
    if before_id is not None:
        query = query.where(VoucherBatch.id < before_id)
    rows = await session.scalars(query.order_by(VoucherBatch.id.desc()).limit(limit))
    return list(rows)


@dataclass(frozen=True)
class BatchCounts:
    issued: int  # codes that exist (a drop's come one per recipient, at send time)
    redeemed: int  # uses taken and not rolled back


async def batch_counts(
    session: AsyncSession, principal: Principal, batch_ids: Sequence[int]
) -> dict[int, BatchCounts]:
    """Codes issued and uses redeemed per batch, for a list of batches: two grouped counts
    on the (org, batch) indexes. `quantity` is what was asked at issue; this is what is."""
    principal.require("vouchers:read")
    if not batch_ids:
        return {}
    ids = list(batch_ids)
    issued_rows = await session.execute(
        select(Voucher.batch_id, func.count())
        .where(Voucher.org_id == principal.org_id, Voucher.batch_id.in_(ids))
        .group_by(Voucher.batch_id)
    )
    issued: dict[int, int] = {int(b): int(n) for b, n in issued_rows}
    redeemed_rows = await session.execute(
        select(Redemption.batch_id, func.count())
        .where(
            Redemption.org_id == principal.org_id,
            Redemption.batch_id.in_(ids),
            Redemption.rolled_back_at.is_(None),
        )
        .group_by(Redemption.batch_id)
    )
    redeemed: dict[int, int] = {int(b): int(n) for b, n in redeemed_rows}
    return {i: BatchCounts(issued.get(i, 0), redeemed.get(i, 0)) for i in ids}


async def batch_stats(session: AsyncSession, principal: Principal, batch_id: int) -> BatchStats:
    await get_batch(session, principal, batch_id)
    issued, uses, fully_used, revoked = (
        await session.execute(
            select(
                func.count(Voucher.id),
                func.coalesce(func.sum(Voucher.uses), 0),
                func.count(Voucher.id).filter(Voucher.uses >= Voucher.max_uses),
                func.count(Voucher.revoked_at),
            ).where(Voucher.batch_id == batch_id, Voucher.org_id == principal.org_id)
        )
    ).one()
    redemptions, rolled_back = (
        await session.execute(
            select(func.count(Redemption.id), func.count(Redemption.rolled_back_at)).where(
                Redemption.batch_id == batch_id, Redemption.org_id == principal.org_id
            )
        )
    ).one()
    return BatchStats(
        issued=issued,
        uses=uses,
        fully_used=fully_used,
        revoked=revoked,
        redemptions=redemptions,
        rolled_back=rolled_back,
    )


async def lookup_code(
    session: AsyncSession, signer: Signer, principal: Principal, code: str, now: datetime
) -> VoucherOut:
    principal.require("vouchers:read")
    voucher = await _find(session, principal.org_id, signer.keyed_hash(codes.normalize(code)))
    return voucher_out(voucher, await _policy(session, voucher.batch_id), now)


async def get_voucher(
    session: AsyncSession, principal: Principal, voucher_id: int, now: datetime
) -> VoucherOut:
    principal.require("vouchers:read")
    voucher = await owned(session, Voucher, voucher_id, principal.org_id)
    return voucher_out(voucher, await _policy(session, voucher.batch_id), now)


async def list_redemptions(
    session: AsyncSession,
    principal: Principal,
    *,
    batch_id: int | None = None,
    voucher_id: int | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[Redemption]:
    principal.require("vouchers:read")
    query = select(Redemption).where(Redemption.org_id == principal.org_id)
    if batch_id is not None:
        query = query.where(Redemption.batch_id == batch_id)
    if voucher_id is not None:
        query = query.where(Redemption.voucher_id == voucher_id)
    if before_id is not None:
        query = query.where(Redemption.id < before_id)
    rows = await session.scalars(query.order_by(Redemption.id.desc()).limit(limit))
    return list(rows)


async def export_vouchers(
    session: AsyncSession, principal: Principal, batch_id: int, now: datetime
) -> list[dict[str, Any]]:
    """Every code of a batch with its state (no plaintext: it is never stored)."""
    await get_batch(session, principal, batch_id)
    rows = await session.scalars(
        select(Voucher)
        .where(Voucher.batch_id == batch_id, Voucher.org_id == principal.org_id)
        .order_by(Voucher.id)
    )
    return [
        {
            "voucher_id": v.id,
            "status": _status(v, now),
            "uses": v.uses,
            "max_uses": v.max_uses,
            "valid_from": v.valid_from.isoformat() if v.valid_from else "",
            "valid_until": v.valid_until.isoformat() if v.valid_until else "",
            "issued_at": v.issued_at.isoformat(),
            "revoked_at": v.revoked_at.isoformat() if v.revoked_at else "",
        }
        for v in rows
    ]


# ---------------------------------------------------------------- links


DEFAULT_LINK_HOURS = 8  # a claim link's life when its batch has no end and no TTL


def link_expiry(batch: VoucherBatch, now: datetime) -> datetime:
    """When a batch's claim links expire: the one rule for the API, the pages and the CLI.

    A link lives as long as its code: the batch end or the TTL counted from `now`,
    whichever comes first; a batch with neither gets a working day.
    """
    ends = [batch.valid_until] if batch.valid_until else []
    if batch.ttl_seconds:
        ends.append(now + timedelta(seconds=batch.ttl_seconds))
    return min(ends) if ends else now + timedelta(hours=DEFAULT_LINK_HOURS)


def make_link(
    signer: Signer, base_url: str, code: str, *, expires_at: datetime
) -> tuple[str, datetime]:
    token = links.voucher_link_token(signer, codes.normalize(code), expires_at)
    return links.voucher_link_url(base_url, token), expires_at


@dataclass
class ClaimView:
    code: str
    voucher: VoucherOut
    link_expires_at: datetime


async def open_link(session: AsyncSession, signer: Signer, token: str, now: datetime) -> ClaimView:
    """Check a `/v/{token}` link: signature, link expiry, then the voucher's live state."""
    link = links.read_voucher_link(signer, token)
    expires_at = link.expires_at
    if expires_at <= now:
        raise PopdropError("link_expired", "this link has expired")
    normalized = codes.normalize(link.code)
    voucher = await session.scalar(
        select(Voucher).where(Voucher.code_hash == signer.keyed_hash(normalized))
    )
    if voucher is None:
        raise PopdropError("unknown", "this voucher no longer exists")
    if _status(voucher, now) != "valid":
        raise _refuse(voucher, now)
    policy = await _policy(session, voucher.batch_id)
    return ClaimView(codes.format_code(normalized), voucher_out(voucher, policy, now), expires_at)
