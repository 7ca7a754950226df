"""CSV import of contacts: `import_file` / `import_text` validate a file and write it a
chunk at a time.

Import rules:
- Columns (header row, any case): `COLUMNS`. An unknown column refuses the whole file
  before any row is read, naming it; so does a file that is not UTF-8 CSV.
- Every row is validated in Python first; a refused row is reported by its file line
  (header = line 1) and a machine-readable reason (`REFUSALS`); notes (`NOTES`) report
  what was left out of a row that still landed. Reports never quote an email or a phone:
  they are stored, and an erased person must not survive in one.
- Rows are written a chunk at a time, one transaction per chunk, set-based: on PostgreSQL
  the chunk is COPYed into a temporary staging table and merged by one statement per
  outcome (`import_writer.stage_chunk`); on SQLite, Core statements over the planned rows.
  A crash leaves whole chunks; importing the file again completes it, since an import is
  idempotent: a row that changes nothing is `unchanged`, with no new event.
- A big file is validated in worker processes (one per core), batch by batch; this process
  checks duplicates in file order, so reports are the same as validating in one place.
- Dedupe is on the keyed hashes of the normalised email and phone: a second row with the
  same email or phone is a `duplicate`; a row naming an existing contact fills what the
  contact lacks (never overwrites what they or an operator set) and adds its tags and
  interests. Email and phone naming two different contacts is a `conflict`.
- An identifier that was erased is refused (`suppressed`) and never comes back.
- Consent needs `consent_proof` (else the contact lands without it). A grant is recorded
  like `consent.change_consent` records one (source `import`), never over a `revoked`
  state nor for a suppressed identifier: an import never re-subscribes anyone.

Row parsing lives in `import_rows`, chunk writing in `import_writer`, background jobs in
`import_jobs`.
"""

from __future__ import annotations

import asyncio
import csv
import multiprocessing
import os
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.audience.import_rows import (
    REGION_CODE,
    Batch,
    Opener,
    ParsedRow,
    Refusal,
    RowParser,
    RowRefused,
    check_file,
    csv_errors,
    file_opener,
    is_blank_row,
    read_header,
    start_worker,
    text_opener,
    validate_batch,
)
from popdrop.audience.import_writer import (
    ParsedChunk,
    Totals,
    load_known,
    plan_chunk,
    stage_chunk,
    write_plan,
)
from popdrop.audience.schemas import (
    ImportReport,
    ImportRowProblem,
)
from popdrop.core.db import Database, is_retryable
from popdrop.core.errors import PopdropError
from popdrop.core.signing import Signer

REFUSALS = frozenset(
    {"bad_email", "bad_phone", "missing_contact", "duplicate", "suppressed", "conflict"}
    | {"bad_value"}
)
NOTES = frozenset({"consent_without_proof", "consent_suppressed"})
CHUNK_SIZE = 5000
# From this many rows a file is validated in worker processes (starting one takes ~1 s),
# one per core up to MAX_WORKERS.
PARALLEL_MIN_ROWS = 50_000
MAX_WORKERS = 8

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------- the import


class TakenOver(Exception):
    """Another runner moved this job on: this one stops (its chunk is rolled back)."""


OnCommit = Callable[[AsyncSession, Totals, Totals, list[ImportRowProblem]], Awaitable[None]]


def _batches(reader: Any, chunk_size: int, skip: int) -> Iterator[tuple[Batch, bool]]:
    """Raw data rows with their first line, `chunk_size` at a time, and whether to keep the
    batch: the first `skip` rows (written by an earlier run of a job) are only validated,
    so that duplicates still point at their first line."""
    batch: Batch = []
    seen = 0
    end = reader.line_num  # a csv reader, past the header
    for values in reader:
        line, end = end + 1, reader.line_num  # a quoted field may span lines: its first one
        if is_blank_row(values):
            continue
        seen += 1
        batch.append((line, values))
        if len(batch) >= chunk_size or seen == skip:
            yield batch, seen > skip
            batch = []
    if batch:
        yield batch, seen > skip


def _problem(line: int, refusal: RowRefused) -> ImportRowProblem:
    return ImportRowProblem(
        line=line, reason=refusal.reason, field=refusal.field, message=refusal.message
    )


