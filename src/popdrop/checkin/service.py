"""Tickets, scans and visits. Every function takes the caller's session (or the database,
for the scan entry point that owns its transaction), the principal and `now`.

Rules:
- A ticket is checked in at most once: one conditional `UPDATE tickets … WHERE
  checked_in_at IS NULL AND status = 'valid' AND generation = :gen AND <window>` decides;
  the database serialises concurrent scans on the row, and `visits.ticket_id` is unique.
- Every scan is stored, refusals too, under a unique (org, nonce): the same nonce always
  gets the stored answer back; a new nonce on a used ticket gets `already_checked_in`.
- Tenancy: the org of the principal is part of every query; a secret signed for another
  org's event is simply `invalid` (never a hint that it exists).
- A scan may carry the ticket's short code instead of the secret: a wrong check character
  is refused (`short_code_invalid`) before any query; a good one is looked up (unique per
  event, so the scan needs its event) and the scan goes on with the ticket's secret.
- Private keys are sealed at rest (`checkin.keys`); they are opened only to sign.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import (
    BigInteger,
    Boolean,
    Integer,
    LargeBinary,
    String,
    Text,
    bindparam,
    cast,
    exists,
    false,
    func,
    insert,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from popdrop.accounts.service import Principal
from popdrop.checkin import keys, tickets
from popdrop.checkin.lifecycle import TICKET_LIFECYCLE, TicketStatus
from popdrop.checkin.models import EventKey, Scan, Ticket, Visit
from popdrop.checkin.schemas import (
    CheckinKey,
    Counts,
    ScanAnswer,
    ScanRequest,
    TicketCreate,
    TicketOut,
)
from popdrop.core import audit
from popdrop.core.cache import ProcessCache
from popdrop.core.db import Database, UTCDateTime, after_commit, dialect_insert, table_of
from popdrop.core.errors import REASON_STATUS, PopdropError, not_found
from popdrop.core.group_commit import GroupCommit, GroupFailed, for_loop
from popdrop.core.localtime import local
from popdrop.core.tenancy import owned
from popdrop.events.models import Event
from popdrop.metrics import log as funnel
from popdrop.metrics.kinds import Kind

ISSUE_SCOPE = "tickets:write"
SCAN_SCOPE = "checkin"
# Doors open a while before the event starts and stay open a little after it ends.
OPENS_BEFORE = timedelta(hours=2)
CLOSES_AFTER = timedelta(hours=1)
# A scan may say when it happened (offline scanners); never noticeably in the future.
MAX_CLOCK_SKEW = timedelta(minutes=5)
# Offline scans come back within days; older ones are refused, not stored.
MAX_SCAN_AGE = timedelta(days=90)

_tickets = table_of(Ticket)
_scans = table_of(Scan)
_visits = table_of(Visit)
_events = table_of(Event)
_keys = table_of(EventKey)


@dataclass
class EventSigner:
    org_id: int
    public: Ed25519PublicKey
    public_raw: bytes
    sealed_private: bytes
    _private: Ed25519PrivateKey | None = None

    @property
    def private(self) -> Ed25519PrivateKey:
        """Opened on first use: verifying (scans, ticket pages) never needs it."""
        if self._private is None:
            self._private = keys.open_private(self.sealed_private)
        return self._private


# Keys never change once made, so they are cached per (database, event).
_SIGNERS: ProcessCache[tuple[str, int], EventSigner] = ProcessCache(maxsize=1_024)


# The scan path runs on a bare connection on PostgreSQL (no ORM session), a session elsewhere.
Conn = AsyncSession | AsyncConnection


def _db_key(conn: Conn) -> str:
    engine = conn.engine if isinstance(conn, AsyncConnection) else conn.get_bind().engine
    return str(engine.url)


async def _load_signer(session: Conn, event_id: int, *, cache: bool = True) -> EventSigner | None:
    cache_key = (_db_key(session), event_id)
    signer = _SIGNERS.get(cache_key)
    if signer is None:
        row = (
            await session.execute(
                select(_keys.c.org_id, _keys.c.public_key, _keys.c.private_key).where(
                    _keys.c.event_id == event_id
                )
            )
        ).first()
        if row is None:
            return None
        signer = EventSigner(
            org_id=row.org_id,
            public=tickets.public_key_of(row.public_key),
            public_raw=row.public_key,
            sealed_private=bytes(row.private_key),
        )
        if cache:
            _SIGNERS.put(cache_key, signer)
    return signer


async def event_signer(session: AsyncSession, event: Event, now: datetime) -> EventSigner:
    """The event's keypair, made on first use (concurrent first uses agree on one)."""
    signer = await _load_signer(session, event.id)
    if signer is None:
        private, public = tickets.new_keypair()
        await session.execute(
            dialect_insert(session.get_bind().dialect.name, _keys)
            .values(
                event_id=event.id,
                org_id=event.org_id,
                public_key=public,
                private_key=keys.seal_private(private),
                created_at=now,
            )
            .on_conflict_do_nothing()
        )
        # Not cached yet: if this transaction rolls back, the key it wrote never existed.
        signer = await _load_signer(session, event.id, cache=False)
        assert signer is not None
        made, cache_key = signer, (_db_key(session), event.id)

        async def remember() -> None:
            _SIGNERS.put(cache_key, made)

        after_commit(session, remember, key=f"event-signer:{event.id}")
    return signer


