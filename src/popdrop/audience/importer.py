"""CSV import and export of contacts, and the export of the consent ledger.

Import rules:
- Columns (header row, any case): `COLUMNS`. An unknown column refuses the whole file
  before any row is read, naming it; so does a file that is not UTF-8 CSV.
- Every row is validated in Python first; a refused row is reported by its file line
  (header = line 1) and a machine-readable reason (`REFUSALS`); notes (`NOTES`) report
  what was left out of a row that still landed. Reports never quote an email or a phone:
  they are stored, and an erased person must not survive in one.
- Rows are written a chunk at a time, one transaction per chunk, with set-based Core
  statements. A crash leaves whole chunks; importing the file again completes it, since an
  import is idempotent: a row that changes nothing is `unchanged`, with no new event.
- Dedupe is on the keyed hashes of the normalised email and phone: a second row with the
  same email or phone is a `duplicate`; a row naming an existing contact fills what the
  contact lacks (never overwrites what they or an operator set) and adds its tags and
  interests. Email and phone naming two different contacts is a `conflict`.
- An identifier that was erased is refused (`suppressed`) and never comes back.
- Consent needs `consent_proof` (else the contact lands without it). A grant is recorded
  like `consent.change_consent` records one (source `import`), never over a `revoked`
  state nor for a suppressed identifier: an import never re-subscribes anyone.

Exports stream CSV text a page at a time (keyset paging): contacts with the minimal fields
(optionally only the sendable ones, or one segment's), and the consent ledger. Erased
contacts are never exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import io
import json
import logging
import math
import multiprocessing
import re
import zoneinfo
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import phonenumbers
from phonenumbers import timezone as phone_timezones
from phonenumbers.tzdata import TIMEZONE_DATA
from sqlalchemy import (
    BigInteger,
    ColumnElement,
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
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from popdrop.accounts.service import Principal
from popdrop.audience import consent, segments
from popdrop.audience.models import (
    ConsentEvent,
    Contact,
    ContactLabel,
    ImportJob,
    Suppression,
)
from popdrop.audience.schemas import (
    ImportJobOut,
    ImportReport,
    ImportRowProblem,
    SegmentRules,
    clean_labels,
)
from popdrop.core.clock import Clock
from popdrop.core.csvsafe import csv_text, restore_cell
from popdrop.core.db import Database, dialect_insert, is_retryable, table_of
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.identity import identity_hash, normalize_email, normalize_phone
from popdrop.core.signing import Signer

log = logging.getLogger(__name__)

COLUMNS = (
    "email",
    "phone",
    "first_name",
    "locale",
    "time_zone",
    "tags",
    "interests",
    "source",
    "lat",
    "lon",
    "consent_email",
    "consent_sms",
    "consent_wording",
    "consent_proof",
    "phone_region",
)
REFUSALS = frozenset(
    {"bad_email", "bad_phone", "missing_contact", "duplicate", "suppressed", "conflict"}
    | {"bad_value"}
)
NOTES = frozenset({"consent_without_proof", "consent_suppressed"})
TRUE_WORDS = frozenset({"yes", "true", "1", "y"})
FALSE_WORDS = frozenset({"no", "false", "0", "n", ""})
CHUNK_SIZE = 5000
# From this many rows a file is validated in a worker process (starting one takes ~1 s).
PARALLEL_MIN_ROWS = 50_000
MAX_LABELS = 50
# A job stores at most this many report lines (counters stay exact); the CLI keeps all.
MAX_STORED_PROBLEMS = 10_000
CONTACT_FIELDS = (
    "id",
    "email",
    "phone",
    "first_name",
    "locale",
    "time_zone",
    "tags",
    "interests",
    "consent_email",
    "consent_sms",
    "consent_chat",
    "last_engaged_at",
)
CONSENT_FIELDS = ("contact_id", "channel", "action", "source", "wording", "proof", "at")

Progress = Callable[[int, int], None]
Opener = Callable[[], contextlib.AbstractContextManager[IO[str]]]

_contacts = table_of(Contact)
_labels = table_of(ContactLabel)
_events = table_of(ConsentEvent)
_suppressions = table_of(Suppression)
_LABEL_SPLIT = re.compile(r"[;|]")
_LOCALE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*\Z")
_REGION = re.compile(r"[A-Za-z]{2}\Z")
# RFC 5322 dot-atom: the local parts email-validator passes through unchanged.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")


# ---------------------------------------------------------------- row validation


class _Refused(Exception):
    def __init__(self, reason: str, field: str | None, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.message = message


class _Row(NamedTuple):
    """A validated row (a tuple: it crosses from the validating process cheaply)."""

    line: int
    email: str | None
    phone: str | None
    email_hash: bytes | None
    phone_hash: bytes | None
    first_name: str | None
    locale: str | None
    time_zone: str | None
    phone_zone: str | None
    source: str | None
    lat: float | None
    lon: float | None
    tags: list[str]
    interests: list[str]
    grants: tuple[str, ...]
    wording: str
    proof: str | None
    without_proof: bool  # consent asked for, no proof given: imported without consent


class EmailNormalizer:
    """`core.identity.normalize_email`, fast for the common case.

    Most of email-validator's time goes to the domain, and a list holds few domains: for an
    ASCII dot-atom local part (which the validator returns unchanged) the domain is
    validated once through `normalize_email` and remembered. Anything else, and every
    error, goes through `normalize_email` itself, so results are the same."""

    def __init__(self, max_domains: int = 50_000) -> None:
        self._domains: dict[str, str | None] = {}
        self._max = max_domains

    def __call__(self, raw: str) -> str:
        text = raw.strip()
        local, _, domain = text.partition("@")
        if (
            domain
            and len(text) <= 254
            and len(local) <= 64
            and text.isascii()
            and "@" not in domain
            and _DOT_ATOM.match(local)
        ):
            clean = self._domain(domain)
            if clean is not None:
                address = f"{local.lower()}@{clean}"
                if len(address.encode()) <= 254:
                    return address
        return normalize_email(text)

    def _domain(self, domain: str) -> str | None:
        if domain in self._domains:
            return self._domains[domain]
        try:
            clean: str | None = normalize_email(f"x@{domain}").partition("@")[2]
        except PopdropError:
            clean = None
        if len(self._domains) < self._max:
            self._domains[domain] = clean
        return clean


def phone_and_zone(raw: str, region: str | None, *, zone: bool = True) -> tuple[str, str | None]:
    """`core.identity.normalize_phone` and `phone_time_zone` with one parse (the parse is
    most of their cost): the E.164 number and (if `zone`) its time zone when it has one."""
    try:
        parsed = phonenumbers.parse(raw.strip(), region)
    except phonenumbers.NumberParseException:
        return normalize_phone(raw, region), None  # raises with the one message
    if not phonenumbers.is_valid_number(parsed):
        return normalize_phone(raw, region), None  # raises with the one message
    e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if not zone:
        return e164, None
    known, single = _country_zone(parsed.country_code)
    if known:
        return e164, single
    zones = [z for z in phone_timezones.time_zones_for_number(parsed) if "/" in z]
    return e164, zones[0] if len(zones) == 1 else None


@functools.cache
def _country_zone(country_code: int) -> tuple[bool, str | None]:
    """(True, zone) when every valid number of this country code has the same zones in
    phonenumbers' data (FR, DE ...): the lookup, which classifies the number again, is
    then not needed. (False, None) when the zone depends on the number (US ...)."""
    code = str(country_code)
    related = {v for k, v in TIMEZONE_DATA.items() if k.startswith(code) or code.startswith(k)}
    if code not in TIMEZONE_DATA or len(related) != 1:
        return False, None
    zones = [z for z in related.pop() if "/" in z]
    return True, zones[0] if len(zones) == 1 else None


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())  # reads the tz database: once


def _known_zone(name: str) -> bool:
    return name in _zones()


def _dedupe_key(digest: bytes) -> int:
    # 8 bytes of a keyed hash: a third of the memory of the digests for a million rows;
    # a false duplicate needs a 64-bit collision within one file.
    return int.from_bytes(digest[:8], "big")


def _flag(value: str, name: str) -> bool:
    word = value.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise _Refused("bad_value", name, f"{name}: use yes or no")


def _text(value: str, name: str, limit: int) -> str | None:
    if len(value) > limit:
        raise _Refused("bad_value", name, f"{name}: at most {limit} characters")
    return value or None


def _labels_of(value: str, name: str) -> list[str]:
    if not value:
        return []
    labels = clean_labels(_LABEL_SPLIT.split(value))
    if len(labels) > MAX_LABELS:
        raise _Refused("bad_value", name, f"{name}: at most {MAX_LABELS}")
    return labels


def _coordinate(value: str, name: str, bound: float) -> float | None:
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or abs(number) > bound:
        raise _Refused("bad_value", name, f"{name}: a number between -{bound:g} and {bound:g}")
    return number


class RowParser:
    """Validates rows and remembers, for duplicates, the first line of every email/phone."""

    def __init__(
        self, signer: Signer, header: list[str], *, region: str | None, filename: str
    ) -> None:
        self._signer = signer
        self._width = len(header)
        # Where each known column sits; a missing one points at the "" appended to each row.
        self._at = {name: header.index(name) if name in header else -1 for name in COLUMNS}
        self._region = region
        self._emails = EmailNormalizer()
        self._wording = f"Consent given before import (file {filename})"
        self._seen_email: dict[int, int] = {}
        self._seen_phone: dict[int, int] = {}

    def parse(self, values: list[str], line: int) -> _Row:
        """The row, or `_Refused`. A row that passes is remembered for duplicates."""
        if len(values) > self._width:
            raise _Refused("bad_value", None, "the row has more fields than the header")
        cells = [restore_cell(v.strip()) for v in values]  # our own export's quotes undone
        cells.extend([""] * (self._width - len(values) + 1))
        at = self._at

        def cell(_values: list[str], name: str) -> str:
            return cells[at[name]]

        raw_email, raw_phone = cell(values, "email"), cell(values, "phone")
        email = phone = phone_zone = None
        if raw_email:
            try:
                email = self._emails(raw_email)
            except PopdropError as exc:
                # A fixed message: the validator's may quote parts of the address.
                raise _Refused("bad_email", "email", "email: not a valid email address") from exc
        if raw_phone:
            region = cell(values, "phone_region") or self._region
            if region is not None and not _REGION.match(region):
                raise _Refused("bad_value", "phone_region", "phone_region: two letters, e.g. FR")
            try:
                phone, phone_zone = phone_and_zone(
                    raw_phone,
                    region.upper() if region else None,
                    zone=not cell(values, "time_zone"),
                )
            except PopdropError as exc:
                raise _Refused("bad_phone", "phone", exc.message) from exc
        if email is None and phone is None:
            raise _Refused("missing_contact", "contact", "give an email or a phone number")
        locale = _text(cell(values, "locale"), "locale", 16)
        if locale is not None:
            if not _LOCALE.match(locale):
                raise _Refused("bad_value", "locale", "locale: a language tag, e.g. fr or fr-FR")
            locale = locale.replace("_", "-")
        time_zone = _text(cell(values, "time_zone"), "time_zone", 64)
        if time_zone is not None and not _known_zone(time_zone):
            raise _Refused("bad_value", "time_zone", "time_zone: an IANA name, e.g. Europe/Paris")
        lat = _coordinate(cell(values, "lat"), "lat", 90)
        lon = _coordinate(cell(values, "lon"), "lon", 180)
        if (lat is None) != (lon is None):
            raise _Refused("bad_value", "lat" if lat is None else "lon", "give both lat and lon")
        wants: list[str] = []
        if _flag(cell(values, "consent_email"), "consent_email"):
            if email is None:
                raise _Refused("bad_value", "consent_email", "consent_email: the row has no email")
            wants.append("email")
        if _flag(cell(values, "consent_sms"), "consent_sms"):
            if phone is None:
                raise _Refused("bad_value", "consent_sms", "consent_sms: the row has no phone")
            wants.append("sms")
        wording = _text(cell(values, "consent_wording"), "consent_wording", 2000)
        proof = _text(cell(values, "consent_proof"), "consent_proof", 2000)
        row = _Row(
            line=line,
            email=email,
            phone=phone,
            email_hash=identity_hash(self._signer, "email", email) if email else None,
            phone_hash=identity_hash(self._signer, "phone", phone) if phone else None,
            first_name=_text(cell(values, "first_name"), "first_name", 100),
            locale=locale,
            time_zone=time_zone,
            phone_zone=phone_zone,
            source=_text(cell(values, "source"), "source", 100),
            lat=lat,
            lon=lon,
            tags=_labels_of(cell(values, "tags"), "tags"),
            interests=_labels_of(cell(values, "interests"), "interests"),
            grants=tuple(wants) if proof is not None else (),
            wording=wording or self._wording,
            proof=proof,
            without_proof=bool(wants) and proof is None,
        )
        self._remember(row)
        return row

    def _remember(self, row: _Row) -> None:
        ekey = _dedupe_key(row.email_hash) if row.email_hash else None
        pkey = _dedupe_key(row.phone_hash) if row.phone_hash else None
        if ekey is not None and (first := self._seen_email.get(ekey)) is not None:
            raise _Refused("duplicate", "email", f"the same email address as line {first}")
        if pkey is not None and (first := self._seen_phone.get(pkey)) is not None:
            raise _Refused("duplicate", "phone", f"the same phone number as line {first}")
        if ekey is not None:
            self._seen_email[ekey] = row.line
        if pkey is not None:
            self._seen_phone[pkey] = row.line


def read_header(first: list[str] | None) -> list[str]:
    """The lower-cased column names; refuse unknown or repeated columns up front."""
    if not first or not any(name.strip() for name in first):
        raise PopdropError("invalid_request", "the file is empty: the first line names columns")
    header = [name.strip().lower() for name in first]
    unknown = sorted({name for name in header if name not in COLUMNS})
    if unknown:
        raise PopdropError(
            "invalid_request",
            f"unknown columns: {', '.join(repr(n) for n in unknown)}; "
            f"known columns: {', '.join(COLUMNS)}",
            detail={"field": "columns", "unknown": unknown},
        )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise PopdropError("invalid_request", f"columns named twice: {', '.join(repeated)}")
    if "email" not in header and "phone" not in header:
        raise PopdropError("invalid_request", "the file needs an email or a phone column")
    return header


def _blank(values: list[str]) -> bool:
    return not any(v.strip() for v in values)


@contextlib.contextmanager
def _csv_errors() -> Iterator[None]:
    try:
        yield
    except UnicodeDecodeError as exc:
        raise PopdropError("invalid_request", "the file is not UTF-8 text") from exc
    except csv.Error as exc:
        raise PopdropError("invalid_request", f"not a readable CSV file: {exc}") from exc


def check_file(opener: Opener) -> int:
    """Read the whole file once: the header must be valid and every line readable CSV.
    Returns the number of data rows (blank lines are not rows)."""
    with _csv_errors(), opener() as stream:
        reader = csv.reader(stream)
        read_header(next(reader, None))
        return sum(1 for values in reader if not _blank(values))


def text_opener(text: str) -> Opener:
    body = text.removeprefix("\ufeff")
    return lambda: contextlib.nullcontext(io.StringIO(body, newline=""))


def file_opener(path: Path) -> Opener:
    return lambda: path.open(encoding="utf-8-sig", newline="")


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
class _Parsed:
    """One chunk after validation: `rows` data rows read, the good ones, the refusals."""

    rows: int
    good: list[_Row]
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


def _fill(known: _Known, row: _Row) -> bool:
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


def _problem(row: _Row, reason: str, field: str | None, message: str) -> ImportRowProblem:
    return ImportRowProblem(line=row.line, reason=reason, field=field, message=message)


@dataclass
class _Plan:
    totals: Totals
    problems: list[ImportRowProblem]
    new: list[_Known]
    changed: list[_Known]
    labels: list[tuple[_Known, str, str]]
    grants: list[tuple[_Known, _Row, str]]


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


async def _load(
    conn: AsyncConnection, org_id: int, rows: list[_Row]
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


def _plan(rows: list[_Row], suppressed: dict[bytes, dict[str, str]], known: list[_Known]) -> _Plan:
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


def _refuse(plan: _Plan, row: _Row, reason: str, field: str | None, message: str) -> str:
    plan.problems.append(_problem(row, reason, field, message))
    return "refused"


_ERASED = "this person was erased; they are not added again"


def _plan_row(
    plan: _Plan,
    row: _Row,
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
    plan: _Plan, row: _Row, notes: list[ImportRowProblem], suppressed: dict[bytes, dict[str, str]]
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
    row: _Row,
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


async def _write_plan(
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


# ---------------------------------------------------------------- the import


class _TakenOver(Exception):
    """Another runner moved this job on: this one stops (its chunk is rolled back)."""


OnCommit = Callable[[AsyncSession, Totals, Totals, list[ImportRowProblem]], Awaitable[None]]


Batch = list[tuple[int, list[str]]]


def _batches(reader: Any, chunk_size: int, skip: int) -> Iterator[tuple[Batch, bool]]:
    """Raw data rows with their first line, `chunk_size` at a time, and whether to keep the
    batch: the first `skip` rows (written by an earlier run of a job) are only validated,
    so that duplicates still point at their first line."""
    batch: Batch = []
    seen = 0
    end = reader.line_num  # a csv reader, past the header
    for values in reader:
        line, end = end + 1, reader.line_num  # a quoted field may span lines: its first one
        if _blank(values):
            continue
        seen += 1
        batch.append((line, values))
        if len(batch) >= chunk_size or seen == skip:
            yield batch, seen > skip
            batch = []
    if batch:
        yield batch, seen > skip


def _parse_batch(parser: RowParser, batch: Batch, keep: bool) -> _Parsed:
    parsed = _Parsed(len(batch) if keep else 0, [], [])
    for line, values in batch:
        try:
            row = parser.parse(values, line)
        except _Refused as refusal:
            if keep:
                parsed.refusals.append(
                    ImportRowProblem(
                        line=line,
                        reason=refusal.reason,
                        field=refusal.field,
                        message=refusal.message,
                    )
                )
        else:
            if keep:
                parsed.good.append(row)
    return parsed


# The worker process's parser (`_start_worker`): it keeps the file's duplicate memory.
_worker: dict[str, RowParser] = {}


def _start_worker(signer: Signer, header: list[str], region: str | None, filename: str) -> None:
    _worker["parser"] = RowParser(signer, header, region=region, filename=filename)


def _parse_in_worker(batch: Batch, keep: bool) -> _Parsed:
    return _parse_batch(_worker["parser"], batch, keep)


class _Validator:
    """Validated chunks, one ahead of the writer. In a thread by default (it keeps a serving
    event loop responsive); for a big file in a worker process, where it runs in parallel
    with this process's writing instead of taking turns on one interpreter lock."""

    def __init__(
        self,
        stream: IO[str],
        signer: Signer,
        *,
        region: str | None,
        filename: str,
        chunk_size: int,
        skip: int,
        parallel: bool,
    ) -> None:
        reader = csv.reader(stream)
        with _csv_errors():
            header = read_header(next(reader, None))
        self._batches = _batches(reader, chunk_size, skip)
        self._parser = RowParser(signer, header, region=region, filename=filename)
        self._pool: ProcessPoolExecutor | None = None
        if parallel:
            self._pool = ProcessPoolExecutor(
                1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(signer, header, region, filename),
            )

    def _next_batch(self) -> tuple[Batch, bool] | None:
        with _csv_errors():
            return next(self._batches, None)

    def _next_in_thread(self) -> _Parsed | None:
        while (batch := self._next_batch()) is not None:
            parsed = _parse_batch(self._parser, *batch)
            if batch[1]:
                return parsed
        return None

    async def next(self) -> _Parsed | None:
        if self._pool is None:
            return await asyncio.to_thread(self._next_in_thread)
        while (batch := await asyncio.to_thread(self._next_batch)) is not None:
            parsed = await asyncio.wrap_future(self._pool.submit(_parse_in_worker, *batch))
            if batch[1]:
                return parsed
        return None

    async def close(self) -> None:
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, True, cancel_futures=True)


