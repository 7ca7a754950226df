"""Every KPI, breakdown and funnel step of the simulated pop-up (tests/metrics/simulation.py)
equals the value worked out by hand from its story, on SQLite and PostgreSQL."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest

from popdrop.core.errors import PopdropError
from popdrop.metrics import funnels, kpis, rollups
from popdrop.metrics.kpis import BreakdownRow, Ratio, Scope
from popdrop.web.context import AppContext
from tests.conftest import Tenant, make_tenant
from tests.metrics.simulation import DAY, Ids, at, seed

IDS = Ids(event=501, event2=502, drop=601, partner=701, lane1=801, lane2=802)


@pytest.fixture
async def seeded(ctx: AppContext, tenant: Tenant) -> Tenant:
    other = await make_tenant(ctx)
    async with ctx.db.transaction() as session:
        await seed(session, tenant.org_id, IDS, other.org_id)
    await rollups.fold_pending(ctx.db)
    return tenant


def is_ratio(found: Ratio, numerator: int, denominator: int) -> bool:
    expected = numerator / denominator if denominator else None
    return (found.numerator, found.denominator, found.value) == (
        numerator,
        denominator,
        expected,
    )


async def test_every_kpi_of_the_event(ctx: AppContext, seeded: Tenant) -> None:
    async with ctx.db.reader() as session:
        found = await kpis.kpis(session, Scope(seeded.org_id, event_id=IDS.event))
    assert found.counts == {
        "chat_started": 4,
        "message_clicked": 6,
        "message_sent": 12,
        "order_paid": 4,
        "order_refunded": 1,
        "pos_refund": 1,
        "pos_sale": 1,
        "rsvp": 7,
        "sample_given": 6,
        "survey_answered": 8,
        "visit": 6,
    }
    assert is_ratio(found.message_click, 6, 12)
    assert is_ratio(found.chat_rsvp, 2, 4)  # 3 and 9 RSVP'd in the chat
    assert is_ratio(found.click_rsvp, 5, 6)  # 1, 2, 4, 7, 8 by link
    assert is_ratio(found.rsvp_visit, 6, 7)
    assert is_ratio(found.visit_purchase, 5, 6)  # 4 orders + 1 POS sale
    assert is_ratio(found.sample_purchase, 5, 6)
    checkout = {m.currency: (m.numerator, m.denominator, m.value) for m in found.average_checkout}
    assert checkout == {"EUR": (8000, 3, 8000 / 3), "USD": (5000, 1, 5000.0)}
    revenue = {r.currency: (r.paid, r.pos, r.refunded, r.value) for r in found.revenue}
    assert revenue == {"EUR": (8000, 1800, 800, 9000), "USD": (5000, 0, 0, 5000)}
    per_visit = {m.currency: (m.numerator, m.denominator, m.value) for m in found.cost_per_visit}
    assert per_visit == {"EUR": (800, 6, 800 / 6)}
    nps = found.nps
    assert (nps.promoters, nps.passives, nps.detractors, nps.n) == (4, 2, 2, 8)
    assert nps.score == pytest.approx(25.0)
    # Adjusted Wald: n + 3 = 11, p_P = 4.75 / 11, p_D = 2.75 / 11, centre 100 * 2 / 11.
    p_p, p_d = 4.75 / 11, 2.75 / 11
    margin = 100 * 1.959964 * math.sqrt((p_p + p_d - (p_p - p_d) ** 2) / 11)
    centre = 100 * 2 / 11
    assert nps.ci_low == pytest.approx(centre - margin)
    assert nps.ci_high == pytest.approx(centre + margin)
    assert (round(nps.ci_low), round(nps.ci_high)) == (-29, 66)


async def test_scopes_narrow_by_drop_partner_window_and_org(
    ctx: AppContext, seeded: Tenant
) -> None:
    org = seeded.org_id
    async with ctx.db.reader() as session:
        drop = await kpis.kpis(session, Scope(org, drop_id=IDS.drop))
        partner = await kpis.kpis(session, Scope(org, partner_id=IDS.partner))
        hourly = await kpis.kpis(session, Scope(org, since=at(14, 0), until=at(15, 0)))
        minutes = await kpis.kpis(
            session, Scope(org, event_id=IDS.event, since=at(14, 30), until=at(15, 6))
        )
        whole = await kpis.kpis(session, Scope(org))
        empty = await kpis.kpis(session, Scope(org, event_id=999_999))
    assert drop.counts == {"message_clicked": 6, "message_sent": 12, "rsvp": 5}
    assert is_ratio(drop.click_rsvp, 5, 6) and is_ratio(drop.rsvp_visit, 0, 5)
    assert partner.counts == {"pos_refund": 1, "pos_sale": 1, "sample_given": 1}
    assert [(r.currency, r.value) for r in partner.revenue] == [("EUR", 1500)]
    # 14:00-15:00: visits of 1, 2, 4; orders of 1, 2, 4; samples.
    assert (hourly.counts["visit"], hourly.counts["order_paid"]) == (3, 3)
    assert hourly.counts["sample_given"] == 6
    # 14:30-15:06 (minute rollups): visits 4, 3, 9; orders 2, 4.
    assert minutes.counts == {"order_paid": 2, "visit": 3}
    # The whole organization: the repeat orders under event2 too, nothing of the other org.
    assert whole.counts["order_paid"] == 7
    assert [(r.currency, r.paid) for r in whole.revenue] == [("EUR", 14200), ("USD", 5000)]
    assert empty.counts == {} and empty.message_click.value is None and empty.nps.score is None


def row(rows: list[BreakdownRow], key: str) -> BreakdownRow:
    return next(r for r in rows if r.key == key)


async def test_breakdowns(ctx: AppContext, seeded: Tenant) -> None:
    scope = Scope(seeded.org_id, event_id=IDS.event)
    async with ctx.db.reader() as session:
        by_variant = await kpis.breakdown(session, scope, "variant")
        by_segment = await kpis.breakdown(session, scope, "segment")
        by_channel = await kpis.breakdown(session, scope, "channel")
        by_lane = await kpis.breakdown(session, scope, "lane")
        berlin = await kpis.breakdown(session, scope, "hour", tz="Europe/Berlin")
        kolkata = await kpis.breakdown(session, scope, "hour", tz="Asia/Kolkata")
        with pytest.raises(PopdropError) as bad_zone:
            await kpis.breakdown(session, scope, "hour", tz="Mars/Olympus")
    assert bad_zone.value.status == 422
    assert [r.key for r in by_variant] == ["A", "B", ""]
    assert is_ratio(row(by_variant, "A").message_click, 4, 6)
    assert is_ratio(row(by_variant, "B").message_click, 2, 6)
    assert is_ratio(row(by_variant, "A").click_rsvp, 3, 4)  # 1, 2, 4 (3 went by chat)
    assert is_ratio(row(by_variant, "B").click_rsvp, 2, 2)
    assert [r.key for r in by_segment] == ["cold", "hot", "warm", ""]
    assert is_ratio(row(by_segment, "hot").message_click, 4, 4)
    assert is_ratio(row(by_segment, "warm").message_click, 2, 4)
    assert is_ratio(row(by_segment, "cold").message_click, 0, 4)
    assert is_ratio(row(by_channel, "email").message_click, 5, 7)
    assert is_ratio(row(by_channel, "sms").message_click, 1, 5)
    assert is_ratio(row(by_channel, "chat").chat_rsvp, 2, 4)
    assert is_ratio(row(by_lane, str(IDS.lane1)).visit_purchase, 3, 3)
    assert is_ratio(row(by_lane, str(IDS.lane2)).visit_purchase, 2, 3)
    assert [r.key for r in berlin] == [str(h) for h in range(24)]
    # Visits and sales at 14:xx UTC are 15:xx in Berlin (UTC+1 in December).
    assert is_ratio(row(berlin, "15").visit_purchase, 3, 3)
    assert is_ratio(row(berlin, "16").visit_purchase, 2, 3)
    assert row(berlin, "10").counts == {"message_sent": 12, "message_clicked": 6}
    assert row(berlin, "14").counts == {}
    # UTC+5:30 splits the UTC hours: read from the minute rollups.
    assert is_ratio(row(kolkata, "19").visit_purchase, 1, 2)
    assert is_ratio(row(kolkata, "20").visit_purchase, 4, 3)
    assert is_ratio(row(kolkata, "21").visit_purchase, 0, 1)


STEPS = ["message_sent", "message_clicked", "rsvp", "visit", "order_paid"]


async def test_funnel_steps_breakdowns_and_time_to_convert(ctx: AppContext, seeded: Tenant) -> None:
    org = seeded.org_id
    async with ctx.db.reader() as session:
        wide = await funnels.funnel(session, org, STEPS, event_id=IDS.event, window_hours=72)
        narrow = await funnels.funnel(session, org, STEPS, event_id=IDS.event, window_hours=6)
        by_variant = await funnels.funnel(
            session, org, STEPS, event_id=IDS.event, window_hours=72, breakdown="variant"
        )
        by_segment = await funnels.funnel(
            session, org, STEPS, event_id=IDS.event, window_hours=72, breakdown="segment"
        )
        chat = await funnels.funnel(
            session, org, ["chat_started", "rsvp", "visit"], event_id=IDS.event, window_hours=24
        )
        by_drop = await funnels.funnel(session, org, STEPS[:3], drop_id=IDS.drop, window_hours=72)
    assert [s.persons for s in wide.steps] == [12, 6, 6, 4, 4]
    assert [s.kind for s in wide.steps] == STEPS
    assert wide.steps[1].from_previous.value == 0.5 and wide.steps[4].from_first.value == 4 / 12
    # 6 hours from the message: 3 paid 6h08m after it.
    assert [s.persons for s in narrow.steps] == [12, 6, 6, 4, 3]
    # Sent → paid: 5h20m, 5h39m, 5h47m, 6h08m; the median is between the middle two.
    assert wide.median_seconds_to_convert == (5 * 3600 + 43 * 60)
    groups = {g.key: [s.persons for s in g.steps] for g in by_variant.groups}
    assert groups == {"A": [6, 4, 4, 4, 4], "B": [6, 2, 2, 0, 0]}
    groups = {g.key: [s.persons for s in g.steps] for g in by_segment.groups}
    assert groups == {"hot": [4, 4, 4, 4, 4], "warm": [4, 2, 2, 0, 0], "cold": [4, 0, 0, 0, 0]}
    assert [s.persons for s in chat.steps] == [4, 2, 2]
    assert [s.persons for s in by_drop.steps] == [12, 6, 5]  # 3 RSVP'd by chat (no drop tag)


async def test_repeat_rate_and_repeat_chat_purchases(ctx: AppContext, seeded: Tenant) -> None:
    async with ctx.db.reader() as session:
        week = await funnels.repeat_rate(session, seeded.org_id, event_id=IDS.event, days=7)
        fortnight = await funnels.repeat_rate(session, seeded.org_id, event_id=IDS.event, days=14)
    # Buyers 1, 2, 3, 4, 9; 1 again after 2 days, 3 after 3 days (after a chat), 2 after 10.
    assert is_ratio(week.rate, 2, 5)
    assert is_ratio(week.chat_repeats, 1, 2)
    assert is_ratio(fortnight.rate, 3, 5)
    assert is_ratio(fortnight.chat_repeats, 1, 3)


async def test_funnel_refuses_bad_steps_and_windows(ctx: AppContext, tenant: Tenant) -> None:
    async with ctx.db.reader() as session:
        for steps, window in ((["message_sent", "nope"], 24), (["visit"], 24), (STEPS, 0)):
            with pytest.raises(PopdropError) as refused:
                await funnels.funnel(session, tenant.org_id, steps, event_id=1, window_hours=window)
            assert refused.value.status == 422


def test_nps_interval_edges() -> None:
    assert kpis.nps_of(5, 0, 0).score == 100 and kpis.nps_of(5, 0, 0).ci_high == 100
    assert kpis.nps_of(0, 0, 0).n == 0
    assert DAY + timedelta(hours=1) == at(1, 0)
