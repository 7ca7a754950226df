"""Event pages driven like a browser over ASGI: operator forms and the public event page."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import httpx

from popdrop.accounts import service as accounts
from popdrop.core.clock import FrozenClock
from popdrop.inventory.pages import CONSENT_TEXT
from popdrop.web.context import AppContext
from tests.conftest import Tenant
from tests.events.helpers import make_shop, post

PASSWORD = "correct horse battery"
HTML = {"accept": "text/html,application/xhtml+xml"}
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "page has no CSRF field"
    return match.group(1)


async def login(client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, role: str) -> None:
    email = f"{role}-{tenant.slug}@pages.test"
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


async def submit(
    client: httpx.AsyncClient, page_url: str, action: str, fields: dict[str, Any]
) -> httpx.Response:
    page = await client.get(page_url, headers=HTML)
    assert page.status_code == 200, page.text
    data = {"csrf": csrf_of(page.text), **{k: str(v) for k, v in fields.items()}}
    return await client.post(action, data=data, headers=HTML)


def local_input(clock: FrozenClock, days: int, hours: int = 0) -> str:
    """A datetime-local value (wall time, no offset)."""
    return (clock.now() + timedelta(days=days, hours=hours)).strftime("%Y-%m-%dT%H:%M")


async def test_operator_builds_an_event_through_the_forms(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await login(app_client, ctx, tenant, "owner")
    listing = await app_client.get("/events", headers=HTML)
    assert listing.status_code == 200 and "Create an event" in listing.text
    assert 'href="/events"' in listing.text  # the nav link

    # Bad input is shown next to the form, with what was typed.
    bad = await submit(
        app_client,
        "/events",
        "/events",
        {
            "title": "Spring pop-up",
            "slug": "Bad Slug",
            "timezone": "Mars/Olympus",
            "starts_at": local_input(clock, 3),
            "ends_at": "soon",
        },
    )
    assert bad.status_code == 422
    assert "an IANA time zone" in bad.text and "a date and time" in bad.text
    assert 'value="Spring pop-up"' in bad.text
    edge = await submit(
        app_client,
        "/events",
        "/events",
        {
            "title": "Edge",
            "slug": "edge",
            "timezone": "America/New_York",
            "starts_at": "0001-01-01T00:00",
            "ends_at": "9999-12-31T23:59",
            "hold_ttl_seconds": "9" * 5000,
        },
    )
    assert edge.status_code == 422 and "a date between the years 1 and 9999" in edge.text

    created = await submit(
        app_client,
        "/events",
        "/events",
        {
            "title": "Spring pop-up",
            "slug": "spring-pop-up",
            "venue_name": "Old Tram Depot",
            "timezone": "Europe/Berlin",
            "starts_at": local_input(clock, 3),
            "ends_at": local_input(clock, 3, 6),
            "hold_ttl_seconds": "900",
        },
    )
    assert created.status_code == 303, created.text
    detail_url = created.headers["location"].split("?")[0]
    event_id = int(detail_url.rsplit("/", 1)[1])
    detail = await app_client.get(created.headers["location"], headers=HTML)
    assert detail.status_code == 200
    assert "Spring pop-up" in detail.text and "The event is created" in detail.text
    assert "/ical/" in detail.text and "Publish" in detail.text

    duplicate = await submit(
        app_client,
        "/events",
        "/events",
        {
            "title": "Again",
            "slug": "spring-pop-up",
            "timezone": "UTC",
            "starts_at": local_input(clock, 3),
            "ends_at": local_input(clock, 3, 1),
        },
    )
    assert duplicate.status_code == 422 and "exists" in duplicate.text

    async def add(path: str, fields: dict[str, Any]) -> httpx.Response:
        return await submit(app_client, detail_url, f"{detail_url}/{path}", fields)

    slot = await add(
        "slots",
        {
            "label": "Morning",
            "starts_at": local_input(clock, 3),
            "ends_at": local_input(clock, 3, 2),
            "capacity": "20",
        },
    )
    assert slot.status_code == 303, slot.text
    bad_slot = await add(
        "slots",
        {"starts_at": local_input(clock, 3), "ends_at": local_input(clock, 2), "capacity": 5},
    )
    assert bad_slot.status_code == 422 and "ends_at must be after starts_at" in bad_slot.text
    assert (await add("lanes", {"name": "Front desk", "pickup_point": "Door A"})).status_code == 303
    assert (await add("lanes", {"name": ""})).status_code == 422
    assert (await add("partners", {"name": "Corner Café"})).status_code == 303

    async with ctx.db.reader() as session:
        from popdrop.events import service

        principal = accounts.Principal(tenant.org_id, "t", "owner", accounts.ROLES["owner"])
        slot_id = (await service.list_slots(session, principal, event_id))[0].id
        lane_id = (await service.list_lanes(session, principal, event_id))[0].id
    window = await add("windows", {"lane_id": lane_id, "slot_id": slot_id, "capacity": "5"})
    assert window.status_code == 303, window.text
    again = await add("windows", {"lane_id": lane_id, "slot_id": slot_id, "capacity": "5"})
    assert again.status_code == 409 and "already has a window" in again.text

    bad_price = await add("products", {"title": "Tee", "price": "cheap", "currency": "EUR"})
    assert bad_price.status_code == 422 and "an amount like 15.50" in bad_price.text
    product = await add(
        "products",
        {
            "title": "Linen tee",
            "price": "24.50",
            "currency": "EUR",
            "variants": "S, M, L",
            "highlights": "Organic linen\nMade in Lisbon",
        },
    )
    assert product.status_code == 303, product.text
    page = await app_client.get(detail_url, headers=HTML)
    cells = re.findall(r'name="(stock-\d+-\d+)"', page.text)
    assert len(cells) == 3
    bad_stock = await add("stock", {cells[0]: "-4"})
    assert bad_stock.status_code == 422
    stocked = await add("stock", {cells[0]: "4", cells[1]: "6", cells[2]: ""})
    assert stocked.status_code == 303, stocked.text
    page = await app_client.get(detail_url, headers=HTML)
    assert "24.50 EUR" in page.text and "Corner Café" in page.text
    assert 'data-available="4"' in page.text and 'data-available="6"' in page.text

    # Publish: the public page now shows the drop.
    assert (await app_client.get(f"/e/{event_id}", headers=HTML)).status_code == 404
    assert (await add("status", {"status": "live"})).status_code == 409  # draft -> live: no
    assert (await add("status", {"status": "published"})).status_code == 303
    public = await app_client.get(f"/e/{event_id}", headers=HTML)
    assert public.status_code == 200
    assert "Linen tee" in public.text and "24.50 EUR" in public.text
    assert "Organic linen" in public.text and "Morning" in public.text


async def test_forms_need_csrf_and_the_right_role(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    anonymous = await app_client.get("/events", headers=HTML)
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/login")
    shop = await make_shop(app_client, tenant, clock.now(), status="draft")
    await login(app_client, ctx, tenant, "volunteer")
    for url in ("/events", f"/events/{shop.event_id}"):
        refused = await app_client.get(url, headers=HTML)
        assert refused.status_code == 403 and "events:read" in refused.text
        assert "Old Tram Depot" not in refused.text
    form = await app_client.get("/login", headers=HTML)
    token = csrf_of(form.text)
    posted = await app_client.post(
        f"/events/{shop.event_id}/status",
        data={"csrf": token, "status": "published"},
        headers=HTML,
    )
    assert posted.status_code == 403

    owner = httpx.AsyncClient(transport=app_client._transport, base_url="http://test")
    async with owner:
        await login(owner, ctx, tenant, "owner")
        for url, data in (
            ("/events", {"title": "x"}),
            (f"/events/{shop.event_id}/status", {"status": "published"}),
            (f"/events/{shop.event_id}/stock", {}),
        ):
            missing = await owner.post(url, data=data, headers=HTML)
            assert missing.status_code == 403 and "csrf_failed" in missing.text
        wrong = await owner.post(
            f"/events/{shop.event_id}/status",
            data={"csrf": "forged", "status": "published"},
            headers=HTML,
        )
        assert wrong.status_code == 403
        event = await owner.get(f"/api/v1/events/{shop.event_id}", headers=tenant.headers)
        assert event.json()["status"] == "draft"
        # Times at the edge of the calendar still render (in UTC when the zone overflows).
        edge = await post(
            owner,
            tenant,
            "/api/v1/events",
            {
                "slug": "year-one",
                "title": "Year one",
                "timezone": "America/New_York",
                "starts_at": "0001-01-01T00:00:00Z",
                "ends_at": "0001-01-01T01:00:00Z",
            },
        )
        for url in (f"/events/{edge['id']}", "/events"):
            assert (await owner.get(url, headers=HTML)).status_code == 200, url
        # Bad ids and other tenants' events: 404 pages, never a 500.
        for url in ("/events/0", "/events/abc", f"/events/{2**63}", "/events/99999999"):
            assert (await owner.get(url, headers=HTML)).status_code == 404, url


async def test_public_event_page(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    draft = await make_shop(app_client, tenant, clock.now(), status="draft", slug="draft-one")
    hidden = await app_client.get(f"/e/{draft.event_id}", headers=HTML)
    assert hidden.status_code == 404 and "Tote bag" not in hidden.text
    for url in ("/e/0", "/e/abc", f"/e/{2**63}"):
        assert (await app_client.get(url, headers=HTML)).status_code == 404, url

    shop = await make_shop(app_client, tenant, clock.now(), units=7)
    await post(
        app_client,
        tenant,
        "/api/v1/holds",
        {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "qty": 2},
    )
    page = await app_client.get(f"/e/{shop.event_id}", headers=HTML)
    assert page.status_code == 200
    html = page.text
    assert "Weekend pop-up" in html and "Old Tram Depot" in html
    assert "Tote bag" in html and "15.00 EUR" in html
    assert re.search(r"CES?T", html), "times are shown in the event's zone (Europe/Berlin)"
    stock = re.search(
        rf'data-variant="{shop.variant_id}" data-lane="{shop.lane_id}" data-available="(\d+)"',
        html,
    )
    assert stock and stock.group(1) == "5"
    assert f"/e/{shop.event_id}/availability/stream" in html
    assert "Starts in" in html and "data-target=" in html
    # The RSVP form: slot picker, contact, places, consent with its text, the API it posts to.
    assert 'id="rsvp-form"' in html
    assert f'data-action="/api/v1/public/events/{shop.event_id}/rsvps"' in html
    assert f'name="slot_id" value="{shop.slot_id}"' in html and "50 places left" in html
    for name in ("email", "phone", "places", "consent"):
        assert f'name="{name}"' in html
    assert CONSENT_TEXT in html


async def test_the_rsvp_the_page_sends_is_accepted(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    """The JSON body the page's script builds is what the public API takes."""
    shop = await make_shop(app_client, tenant, clock.now())
    url = f"/api/v1/public/events/{shop.event_id}/rsvps"
    body = {
        "slot_id": shop.slot_id,
        "places": 1,
        "consent": True,
        "consent_text": CONSENT_TEXT,
        "waitlist": False,
        "email": "guest@example.com",
    }
    done = await app_client.post(url, json=body)
    assert done.status_code == 201, done.text
    assert done.json()["rsvp"]["consent_text"] == CONSENT_TEXT
    page = await app_client.get(f"/e/{shop.event_id}", headers=HTML)
    assert "49 places left" in page.text


