"""Import chunk writing: a chunk of parsed rows is planned against what the database
knows (existing contacts, suppressions) and written with set-based Core statements in one
transaction.

A row naming an existing contact fills what the contact lacks and never overwrites; a
grant is never recorded over a `revoked` state nor for a suppressed identifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    LargeBinary,
    Row,
    Select,
    Table,
    bindparam,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from popdrop.audience import consent
from popdrop.audience.import_rows import ParsedRow
from popdrop.audience.models import (
    ConsentEvent,
    Contact,
    ContactLabel,
    Suppression,
)
from popdrop.audience.schemas import (
    ImportRowProblem,
)
from popdrop.core.db import dialect_insert, table_of

_contacts = table_of(Contact)
_labels = table_of(ContactLabel)
_events = table_of(ConsentEvent)
_suppressions = table_of(Suppression)


# ---------------------------------------------------------------- writing chunks


@dataclass
class Totals:
    rows: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    refused: int = 0

    def add(self, other: Totals) -> None:
        self.rows += other.rows
        self.created += other.created
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.refused += other.refused


@dataclass
class ParsedChunk:
    """One chunk after validation: `rows` data rows read, the good ones, the refusals."""

    rows: int
    good: list[ParsedRow]
    refusals: list[ImportRowProblem]


@dataclass(slots=True, eq=False)
class _Known:
    """A contact as this chunk sees it: loaded (id set) or about to be inserted (id 0)."""

    id: int
    email: str | None
    phone: str | None
    email_hash: bytes | None
    phone_hash: bytes | None
    first_name: str | None
    locale: str | None
    time_zone: str | None
    source: str | None
    lat: float | None
    lon: float | None
    consent_email: str
    consent_sms: str
    erased: bool
    tags: set[str] = field(default_factory=set)
    interests: set[str] = field(default_factory=set)
    dirty: bool = False


_FILLED = ("first_name", "locale", "source")


def _fill(known: _Known, row: ParsedRow) -> bool:
    """Fill what the contact lacks from the row; True when anything changed."""
    changed = False
    if known.email is None and row.email is not None:
        known.email, known.email_hash, changed = row.email, row.email_hash, True
    phone_zone = None
    if known.phone is None and row.phone is not None:
        known.phone, known.phone_hash, changed = row.phone, row.phone_hash, True
    if known.phone == row.phone:
        phone_zone = row.phone_zone
    for name in _FILLED:
        value = getattr(row, name)
        if value is not None and getattr(known, name) is None:
            setattr(known, name, value)
            changed = True
    if known.lat is None and row.lat is not None:
        known.lat, known.lon, changed = row.lat, row.lon, True
    if known.time_zone is None:
        zone = row.time_zone or phone_zone
        if zone is not None:
            known.time_zone, changed = zone, True
    return changed


def _problem(row: ParsedRow, reason: str, field: str | None, message: str) -> ImportRowProblem:
    return ImportRowProblem(line=row.line, reason=reason, field=field, message=message)


@dataclass
class _Plan:
    totals: Totals
    problems: list[ImportRowProblem]
    new: list[_Known]
    changed: list[_Known]
    labels: list[tuple[_Known, str, str]]
    grants: list[tuple[_Known, ParsedRow, str]]


def _keyed(
    dialect: str, select_: Select[Any], column: Any, values: list[Any], kind: Any
) -> Select[Any]:
    """`select_` restricted to rows whose `column` is one of `values`.

    PostgreSQL: a join with `unnest` of one array parameter. The planner probes the unique
    index once per value whatever its statistics say; an `IN`/`= ANY` list would, while a
    bulk import outgrows the statistics, scan the organization's rows once per chunk."""
    if dialect == "postgresql":
        wanted = (
            func.unnest(bindparam(None, values, type_=ARRAY(kind)))
            .table_valued("v")
            .render_derived(name="wanted")
        )
        return select_.join(wanted, column == wanted.c.v)
    return select_.where(column.in_(values))


