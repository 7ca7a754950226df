"""The guest list page and its CSV: RSVPs with their status, waiting place and offer,
holds, tickets and check-ins of one event; search; cells neutralised; tenancy."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import httpx
from sqlalchemy import select, update

from popdrop.checkin.models import Ticket
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import make_shop, post
from tests.events.test_pages import HTML, login
from tests.rsvp.helpers import rsvp

FORMULA = '=HYPERLINK("http://evil.test")'


async def _seed(
    client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> int:
    shop = await make_shop(client, tenant, clock.now())
    slot = await post(
        client, tenant, f"/api/v1/events/{shop.event_id}/slots",
        {"label": "Tiny", "starts_at": clock.now().isoformat(),
         "ends_at": clock.now().replace(year=clock.now().year + 1).isoformat(), "capacity": 1},
    )  # fmt: skip
    came = await rsvp(client, shop.event_id, slot["id"], email="ada@example.com")
    assert came.status_code == 201, came.text
    waiting = await rsvp(client, shop.event_id, slot["id"], phone="+4915112345678", waitlist=True)
    assert waiting.json()["rsvp"]["status"] == "waitlisted"
    await post(client, tenant, "/api/v1/holds", {
        "variant_id": shop.variant_id, "lane_id": shop.lane_id, "qty": 2,
        "contact_ref": "grace@example.com",
    })  # fmt: skip
    await post(client, tenant, "/api/v1/tickets", {
        "event_id": shop.event_id, "subject_kind": "manual", "subject_id": 7,
        "holder_ref": FORMULA,
    })  # fmt: skip
    async with ctx.db.transaction() as session:  # Ada came in at the north gate
        await session.execute(
            update(Ticket)
            .where(Ticket.event_id == shop.event_id, Ticket.subject_kind == "rsvp")
            .values(checked_in_at=clock.now(), checked_in_gate="north")
        )
    return shop.event_id


async def test_guest_list_shows_every_kind_with_its_state(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    event_id = await _seed(app_client, ctx, tenant, clock)
    await login(app_client, ctx, tenant, "host")

    page = await app_client.get(f"/events/{event_id}/guests", headers=HTML)
    assert page.status_code == 200, page.text
    text = page.text
    assert "ada@example.com" in text and "confirmed" in text
    assert "+4915112345678" in text and "waitlisted" in text and "#1 waiting" in text
    assert "grace@example.com" in text and "Tote bag · one size" in text
    assert "HYPERLINK" in text  # the manual ticket (escaped by the template)
    assert "1 checked in" in text and "north" in text
    assert page.headers["cache-control"].startswith("no-store")

    found = await app_client.get(f"/events/{event_id}/guests?q=GRACE", headers=HTML)
    assert "grace@example.com" in found.text and "ada@example.com" not in found.text
    by_phone = await app_client.get(f"/events/{event_id}/guests?q=15112345", headers=HTML)
    assert "waitlisted" in by_phone.text and "grace@example.com" not in by_phone.text
    holds = await app_client.get(f"/events/{event_id}/guests?kind=hold", headers=HTML)
    assert "grace@example.com" in holds.text and "ada@example.com" not in holds.text
    # Ada's ticket code as printed under her QR, and found by it typed either way.
    async with ctx.db.reader() as session:
        code = await session.scalar(
            select(Ticket.short_code).where(
                Ticket.event_id == event_id, Ticket.subject_kind == "rsvp"
            )
        )
    assert code is not None
    printed = f"{code[:4]}-{code[4:8]}-{code[8:]}"
    assert printed in text
    for typed in (printed, code.lower()):
        by_code = await app_client.get(f"/events/{event_id}/guests?q={typed}", headers=HTML)
        assert "ada@example.com" in by_code.text and "grace@example.com" not in by_code.text
    nobody = await app_client.get(f"/events/{event_id}/guests?q=nobody-here", headers=HTML)
    assert "Nobody matches." in nobody.text

    # Past its expiry (600 s), the hold shows as expired before anything marks it.
    clock.advance(timedelta(minutes=11))
    later = await app_client.get(f"/events/{event_id}/guests?kind=hold", headers=HTML)
    assert "expired" in later.text and "active" not in later.text


async def test_guest_csv_has_the_same_rows_with_safe_cells(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    event_id = await _seed(app_client, ctx, tenant, clock)
    await login(app_client, ctx, tenant, "owner")
    response = await app_client.get(f"/events/{event_id}/guests.csv", headers=HTML)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert sorted(r["kind"] for r in rows) == ["hold", "rsvp", "rsvp", "ticket"]
    ada = next(r for r in rows if r["email"] == "ada@example.com")
    assert (ada["status"], ada["gate"], ada["ticket_status"]) == ("confirmed", "north", "valid")
    assert len(ada["ticket_code"]) == 11 and ada["ticket_code"][4] == "-"  # as printed
    assert ada["checked_in_at"]
    waiting = next(r for r in rows if r["status"] == "waitlisted")
    assert (waiting["phone"], waiting["waiting_position"]) == ("+4915112345678", "1")
    manual = next(r for r in rows if r["kind"] == "ticket")
    assert manual["contact"] == "'" + FORMULA  # a spreadsheet shows it, never runs it

    searched = await app_client.get(f"/events/{event_id}/guests.csv?q=ada", headers=HTML)
    assert [r["email"] for r in csv.DictReader(io.StringIO(searched.text))] == ["ada@example.com"]


async def test_guest_list_needs_the_rsvp_scope_and_the_organization(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    event_id = await _seed(app_client, ctx, tenant, clock)
    other = await make_tenant(ctx)
    await login(app_client, ctx, other, "owner")
    for url in (f"/events/{event_id}/guests", f"/events/{event_id}/guests.csv"):
        assert (await app_client.get(url, headers=HTML)).status_code == 404
    app_client.cookies.clear()
    await login(app_client, ctx, tenant, "volunteer")
    refused = await app_client.get(f"/events/{event_id}/guests", headers=HTML)
    assert refused.status_code == 403
    assert "ada@example.com" not in refused.text
