"""Audience pages driven like a browser over ASGI: the overview, contacts, segments with
their live count, the import job, erase, and the public preference / unsubscribe pages.
Runs on SQLite, and on PostgreSQL when POPDROP_TEST_DATABASE_URL is set."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from popdrop.accounts import service as accounts
from popdrop.accounts.service import ROLES, Principal
from popdrop.audience import consent, contacts, segments, settings
from popdrop.audience.models import ConsentEvent, Contact
from popdrop.audience.schemas import (
    ActivityIn,
    ConsentChange,
    ConsentGrant,
    ContactIn,
    SegmentIn,
)
from popdrop.core import links
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.conftest import Tenant

PASSWORD = "correct horse battery"
HTML = {"accept": "text/html,application/xhtml+xml"}
HTMX = {**HTML, "hx-request": "true"}
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
WORDING = "Yes, tell me about drops by email."


def csrf_of(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "page has no CSRF field"
    return match.group(1)


async def login(client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, role: str) -> None:
    email = f"{role}-{tenant.slug}@audience.test"
    async with ctx.db.transaction() as session:
        await accounts.create_user(
            session,
            org_id=tenant.org_id,
            email=email,
            password=PASSWORD,
            role=role,
            now=ctx.clock.now(),
        )
    page = await client.get("/login", headers=HTML)
    form = {"csrf": csrf_of(page.text), "email": email, "password": PASSWORD, "next": "/"}
    done = await client.post("/login", data=form, headers=HTML)
    assert done.status_code == 303, done.text


def owner_of(tenant: Tenant) -> Principal:
    return Principal(tenant.org_id, "test:seed", "owner", ROLES["owner"])


@dataclass
class Person:
    email: str | None = None
    phone: str | None = None
    email_ok: bool = False
    sms_ok: bool = False
    days_ago: float | None = None  # last engaged; None: never
    tags: tuple[str, ...] = ()


async def seed(ctx: AppContext, tenant: Tenant, people: list[Person]) -> list[int]:
    now = ctx.clock.now()
    ids: list[int] = []
    async with ctx.db.transaction() as session:
        for p in people:
            grants = [
                ConsentGrant(channel=ch, wording=WORDING, source="form")
                for ch, ok in (("email", p.email_ok), ("sms", p.sms_ok))
                if ok
            ]
            contact, _ = await contacts.upsert_contact(
                session,
                ctx.signer,
                owner_of(tenant),
                ContactIn(
                    email=p.email,
                    phone=p.phone,
                    first_name="Ada",
                    tags=list(p.tags),
                    consents=grants,
                ),
                now=now,
            )
            if p.days_ago is not None:
                await contacts.record_activity(
                    session,
                    ctx.signer,
                    tenant.org_id,
                    ActivityIn(kind="click", contact_id=contact.id),
                    now=now,
                    at=now - timedelta(days=p.days_ago),
                )
            ids.append(contact.id)
    return ids


async def consent_of(ctx: AppContext, contact_id: int) -> dict[str, str]:
    async with ctx.db.reader() as session:
        contact = await session.get(Contact, contact_id)
        assert contact is not None
        return {"email": contact.consent_email, "sms": contact.consent_sms}


def multi(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Form fields with repeated names (checkbox groups), as httpx takes them."""
    grouped: dict[str, list[str]] = {}
    for name, value in pairs:
        grouped.setdefault(name, []).append(value)
    return grouped


def counts(html: str) -> dict[str, int]:
    """The preview's figures: total plus `data-testid` → `data-count` of each bar."""
    found = {k: int(v) for k, v in re.findall(r'data-testid="([\w-]+)" data-count="(\d+)"', html)}
    total = re.search(r'id="segment-total" data-total="(\d+)"', html)
    if total:
        found["total"] = int(total.group(1))
    return found


AUDIENCE = [
    Person("hot-vip@example.org", email_ok=True, days_ago=2, tags=("vip",)),
    Person("warm@example.org", email_ok=True, days_ago=30),
    Person(None, "+33612345678", sms_ok=True, days_ago=90, tags=("vip",)),
    Person("no-consent@example.org", days_ago=1, tags=("vip",)),
    Person("never@example.org", "+33612345679", email_ok=True, sms_ok=True),
]


# ---------------------------------------------------------------- operator pages


