"""Role home pages: after login each role lands somewhere it may be (never a 403); a
volunteer sees the events they staff with a scanner button, a partner the events it
partners, and nobody sees another organization's events."""

from __future__ import annotations

import httpx

from popdrop.accounts import service as accounts
from popdrop.accounts.models import User
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import make_shop, post
from tests.events.test_pages import HTML, PASSWORD, csrf_of


async def _user(ctx: AppContext, tenant: Tenant, role: str, email: str) -> User:
    async with ctx.db.transaction() as session:
        return await accounts.create_user(
            session, org_id=tenant.org_id, email=email, password=PASSWORD, role=role,
            now=ctx.clock.now(),
        )  # fmt: skip


async def _log_in(client: httpx.AsyncClient, email: str) -> httpx.Response:
    page = await client.get("/login", headers=HTML)
    form = {"csrf": csrf_of(page.text), "email": email, "password": PASSWORD}
    done = await client.post("/login", data=form, headers=HTML)
    assert done.status_code == 303, done.text
    return done


async def _land(client: httpx.AsyncClient, email: str) -> httpx.Response:
    """Log in without `next` and follow the redirects to where the role lands."""
    done = await _log_in(client, email)
    target = done.headers["location"]
    assert target == "/"
    page = await client.get(target, headers=HTML, follow_redirects=True)
    assert page.status_code == 200, page.text
    return page


async def test_volunteer_lands_on_the_events_they_staff_with_a_scanner(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    staffed = await make_shop(app_client, tenant, clock.now(), slug="staffed")
    other = await make_shop(app_client, tenant, clock.now(), slug="not-mine")
    volunteer = await _user(ctx, tenant, "volunteer", f"door-{tenant.slug}@home.test")
    await post(
        app_client, tenant, f"/api/v1/events/{staffed.event_id}/staff",
        {"user_id": volunteer.id, "gate": "north"},
    )  # fmt: skip
    # Another organization's volunteer rows never show.
    foreign = await make_tenant(ctx)
    foreign_shop = await make_shop(app_client, foreign, clock.now(), slug="foreign")

    page = await _land(app_client, volunteer.email)
    assert str(page.url).endswith("/home")
    assert f'href="/scan/{staffed.event_id}?gate=north"' in page.text
    assert f'href="/scan/{other.event_id}"' not in page.text
    assert f'href="/scan/{foreign_shop.event_id}"' not in page.text
    # The scanner is one click away, opens for the volunteer, at their gate.
    scanner = await app_client.get(f"/scan/{staffed.event_id}?gate=north", headers=HTML)
    assert scanner.status_code == 200
    assert 'name="gate" value="north"' in scanner.text
    # A volunteer does not run events: no workspace links, and /events stays refused.
    assert f'href="/events/{staffed.event_id}"' not in page.text
    assert (await app_client.get("/events", headers=HTML)).status_code == 403


async def test_volunteer_without_shifts_is_told_what_to_do(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    volunteer = await _user(ctx, tenant, "volunteer", f"idle-{tenant.slug}@home.test")
    page = await _land(app_client, volunteer.email)
    assert "not on the staff of any event yet" in page.text


async def test_partner_lands_on_the_events_that_name_its_email(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    mine = await make_shop(app_client, tenant, clock.now(), slug="partnered")
    other = await make_shop(app_client, tenant, clock.now(), slug="other")
    partner = await _user(ctx, tenant, "partner", f"roaster-{tenant.slug}@home.test")
    await post(
        app_client, tenant, f"/api/v1/events/{mine.event_id}/partners",
        {"name": "Corner Roasters", "contact_email": partner.email.upper()},
    )  # fmt: skip
    await post(
        app_client, tenant, f"/api/v1/events/{other.event_id}/partners",
        {"name": "Someone else", "contact_email": "else@home.test"},
    )  # fmt: skip

    page = await _land(app_client, partner.email)
    assert str(page.url).endswith("/home")
    assert "Corner Roasters" in page.text
    assert f'href="/e/{mine.event_id}"' in page.text  # published: its public page
    assert "Someone else" not in page.text
    assert "/scan/" not in page.text  # a partner does not scan


async def test_owner_keeps_landing_on_vouchers_and_home_lists_every_event(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    owner = await _user(ctx, tenant, "owner", f"boss-{tenant.slug}@home.test")
    page = await _land(app_client, owner.email)
    assert str(page.url).endswith("/vouchers")
    home = await app_client.get("/home", headers=HTML)
    assert home.status_code == 200
    assert f'href="/events/{shop.event_id}"' in home.text
    assert f'href="/scan/{shop.event_id}"' in home.text


async def test_home_needs_a_login(app_client: httpx.AsyncClient) -> None:
    response = await app_client.get("/home", headers=HTML)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login")
