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
    # PostgreSQL (`stage_chunk`): the staged rows that create contacts are every staged
    # row but these lines (rows naming a known contact or a suppressed identifier).
    staged: int = 0
    touched: list[int] = field(default_factory=list)


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


# ---------------------------------------------------------------- PostgreSQL: COPY + merge
#
# A chunk is COPYed into a temporary table (dropped at commit), then classified by one
# statement that probes the unique indexes per row: a row naming no contact and no
# suppressed identifier creates a contact; a row naming a contact it would not change in any
# way (every value it brings already there, every tag and interest, every consent granted,
# no suppression) is `unchanged`; the rest (fills, merges, conflicts, opt-outs, erasures:
# few rows of a real file) go through `load_known` / `plan_chunk`, the same rules as on
# SQLite. The new contacts, their labels and consent events are then one statement from
# the staging table. A row's outcome is the one `plan_chunk` gives it: the rows that create
# contacts or change nothing never interact with another row of the chunk (every email and
# phone is in one row of a file, and an unchanged row stays unchanged whatever another row
# fills in).

_STAGE = "popdrop_import_stage"
_STAGE_COLUMNS = ParsedRow._fields  # COPYed straight from the parsed rows
_STAGE_DDL = f"""CREATE TEMPORARY TABLE {_STAGE} (
    line integer NOT NULL, email text, phone text, email_hash bytea, phone_hash bytea,
    first_name text, locale text, time_zone text, phone_zone text, source text,
    lat double precision, lon double precision, tags text[] NOT NULL,
    interests text[] NOT NULL, grants text[] NOT NULL, wording text NOT NULL, proof text,
    without_proof boolean NOT NULL
) ON COMMIT DROP"""
# Index probes per staged row (scalar subqueries on the unique indexes, a lateral lookup by
# id), whatever the statistics say: while a bulk import outgrows them, a join could read
# every contact of the organization once per chunk.
_PROBE_SETTINGS = (
    "SELECT set_config('enable_hashjoin', 'off', true),"
    " set_config('enable_mergejoin', 'off', true), set_config('enable_material', 'off', true)"
)
_CLASSIFY = f"""
WITH m AS MATERIALIZED (
    SELECT s.*,
        (SELECT id FROM contacts WHERE org_id = $1 AND email_hash = s.email_hash) AS eid,
        (SELECT id FROM contacts WHERE org_id = $1 AND phone_hash = s.phone_hash) AS pid
    FROM {_STAGE} s
)
SELECT m.line, coalesce(
    (m.eid IS NULL OR m.pid IS NULL OR m.eid = m.pid)
    AND t.erased_at IS NULL
    AND (m.email IS NULL OR (t.email IS NOT NULL AND t.email_hash = m.email_hash))
    AND (m.phone IS NULL OR (t.phone IS NOT NULL AND t.phone_hash = m.phone_hash))
    AND (m.first_name IS NULL OR t.first_name IS NOT NULL)
    AND (m.locale IS NULL OR t.locale IS NOT NULL)
    AND (m.source IS NULL OR t.source IS NOT NULL)
    AND (m.lat IS NULL OR t.lat IS NOT NULL)
    AND (t.time_zone IS NOT NULL OR coalesce(
        m.time_zone, CASE WHEN t.phone = m.phone THEN m.phone_zone END) IS NULL)
    AND (NOT 'email' = ANY(m.grants) OR t.consent_email = 'granted')
    AND (NOT 'sms' = ANY(m.grants) OR t.consent_sms = 'granted')
    AND NOT EXISTS (
        SELECT FROM unnest(m.tags) v WHERE NOT EXISTS (
            SELECT FROM contact_labels l
            WHERE l.contact_id = t.id AND l.kind = 'tag' AND l.value = v))
    AND NOT EXISTS (
        SELECT FROM unnest(m.interests) v WHERE NOT EXISTS (
            SELECT FROM contact_labels l
            WHERE l.contact_id = t.id AND l.kind = 'interest' AND l.value = v))
    AND NOT EXISTS (
        SELECT FROM suppressions x WHERE x.org_id = $1
        AND x.identifier_hash IN (m.email_hash, m.phone_hash, t.email_hash, t.phone_hash)),
    false) AS same
FROM m
LEFT JOIN LATERAL (SELECT * FROM contacts WHERE id = coalesce(m.eid, m.pid)) t ON true
WHERE m.eid IS NOT NULL OR m.pid IS NOT NULL OR EXISTS (
    SELECT FROM suppressions x
    WHERE x.org_id = $1 AND x.identifier_hash IN (m.email_hash, m.phone_hash))
"""
# What `_plan_new` + `write_plan` write for a new contact, for every fresh staged row at
# once; ids in file order.
_CREATE = f"""
WITH fresh AS MATERIALIZED (
    SELECT nextval((SELECT pg_get_serial_sequence('contacts', 'id'))::regclass) AS id, s.*
    FROM (
        SELECT * FROM {_STAGE} WHERE line NOT IN (SELECT unnest($2::integer[])) ORDER BY line
    ) s
), made AS (
    INSERT INTO contacts (
        id, org_id, email, phone, email_hash, phone_hash, first_name, locale, time_zone,
        source, lat, lon, consent_email, consent_sms, consent_chat, frequency,
        created_at, updated_at)
    SELECT id, $1, email, phone, email_hash, phone_hash, first_name, locale,
        coalesce(time_zone, phone_zone), coalesce(source, 'import'), lat, lon,
        CASE WHEN 'email' = ANY(grants) THEN 'granted' ELSE 'none' END,
        CASE WHEN 'sms' = ANY(grants) THEN 'granted' ELSE 'none' END,
        'none', 'all', $3, $3
    FROM fresh ORDER BY id
), labelled AS (
    INSERT INTO contact_labels (contact_id, kind, value, org_id)
    SELECT f.id, 'tag', v, $1 FROM fresh f, unnest(f.tags) v
    UNION ALL
    SELECT f.id, 'interest', v, $1 FROM fresh f, unnest(f.interests) v
    ON CONFLICT DO NOTHING
), granted AS (
    INSERT INTO consent_events (org_id, contact_id, channel, action, source, wording, proof, at)
    SELECT $1, f.id, g.channel, 'grant', 'import', f.wording, f.proof, $3
    FROM fresh f, unnest(f.grants) WITH ORDINALITY g(channel, n)
    ORDER BY f.id, g.n
)
SELECT count(*) FROM fresh
"""


