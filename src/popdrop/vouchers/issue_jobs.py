"""Big batches issued in the background: a job per batch, a chunk of codes per transaction,
progress on the job row, the plaintext codes as one CSV download when it is done.

Rules this module keeps:
- **No plaintext code is stored.** Code `i` of a job is derived from a MAC, under the
  secret key, of the job's random `seed` and `i` (`_derive`). A chunk run again makes the
  same codes; the download makes them once more from the seed. The seed is wiped at the
  first download, when the job fails, and by the tick once the download window
  (`DOWNLOAD_HOURS` after the end) is over: from then on the codes exist only as keyed
  hashes, like every other code.
- **A chunk is all or nothing, and never twice.** Its codes are inserted in the
  transaction that moves the job's `issued` counter from the value the runner read, on
  the runner's own `attempt`; a runner that lost its lease (or a second one) fails that
  conditional UPDATE and stops, so no code is lost or issued twice.
- **An interrupted job resumes.** The runner renews `heartbeat_at` with every chunk; the
  worker tick claims queued jobs and running jobs whose heartbeat is older than
  `LEASE_SECONDS` (a process that died), bumping `attempt`.
- Status writes go through `ISSUE_JOB_LIFECYCLE`. A job fails only on a refusal or a
  code collision (running the chunk again would meet it again); it then revokes the codes
  it issued (nobody can ever see them) and keeps its batch on record. Any other error
  (the database went away) leaves it running, for the tick to resume after the lease.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal, system_principal
from popdrop.core import audit, links
from popdrop.core.clock import Clock
from popdrop.core.csvsafe import csv_text
from popdrop.core.db import Database, table_of
from popdrop.core.errors import PopdropError
from popdrop.core.logging import log
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned
from popdrop.vouchers import codes, service
from popdrop.vouchers.lifecycle import (
    ISSUE_JOB_LIFECYCLE,
    UNFINISHED_ISSUE_STATUSES,
    IssueJobStatus,
)
from popdrop.vouchers.models import Voucher, VoucherBatch, VoucherIssueJob
from popdrop.vouchers.schemas import BatchCreate, IssueJobOut

CHUNK = service.INSERT_CHUNK
LEASE_SECONDS = 60  # a running job whose heartbeat is older is taken over by the tick
DOWNLOAD_HOURS = 24  # how long after the end the codes can be downloaded (once)
API_JOBS = "/api/v1/voucher-batches/jobs"

_jobs = table_of(VoucherIssueJob)
_vouchers = table_of(Voucher)
# Strong references: the event loop keeps only weak ones to running tasks.
_running: dict[int, asyncio.Task[IssueJobStatus | None]] = {}


def _derive(signer: Signer, prefix: str, seed: bytes, index: int) -> str:
    """Code `index` of the job with `seed` (normalized). The MAC's value starts with
    `job:`, so it never meets a drop's per-recipient value (`<batch id>:<subject>`)."""
    mac = signer.mac(links.Purpose.VOUCHER_DERIVED, f"job:{seed.hex()}:{index}")
    return codes.derived_code(prefix, mac)


# ---------------------------------------------------------------- create


async def create_job(
    session: AsyncSession,
    principal: Principal,
    spec: BatchCreate,
    *,
    with_links: bool,
    now: datetime,
) -> tuple[VoucherBatch, VoucherIssueJob]:
    """The batch (without codes yet) and its queued job, in the caller's transaction."""
    batch = await service.new_batch(session, principal, spec, now=now)
    job = VoucherIssueJob(
        org_id=principal.org_id,
        batch_id=batch.id,
        status=IssueJobStatus.QUEUED,
        total=spec.quantity,
        issued=0,
        with_links=with_links,
        seed=secrets.token_bytes(32),
        attempt=0,
        created_at=now,
        created_by=principal.actor,
    )
    session.add(job)
    await session.flush()
    await service.audit_issue(session, principal, batch, now=now, job=job.id)
    return batch, job


