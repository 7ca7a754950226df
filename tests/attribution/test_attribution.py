"""Attribution of sales: first and last touch by click and by code, code alone,
idempotency, refunds; promo codes from the vault; partners see only their own."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
from sqlalchemy import func, select

from popdrop.accounts.service import ROLES, Principal
from popdrop.attribution import service
from popdrop.attribution.models import SaleTouch
from popdrop.attribution.schemas import LinkTags, LinkTarget
from popdrop.core.clock import FrozenClock
from popdrop.vouchers.models import Voucher
from popdrop.web.context import AppContext
from tests.attribution.helpers import flushed, make_link, visit
from tests.checkin.helpers import make_event
from tests.conftest import Tenant


async def add_partner(client: httpx.AsyncClient, tenant: Tenant, event_id: int, email: str) -> int:
    response = await client.post(
        f"/api/v1/events/{event_id}/partners",
        json={"name": email.split("@")[0], "contact_email": email},
        headers=tenant.headers,
    )
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


async def promo(client: httpx.AsyncClient, tenant: Tenant, **fields: object) -> dict[str, object]:
    response = await client.post(
        "/api/v1/promo-codes", json={"label": "poster", **fields}, headers=tenant.headers
    )
    assert response.status_code == 201, response.text
    data: dict[str, object] = response.json()
    return data


async def click(client: httpx.AsyncClient, slug: str) -> str:
    response = await visit(client, slug)
    assert response.status_code == 302
    return parse_qs(urlsplit(response.headers["location"]).query)["pd_click"][0]


async def attribute(ctx: AppContext, tenant: Tenant, sale_id: int, **kw: object) -> list[SaleTouch]:
    values: dict[str, object] = {
        "org_id": tenant.org_id,
        "sale_kind": "order",
        "sale_id": sale_id,
        "event_id": None,
        "amount_minor": 1000,
        "currency": "EUR",
        "occurred_at": ctx.clock.now(),
        **kw,
    }
    async with ctx.db.transaction() as session:
        return await service.attribute_sale(session, **values)  # type: ignore[arg-type]


async def test_first_and_last_touch_by_click(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    email = await make_link(
        app_client,
        tenant,
        {"kind": "event", "id": event_id},
        tags={"drop_id": 7, "variant": "A", "channel": "email"},
    )
    sms = await make_link(
        app_client,
        tenant,
        {"kind": "url", "url": "https://shop.example/"},
        tags={"drop_id": 7, "variant": "B", "channel": "sms", "conversation_id": 42},
    )
    first = await click(app_client, email["slug"])
    clock.advance(timedelta(hours=3))
    last = await click(app_client, sms["slug"])
    clock.advance(timedelta(minutes=5))
    await flushed(ctx)

    touches = await attribute(
        ctx, tenant, 9001, click_ids=[last, first, "unknown-click-id"], codes=["NOT-A-CODE"]
    )

    assert [(t.touch, t.via, t.click_id) for t in touches] == [
        ("first", "click", first),
        ("last", "click", last),
    ]
    assert (touches[0].variant, touches[0].channel, touches[0].event_id) == ("A", "email", event_id)
    assert (touches[1].variant, touches[1].conversation_id, touches[1].link_id) == (
        "B",
        42,
        sms["id"],
    )


async def test_a_code_alone_attributes_and_a_code_at_the_till_is_the_last_touch(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    partner_id = await add_partner(app_client, tenant, event_id, "till@corner.example")
    code = await promo(
        app_client, tenant, partner_id=partner_id, channel="poster", variant="B", drop_id=7
    )
    assert code["event_id"] == event_id  # taken from the partner
    printed = str(code["code"])

    (alone_first, alone_last) = await attribute(
        ctx, tenant, 9002, sale_kind="pos_sale", codes=[printed.lower().replace("-", " ")]
    )
    assert (alone_first.via, alone_last.via) == ("code", "code")
    assert alone_first.promo_code_id == alone_last.promo_code_id == code["id"]
    assert (alone_last.partner_id, alone_last.channel, alone_last.variant) == (
        partner_id,
        "poster",
        "B",
    )

    link = await make_link(app_client, tenant, {"kind": "url", "url": "https://shop.example/"})
    clicked = await click(app_client, link["slug"])
    clock.advance(timedelta(minutes=30))
    await flushed(ctx)
    first, last = await attribute(ctx, tenant, 9003, codes=[printed], click_ids=[clicked])
    assert (first.via, first.click_id) == ("click", clicked)
    assert (last.via, last.promo_code_id) == ("code", code["id"])


async def test_attribution_is_idempotent_and_ignores_other_orgs_and_old_clicks(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    from tests.conftest import make_tenant

    other = await make_tenant(ctx)
    theirs = await promo(app_client, other)
    mine = await promo(app_client, tenant)
    link = await make_link(app_client, tenant, {"kind": "url", "url": "https://shop.example/"})
    old_click = await click(app_client, link["slug"])
    clock.advance(service.CLICK_WINDOW + timedelta(minutes=1))
    await flushed(ctx)

    nothing = await attribute(ctx, tenant, 9004, codes=[str(theirs["code"])], click_ids=[old_click])
    assert nothing == []

    once = await attribute(ctx, tenant, 9005, codes=[str(mine["code"])])
    again = await attribute(ctx, tenant, 9005, codes=[], click_ids=[old_click], amount_minor=5)
    assert [(t.id, t.via, t.amount_minor) for t in again] == [
        (t.id, t.via, t.amount_minor) for t in once
    ]
    async with ctx.db.reader() as session:
        rows = await session.scalar(
            select(func.count()).where(SaleTouch.sale_kind == "order", SaleTouch.sale_id == 9005)
        )
    assert rows == 2


async def test_reverse_sale_adds_refunds_up_to_the_amount(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    code = await promo(app_client, tenant)
    await attribute(ctx, tenant, 9006, sale_kind="pos_sale", codes=[str(code["code"])])
    for amount, total in ((300, 300), (900, 1000)):  # capped at the sale's amount
        async with ctx.db.transaction() as session:
            await service.reverse_sale(
                session,
                org_id=tenant.org_id,
                sale_kind="pos_sale",
                sale_id=9006,
                amount_minor=amount,
            )
        async with ctx.db.reader() as session:
            touches = await service.touches_for(
                session, org_id=tenant.org_id, sale_kind="pos_sale", sale_id=9006
            )
        assert [t.reversed_minor for t in touches] == [total, total]

    seen = await app_client.get("/api/v1/attribution/sales/pos_sale/9006", headers=tenant.headers)
    assert seen.status_code == 200
    assert [(t["touch"], t["reversed_minor"]) for t in seen.json()] == [
        ("first", 1000),
        ("last", 1000),
    ]


async def test_promo_code_is_a_multi_use_vault_code(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    code = await promo(app_client, tenant, max_uses=500, discount_kind="percent", discount_value=10)
    async with ctx.db.reader() as session:
        voucher = await session.get(Voucher, code["voucher_id"])
    assert voucher is not None and voucher.max_uses == 500
    assert str(code["code"]).encode() not in bytes(voucher.code_hash)
    for _ in range(2):  # multi-use: the till can redeem it again and again
        redeemed = await app_client.post(
            "/api/v1/vouchers/redeem", json={"code": code["code"]}, headers=tenant.headers
        )
        assert redeemed.status_code == 200, redeemed.text


async def test_partner_sees_only_its_own_links_codes_and_touches(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    mine = await add_partner(app_client, tenant, event_id, "Shop@Corner.example")
    theirs = await add_partner(app_client, tenant, event_id, "other@else.example")
    target = {"kind": "url", "url": "https://shop.example/"}
    my_link = await make_link(app_client, tenant, target, tags={"partner_id": mine})
    their_link = await make_link(app_client, tenant, target, tags={"partner_id": theirs})
    await make_link(app_client, tenant, target)
    my_code = await promo(app_client, tenant, partner_id=mine)
    their_code = await promo(app_client, tenant, partner_id=theirs)
    await attribute(ctx, tenant, 9007, sale_kind="pos_sale", codes=[str(their_code["code"])])

    partner = Principal(tenant.org_id, "user:shop@corner.example", "partner", ROLES["partner"])
    async with ctx.db.reader() as session:
        links_seen = await service.list_links(session, partner)
        codes_seen = await service.list_promo_codes(session, partner)
        own = await service.get_link(session, partner, my_link["id"])
        touches = await service.sale_touches(session, partner, "pos_sale", 9007)
        try:
            await service.get_link(session, partner, their_link["id"])
            raise AssertionError("a partner read another partner's link")
        except Exception as error:
            assert getattr(error, "reason", None) == "not_found"
    assert [link.id for link in links_seen] == [my_link["id"]] == [own.id]
    assert [c.id for c in codes_seen] == [my_code["id"]]
    assert touches == []


async def test_short_url_for_reuses_one_link_per_target_and_tags(
    ctx: AppContext, tenant: Tenant
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    target = LinkTarget(kind="event", id=event_id)  # type: ignore[arg-type]
    tags = LinkTags(drop_id=3, variant="A", channel="sms", utm_source="popdrop")  # type: ignore[arg-type]
    urls = []
    for variant in ("A", "A", "B"):
        async with ctx.db.transaction() as session:
            urls.append(
                await service.short_url_for(
                    session,
                    org_id=tenant.org_id,
                    target=target,
                    tags=tags.model_copy(update={"variant": variant}),
                    now=ctx.clock.now(),
                    base_url="https://pd.example",
                )
            )
    assert urls[0] == urls[1] != urls[2]
    assert urls[0].startswith("https://pd.example/s/")


async def test_a_code_of_a_tagged_batch_attributes_to_its_promo_code(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    from tests.conftest import issue

    batch, plaintext = await issue(app_client, tenant, quantity=3)
    tagged = await promo(app_client, tenant, batch_id=batch["id"], variant="A", drop_id=11)
    assert tagged["code"] is None  # no code of its own: the batch's codes stand for it

    assert await attribute(ctx, tenant, 9008, codes=[plaintext[1]]) == []  # needs the signer
    first, last = await attribute(ctx, tenant, 9009, codes=[plaintext[2]], signer=ctx.signer)
    assert first.promo_code_id == last.promo_code_id == tagged["id"]
    assert (last.via, last.variant, last.drop_id) == ("code", "A", 11)


async def test_concurrent_attributions_of_one_sale_write_one_pair(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    code = await promo(app_client, tenant)
    link = await make_link(app_client, tenant, {"kind": "url", "url": "https://shop.example/"})
    clicked = await click(app_client, link["slug"])
    await flushed(ctx)

    answers = await asyncio.gather(
        *(
            attribute(ctx, tenant, 9010, codes=[str(code["code"])], click_ids=[clicked])
            for _ in range(12)
        )
    )
    assert {tuple((t.touch, t.via) for t in a) for a in answers} == {
        (("first", "click"), ("last", "code"))
    }
    async with ctx.db.reader() as session:
        rows = await session.scalar(
            select(func.count()).where(SaleTouch.sale_kind == "order", SaleTouch.sale_id == 9010)
        )
    assert rows == 2