async def _apply(
    db: Database,
    org_id: int,
    parsed: _Parsed,
    now: datetime,
    before: Totals,
    problems_before: list[ImportRowProblem],
    on_commit: OnCommit | None,
) -> tuple[Totals, list[ImportRowProblem]]:
    """Write one chunk in one transaction; again (from a fresh read) when a concurrent
    writer added the same person first or PostgreSQL broke a deadlock."""
    attempts = 3
    for attempt in range(1, attempts + 1):
        try:
            async with db.transaction() as session:
                conn = await session.connection()
                totals = Totals(rows=parsed.rows, refused=len(parsed.refusals))
                problems = list(parsed.refusals)
                if parsed.good:
                    suppressed, known = await _load(conn, org_id, parsed.good)
                    plan = _plan(parsed.good, suppressed, known)
                    await _write_plan(conn, db.dialect, org_id, plan, now)
                    totals.add(plan.totals)
                    problems.extend(plan.problems)
                    problems.sort(key=lambda p: p.line)
                if on_commit is not None:
                    after = Totals()
                    after.add(before)
                    after.add(totals)
                    await on_commit(session, before, after, problems_before + problems)
            return totals, problems
        except DBAPIError as exc:
            if not (isinstance(exc, IntegrityError) or is_retryable(exc)):
                raise
            if attempt == attempts:
                raise PopdropError(
                    "conflict",
                    "the same contacts were being changed by someone else; import again",
                ) from exc
            await asyncio.sleep(0.01 * attempt)
    raise AssertionError("unreachable")