# ---------------------------------------------------------------- run


@dataclass
class _Claim:
    job_id: int
    org_id: int
    batch_id: int
    attempt: int
    issued: int
    total: int
    seed: bytes


async def _claim(db: Database, job_id: int, now: datetime) -> _Claim | None:
    """Take the job: a queued one, or a running one whose runner went quiet."""
    stale = now - timedelta(seconds=LEASE_SECONDS)
    claimable = _jobs.c.status.in_(sorted(ISSUE_JOB_LIFECYCLE.sources(IssueJobStatus.RUNNING))) | (
        (_jobs.c.status == IssueJobStatus.RUNNING)
        & (_jobs.c.heartbeat_at.is_(None) | (_jobs.c.heartbeat_at < stale))
    )
    async with db.transaction() as session:
        row = (
            await session.execute(
                update(_jobs)
                .where(_jobs.c.id == job_id, claimable, _jobs.c.seed.is_not(None))
                .values(
                    status=IssueJobStatus.RUNNING,
                    attempt=_jobs.c.attempt + 1,
                    heartbeat_at=now,
                )
                .returning(
                    _jobs.c.org_id,
                    _jobs.c.batch_id,
                    _jobs.c.attempt,
                    _jobs.c.issued,
                    _jobs.c.total,
                    _jobs.c.seed,
                )
            )
        ).first()
    if row is None:
        return None
    org_id, batch_id, attempt, issued, total, seed = row
    return _Claim(job_id, org_id, batch_id, attempt, issued, total, bytes(seed))


async def _write_if_mine(
    session: AsyncSession, claim: _Claim, conditions: list[Any], values: dict[str, Any]
) -> bool:
    """Write the job row if this runner still holds it (its attempt) and `conditions`
    hold; False when another runner took it over or it moved meanwhile."""
    moved = await session.execute(
        update(_jobs)
        .where(_jobs.c.id == claim.job_id, _jobs.c.attempt == claim.attempt, *conditions)
        .values(**values)
    )
    return bool(getattr(moved, "rowcount", 0) == 1)


async def _issue_chunk(db: Database, signer: Signer, clock: Clock, claim: _Claim) -> bool:
    """Issue the next chunk; False when the job is no longer this runner's."""
    before = claim.issued
    count = min(CHUNK, claim.total - before)
    async with db.transaction() as session:
        still_mine = await _write_if_mine(
            session,
            claim,
            [_jobs.c.issued == before, _jobs.c.status == IssueJobStatus.RUNNING],
            {"issued": before + count, "heartbeat_at": clock.now()},
        )
        if not still_mine:
            return False
        # Read each chunk: a batch revoked meanwhile gets the rest of its codes revoked.
        batch = await session.get(VoucherBatch, claim.batch_id, populate_existing=True)
        assert batch is not None
        rows = [
            service.voucher_row(
                batch,
                signer.keyed_hash(_derive(signer, batch.prefix, claim.seed, index)),
                now=batch.created_at,
            )
            for index in range(before, before + count)
        ]
        await session.execute(_vouchers.insert(), rows)
    claim.issued = before + count
    return True


async def run_job(db: Database, signer: Signer, clock: Clock, job_id: int) -> IssueJobStatus | None:
    """Claim the job and issue its codes chunk by chunk; its end status, or None when it
    was not claimable or another runner took it over."""
    claim = await _claim(db, job_id, clock.now())
    if claim is None:
        return None
    try:
        while claim.issued < claim.total:
            if not await _issue_chunk(db, signer, clock, claim):
                return None
    except (PopdropError, IntegrityError) as exc:
        # A refusal, or a derived code that met an existing one (2^-60 a pair): running
        # the chunk again would meet it again, so the job ends here.
        log.error("voucher issue job failed", job=job_id, error=repr(exc))
        detail = exc.message if isinstance(exc, PopdropError) else "a code collided"
        return await _finish(db, clock, claim, IssueJobStatus.FAILED, f"stopped: {detail}")
    except Exception as exc:  # e.g. the database went away: the tick resumes the job
        log.warning("voucher issue job interrupted", job=job_id, error=repr(exc))
        return None
    return await _finish(db, clock, claim, IssueJobStatus.DONE, None)


