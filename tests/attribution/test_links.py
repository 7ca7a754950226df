"""Short links: the redirect (UTM, click id, validity, max clicks, fallback), QR, bearer
targets that store no secret, the guessing guard, the bot filter, and the click batch."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from io import BytesIO
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import select

from popdrop.attribution.clicks import recorder_for
from popdrop.attribution.models import ShortLink
from popdrop.core import links
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.attribution.helpers import (
    DESKTOP,
    IPHONE,
    click_count,
    click_rows,
    flushed,
    link_row,
    make_link,
    visit,
)
from tests.checkin.helpers import issue, make_event
from tests.conftest import Tenant, make_tenant


def query_of(response: httpx.Response) -> dict[str, list[str]]:
    return parse_qs(urlsplit(response.headers["location"]).query)


async def test_redirect_keeps_utm_and_hands_a_click_id(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    link = await make_link(
        app_client,
        tenant,
        {"kind": "url", "url": "https://shop.example/drop?size=42&utm_campaign=mine"},
        tags={
            "utm_source": "popdrop",
            "utm_medium": "sms",
            "utm_campaign": "spring",
            "channel": "sms",
        },
    )
    assert link["short_url"] == f"{ctx.settings.base_url}/s/{link['slug']}"
    assert len(link["slug"]) >= 10

    response = await visit(
        app_client, link["slug"], Referer="https://news.example.org/article?id=7"
    )

    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith("https://shop.example/drop?size=42&utm_campaign=mine&")
    query = query_of(response)
    assert query["utm_source"] == ["popdrop"] and query["utm_medium"] == ["sms"]
    assert query["utm_campaign"] == ["mine"]  # the author's own tagging wins
    click_id = query["pd_click"][0]
    assert response.headers["cache-control"] == "no-store"

    await flushed(ctx)
    (click,) = await click_rows(ctx, link["id"])
    assert click.click_id == click_id
    assert (click.device_class, click.channel, click.referrer_host) == (
        "mobile",
        "sms",
        "news.example.org",
    )
    assert (await link_row(ctx, link["id"])).clicks == 1


async def test_link_outside_its_window_is_refused_or_falls_back(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    now = clock.now()
    window = {
        "valid_from": (now + timedelta(hours=1)).isoformat(),
        "valid_until": (now + timedelta(hours=2)).isoformat(),
    }
    target = {"kind": "url", "url": "https://shop.example/later"}
    strict = await make_link(app_client, tenant, target, **window)
    lenient = await make_link(
        app_client, tenant, target, fallback_url="https://shop.example/over", **window
    )

    early = await visit(app_client, strict["slug"])
    assert early.status_code == 409 and early.json()["reason"] == "not_yet_valid"
    assert (await visit(app_client, lenient["slug"])).headers["location"] == (
        "https://shop.example/over"
    )

    clock.advance(timedelta(minutes=61))
    assert (await visit(app_client, strict["slug"])).status_code == 302

    clock.advance(timedelta(hours=1))
    late = await visit(app_client, strict["slug"])
    assert late.status_code == 410 and late.json()["reason"] == "expired"
    assert (await visit(app_client, lenient["slug"])).headers["location"] == (
        "https://shop.example/over"
    )
    await flushed(ctx)
    assert (await link_row(ctx, strict["id"])).clicks == 1
    assert (await link_row(ctx, lenient["id"])).clicks == 0  # fallbacks are not clicks


async def test_max_clicks_then_fallback_or_gone(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    target = {"kind": "url", "url": "https://shop.example/first-ten"}
    capped = await make_link(
        app_client, tenant, target, max_clicks=2, fallback_url="https://shop.example/sold-out"
    )
    gone = await make_link(app_client, tenant, target, max_clicks=1)

    first = [await visit(app_client, capped["slug"]) for _ in range(2)]
    assert all(r.headers["location"].startswith("https://shop.example/first-ten?") for r in first)
    await flushed(ctx)  # the limit holds across a flush too
    third = await visit(app_client, capped["slug"])
    assert third.headers["location"] == "https://shop.example/sold-out"

    assert (await visit(app_client, gone["slug"])).status_code == 302
    refused = await visit(app_client, gone["slug"])
    assert refused.status_code == 410 and refused.json()["reason"] == "exhausted"
    await flushed(ctx)
    assert (await link_row(ctx, capped["id"])).clicks == 2
    assert (await link_row(ctx, gone["id"])).clicks == 1


async def test_qr_decodes_to_the_short_link(app_client: httpx.AsyncClient, tenant: Tenant) -> None:
    pyzbar = pytest.importorskip("pyzbar.pyzbar", reason="needs pyzbar and Debian's libzbar0")
    from PIL import Image

    link = await make_link(app_client, tenant, {"kind": "url", "url": "https://shop.example/"})
    png = await app_client.get(f"/api/v1/links/{link['id']}/qr.png", headers=tenant.headers)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    decoded = [s.data.decode() for s in pyzbar.decode(Image.open(BytesIO(png.content)))]
    assert decoded == [link["short_url"]]
    svg = await app_client.get(f"/api/v1/links/{link['id']}/qr.svg", headers=tenant.headers)
    assert svg.status_code == 200 and svg.content.startswith(b"<?xml")


async def test_ticket_link_stores_no_secret_and_reaches_the_ticket(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    ticket = await issue(app_client, tenant, event_id)
    secret = ticket["secret"]
    link = await make_link(app_client, tenant, {"kind": "ticket", "id": ticket["ticket"]["id"]})
    assert link["target_url"] is None

    async with ctx.db.reader() as session:
        row = (
            await session.execute(select(ShortLink.__table__).where(ShortLink.id == link["id"]))
        ).one()
    stored = " ".join(str(value) for value in row)
    assert secret not in stored and "/t/" not in stored
    assert ticket["short_code"] not in stored

    response = await visit(app_client, link["slug"])
    assert response.status_code == 302
    assert response.headers["location"].startswith(
        links.ticket_url(ctx.settings.base_url, secret) + "?pd_click="
    )
    page = await app_client.get(f"/t/{secret}")
    assert page.status_code == 200

    revoked = await app_client.post(
        f"/api/v1/tickets/{ticket['ticket']['id']}/revoke", headers=tenant.headers
    )
    assert revoked.status_code == 200, revoked.text
    after = await visit(app_client, link["slug"])
    assert after.status_code == 410 and after.json()["reason"] == "revoked"


async def test_slug_guessing_is_rate_limited(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    link = await make_link(app_client, tenant, {"kind": "url", "url": "https://shop.example/"})
    assert (await visit(app_client, link["slug"])).status_code == 302
    limit = ctx.settings.guess_limit_per_token
    for i in range(limit):
        miss = await visit(app_client, f"Zz{i:08d}guess")
        assert miss.status_code == 404, (i, miss.text)
        assert miss.json()["reason"] == "not_found"
    blocked = await visit(app_client, "AnotherGuess1")
    assert blocked.status_code == 429 and blocked.json()["reason"] == "rate_limited"
    assert "retry-after" in blocked.headers
    # A link this process already serves from its cache still answers.
    assert (await visit(app_client, link["slug"])).status_code == 302


async def test_bots_are_sent_on_but_not_counted(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    link = await make_link(app_client, tenant, {"kind": "url", "url": "https://shop.example/"})
    slug = link["slug"]
    bots = [
        await visit(app_client, slug, agent="Googlebot/2.1 (+http://www.google.com/bot.html)"),
        await visit(app_client, slug, agent="WhatsApp/2.23.20.0"),
        await visit(app_client, slug, agent="curl/8.5.0"),
        await visit(app_client, slug, agent=""),
        await visit(app_client, slug, agent=DESKTOP, **{"Sec-Purpose": "prefetch"}),
        await app_client.head(f"/s/{slug}", headers={"User-Agent": IPHONE}),
    ]
    assert all(r.status_code == 302 for r in bots)
    assert all("pd_click" not in r.headers["location"] for r in bots)
    person = await visit(app_client, slug, agent=DESKTOP)
    assert "pd_click=" in person.headers["location"]

    await flushed(ctx)
    row = await link_row(ctx, link["id"])
    assert (row.clicks, row.bot_hits) == (1, len(bots))
    (click,) = await click_rows(ctx, link["id"])
    assert click.device_class == "desktop"


async def test_every_click_of_a_burst_is_counted(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    link = await make_link(app_client, tenant, {"kind": "url", "url": "https://shop.example/"})
    await visit(app_client, link["slug"])  # warm the cache, then a burst
    answers = await asyncio.gather(*(visit(app_client, link["slug"]) for _ in range(300)))
    assert all(a.status_code == 302 for a in answers)
    click_ids = {query_of(a)["pd_click"][0] for a in answers}
    assert len(click_ids) == 300

    recorder = recorder_for(ctx.db)
    assert recorder.pending >= 300  # nothing was written on the redirect's path
    await flushed(ctx)
    assert recorder.pending == 0
    assert (await link_row(ctx, link["id"])).clicks == 301
    assert await click_count(ctx, link["id"]) == 301
    stored = {c.click_id for c in await click_rows(ctx, link["id"])}
    assert click_ids <= stored


async def test_analytics_by_day_channel_device_and_referrer(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    link = await make_link(
        app_client, tenant, {"kind": "url", "url": "https://shop.example/"}, tags={"channel": "qr"}
    )
    await visit(app_client, link["slug"], Referer="https://a.example/x")
    await visit(app_client, link["slug"], agent=DESKTOP)
    clock.advance(timedelta(days=1))
    await visit(app_client, link["slug"], Referer="https://a.example/y")
    await flushed(ctx)

    detail = await app_client.get(f"/api/v1/links/{link['id']}", headers=tenant.headers)
    assert detail.status_code == 200, detail.text
    analytics = detail.json()["analytics"]
    assert analytics["clicks"] == 3
    assert [b["clicks"] for b in analytics["by_day"]] == [2, 1]
    assert sum(b["clicks"] for b in analytics["by_hour"]) == 3
    assert analytics["by_channel"] == [{"key": "qr", "clicks": 3}]
    devices = {b["key"]: b["clicks"] for b in analytics["by_device_class"]}
    assert devices == {"mobile": 2, "desktop": 1}
    assert {"key": "a.example", "clicks": 2} in analytics["by_referrer_host"]


async def test_bad_link_input_is_refused_with_a_reason(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    other = await make_tenant(ctx)
    foreign_event = await make_event(ctx, other.org_id)
    cases = [
        ({"target": {"kind": "ticket"}}, 422),
        ({"target": {"kind": "url", "url": "javascript:alert(1)"}}, 422),
        ({"target": {"kind": "event", "id": foreign_event}}, 404),
        (
            {
                "target": {"kind": "url", "url": "https://x.example/"},
                "tags": {"event_id": foreign_event},
            },
            404,
        ),
        ({"target": {"kind": "url", "url": "https://x.example/"}, "max_clicks": 0}, 422),
        ({"target": {"kind": "url", "url": "https://x.example/"}, "secret": "x"}, 422),
    ]
    for body, status in cases:
        response = await app_client.post("/api/v1/links", json=body, headers=tenant.headers)
        assert response.status_code == status, (body, response.text)
        assert response.json()["reason"]
    listed = await app_client.get("/api/v1/links", headers=tenant.headers)
    assert listed.json() == []  # nothing half-written