async def load_known(
    conn: AsyncConnection, org_id: int, rows: list[ParsedRow]
) -> tuple[dict[bytes, dict[str, str]], list[_Known]]:
    dialect = conn.dialect.name
    emails = [r.email_hash for r in rows if r.email_hash is not None]
    phones = [r.phone_hash for r in rows if r.phone_hash is not None]
    suppressed: dict[bytes, dict[str, str]] = {}
    s = _suppressions.c
    for digest, channel, reason in await conn.execute(
        _keyed(
            dialect,
            select(s.identifier_hash, s.channel, s.reason).where(s.org_id == org_id),
            s.identifier_hash,
            emails + phones,
            LargeBinary,
        )
    ):
        suppressed.setdefault(digest, {})[channel] = reason
    c = _contacts.c
    base = (
        select(
            c.id,
            c.email,
            c.phone,
            c.email_hash,
            c.phone_hash,
            c.first_name,
            c.locale,
            c.time_zone,
            c.source,
            c.lat,
            c.lon,
            c.consent_email,
            c.consent_sms,
            c.erased_at,
        )
        .where(c.org_id == org_id)
        .order_by(c.id)  # one lock order for every importer
        .with_for_update(of=_contacts)
    )
    found: dict[int, _Known] = {}
    for column, digests in ((c.email_hash, emails), (c.phone_hash, phones)):
        if not digests:
            continue
        for r in await conn.execute(_keyed(dialect, base, column, digests, LargeBinary)):
            found[r.id] = _Known(
                id=r.id,
                email=r.email,
                phone=r.phone,
                email_hash=r.email_hash,
                phone_hash=r.phone_hash,
                first_name=r.first_name,
                locale=r.locale,
                time_zone=r.time_zone,
                source=r.source,
                lat=r.lat,
                lon=r.lon,
                consent_email=r.consent_email,
                consent_sms=r.consent_sms,
                erased=r.erased_at is not None,
            )
    if found:
        lb = _labels.c
        for contact_id, kind, value in await conn.execute(
            _keyed(
                dialect,
                select(lb.contact_id, lb.kind, lb.value),
                lb.contact_id,
                list(found),
                BigInteger,
            )
        ):
            target = found[contact_id]
            (target.tags if kind == "tag" else target.interests).add(value)
    return suppressed, list(found.values())


def plan_chunk(
    rows: list[ParsedRow], suppressed: dict[bytes, dict[str, str]], known: list[_Known]
) -> _Plan:
    plan = _Plan(Totals(), [], [], [], [], [])
    by_email = {k.email_hash: k for k in known if k.email_hash is not None}
    by_phone = {k.phone_hash: k for k in known if k.phone_hash is not None}
    for row in rows:
        notes = [_problem(row, *_WITHOUT_PROOF)] if row.without_proof else []
        outcome = _plan_row(plan, row, notes, suppressed, by_email, by_phone)
        if outcome == "refused":
            plan.totals.refused += 1
            continue
        plan.problems.extend(notes)
        if outcome == "created":
            plan.totals.created += 1
        elif outcome == "updated":
            plan.totals.updated += 1
        else:
            plan.totals.unchanged += 1
    return plan


_WITHOUT_PROOF = (
    "consent_without_proof",
    "consent_proof",
    "consent needs a consent_proof; the contact was added without it",
)


def _refuse(plan: _Plan, row: ParsedRow, reason: str, field: str | None, message: str) -> str:
    plan.problems.append(_problem(row, reason, field, message))
    return "refused"


_ERASED = "this person was erased; they are not added again"