# ---------------------------------------------------------------- tickets


async def get_event(session: AsyncSession, principal: Principal, event_id: int) -> Event:
    return await owned(session, Event, event_id, principal.org_id)


def ticket_out(ticket: Ticket) -> TicketOut:
    return TicketOut(
        id=ticket.id,
        event_id=ticket.event_id,
        subject_kind=ticket.subject_kind,
        subject_id=ticket.subject_id,
        holder_ref=ticket.holder_ref,
        status=ticket.status,
        reissues=ticket.generation,
        created_at=ticket.created_at,
        changed_at=ticket.changed_at,
        checked_in_at=ticket.checked_in_at,
        checked_in_gate=ticket.checked_in_gate,
    )


def secret_of(signer: EventSigner, ticket: Ticket) -> str:
    return tickets.sign(
        signer.private,
        event_id=ticket.event_id,
        ticket_id=ticket.id,
        generation=ticket.generation,
        issued_epoch=ticket.issued_epoch,
    )


async def issue_ticket(
    session: AsyncSession,
    principal: Principal,
    spec: TicketCreate,
    *,
    now: datetime,
) -> tuple[Ticket, str, bool]:
    """A ticket for a subject; the subject's valid ticket if it has one (created=False)."""
    principal.require(ISSUE_SCOPE)
    event = await get_event(session, principal, spec.event_id)
    signer = await event_signer(session, event, now)
    existing = await _valid_ticket_of(session, principal, spec)
    if existing is not None:
        return existing, secret_of(signer, existing), False
    ticket = Ticket(
        org_id=principal.org_id,
        event_id=event.id,
        subject_kind=spec.subject_kind,
        subject_id=spec.subject_id,
        holder_ref=spec.holder_ref,
        status=TicketStatus.VALID,
        generation=0,
        issued_epoch=int(now.timestamp()),
        created_at=now,
        changed_at=now,
    )
    try:
        async with session.begin_nested():  # a savepoint: a lost race must not end the txn
            session.add(ticket)
            await session.flush()
    except IntegrityError:
        # A concurrent issue for the same subject won (unique valid ticket per subject).
        existing = await _valid_ticket_of(session, principal, spec)
        if existing is None:
            raise
        return existing, secret_of(signer, existing), False
    secret = await _assign_short_code(session, signer, ticket)
    await _audit(session, principal, "ticket.issue", ticket, now)
    return ticket, secret, True


async def _assign_short_code(session: AsyncSession, signer: EventSigner, ticket: Ticket) -> str:
    """Store the short code of the ticket's current secret; the secret.

    Codes are 40 bits, so two tickets of one event almost never share one; when they
    would, the new secret is signed again one second later (a different code), before
    anyone saw it. The unique index stays the guard against a concurrent twin."""
    for _ in range(8):
        secret = secret_of(signer, ticket)
        code = tickets.short_code(secret)
        taken = await session.scalar(
            select(_tickets.c.id).where(
                _tickets.c.event_id == ticket.event_id,
                _tickets.c.short_code == code,
                _tickets.c.id != ticket.id,
            )
        )
        if taken is None:
            ticket.short_code = code
            await session.flush()
            return secret
        ticket.issued_epoch += 1
    raise PopdropError("conflict", "could not give the ticket a unique short code; retry")


async def _valid_ticket_of(
    session: AsyncSession, principal: Principal, spec: TicketCreate
) -> Ticket | None:
    ticket: Ticket | None = await session.scalar(
        select(Ticket).where(
            Ticket.org_id == principal.org_id,
            Ticket.event_id == spec.event_id,
            Ticket.subject_kind == spec.subject_kind,
            Ticket.subject_id == spec.subject_id,
            Ticket.status == "valid",
        )
    )
    return ticket


async def get_ticket(session: AsyncSession, principal: Principal, ticket_id: int) -> Ticket:
    return await owned(session, Ticket, ticket_id, principal.org_id)


async def ticket_secret(session: AsyncSession, ticket: Ticket, now: datetime) -> str:
    event = await session.get(Event, ticket.event_id)
    assert event is not None
    return secret_of(await event_signer(session, event, now), ticket)


async def change_ticket(
    session: AsyncSession,
    principal: Principal,
    ticket_id: int,
    action: str,
    *,
    now: datetime,
) -> tuple[Ticket, str]:
    """`cancel`, `revoke` or `reissue` a ticket; each makes the current secret stop working.

    Cancel (the holder's choice) and revoke (the operator's) are final. Re-issue (the
    subject changed) keeps the ticket valid under a new secret.
    """
    principal.require(ISSUE_SCOPE)
    ticket = await owned(session, Ticket, ticket_id, principal.org_id, lock=True)
    # The ticket's one status writer: cancel and revoke are moves of TICKET_LIFECYCLE; a
    # re-issue keeps the status but needs a ticket that can still move (a valid one).
    current = TicketStatus(ticket.status)
    if action == "cancel":
        ticket.status = TICKET_LIFECYCLE.check(current, TicketStatus.CANCELLED, action=action)
    elif action == "revoke":
        ticket.status = TICKET_LIFECYCLE.check(current, TicketStatus.REVOKED, action=action)
    elif current in TICKET_LIFECYCLE.terminal:
        raise TICKET_LIFECYCLE.refusal(current, None, action=action)
    else:
        ticket.generation += 1
        ticket.issued_epoch = int(now.timestamp())
    ticket.changed_at = now
    await session.flush()
    if action == "reissue":  # the new secret has a new short code; the old one stops working
        event = await session.get(Event, ticket.event_id)
        assert event is not None
        secret = await _assign_short_code(session, await event_signer(session, event, now), ticket)
    else:
        secret = await ticket_secret(session, ticket, now)
    await _audit(session, principal, f"ticket.{action}", ticket, now)
    return ticket, secret


