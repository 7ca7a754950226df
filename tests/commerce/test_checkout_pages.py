"""The customer's checkout pages driven like a browser without JavaScript: the public
event page's Buy button, /checkout/{token} (lines, breakdown, codes, countdown, window,
pay at pickup) and the confirmation /orders/view/{token} with the pickup QR."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx

from popdrop.app import create_app
from popdrop.commerce.stripe_sandbox import (
    SANDBOX_API_KEY,
    SANDBOX_WEBHOOK_SECRET,
    StripeSandbox,
)
from popdrop.core import links
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.conftest import Tenant, issue
from tests.events.helpers import Shop, make_shop, post
from tests.events.test_pages import HTML, csrf_of, login


async def hold_link(
    client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    shop: Shop,
    qty: int = 1,
    **extra: Any,
) -> tuple[int, str]:
    """A hold through the API and its checkout page's path (what the chat hands out)."""
    hold = await post(
        client,
        tenant,
        "/api/v1/holds",
        {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "qty": qty, **extra},
    )
    url = links.checkout_url(ctx.signer, ctx.settings.base_url, hold["id"], tenant.org_id)
    return int(hold["id"]), urlsplit(url).path


async def send(
    client: httpx.AsyncClient, path: str, fields: dict[str, Any], page: httpx.Response | None = None
) -> httpx.Response:
    """Submit the checkout form as a browser without script would (CSRF from the page)."""
    page = page or await client.get(path, headers=HTML)
    assert page.status_code == 200, page.text
    codes = re.findall(r'name="codes" value="([^"]+)"', page.text)
    data: dict[str, Any] = {"csrf": csrf_of(page.text), "codes": codes}
    data.update({k: str(v) for k, v in fields.items()})
    return await client.post(path, data=data, headers=HTML)


async def test_checkout_shows_lines_breakdown_countdown_and_window(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), window=5)
    _, path = await hold_link(app_client, ctx, tenant, shop, qty=2, slot_id=shop.slot_id)
    page = await app_client.get(path, headers=HTML)
    assert page.status_code == 200, page.text
    assert page.headers["cache-control"] == "no-store"
    text = page.text
    assert "Weekend pop-up" in text and "Tote bag" in text and "\u00d7 2" in text
    assert 'data-total="3000"' in text and "30.00 EUR" in text
    # The countdown targets the hold's expiry and shows it on the event's clock meanwhile.
    expires = clock.now() + timedelta(seconds=600)
    assert f'data-target="{expires.isoformat()}"' in text
    local_expiry = expires.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Berlin"))
    assert f"until {local_expiry:%H:%M}" in text
    assert "Front desk" in text
    assert 'value="pickup"' in text  # pay at pickup without JavaScript
    assert 'value="pay"' not in text  # no online provider configured
    assert '<script src="/static/event-public.js"' in text


async def test_a_code_shows_its_discount_and_a_bad_code_its_reason(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    _, codes = await issue(
        app_client,
        tenant,
        discount_kind="percent",
        discount_value=10,
        discount_description="Friends of the shop",
    )
    _, path = await hold_link(app_client, ctx, tenant, shop, qty=2)

    bad = await send(app_client, path, {"action": "apply", "code": "NOPE-NOPE-NOPE"})
    assert bad.status_code == 200, bad.text
    assert "code-refusal" in bad.text and "NOPE-NOPE-NOPE" in bad.text
    assert "<code>malformed</code>" in bad.text
    assert 'data-total="3000"' in bad.text  # nothing off
    assert 'name="codes"' not in bad.text  # a refused code is not carried on

    good = await send(app_client, path, {"action": "apply", "code": codes[0]})
    assert good.status_code == 200, good.text
    assert f'name="codes" value="{codes[0]}"' in good.text
    assert 'data-total="2700"' in good.text and "You save" in good.text
    assert "\u22123.00 EUR" in good.text
    assert "code-refusal" not in good.text

    # Removing the code prices the cart without it again.
    removed = await send(app_client, path, {"action": "apply", "remove": codes[0]}, page=good)
    assert 'data-total="3000"' in removed.text and 'name="codes"' not in removed.text


async def test_pay_at_pickup_without_javascript_ends_on_the_confirmation_with_a_qr(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), window=5)
    hold_id, path = await hold_link(app_client, ctx, tenant, shop, slot_id=shop.slot_id)

    typo = await send(app_client, path, {"action": "pickup", "receipt_email": "not-an-email"})
    assert typo.status_code == 422
    assert "an email address like you@example.com" in typo.text
    assert 'value="not-an-email"' in typo.text  # what was typed stays

    placed = await send(app_client, path, {"action": "pickup", "receipt_email": "ana@example.com"})
    assert placed.status_code == 303, placed.text
    confirmation = placed.headers["location"]
    assert "/orders/view/" in confirmation
    view = await app_client.get(urlsplit(confirmation).path, headers=HTML)
    assert view.status_code == 200, view.text
    assert "Reserved · pay at pickup" in view.text
    assert "<svg" in view.text  # the pickup QR, inline
    assert re.search(r'id="pickup-code">[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]+<', view.text)
    assert "Front desk" in view.text and "ana@example.com" in view.text
    assert "15.00 EUR" in view.text

    orders = await app_client.get(
        f"/api/v1/orders?event_id={shop.event_id}", headers=tenant.headers
    )
    assert orders.status_code == 200, orders.text
    body = orders.json()
    rows = body if isinstance(body, list) else body["items"]
    assert len(rows) == 1
    assert rows[0]["payment_method"] == "pay_at_pickup" and rows[0]["source"] == "web"
    assert rows[0]["lines"][0]["hold_id"] == hold_id

    # The checkout link of a hold already in an order goes to that order.
    again = await app_client.get(path, headers=HTML)
    assert again.status_code == 303

    def order_of(url: str) -> int:
        return links.read_order_view(ctx.signer, urlsplit(url).path.rsplit("/", 1)[1])[0]

    assert order_of(again.headers["location"]) == order_of(confirmation) == rows[0]["id"]


