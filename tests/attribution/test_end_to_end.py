"""End to end, as a recipient and a till would do it: a drop with an A/B subject aimed at a
segment is sent; a recipient's click (email `/r/…`, SMS `/s/{slug}/{recipient}`) lands
on the event page, the browser checks out, and the order names the drop, the variant and
the segment; a POS sale carrying the drop's promo code is attributed to the same."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from sqlalchemy import select

from popdrop.attribution.models import ShortLink
from popdrop.core.clock import FrozenClock
from popdrop.drops.models import SendRow
from popdrop.drops.pipeline import Sender
from popdrop.outbound.transports import OutboundEmail, OutboundSms
from popdrop.web.context import AppContext
from tests.attribution.helpers import IPHONE, flushed
from tests.audience.helpers import add_contact
from tests.commerce.test_checkout_pages import hold_link, send
from tests.conftest import Tenant
from tests.drops.helpers import Recorder, drop_spec, started_drop
from tests.events.helpers import Shop, make_shop, post
from tests.events.test_pages import HTML
from tests.partners.helpers import make_till, send_standard, standard_sale

SUBJECTS = {"A": "The drop is on", "B": "Doors open at six"}


def variants(channel: str, body: str) -> list[dict[str, Any]]:
    def content(name: str) -> dict[str, Any]:
        if channel == "email":
            return {"email": {"default": {"subject": SUBJECTS[name], "text": body}}}
        return {"sms": {"default": {"body": f"{name}: {body}"}}}

    return [{"name": n, "split_percent": 50, "content": content(n)} for n in SUBJECTS]


async def vip_segment(client: httpx.AsyncClient, tenant: Tenant) -> int:
    segment = await post(
        client, tenant, "/api/v1/segments", {"name": "VIP", "rules": {"tags_any": ["vip"]}}
    )
    return int(segment["id"])


async def send_all(ctx: AppContext, tenant: Tenant, email: Recorder, sms: Recorder) -> None:
    """The drop's pipeline, its links on the app's own base URL (so the test follows them)."""
    sender = Sender(
        ctx.db,
        ctx.signer,
        ctx.clock,
        ctx.settings.base_url,
        email=email,
        sms=sms,
        org_id=tenant.org_id,
    )
    await sender.run_until_idle()


async def rows_of(ctx: AppContext, drop_id: int) -> dict[int, SendRow]:
    async with ctx.db.reader() as session:
        rows = await session.scalars(select(SendRow).where(SendRow.drop_id == drop_id))
        return {row.contact_id: row for row in rows}


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


async def land_and_buy(
    client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, shop: Shop, link: str
) -> tuple[str, int]:
    """Follow a message's link like a phone's browser, then check out at pickup: (the
    click id the landing page got, the order id)."""
    redirect = await client.get(path_of(link), headers={"User-Agent": IPHONE})
    assert redirect.status_code == 302, redirect.text
    landing = redirect.headers["location"]
    assert urlsplit(landing).path == f"/e/{shop.event_id}"
    query = parse_qs(urlsplit(landing).query)
    [click_id] = query["pd_click"]
    page = await client.get(path_of(landing), headers=HTML)
    assert page.status_code == 200, page.text
    await flushed(ctx)  # the click batch is written (the app's flusher does it every 0.1 s)
    _, checkout = await hold_link(client, ctx, tenant, shop)
    placed = await send(client, checkout, {"action": "pickup", "receipt_email": "ana@x.io"})
    assert placed.status_code == 303, placed.text
    orders = await client.get(f"/api/v1/orders?event_id={shop.event_id}", headers=tenant.headers)
    body = orders.json()
    rows = body if isinstance(body, list) else body["items"]
    return click_id, max(int(row["id"]) for row in rows)


async def touches(
    client: httpx.AsyncClient, tenant: Tenant, kind: str, sale_id: int
) -> list[dict[str, Any]]:
    response = await client.get(
        f"/api/v1/attribution/sales/{kind}/{sale_id}", headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


async def test_an_email_click_and_a_till_code_name_the_drop_variant_and_segment(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    segment_id = await vip_segment(app_client, tenant)
    for n in range(6):
        await add_contact(app_client, tenant, email=f"fan{n}@x.io", tags=["vip"])
    await add_contact(app_client, tenant, email="other@x.io")  # not in the segment
    spec = drop_spec(
        event_id=shop.event_id,
        segment_id=segment_id,
        ab_test_fraction=1.0,
        variants=variants("email", "Code {{ voucher_code }}: {{ event.url }} or {{ voucher_url }}"),
    )
    drop_id = await started_drop(ctx, tenant, spec)
    email, sms = Recorder(), Recorder()
    await send_all(ctx, tenant, email, sms)
    assert sorted(email.to()) == [f"fan{n}@x.io" for n in range(6)]

    rows = await rows_of(ctx, drop_id)
    chosen = next((r for r in rows.values() if r.variant == "B"), next(iter(rows.values())))
    message = next(
        m
        for m in email.sent
        if isinstance(m, OutboundEmail)
        and m.message_id
        and f"contact-{chosen.contact_id}." in m.message_id
    )
    assert message.subject == SUBJECTS[str(chosen.variant)]
    event_link, voucher_link = re.findall(r"http://\S+/r/\S+", message.text)

    click_id, order_id = await land_and_buy(app_client, ctx, tenant, shop, event_link)
    first, last = await touches(app_client, tenant, "order", order_id)
    for touch in (first, last):
        assert touch["via"] == "click" and touch["click_id"] == click_id
        assert (touch["drop_id"], touch["variant"], touch["segment_id"]) == (
            drop_id,
            chosen.variant,
            segment_id,
        )
        assert touch["channel"] == "email" and touch["event_id"] == shop.event_id

    # The drop's own outcome was kept: the row is clicked (the A/B metric).
    assert (await rows_of(ctx, drop_id))[chosen.contact_id].clicked_at is not None

    # The voucher link carries the recipient's code: it is followed with the code, but the
    # short link it is counted on stores the public page only.
    code = re.search(r"Code (\S+):", message.text)
    assert code is not None
    voucher_click = await app_client.get(path_of(voucher_link), headers={"User-Agent": IPHONE})
    assert voucher_click.status_code == 302
    assert code.group(1) in voucher_click.headers["location"]
    assert "pd_click=" in voucher_click.headers["location"]
    async with ctx.db.reader() as session:
        stored = list(await session.scalars(select(ShortLink).where(ShortLink.drop_id == drop_id)))
    assert stored and all(code.group(1) not in (link.target_url or "") for link in stored)

    # The till: a promo code tagged with the drop, the variant and the segment.
    promo = await post(
        app_client,
        tenant,
        "/api/v1/promo-codes",
        {
            "label": "Drop poster",
            "event_id": shop.event_id,
            "drop_id": drop_id,
            "variant": chosen.variant,
            "segment_id": segment_id,
        },
    )
    till = await make_till(app_client, tenant, clock.now(), slug="till-pop-up")
    sold = await send_standard(app_client, till, standard_sale(codes=[promo["code"]]), clock.now())
    assert sold.status_code == 200, sold.text
    listed = await app_client.get("/api/v1/pos/sales", headers=tenant.headers)
    [sale] = listed.json()
    for touch in await touches(app_client, tenant, "pos_sale", int(sale["id"])):
        assert touch["via"] == "code" and touch["promo_code_id"] == promo["id"]
        assert (touch["drop_id"], touch["variant"], touch["segment_id"]) == (
            drop_id,
            chosen.variant,
            segment_id,
        )


async def test_an_sms_short_link_click_is_attributed_to_the_drop(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    segment_id = await vip_segment(app_client, tenant)
    await add_contact(app_client, tenant, phone="+33611111111", tags=["vip"], consents=("sms",))
    spec = drop_spec(
        channels=["sms"],
        event_id=shop.event_id,
        segment_id=segment_id,
        ab_test_fraction=1.0,
        variants=variants("sms", "Drop on {{ event.url }}"),
    )
    drop_id = await started_drop(ctx, tenant, spec)
    email, sms = Recorder(), Recorder()
    await send_all(ctx, tenant, email, sms)
    [message] = sms.sent
    assert isinstance(message, OutboundSms)
    [link] = re.findall(r"http://\S+", message.body)
    assert re.fullmatch(r"http://127\.0\.0\.1:8000/s/[A-Za-z0-9_-]{11}/[0-9a-z]+[\w-]{6}", link)
    [row] = (await rows_of(ctx, drop_id)).values()

    click_id, order_id = await land_and_buy(app_client, ctx, tenant, shop, link)
    first, last = await touches(app_client, tenant, "order", order_id)
    assert first["click_id"] == last["click_id"] == click_id
    assert (last["drop_id"], last["variant"], last["segment_id"], last["channel"]) == (
        drop_id,
        row.variant,
        segment_id,
        "sms",
    )
    assert (await rows_of(ctx, drop_id))[row.contact_id].clicked_at is not None
