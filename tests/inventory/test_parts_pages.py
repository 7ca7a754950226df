"""The workspace's edit and remove pages for slots, lanes, windows and products, driven
like a browser over ASGI: a refusal is shown next to the form with its status, nothing
changes, and the workspace links every row (and the guest list)."""

from __future__ import annotations

import httpx

from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import make_shop, post
from tests.events.test_pages import HTML, login, submit
from tests.rsvp.helpers import rsvp


async def test_workspace_links_edits_and_the_guest_list(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), window=4)
    await login(app_client, ctx, tenant, "host")
    page = await app_client.get(f"/events/{shop.event_id}", headers=HTML)
    base = f"/events/{shop.event_id}"
    for link in (
        f"{base}/slots/{shop.slot_id}/edit",
        f"{base}/lanes/{shop.lane_id}/edit",
        f"{base}/products/{shop.product_id}/edit",
        f"{base}/guests",
    ):
        assert f'href="{link}"' in page.text, link
    assert f"{base}/windows/" in page.text


async def test_slot_capacity_below_taken_is_shown_and_nothing_changes(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    for _ in range(2):
        assert (await rsvp(app_client, shop.event_id, shop.slot_id)).status_code == 201
    await login(app_client, ctx, tenant, "host")
    url = f"/events/{shop.event_id}/slots/{shop.slot_id}/edit"
    form = await app_client.get(url, headers=HTML)
    assert form.status_code == 200 and "2 taken now" in form.text

    fields = {
        "label": "Morning",
        "starts_at": clock.now().strftime("%Y-%m-%dT%H:%M"),
        "ends_at": clock.now().replace(hour=23, minute=59).strftime("%Y-%m-%dT%H:%M"),
        "capacity": 1,
    }
    refused = await submit(app_client, url, url, fields)
    assert refused.status_code == 409
    assert "2 places of this slot are taken" in refused.text
    assert 'value="Morning"' in refused.text  # what was typed stays

    removed = await submit(
        app_client, url, f"/events/{shop.event_id}/slots/{shop.slot_id}/remove", {}
    )
    assert removed.status_code == 409 and "cannot be removed" in removed.text
    slots = await app_client.get(f"/api/v1/events/{shop.event_id}/slots", headers=tenant.headers)
    assert (slots.json()[0]["capacity"], slots.json()[0]["label"]) == (50, "")

    saved = await submit(app_client, url, url, {**fields, "capacity": 2})
    assert saved.status_code == 303
    assert saved.headers["location"] == f"/events/{shop.event_id}?done=edited#slots"
    slots = await app_client.get(f"/api/v1/events/{shop.event_id}/slots", headers=tenant.headers)
    assert (slots.json()[0]["capacity"], slots.json()[0]["label"]) == (2, "Morning")


async def test_product_lane_and_window_edits_and_removals(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    window = await post(app_client, tenant, f"/api/v1/lanes/{shop.lane_id}/windows",
                        {"slot_id": shop.slot_id, "capacity": 3})  # fmt: skip
    await login(app_client, ctx, tenant, "owner")
    base = f"/events/{shop.event_id}"

    product = f"{base}/products/{shop.product_id}/edit"
    bad = await submit(app_client, product, product,
                       {"title": "Tote", "price": "ten", "currency": "EUR"})  # fmt: skip
    assert bad.status_code == 422
    good = await submit(app_client, product, product,
                        {"title": "Linen tote", "price": "18.50", "currency": "EUR"})  # fmt: skip
    assert good.status_code == 303
    products = await app_client.get(f"/api/v1/events/{shop.event_id}/products",
                                    headers=tenant.headers)  # fmt: skip
    assert (products.json()[0]["title"], products.json()[0]["price_minor"]) == ("Linen tote", 1850)

    lane = f"{base}/lanes/{shop.lane_id}/edit"
    assert (await submit(app_client, lane, lane, {"name": "Yard"})).status_code == 303
    win = f"{base}/windows/{window['id']}/edit"
    assert (await submit(app_client, win, win, {"capacity": 5})).status_code == 303
    gone = await submit(app_client, win, f"{base}/windows/{window['id']}/remove", {})
    assert gone.status_code == 303
    assert (await app_client.get(win, headers=HTML)).status_code == 404
    # The product with stock and no holds goes; the workspace no longer lists it.
    removed = await submit(app_client, product, f"{base}/products/{shop.product_id}/remove", {})
    assert removed.status_code == 303
    workspace = await app_client.get(base, headers=HTML)
    assert "Linen tote" not in workspace.text and "Yard" in workspace.text


async def test_parts_of_other_events_and_volunteers_are_refused(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    other_shop = await make_shop(app_client, tenant, clock.now(), slug="second")
    await login(app_client, ctx, tenant, "host")
    # A slot of another event, through this event's URL: 404.
    wrong = f"/events/{shop.event_id}/slots/{other_shop.slot_id}/edit"
    assert (await app_client.get(wrong, headers=HTML)).status_code == 404
    assert (await app_client.get(f"/events/{shop.event_id}/tables/1/edit",
                                 headers=HTML)).status_code == 404  # fmt: skip
    app_client.cookies.clear()
    foreign = await make_tenant(ctx)
    await login(app_client, ctx, foreign, "owner")
    url = f"/events/{shop.event_id}/slots/{shop.slot_id}/edit"
    assert (await app_client.get(url, headers=HTML)).status_code == 404
    app_client.cookies.clear()
    await login(app_client, ctx, tenant, "volunteer")
    assert (await app_client.get(url, headers=HTML)).status_code == 403