def _parse_batch(parser: RowParser, batch: Batch, keep: bool) -> ParsedChunk:
    parsed = ParsedChunk(len(batch) if keep else 0, [], [])
    for line, values in batch:
        try:
            row = parser.parse(values, line)
        except RowRefused as refusal:
            if keep:
                parsed.refusals.append(_problem(line, refusal))
        else:
            if keep:
                parsed.good.append(row)
    return parsed


def _remember_batch(
    parser: RowParser,
    rows: int,
    keep: bool,
    good: list[ParsedRow],
    refused: list[Refusal],
) -> ParsedChunk:
    """A batch validated by a worker, checked for duplicates here, in file order."""
    parsed = ParsedChunk(rows if keep else 0, [], [])
    problems = [ImportRowProblem(line=a, reason=b, field=c, message=d) for a, b, c, d in refused]
    remember = parser.remember
    for row in good:
        try:
            remember(row)
        except RowRefused as refusal:
            problems.append(_problem(row.line, refusal))
        else:
            parsed.good.append(row)
    if keep:
        problems.sort(key=lambda p: p.line)
        parsed.refusals = problems
    else:
        parsed.good = []
    return parsed


def _workers() -> int:
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def _process_context() -> Any:
    """Worker processes forked from a fork server that has imported this module once (a
    fresh interpreter per worker, as `spawn` starts, imports everything again: ~1 s of
    CPU each). Where there is no fork server, `spawn`. Never a plain fork of this process:
    its threads and event loop must not be copied."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


class _Validator:
    """Validated chunks, in file order. In a thread by default (it keeps a serving event
    loop responsive); for a big file in worker processes, each validating whole batches
    (the costly part: email and phone rules, keyed hashes) while this process checks
    duplicates in file order and writes: validation runs in parallel with itself and
    with the writing instead of taking turns on one interpreter lock."""

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
        with csv_errors():
            header = read_header(next(reader, None))
        self._batches = _batches(reader, chunk_size, skip)
        self._parser = RowParser(signer, header, region=region, filename=filename)
        self._pool: ProcessPoolExecutor | None = None
        self._ahead: deque[tuple[asyncio.Future[Any], int, bool]] = deque()
        self._read_all = False
        if parallel:
            workers = _workers()
            self._depth = 2 * workers
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=_process_context(),
                initializer=start_worker,
                initargs=(signer, header, region, filename),
            )
            self._pool.submit(int)  # start the workers now: they take ~1 s to import

    def _next_batch(self) -> tuple[Batch, bool] | None:
        with csv_errors():
            return next(self._batches, None)

    def _next_in_thread(self) -> ParsedChunk | None:
        while (batch := self._next_batch()) is not None:
            parsed = _parse_batch(self._parser, *batch)
            if batch[1]:
                return parsed
        return None

    async def next(self) -> ParsedChunk | None:
        if self._pool is None:
            return await asyncio.to_thread(self._next_in_thread)
        pool = self._pool
        while True:
            while not self._read_all and len(self._ahead) < self._depth:
                batch = await asyncio.to_thread(self._next_batch)
                if batch is None:
                    self._read_all = True
                    break
                rows, keep = batch
                future = asyncio.wrap_future(pool.submit(validate_batch, rows))
                self._ahead.append((future, len(rows), keep))
            if not self._ahead:
                return None
            future, count, keep = self._ahead.popleft()
            good, refused = await future
            parsed = _remember_batch(self._parser, count, keep, good, refused)
            if keep:
                return parsed

    async def close(self) -> None:
        for future, _, _ in self._ahead:
            future.cancel()
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, True, cancel_futures=True)


async def _apply(
    db: Database,
    org_id: int,
    parsed: ParsedChunk,
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
                    if db.dialect == "postgresql":  # COPY into a staging table + merge
                        plan = await stage_chunk(conn, org_id, parsed.good)
                    else:
                        suppressed, known = await load_known(conn, org_id, parsed.good)
                        plan = plan_chunk(parsed.good, suppressed, known)
                    await write_plan(conn, db.dialect, org_id, plan, now)
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


async def run_import(
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
    if not REGION_CODE.match(region.strip()):
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
    return await run_import(
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
    return await run_import(
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
