"""The host's order pages driven like a browser over ASGI: the event's orders (filter,
CSV), one order (Mark paid, Refund, Cancel), scopes and the partner's view, the lane
view, the pickup scanner's scan, and the `/orders` and `/sales` chat commands."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import httpx

from popdrop.chat import host
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import Shop, make_shop, post
from tests.events.test_pages import HTML, csrf_of, login, submit


async def place(
    client: httpx.AsyncClient, tenant: Tenant, shop: Shop, qty: int = 1, **hold: Any
) -> dict[str, Any]:
    """An order paid at pickup, placed through the API from a fresh hold."""
    held = await post(
        client,
        tenant,
        "/api/v1/holds",
        {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "qty": qty, **hold},
    )
    return await post(
        client,
        tenant,
        "/api/v1/orders",
        {"hold_ids": [held["id"]], "payment_method": "pay_at_pickup", "source": "lane"},
    )


async def order_status(client: httpx.AsyncClient, tenant: Tenant, order_id: int) -> str:
    response = await client.get(f"/api/v1/orders/{order_id}", headers=tenant.headers)
    assert response.status_code == 200, response.text
    status: str = response.json()["status"]
    return status


async def test_orders_list_filters_and_exports(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    first = await place(app_client, tenant, shop, qty=2)
    second = await place(app_client, tenant, shop)
    await login(app_client, ctx, tenant, "host")
    page_url = f"/events/{shop.event_id}"
    workspace = await app_client.get(page_url, headers=HTML)
    assert f'href="{page_url}/orders"' in workspace.text
    assert f'href="{page_url}/lanes/{shop.lane_id}"' in workspace.text

    paid = await submit(
        app_client,
        f"/orders/{second['id']}",
        f"/orders/{second['id']}/mark-paid",
        {"tender": "cash"},
    )
    assert paid.status_code == 303

    listing = await app_client.get(f"{page_url}/orders", headers=HTML)
    assert listing.status_code == 200
    assert f'data-order="{first["id"]}" data-status="pending"' in listing.text
    assert f'data-order="{second["id"]}" data-status="paid"' in listing.text
    assert 'id="paid-orders">1<' in listing.text and 'id="revenue">15.00 EUR<' in listing.text
    only_paid = await app_client.get(f"{page_url}/orders?status=paid", headers=HTML)
    assert f'data-order="{second["id"]}"' in only_paid.text
    assert f'data-order="{first["id"]}"' not in only_paid.text

    export = await app_client.get(f"{page_url}/orders.csv")
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    rows = export.text.strip().splitlines()
    assert rows[0].startswith("order_id,created_at,status")
    assert len(rows) == 3
    assert any(row.startswith(f"{first['id']},") and ",30.00," in row for row in rows)


async def test_order_detail_marks_paid_refunds_in_part_and_cancels(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    order = await place(app_client, tenant, shop, qty=2)
    other = await place(app_client, tenant, shop)
    await login(app_client, ctx, tenant, "host")
    url = f"/orders/{order['id']}"
    detail = await app_client.get(url, headers=HTML)
    assert detail.status_code == 200
    assert "Tote bag" in detail.text and "30.00 EUR" in detail.text
    assert "Mark paid · cash" in detail.text and 'id="refund-form"' not in detail.text

    assert (
        await submit(app_client, url, f"{url}/mark-paid", {"tender": "card"})
    ).status_code == 303
    assert await order_status(app_client, tenant, order["id"]) == "paid"
    paid = await app_client.get(url, headers=HTML)
    assert "Marked paid" not in paid.text  # the notice comes with ?done=paid only
    assert "pay at pickup · card" in paid.text and 'id="refund-form"' in paid.text

    too_much = await submit(app_client, url, f"{url}/refund", {"amount": "40.00", "reason": "x"})
    assert too_much.status_code == 422
    assert "at most 30.00 EUR is left to refund" in too_much.text
    assert 'value="40.00"' in too_much.text
    typo = await submit(app_client, url, f"{url}/refund", {"amount": "ten"})
    assert typo.status_code == 422 and "an amount like 15.50" in typo.text

    partial = await submit(
        app_client, url, f"{url}/refund", {"amount": "5.00", "reason": "damaged"}
    )
    assert partial.status_code == 303
    after = await app_client.get(partial.headers["location"], headers=HTML)
    assert "The refund is recorded" in after.text and "5.00 EUR" in after.text
    assert await order_status(app_client, tenant, order["id"]) == "paid"
    rest = await submit(app_client, url, f"{url}/refund", {})
    assert rest.status_code == 303
    assert await order_status(app_client, tenant, order["id"]) == "refunded"

    other_url = f"/orders/{other['id']}"
    cancelled = await submit(app_client, other_url, f"{other_url}/cancel", {})
    assert cancelled.status_code == 303
    assert await order_status(app_client, tenant, other["id"]) == "cancelled"
    # Cancelled is final for the buttons: none are offered, and a forged POST is refused.
    page = await app_client.get(other_url, headers=HTML)
    assert "Cancel order" not in page.text and "Mark paid" not in page.text
    again = await app_client.post(
        f"{other_url}/cancel", data={"csrf": csrf_of(page.text)}, headers=HTML
    )
    assert again.status_code == 409 and 'id="problem"' in again.text


async def test_scopes_and_the_partner_sees_its_events_orders_only(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    elsewhere = await make_shop(app_client, tenant, clock.now(), slug="elsewhere")
    mine = await place(app_client, tenant, shop)
    theirs = await place(app_client, tenant, elsewhere)
    await post(
        app_client,
        tenant,
        f"/api/v1/events/{shop.event_id}/partners",
        {"name": "Corner store", "contact_email": f"partner-{tenant.slug}@pages.test"},
    )

    await login(app_client, ctx, tenant, "volunteer")
    assert (
        await app_client.get(f"/events/{shop.event_id}/orders", headers=HTML)
    ).status_code == 403
    assert (await app_client.get(f"/events/{shop.event_id}/orders.csv")).status_code == 403
    # Lane staff collect the money of orders paid at pickup, and do nothing else.
    at_lane = await app_client.get(f"/orders/{mine['id']}", headers=HTML)
    assert at_lane.status_code == 200
    assert "Mark paid · cash" in at_lane.text and "Cancel order" not in at_lane.text
    refund = await app_client.post(
        f"/orders/{mine['id']}/cancel", data={"csrf": csrf_of(at_lane.text)}, headers=HTML
    )
    assert refund.status_code == 403
    app_client.cookies.clear()

    await login(app_client, ctx, tenant, "partner")
    home = await app_client.get("/home", headers=HTML)
    assert f'href="/events/{shop.event_id}/orders"' in home.text
    assert f'href="/events/{elsewhere.event_id}/orders"' not in home.text
    listing = await app_client.get(f"/events/{shop.event_id}/orders", headers=HTML)
    assert listing.status_code == 200 and f'data-order="{mine["id"]}"' in listing.text
    assert (
        await app_client.get(f"/events/{elsewhere.event_id}/orders", headers=HTML)
    ).status_code == 404
    detail = await app_client.get(f"/orders/{mine['id']}", headers=HTML)
    assert detail.status_code == 200 and "Mark paid" not in detail.text  # reads only
    assert (await app_client.get(f"/orders/{theirs['id']}", headers=HTML)).status_code == 404
    forged = await app_client.post(
        f"/orders/{mine['id']}/cancel", data={"csrf": csrf_of(detail.text)}, headers=HTML
    )
    assert forged.status_code == 403
    app_client.cookies.clear()

    stranger = await make_tenant(ctx)
    await login(app_client, ctx, stranger, "owner")
    assert (await app_client.get(f"/orders/{mine['id']}", headers=HTML)).status_code == 404


async def test_lane_view_lists_orders_to_hand_out_by_window(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), window=5)
    in_window = await place(app_client, tenant, shop, slot_id=shop.slot_id)
    any_time = await place(app_client, tenant, shop)
    await login(app_client, ctx, tenant, "host")
    url = f"/orders/{in_window['id']}"
    assert (
        await submit(app_client, url, f"{url}/mark-paid", {"tender": "cash"})
    ).status_code == 303

    lane = f"/events/{shop.event_id}/lanes/{shop.lane_id}"
    page = await app_client.get(lane, headers=HTML)
    assert page.status_code == 200
    assert "Front desk" in page.text and 'hx-trigger="every 5s"' in page.text
    assert f'href="/pickup/{shop.event_id}?lane={shop.lane_id}"' in page.text
    windows = re.findall(r'<section class="card lane-window">\s*<h2>([^<]+)<', page.text)
    assert len(windows) == 2 and windows[1].startswith("During the event · ")
    first_window = page.text.index("lane-window")
    assert page.text.index(f'data-order="{in_window["id"]}" data-status="paid"') > first_window
    assert f'data-order="{any_time["id"]}" data-status="pending"' in page.text

    fragment = await app_client.get(lane, headers={**HTML, "hx-request": "true"})
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert f'data-order="{in_window["id"]}"' in fragment.text


async def test_the_orders_and_sales_chat_commands_answer(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    now = clock.now()
    async with ctx.db.transaction() as session:
        empty = await host.run_command(
            session, host.Sales(), org_id=tenant.org_id, actor="chat-host:1:test", now=now
        )
    assert "no paid orders yet" in empty
    first = await place(app_client, tenant, shop, qty=2)
    second = await place(app_client, tenant, shop)
    for order in (first, second):
        response = await app_client.post(
            f"/api/v1/orders/{order['id']}/mark-paid",
            json={"tender": "cash"},
            headers=tenant.headers,
        )
        assert response.status_code == 200, response.text
    async with ctx.db.transaction() as session:
        listed = await host.run_command(
            session, host.parse("/orders"), org_id=tenant.org_id, actor="chat-host:1:t", now=now
        )
        sales = await host.run_command(
            session, host.parse("/sales"), org_id=tenant.org_id, actor="chat-host:1:t", now=now
        )
    assert f"#{second['id']} paid · 15.00 EUR" in listed
    assert f"#{first['id']} paid · 30.00 EUR" in listed
    assert listed.index(f"#{second['id']}") < listed.index(f"#{first['id']}")  # newest first
    assert "2 paid orders" in sales and "revenue 45.00 EUR" in sales
    assert "average checkout 22.50 EUR" in sales
    assert "/orders" in host.help_text() and "/sales" in host.help_text()


async def test_the_pickup_scanner_hands_an_order_out_once_with_reasons(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    paid = await place(app_client, tenant, shop)
    unpaid = await place(app_client, tenant, shop)
    response = await app_client.post(
        f"/api/v1/orders/{paid['id']}/mark-paid", json={"tender": "cash"}, headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    await login(app_client, ctx, tenant, "volunteer")
    page = await app_client.get(f"/pickup/{shop.event_id}?lane={shop.lane_id}", headers=HTML)
    assert page.status_code == 200
    check_url = re.search(r'data-check-url="([^"]+)"', page.text)
    token = re.search(r'data-csrf="([^"]+)"', page.text)
    assert check_url and token and '<script src="/static/checkin-scan.js"' in page.text
    url = check_url.group(1).replace("&amp;", "&")

    async def scan(code: str) -> httpx.Response:
        return await app_client.post(
            url,
            json={"secret": code, "nonce": "n", "gate": "x"},
            headers={"X-CSRF-Token": token.group(1)},
        )

    early = await scan(paid["short_code"])
    assert early.status_code == 409 and early.json()["reason"] == "outside_window"
    clock.advance(timedelta(days=1, minutes=5))  # the event's door hours
    ok = await scan(paid["short_code"].lower())
    assert ok.status_code == 200, ok.text
    assert ok.json()["result"] == "ok" and ok.json()["counts"]["checked_in"] == 1
    assert "Tote bag" in ok.json()["holder_ref"]
    again = await scan(paid["short_code"])
    assert again.status_code == 409 and again.json()["reason"] == "already_picked_up"
    not_paid = await scan(unpaid["short_code"])
    assert not_paid.status_code == 409 and not_paid.json()["reason"] == "not_paid"
    assert await order_status(app_client, tenant, paid["id"]) == "picked_up"
    forged = await app_client.post(url, json={"secret": paid["short_code"]})
    assert forged.status_code == 403


async def test_staff_set_a_paid_order_aside_and_the_scanner_still_hands_it_out(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    order = await place(app_client, tenant, shop)
    await login(app_client, ctx, tenant, "host")
    url = f"/orders/{order['id']}"
    # Not paid yet: nothing to set aside (the button is not there, the move is refused).
    assert "/ready" not in (await app_client.get(url, headers=HTML)).text
    refused = await submit(app_client, url, f"{url}/ready", {})
    assert refused.status_code == 409 and "Cannot set aside" in refused.text
    await submit(app_client, url, f"{url}/mark-paid", {"tender": "card"})
    assert f'action="{url}/ready"' in (await app_client.get(url, headers=HTML)).text
    aside = await submit(app_client, url, f"{url}/ready", {})
    assert aside.status_code == 303 and aside.headers["location"].endswith("?done=ready")
    assert await order_status(app_client, tenant, order["id"]) == "ready"
    again = await submit(app_client, url, f"{url}/ready", {})  # a double tap changes nothing
    assert again.status_code == 303
    lane = await app_client.get(f"/events/{shop.event_id}/lanes/{shop.lane_id}", headers=HTML)
    assert f'data-order="{order["id"]}" data-status="ready"' in lane.text
    clock.advance(timedelta(days=1, minutes=5))  # the event (its pickup window) is on
    handed = await app_client.post(
        "/api/v1/pickup/scan",
        json={"code": order["short_code"], "lane_id": shop.lane_id},
        headers=tenant.headers,
    )
    assert handed.status_code == 200 and handed.json()["result"] == "ok", handed.text
    assert await order_status(app_client, tenant, order["id"]) == "picked_up"