async def _import(
    db: Database,
    signer: Signer,
    principal: Principal,
    opener: Opener,
    *,
    filename: str,
    region: str | None,
    now: datetime,
    progress: Progress | None,
    chunk_size: int,
    total: int | None = None,
    start: Totals | None = None,
    problems: list[ImportRowProblem] | None = None,
    on_commit: OnCommit | None = None,
    parallel: bool | None = None,
) -> ImportReport:
    principal.require("audience:write")
    region = _region(region)
    if total is None:
        total = await asyncio.to_thread(check_file, opener)
    totals = start or Totals()
    found = list(problems or [])
    with opener() as stream:
        validator = _Validator(
            stream,
            signer,
            region=region,
            filename=filename,
            chunk_size=chunk_size,
            skip=totals.rows,
            parallel=total >= PARALLEL_MIN_ROWS if parallel is None else parallel,
        )
        # PostgreSQL without a job to keep in step: two chunks in flight on two connections,
        # so one's statements run while this process plans the other. Chunks never share a
        # new contact (duplicates are refused), and a contact two chunks touch is locked.
        depth = 2 if db.dialect == "postgresql" and on_commit is None else 1
        flying: deque[asyncio.Future[tuple[Totals, list[ImportRowProblem]]]] = deque()

        async def settle() -> None:
            done, new = await flying.popleft()
            totals.add(done)
            found.extend(new)
            if progress is not None:
                progress(totals.rows, total)

        pending = asyncio.ensure_future(validator.next())
        try:
            while (parsed := await pending) is not None:
                pending = asyncio.ensure_future(validator.next())
                flying.append(
                    asyncio.ensure_future(
                        _apply(db, principal.org_id, parsed, now, totals, found, on_commit)
                    )
                )
                if len(flying) >= depth:
                    await settle()
            while flying:
                await settle()
        finally:
            for task in flying:
                task.cancel()
            # The thread must let go of the file before it is closed.
            started: list[asyncio.Future[Any]] = [pending, *flying]
            await asyncio.wait(started)
            for future in started:
                if not future.cancelled():
                    future.exception()
            await validator.close()
    return ImportReport(
        total_rows=totals.rows,
        created=totals.created,
        updated=totals.updated,
        unchanged=totals.unchanged,
        refused=totals.refused,
        problems=found,
    )


