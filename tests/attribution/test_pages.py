"""The `/links` host pages over ASGI, driven like a browser without script: short links
and promo codes listed and created through the forms, a link's page with its QR image
and analytics, refusals as 4xx pages that write nothing, and a partner login that sees
only its own links and codes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from popdrop.attribution.models import PromoCode, ShortLink
from popdrop.vouchers.models import VoucherBatch
from popdrop.web.context import AppContext
from tests.attribution.helpers import DESKTOP, flushed, make_link, visit
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import make_shop, post
from tests.events.test_pages import HTML, csrf_of, login


async def submit(
    client: httpx.AsyncClient, action: str, fields: dict[str, Any], csrf: str | None = None
) -> httpx.Response:
    if csrf is None:
        page = await client.get("/links", headers=HTML)
        assert page.status_code == 200, page.text
        csrf = csrf_of(page.text)
    data = {"csrf": csrf, **{k: str(v) for k, v in fields.items()}}
    return await client.post(action, data=data, headers=HTML)


async def count(ctx: AppContext, model: Any, org_id: int) -> int:
    async with ctx.db.reader() as session:
        found = await session.scalar(
            select(func.count()).select_from(model).where(model.org_id == org_id)
        )
    return int(found or 0)


async def test_host_creates_a_link_sees_its_qr_and_its_clicks(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    await login(app_client, ctx, tenant, "owner")
    empty = await app_client.get("/links", headers=HTML)
    assert empty.status_code == 200
    assert 'id="no-links"' in empty.text and 'id="no-promos"' in empty.text
    assert 'href="/links"' in empty.text  # the nav names the page

    made = await submit(
        app_client,
        "/links",
        {
            "target_kind": "event",
            "event_id": shop.event_id,
            "channel": "poster",
            "utm_campaign": "spring-drop",
            "max_clicks": 500,
            "valid_until": "2099-01-01T00:00",
        },
    )
    assert made.status_code == 303, made.text
    location = made.headers["location"]
    link_id = int(re.fullmatch(r"/links/(\d+)\?created=1", location).group(1))  # type: ignore[union-attr]
    async with ctx.db.reader() as session:
        link = await session.get(ShortLink, link_id)
    assert link is not None and link.org_id == tenant.org_id
    assert (link.target_kind, link.target_id, link.channel) == ("event", shop.event_id, "poster")
    assert link.utm_campaign == "spring-drop" and link.max_clicks == 500
    assert link.valid_until is not None and link.valid_until.year == 2099

    page = await app_client.get(location, headers=HTML)
    assert page.status_code == 200, page.text
    assert f"/s/{link.slug}" in page.text and 'id="notice"' in page.text
    assert "event page: Weekend pop-up" in page.text and 'id="no-clicks"' in page.text
    assert f'src="/links/{link_id}/qr.svg"' in page.text
    svg = await app_client.get(f"/links/{link_id}/qr.svg")
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in svg.content
    png = await app_client.get(f"/links/{link_id}/qr.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

    # Two phone clicks and one desktop click, then the page draws them.
    for agent in (None, None, DESKTOP):
        kwargs = {"agent": agent} if agent else {}
        assert (await visit(app_client, link.slug, **kwargs)).status_code == 302
    await flushed(ctx)
    page = await app_client.get(f"/links/{link_id}", headers=HTML)
    assert re.search(r'id="clicks">3<', page.text), page.text
    day = ctx.clock.now().strftime("%Y-%m-%d")
    assert f'data-day="{day}" data-clicks="3"' in page.text
    assert 'data-key="mobile" data-clicks="2"' in page.text
    assert 'data-key="desktop" data-clicks="1"' in page.text
    assert 'data-key="poster" data-clicks="3"' in page.text

    listed = await app_client.get("/links", headers=HTML)
    row = re.search(rf'<tr data-link="{link_id}">.*?</tr>', listed.text, re.S)
    assert row is not None
    assert f"/s/{link.slug}" in row.group(0) and "spring-drop" in row.group(0)
    assert re.search(r"3<span class=\"muted\"> / 500", row.group(0)), row.group(0)


async def test_bad_link_forms_are_refused_with_a_reason_and_write_nothing(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    other = await make_tenant(ctx)
    foreign = await make_shop(app_client, other, ctx.clock.now())
    await login(app_client, ctx, tenant, "owner")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"target_kind": "url"}, 422, "the address the link opens"),
        ({"target_kind": "url", "url": "ftp://nope"}, 422, "String should match pattern"),
        ({"target_kind": "event"}, 422, "choose the event"),
        ({"target_kind": "event", "event_id": shop.event_id, "max_clicks": "lots"}, 422, ""),
        ({"target_kind": "event", "event_id": shop.event_id, "max_clicks": 0}, 422, ""),
        (
            {
                "target_kind": "event",
                "event_id": shop.event_id,
                "valid_from": "2099-02-01T00:00",
                "valid_until": "2099-01-01T00:00",
            },
            422,
            "valid_until must be after valid_from",
        ),
        ({"target_kind": "event", "event_id": shop.event_id, "valid_until": "soon"}, 422, ""),
        ({"target_kind": "event", "event_id": shop.event_id, "channel": "pigeon"}, 422, ""),
        ({"target_kind": "event", "event_id": foreign.event_id}, 404, "not found"),
        ({"target_kind": "event", "event_id": "99999999999999999999999"}, 422, ""),
        ({"target_kind": "ticket", "event_id": shop.event_id}, 422, "an event page or a URL"),
    ]
    for fields, status, message in cases:
        answer = await submit(app_client, "/links", fields)
        assert answer.status_code == status, (fields, answer.text)
        assert "text/html" in answer.headers["content-type"]
        assert message in answer.text, (fields, answer.text)
        assert 'id="new-link"' in answer.text  # the form again, to fix
    forged = await submit(
        app_client, "/links", {"target_kind": "event", "event_id": shop.event_id}, csrf="x"
    )
    assert forged.status_code == 403 and "csrf_failed" in forged.text
    assert await count(ctx, ShortLink, tenant.org_id) == 0
    # Another organization's link is not found (a page, not a crash).
    theirs = await make_link(app_client, other, {"kind": "url", "url": "https://other.example"})
    for path in (f"/links/{theirs['id']}", f"/links/{theirs['id']}/qr.svg", "/links/abc"):
        assert (await app_client.get(path, headers=HTML)).status_code == 404, path


async def test_promo_code_is_shown_once_and_listed_with_its_tags(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    partner = await post(
        app_client,
        tenant,
        f"/api/v1/events/{shop.event_id}/partners",
        {"name": "Corner café", "contact_email": "cafe@corner.example"},
    )
    await login(app_client, ctx, tenant, "owner")
    other = await make_tenant(ctx)
    foreign = await make_shop(app_client, other, ctx.clock.now())
    second = await make_shop(app_client, tenant, ctx.clock.now(), slug="second-shop")
    refusals: list[tuple[dict[str, Any], int, str]] = [
        ({"event_id": shop.event_id}, 422, "a name for the code"),
        ({"label": "x", "event_id": foreign.event_id}, 404, "not found"),
        ({"label": "x", "event_id": second.event_id, "partner_id": partner["id"]}, 422,
         "this partner is of another event"),
        ({"label": "x" * 201}, 422, "at most 200 characters"),
        ({"label": "x", "discount_kind": "fixed", "discount_value": "0"}, 422,
         "a fixed discount is at least 1"),
        ({"label": "x", "discount_kind": "fixed", "discount_value": "5.505"}, 422,
         "an amount such as 5 or 5.50"),
        ({"label": "x", "discount_kind": "percent", "discount_value": "150"}, 422,
         "a percent discount is 1 to 100"),
    ]  # fmt: skip
    for fields, status, message in refusals:
        refused = await submit(app_client, "/links/promo-codes", fields)
        assert refused.status_code == status, (fields, refused.text)
        assert message in refused.text and 'id="new-promo"' in refused.text
    assert await count(ctx, PromoCode, tenant.org_id) == 0

    made = await submit(
        app_client,
        "/links/promo-codes",
        {"label": "Café counter", "partner_id": partner["id"], "channel": "partner"},
    )
    assert made.status_code == 201, made.text
    assert made.headers["cache-control"] == "no-store"
    code = re.search(r'id="new-code-value">([^<]+)<', made.text).group(1)  # type: ignore[union-attr]
    async with ctx.db.reader() as session:
        promo = await session.scalar(select(PromoCode).where(PromoCode.org_id == tenant.org_id))
    assert promo is not None and promo.code == code
    # The partner filled in its event.
    assert (promo.partner_id, promo.event_id, promo.channel) == (
        partner["id"],
        shop.event_id,
        "partner",
    )
    listed = await app_client.get("/links", headers=HTML)
    row = re.search(rf'<tr data-promo="{promo.id}">.*?</tr>', listed.text, re.S)
    assert row is not None
    assert "Café counter" in row.group(0) and "Corner café" in row.group(0)
    # A promo code is public (printed on posters, told at the till): the list shows it, as
    # the API does, so the host can print it again.
    assert "Weekend pop-up" in row.group(0) and code in row.group(0)


async def test_a_partner_sees_only_its_own_links_and_codes_and_creates_none(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    mine = await post(
        app_client,
        tenant,
        f"/api/v1/events/{shop.event_id}/partners",
        {"name": "Mine", "contact_email": f"partner-{tenant.slug}@pages.test"},
    )
    theirs = await post(
        app_client,
        tenant,
        f"/api/v1/events/{shop.event_id}/partners",
        {"name": "Theirs", "contact_email": "other@partner.example"},
    )
    target = {"kind": "url", "url": "https://shop.example/spring"}
    own_link = await make_link(app_client, tenant, target, tags={"partner_id": mine["id"]})
    other_link = await make_link(app_client, tenant, target, tags={"partner_id": theirs["id"]})
    untagged = await make_link(app_client, tenant, target)
    for partner, label in ((mine, "Mine poster"), (theirs, "Theirs poster")):
        await post(
            app_client,
            tenant,
            "/api/v1/promo-codes",
            {"label": label, "partner_id": partner["id"]},
        )

    await login(app_client, ctx, tenant, "partner")
    page = await app_client.get("/links", headers=HTML)
    assert page.status_code == 200, page.text
    assert f'data-link="{own_link["id"]}"' in page.text
    assert f'data-link="{other_link["id"]}"' not in page.text
    assert f'data-link="{untagged["id"]}"' not in page.text
    assert "Mine poster" in page.text and "Theirs poster" not in page.text
    assert 'id="new-link"' not in page.text and 'id="new-promo"' not in page.text
    assert (await app_client.get(f"/links/{own_link['id']}", headers=HTML)).status_code == 200
    for path in (f"/links/{other_link['id']}", f"/links/{other_link['id']}/qr.png"):
        assert (await app_client.get(path, headers=HTML)).status_code == 404
    before = await count(ctx, ShortLink, tenant.org_id)
    tried = await submit(
        app_client,
        "/links",
        {"target_kind": "url", "url": "https://x.example/abc"},
        csrf_of(page.text),
    )
    assert tried.status_code == 403 and "forbidden" in tried.text
    assert await count(ctx, ShortLink, tenant.org_id) == before


async def test_the_demo_seeds_a_promo_code_a_poster_link_a_till_and_its_sales(
    app_client: httpx.AsyncClient, ctx: AppContext, demo_dir: Path
) -> None:
    from popdrop import demo
    from popdrop.accounts import service as accounts
    from popdrop.attribution.models import SaleTouch
    from popdrop.partners.models import PosConnection, PosSale

    settings = ctx.settings.model_copy(update={"data_dir": demo_dir})
    first = await demo.seed(settings, ctx.db, ctx.signer)
    again = await demo.seed(settings, ctx.db, ctx.signer)  # a re-run adds nothing
    assert first["short_link"] == again["short_link"]
    assert re.fullmatch(r"https?://\S+/s/[\w-]{11}", first["short_link"])
    assert "/e/" in first["event_url"]
    assert first["links_url"].endswith("/links") and first["pos_url"].endswith("/partners/sales")
    async with ctx.db.reader() as session:
        org = await accounts.get_organization_by_slug(session, demo.DEMO_ORG)
        links = list(await session.scalars(select(ShortLink).where(ShortLink.org_id == org.id)))
        promos = list(await session.scalars(select(PromoCode).where(PromoCode.org_id == org.id)))
        tills = await count(ctx, PosConnection, org.id)
        sales = list(await session.scalars(select(PosSale).where(PosSale.org_id == org.id)))
        touches = list(
            await session.scalars(
                select(SaleTouch).where(
                    SaleTouch.org_id == org.id, SaleTouch.sale_kind == "pos_sale"
                )
            )
        )
    [poster] = [link for link in links if link.utm_campaign == "opening-weekend"]
    assert (poster.target_kind, poster.channel) == ("event", "poster")
    [promo] = promos
    assert promo.partner_id is not None and promo.event_id == poster.target_id
    assert tills == 1 and len(sales) == 2
    # The sale with the café's code is attributed to the café's code, first and last.
    assert {(t.touch, t.via, t.promo_code_id, t.partner_id) for t in touches} == {
        ("first", "code", promo.id, promo.partner_id),
        ("last", "code", promo.id, promo.partner_id),
    }
    # The short link opens the demo event's page.
    slug = first["short_link"].rsplit("/", 1)[1]
    opened = await visit(app_client, slug)
    assert opened.status_code == 302 and f"/e/{poster.target_id}" in opened.headers["location"]


async def test_a_promo_code_made_on_the_page_gives_its_discount(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    """What the form says is what the vault issues: an amount typed in the currency is
    kept in cents, and a code made without a discount gives 10 % (a code worth nothing
    would be refused at checkout)."""
    await login(app_client, ctx, tenant, "owner")
    made = await submit(
        app_client,
        "/links/promo-codes",
        {"label": "Flyer", "discount_kind": "fixed", "discount_value": "2,50"},
    )
    assert made.status_code == 201, made.text
    plain = await submit(app_client, "/links/promo-codes", {"label": "Poster"})
    assert plain.status_code == 201, plain.text
    async with ctx.db.reader() as session:
        batches = {
            b.name: (b.discount_kind, b.discount_value)
            for b in await session.scalars(
                select(VoucherBatch).where(VoucherBatch.org_id == tenant.org_id)
            )
        }
    assert batches == {"promo: Flyer": ("fixed", 250), "promo: Poster": ("percent", 10)}
