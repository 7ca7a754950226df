"""Big batches are issued in the background: the request answers 202 with a job, its
progress can be followed (API and page), the codes come as one CSV download, and a job
interrupted mid-way resumes without losing or duplicating a code."""

from __future__ import annotations

import csv
import importlib.util
import io
import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from popdrop.accounts import service as accounts
from popdrop.accounts.service import Principal
from popdrop.core.clock import FrozenClock
from popdrop.core.db import create_engine
from popdrop.vouchers import codes, issue_jobs
from popdrop.vouchers.lifecycle import IssueJobStatus
from popdrop.vouchers.models import Voucher, VoucherBatch, VoucherIssueJob
from popdrop.vouchers.schemas import JOB_THRESHOLD, BatchCreate
from popdrop.web.context import AppContext
from tests.conftest import Tenant, issue, make_tenant
from tests.events.test_pages import HTML, login

ISSUE = "/api/v1/voucher-batches"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


def rows_of(csv_body: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(csv_body)))


async def codes_in_batch(ctx: AppContext, tenant: Tenant, batch_id: int) -> int:
    async with ctx.db.reader() as session:
        count = await session.scalar(
            select(func.count()).where(
                Voucher.org_id == tenant.org_id, Voucher.batch_id == batch_id
            )
        )
    return int(count or 0)


async def known_codes(ctx: AppContext, batch_id: int, plaintext: list[str]) -> int:
    """How many of these codes the batch holds (looked up by keyed hash)."""
    hashes = [ctx.signer.keyed_hash(codes.normalize(c)) for c in plaintext]
    found = 0
    async with ctx.db.reader() as session:
        for start in range(0, len(hashes), 500):
            found += int(
                await session.scalar(
                    select(func.count()).where(
                        Voucher.batch_id == batch_id,
                        Voucher.code_hash.in_(hashes[start : start + 500]),
                    )
                )
                or 0
            )
    return found


def owner_of(tenant: Tenant) -> Principal:
    return accounts.system_principal(tenant.org_id, "test:issue-jobs", role="owner")


async def queued_job(
    ctx: AppContext, tenant: Tenant, name: str, quantity: int
) -> tuple[VoucherBatch, VoucherIssueJob]:
    """A batch and its queued issue job, made as the API makes them (nothing launched)."""
    async with ctx.db.transaction() as session:
        return await issue_jobs.create_job(
            session,
            owner_of(tenant),
            BatchCreate(name=name, quantity=quantity),
            with_links=False,
            now=ctx.clock.now(),
        )