def _region(region: str | None) -> str | None:
    if region is None or not region.strip():
        return None
    if not _REGION.match(region.strip()):
        raise PopdropError("invalid_request", "region: two letters, e.g. FR")
    return region.strip().upper()


async def import_file(
    db: Database,
    signer: Signer,
    principal: Principal,
    path: Path,
    *,
    now: datetime,
    region: str | None = None,
    progress: Progress | None = None,
    chunk_size: int = CHUNK_SIZE,
    parallel: bool | None = None,
) -> ImportReport:
    """Import a CSV file (UTF-8, a BOM is fine); see the module's rules. `parallel`:
    validate in a worker process (default: from `PARALLEL_MIN_ROWS` rows)."""
    if not await asyncio.to_thread(path.is_file):
        raise PopdropError("invalid_request", f"{path}: no such file")
    return await _import(
        db,
        signer,
        principal,
        file_opener(path),
        filename=path.name,
        region=region,
        now=now,
        progress=progress,
        chunk_size=chunk_size,
        parallel=parallel,
    )


async def import_text(
    db: Database,
    signer: Signer,
    principal: Principal,
    text: str,
    *,
    filename: str,
    now: datetime,
    region: str | None = None,
    progress: Progress | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> ImportReport:
    """Import CSV text already in memory (an upload)."""
    return await _import(
        db,
        signer,
        principal,
        text_opener(text),
        filename=filename,
        region=region,
        now=now,
        progress=progress,
        chunk_size=chunk_size,
    )


# ---------------------------------------------------------------- background jobs

JOB_CHUNK_SIZE = 2000
# Strong references: the event loop keeps only weak ones to running tasks.
_running: dict[int, asyncio.Task[None]] = {}


def _upload_name(filename: str) -> str:
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return (name or "upload.csv")[:200]


async def create_job(
    session: AsyncSession, principal: Principal, *, filename: str, payload: str, now: datetime
) -> ImportJob:
    """Queue an import of uploaded CSV text. The header and the CSV syntax are checked now,
    so a wrong file is refused at once; the payload is kept only until the job ends."""
    principal.require("audience:write")
    total = await asyncio.to_thread(check_file, text_opener(payload))
    job = ImportJob(
        org_id=principal.org_id,
        filename=_upload_name(filename),
        status="queued",
        total_rows=total,
        processed_rows=0,
        created=0,
        updated=0,
        unchanged=0,
        refused=0,
        report="[]",
        payload=payload,
        created_at=now,
    )
    session.add(job)
    await session.flush()
    return job


def _report_json(problems: list[ImportRowProblem]) -> str:
    return json.dumps([p.model_dump() for p in problems[:MAX_STORED_PROBLEMS]])


async def run_job(db: Database, signer: Signer, job_id: int, clock: Clock) -> None:
    """Run (or resume, after a restart) one import job: progress is committed with each
    chunk, so a resumed job skips the rows already written and its counters stay exact."""
    async with db.transaction() as session:
        job = await session.get(ImportJob, job_id)
        if job is None or job.status not in ("queued", "running"):
            return
        if job.payload is None:
            job.status, job.error, job.finished_at = "failed", "the upload is gone", clock.now()
            return
        job.status = "running"
        payload, org_id, filename = job.payload, job.org_id, job.filename
        start = Totals(job.processed_rows, job.created, job.updated, job.unchanged, job.refused)
        problems = [ImportRowProblem.model_validate(p) for p in json.loads(job.report or "[]")]
        total = job.total_rows
    principal = Principal(org_id, f"import-job:{job_id}", "owner", frozenset({"audience:write"}))

    async def on_commit(
        session: AsyncSession, before: Totals, after: Totals, found: list[ImportRowProblem]
    ) -> None:
        values: dict[str, Any] = {
            "processed_rows": after.rows,
            "created": after.created,
            "updated": after.updated,
            "unchanged": after.unchanged,
            "refused": after.refused,
        }
        if len(found) > len(problems) and len(problems) < MAX_STORED_PROBLEMS:
            values["report"] = _report_json(found)
        moved = await session.execute(
            update(ImportJob)
            .where(
                ImportJob.id == job_id,
                ImportJob.status == "running",
                ImportJob.processed_rows == before.rows,
            )
            .values(**values)
        )
        if getattr(moved, "rowcount", 0) != 1:
            raise _TakenOver
        problems[:] = found[:MAX_STORED_PROBLEMS]

    try:
        await _import(
            db,
            signer,
            principal,
            text_opener(payload),
            filename=filename,
            region=None,
            now=clock.now(),
            progress=None,
            chunk_size=JOB_CHUNK_SIZE,
            parallel=False,  # no worker processes from the serving process
            total=total,
            start=start,
            problems=problems,
            on_commit=on_commit,
        )
    except _TakenOver:
        return
    except PopdropError as exc:
        await _finish(db, job_id, clock, "failed", f"{exc.reason}: {exc.message}")
    except Exception:
        log.exception("contact import job %s failed", job_id)
        await _finish(db, job_id, clock, "failed", "the import stopped on an internal error")
    else:
        await _finish(db, job_id, clock, "done", None)


async def _finish(db: Database, job_id: int, clock: Clock, status: str, error: str | None) -> None:
    async with db.transaction() as session:
        await session.execute(
            update(ImportJob)
            .where(ImportJob.id == job_id)
            .values(status=status, error=error, payload=None, finished_at=clock.now())
        )


def launch_job(db: Database, signer: Signer, clock: Clock, job_id: int) -> asyncio.Task[None]:
    """Run a job as a task of this (serving) process; launching a running job again is a
    no-op. (Background work moves to Taskiq with the next issue.)"""
    task = _running.get(job_id)
    if task is not None and not task.done():
        return task
    task = asyncio.create_task(run_job(db, signer, job_id, clock), name=f"contact-import-{job_id}")
    _running[job_id] = task

    def forget(done: asyncio.Task[None]) -> None:
        if _running.get(job_id) is done:
            del _running[job_id]

    task.add_done_callback(forget)
    return task


async def resume_jobs(db: Database, signer: Signer, clock: Clock) -> list[int]:
    """After a restart: launch every queued or interrupted job again; their ids."""
    async with db.reader() as session:
        ids = list(
            (
                await session.scalars(
                    select(ImportJob.id)
                    .where(ImportJob.status.in_(("queued", "running")))
                    .order_by(ImportJob.id)
                )
            ).all()
        )
    for job_id in ids:
        launch_job(db, signer, clock, job_id)
    return ids


async def get_job(session: AsyncSession, principal: Principal, job_id: int) -> ImportJob:
    principal.require("audience:read")
    job = await session.scalar(
        select(ImportJob)
        .where(ImportJob.id == job_id, ImportJob.org_id == principal.org_id)
        .execution_options(populate_existing=True)
    )
    if job is None:
        raise not_found("import job")
    return job


def job_out(job: ImportJob) -> ImportJobOut:
    return ImportJobOut(
        id=job.id,
        filename=job.filename,
        status=job.status,
        total_rows=job.total_rows,
        processed_rows=job.processed_rows,
        created=job.created,
        updated=job.updated,
        unchanged=job.unchanged,
        refused=job.refused,
        problems=[ImportRowProblem.model_validate(p) for p in json.loads(job.report or "[]")],
        error=job.error,
        created_at=job.created_at,
        finished_at=job.finished_at,
    )


# ---------------------------------------------------------------- exports


def _csv_text(rows: list[list[Any]]) -> str:
    # Every cell is neutralised against spreadsheet formulas there, whatever its column.
    return csv_text(rows)


async def export_contacts(
    session: AsyncSession,
    principal: Principal,
    *,
    now: datetime,
    sendable: Literal["email", "sms"] | None = None,
    rules: SegmentRules | None = None,
    batch_size: int = 2000,
) -> AsyncIterator[str]:
    """Contacts as CSV text chunks (`CONTACT_FIELDS`), in id order: all of them, only those
    `sendable` on a channel right now, and/or one segment's. Erased contacts never appear.
    Checks come first (await this), so a refusal is raised before anything streams."""
    principal.require("audience:read")
    if rules is not None:
        conditions = await segments.segment_conditions(session, principal.org_id, rules, now=now)
    else:
        conditions = [Contact.org_id == principal.org_id, Contact.erased_at.is_(None)]
    if sendable is not None:
        conditions.append(segments.sendable_condition(sendable))
    return _contact_pages(session, conditions, batch_size)


async def _contact_pages(
    session: AsyncSession, conditions: list[ColumnElement[bool]], batch_size: int
) -> AsyncIterator[str]:
    yield _csv_text([list(CONTACT_FIELDS)])
    base = (
        select(
            Contact.id,
            Contact.email,
            Contact.phone,
            Contact.first_name,
            Contact.locale,
            Contact.time_zone,
            Contact.consent_email,
            Contact.consent_sms,
            Contact.consent_chat,
            Contact.last_engaged_at,
        )
        .where(*conditions)
        .order_by(Contact.id)
        .limit(batch_size)
    )
    after = 0
    while True:
        page = (await session.execute(base.where(Contact.id > after))).all()
        if not page:
            return
        ids = [row[0] for row in page]
        labels: dict[int, dict[str, list[str]]] = {i: {"tag": [], "interest": []} for i in ids}
        for contact_id, kind, value in await session.execute(
            select(ContactLabel.contact_id, ContactLabel.kind, ContactLabel.value)
            .where(ContactLabel.contact_id.in_(ids))
            .order_by(ContactLabel.value)
        ):
            labels[contact_id][kind].append(value)
        yield _csv_text(
            [
                [
                    cid,
                    email or "",
                    phone or "",
                    first_name,
                    locale or "",
                    zone or "",
                    ";".join(labels[cid]["tag"]),
                    ";".join(labels[cid]["interest"]),
                    c_email,
                    c_sms,
                    c_chat,
                    engaged.isoformat() if engaged else "",
                ]
                for (
                    cid,
                    email,
                    phone,
                    first_name,
                    locale,
                    zone,
                    c_email,
                    c_sms,
                    c_chat,
                    engaged,
                ) in page
            ]
        )
        after = ids[-1]


async def export_consent(
    session: AsyncSession, principal: Principal, *, batch_size: int = 5000
) -> AsyncIterator[str]:
    """The consent ledger as CSV text chunks (`CONSENT_FIELDS`), oldest first."""
    principal.require("audience:read")
    return _consent_pages(session, principal.org_id, batch_size)


async def _consent_pages(session: AsyncSession, org_id: int, batch_size: int) -> AsyncIterator[str]:
    yield _csv_text([list(CONSENT_FIELDS)])
    e = ConsentEvent
    base = (
        select(e.id, e.contact_id, e.channel, e.action, e.source, e.wording, e.proof, e.at)
        .where(e.org_id == org_id)
        .order_by(e.id)
        .limit(batch_size)
    )
    after = 0
    while True:
        page = (await session.execute(base.where(e.id > after))).all()
        if not page:
            return
        yield _csv_text(
            [
                [cid, channel, action, source, wording, proof, at.isoformat()]
                for _id, cid, channel, action, source, wording, proof, at in page
            ]
        )
        after = page[-1][0]