def _plan_row(
    plan: _Plan,
    row: ParsedRow,
    notes: list[ImportRowProblem],
    suppressed: dict[bytes, dict[str, str]],
    by_email: dict[bytes, _Known],
    by_phone: dict[bytes, _Known],
) -> str:
    if suppressed:
        for digest in (row.email_hash, row.phone_hash):
            if digest is not None and suppressed.get(digest, {}).get("all") == "erased":
                return _refuse(plan, row, "suppressed", None, _ERASED)
    by_e = by_email.get(row.email_hash) if row.email_hash and by_email else None
    by_p = by_phone.get(row.phone_hash) if row.phone_hash and by_phone else None
    target = by_e or by_p
    if target is None:
        return _plan_new(plan, row, notes, suppressed)
    if by_e is not None and by_p is not None and by_e is not by_p:
        return _refuse(
            plan,
            row,
            "conflict",
            None,
            "this email and this phone belong to two different contacts",
        )
    if target.erased:
        return _refuse(plan, row, "suppressed", None, _ERASED)
    if row.email_hash and target.email_hash not in (None, row.email_hash):
        return _refuse(
            plan, row, "conflict", "email", "this phone belongs to a contact with another email"
        )
    if row.phone_hash and target.phone_hash not in (None, row.phone_hash):
        return _refuse(
            plan, row, "conflict", "phone", "this email belongs to a contact with another phone"
        )
    changed = _fill(target, row)
    if target.email_hash is not None:
        by_email[target.email_hash] = target
    if target.phone_hash is not None:
        by_phone[target.phone_hash] = target
    for kind, values, have in (
        ("tag", row.tags, target.tags),
        ("interest", row.interests, target.interests),
    ):
        for value in values:
            if value not in have:
                have.add(value)
                plan.labels.append((target, kind, value))
                changed = True
    if row.grants and _grant(plan, target, row, notes, suppressed):
        changed = True
    if changed and not target.dirty:
        target.dirty = True
        plan.changed.append(target)
    return "updated" if changed else "unchanged"


def _plan_new(
    plan: _Plan,
    row: ParsedRow,
    notes: list[ImportRowProblem],
    suppressed: dict[bytes, dict[str, str]],
) -> str:
    target = _Known(
        0,
        row.email,
        row.phone,
        row.email_hash,
        row.phone_hash,
        row.first_name,
        row.locale,
        row.time_zone or row.phone_zone,
        row.source or "import",
        row.lat,
        row.lon,
        "none",
        "none",
        erased=False,
    )
    plan.new.append(target)
    for value in row.tags:
        plan.labels.append((target, "tag", value))
    for value in row.interests:
        plan.labels.append((target, "interest", value))
    if row.grants:
        _grant(plan, target, row, notes, suppressed)
    return "created"


def _grant(
    plan: _Plan,
    target: _Known,
    row: ParsedRow,
    notes: list[ImportRowProblem],
    suppressed: dict[bytes, dict[str, str]],
) -> bool:
    """Plan the row's consent grants; True when one changes the contact. Like
    `consent.change_consent` with an `import` source: never over an opt-out."""
    blocked: dict[str, str] = {}
    if suppressed:
        for digest in (target.email_hash, target.phone_hash):
            if digest is not None:
                blocked.update(suppressed.get(digest, {}))
    changed = False
    for channel in row.grants:
        column = consent.CONSENT_COLUMN[channel]
        state = getattr(target, column)
        if channel in blocked or "all" in blocked or state == "revoked":
            notes.append(
                _problem(
                    row,
                    "consent_suppressed",
                    column,
                    f"{column}: this person opted out; an import never subscribes them again",
                )
            )
        elif state != "granted":
            setattr(target, column, "granted")
            plan.grants.append((target, row, channel))
            changed = True
    return changed