async def _finish(
    db: Database, clock: Clock, claim: _Claim, status: IssueJobStatus, error: str | None
) -> IssueJobStatus | None:
    now = clock.now()
    values: dict[str, Any] = {"status": status, "error": error, "finished_at": now}
    if status is IssueJobStatus.FAILED:
        values["seed"] = None  # nobody will download these codes: forget how to make them
    async with db.transaction() as session:
        sources = sorted(ISSUE_JOB_LIFECYCLE.sources(status))
        if not await _write_if_mine(session, claim, [_jobs.c.status.in_(sources)], values):
            return None
        if status is IssueJobStatus.FAILED:
            owner = system_principal(claim.org_id, f"issue-job:{claim.job_id}", role="owner")
            await service.revoke_batch(
                session, owner, batch_id=claim.batch_id, reason="the issue job failed", now=now
            )
    return status


def launch(
    db: Database, signer: Signer, clock: Clock, job_id: int
) -> asyncio.Task[IssueJobStatus | None]:
    """Run a job as a task of this process; launching a job already running here is a
    no-op (another process is kept out by the claim)."""
    task = _running.get(job_id)
    if task is not None and not task.done():
        return task
    task = asyncio.create_task(run_job(db, signer, clock, job_id), name=f"voucher-issue-{job_id}")
    _running[job_id] = task

    def forget(done: asyncio.Task[IssueJobStatus | None]) -> None:
        if _running.get(job_id) is done:
            del _running[job_id]

    task.add_done_callback(forget)
    return task


async def launch_due(db: Database, signer: Signer, clock: Clock) -> list[int]:
    """The worker tick's part: launch queued jobs and take over those whose runner went
    quiet; wipe the seeds whose download window is over. The launched job ids."""
    now = clock.now()
    stale = now - timedelta(seconds=LEASE_SECONDS)
    window_over = now - timedelta(hours=DOWNLOAD_HOURS)
    async with db.reader() as session:
        due = list(
            (
                await session.scalars(
                    select(_jobs.c.id)
                    .where(
                        (_jobs.c.status == IssueJobStatus.QUEUED)
                        | (
                            (_jobs.c.status == IssueJobStatus.RUNNING)
                            & (_jobs.c.heartbeat_at.is_(None) | (_jobs.c.heartbeat_at < stale))
                        )
                    )
                    .order_by(_jobs.c.id)
                )
            ).all()
        )
        expired = await session.scalar(
            select(_jobs.c.id)
            .where(_jobs.c.seed.is_not(None), _jobs.c.finished_at < window_over)
            .limit(1)
        )
    if expired is not None:
        async with db.transaction() as session:
            await session.execute(
                update(_jobs)
                .where(_jobs.c.seed.is_not(None), _jobs.c.finished_at < window_over)
                .values(seed=None)
            )
    launched = [job_id for job_id in due if job_id not in _running]
    for job_id in launched:
        launch(db, signer, clock, job_id)
    return launched


# ---------------------------------------------------------------- read and download


async def get_job(session: AsyncSession, principal: Principal, job_id: int) -> VoucherIssueJob:
    principal.require("vouchers:read")
    return await owned(
        session, VoucherIssueJob, job_id, principal.org_id, what="issue job", fresh=True
    )


async def jobs_of(
    session: AsyncSession, principal: Principal, batch_ids: list[int]
) -> dict[int, VoucherIssueJob]:
    """The issue job of each of these batches that has one (pages show its progress)."""
    principal.require("vouchers:read")
    if not batch_ids:
        return {}
    rows = await session.scalars(
        select(VoucherIssueJob).where(
            VoucherIssueJob.org_id == principal.org_id, VoucherIssueJob.batch_id.in_(batch_ids)
        )
    )
    return {job.batch_id: job for job in rows}