async def _audit(
    session: AsyncSession,
    principal: Principal,
    action: str,
    ticket: Ticket,
    now: datetime,
) -> None:
    await audit.append(
        session,
        org_id=principal.org_id,
        actor=principal.actor,
        action=action,
        subject=f"ticket:{ticket.id}",
        payload={
            "event": ticket.event_id,
            "subject": f"{ticket.subject_kind}:{ticket.subject_id}",
            "generation": ticket.generation,
            "status": ticket.status,
        },
        at=now,
    )


async def checkin_key(
    session: AsyncSession, principal: Principal, event_id: int, now: datetime
) -> CheckinKey:
    """The public key and the revocation list an offline scanner syncs."""
    principal.require(SCAN_SCOPE)
    event = await get_event(session, principal, event_id)
    signer = await event_signer(session, event, now)
    rows = await session.execute(
        select(_tickets.c.id, _tickets.c.status, _tickets.c.generation).where(
            _tickets.c.org_id == principal.org_id,
            _tickets.c.event_id == event.id,
            (_tickets.c.status != "valid") | (_tickets.c.generation > 0),
        )
    )
    revoked: list[int] = []
    generations: dict[str, int] = {}
    for ticket_id, status, generation in rows:
        if status != "valid":
            revoked.append(ticket_id)
        elif generation:
            generations[str(ticket_id)] = generation
    return CheckinKey(
        event_id=event.id,
        public_key=tickets.b64encode(signer.public_raw),
        revoked=sorted(revoked),
        generations=generations,
        as_of=now,
    )


async def counts(session: AsyncSession, principal: Principal, event_id: int) -> Counts:
    principal.require(SCAN_SCOPE)
    event = await get_event(session, principal, event_id)
    where = (_tickets.c.org_id == principal.org_id, _tickets.c.event_id == event.id)
    row = (
        await session.execute(
            select(
                func.count().filter(_tickets.c.status == "valid"),
                func.count(_tickets.c.checked_in_at),
            ).where(*where)
        )
    ).one()
    return Counts(event_id=event.id, expected=int(row[0]), checked_in=int(row[1]))


# ---------------------------------------------------------------- public ticket page


@dataclass(frozen=True)
class TicketView:
    ticket: Ticket
    event: Event
    current: bool  # False: an older secret of a re-issued ticket


async def open_ticket(session: AsyncSession, secret: str) -> TicketView:
    """The ticket behind a secret (public page); `not_found` for anything not genuine."""
    claim = tickets.parse(secret)
    if claim is None:
        raise not_found("ticket")
    signer = await _load_signer(session, claim.event_id)
    if signer is None or not tickets.signature_ok(signer.public, claim):
        raise not_found("ticket")
    ticket = await session.scalar(
        select(Ticket).where(
            Ticket.id == claim.ticket_id,
            Ticket.event_id == claim.event_id,
            Ticket.org_id == signer.org_id,
        )
    )
    event = await session.get(Event, claim.event_id)
    if ticket is None or event is None:
        raise not_found("ticket")
    return TicketView(ticket, event, current=ticket.generation == claim.generation)


# ---------------------------------------------------------------- scans


class NonceTaken(Exception):
    """Another transaction stored this nonce first: roll back and replay its answer."""


_TEXT = {
    "ok": "checked in",
    "invalid": "this is not a valid ticket",
    "revoked": "this ticket was revoked",
    "reissued": "this ticket was replaced by a newer one; show the latest",
    "cancelled": "this ticket was cancelled",
    "already_checked_in": "this ticket was already checked in",
    "wrong_event": "this ticket is for another event",
    "outside_window": "check-in for this event is not open at this time",
}


def status_of(result: str) -> int:
    return 200 if result == "ok" else REASON_STATUS[result]


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()[:16]


def _window(at: datetime) -> Any:
    """True when the ticket's event accepts check-ins at `at` (a correlated EXISTS)."""
    return exists().where(
        _events.c.id == _tickets.c.event_id,
        _events.c.starts_at <= at + OPENS_BEFORE,
        _events.c.ends_at >= at - CLOSES_AFTER,
    )