async def _driver(conn: AsyncConnection) -> Any:
    """The asyncpg connection under `conn`, inside `conn`'s transaction."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None and driver.is_in_transaction()
    return driver


async def stage_chunk(conn: AsyncConnection, org_id: int, rows: list[ParsedRow]) -> _Plan:
    """PostgreSQL: COPY the chunk's valid rows into the staging table and plan them (see
    above); `write_plan` creates the fresh ones from the staging table."""
    await conn.exec_driver_sql(_PROBE_SETTINGS)  # also opens the transaction
    driver = await _driver(conn)
    await driver.execute(_STAGE_DDL)
    await driver.copy_records_to_table(_STAGE, records=rows, columns=_STAGE_COLUMNS)
    classified = await driver.fetch(_CLASSIFY, org_id)
    touched = {line for line, _ in classified}
    same = {line for line, unchanged in classified if unchanged}
    by_line = {row.line: row for row in rows} if touched else {}
    rest = [by_line[line] for line in sorted(touched - same)]
    if rest:
        suppressed, known = await load_known(conn, org_id, rest)
        plan = plan_chunk(rest, suppressed, known)
    else:
        plan = _Plan(Totals(), [], [], [], [], [])
    plan.staged = len(rows) - len(touched)
    plan.touched = sorted(touched)
    plan.totals.created += plan.staged
    plan.totals.unchanged += len(same)
    plan.problems.extend(
        _problem(row, *_WITHOUT_PROOF)
        for row in rows
        if row.without_proof and (row.line not in touched or row.line in same)
    )
    return plan


async def _create_staged(conn: AsyncConnection, org_id: int, plan: _Plan, now: datetime) -> None:
    driver = await _driver(conn)
    created = await driver.fetchval(_CREATE, org_id, plan.touched, now)
    assert created == plan.staged, (created, plan.staged)


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
    if plan.staged:
        await _create_staged(conn, org_id, plan, now)
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
