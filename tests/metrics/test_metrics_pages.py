"""The insights pages over ASGI: the simulated pop-up's tiles, funnel bars and breakdown
tables as a host sees them, its CSV downloads, the event page's link, and refusals (another
organization's event, a partner login, a bad funnel step)."""

from __future__ import annotations

import csv
import io
import re

import httpx
import pytest

from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.events.test_pages import HTML, login
from tests.metrics.simulation import Ids, seed
from tests.metrics.test_metrics_api import make_ids


@pytest.fixture
async def pop_up(app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant) -> Ids:
    ids = await make_ids(app_client, ctx, tenant)
    async with ctx.db.transaction() as session:
        await seed(session, tenant.org_id, ids, None)
    await login(app_client, ctx, tenant, "host")
    return ids


def tile(html: str, name: str) -> str:
    match = re.search(rf'id="kpi-{name}" data-value="([^"]*)"', html)
    assert match, f"no tile {name}"
    return match.group(1)


async def test_host_reads_an_events_insights(app_client: httpx.AsyncClient, pop_up: Ids) -> None:
    event_page = await app_client.get(f"/events/{pop_up.event}", headers=HTML)
    assert f'href="/insights/events/{pop_up.event}"' in event_page.text

    page = await app_client.get(f"/insights/events/{pop_up.event}", headers=HTML)
    assert page.status_code == 200, page.text
    html = page.text
    assert tile(html, "message_click") == "50.0 %"
    assert tile(html, "rsvp_visit") == "85.7 %"  # 6 / 7
    assert tile(html, "average_checkout_EUR") == "26.67 EUR"  # 80.00 / 3
    assert tile(html, "revenue_EUR") == "90.00 EUR"
    assert tile(html, "nps") == "+25"
    assert "n = 8 · 95 % CI -29 to +66" in html
    assert tile(html, "repeat_rate") == "60.0 %"  # 1, 3 and 2 again within 30 days
    persons = re.findall(r'data-kind="(\w+)" data-persons="(\d+)"', html)
    assert persons == [
        ("message_sent", "12"),
        ("message_clicked", "6"),
        ("rsvp", "6"),
        ("visit", "4"),
        ("order_paid", "4"),
    ]
    assert "Median time from the first step to the last: 5 h 43 min" in html
    assert 'id="by-hour"' in html and 'data-key="15"' in html and "15:00" in html
    assert "Front desk" in html  # the lane's name, not its id
    for by in ("channel", "segment", "variant", "lane"):
        assert f'href="/insights/events/{pop_up.event}/by-{by}.csv"' in html

    narrow = await app_client.get(
        f"/insights/events/{pop_up.event}",
        params={"steps": "chat_started,rsvp,visit", "window_hours": "24"},
        headers=HTML,
    )
    assert re.findall(r'data-persons="(\d+)"', narrow.text) == ["4", "2", "2"]
    assert "funnel.csv?steps=chat_started%2Crsvp%2Cvisit&amp;window_hours=24" in narrow.text


async def test_csv_downloads_match_the_page(app_client: httpx.AsyncClient, pop_up: Ids) -> None:
    base = f"/insights/events/{pop_up.event}"
    kpis = await app_client.get(f"{base}/kpis.csv")
    assert kpis.status_code == 200 and kpis.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(kpis.text)))
    assert ["rsvp_visit", "", "6", "7", str(6 / 7)] in rows
    funnel = await app_client.get(f"{base}/funnel.csv?window_hours=6")
    assert [r[3] for r in csv.reader(io.StringIO(funnel.text))][1:] == ["12", "6", "6", "4", "3"]
    lanes = await app_client.get(f"{base}/by-lane.csv")
    assert [str(pop_up.lane1), "visit_purchase", "3", "3", "1.0"] in list(
        csv.reader(io.StringIO(lanes.text))
    )
    drop = await app_client.get(f"/insights/drops/{pop_up.drop}/by-variant.csv")
    assert ["B", "message_click", "2", "6", str(2 / 6)] in list(csv.reader(io.StringIO(drop.text)))
    assert (await app_client.get(f"{base}/nothing.csv")).status_code == 404


async def test_drop_insights(app_client: httpx.AsyncClient, pop_up: Ids) -> None:
    page = await app_client.get(f"/insights/drops/{pop_up.drop}", headers=HTML)
    assert page.status_code == 200, page.text
    assert tile(page.text, "click_rsvp") == "83.3 %"  # 5 of 6 clicks RSVP'd by link
    assert "Saturday drop" in page.text


async def test_refusals(app_client: httpx.AsyncClient, ctx: AppContext, pop_up: Ids) -> None:
    bad = await app_client.get(
        f"/insights/events/{pop_up.event}?steps=message_sent,teleported", headers=HTML
    )
    assert bad.status_code == 422 and "teleported" in bad.text
    late = await app_client.get(f"/insights/events/{pop_up.event}?since=yesterday", headers=HTML)
    assert late.status_code == 422
    other = await make_tenant(ctx)
    async with httpx.AsyncClient(transport=app_client._transport, base_url="http://test") as c:
        await login(c, ctx, other, "owner")
        for url in (f"/insights/events/{pop_up.event}", f"/insights/drops/{pop_up.drop}/kpis.csv"):
            assert (await c.get(url, headers=HTML)).status_code == 404
    async with httpx.AsyncClient(transport=app_client._transport, base_url="http://test") as c:
        await login(c, ctx, other, "partner")
        assert (await c.get(f"/insights/events/{pop_up.event}", headers=HTML)).status_code == 403