# ---- the hot path: statements built once at import.
# Take the check-in: the ticket is valid, current, unused, its event is open at `at`, and
# this nonce has no stored answer yet (a retry of a successful scan must replay "ok").
_p = {
    name: bindparam(name, type_=kind)
    for name, kind in (
        ("org", BigInteger()),
        ("tid", BigInteger()),
        ("eid", BigInteger()),
        ("gen", Integer()),
        ("nonce", String()),
        ("gate", String()),
        ("at", UTCDateTime()),
        ("opens_by", UTCDateTime()),
        ("closes_from", UTCDateTime()),
        ("received_at", UTCDateTime()),
        ("digest", LargeBinary()),
        ("answer", Text()),
        ("offline", Boolean()),
        ("actor", String()),
    )
}
_TAKE = (
    update(_tickets)
    .where(
        _tickets.c.id == _p["tid"],
        _tickets.c.org_id == _p["org"],
        _tickets.c.event_id == _p["eid"],
        _tickets.c.generation == _p["gen"],
        _tickets.c.status == "valid",
        _tickets.c.checked_in_at.is_(None),
        exists().where(
            _events.c.id == _tickets.c.event_id,
            _events.c.starts_at <= _p["opens_by"],
            _events.c.ends_at >= _p["closes_from"],
        ),
        ~exists().where(_scans.c.org_id == _p["org"], _scans.c.nonce == _p["nonce"]),
    )
    .values(checked_in_at=_p["at"], checked_in_gate=_p["gate"])
    .returning(
        _tickets.c.id,
        _tickets.c.event_id,
        _tickets.c.subject_kind,
        _tickets.c.subject_id,
        _tickets.c.holder_ref,
    )
)
_VISIT_COLUMNS = ["org_id", "event_id", "ticket_id", "subject_kind", "subject_id", "at", "gate"]
_SCAN_COLUMNS = [
    "org_id", "nonce", "secret_digest", "event_id", "ticket_id", "result", "status_code",
    "answer", "gate", "offline", "scanned_at", "received_at", "actor",
]  # fmt: skip


def _scan_values(taken: Any) -> list[Any]:
    return [
        _p["org"], _p["nonce"], _p["digest"], taken.c.event_id, taken.c.id, literal("ok"),
        literal(200), _p["answer"], _p["gate"], _p["offline"], _p["at"], _p["received_at"],
        _p["actor"],
    ]  # fmt: skip


# The funnel's `visit` event (`metrics.log`) is written with the visit, for the first
# check-in only: in the same statement on PostgreSQL (no extra round trip on the door's
# hot path), right after the visit on SQLite. The subject names what the ticket is for
# (`rsvp:12`, as the RSVP's own event does), and the person is that event's person, read
# by a subquery of the same statement (an index lookup, no round trip): the visit is the
# RSVP's person's, so a funnel follows them from the RSVP to the door.
_funnel = funnel.funnel_events
_LOG_COLUMNS = [
    "org_id", "at", "kind", "channel", "event_id", "drop_id", "variant", "segment",
    "partner_id", "lane_id", "label", "person", "subject", "value", "currency", "rolled",
]  # fmt: skip


def _person_of(subject: Any) -> Any:
    return (
        select(_funnel.c.person)
        .where(
            _funnel.c.org_id == _p["org"],
            _funnel.c.subject == subject,
            _funnel.c.person.is_not(None),
        )
        .limit(1)
        .scalar_subquery()
    )


def _log_values(event_id: Any, subject: Any) -> list[Any]:
    return [
        _p["org"], _p["at"], literal(Kind.VISIT.value, String()), literal("", String()),
        event_id, literal(None, BigInteger()), literal("", String()), literal("", String()),
        literal(None, BigInteger()), literal(None, BigInteger()), literal("", String()),
        _person_of(subject), subject, literal(0, BigInteger()), literal("", String()),
        false(),
    ]  # fmt: skip


def _visit_subject(taken: Any) -> Any:
    return taken.c.subject_kind + literal(":", String()) + cast(taken.c.subject_id, String())


_INSERT_LOG = insert(_funnel).from_select(
    _LOG_COLUMNS,
    select(*_log_values(bindparam("f_event", type_=BigInteger()), bindparam("f_subject"))),
)