async def test_operator_edits_event_details(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await login(app_client, ctx, tenant, "host")
    created = await submit(
        app_client,
        "/events",
        "/events",
        {
            "title": "Draft name",
            "slug": "to-edit",
            "timezone": "Europe/Berlin",
            "starts_at": local_input(clock, 3),
            "ends_at": local_input(clock, 3, 6),
        },
    )
    assert created.status_code == 303
    page_url = created.headers["location"].split("?")[0]
    page = await app_client.get(page_url, headers=HTML)
    assert "Edit details" in page.text and 'value="Draft name"' in page.text
    fields = {
        "title": "Final name",
        "description": "Now with coffee",
        "venue_name": "Depot",
        "venue_address": "",
        "timezone": "Europe/Berlin",
        "starts_at": local_input(clock, 4),
        "ends_at": local_input(clock, 4, 5),
        "opens_at": "",
    }
    backwards = await submit(
        app_client, page_url, f"{page_url}/details", {**fields, "ends_at": local_input(clock, 2)}
    )
    assert backwards.status_code == 422 and "ends_at must be after starts_at" in backwards.text
    saved = await submit(app_client, page_url, f"{page_url}/details", fields)
    assert saved.status_code == 303
    shown = await app_client.get(page_url, headers=HTML)
    assert "Final name" in shown.text and "details are saved" not in shown.text
    done = await app_client.get(saved.headers["location"], headers=HTML)
    assert "The event&#39;s details are saved." in done.text or "details are saved" in done.text


async def test_operator_puts_a_volunteer_on_the_staff(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await login(app_client, ctx, tenant, "owner")
    async with ctx.db.transaction() as session:
        volunteer = await accounts.create_user(
            session,
            org_id=tenant.org_id,
            email=f"door-{tenant.slug}@pages.test",
            password=PASSWORD,
            role="volunteer",
            now=ctx.clock.now(),
        )
    created = await submit(
        app_client,
        "/events",
        "/events",
        {
            "title": "Staffed",
            "slug": "staffed",
            "timezone": "UTC",
            "starts_at": local_input(clock, 3),
            "ends_at": local_input(clock, 3, 6),
        },
    )
    page_url = created.headers["location"].split("?")[0]
    added = await submit(
        app_client, page_url, f"{page_url}/staff", {"user_id": volunteer.id, "gate": "north"}
    )
    assert added.status_code == 303
    page = await app_client.get(page_url, headers=HTML)
    assert f"door-{tenant.slug}@pages.test" in page.text and "gate north" in page.text
    twice = await submit(
        app_client, page_url, f"{page_url}/staff", {"user_id": volunteer.id, "gate": "south"}
    )
    assert twice.status_code == 409 and "already on the event" in twice.text
