"""The partner ROI report (issue 18): figures from the rollups and the attribution ledger,
the same in JSON, CSV, the page and the PDF's extracted text; a partner login or a link
opens only its own partner's report; an expired link is a 410 page; small counts (and
what derives from them) are suppressed everywhere (SQLite, and PostgreSQL when set)."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pypdf

from popdrop.accounts import service as accounts
from popdrop.accounts.service import ROLES
from popdrop.attribution import service as attribution
from popdrop.core import links
from popdrop.core.clock import FrozenClock
from popdrop.metrics import log
from popdrop.metrics.kinds import Kind
from popdrop.usecases.partner_report import hidden_parts
from popdrop.web.context import AppContext
from tests.attribution.helpers import flushed, make_link, visit
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import post
from tests.events.test_pages import HTML, csrf_of, login

EUR = "EUR"


@dataclass
class Scene:
    event_id: int
    mine: int
    theirs: int
    hour: datetime  # the first hour with sales, UTC

    def path(self, partner_id: int | None = None) -> str:
        return f"/reports/events/{self.event_id}/partners/{partner_id or self.mine}"

    def api(self, partner_id: int | None = None) -> str:
        return f"/api/v1{self.path(partner_id)}"


def partner_login(tenant: Tenant) -> str:
    return f"partner-{tenant.slug}@pages.test"  # the email `login(..., "partner")` uses


async def _log(ctx: AppContext, org_id: int, entries: list[tuple[Any, ...]]) -> None:
    """(kind, at, partner, value, currency) rows, each with the event's tag."""
    async with ctx.db.transaction() as session:
        for event_id, kind, at, partner_id, value, currency in entries:
            await log.record(
                session,
                org_id,
                kind,
                at=at,
                tags=log.Tags(event_id=event_id, partner_id=partner_id),
                person=log.contact_person(1),
                value=value,
                currency=currency,
            )


async def _used(ctx: AppContext, tenant: Tenant, event_id: int, code: str, sale_ids: range) -> None:
    async with ctx.db.transaction() as session:
        for n in sale_ids:
            # Sale ids are unique across organizations in the ledger: one range per tenant.
            sale_id = tenant.org_id * 1_000_000 + n
            touches = await attribution.attribute_sale(
                session,
                org_id=tenant.org_id,
                sale_kind="pos_sale",
                sale_id=sale_id,
                event_id=event_id,
                amount_minor=1000,
                currency=EUR,
                occurred_at=ctx.clock.now(),
                codes=[code],
            )
            assert touches, "the code was not attributed"


async def scene(client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant) -> Scene:
    """Known truth for "mine": 5 online orders of 20.00 and 7 till sales of 10.00 over
    three hours (8, 3, 1), 5 refunds of 5.00, 10 samples of 1.50, 12 check-ins at the
    event; its codes used on 6 and 2 sales, its link clicked 6 times. "Theirs" has bigger
    figures that must never show in mine."""
    now = ctx.clock.now()
    event = await post(
        client,
        tenant,
        "/api/v1/events",
        {
            "slug": "report-pop-up",
            "title": "Report pop-up",
            "timezone": "Europe/Berlin",
            "starts_at": (now + timedelta(days=1)).isoformat(),
            "ends_at": (now + timedelta(days=2)).isoformat(),
        },
    )
    e = event["id"]
    mine = await post(
        client,
        tenant,
        f"/api/v1/events/{e}/partners",
        {"name": "Corner café", "contact_email": partner_login(tenant)},
    )
    theirs = await post(
        client,
        tenant,
        f"/api/v1/events/{e}/partners",
        {"name": "Rival bakery", "contact_email": "kim@rival.example"},
    )
    m, t = mine["id"], theirs["id"]
    h1 = (now - timedelta(hours=5)).replace(minute=0, second=0, microsecond=0)
    h2, h3 = h1 + timedelta(hours=1), h1 + timedelta(hours=2)
    rows: list[tuple[Any, ...]] = []
    for i, (hour, kind, value) in enumerate(
        [(h1, Kind.POS_SALE, 1000)] * 5
        + [(h1, Kind.ORDER_PAID, 2000)] * 3
        + [(h2, Kind.POS_SALE, 1000)] * 2
        + [(h2, Kind.ORDER_PAID, 2000)]
        + [(h3, Kind.ORDER_PAID, 2000)]
    ):
        rows.append((e, kind, hour + timedelta(minutes=i), m, value, EUR))
    rows += [(e, Kind.ORDER_REFUNDED, h3 + timedelta(minutes=30), m, 500, EUR)] * 5
    rows += [(e, Kind.SAMPLE_GIVEN, h1 + timedelta(minutes=i), m, 150, EUR) for i in range(10)]
    rows += [(e, Kind.VISIT, h1 + timedelta(minutes=i), m, 0, "") for i in range(3)]
    rows += [(e, Kind.VISIT, h2 + timedelta(minutes=i), None, 0, "") for i in range(9)]
    rows += [(e, Kind.POS_SALE, h2, t, 9999, EUR)] * 20
    rows += [(e, Kind.SAMPLE_GIVEN, h2, t, 777, EUR)] * 6
    rows += [(e + 1000, Kind.POS_SALE, h2, m, 5555, EUR)] * 6  # another event's tag
    await _log(ctx, tenant.org_id, rows)

    counter = await post(
        client, tenant, "/api/v1/promo-codes", {"label": "Counter", "partner_id": m}
    )
    flyer = await post(client, tenant, "/api/v1/promo-codes", {"label": "Flyer", "partner_id": m})
    rival = await post(client, tenant, "/api/v1/promo-codes", {"label": "Rival", "partner_id": t})
    await _used(ctx, tenant, e, counter["code"], range(1, 7))
    await _used(ctx, tenant, e, flyer["code"], range(7, 9))
    await _used(ctx, tenant, e, rival["code"], range(20, 27))
    link = await make_link(
        client,
        tenant,
        {"kind": "event", "id": e},
        tags={"partner_id": m, "channel": "poster", "utm_campaign": "window"},
    )
    for _ in range(6):
        assert (await visit(client, link["slug"])).status_code == 302
    await flushed(ctx)
    return Scene(e, m, t, h1)