def _fused_take() -> Any:
    """PostgreSQL: take the check-in, record the visit and the scan in one statement."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    taken = _TAKE.cte("taken")
    visited = (
        insert(_visits)
        .from_select(
            _VISIT_COLUMNS,
            select(
                _p["org"],
                taken.c.event_id,
                taken.c.id,
                taken.c.subject_kind,
                taken.c.subject_id,
                _p["at"],
                _p["gate"],
            ),
        )
        .returning(_visits.c.id)
        .cte("visited")
    )
    scanned = (
        pg_insert(_scans)
        .from_select(_SCAN_COLUMNS, select(*_scan_values(taken)))
        .on_conflict_do_nothing()
        .returning(_scans.c.id)
        .cte("scanned")
    )
    logged = (
        insert(_funnel)
        .from_select(_LOG_COLUMNS, select(*_log_values(taken.c.event_id, _visit_subject(taken))))
        .cte("logged")
    )
    return (
        select(
            taken.c.subject_kind,
            taken.c.subject_id,
            taken.c.holder_ref,
            scanned.c.id.label("scan_id"),
            visited.c.id.label("visit_id"),
        )
        .select_from(taken)
        .outerjoin(scanned, true())
        .outerjoin(visited, true())
        .add_cte(logged)
    )


_FUSED_TAKE = _fused_take()
_STORED = select(
    _scans.c.id, _scans.c.secret_digest, _scans.c.status_code, _scans.c.result, _scans.c.answer,
    _scans.c.ticket_id,
).where(_scans.c.org_id == _p["org"], _scans.c.nonce == _p["nonce"])  # fmt: skip


# ---- group commit (PostgreSQL): scans that arrive together are taken by one statement.
# Arrays in, one row out per scan that took its ticket: each scan is all-or-nothing (its
# ticket, visit, funnel row and scan row, or none of them), and a scan with no row goes
# down the ordinary path (a replay, a refusal) on its own. The statement commits on its
# own (no BEGIN/COMMIT round trips); a nonce stored meanwhile by another scan breaks the
# unique (org, nonce) and rolls the whole statement back, so every scan of that batch goes
# its own way. Only a genuine claim of the principal's org with a new nonce is grouped.
_GROUP_TAKE_SQL = """\
WITH req AS (
  SELECT * FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::bigint[], $5::int[],
    $6::text[], $7::text[], $8::timestamptz[], $9::timestamptz[], $10::timestamptz[],
    $11::timestamptz[], $12::bytea[], $13::text[], $14::bool[], $15::text[])
    AS r(idx, org, tid, eid, gen, nonce, gate, at, opens_by, closes_from, received_at,
      digest, answer, offline, actor)
),
taken AS (
  UPDATE tickets SET checked_in_at = req.at, checked_in_gate = req.gate
  FROM req
  WHERE tickets.id = req.tid AND tickets.org_id = req.org AND tickets.event_id = req.eid
    AND tickets.generation = req.gen AND tickets.status = 'valid'
    AND tickets.checked_in_at IS NULL
    AND EXISTS (SELECT 1 FROM events WHERE events.id = tickets.event_id
      AND events.starts_at <= req.opens_by AND events.ends_at >= req.closes_from)
    AND NOT EXISTS (SELECT 1 FROM checkin_scans
      WHERE checkin_scans.org_id = req.org AND checkin_scans.nonce = req.nonce)
  RETURNING req.idx, req.org, req.nonce, req.gate, req.at, req.received_at, req.digest,
    req.answer, req.offline, req.actor, tickets.id, tickets.event_id, tickets.subject_kind,
    tickets.subject_id, tickets.holder_ref,
    tickets.subject_kind || ':' || tickets.subject_id::text AS subject
),
visited AS (
  INSERT INTO visits (org_id, event_id, ticket_id, subject_kind, subject_id, at, gate)
  SELECT org, event_id, id, subject_kind, subject_id, at, gate FROM taken
),
logged AS (
  INSERT INTO funnel_events (org_id, at, kind, channel, event_id, drop_id, variant, segment,
    partner_id, lane_id, label, person, subject, value, currency, rolled)
  SELECT org, at, 'visit', '', event_id, NULL, '', '', NULL, NULL, '',
    (SELECT funnel_events.person FROM funnel_events WHERE funnel_events.org_id = taken.org
      AND funnel_events.subject = taken.subject AND funnel_events.person IS NOT NULL
      LIMIT 1),
    subject, 0, '', false
  FROM taken
),
scanned AS (
  INSERT INTO checkin_scans (org_id, nonce, secret_digest, event_id, ticket_id, result,
    status_code, answer, gate, offline, scanned_at, received_at, actor)
  SELECT org, nonce, digest, event_id, id, 'ok', 200, answer, gate, offline, at,
    received_at, actor
  FROM taken
  RETURNING id, org_id, nonce
)
SELECT taken.idx, taken.subject_kind, taken.subject_id, taken.holder_ref, scanned.id AS scan_id
FROM taken JOIN scanned ON scanned.org_id = taken.org AND scanned.nonce = taken.nonce"""
_GROUP_NAMES = (
    "idx", "org", "tid", "eid", "gen", "nonce", "gate", "at", "opens_by", "closes_from",
    "received_at", "digest", "answer", "offline", "actor",
)  # fmt: skip


@dataclass(frozen=True)
class _Grouped:
    """One scan's share of a grouped take: its values, in `_GROUP_NAMES` order after idx."""

    values: tuple[Any, ...]
    key: tuple[int, str]  # (org, nonce): one of each per batch


_GroupAnswer = tuple[str, int, str | None, int] | None  # subject_kind, id, holder_ref, scan


async def _flush_grouped(db: Database, items: Sequence[_Grouped]) -> list[_GroupAnswer]:
    """Take every scan of the batch in one statement; None for those that took nothing
    (or were not sent: a second scan with a nonce already in the batch)."""
    sent: list[int] = []
    keys: set[tuple[int, str]] = set()
    for index, item in enumerate(items):
        if item.key not in keys:
            keys.add(item.key)
            sent.append(index)
    columns: list[list[Any]] = [sent] + [
        [items[i].values[c] for i in sent] for c in range(len(_GROUP_NAMES) - 1)
    ]
    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        rows = await driver.fetch(_GROUP_TAKE_SQL, *columns)
    answers: list[_GroupAnswer] = [None] * len(items)
    for row in rows:
        answers[row[0]] = (row[1], row[2], row[3], row[4])
    return answers


# Batches per process in flight at once: more overlap the commit wait of one batch with
# the next; each takes a pool connection.
GROUP_IN_FLIGHT = 4
# On: in-process (16 scanners on bench_h2, alternating legs) the grouped path took 2-4x
# the ordinary path's scans/s; over HTTP (bench/checkin --quick, load average 5-14) scans
# reached 0.30-0.31 of the ceiling with it and 0.22 without (same code, this switch).
GROUP_COMMIT = True
GROUP_MAX_BATCH = 128
_GROUPS: dict[tuple[int, asyncio.AbstractEventLoop], GroupCommit[_Grouped, _GroupAnswer]] = {}