def download_until(job: VoucherIssueJob) -> datetime | None:
    if job.finished_at is None or job.status != IssueJobStatus.DONE:
        return None
    return job.finished_at + timedelta(hours=DOWNLOAD_HOURS)


def codes_available(job: VoucherIssueJob, now: datetime) -> bool:
    until = download_until(job)
    return job.seed is not None and until is not None and now < until


def job_out(job: VoucherIssueJob, now: datetime) -> IssueJobOut:
    return IssueJobOut(
        id=job.id,
        batch_id=job.batch_id,
        status=job.status,
        total=job.total,
        issued=job.issued,
        with_links=job.with_links,
        error=job.error,
        created_at=job.created_at,
        finished_at=job.finished_at,
        downloaded_at=job.downloaded_at,
        codes_available=codes_available(job, now),
        download_until=download_until(job),
        progress_url=f"{API_JOBS}/{job.id}",
        download_url=f"{API_JOBS}/{job.id}/codes.csv",
    )


@dataclass
class CodeSheet:
    """What the one download of a job's codes is made from (its seed is already wiped
    from the database when this exists)."""

    job_id: int
    batch: VoucherBatch
    seed: bytes
    total: int
    links_expire_at: datetime | None


async def take_codes(
    session: AsyncSession, principal: Principal, job_id: int, *, now: datetime
) -> CodeSheet:
    """The job's codes, once: the seed is wiped in this transaction (the caller streams
    the CSV after its commit). Refused while the job runs, after it failed, after the
    first download and once the download window is over."""
    principal.require("vouchers:write")  # plaintext codes: what issuing them needs
    job = await get_job(session, principal, job_id)
    if job.status in UNFINISHED_ISSUE_STATUSES:
        raise PopdropError(
            "job_running",
            f"the codes are still being issued ({job.issued:,} of {job.total:,})",
            status=409,
        )
    if job.status == IssueJobStatus.FAILED:
        raise PopdropError("job_failed", f"this issue job failed: {job.error}", status=409)
    seed = job.seed
    # The wipe is the guard: of two downloads at once, one finds the seed already gone.
    taken = (
        await session.execute(
            update(_jobs)
            .where(_jobs.c.id == job.id, _jobs.c.seed.is_not(None))
            .values(seed=None, downloaded_at=now)
            .returning(_jobs.c.id)
        )
    ).scalar_one_or_none()
    if seed is None or taken is None or not codes_available(job, now):
        raise PopdropError(
            "codes_gone",
            "the codes of this batch were already downloaded or their download window is "
            "over; they are stored only as hashes (revoke the batch and issue a new one)",
            status=410,
        )
    batch = await service.get_batch(session, principal, job.batch_id)
    await audit.append(
        session,
        org_id=principal.org_id,
        actor=principal.actor,
        action="voucher.codes_downloaded",
        subject=f"batch:{batch.id}",
        payload={"batch": batch.id, "job": job.id, "codes": job.total},
        at=now,
    )
    expiry = service.link_expiry(batch, now) if job.with_links else None
    return CodeSheet(job.id, batch, bytes(seed), job.total, expiry)


def sheet_csv(signer: Signer, base_url: str, sheet: CodeSheet) -> Iterator[str]:
    """The CSV of a sheet's codes (with a claim link per code when the job asked for
    them), in chunks, in issue order: `code[,link]`."""
    expiry = sheet.links_expire_at
    yield csv_text([["code", "link"] if expiry else ["code"]])
    prefix = sheet.batch.prefix
    for start in range(0, sheet.total, CHUNK):
        rows: list[list[str]] = []
        for index in range(start, min(start + CHUNK, sheet.total)):
            code = codes.format_code(_derive(signer, prefix, sheet.seed, index))
            if expiry is None:
                rows.append([code])
            else:
                rows.append([code, service.make_link(signer, base_url, code, expires_at=expiry)[0]])
        yield csv_text(rows)