async def test_a_big_batch_is_issued_in_the_background_and_downloaded_once(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    quantity = JOB_THRESHOLD + 1
    answer = await app_client.post(
        f"{ISSUE}?links=true",
        json={"name": "Flyers", "quantity": quantity, "prefix": "FYR"},
        headers={**tenant.headers, "Idempotency-Key": "flyers-1"},
    )
    assert answer.status_code == 202, answer.text
    body = answer.json()
    job, batch = body["job"], body["batch"]
    assert "codes" not in body  # no plaintext in the answer (nor in its stored replay)
    assert job["total"] == quantity and job["status"] in ("queued", "running")
    assert answer.headers["location"] == job["progress_url"]
    # A retry with the same key is the same job, not a second batch.
    again = await app_client.post(
        f"{ISSUE}?links=true",
        json={"name": "Flyers", "quantity": quantity, "prefix": "FYR"},
        headers={**tenant.headers, "Idempotency-Key": "flyers-1"},
    )
    assert again.status_code == 202 and again.json()["job"]["id"] == job["id"]
    await issue_jobs.launch(ctx.db, ctx.signer, ctx.clock, job["id"])
    progress = (await app_client.get(job["progress_url"], headers=tenant.headers)).json()
    assert progress["status"] == "done", progress
    assert progress["issued"] == quantity and progress["codes_available"] is True
    download = await app_client.get(job["download_url"], headers=tenant.headers)
    assert download.status_code == 200, download.text
    assert download.headers["content-type"].startswith("text/csv")
    assert download.headers["cache-control"] == "no-store"
    rows = rows_of(download.text)
    assert rows[0] == ["code", "link"]
    plaintext = [row[0] for row in rows[1:]]
    assert len(plaintext) == len(set(plaintext)) == quantity
    assert all(c.startswith("FYR-") and codes.normalize(c) for c in plaintext)
    assert await codes_in_batch(ctx, tenant, batch["id"]) == quantity
    assert await known_codes(ctx, batch["id"], plaintext) == quantity
    # A code of the CSV redeems, and its claim link opens the claim page.
    redeemed = await app_client.post(
        "/api/v1/vouchers/redeem", json={"code": plaintext[-1]}, headers=tenant.headers
    )
    assert redeemed.status_code == 200, redeemed.text
    claim = await app_client.get(urlsplit(rows[1][1]).path, headers=HTML)
    assert claim.status_code == 200 and plaintext[0] in claim.text

    # Once: the seed is gone, so nobody (not even the owner) can get the codes again.
    second = await app_client.get(job["download_url"], headers=tenant.headers)
    assert second.status_code == 410 and second.json()["reason"] == "codes_gone"
    after = (await app_client.get(job["progress_url"], headers=tenant.headers)).json()
    assert after["codes_available"] is False and after["downloaded_at"] is not None
    async with ctx.db.reader() as session:
        stored = await session.get(VoucherIssueJob, job["id"])
        assert stored is not None and stored.seed is None


async def test_a_small_batch_still_answers_at_once(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    batch, plaintext = await issue(app_client, tenant, quantity=JOB_THRESHOLD)
    assert len(plaintext) == JOB_THRESHOLD and batch["quantity"] == JOB_THRESHOLD


async def test_the_codes_wait_for_the_job_to_end(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    _, job = await queued_job(ctx, tenant, "Queued", 10)
    early = await app_client.get(f"{ISSUE}/jobs/{job.id}/codes.csv", headers=tenant.headers)
    assert early.status_code == 409 and early.json()["reason"] == "job_running"
    assert "0 of 10" in early.json()["message"]
    await issue_jobs.run_job(ctx.db, ctx.signer, ctx.clock, job.id)  # leave nothing queued


async def test_another_tenant_cannot_see_or_download_a_job(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    _, job = await queued_job(ctx, tenant, "Mine", 10)
    await issue_jobs.run_job(ctx.db, ctx.signer, ctx.clock, job.id)
    other = await make_tenant(ctx)
    for path in (f"{ISSUE}/jobs/{job.id}", f"{ISSUE}/jobs/{job.id}/codes.csv"):
        response = await app_client.get(path, headers=other.headers)
        assert response.status_code == 404, path
    mine = await app_client.get(f"{ISSUE}/jobs/{job.id}/codes.csv", headers=tenant.headers)
    assert mine.status_code == 200 and len(rows_of(mine.text)) == 11


async def test_an_interrupted_job_resumes_without_losing_or_duplicating_codes(
    ctx: AppContext, tenant: Tenant, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(issue_jobs, "CHUNK", 100)
    batch, job = await queued_job(ctx, tenant, "Resumed", 450)
    # The process dies inside the third chunk (after its counter moved, before commit).
    derive = issue_jobs._derive

    def dying(signer: object, prefix: str, seed: bytes, index: int) -> str:
        if index == 250:
            raise RuntimeError("killed")
        return derive(signer, prefix, seed, index)  # type: ignore[arg-type]

    monkeypatch.setattr(issue_jobs, "_derive", dying)
    assert await issue_jobs.run_job(ctx.db, ctx.signer, clock, job.id) is None
    monkeypatch.setattr(issue_jobs, "_derive", derive)
    async with ctx.db.reader() as session:
        stored = await session.get(VoucherIssueJob, job.id)
        assert stored is not None
        assert (stored.status, stored.issued) == ("running", 200)  # the chunk rolled back whole
    assert await codes_in_batch(ctx, tenant, batch.id) == 200

    # Within the lease nobody takes it over (its runner might still be alive) ...
    assert job.id not in await issue_jobs.launch_due(ctx.db, ctx.signer, clock)
    assert await issue_jobs.run_job(ctx.db, ctx.signer, clock, job.id) is None
    # ... after it, the tick resumes it from the last committed chunk.
    clock.advance(timedelta(seconds=issue_jobs.LEASE_SECONDS + 1))
    assert job.id in await issue_jobs.launch_due(ctx.db, ctx.signer, clock)
    assert await issue_jobs.launch(ctx.db, ctx.signer, clock, job.id) is IssueJobStatus.DONE
    async with ctx.db.reader() as session:
        stored = await session.get(VoucherIssueJob, job.id)
        assert stored is not None
        assert (stored.status, stored.issued, stored.attempt) == ("done", 450, 2)
    assert await codes_in_batch(ctx, tenant, batch.id) == 450

    async with ctx.db.transaction() as session:
        sheet = await issue_jobs.take_codes(session, owner_of(tenant), job.id, now=clock.now())
    body = "".join(issue_jobs.sheet_csv(ctx.signer, "http://test", sheet))
    plaintext = [row[0] for row in rows_of(body)[1:]]
    assert len(set(plaintext)) == 450
    assert await known_codes(ctx, batch.id, plaintext) == 450


async def test_the_worker_tick_runs_a_queued_job(ctx: AppContext, tenant: Tenant) -> None:
    from popdrop.worker import Worker

    batch, job = await queued_job(ctx, tenant, "From the tick", 7)
    worker = Worker(ctx.settings, ctx.db, ctx.signer, ctx.clock)
    try:
        await worker.tick()
        # The tick launches the job as a task of the process (it does not wait for it).
        assert await issue_jobs.launch(ctx.db, ctx.signer, ctx.clock, job.id) in (
            IssueJobStatus.DONE,
            None,  # the tick's task had already finished it
        )
    finally:
        await worker.close()
    assert await codes_in_batch(ctx, tenant, batch.id) == 7


async def test_a_runner_that_lost_its_lease_writes_nothing(
    ctx: AppContext, tenant: Tenant, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(issue_jobs, "CHUNK", 50)
    batch, job = await queued_job(ctx, tenant, "Two runners", 120)
    first = await issue_jobs._claim(ctx.db, job.id, clock.now())
    assert first is not None
    assert await issue_jobs._issue_chunk(ctx.db, ctx.signer, clock, first)
    clock.advance(timedelta(seconds=issue_jobs.LEASE_SECONDS + 1))  # the first one stalls
    second = await issue_jobs._claim(ctx.db, job.id, clock.now())
    assert second is not None and second.attempt == first.attempt + 1
    assert second.issued == 50
    # The stalled runner wakes up: its chunk is refused as a whole.
    assert not await issue_jobs._issue_chunk(ctx.db, ctx.signer, clock, first)
    assert await codes_in_batch(ctx, tenant, batch.id) == 50
    while second.issued < second.total:
        assert await issue_jobs._issue_chunk(ctx.db, ctx.signer, clock, second)
    assert await codes_in_batch(ctx, tenant, batch.id) == 120


async def test_a_job_that_cannot_finish_fails_and_revokes_what_it_issued(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(issue_jobs, "CHUNK", 10)
    _, (taken,) = await issue(app_client, tenant, quantity=1)
    batch, job = await queued_job(ctx, tenant, "Collides", 30)
    derive = issue_jobs._derive

    def colliding(signer: object, prefix: str, seed: bytes, index: int) -> str:
        if index == 15:  # a derived code meets an existing one (2^-60 a pair, forced here)
            return codes.normalize(taken)
        return derive(signer, prefix, seed, index)  # type: ignore[arg-type]

    monkeypatch.setattr(issue_jobs, "_derive", colliding)
    assert await issue_jobs.run_job(ctx.db, ctx.signer, clock, job.id) is IssueJobStatus.FAILED
    progress = (await app_client.get(f"{ISSUE}/jobs/{job.id}", headers=tenant.headers)).json()
    assert progress["status"] == "failed" and "collided" in progress["error"]
    assert progress["issued"] == 10 and progress["codes_available"] is False
    detail = (await app_client.get(f"{ISSUE}/{batch.id}", headers=tenant.headers)).json()
    assert detail["revoked_at"] is not None
    assert detail["stats"]["issued"] == detail["stats"]["revoked"] == 10
    refused = await app_client.get(f"{ISSUE}/jobs/{job.id}/codes.csv", headers=tenant.headers)
    assert refused.status_code == 409 and refused.json()["reason"] == "job_failed"
    # The code that was there first is untouched.
    still = await app_client.post(
        "/api/v1/vouchers/validate", json={"code": taken}, headers=tenant.headers
    )
    assert still.status_code == 200, still.text


async def test_the_download_window_closes_and_the_tick_wipes_the_seed(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    _, job = await queued_job(ctx, tenant, "Forgotten", 3)
    assert await issue_jobs.run_job(ctx.db, ctx.signer, clock, job.id) is IssueJobStatus.DONE
    clock.advance(timedelta(hours=issue_jobs.DOWNLOAD_HOURS, seconds=1))
    late = await app_client.get(f"{ISSUE}/jobs/{job.id}/codes.csv", headers=tenant.headers)
    assert late.status_code == 410 and late.json()["reason"] == "codes_gone"
    await issue_jobs.launch_due(ctx.db, ctx.signer, clock)
    async with ctx.db.reader() as session:
        stored = await session.get(VoucherIssueJob, job.id, populate_existing=True)
        assert stored is not None and stored.seed is None


def test_the_migration_freezes_the_lifecycle_statuses() -> None:
    path = (
        Path(__file__).resolve().parents[2] / "src/popdrop/migrations/versions/0016_voucher_jobs.py"
    )
    spec = importlib.util.spec_from_file_location("voucher_jobs_0016", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert tuple(s.value for s in IssueJobStatus) == module.STATUSES


async def test_the_database_refuses_an_unknown_job_status(
    database_url: str, ctx: AppContext, tenant: Tenant
) -> None:
    _, job = await queued_job(ctx, tenant, "Checked", 1)
    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            with pytest.raises(IntegrityError):
                await conn.execute(
                    text("UPDATE voucher_issue_jobs SET status = 'bogus' WHERE id = :id"),
                    {"id": job.id},
                )
    finally:
        await engine.dispose()
    await issue_jobs.run_job(ctx.db, ctx.signer, ctx.clock, job.id)  # leave nothing queued


# ---------------------------------------------------------------- pages


async def test_the_form_issues_a_big_batch_with_a_progress_page_and_one_download(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await login(app_client, ctx, tenant, "owner")
    form_page = await app_client.get("/vouchers/new", headers=HTML)
    csrf = CSRF_RE.search(form_page.text)
    assert csrf
    quantity = JOB_THRESHOLD + 1
    form = {
        "csrf": csrf.group(1),
        "name": "Market flyers",
        "quantity": str(quantity),
        "max_uses": "1",
        "tz": "UTC",
        "currency": "EUR",
        "discount_kind": "percent",
        "discount_value": "10",
    }
    posted = await app_client.post("/vouchers/new", data=form, headers=HTML)
    assert posted.status_code == 303, posted.text
    job_path = posted.headers["location"]
    assert re.fullmatch(r"/vouchers/jobs/\d+", job_path)
    job_id = int(job_path.rsplit("/", 1)[1])
    async with ctx.db.reader() as session:
        stored = await session.get(VoucherIssueJob, job_id)
        assert stored is not None
        batch_id = stored.batch_id

    page = await app_client.get(job_path, headers=HTML)
    assert page.status_code == 200
    assert 'role="progressbar"' in page.text and f"of {quantity:,} codes issued" in page.text
    listing = await app_client.get("/vouchers", headers=HTML)
    assert f"/vouchers/jobs/{job_id}" in listing.text  # the list links the running job

    await issue_jobs.launch(ctx.db, ctx.signer, ctx.clock, job_id)
    listing = await app_client.get("/vouchers", headers=HTML)
    assert "download the codes" in listing.text
    fragment = await app_client.get(job_path, headers={**HTML, "hx-request": "true"})
    assert 'data-status="done"' in fragment.text
    assert "hx-trigger" not in fragment.text  # a finished job stops polling
    csrf = CSRF_RE.search(fragment.text)
    assert csrf and f"/vouchers/jobs/{job_id}/codes.csv" in fragment.text
    download = await app_client.post(
        f"/vouchers/jobs/{job_id}/codes.csv", data={"csrf": csrf.group(1)}, headers=HTML
    )
    assert download.status_code == 200
    assert len(rows_of(download.text)) == quantity + 1
    done = await app_client.get(job_path, headers=HTML)
    assert "were downloaded" in done.text and "codes.csv" not in done.text
    detail = await app_client.get(f"/vouchers/batches/{batch_id}", headers=HTML)
    assert f"<dt>Codes issued</dt><dd>{quantity:,}</dd>" in detail.text
    assert "were downloaded" in detail.text  # the job's card, on its batch's page
    again = await app_client.post(
        f"/vouchers/jobs/{job_id}/codes.csv", data={"csrf": csrf.group(1)}, headers=HTML
    )
    assert again.status_code == 410


async def test_the_download_needs_the_csrf_field(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await login(app_client, ctx, tenant, "owner")
    _, job = await queued_job(ctx, tenant, "Guarded", 2)
    await issue_jobs.run_job(ctx.db, ctx.signer, ctx.clock, job.id)
    refused = await app_client.post(f"/vouchers/jobs/{job.id}/codes.csv", data={}, headers=HTML)
    assert refused.status_code == 403
    async with ctx.db.reader() as session:
        stored = await session.get(VoucherIssueJob, job.id)
        assert stored is not None and stored.seed is not None  # not spent