def _group_of(db: Database) -> GroupCommit[_Grouped, _GroupAnswer]:
    async def flush(items: Sequence[_Grouped]) -> Sequence[_GroupAnswer]:
        return await _flush_grouped(db, items)

    return for_loop(
        _GROUPS,
        id(db),
        lambda: GroupCommit(flush, max_batch=GROUP_MAX_BATCH, max_in_flight=GROUP_IN_FLIGHT),
    )


async def _grouped_checkin(
    db: Database,
    principal: Principal,
    request: ScanRequest,
    *,
    now: datetime,
    bound_event_id: int | None,
) -> tuple[int, dict[str, Any]] | None:
    """The common scan (a genuine QR secret of this org, a new nonce, a ticket that can be
    checked in) through the group commit; None for anything else (the ordinary path)."""
    principal.require(SCAN_SCOPE)
    at = request.scanned_at or now
    if not (now - MAX_SCAN_AGE <= at <= now + MAX_CLOCK_SKEW):
        return None
    claim = tickets.parse(request.secret)
    if claim is None:
        return None
    signer = _SIGNERS.get((str(db.engine.url), claim.event_id))
    if (
        signer is None  # not cached yet: the ordinary path loads it
        or signer.org_id != principal.org_id
        or (request.event_id or bound_event_id) not in (None, claim.event_id)
        or not tickets.signature_ok(signer.public, claim)
    ):
        return None
    body = _ok_body(request, claim, at)
    values = (
        principal.org_id, claim.ticket_id, claim.event_id, claim.generation, request.nonce,
        request.gate, at, at + OPENS_BEFORE, at - CLOSES_AFTER, now, _digest(request.secret),
        json.dumps(body), request.offline, principal.actor,
    )  # fmt: skip
    item = _Grouped(values, (principal.org_id, request.nonce))
    try:
        taken = await _group_of(db).submit(item)
    except GroupFailed:
        return None  # rolled back as a whole: this scan goes its own way
    if taken is None:
        return None
    kind, subject_id, holder_ref, scan_id = taken
    return 200, {**body, **_subject(kind, subject_id, holder_ref), "scan_id": scan_id}


@dataclass(frozen=True)
class HotSql:
    """What the PostgreSQL hot path sends for one successful scan (for the benchmark's
    pgbench limit): the statement text as asyncpg gets it, the bind name of each `$n`,
    the values the statement fixes itself, whether BEGIN/COMMIT wrap it, and whether each
    `$n` is an array (one element per scan of a batch)."""

    text: str
    names: tuple[str, ...]
    constants: dict[str, Any]
    in_transaction: bool
    arrays: bool


def hot_scan_sql() -> HotSql:
    """A lone scan on PostgreSQL: with the group commit, the grouped take with arrays of
    one, on its own; without, BEGIN, the fused take, COMMIT."""
    if GROUP_COMMIT:
        return HotSql(_GROUP_TAKE_SQL, _GROUP_NAMES, {}, in_transaction=False, arrays=True)
    from sqlalchemy.dialects.postgresql.asyncpg import dialect

    compiled = _FUSED_TAKE.compile(dialect=dialect())  # type: ignore[no-untyped-call]
    names = tuple(compiled.positiontup or ())
    constants = {name: compiled.params[name] for name in names if name not in _p}
    return HotSql(str(compiled), names, constants, in_transaction=True, arrays=False)


def _dialect(conn: Conn) -> str:
    if isinstance(conn, AsyncConnection):
        return conn.dialect.name
    return conn.get_bind().dialect.name


@asynccontextmanager
async def _scan_transaction(db: Database) -> AsyncIterator[Conn]:
    """PostgreSQL: a bare connection (the hot path skips the ORM); SQLite: the usual
    session, which queues writers on the process's write lock."""
    if db.dialect == "postgresql":
        async with db.engine.begin() as conn:
            yield conn
    else:
        async with db.transaction() as session:
            yield session


async def _genuine(session: Conn, principal: Principal, secret: str) -> tickets.TicketClaim | None:
    """The claim of a secret signed by an event key of the principal's org, else None."""
    claim = tickets.parse(secret)
    if claim is None:
        return None
    signer = await _load_signer(session, claim.event_id)
    if (
        signer is None
        or signer.org_id != principal.org_id
        or not tickets.signature_ok(signer.public, claim)
    ):
        return None
    return claim


def _subject(kind: str, subject_id: int, holder_ref: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"subject_kind": kind, "subject_id": subject_id}
    if holder_ref is not None:
        fields["holder_ref"] = holder_ref
    return fields


