"""The seed test says why a seed was not delivered: the provider's own text is in the
seed report (API) and beside "not delivered" on the drop page, whose seed table stays
inside its card at 1280 px however long the checked links are. The seed test goes
through the app's own SMTP transport to an aiosmtpd relay with STARTTLS off and no login
(`POPDROP_SMTP_STARTTLS=false`, the plain local relay)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import update

from popdrop.drops import service as drops
from popdrop.drops.models import Drop
from popdrop.web.context import AppContext
from tests.audience.test_pages import HTML, login
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import Tenant
from tests.drops.helpers import drop_spec, owner
from tests.outbound.test_smtp_plain import PlainRelay, running

GONE = "gone@popdrop.test"  # the relay refuses it: 550 user unknown
SEED = "seed@popdrop.test"
STATIC = Path(__file__).parents[2] / "src" / "popdrop" / "web" / "static"


async def create_drop(ctx: AppContext, tenant: Tenant, seeds: list[str]) -> int:
    async with ctx.db.transaction() as session:
        drop = await drops.create_drop(
            session, ctx.signer, owner(tenant), drop_spec(seed_list=seeds), now=ctx.clock.now()
        )
        return drop.id


async def test_a_refused_seed_shows_the_servers_text_in_the_report_and_on_the_page(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
) -> None:
    with running(PlainRelay()) as (peer, controller):
        await seed_test_through_the_relay(app_client, ctx, tenant, peer, controller)


async def seed_test_through_the_relay(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    peer: PlainRelay,
    controller: Controller,
) -> None:
    ctx.settings = ctx.settings.model_copy(
        update={
            "mail_transport": "smtp",
            "smtp_host": controller.hostname,
            "smtp_port": controller.port,
            "smtp_starttls": False,
        }
    )
    drop_id = await create_drop(ctx, tenant, [SEED, GONE])

    tested = await app_client.post(f"/api/v1/drops/{drop_id}/seed-test", headers=tenant.headers)
    assert tested.status_code == 200, tested.text
    body = tested.json()
    by_seed = {entry["seed"]: entry for entry in body["seed_report"]}
    assert body["seed_status"] == "failed"
    assert by_seed[SEED]["delivered"] is True and "error" not in by_seed[SEED]
    refused = "550 5.1.1 <gone@popdrop.test>: Recipient address rejected: User unknown"
    assert by_seed[GONE]["delivered"] is False and by_seed[GONE]["error"] == refused
    assert [rcpts for _from, rcpts, _raw in peer.messages] == [[SEED]]  # the plain relay

    await login(app_client, ctx, tenant, "owner")
    page = await app_client.get(f"/drops/{drop_id}", headers=HTML)
    start = page.text.index('id="seed"')
    seed_card = page.text[start : page.text.index("</section>", start)]
    assert "not delivered" in seed_card
    assert (
        '<span class="seed-error" data-seed-error>550 5.1.1 &lt;gone@popdrop.test&gt;' in seed_card
    )


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium")
async def test_the_seed_table_stays_inside_its_card_at_1280px(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, shots: Path
) -> None:
    from playwright.async_api import Route, async_playwright

    drop_id = await create_drop(ctx, tenant, [SEED])
    long_url = "https://pop.example/r/" + "x" * 240
    entry: dict[str, Any] = {
        "seed": "a-rather-long-seed-address-for-testing@example-company.test",
        "variant": "A",
        "channel": "email",
        "delivered": False,
        "error": "451 4.3.0 " + "Temporary-failure-with-no-spaces-" * 6,
        "links": [{"url": long_url, "ok": True, "detail": "HTTP 200"}] * 3,
        "voucher": "valid",
        "ok": False,
    }
    async with ctx.db.transaction() as session:
        await session.execute(
            update(Drop)
            .where(Drop.id == drop_id)
            .values(
                seed_report=json.dumps([entry, {**entry, "variant": "B"}]), seed_status="failed"
            )
        )
    await login(app_client, ctx, tenant, "owner")
    page_html = (await app_client.get(f"/drops/{drop_id}", headers=HTML)).text

    async def serve(route: Route) -> None:
        path = route.request.url.split("popdrop.test", 1)[1].split("?")[0]
        if path.startswith("/static/") and (STATIC / path[len("/static/") :]).is_file():
            kind = "text/css" if path.endswith(".css") else "application/javascript"
            await route.fulfill(
                body=(STATIC / path[len("/static/") :]).read_bytes(), content_type=kind
            )
        elif path == f"/drops/{drop_id}":
            await route.fulfill(body=page_html, content_type="text/html")
        else:
            await route.fulfill(status=404, body="")

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.route("http://popdrop.test/**", serve)
            await page.goto(f"http://popdrop.test/drops/{drop_id}")
            card = page.locator("#seed")
            await card.scroll_into_view_if_needed()
            await card.screenshot(path=str(shots / "seed-table-1280.png"))
            sizes = await page.evaluate(
                """() => {
                  const card = document.querySelector('#seed').getBoundingClientRect();
                  const scroller = document.querySelector('#seed .table-scroll');
                  const cells = [...document.querySelectorAll('#seed td')]
                    .map(td => td.getBoundingClientRect().right);
                  return {page: document.documentElement.scrollWidth, card: card.right,
                          scroll: scroller.scrollWidth, box: scroller.clientWidth,
                          cells: Math.max(...cells)};
                }"""
            )
        finally:
            await browser.close()
    assert sizes["page"] <= 1280, sizes  # no sideways scrolling of the page
    assert sizes["scroll"] <= sizes["box"], sizes  # the table wraps, it does not scroll
    assert sizes["cells"] <= sizes["card"], sizes  # every cell inside the card