async def _bulk_insert(
    conn: AsyncConnection,
    table: Table,
    columns: dict[str, list[Any]],
    constants: dict[str, Any],
    *,
    returning: tuple[str, ...] = (),
    skip_conflicts: bool = False,
) -> list[Row[Any]]:
    """One multi-row INSERT of `columns` (a list of values each) plus `constants`.

    PostgreSQL: `INSERT ... SELECT FROM unnest(<one array per column>)`, a handful of
    parameters whatever the row count (no per-row work in Python). SQLite: SQLAlchemy's
    multi-row VALUES batches."""
    dialect = conn.dialect.name
    stmt: Any
    if dialect == "postgresql":
        # An all-NULL column is one NULL, not an array of them (asyncpg checks each item).
        empty = [name for name, values in columns.items() if all(v is None for v in values)]
        if empty and len(empty) < len(columns):
            constants = {**constants, **dict.fromkeys(empty)}
            columns = {k: v for k, v in columns.items() if k not in empty}
    names = list(columns)
    if dialect == "postgresql":
        source = (
            func.unnest(
                *[
                    bindparam(None, values, type_=ARRAY(table.c[name].type))
                    for name, values in columns.items()
                ]
            )
            .table_valued(*names)
            .render_derived(name="src")
        )
        picked = select(
            *[source.c[name] for name in names],
            *[literal(value, table.c[name].type).label(name) for name, value in constants.items()],
        )
        stmt = dialect_insert(dialect, table).from_select([*names, *constants], picked)
        params: Any = None
    else:
        stmt = dialect_insert(dialect, table)
        count = len(next(iter(columns.values())))
        params = [{**constants, **{name: columns[name][i] for name in names}} for i in range(count)]
    if skip_conflicts:
        stmt = stmt.on_conflict_do_nothing()
    if returning:
        stmt = stmt.returning(*[table.c[name] for name in returning])
        return list((await conn.execute(stmt, params)).all())
    await conn.execute(stmt, params)
    return []


async def write_plan(
    conn: AsyncConnection, dialect: str, org_id: int, plan: _Plan, now: datetime
) -> None:
    if plan.new:
        new = plan.new
        inserted = await _bulk_insert(
            conn,
            _contacts,
            {
                "email": [k.email for k in new],
                "phone": [k.phone for k in new],
                "email_hash": [k.email_hash for k in new],
                "phone_hash": [k.phone_hash for k in new],
                "first_name": [k.first_name for k in new],
                "locale": [k.locale for k in new],
                "time_zone": [k.time_zone for k in new],
                "source": [k.source for k in new],
                "lat": [k.lat for k in new],
                "lon": [k.lon for k in new],
                "consent_email": [k.consent_email for k in new],
                "consent_sms": [k.consent_sms for k in new],
            },
            {
                "org_id": org_id,
                "consent_chat": "none",
                "frequency": "all",
                "created_at": now,
                "updated_at": now,
            },
            returning=("id", "email_hash", "phone_hash"),
        )
        by_hash = {k.email_hash or k.phone_hash: k for k in new}
        for contact_id, email_hash, phone_hash in inserted:  # type: ignore[misc]
            by_hash[email_hash or phone_hash].id = contact_id
    if plan.changed:
        c = _contacts.c
        await conn.execute(
            update(_contacts)
            .where(c.id == bindparam("b_id"))
            .values({name: bindparam(f"b_{name}") for name in _UPDATED} | {"updated_at": now}),
            [
                {"b_id": k.id} | {f"b_{name}": getattr(k, name) for name in _UPDATED}
                for k in plan.changed
            ],
        )
    if plan.labels:
        await _bulk_insert(
            conn,
            _labels,
            {
                "contact_id": [k.id for k, _, _ in plan.labels],
                "kind": [kind for _, kind, _ in plan.labels],
                "value": [value for _, _, value in plan.labels],
            },
            {"org_id": org_id},
            skip_conflicts=True,
        )
    if plan.grants:
        await _bulk_insert(
            conn,
            _events,
            {
                "contact_id": [k.id for k, _, _ in plan.grants],
                "channel": [channel for _, _, channel in plan.grants],
                "wording": [row.wording for _, row, _ in plan.grants],
                "proof": [row.proof for _, row, _ in plan.grants],
            },
            {"org_id": org_id, "action": "grant", "source": "import", "at": now},
        )


_UPDATED = (
    "email",
    "phone",
    "email_hash",
    "phone_hash",
    "first_name",
    "locale",
    "time_zone",
    "source",
    "lat",
    "lon",
    "consent_email",
    "consent_sms",
)