async def _take(
    session: Conn,
    principal: Principal,
    request: ScanRequest,
    claim: tickets.TicketClaim,
    *,
    at: datetime,
    now: datetime,
    digest: bytes,
) -> tuple[int, dict[str, Any]] | None:
    """The successful scan, taken and stored; None when the conditional update took nothing.

    The stored answer leaves out the subject (read back from the ticket on a replay), so
    PostgreSQL can write it in the same statement that takes the check-in.
    """
    body = _ok_body(request, claim, at)
    params = {
        "org": principal.org_id,
        "tid": claim.ticket_id,
        "eid": claim.event_id,
        "gen": claim.generation,
        "nonce": request.nonce,
        "gate": request.gate,
        "at": at,
        "opens_by": at + OPENS_BEFORE,
        "closes_from": at - CLOSES_AFTER,
        "received_at": now,
        "digest": digest,
        "answer": json.dumps(body),
        "offline": request.offline,
        "actor": principal.actor,
    }
    if _dialect(session) == "postgresql":
        row = (await session.execute(_FUSED_TAKE, params)).first()
        if row is None:
            return None
        if row.scan_id is None:  # a concurrent scan stored this nonce first
            raise NonceTaken
        subject = _subject(row.subject_kind, row.subject_id, row.holder_ref)
        return 200, {**body, **subject, "scan_id": row.scan_id}
    taken = (await session.execute(_TAKE, params)).first()
    if taken is None:
        return None
    await session.execute(
        insert(_visits).values(
            org_id=principal.org_id,
            event_id=taken.event_id,
            ticket_id=taken.id,
            subject_kind=taken.subject_kind,
            subject_id=taken.subject_id,
            at=at,
            gate=request.gate,
        )
    )
    await session.execute(
        _INSERT_LOG,
        {
            **params,
            "f_event": taken.event_id,
            "f_subject": f"{taken.subject_kind}:{taken.subject_id}",
        },
    )
    scan_id = await _insert_scan(session, params, claim.event_id, claim.ticket_id, "ok", 200)
    subject = _subject(taken.subject_kind, taken.subject_id, taken.holder_ref)
    return 200, {**body, **subject, "scan_id": scan_id}


async def _insert_scan(
    session: Conn,
    params: dict[str, Any],
    event_id: int | None,
    ticket_id: int | None,
    result: str,
    status: int,
) -> int:
    inserted = await session.execute(
        dialect_insert(_dialect(session), _scans)
        .values(
            org_id=params["org"],
            nonce=params["nonce"],
            secret_digest=params["digest"],
            event_id=event_id,
            ticket_id=ticket_id,
            result=result,
            status_code=status,
            answer=params["answer"],
            gate=params["gate"],
            offline=params["offline"],
            scanned_at=params["at"],
            received_at=params["received_at"],
            actor=params["actor"],
        )
        .on_conflict_do_nothing()
        .returning(_scans.c.id)
    )
    scan_id = inserted.scalar()
    if scan_id is None:
        raise NonceTaken
    return int(scan_id)


