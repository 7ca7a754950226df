"""CSV import and export: row-level report by line and reason, whole chunks only, the same
file twice changes nothing, consent needs proof, erased and opted-out people stay out,
background jobs resume, exports honour opt-outs and erasure at once."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from popdrop.accounts.service import ROLES, Principal
from popdrop.audience import consent, contact_points, exports, import_jobs, importer
from popdrop.audience import contacts as audience_contacts
from popdrop.audience.models import ConsentEvent, Contact, ContactLabel, ImportJob
from popdrop.audience.schemas import ConsentChange, ImportReport, SegmentRules
from popdrop.core.errors import PopdropError
from popdrop.core.identity import EmailNormalizer, normalize_email
from popdrop.usecases import privacy
from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact, inbound
from tests.conftest import Tenant, make_tenant

HEADER = "email,phone,first_name,tags,consent_email,consent_sms,consent_proof"


def owner(tenant: Tenant) -> Principal:
    return Principal(tenant.org_id, "test", "owner", ROLES["owner"])


async def run_import(ctx: AppContext, tenant: Tenant, text: str, **options: Any) -> ImportReport:
    return await importer.import_text(
        ctx.db,
        ctx.signer,
        owner(tenant),
        text,
        filename="list.csv",
        now=ctx.clock.now(),
        **options,
    )


def reasons(report: ImportReport) -> list[tuple[int, str]]:
    return [(p.line, p.reason) for p in report.problems]


async def snapshot(ctx: AppContext, tenant: Tenant) -> dict[str, list[tuple[Any, ...]]]:
    """Everything an import writes for this organization, in a comparable form."""
    async with ctx.db.reader() as session:
        contacts = (
            await session.execute(
                select(Contact.__table__)
                .where(Contact.org_id == tenant.org_id)
                .order_by(Contact.id)
            )
        ).all()
        labels = (
            await session.execute(
                select(ContactLabel.contact_id, ContactLabel.kind, ContactLabel.value)
                .where(ContactLabel.org_id == tenant.org_id)
                .order_by(ContactLabel.contact_id, ContactLabel.kind, ContactLabel.value)
            )
        ).all()
        events = (
            await session.execute(
                select(ConsentEvent.__table__)
                .where(ConsentEvent.org_id == tenant.org_id)
                .order_by(ConsentEvent.id)
            )
        ).all()
    return {
        "contacts": [tuple(r) for r in contacts],
        "labels": [tuple(r) for r in labels],
        "events": [tuple(r) for r in events],
    }


async def contact_by_email(ctx: AppContext, tenant: Tenant, email: str) -> Contact | None:
    async with ctx.db.reader() as session:
        return await contact_points.find_contact(
            session, tenant.org_id, contact_points.contact_points(ctx.signer, email, None)
        )


MALFORMED = "\n".join(
    [
        "Email,PHONE,first_name,tags,lat,lon",  # header names in any case
        "ann@shop.example,+33687654321,Ann,vip;early,48.85,2.35",  # 2: good
        "bob@shop.example,99-0,Bob,,,",  # 3: bad phone
        "not-an-email,+33612345679,Carl,,,",  # 4: bad email
        ",,Dora,vip,,",  # 5: neither
        "ANN@shop.example,,Ann again,,,",  # 6: duplicate email of line 2
        "eve@shop.example,+33 6 87 65 43 21,Eve,,,",  # 7: duplicate phone of line 2
        "fay@shop.example,,Fay,,91,2",  # 8: bad latitude
        '"gus@shop.example",,"Gus ',  # 9-10: a quoted field spanning two lines
        'the second",|vip|,,',
        "",  # 11: blank lines are skipped, not rows
        "hal@shop.example,+44 7911 123456,Hal,,,",  # 12: good
        "ivy@shop.example,,Ivy,,,,extra",  # 13: more fields than the header
    ]
)


async def test_malformed_rows_are_reported_by_line_and_reason(
    ctx: AppContext, tenant: Tenant
) -> None:
    seen: list[tuple[int, int]] = []
    report = await run_import(
        ctx, tenant, MALFORMED, progress=lambda done, total: seen.append((done, total))
    )
    assert reasons(report) == [
        (3, "bad_phone"),
        (4, "bad_email"),
        (5, "missing_contact"),
        (6, "duplicate"),
        (7, "duplicate"),
        (8, "bad_value"),
        (13, "bad_value"),
    ]
    by_line = {p.line: p for p in report.problems}
    assert by_line[6].field == "email" and "line 2" in by_line[6].message
    assert by_line[7].field == "phone" and "line 2" in by_line[7].message
    assert by_line[8].field == "lat"
    # Reports are stored: they never quote an email address or a phone number.
    for problem in report.problems:
        for clear in ("shop.example", "87654321", "87 65", "99-0", "not-an-email"):
            assert clear not in problem.message
    assert (report.total_rows, report.created, report.refused) == (10, 3, 7)
    assert seen[-1] == (10, 10)

    ann = await contact_by_email(ctx, tenant, "ann@shop.example")
    gus = await contact_by_email(ctx, tenant, "gus@shop.example")
    hal = await contact_by_email(ctx, tenant, "hal@shop.example")
    assert ann is not None and gus is not None and hal is not None
    assert (ann.phone, ann.first_name, ann.lat, ann.lon) == ("+33687654321", "Ann", 48.85, 2.35)
    assert ann.time_zone == "Europe/Paris" and ann.source == "import"  # from the phone
    assert gus.first_name == "Gus \nthe second"
    assert hal.phone == "+447911123456"
    for email in ("bob@shop.example", "fay@shop.example", "ivy@shop.example"):
        assert await contact_by_email(ctx, tenant, email) is None
    async with ctx.db.reader() as session:
        labels = await audience_contacts.contacts_out(
            session, tenant.org_id, [ann, gus], ctx.clock.now()
        )
    assert labels[0].tags == ["early", "vip"] and labels[1].tags == ["vip"]
    assert ann.consent_email == "none"  # no consent column: no consent


async def test_a_worker_process_validates_a_big_file_the_same_way(
    ctx: AppContext, tenant: Tenant, tmp_path: Path
) -> None:
    path = tmp_path / "malformed.csv"
    path.write_text(MALFORMED)
    threaded = await run_import(ctx, tenant, MALFORMED)
    other = await make_tenant(ctx)
    parallel = await importer.import_file(
        ctx.db, ctx.signer, owner(other), path, now=ctx.clock.now(), parallel=True, chunk_size=3
    )
    assert parallel == threaded


async def test_unknown_columns_are_refused_up_front_naming_them(
    ctx: AppContext, tenant: Tenant
) -> None:
    text = "email,Birthday,shoe size\nann@shop.example,1990-01-01,42\n"
    with pytest.raises(PopdropError) as refused:
        await run_import(ctx, tenant, text)
    assert refused.value.reason == "invalid_request"
    assert "'birthday'" in refused.value.message and "'shoe size'" in refused.value.message
    assert await contact_by_email(ctx, tenant, "ann@shop.example") is None
    for bad in ("", "\n\n", "first_name\nAnn\n", "email,email\na@b.example,c@d.example\n"):
        with pytest.raises(PopdropError):
            await run_import(ctx, tenant, bad)


def _rows(count: int, start: int = 0) -> str:
    lines = [HEADER]
    for i in range(start, start + count):
        lines.append(f"p{i}@list.example,+3361{i:07d},P{i},tag{i % 3};all,yes,yes,signup form {i}")
    return "\n".join(lines) + "\n"


async def test_importing_the_same_file_twice_changes_nothing(
    ctx: AppContext, tenant: Tenant
) -> None:
    text = _rows(25)
    first = await run_import(ctx, tenant, text, chunk_size=7)
    assert (first.created, first.updated, first.unchanged, first.refused) == (25, 0, 0, 0)
    before = await snapshot(ctx, tenant)
    assert len(before["events"]) == 50 and len(before["labels"]) == 50
    ctx.clock.advance(timedelta(hours=1))  # type: ignore[attr-defined]
    second = await run_import(ctx, tenant, text, chunk_size=7)
    assert (second.created, second.updated, second.unchanged, second.refused) == (0, 0, 25, 0)
    assert second.problems == first.problems == []
    assert await snapshot(ctx, tenant) == before  # updated_at included


async def test_a_failed_chunk_leaves_nothing_half_written_and_a_rerun_completes(
    ctx: AppContext, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _rows(9)
    real = importer.write_plan
    calls = 0

    async def crash_in_second_chunk(*args: Any) -> None:
        nonlocal calls
        calls += 1
        await real(*args)  # everything of the chunk is written ...
        if calls == 2:
            raise RuntimeError("power cut")  # ... and then the transaction dies

    monkeypatch.setattr(importer, "write_plan", crash_in_second_chunk)
    with pytest.raises(RuntimeError):
        await run_import(ctx, tenant, text, chunk_size=4)
    half = await snapshot(ctx, tenant)
    landed = {row[2] for row in half["contacts"]}  # emails
    # Whole chunks only (on PostgreSQL two chunks are written at once, so which ones
    # landed depends on timing), and every landed row with all its labels and events.
    chunks = [{f"p{i}@list.example" for i in range(a, b)} for a, b in ((0, 4), (4, 8), (8, 9))]
    assert all(chunk <= landed or not chunk & landed for chunk in chunks)
    assert len(landed) < 9
    assert len(half["labels"]) == len(half["events"]) == 2 * len(landed)
    monkeypatch.setattr(importer, "write_plan", real)
    rerun = await run_import(ctx, tenant, text, chunk_size=4)
    assert (rerun.created, rerun.unchanged) == (9 - len(landed), len(landed))
    done = await snapshot(ctx, tenant)
    assert len(done["contacts"]) == 9 and len(done["events"]) == 18


async def test_an_existing_contact_is_filled_and_merged_never_overwritten(
    ctx: AppContext, tenant: Tenant, app_client: httpx.AsyncClient
) -> None:
    await add_contact(
        app_client, tenant, email="ann@shop.example", first_name="Ann", tags=["vip"], consents=()
    )
    await add_contact(app_client, tenant, email="bob@shop.example", consents=())
    await add_contact(app_client, tenant, phone="+33611111111", consents=())
    text = (
        "email,phone,first_name,locale,tags,interests\n"
        "ann@shop.example,+33622222222,Anne-Marie,fr_FR,vip|press,shoes\n"  # fills, merges
        "bob@shop.example,+33611111111,,,,\n"  # names two contacts
        "bob@shop.example,,,,,\n"  # duplicate of line 3 (refused rows count as seen)
    )
    report = await run_import(ctx, tenant, text)
    assert reasons(report) == [(3, "conflict"), (4, "duplicate")]
    assert (report.updated, report.refused) == (1, 2)
    ann = await contact_by_email(ctx, tenant, "ann@shop.example")
    assert ann is not None
    assert (ann.first_name, ann.phone, ann.locale) == ("Ann", "+33622222222", "fr-FR")
    async with ctx.db.reader() as session:
        out = (
            await audience_contacts.contacts_out(session, tenant.org_id, [ann], ctx.clock.now())
        )[0]
    assert out.tags == ["press", "vip"] and out.interests == ["shoes"]
    # A phone that already belongs to a contact with another email is a conflict too.
    other = await run_import(ctx, tenant, "email,phone\ncat@shop.example,+33622222222\n")
    assert reasons(other) == [(2, "conflict")]


async def test_imported_consent_needs_a_proof(ctx: AppContext, tenant: Tenant) -> None:
    text = (
        "email,phone,consent_email,consent_sms,consent_wording,consent_proof\n"
        "ann@shop.example,,yes,,,\n"
        "bob@shop.example,+33612345678,Y,true,Drop news by email and SMS,form 2025-03-01\n"
        "cat@shop.example,,maybe,,,\n"
        "dan@shop.example,,no,yes,,proof\n"  # consent_sms without a phone
    )
    report = await run_import(ctx, tenant, text)
    assert reasons(report) == [
        (2, "consent_without_proof"),
        (4, "bad_value"),
        (5, "bad_value"),
    ]
    assert (report.created, report.refused) == (2, 2)
    ann = await contact_by_email(ctx, tenant, "ann@shop.example")
    bob = await contact_by_email(ctx, tenant, "bob@shop.example")
    assert ann is not None and bob is not None
    assert ann.consent_email == "none"
    assert (bob.consent_email, bob.consent_sms) == ("granted", "granted")
    async with ctx.db.reader() as session:
        events = (
            await session.scalars(
                select(ConsentEvent)
                .where(ConsentEvent.org_id == tenant.org_id)
                .order_by(ConsentEvent.channel)
            )
        ).all()
    assert [(e.contact_id, e.channel, e.action, e.source) for e in events] == [
        (bob.id, "email", "grant", "import"),
        (bob.id, "sms", "grant", "import"),
    ]
    assert {(e.wording, e.proof) for e in events} == {
        ("Drop news by email and SMS", "form 2025-03-01")
    }
    # Without a wording column the default names the file.
    await run_import(ctx, tenant, "email,consent_email,consent_proof\neve@shop.example,1,p\n")
    async with ctx.db.reader() as session:
        wording = await session.scalar(
            select(ConsentEvent.wording)
            .where(ConsentEvent.org_id == tenant.org_id)
            .order_by(ConsentEvent.id.desc())
        )
    assert wording is not None and "list.csv" in wording


async def test_an_erased_person_is_refused_as_suppressed(ctx: AppContext, tenant: Tenant) -> None:
    text = "email,phone,first_name\nerin@shop.example,+33698765432,Erin\n"
    await run_import(ctx, tenant, text)
    erin = await contact_by_email(ctx, tenant, "erin@shop.example")
    assert erin is not None
    async with ctx.db.transaction() as session:
        await privacy.erase_contact(
            session,
            ctx.signer,
            owner(tenant),
            erin.id,
            now=ctx.clock.now(),
        )
    again = await run_import(ctx, tenant, text)
    assert reasons(again) == [(2, "suppressed")] and again.refused == 1
    # Either identifier alone is enough to recognise them.
    alone = await run_import(ctx, tenant, "email,phone\n,+33698765432\nERIN@shop.example,\n")
    assert reasons(alone) == [(2, "suppressed"), (3, "suppressed")]
    async with ctx.db.reader() as session:
        live = (
            await session.scalars(
                select(Contact.id).where(
                    Contact.org_id == tenant.org_id, Contact.erased_at.is_(None)
                )
            )
        ).all()
    assert live == []


async def test_an_opted_out_person_is_never_resubscribed_by_an_import(
    ctx: AppContext, tenant: Tenant, app_client: httpx.AsyncClient
) -> None:
    ann = await add_contact(app_client, tenant, email="ann@shop.example", phone="+33612345678")
    await inbound(app_client, tenant, "+33612345678", "STOP")
    await inbound(app_client, tenant, "+33699999999", "STOP")  # a stranger opts out
    async with ctx.db.transaction() as session:
        contact = await contact_points.get_contact(session, owner(tenant), ann["id"])
        await consent.change_consent(
            session,
            ctx.signer,
            contact,
            ConsentChange(channel="email", action="revoke", wording="unsubscribe"),
            now=ctx.clock.now(),
        )
    before = await snapshot(ctx, tenant)
    text = (
        "email,phone,consent_email,consent_sms,consent_proof\n"
        "ann@shop.example,+33612345678,yes,yes,old signup sheet\n"
        "zed@shop.example,+33699999999,yes,yes,old signup sheet\n"
    )
    report = await run_import(ctx, tenant, text)
    assert reasons(report) == [
        (2, "consent_suppressed"),
        (2, "consent_suppressed"),
        (3, "consent_suppressed"),
    ]
    assert {p.field for p in report.problems if p.line == 2} == {"consent_email", "consent_sms"}
    assert (report.unchanged, report.created) == (1, 1)
    after = await snapshot(ctx, tenant)
    assert after["contacts"][0] == before["contacts"][0]
    zed = await contact_by_email(ctx, tenant, "zed@shop.example")
    assert zed is not None and (zed.consent_email, zed.consent_sms) == ("granted", "none")
    grants = [e for e in after["events"] if e not in before["events"]]
    assert len(grants) == 1  # zed's email only


async def _export(chunks: Any) -> list[dict[str, str]]:
    text = "".join([chunk async for chunk in chunks])
    return list(csv.DictReader(io.StringIO(text)))


async def test_exports_honour_opt_outs_at_once_and_never_show_the_erased(
    ctx: AppContext, tenant: Tenant, app_client: httpx.AsyncClient
) -> None:
    ann = await add_contact(
        app_client, tenant, email="ann@shop.example", phone="+33612345678", tags=["vip"]
    )
    bob = await add_contact(app_client, tenant, email="bob@shop.example", phone="+33612345679")
    cat = await add_contact(app_client, tenant, email="cat@shop.example", first_name="=cmd()")
    principal, now = owner(tenant), ctx.clock.now()

    async def export(**options: Any) -> list[dict[str, str]]:
        async with ctx.db.reader() as session:
            chunks = await exports.export_contacts(
                session, principal, now=now, batch_size=2, **options
            )
            return await _export(chunks)

    assert [r["id"] for r in await export(sendable="sms")] == [str(ann["id"]), str(bob["id"])]
    await inbound(app_client, tenant, "+33612345678", "STOP")
    assert [r["id"] for r in await export(sendable="sms")] == [str(bob["id"])]
    assert len(await export(sendable="email")) == 3
    everyone = await export()
    assert list(everyone[0]) == list(exports.CONTACT_FIELDS)
    assert everyone[0]["consent_sms"] == "revoked" and everyone[0]["tags"] == "vip"
    assert everyone[2]["first_name"] == "'=cmd()"  # no formula for a spreadsheet to run
    vip = await export(rules=SegmentRules(tags_any=["vip"], channels=["email"]))
    assert [r["id"] for r in vip] == [str(ann["id"])]

    async with ctx.db.transaction() as session:
        await privacy.erase_contact(
            session,
            ctx.signer,
            principal,
            cat["id"],
            now=now,
        )
    for options in ({}, {"sendable": "email"}, {"rules": SegmentRules(channels=["email"])}):
        rows = await export(**options)
        assert str(cat["id"]) not in [r["id"] for r in rows]
        assert all("cat@" not in r["email"] for r in rows)

    async with ctx.db.reader() as session:
        ledger = await _export(await exports.export_consent(session, principal, batch_size=3))
    assert list(ledger[0]) == list(exports.CONSENT_FIELDS)
    assert ("sms", "revoke", "sms_keyword") in {
        (r["channel"], r["action"], r["source"])
        for r in ledger
        if r["contact_id"] == str(ann["id"])
    }
    assert len(ledger) == 7  # 5 grants, the STOP, the revoke of cat's email on erase
    with pytest.raises(PopdropError):
        await exports.export_consent(session, Principal(tenant.org_id, "x", "volunteer"))


async def test_a_background_job_reports_progress_and_clears_its_upload(
    ctx: AppContext, tenant: Tenant
) -> None:
    text = MALFORMED
    async with ctx.db.transaction() as session:
        job = await import_jobs.create_job(
            session,
            owner(tenant),
            filename="C:\\lists\\spring.csv",
            payload=text,
            now=ctx.clock.now(),
        )
    assert (job.status, job.total_rows, job.filename) == ("queued", 10, "spring.csv")
    await import_jobs.launch_job(ctx.db, ctx.signer, ctx.clock, job.id)
    async with ctx.db.reader() as session:
        done = import_jobs.job_out(await import_jobs.get_job(session, owner(tenant), job.id))
        payload = await session.scalar(select(ImportJob.payload).where(ImportJob.id == job.id))
    assert done.status == "done" and payload is None
    assert (done.processed_rows, done.created, done.refused) == (10, 3, 7)
    assert [p.line for p in done.problems] == [3, 4, 5, 6, 7, 8, 13]
    with pytest.raises(PopdropError):
        async with ctx.db.transaction() as session:
            await import_jobs.create_job(
                session, owner(tenant), filename="x.csv", payload="name\nx\n", now=ctx.clock.now()
            )


class Crash(BaseException):
    """The serving process dies mid-job (nothing in the job catches it)."""


async def test_an_interrupted_job_resumes_where_it_stopped(
    ctx: AppContext, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _rows(7) + "bad,,,,,,\n" + _rows(3, start=100).split("\n", 1)[1]
    monkeypatch.setattr(import_jobs, "JOB_CHUNK_SIZE", 3)
    real = importer.write_plan
    calls = 0

    async def crash_in_third_chunk(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Crash
        await real(*args)

    monkeypatch.setattr(importer, "write_plan", crash_in_third_chunk)
    async with ctx.db.transaction() as session:
        job = await import_jobs.create_job(
            session, owner(tenant), filename="big.csv", payload=text, now=ctx.clock.now()
        )
    with pytest.raises(Crash):
        await import_jobs.run_job(ctx.db, ctx.signer, job.id, ctx.clock)
    async with ctx.db.reader() as session:
        stuck = await import_jobs.get_job(session, owner(tenant), job.id)
    assert (stuck.status, stuck.processed_rows, stuck.created) == ("running", 6, 6)
    assert stuck.payload is not None

    monkeypatch.setattr(importer, "write_plan", real)
    resumed = await import_jobs.resume_jobs(ctx.db, ctx.signer, ctx.clock)
    assert job.id in resumed
    await asyncio.gather(*import_jobs._running.values())
    async with ctx.db.reader() as session:
        final = import_jobs.job_out(await import_jobs.get_job(session, owner(tenant), job.id))
    assert final.status == "done"
    assert (final.processed_rows, final.created, final.unchanged, final.refused) == (11, 10, 0, 1)
    assert [(p.line, p.reason) for p in final.problems] == [(9, "bad_email")]
    assert len((await snapshot(ctx, tenant))["contacts"]) == 10


async def test_import_file_reads_a_bom_and_a_default_region(
    ctx: AppContext, tenant: Tenant, tmp_path: Path
) -> None:
    path = tmp_path / "list.csv"
    path.write_text(
        "\ufeffEmail,Phone,phone_region\nann@shop.example,06 12 34 56 78,\n"
        "bob@shop.example,07911 123456,gb\n",
        encoding="utf-8",
    )
    report = await importer.import_file(
        ctx.db, ctx.signer, owner(tenant), path, now=ctx.clock.now(), region="fr"
    )
    assert report.created == 2 and report.problems == []
    ann = await contact_by_email(ctx, tenant, "ann@shop.example")
    bob = await contact_by_email(ctx, tenant, "bob@shop.example")
    assert ann is not None and ann.phone == "+33612345678"
    assert bob is not None and bob.phone == "+447911123456"
    latin = tmp_path / "latin.csv"
    latin.write_bytes("email,first_name\nann@shop.example,Zo\xe9\n".encode("latin-1"))
    with pytest.raises(PopdropError) as refused:
        await importer.import_file(ctx.db, ctx.signer, owner(tenant), latin, now=ctx.clock.now())
    assert "UTF-8" in refused.value.message


EMAILS = [
    "Ann@Example.COM",
    "a.b-c+tag@sub.example.org",
    "x@xn--bcher-kva.example",
    "a..b@example.com",
    ".a@example.com",
    "a@example",
    "a@localhost",
    "a@test",
    "a@-bad.example",
    "a@[127.0.0.1]",
    '"quoted"@example.com',
    "Ünïcode@example.com",
    "a@bücher.example",
    "a@b@example.com",
    "a" * 64 + "@example.com",
    "a" * 65 + "@example.com",
    "a@" + ("b" * 63 + ".") * 4 + "com",
    "a" * 64 + "@" + ("b" * 60 + ".") * 3 + "example.com",
    " padded@example.com ",
    "a@example.com.",
    "a@123.456",
]


def _outcome(normalize: Any, raw: str) -> str:
    try:
        return str(normalize(raw))
    except PopdropError:
        return "refused"


@pytest.mark.parametrize("raw", EMAILS)
def test_the_fast_email_check_agrees_with_the_one_normaliser(raw: str) -> None:
    fast = EmailNormalizer()
    assert _outcome(fast, raw) == _outcome(normalize_email, raw)
    assert _outcome(fast, raw) == _outcome(fast, raw)  # the cached domain, second time


@settings(max_examples=300, deadline=None)
@given(
    local=st.from_regex(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,70}", fullmatch=True),
    domain=st.sampled_from(
        ["example.com", "Mail.Example", "x.y", "localhost", "a-.com", "xn--e1afmkfd.example"]
    )
    | st.from_regex(r"[a-z0-9.-]{1,20}\.[a-z]{2,6}", fullmatch=True),
)
def test_the_fast_email_check_agrees_on_generated_addresses(local: str, domain: str) -> None:
    raw = f"{local}@{domain}"
    assert _outcome(EmailNormalizer(), raw) == _outcome(normalize_email, raw)


async def test_copy_and_merge_path_keeps_every_row_rule(
    ctx: AppContext, tenant: Tenant, app_client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """On PostgreSQL rows go through COPY into a staging table and one merge statement
    (rows that change an existing contact through the row-by-row planner); validated in
    worker processes here. Duplicates in the file, a row updating an existing contact, an
    unchanged one, conflicts and bad rows come out as on SQLite."""
    await add_contact(
        app_client,
        tenant,
        email="ann@shop.example",
        phone="+33611111111",
        first_name="Ann",
        tags=["vip"],
        consents=("email",),
    )
    await add_contact(app_client, tenant, email="bob@shop.example", consents=())
    text = (
        "email,phone,first_name,tags,interests,consent_email,consent_sms,consent_proof\n"
        "ann@shop.example,,Ann,vip,,yes,,form 1\n"  # 2: changes nothing
        "bob@shop.example,,Bob,new,shoes,,,\n"  # 3: fills and labels an existing contact
        "cat@shop.example,+33622222222,Cat,a;b,vinyl,yes,yes,form 3\n"  # 4: new
        "CAT@shop.example,,Cat again,,,,,\n"  # 5: duplicate email of line 4
        "not-an-email,,Dan,,,,,\n"  # 6: bad email
        "eve@shop.example,+33611111111,Eve,,,,,\n"  # 7: Ann's phone, another email
        "fay@shop.example,,Fay,,,yes,,\n"  # 8: new, consent without proof
        ",+33 6 22 22 22 22,Cat's phone,,,,,\n"  # 9: duplicate phone of line 4
        ",+33633333333,,,,,yes,form 10\n"  # 10: new, phone only
    )
    path = tmp_path / "mixed.csv"
    path.write_text(text)
    report = await importer.import_file(
        ctx.db, ctx.signer, owner(tenant), path, now=ctx.clock.now(), parallel=True, chunk_size=4
    )
    assert reasons(report) == [
        (5, "duplicate"),
        (6, "bad_email"),
        (7, "conflict"),
        (8, "consent_without_proof"),
        (9, "duplicate"),
    ]
    assert (report.created, report.updated, report.unchanged, report.refused) == (3, 1, 1, 4)
    bob = await contact_by_email(ctx, tenant, "bob@shop.example")
    cat = await contact_by_email(ctx, tenant, "cat@shop.example")
    fay = await contact_by_email(ctx, tenant, "fay@shop.example")
    assert bob is not None and cat is not None and fay is not None
    assert bob.first_name == "Bob" and bob.source != "import"
    assert (cat.first_name, cat.phone, cat.source) == ("Cat", "+33622222222", "import")
    assert (cat.consent_email, cat.consent_sms, cat.time_zone) == (
        "granted",
        "granted",
        "Europe/Paris",  # from the phone number
    )
    assert (fay.consent_email, fay.consent_sms) == ("none", "none")
    async with ctx.db.reader() as session:
        out = await audience_contacts.contacts_out(
            session, tenant.org_id, [bob, cat], ctx.clock.now()
        )
        proofs = (
            await session.execute(
                select(ConsentEvent.channel, ConsentEvent.proof, ConsentEvent.source)
                .where(ConsentEvent.contact_id == cat.id)
                .order_by(ConsentEvent.id)
            )
        ).all()
    assert (out[0].tags, out[0].interests) == (["new"], ["shoes"])
    assert (out[1].tags, out[1].interests) == (["a", "b"], ["vinyl"])
    assert [tuple(p) for p in proofs] == [
        ("email", "form 3", "import"),
        ("sms", "form 3", "import"),
    ]
    before = await snapshot(ctx, tenant)
    assert len(before["contacts"]) == 5
    ctx.clock.advance(timedelta(hours=1))  # type: ignore[attr-defined]
    again = await importer.import_file(
        ctx.db, ctx.signer, owner(tenant), path, now=ctx.clock.now(), parallel=True, chunk_size=4
    )
    assert (again.created, again.updated, again.unchanged, again.refused) == (0, 0, 5, 4)
    assert reasons(again) == reasons(report)
    assert await snapshot(ctx, tenant) == before
