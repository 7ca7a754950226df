"""The metrics API over HTTP: the simulated pop-up's KPIs, breakdowns, funnel and repeat
rate as JSON and CSV (just written, not yet folded: the API folds first), another
organization's ids as 404, bad steps and windows as 422, and the Prometheus counter."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import httpx
import pytest

from popdrop.accounts.service import ROLES
from popdrop.drops import service as drops
from popdrop.events.models import Partner
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.drops.helpers import drop_spec, owner
from tests.events.helpers import make_shop
from tests.metrics.simulation import Ids, seed

API = "/api/v1/metrics"


async def make_ids(client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant) -> Ids:
    shop = await make_shop(client, tenant, ctx.clock.now())
    async with ctx.db.transaction() as session:
        drop = await drops.create_drop(
            session,
            ctx.signer,
            owner(tenant),
            drop_spec(event_id=shop.event_id),
            now=ctx.clock.now(),
        )
        partner = Partner(org_id=tenant.org_id, event_id=shop.event_id, name="Corner café")
        session.add(partner)
        await session.flush()
        ids = Ids(shop.event_id, shop.event_id + 1000, drop.id, partner.id, shop.lane_id, 99_999)
    return ids


@pytest.fixture
async def pop_up(app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant) -> Ids:
    ids = await make_ids(app_client, ctx, tenant)
    async with ctx.db.transaction() as session:
        await seed(session, tenant.org_id, ids, None)
    return ids


def csv_rows(response: httpx.Response) -> list[list[str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    return list(csv.reader(io.StringIO(response.text)))


def ratio_of(found: dict[str, Any]) -> tuple[int, int]:
    return found["numerator"], found["denominator"]


async def test_kpis_as_json_and_csv(
    app_client: httpx.AsyncClient, tenant: Tenant, pop_up: Ids
) -> None:
    got = await app_client.get(f"{API}/kpis?event_id={pop_up.event}", headers=tenant.headers)
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["scope"]["event_id"] == pop_up.event
    assert body["scope"]["timezone"] == "Europe/Berlin"
    k = body["kpis"]
    assert k["counts"]["message_sent"] == 12 and k["counts"]["visit"] == 6
    assert ratio_of(k["message_click"]) == (6, 12) and k["message_click"]["value"] == 0.5
    assert ratio_of(k["chat_rsvp"]) == (2, 4) and ratio_of(k["visit_purchase"]) == (5, 6)
    assert k["nps"]["score"] == 25 and k["nps"]["n"] == 8
    assert {r["currency"]: r["value"] for r in k["revenue"]} == {"EUR": 9000, "USD": 5000}

    window = await app_client.get(
        f"{API}/kpis",
        params={"since": "2026-12-05T14:00:00Z", "until": "2026-12-05T15:00:00Z"},
        headers=tenant.headers,
    )
    assert window.json()["kpis"]["counts"]["visit"] == 3

    as_csv = await app_client.get(
        f"{API}/kpis?event_id={pop_up.event}&format=csv", headers=tenant.headers
    )
    rows = csv_rows(as_csv)
    assert rows[0] == ["metric", "currency", "numerator", "denominator", "value"]
    assert ["message_click", "", "6", "12", "0.5"] in rows
    assert ["revenue", "EUR", "9800", "800", "9000"] in rows
    assert ["nps", "", "2", "8", "25.0"] in rows
    by_accept = await app_client.get(
        f"{API}/kpis?event_id={pop_up.event}", headers={**tenant.headers, "accept": "text/csv"}
    )
    assert csv_rows(by_accept) == rows


async def test_breakdowns_funnel_and_repeat(
    app_client: httpx.AsyncClient, tenant: Tenant, pop_up: Ids
) -> None:
    hours = await app_client.get(
        f"{API}/breakdowns?by=hour&event_id={pop_up.event}", headers=tenant.headers
    )
    assert hours.status_code == 200, hours.text
    rows = {r["key"]: r for r in hours.json()["rows"]}
    assert ratio_of(rows["15"]["visit_purchase"]) == (3, 3)  # 14:xx UTC in Berlin
    variants = await app_client.get(
        f"{API}/breakdowns?by=variant&drop_id={pop_up.drop}&format=csv", headers=tenant.headers
    )
    assert ["A", "message_click", "4", "6", "0.6666666666666666"] in csv_rows(variants)

    funnel = await app_client.get(
        f"{API}/funnel",
        params={"event_id": pop_up.event, "window_hours": 72, "breakdown": "segment"},
        headers=tenant.headers,
    )
    assert funnel.status_code == 200, funnel.text
    found = funnel.json()["funnel"]
    assert [s["persons"] for s in found["steps"]] == [12, 6, 6, 4, 4]
    assert {g["key"]: g["steps"][-1]["persons"] for g in found["groups"]} == {
        "hot": 4,
        "warm": 0,
        "cold": 0,
    }
    chat = await app_client.get(
        f"{API}/funnel",
        params={"event_id": pop_up.event, "steps": "chat_started,rsvp,visit", "format": "csv"},
        headers=tenant.headers,
    )
    assert [r[3] for r in csv_rows(chat)[1:4]] == ["4", "2", "2"]

    repeat = await app_client.get(
        f"{API}/repeat?event_id={pop_up.event}&days=7", headers=tenant.headers
    )
    assert ratio_of(repeat.json()["repeat"]["rate"]) == (2, 5)


async def test_another_organizations_ids_are_not_found(
    app_client: httpx.AsyncClient, ctx: AppContext, pop_up: Ids
) -> None:
    stranger = await make_tenant(ctx)
    for url in (
        f"{API}/kpis?event_id={pop_up.event}",
        f"{API}/kpis?drop_id={pop_up.drop}&format=csv",
        f"{API}/kpis?partner_id={pop_up.partner}",
        f"{API}/breakdowns?by=lane&event_id={pop_up.event}",
        f"{API}/funnel?event_id={pop_up.event}",
        f"{API}/repeat?drop_id={pop_up.drop}",
    ):
        got = await app_client.get(url, headers=stranger.headers)
        assert got.status_code == 404, (url, got.text)
        assert got.json()["reason"] == "not_found"
    # Its own organization-wide figures hold none of the first's events.
    mine = await app_client.get(f"{API}/kpis", headers=stranger.headers)
    assert mine.json()["kpis"]["counts"] == {}
    partner = await make_tenant(ctx, scopes=ROLES["partner"])
    refused = await app_client.get(f"{API}/kpis", headers=partner.headers)
    assert refused.status_code == 403


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("funnel?event_id={e}&steps=message_sent,nope", "steps"),
        ("funnel?event_id={e}&steps=visit", "steps"),
        ("funnel?event_id={e}&window_hours=0", "window_hours"),
        ("funnel?event_id={e}&window_hours=100000", "window_hours"),
        ("funnel?steps=visit,order_paid", "event_id"),
        ("kpis?since=2026-12-06T00:00:00Z&until=2026-12-05T00:00:00Z", "since"),
        ("breakdowns?by=hour&tz=Mars/Olympus", "tz"),
        ("breakdowns?by=hour&tz=Europe", "tz"),  # a directory of the zone database
        ("kpis?since=0001-01-01T00:00:00%2B05:00", "since"),
        ("repeat?event_id={e}&days=0", "days"),
    ],
)
async def test_bad_requests_get_a_reason(
    app_client: httpx.AsyncClient, tenant: Tenant, pop_up: Ids, query: str, field: str
) -> None:
    got = await app_client.get(f"{API}/{query.format(e=pop_up.event)}", headers=tenant.headers)
    assert got.status_code == 422, got.text
    body = got.json()
    assert body["reason"] == "invalid_request" and body["field"] == field, body


async def test_bad_breakdown_names_are_refused(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    got = await app_client.get(f"{API}/breakdowns?by=weekday", headers=tenant.headers)
    assert got.status_code == 422 and got.json()["reason"] == "invalid_request"


def counter(text: str, kind: str, channel: str) -> float:
    pattern = rf'popdrop_funnel_events_total\{{channel="{channel}",kind="{kind}"\}} (\S+)'
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


async def test_folded_events_are_counted_for_prometheus(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    before = (await app_client.get("/metrics")).text
    ids = await make_ids(app_client, ctx, tenant)
    async with ctx.db.transaction() as session:
        await seed(session, tenant.org_id, ids, None)
    await app_client.get(f"{API}/kpis", headers=tenant.headers)  # folds
    after = (await app_client.get("/metrics")).text
    assert counter(after, "message_sent", "email") - counter(before, "message_sent", "email") == 7
    assert counter(after, "visit", "none") - counter(before, "visit", "none") == 6