async def test_pages_render_for_an_owner(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    ids = await seed(ctx, tenant, AUDIENCE)
    await login(app_client, ctx, tenant, "owner")
    page = await app_client.get("/audience", headers=HTML)
    assert page.status_code == 200, page.text
    assert 'href="/audience"' in page.text  # the nav link
    assert 'id="audience-total"' in page.text and ">5 <" in page.text
    overview = counts(page.text)
    assert overview == {
        "overview-hot": 2,
        "overview-warm": 1,
        "overview-cold": 1,
        "overview-never": 1,
    }
    assert "hot-vip@example.org" in page.text and 'enctype="multipart/form-data"' in page.text
    assert "/audience/export/consent.csv" in page.text

    vips = await app_client.get("/audience", params={"tag": "VIP"}, headers=HTML)
    assert "hot-vip@example.org" in vips.text and "warm@example.org" not in vips.text
    found = await app_client.get("/audience", params={"q": "warm@"}, headers=HTML)
    assert "warm@example.org" in found.text and "hot-vip@example.org" not in found.text

    contact = await app_client.get(f"/audience/contacts/{ids[0]}", headers=HTML)
    assert contact.status_code == 200
    assert "hot-vip@example.org" in contact.text and WORDING in contact.text
    assert "Download everything (JSON)" in contact.text
    assert (await app_client.get("/audience/segments", headers=HTML)).status_code == 200
    missing = await app_client.get("/audience/contacts/999999", headers=HTML)
    assert missing.status_code == 404


async def test_a_volunteer_is_refused(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    ids = await seed(ctx, tenant, AUDIENCE[:1])
    await login(app_client, ctx, tenant, "volunteer")
    for url in ("/audience", f"/audience/contacts/{ids[0]}", "/audience/segments"):
        page = await app_client.get(url, headers=HTML)
        assert page.status_code == 403, url
        assert "hot-vip@example.org" not in page.text
        assert 'href="/audience"' not in page.text
    export = await app_client.get(f"/audience/contacts/{ids[0]}/export.json", headers=HTML)
    assert export.status_code == 403 and "hot-vip" not in export.text
    csv = await app_client.get("/audience/export/contacts.csv", headers=HTML)
    assert csv.status_code == 403


async def test_an_anonymous_visitor_is_sent_to_login(app_client: httpx.AsyncClient) -> None:
    page = await app_client.get("/audience", headers=HTML)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")


async def test_settings_form_refuses_next_to_the_form(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await login(app_client, ctx, tenant, "owner")
    page = await app_client.get("/audience", headers=HTML)
    form = {"csrf": csrf_of(page.text), "hot_days": "10", "warm_days": "5", "help_text": "Hi"}
    bad = await app_client.post("/audience/settings", data=form, headers=HTML)
    assert bad.status_code == 422 and "warm_days: must be more than hot_days" in bad.text
    assert 'value="10"' in bad.text  # what was typed is kept
    nonsense = await app_client.post(
        "/audience/settings", data={**form, "warm_days": "soon"}, headers=HTML
    )
    assert nonsense.status_code == 422 and "a whole number" in nonsense.text
    good = await app_client.post(
        "/audience/settings",
        data={**form, "warm_days": "45", "retention_months": "24"},
        headers=HTML,
    )
    assert good.status_code == 303
    async with ctx.db.reader() as session:
        saved = await settings.get_settings(session, tenant.org_id)
    assert (saved.hot_days, saved.warm_days, saved.retention_months) == (10, 45, 24)
    assert saved.help_text == "Hi"


# ---------------------------------------------------------------- segments


async def test_live_preview_counts_the_seeded_contacts(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await seed(ctx, tenant, AUDIENCE)
    await login(app_client, ctx, tenant, "owner")
    page = await app_client.get("/audience/segments", headers=HTML)
    assert page.status_code == 200 and 'hx-post="/audience/segments/preview"' in page.text
    # The default rules (email or SMS) are counted right on the page.
    assert counts(page.text)["total"] == 4
    csrf = csrf_of(page.text)

    async def preview(fields: list[tuple[str, str]]) -> dict[str, int]:
        response = await app_client.post(
            "/audience/segments/preview", data=multi([("csrf", csrf), *fields]), headers=HTMX
        )
        assert response.status_code == 200, response.text
        return counts(response.text)

    by_email = await preview([("channels", "email")])
    assert by_email == {
        "total": 3,
        "channel-email": 3,
        "bucket-hot": 1,
        "bucket-warm": 1,
        "bucket-cold": 0,
        "bucket-never": 1,
    }
    vips = await preview([("channels", "email"), ("channels", "sms"), ("tags_any", "VIP")])
    assert vips["total"] == 2 and vips["channel-email"] == 1 and vips["channel-sms"] == 1
    assert (vips["bucket-hot"], vips["bucket-cold"]) == (1, 1)
    hot_warm = await preview(
        [("channels", "email"), ("recency", "hot"), ("recency", "warm"), ("tags_none", "vip")]
    )
    assert hot_warm["total"] == 1 and hot_warm["bucket-warm"] == 1

    # A rule that does not parse is explained in the preview, not a 500.
    broken = await app_client.post(
        "/audience/segments/preview",
        data=multi([("csrf", csrf), ("channels", "email"), ("near_km", "far")]),
        headers=HTMX,
    )
    assert broken.status_code == 200
    assert "a distance in km" in broken.text and "pick the event" in broken.text
    none = await app_client.post(
        "/audience/segments/preview", data=multi([("csrf", csrf)]), headers=HTMX
    )
    assert "pick at least one channel" in none.text
    # No CSRF field: refused.
    forged = await app_client.post(
        "/audience/segments/preview", data=multi([("channels", "email")]), headers=HTMX
    )
    assert forged.status_code == 403


async def test_segment_save_edit_and_delete(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await seed(ctx, tenant, AUDIENCE)
    await login(app_client, ctx, tenant, "owner")
    page = await app_client.get("/audience/segments", headers=HTML)
    csrf = csrf_of(page.text)
    fields = [("csrf", csrf), ("name", "VIP hot"), ("channels", "email"), ("tags_any", "vip")]
    unnamed = await app_client.post(
        "/audience/segments", data=multi(fields[:1] + fields[2:]), headers=HTML
    )
    assert unnamed.status_code == 422 and "give the segment a name" in unnamed.text
    saved = await app_client.post("/audience/segments", data=multi(fields), headers=HTML)
    assert saved.status_code == 303, saved.text
    url = saved.headers["location"].split("?")[0]
    twin = await app_client.post("/audience/segments", data=multi(fields), headers=HTML)
    assert twin.status_code == 422 and "exists" in twin.text

    editor = await app_client.get(url, headers=HTML)
    assert editor.status_code == 200 and 'value="VIP hot"' in editor.text
    assert counts(editor.text)["total"] == 1
    listing = await app_client.get("/audience/segments", headers=HTML)
    assert "VIP hot" in listing.text and "any tag of vip" in listing.text
    count = await app_client.get(f"{url}/count", headers=HTMX)
    assert count.status_code == 200 and "<strong>1</strong>" in count.text

    changed = await app_client.post(
        url, data=multi([*fields, ("channels", "sms")]), headers=HTML, follow_redirects=True
    )
    assert changed.status_code == 200 and counts(changed.text)["total"] == 2
    gone = await app_client.post(f"{url}/delete", data={"csrf": csrf}, headers=HTML)
    assert gone.status_code == 303
    assert (await app_client.get(url, headers=HTML)).status_code == 404


# ---------------------------------------------------------------- contact & erase


async def test_erase_from_the_page_leaves_no_email_or_phone(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    ids = await seed(ctx, tenant, AUDIENCE[4:5])
    await login(app_client, ctx, tenant, "owner")
    url = f"/audience/contacts/{ids[0]}"
    page = await app_client.get(url, headers=HTML)
    assert "never@example.org" in page.text and "+33612345679" in page.text

    download = await app_client.get(f"{url}/export.json", headers=HTML)
    assert download.status_code == 200
    assert download.headers["content-disposition"].startswith("attachment")
    held = json.loads(download.text)
    assert held["contact"]["email"] == "never@example.org" and len(held["consent_ledger"]) == 2

    confirm = await app_client.get(f"{url}/erase", headers=HTML)
    assert confirm.status_code == 200 and "Erase permanently" in confirm.text
    done = await app_client.post(f"{url}/erase", data={"csrf": csrf_of(confirm.text)}, headers=HTML)
    assert done.status_code == 303
    after = await app_client.get(done.headers["location"], headers=HTML)
    assert after.status_code == 200 and "Erased contact" in after.text
    assert "never@example.org" not in after.text and "+33612345679" not in after.text
    assert "33612345679" not in after.text
    again = await app_client.post(f"{url}/erase", data={"csrf": csrf_of(after.text)}, headers=HTML)
    assert again.status_code == 409 and "already erased" in again.text


# ---------------------------------------------------------------- import


CSV = (
    "email,phone,first_name,tags\n"
    "ok@example.com,,Ola,vip\n"
    "not-an-email,,Bad,\n"
    ",+1 555,Badphone,\n"
    ",,Nobody,\n"
    "ok@example.com,,Twice,\n"
    "second@example.com,+33612345670,Sam,\n"
)


async def test_the_import_job_runs_to_done_and_shows_problems_by_line(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await login(app_client, ctx, tenant, "owner")
    page = await app_client.get("/audience", headers=HTML)
    csrf = csrf_of(page.text)
    empty = await app_client.post("/audience/import", data={"csrf": csrf}, headers=HTML)
    assert empty.status_code == 422 and "choose a CSV file" in empty.text
    started = await app_client.post(
        "/audience/import",
        data={"csrf": csrf},
        files={"file": ("people.csv", CSV.encode(), "text/csv")},
        headers=HTML,
    )
    assert started.status_code == 303, started.text
    url = started.headers["location"]
    first = await app_client.get(url, headers=HTML)
    assert first.status_code == 200 and "people.csv" in first.text
    panel = first.text
    for _ in range(400):  # the job runs as a task in the app's loop
        if 'data-status="done"' in panel or 'data-status="failed"' in panel:
            break
        assert 'hx-trigger="every 1s"' in panel  # still polling
        await asyncio.sleep(0.025)
        panel = (await app_client.get(url, headers=HTMX)).text
    assert 'data-status="done"' in panel, panel
    assert 'hx-trigger="every 1s"' not in panel  # polling stops
    assert not panel.lstrip().startswith("<!doctype")  # htmx gets the panel alone
    lines = dict(
        re.findall(
            r'<tr data-line="(\d+)"><td class="num">\d+</td><td>.*?</td><td><code>(\w+)', panel
        )
    )
    assert lines == {
        "3": "bad_email",
        "4": "bad_phone",
        "5": "missing_contact",
        "6": "duplicate",
    }, panel
    assert "<strong>2</strong> created" in panel
    async with ctx.db.reader() as session:
        emails = set(
            await session.scalars(select(Contact.email).where(Contact.org_id == tenant.org_id))
        )
    assert emails == {"ok@example.com", "second@example.com"}


async def test_exports_stream_csv(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    ids = await seed(ctx, tenant, AUDIENCE)
    await login(app_client, ctx, tenant, "owner")
    everyone = await app_client.get("/audience/export/contacts.csv", headers=HTML)
    assert everyone.status_code == 200 and everyone.headers["content-type"].startswith("text/csv")
    assert "no-consent@example.org" in everyone.text
    sendable = await app_client.get("/audience/export/sendable-email.csv", headers=HTML)
    assert "warm@example.org" in sendable.text and "no-consent@example.org" not in sendable.text
    ledger = await app_client.get("/audience/export/consent.csv", headers=HTML)
    assert ledger.status_code == 200 and WORDING in ledger.text
    async with ctx.db.transaction() as session:
        segment = await segments.save_segment(
            session,
            owner_of(tenant),
            SegmentIn.model_validate(
                {"name": "vip", "rules": {"channels": ["email"], "tags_any": ["vip"]}}
            ),
            now=ctx.clock.now(),
        )
    one = await app_client.get(f"/audience/segments/{segment.id}/export.csv", headers=HTML)
    assert one.status_code == 200 and "hot-vip@example.org" in one.text
    assert "warm@example.org" not in one.text
    assert ids


# ---------------------------------------------------------------- public pages


async def _token_for(ctx: AppContext, contact_id: int) -> str:
    async with ctx.db.reader() as session:
        contact = await session.get(Contact, contact_id)
        assert contact is not None
        return links.preferences_token(ctx.signer, contact.org_id, contact.id)


async def test_preferences_page_round_trip(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    ids = await seed(ctx, tenant, AUDIENCE[4:5])
    token = await _token_for(ctx, ids[0])
    page = await app_client.get(f"/u/{token}", headers=HTML)
    assert page.status_code == 200, page.text
    assert "Unsubscribe from all email" in page.text and 'name="email"' in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "never@example.org" not in page.text  # masked
    # A GET never unsubscribes (mail scanners prefetch links).
    assert await consent_of(ctx, ids[0]) == {"email": "granted", "sms": "granted"}
    form = {"csrf": csrf_of(page.text), "sms": "on", "frequency": "weekly", "topics": "sneakers"}
    saved = await app_client.post(f"/p/{token}", data=form, headers=HTML)
    assert saved.status_code == 303, saved.text
    assert await consent_of(ctx, ids[0]) == {"email": "revoked", "sms": "granted"}
    again = await app_client.get(saved.headers["location"], headers=HTML)
    assert "Saved" in again.text and 'value="weekly" checked' in again.text
    bad = await app_client.post(f"/p/{token}", data={**form, "frequency": "hourly"}, headers=HTML)
    assert bad.status_code == 422 and "frequency" in bad.text
    forged = await app_client.post(f"/p/{token}", data={"email": "on"}, headers=HTML)
    assert forged.status_code == 403
    assert (await consent_of(ctx, ids[0]))["email"] == "revoked"


@pytest.mark.parametrize("body", [None, "List-Unsubscribe=One-Click"])
async def test_one_click_post_revokes_email_at_once(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, body: str | None
) -> None:
    ids = await seed(ctx, tenant, AUDIENCE[4:5])
    token = await _token_for(ctx, ids[0])
    headers: dict[str, Any] = {}
    if body is not None:  # what a mail client sends (RFC 8058), no cookies, no CSRF field
        headers = {"content-type": "application/x-www-form-urlencoded"}
    done = await app_client.post(f"/u/{token}", content=body, headers=headers)
    assert done.status_code == 200, done.text
    assert "unsubscribed" in done.text
    assert await consent_of(ctx, ids[0]) == {"email": "revoked", "sms": "granted"}
    async with ctx.db.reader() as session:
        event = await session.scalar(
            select(ConsentEvent).where(
                ConsentEvent.contact_id == ids[0], ConsentEvent.action == "revoke"
            )
        )
    assert event is not None and event.source == "unsubscribe"
    # Repeating it (a client retry) is fine; a browser gets a page.
    page = await app_client.post(f"/u/{token}", content=body, headers={**headers, **HTML})
    assert page.status_code == 200 and "You're unsubscribed" in page.text


async def test_tampered_tokens_get_a_clear_400(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    ids = await seed(ctx, tenant, AUDIENCE[4:5])
    token = await _token_for(ctx, ids[0])
    bad = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    for method, url in (("GET", f"/u/{bad}"), ("POST", f"/u/{bad}"), ("GET", f"/c/{bad}")):
        page = await app_client.request(method, url, headers=HTML)
        assert page.status_code == 400, (method, url)
        assert "link_invalid" in page.text and "look right" in page.text
    plain = await app_client.post(f"/u/{bad}")
    assert plain.status_code == 400 and "link_invalid" in plain.text
    saved = await app_client.post(f"/p/{bad}", data={"email": "on"}, headers=HTML)
    assert saved.status_code == 400
    assert (await consent_of(ctx, ids[0]))["email"] == "granted"


async def test_double_opt_in_link_confirms(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    ids = await seed(ctx, tenant, [Person("pending@example.org")])
    async with ctx.db.transaction() as session:
        contact = await session.get(Contact, ids[0])
        assert contact is not None
        await consent.change_consent(
            session,
            ctx.signer,
            contact,
            ConsentChange(channel="email", action="request", wording=WORDING, source="form"),
            now=clock.now(),
        )
        confirm = links.consent_confirm_url(ctx.signer, "", contact.org_id, contact.id, "email")
    page = await app_client.get(confirm, headers=HTML)
    assert page.status_code == 200 and "Thanks, you're in" in page.text
    assert (await consent_of(ctx, ids[0]))["email"] == "granted"
    twice = await app_client.get(confirm, headers=HTML)  # a second click is harmless
    assert twice.status_code == 200


async def test_unsubscribe_links_in_mail_sent_before_the_short_token_still_work(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    """Mail already in inboxes carries the older, JSON-payload token: it must keep working
    (an unsubscribe link is honoured months later), and a forged one must not."""
    ids = await seed(ctx, tenant, AUDIENCE[4:5])
    legacy = ctx.signer.sign(links.Purpose.PREFERENCES, {"o": tenant.org_id, "c": ids[0]})
    assert legacy != await _token_for(ctx, ids[0])
    done = await app_client.post(f"/u/{legacy}")
    assert done.status_code == 200, done.text
    assert (await consent_of(ctx, ids[0]))["email"] == "revoked"
    forged = await app_client.post(f"/u/{legacy[:-4]}abcd")
    assert forged.status_code == 400