EXPECTED_COUNTS = {
    "event_visits": "12",
    "sales": "12",
    "online_sales": "5",
    "pos_sales": "7",
    "refunds": "5",
    "samples": "10",
    "codes_used": "8",
    "link_clicks": "6",
}
EXPECTED_MONEY = {
    "revenue": "170.00 EUR",
    "online_revenue": "100.00 EUR",
    "pos_revenue": "70.00 EUR",
    "refunded": "25.00 EUR",
    "net_revenue": "145.00 EUR",
    "average_basket": "14.17 EUR",  # 170.00 / 12, rounded half up
    "sample_costs": "15.00 EUR",
    "roi": "+866.7 %",  # (145.00 - 15.00) / 15.00
}


def figures(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["key"]: f for f in report["figures"]}


def pdf_text(body: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(body))
    return "\n".join(page.extract_text() for page in reader.pages)


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


async def share(
    client: httpx.AsyncClient, headers: dict[str, str], scene_: Scene, partner: int | None = None
) -> str:
    made = await client.post(scene_.api(partner) + "/link", json={"days": 30}, headers=headers)
    assert made.status_code == 201, made.text
    return urlsplit(str(made.json()["url"])).path


async def test_json_csv_page_and_pdf_show_the_same_figures(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    s = await scene(app_client, ctx, tenant)
    answer = await app_client.get(s.api(), headers=tenant.headers)
    assert answer.status_code == 200, answer.text
    report = answer.json()
    got = figures(report)
    assert report["partner_name"] == "Corner café" and report["threshold"] == 5
    assert {k: got[k]["display"] for k in EXPECTED_COUNTS} == EXPECTED_COUNTS
    assert {k: got[k]["display"] for k in EXPECTED_MONEY} == EXPECTED_MONEY
    assert got["revenue"]["value"] == 17_000 and got["net_revenue"]["value"] == 14_500
    assert got["roi"]["value"] == round(130 / 15, 4)
    assert "visits" not in got  # a check-in knows no partner: only the event's footfall
    hidden_hour = report["sales_by_hour"][1]
    assert hidden_hour == {**hidden_hour, "sales": None, "suppressed": True, "display": "< 5"}
    assert [(b["display"]) for b in report["sales_by_hour"]] == ["8", "< 5", "< 5"]
    assert report["sales_by_hour"][0]["hour"].startswith(s.hour.strftime("%Y-%m-%dT%H:00"))
    codes = {c["label"]: c["uses"]["display"] for c in report["codes"]}
    # Flyer's 2 uses are suppressed; Counter's 6 would then be 8 - 2: hidden too.
    assert codes == {"Counter": "hidden", "Flyer": "< 5"}
    assert [link["clicks"]["display"] for link in report["links"]] == ["6"]
    assert (
        "Rival" not in answer.text
        and "kim@" not in answer.text
        and "@pages.test" not in answer.text
    )

    url = await share(app_client, tenant.headers, s)
    table = await app_client.get(url + ".csv")
    assert table.status_code == 200 and table.headers["content-type"].startswith("text/csv")
    rows = csv_rows(table.text)
    in_csv = {r["key"]: r for r in rows if r["section"] == "figure"}
    assert set(in_csv) == set(got)
    for key, figure in got.items():
        cell = in_csv[key]["value"]
        if figure["suppressed"]:
            assert cell == figure["display"], key
        elif figure["unit"] == "money":
            assert Decimal(cell) * 100 == figure["value"], key
            assert in_csv[key]["currency"] == figure["currency"]
        elif figure["unit"] == "ratio":
            assert float(cell) == figure["value"], key
        else:
            assert int(cell) == figure["value"], key
    assert [r["value"] for r in rows if r["section"] == "sales_by_hour"] == ["8", "< 5", "< 5"]

    page = await app_client.get(url, headers=HTML)
    assert page.status_code == 200, page.text
    assert page.headers["cache-control"] == "no-store"
    for shown in (*EXPECTED_MONEY.values(), '<svg xmlns="http://www.w3.org/2000/svg"'):
        assert shown in page.text, shown
    assert 'id="share-form"' not in page.text  # a link's reader cannot mint more links

    pdf = await app_client.get(url + ".pdf")
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    text = pdf_text(pdf.content)
    assert "Corner café" in text and "Report pop-up" in text
    for label, shown in (
        ("Sales revenue", "170.00 EUR"),
        ("Attributed revenue (after refunds)", "145.00 EUR"),
        ("Average basket", "14.17 EUR"),
        ("Sample costs", "15.00 EUR"),
        ("ROI", "+866.7 %"),
    ):
        assert f"{label} {shown}" in text, (label, text)
    # Flyer's 2 uses, and Counter's 6 hidden with them (the codes table).
    assert re.search(r"Flyer\s+\S+\s+< 5", text) and re.search(r"Counter\s+\S+\s+hidden", text), (
        text
    )
    assert "Rival" not in text and "99.99" not in text and "55.55" not in text


async def test_a_partner_login_opens_its_own_report_only(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    s = await scene(app_client, ctx, tenant)
    await login(app_client, ctx, tenant, "partner")
    home = await app_client.get("/home", headers=HTML)  # where a partner lands
    assert f'href="{s.path()}"' in home.text and f'href="{s.path(s.theirs)}"' not in home.text
    page = await app_client.get(s.path(), headers=HTML)
    assert page.status_code == 200, page.text
    assert "Corner café" in page.text and "170.00 EUR" in page.text
    for path in (s.path(s.theirs), s.path(s.theirs) + ".pdf", s.path(s.theirs) + ".csv"):
        other = await app_client.get(path, headers=HTML)
        assert other.status_code == 404, path
        assert "Rival" not in other.text
    assert (await app_client.get(s.path() + ".csv")).status_code == 200

    shared = await app_client.post(
        s.path() + "/link", data={"csrf": csrf_of(page.text), "days": "7"}, headers=HTML
    )
    assert shared.status_code == 201, shared.text
    start = shared.text.index('id="share-url">') + len('id="share-url">')
    url = urlsplit(shared.text[start : shared.text.index("<", start)]).path
    refused = await app_client.post(
        s.path(s.theirs) + "/link", data={"csrf": csrf_of(page.text), "days": "7"}, headers=HTML
    )
    assert refused.status_code == 404

    app_client.cookies.clear()  # the link opens without a login, for 7 days
    opened = await app_client.get(url, headers=HTML)
    assert opened.status_code == 200 and "170.00 EUR" in opened.text
    clock.advance(timedelta(days=7, seconds=1))
    gone = await app_client.get(url, headers=HTML)
    assert gone.status_code == 410 and "link_expired" in gone.text
    assert (await app_client.get(url + ".pdf")).status_code == 410


async def test_another_partners_token_or_link_cannot_open_it(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    s = await scene(app_client, ctx, tenant)
    async with ctx.db.transaction() as session:
        _, token = await accounts.create_token(
            session,
            ctx.signer,
            org_id=tenant.org_id,
            name="rival",
            scopes=ROLES["partner"],
            created_by="test",
            now=ctx.clock.now(),
            acts_for="kim@rival.example",
        )
    rival = {"Authorization": f"Bearer {token}"}
    assert (await app_client.get(s.api(s.theirs), headers=rival)).status_code == 200
    mine = await app_client.get(s.api(), headers=rival)
    assert (mine.status_code, mine.json()["reason"]) == (404, "not_found")
    assert (await app_client.post(s.api() + "/link", headers=rival)).status_code == 404

    # Their link opens their report; a token edited to name mine is not a link at all.
    url = await share(app_client, rival, s, s.theirs)
    theirs = await app_client.get(url, headers=HTML)
    assert theirs.status_code == 200 and "Rival bakery" in theirs.text
    assert "Corner café" not in theirs.text
    token_part = url.removeprefix("/reports/")
    forged = links.partner_report_url(
        ctx.signer.__class__(b"not the server's key" * 2),
        "",
        links.PartnerReportLink(
            tenant.org_id, s.event_id, s.mine, ctx.clock.now() + timedelta(days=1)
        ),
    )
    for bad in (forged, f"/reports/{token_part[:-3]}xyz", "/reports/nonsense"):
        answer = await app_client.get(bad, headers=HTML)
        assert answer.status_code == 400 and "link_invalid" in answer.text, bad
        assert "Corner café" not in answer.text

    async with ctx.db.transaction() as session:
        _, plain = await accounts.create_token(
            session,
            ctx.signer,
            org_id=tenant.org_id,
            name="door",
            scopes=ROLES["volunteer"],
            created_by="test",
            now=ctx.clock.now(),
        )
    door = await app_client.get(s.api(), headers={"Authorization": f"Bearer {plain}"})
    assert (door.status_code, door.json()["reason"]) == (403, "forbidden")  # no roi:read
    other_org = await make_tenant(ctx)
    foreign = await app_client.get(s.api(), headers=other_org.headers)
    assert foreign.status_code == 404
    assert (await app_client.get(s.api(), headers={})).status_code == 401


async def test_a_report_of_few_sales_hides_them_in_page_pdf_and_csv(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    now = ctx.clock.now()
    event = await post(
        app_client,
        tenant,
        "/api/v1/events",
        {
            "slug": "quiet",
            "title": "Quiet night",
            "timezone": "UTC",
            "starts_at": (now + timedelta(days=1)).isoformat(),
            "ends_at": (now + timedelta(days=2)).isoformat(),
        },
    )
    partner = await post(
        app_client, tenant, f"/api/v1/events/{event['id']}/partners", {"name": "Kiosk"}
    )
    at = now - timedelta(hours=1)
    await _log(
        ctx,
        tenant.org_id,
        [(event["id"], Kind.POS_SALE, at, partner["id"], 1234, EUR)] * 3
        + [(event["id"], Kind.SAMPLE_GIVEN, at, partner["id"], 250, EUR)] * 6,
    )
    s = Scene(event["id"], partner["id"], partner["id"], at)
    report = (await app_client.get(s.api(), headers=tenant.headers)).json()
    got = figures(report)
    assert got["sales"]["display"] == "< 5" and got["sales"]["value"] is None
    for key in ("revenue", "pos_revenue", "net_revenue", "average_basket", "roi"):
        assert (got[key]["display"], got[key]["value"]) == ("hidden", None), key
    assert got["sample_costs"]["display"] == "15.00 EUR"  # 6 samples: shown
    assert got["samples"]["display"] == "6"

    url = await share(app_client, tenant.headers, s)
    page = (await app_client.get(url, headers=HTML)).text
    pdf = pdf_text((await app_client.get(url + ".pdf")).content)
    table = (await app_client.get(url + ".csv")).text
    for rendered in (page, pdf, table):
        assert "< 5" in rendered or "&lt; 5" in rendered
        for secret in ("37.02", "12.34", ">3<", ",3\n"):  # the amounts and the count
            assert secret not in rendered, secret
    assert "Sales\n< 5" in pdf or "Sales < 5" in pdf, pdf
    in_csv = {r["key"]: r["value"] for r in csv_rows(table) if r["section"] == "figure"}
    assert in_csv["sales"] == "< 5" and in_csv["revenue"] == "hidden"


async def test_the_host_event_page_links_each_partners_report(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    s = await scene(app_client, ctx, tenant)
    await login(app_client, ctx, tenant, "owner")
    page = await app_client.get(f"/events/{s.event_id}", headers=HTML)
    assert page.status_code == 200, page.text
    assert f'href="{s.path()}"' in page.text and f'href="{s.path(s.theirs)}"' in page.text
    report = await app_client.get(s.path(s.theirs), headers=HTML)
    assert report.status_code == 200 and "Rival bakery" in report.text
    assert (
        await app_client.get(f"/reports/events/{s.event_id}/partners/999999")
    ).status_code == 404


def test_a_single_hidden_part_of_a_shown_total_takes_another_with_it() -> None:
    assert hidden_parts([8, 3, 0], total_shown=True) == [True, True, False]
    assert hidden_parts([8, 3, 2], total_shown=True) == [False, True, True]
    assert hidden_parts([9, 7, 3], total_shown=True) == [False, True, True]
    assert hidden_parts([3], total_shown=False) == [True]
    assert hidden_parts([0, 5, 6], total_shown=True) == [False, False, False]


def test_the_pdf_renderer_loads_no_file(tmp_path: Path) -> None:
    from popdrop.usecases.partner_report_pages import _pdf_bytes

    image = tmp_path / "dot.svg"
    image.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="90" height="20">'
        '<text y="15">LEAKED</text></svg>'
    )
    pdf = _pdf_bytes(f'<p>report</p><img src="{image.as_uri()}" alt="">')
    text = pdf_text(pdf)
    assert "report" in text and "LEAKED" not in text
