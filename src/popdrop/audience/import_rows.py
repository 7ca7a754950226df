"""Import row validation: the CSV header, and one row parsed into a contact (normalised
email and phone, time zone, labels, flags, coordinates) or refused with a reason.

Parsing is pure Python (no database), so large files are validated in a worker process.
Reports never quote an email or a phone.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import math
import re
import zoneinfo
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, NamedTuple

from popdrop.audience.schemas import (
    clean_labels,
)
from popdrop.core.csvsafe import restore_cell
from popdrop.core.errors import PopdropError
from popdrop.core.identity import EmailNormalizer, identity_hash, phone_and_zone
from popdrop.core.signing import Signer

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
TRUE_WORDS = frozenset({"yes", "true", "1", "y"})
FALSE_WORDS = frozenset({"no", "false", "0", "n", ""})
MAX_LABELS = 50
Opener = Callable[[], contextlib.AbstractContextManager[IO[str]]]
_LABEL_SPLIT = re.compile(r"[;|]")
_LOCALE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*\Z")
REGION_CODE = re.compile(r"[A-Za-z]{2}\Z")


# ---------------------------------------------------------------- row validation


class RowRefused(Exception):
    def __init__(self, reason: str, field: str | None, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.message = message


class ParsedRow(NamedTuple):
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
    raise RowRefused("bad_value", name, f"{name}: use yes or no")


def _text(value: str, name: str, limit: int) -> str | None:
    if len(value) > limit:
        raise RowRefused("bad_value", name, f"{name}: at most {limit} characters")
    return value or None


def _labels_of(value: str, name: str) -> list[str]:
    if not value:
        return []
    labels = clean_labels(_LABEL_SPLIT.split(value))
    if len(labels) > MAX_LABELS:
        raise RowRefused("bad_value", name, f"{name}: at most {MAX_LABELS}")
    return labels


def _coordinate(value: str, name: str, bound: float) -> float | None:
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or abs(number) > bound:
        raise RowRefused("bad_value", name, f"{name}: a number between -{bound:g} and {bound:g}")
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

    def parse(self, values: list[str], line: int) -> ParsedRow:
        """The row, or `RowRefused`. A row that passes is remembered for duplicates."""
        row = self.validate(values, line)
        self.remember(row)
        return row

    def validate(self, values: list[str], line: int) -> ParsedRow:
        """The row, or `RowRefused`, on its own: no duplicate check (`remember` does that,
        in file order), so rows can be validated in any order and in other processes."""
        if len(values) > self._width:
            raise RowRefused("bad_value", None, "the row has more fields than the header")
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
                raise RowRefused("bad_email", "email", "email: not a valid email address") from exc
        if raw_phone:
            region = cell(values, "phone_region") or self._region
            if region is not None and not REGION_CODE.match(region):
                raise RowRefused("bad_value", "phone_region", "phone_region: two letters, e.g. FR")
            try:
                phone, phone_zone = phone_and_zone(
                    raw_phone,
                    region.upper() if region else None,
                    zone=not cell(values, "time_zone"),
                )
            except PopdropError as exc:
                raise RowRefused("bad_phone", "phone", exc.message) from exc
        if email is None and phone is None:
            raise RowRefused("missing_contact", "contact", "give an email or a phone number")
        locale = _text(cell(values, "locale"), "locale", 16)
        if locale is not None:
            if not _LOCALE.match(locale):
                raise RowRefused("bad_value", "locale", "locale: a language tag, e.g. fr or fr-FR")
            locale = locale.replace("_", "-")
        time_zone = _text(cell(values, "time_zone"), "time_zone", 64)
        if time_zone is not None and not _known_zone(time_zone):
            raise RowRefused("bad_value", "time_zone", "time_zone: an IANA name, e.g. Europe/Paris")
        lat = _coordinate(cell(values, "lat"), "lat", 90)
        lon = _coordinate(cell(values, "lon"), "lon", 180)
        if (lat is None) != (lon is None):
            raise RowRefused("bad_value", "lat" if lat is None else "lon", "give both lat and lon")
        wants: list[str] = []
        if _flag(cell(values, "consent_email"), "consent_email"):
            if email is None:
                raise RowRefused(
                    "bad_value", "consent_email", "consent_email: the row has no email"
                )
            wants.append("email")
        if _flag(cell(values, "consent_sms"), "consent_sms"):
            if phone is None:
                raise RowRefused("bad_value", "consent_sms", "consent_sms: the row has no phone")
            wants.append("sms")
        wording = _text(cell(values, "consent_wording"), "consent_wording", 2000)
        proof = _text(cell(values, "consent_proof"), "consent_proof", 2000)
        row = ParsedRow(
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
        return row

    def remember(self, row: ParsedRow) -> None:
        """Refuse (`RowRefused`) a row whose email or phone an earlier row had; remember
        the row's otherwise. Called in file order, so a duplicate names its first line."""
        ekey = _dedupe_key(row.email_hash) if row.email_hash else None
        pkey = _dedupe_key(row.phone_hash) if row.phone_hash else None
        if ekey is not None and (first := self._seen_email.get(ekey)) is not None:
            raise RowRefused("duplicate", "email", f"the same email address as line {first}")
        if pkey is not None and (first := self._seen_phone.get(pkey)) is not None:
            raise RowRefused("duplicate", "phone", f"the same phone number as line {first}")
        if ekey is not None:
            self._seen_email[ekey] = row.line
        if pkey is not None:
            self._seen_phone[pkey] = row.line


# ---------------------------------------------------------------- worker processes

# A worker process's parser (`start_worker`): it only validates (no duplicate memory), so
# any number of workers can take batches; the importer remembers rows in file order.
_worker: dict[str, RowParser] = {}

Batch = list[tuple[int, list[str]]]
Refusal = tuple[int, str, str | None, str]  # line, reason, field, message


def start_worker(signer: Signer, header: list[str], region: str | None, filename: str) -> None:
    _worker["parser"] = RowParser(signer, header, region=region, filename=filename)


def validate_batch(batch: Batch) -> tuple[list[ParsedRow], list[Refusal]]:
    """In a worker process: the batch's valid rows and its refusals (plain tuples: they
    cross back to the importer cheaply), each in file order."""
    validate = _worker["parser"].validate
    good: list[ParsedRow] = []
    refused: list[Refusal] = []
    for line, values in batch:
        try:
            good.append(validate(values, line))
        except RowRefused as refusal:
            refused.append((line, refusal.reason, refusal.field, refusal.message))
    return good, refused


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


def is_blank_row(values: list[str]) -> bool:
    return not "".join(values).strip()  # no cell with anything but white space


@contextlib.contextmanager
def csv_errors() -> Iterator[None]:
    try:
        yield
    except UnicodeDecodeError as exc:
        raise PopdropError("invalid_request", "the file is not UTF-8 text") from exc
    except csv.Error as exc:
        raise PopdropError("invalid_request", f"not a readable CSV file: {exc}") from exc


def check_file(opener: Opener) -> int:
    """Read the whole file once: the header must be valid and every line readable CSV.
    Returns the number of data rows (blank lines are not rows)."""
    with csv_errors(), opener() as stream:
        reader = csv.reader(stream)
        read_header(next(reader, None))
        return sum(1 for values in reader if not is_blank_row(values))


def text_opener(text: str) -> Opener:
    body = text.removeprefix("\ufeff")
    return lambda: contextlib.nullcontext(io.StringIO(body, newline=""))


def file_opener(path: Path) -> Opener:
    return lambda: path.open(encoding="utf-8-sig", newline="")
