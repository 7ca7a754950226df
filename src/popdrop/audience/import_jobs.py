"""Background import jobs: an uploaded file is imported by a task of the app's event loop,
a chunk per transaction, and a job left running by a stopped process is resumed from its
last committed chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from typing import Any

from sqlalchemy import (
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal, system_principal
from popdrop.audience.import_rows import check_file, text_opener
from popdrop.audience.import_writer import Totals
from popdrop.audience.importer import TakenOver, run_import
from popdrop.audience.lifecycle import (
    IMPORT_JOB_LIFECYCLE,
    UNFINISHED_IMPORT_STATUSES,
    ImportJobStatus,
)
from popdrop.audience.models import (
    ImportJob,
)
from popdrop.audience.schemas import (
    ImportJobOut,
    ImportRowProblem,
)
from popdrop.core.clock import Clock
from popdrop.core.db import Database
from popdrop.core.errors import PopdropError
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned

log = logging.getLogger(__name__)
# A job stores at most this many report lines (counters stay exact); the CLI keeps all.
MAX_STORED_PROBLEMS = 10_000


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
        status=ImportJobStatus.QUEUED,
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
        if job is None or job.status not in UNFINISHED_IMPORT_STATUSES:
            return
        # Status writes go through IMPORT_JOB_LIFECYCLE (a resumed job stays running).
        status = ImportJobStatus(job.status)
        if job.payload is None:
            job.status = IMPORT_JOB_LIFECYCLE.check(status, ImportJobStatus.FAILED)
            job.error, job.finished_at = "the upload is gone", clock.now()
            return
        if status is not ImportJobStatus.RUNNING:
            job.status = IMPORT_JOB_LIFECYCLE.check(status, ImportJobStatus.RUNNING)
        payload, org_id, filename = job.payload, job.org_id, job.filename
        start = Totals(job.processed_rows, job.created, job.updated, job.unchanged, job.refused)
        problems = [ImportRowProblem.model_validate(p) for p in json.loads(job.report or "[]")]
        total = job.total_rows
    principal = system_principal(
        org_id, f"import-job:{job_id}", role="owner", scopes=frozenset({"audience:write"})
    )

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
                ImportJob.status == ImportJobStatus.RUNNING,
                ImportJob.processed_rows == before.rows,
            )
            .values(**values)
        )
        if getattr(moved, "rowcount", 0) != 1:
            raise TakenOver
        problems[:] = found[:MAX_STORED_PROBLEMS]

    try:
        await run_import(
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
    except TakenOver:
        return
    except PopdropError as exc:
        await _finish(db, job_id, clock, ImportJobStatus.FAILED, f"{exc.reason}: {exc.message}")
    except Exception:
        log.exception("contact import job %s failed", job_id)
        await _finish(
            db, job_id, clock, ImportJobStatus.FAILED, "the import stopped on an internal error"
        )
    else:
        await _finish(db, job_id, clock, ImportJobStatus.DONE, None)


async def _finish(
    db: Database, job_id: int, clock: Clock, status: ImportJobStatus, error: str | None
) -> None:
    """The job's last status write (`done` or `failed`): only from a status the lifecycle
    lets end there, so a job that ended meanwhile keeps its outcome."""
    async with db.transaction() as session:
        await session.execute(
            update(ImportJob)
            .where(
                ImportJob.id == job_id,
                ImportJob.status.in_(sorted(IMPORT_JOB_LIFECYCLE.sources(status))),
            )
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
                    .where(ImportJob.status.in_(UNFINISHED_IMPORT_STATUSES))
                    .order_by(ImportJob.id)
                )
            ).all()
        )
    for job_id in ids:
        launch_job(db, signer, clock, job_id)
    return ids


async def get_job(session: AsyncSession, principal: Principal, job_id: int) -> ImportJob:
    principal.require("audience:read")
    return await owned(session, ImportJob, job_id, principal.org_id, what="import job", fresh=True)


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