async def test_an_expired_hold_says_so_and_links_back_to_the_event(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    _, path = await hold_link(app_client, ctx, tenant, shop)
    page = await app_client.get(path, headers=HTML)
    clock.advance(timedelta(seconds=601))
    expired = await app_client.get(path, headers=HTML)
    assert expired.status_code == 410
    assert "Your reservation expired" in expired.text
    assert f'href="/e/{shop.event_id}"' in expired.text
    # Pressing the button of the page loaded before the expiry: the same message.
    late = await send(app_client, path, {"action": "pickup"}, page=page)
    assert late.status_code == 410 and "Your reservation expired" in late.text


async def test_bad_links_and_forged_forms_get_a_page_never_a_500(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    _, path = await hold_link(app_client, ctx, tenant, shop)
    bad = await app_client.get(path[:-3] + "xyz", headers=HTML)
    assert bad.status_code == 400 and "doesn't look right" in bad.text
    forged = await app_client.post(path, data={"action": "pickup", "csrf": "x"}, headers=HTML)
    assert forged.status_code == 403 and "csrf_failed" in forged.text
    assert (await app_client.get("/orders/view/nope", headers=HTML)).status_code == 400


async def test_the_public_buy_button_holds_and_opens_the_checkout(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now(), units=1, window=3)
    public = await app_client.get(f"/e/{shop.event_id}", headers=HTML)
    assert public.status_code == 200
    assert f'action="/e/{shop.event_id}/buy"' in public.text
    fields = {
        "csrf": csrf_of(public.text),
        "variant_id": shop.variant_id,
        "lane_id": shop.lane_id,
        "slot_id": shop.slot_id,
    }
    bought = await app_client.post(f"/e/{shop.event_id}/buy", data=fields, headers=HTML)
    assert bought.status_code == 303, bought.text
    checkout = urlsplit(bought.headers["location"]).path
    assert checkout.startswith("/checkout/")
    page = await app_client.get(checkout, headers=HTML)
    assert page.status_code == 200 and "Tote bag" in page.text
    # The one unit is held now: the next buyer is told it is sold out, on a page.
    again = await app_client.post(f"/e/{shop.event_id}/buy", data=fields, headers=HTML)
    assert again.status_code == 409 and "sold out" in again.text.lower()
    assert f'href="/e/{shop.event_id}"' in again.text


async def test_pay_now_goes_to_the_provider_and_the_confirmation_waits_for_its_webhook(
    ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    """Pay now → the sandbox's hosted page; back on the confirmation, "confirming" until
    the signed webhook lands, then paid with the pickup QR."""
    sandbox = StripeSandbox(retry_delays=(), clock=clock)
    async with sandbox.serving():
        assert sandbox.base_url
        ctx.settings = ctx.settings.model_copy(
            update={
                "stripe_secret_key": SANDBOX_API_KEY,
                "stripe_api_base": sandbox.base_url,
                "stripe_webhook_secrets": SANDBOX_WEBHOOK_SECRET,
            }
        )
        app = create_app(ctx=ctx)
        sandbox.webhook_transport = httpx.ASGITransport(app=app)
        sandbox.webhook_url = "http://test/api/v1/payments/stripe/webhook"
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            shop = await make_shop(client, tenant, clock.now())
            _, path = await hold_link(client, ctx, tenant, shop, qty=2)
            page = await client.get(path, headers=HTML)
            assert 'value="pay"' in page.text and "Pay now · 30.00 EUR" in page.text
            # Browsers apply form-action to the redirect Pay now answers with.
            policy = page.headers["content-security-policy"]
            assert f"form-action 'self' {sandbox.base_url}" in policy

            paying = await send(
                client, path, {"action": "pay", "receipt_email": "ana@example.com"}, page=page
            )
            assert paying.status_code == 303, paying.text
            hosted = paying.headers["location"]
            assert hosted.startswith(f"{sandbox.base_url}/pay/cs_")
            session_id = hosted.rsplit("/", 1)[1]

            view_path = urlsplit(sandbox.sessions[session_id]["success_url"]).path
            waiting = await client.get(view_path, headers=HTML)
            assert waiting.status_code == 200
            assert "Confirming your payment…" in waiting.text
            assert f'hx-get="{view_path}/state"' in waiting.text
            assert "<svg" not in waiting.text  # no pickup QR before the money
            assert (await client.get(f"{view_path}/state")).status_code == 204

            # A declined card first: the host's order page shows the provider's code.
            await sandbox.decline(session_id, card="4000000000009995")
            await login(client, ctx, tenant, "host")
            order_id = links.read_order_view(ctx.signer, view_path.rsplit("/", 1)[1])[0]
            host_view = await client.get(f"/orders/{order_id}", headers=HTML)
            assert 'class="failure-code"' in host_view.text
            assert "insufficient_funds" in host_view.text or "card_declined" in host_view.text
            await sandbox.pay(session_id)  # the webhook goes through the app
            moved = await client.get(f"{view_path}/state")
            assert moved.headers.get("hx-redirect") == view_path
            paid = await client.get(view_path, headers=HTML)
            assert 'data-status="paid"' in paid.text and "<svg" in paid.text
            assert "Confirming" not in paid.text
        await sandbox.settle()


async def test_a_chat_hold_makes_a_chat_order(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    _, path = await hold_link(app_client, ctx, tenant, shop, contact_ref="chat:41")
    placed = await send(app_client, path, {"action": "pickup"})
    assert placed.status_code == 303, placed.text
    orders = await app_client.get(
        f"/api/v1/orders?event_id={shop.event_id}", headers=tenant.headers
    )
    [order] = orders.json()
    assert (order["source"], order["source_ref"], order["contact_ref"]) == (
        "chat",
        "chat:41",
        "chat:41",
    )


async def test_a_sold_out_row_keeps_its_buy_form_hidden_for_the_live_counter(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    """Sold out: "Sold out" and no Buy to press (the form is there, hidden and disabled,
    so event-public.js can show it again when a unit comes back)."""
    shop = await make_shop(app_client, tenant, clock.now(), units=1)
    page = await app_client.get(f"/e/{shop.event_id}", headers=HTML)
    assert re.search(r'<form method="post" action="/e/\d+/buy" class="buy-form">', page.text)
    hold_id, _ = await hold_link(app_client, ctx, tenant, shop)
    sold_out = await app_client.get(f"/e/{shop.event_id}", headers=HTML)
    assert "Sold out" in sold_out.text
    assert re.search(r'action="/e/\d+/buy" class="buy-form" hidden>', sold_out.text)
    assert re.search(r'<button type="submit" class="primary buy" disabled>', sold_out.text)
    released = await app_client.post(f"/api/v1/holds/{hold_id}/release", headers=tenant.headers)
    assert released.status_code == 200, released.text
    back = await app_client.get(f"/e/{shop.event_id}", headers=HTML)
    assert "1 left" in back.text and 'class="buy-form" hidden' not in back.text


async def test_two_buys_by_one_browser_stay_two_checkouts(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    """Only a bundle's holds are taken together: two Buy presses at the same instant
    (the test clock does not move) each open a checkout of their own item."""
    shop = await make_shop(app_client, tenant, clock.now())
    mug = await post(
        app_client,
        tenant,
        f"/api/v1/events/{shop.event_id}/products",
        {"title": "Mug", "price_minor": 900, "variants": ["one size"]},
    )
    mug_variant = mug["variants"][0]["id"]
    stocked = await app_client.put(
        "/api/v1/stock",
        json={"variant_id": mug_variant, "lane_id": shop.lane_id, "total": 3},
        headers=tenant.headers,
    )
    assert stocked.status_code == 200, stocked.text
    public = await app_client.get(f"/e/{shop.event_id}", headers=HTML)
    paths = []
    for variant in (shop.variant_id, mug_variant):
        fields = {"csrf": csrf_of(public.text), "variant_id": variant, "lane_id": shop.lane_id}
        bought = await app_client.post(f"/e/{shop.event_id}/buy", data=fields, headers=HTML)
        assert bought.status_code == 303, bought.text
        paths.append(urlsplit(bought.headers["location"]).path)
    tote_page, mug_page = [await app_client.get(path, headers=HTML) for path in paths]
    assert 'data-total="1500"' in tote_page.text and "Mug" not in tote_page.text
    assert 'data-total="900"' in mug_page.text and "Tote bag" not in mug_page.text