async def record_scan(
    session: Conn,
    principal: Principal,
    request: ScanRequest,
    *,
    now: datetime,
    bound_event_id: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """Decide one scan and store it with its answer; (HTTP status, answer body).

    The common case (a good ticket, a new nonce) is one conditional update that also
    checks the nonce is new; everything else first looks for a stored answer to replay.
    Raises `NonceTaken` when a concurrent scan with the same nonce committed first.
    """
    principal.require(SCAN_SCOPE)
    at = request.scanned_at or now
    if at > now + MAX_CLOCK_SKEW:
        raise PopdropError("invalid_request", "scanned_at is in the future")
    if at < now - MAX_SCAN_AGE:
        raise PopdropError("invalid_request", "scanned_at is more than 90 days ago")
    expected_event = request.event_id or bound_event_id
    if tickets.looks_like_short_code(request.secret):
        request = await _resolve_short_code(session, principal, request, expected_event)
    digest = _digest(request.secret)
    claim = await _genuine(session, principal, request.secret)
    if claim is not None and expected_event in (None, claim.event_id):
        done = await _take(session, principal, request, claim, at=at, now=now, digest=digest)
        if done is not None:
            return done
    stored = (
        await session.execute(_STORED, {"org": principal.org_id, "nonce": request.nonce})
    ).first()
    if stored is not None:
        if stored.secret_digest != digest:
            raise PopdropError("invalid_request", "this nonce was already used for another ticket")
        body = {**json.loads(stored.answer), "scan_id": stored.id}
        if stored.result == "ok":
            body.update(await _subject_of(session, principal, stored.ticket_id))
        return stored.status_code, body
    if claim is None:
        answer = _answer(request.nonce, at, "invalid")
    elif expected_event not in (None, claim.event_id):
        answer = _answer(
            request.nonce, at, "wrong_event", ticket_id=claim.ticket_id, event_id=claim.event_id
        )
    else:
        ids = {"ticket_id": claim.ticket_id, "event_id": claim.event_id}
        answer = await _refusal(session, principal, claim, at, request.nonce, ids)
    status = status_of(answer.result)
    body = answer.model_dump(mode="json", exclude_none=True)
    params = {
        "org": principal.org_id,
        "nonce": request.nonce,
        "digest": digest,
        "answer": json.dumps(body),
        "gate": request.gate,
        "offline": request.offline,
        "at": at,
        "received_at": now,
        "actor": principal.actor,
    }
    scan_id = await _insert_scan(
        session, params, answer.event_id, answer.ticket_id, answer.result, status
    )
    return status, {**body, "scan_id": scan_id}


async def _resolve_short_code(
    session: Conn, principal: Principal, request: ScanRequest, event_id: int | None
) -> ScanRequest:
    """The scan with the secret of the ticket its short code names; unchanged (so the
    scan is stored as `invalid`) when no ticket of the event has that code."""
    code = tickets.parse_short_code(request.secret)
    if code is None:
        raise PopdropError(
            "short_code_invalid",
            "this short code has a typo (its check character does not match): read it again",
            status=422,
        )
    if event_id is None:
        raise PopdropError("invalid_request", "a short code needs the scan's event_id")
    row = (
        await session.execute(
            select(
                _tickets.c.id, _tickets.c.event_id, _tickets.c.generation, _tickets.c.issued_epoch
            ).where(
                _tickets.c.org_id == principal.org_id,
                _tickets.c.event_id == event_id,
                _tickets.c.short_code == code,
            )
        )
    ).first()
    signer = None if row is None else await _load_signer(session, event_id)
    if row is None or signer is None:
        return request
    secret = tickets.sign(
        signer.private,
        event_id=row.event_id,
        ticket_id=row.id,
        generation=row.generation,
        issued_epoch=row.issued_epoch,
    )
    return request.model_copy(update={"secret": secret})


async def _subject_of(session: Conn, principal: Principal, ticket_id: int | None) -> dict[str, Any]:
    row = (
        await session.execute(
            select(_tickets.c.subject_kind, _tickets.c.subject_id, _tickets.c.holder_ref).where(
                _tickets.c.id == ticket_id, _tickets.c.org_id == principal.org_id
            )
        )
    ).first()
    return {} if row is None else _subject(row.subject_kind, row.subject_id, row.holder_ref)


def _ok_body(request: ScanRequest, claim: tickets.TicketClaim, at: datetime) -> dict[str, Any]:
    """The stored answer of a scan that took its ticket (without the subject: see below)."""
    return _answer(
        request.nonce,
        at,
        "ok",
        ticket_id=claim.ticket_id,
        event_id=claim.event_id,
        checked_in_at=at,
        gate=request.gate,
    ).model_dump(mode="json", exclude_none=True)


def _answer(
    nonce: str, at: datetime, result: str, *, text_key: str | None = None, **fields: Any
) -> ScanAnswer:
    return ScanAnswer(
        result=result,
        reason=None if result == "ok" else result,
        message=_TEXT[text_key or result],
        nonce=nonce,
        scanned_at=at,
        **fields,
    )


async def _refusal(
    session: Conn,
    principal: Principal,
    claim: tickets.TicketClaim,
    at: datetime,
    nonce: str,
    ids: dict[str, Any],
) -> ScanAnswer:
    def answer(result: str, *, text_key: str | None = None, **fields: Any) -> ScanAnswer:
        return _answer(nonce, at, result, text_key=text_key, **fields)

    """Why the conditional update took nothing (read after it, so it sees the winner)."""
    row = (
        await session.execute(
            select(
                _tickets.c.status,
                _tickets.c.generation,
                _tickets.c.checked_in_at,
                _tickets.c.checked_in_gate,
                _tickets.c.holder_ref,
                _window(at).label("in_window"),
                select(_events.c.timezone)
                .where(_events.c.id == _tickets.c.event_id)
                .scalar_subquery()
                .label("timezone"),
            ).where(
                _tickets.c.id == claim.ticket_id,
                _tickets.c.org_id == principal.org_id,
                _tickets.c.event_id == claim.event_id,
            )
        )
    ).first()
    if row is None:
        return answer("invalid")
    if row.status in ("cancelled", "revoked"):
        return answer(row.status, **ids)
    if row.generation != claim.generation:
        return answer("revoked", text_key="reissued", **ids)
    if row.checked_in_at is not None:
        first_gate = f" at gate {row.checked_in_gate}" if row.checked_in_gate else ""
        result = answer(
            "already_checked_in",
            first_checked_in_at=row.checked_in_at,
            first_gate=row.checked_in_gate,
            holder_ref=row.holder_ref,
            **ids,
        )
        when = local(row.checked_in_at, row.timezone, "%a %d %b, %H:%M:%S")  # the door's clock
        return result.model_copy(update={"message": f"already checked in {when}{first_gate}"})
    if not row.in_window:
        return answer("outside_window", **ids)
    return answer("invalid")  # unreachable in practice


async def checkin(
    db: Database,
    principal: Principal,
    request: ScanRequest,
    *,
    now: datetime,
    bound_event_id: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """One scan in its own transaction; a nonce that lost a race replays the winner. On
    PostgreSQL the common case goes through the group commit first."""
    if GROUP_COMMIT and db.dialect == "postgresql":
        done = await _grouped_checkin(
            db, principal, request, now=now, bound_event_id=bound_event_id
        )
        if done is not None:
            return done
    for _ in range(3):
        try:
            async with _scan_transaction(db) as conn:
                return await record_scan(
                    conn, principal, request, now=now, bound_event_id=bound_event_id
                )
        except NonceTaken:
            continue  # rolled back; the next round finds the stored answer
    raise PopdropError("conflict", "this nonce is being used by another scan; retry")


async def checkin_batch(
    db: Database, principal: Principal, scans: Sequence[ScanRequest], *, now: datetime
) -> list[tuple[int, dict[str, Any]]]:
    """Offline scans uploaded later: decided in the order they happened, answered in the
    order they came, each with its own transaction and stored with its original time."""
    principal.require(SCAN_SCOPE)
    order = sorted(range(len(scans)), key=lambda i: (scans[i].scanned_at or now, i))
    answers: dict[int, tuple[int, dict[str, Any]]] = {}
    for index in order:
        try:
            answers[index] = await checkin(db, principal, scans[index], now=now)
        except PopdropError as error:
            answers[index] = (error.status, error.to_dict())
    return [answers[i] for i in range(len(scans))]
