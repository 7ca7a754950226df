"""The war room: per-minute series and tiles read from the funnel rollups of the log rows
written here, the thresholds that turn a tile red (and say why), the pages and their
pause / resume buttons, another organization's drop or event a 404, and the live stream's
snapshot; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.drops import service as drops
from popdrop.drops.models import Drop
from popdrop.metrics import log
from popdrop.metrics.kinds import Kind
from popdrop.usecases import war_room
from popdrop.web.context import AppContext
from tests.audience.test_pages import HTML, csrf_of, login
from tests.conftest import SECRET, Tenant, make_tenant
from tests.drops.helpers import drop_spec, owner
from tests.events.helpers import Shop, make_shop, post


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    # A short stream lifetime: the stream test reads a whole (ended) stream.
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        secret_key=SECRET,
        log_requests=False,
        log_level="WARNING",
        redis_url=None,
        stream_max_seconds=0.5,
        _env_file=None,  # type: ignore[call-arg]
    )


def frozen(ctx: AppContext) -> FrozenClock:
    assert isinstance(ctx.clock, FrozenClock)
    return ctx.clock


async def sending_drop(ctx: AppContext, tenant: Tenant, event_id: int | None) -> int:
    """A drop that started now (no recipients: the figures come from the log rows)."""
    now = ctx.clock.now()
    async with ctx.db.transaction() as session:
        drop = await drops.create_drop(
            session, ctx.signer, owner(tenant), drop_spec(event_id=event_id), now=now
        )
        await drops.override_seed(session, owner(tenant), drop.id, reason="test", now=now)
        await drops.start_drop(session, owner(tenant), drop.id, now=now)
        return drop.id


async def write(
    ctx: AppContext,
    tenant: Tenant,
    kind: Kind,
    n: int,
    at: datetime,
    *,
    drop_id: int | None = None,
    event_id: int | None = None,
    channel: str = "email",
    label: str = "",
    value: int = 0,
    currency: str = "",
) -> None:
    async with ctx.db.transaction() as session:
        await log.record_many(
            session,
            [
                log.Entry(
                    tenant.org_id,
                    kind,
                    at + timedelta(milliseconds=i),
                    log.Tags(channel=channel, event_id=event_id, drop_id=drop_id, label=label),
                    person=log.contact_person(i + 1),
                    value=value,
                    currency=currency,
                )
                for i in range(n)
            ],
        )


async def shop_and_drop(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> tuple[Shop, int]:
    clock = frozen(ctx)
    clock.set(clock.now().replace(second=5, microsecond=0))  # rows land in known minutes
    shop = await make_shop(app_client, tenant, clock.now(), units=40)
    drop_id = await sending_drop(ctx, tenant, shop.event_id)
    return shop, drop_id


async def test_a_drops_series_tiles_and_red_thresholds_come_from_the_rollups(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    clock = frozen(ctx)
    shop, drop_id = await shop_and_drop(app_client, ctx, tenant)
    start = clock.now()
    tags: dict[str, Any] = {"drop_id": drop_id, "event_id": shop.event_id}
    minute_two = start + timedelta(minutes=1)
    await write(ctx, tenant, Kind.MESSAGE_SENT, 60, start, **tags)
    await write(ctx, tenant, Kind.MESSAGE_SENT, 60, minute_two, **tags)
    await write(ctx, tenant, Kind.MESSAGE_DELIVERED, 110, minute_two, **tags)
    # 4 hard bounces of 120 (3.3 %): under the drop's 5 % threshold. Soft bounces are
    # not what auto-pause counts; with them it would read 6.7 %.
    await write(ctx, tenant, Kind.MESSAGE_BOUNCED, 4, minute_two, label="hard", **tags)
    await write(ctx, tenant, Kind.MESSAGE_BOUNCED, 4, minute_two, label="soft", **tags)
    await write(ctx, tenant, Kind.MESSAGE_COMPLAINED, 1, minute_two, **tags)  # 0.8 %
    await write(ctx, tenant, Kind.MESSAGE_CLICKED, 12, minute_two, **tags)
    await write(ctx, tenant, Kind.RSVP, 3, minute_two, **tags)
    await write(ctx, tenant, Kind.VISIT, 2, minute_two, **tags)
    await write(ctx, tenant, Kind.ORDER_PAID, 4, minute_two, value=1500, currency="EUR", **tags)
    await write(ctx, tenant, Kind.POS_SALE, 1, minute_two, value=500, currency="EUR", **tags)
    await write(ctx, tenant, Kind.PAYMENT_FAILED, 2, minute_two, **tags)  # 2 of 6 attempts
    # Neither another drop's messages nor another organization's count here.
    await write(ctx, tenant, Kind.MESSAGE_SENT, 50, minute_two, drop_id=drop_id + 1000)
    other = await make_tenant(ctx)
    await write(ctx, other, Kind.MESSAGE_SENT, 70, minute_two, drop_id=drop_id)
    clock.advance(timedelta(minutes=1, seconds=30))

    room = await war_room.snapshot_of_drop(ctx.db, owner(tenant), drop_id, now=clock.now())
    assert room.scope == "drop" and room.title == "Saturday drop" and room.since_start
    assert room.zone == "Europe/Berlin"
    # Ten minutes at least, ending with the drop's two.
    assert len(room.minutes) == war_room.MIN_MINUTES
    assert room.minutes[-2:] == [start.replace(second=0), minute_two.replace(second=0)]
    assert room.series["sent"][-2:] == [60, 60] and sum(room.series["sent"][:-2]) == 0
    assert room.series["bounced"][-2:] == [0, 8]
    assert room.totals == {
        "sent": 120,
        "delivered": 110,
        "bounced": 8,
        "complaints": 1,
        "clicks": 12,
        "rsvps": 3,
        "checkins": 2,
        "payments": 5,
        "payment_failures": 2,
    }
    assert room.revenue == {"EUR": 6500}
    bounced = room.tile("bounced")
    assert not bounced.alert and bounced.detail == "6.7 % of sent (4 soft)"
    assert room.tile("delivered").detail == "91.7 % of sent"
    assert room.tile("payments").detail == "65.00 EUR"
    complaints = room.tile("complaints")
    assert complaints.alert
    assert complaints.reason == "complaint rate 0.8 % (1 of 120) is above 0.3%"
    failures = room.tile("payment_failures")
    assert failures.alert and failures.detail == "33.3 % of 6 attempts"  # a till sale is none
    assert failures.reason == "payment failure rate 33.3 % (2 of 6 attempts) is above 20%"
    assert not room.tile("stock").alert  # 40 of 40 left
    assert room.alerts == [complaints.reason, failures.reason]
    [state] = room.drops
    assert (state.status, state.auto_paused, state.actions) == ("sending", False, ("pause",))

    # Three more hard bounces: 7 of 120 (5.8 %) is the auto-pause's verdict, and the tile's.
    await write(ctx, tenant, Kind.MESSAGE_BOUNCED, 3, clock.now(), label="hard", **tags)
    room = await war_room.snapshot_of_drop(ctx.db, owner(tenant), drop_id, now=clock.now())
    bounced = room.tile("bounced")
    assert bounced.alert and bounced.value == 11
    assert bounced.reason == (
        "bounce rate 5.8% over the last 10 minutes (7 of 120) is above the auto-pause "
        "threshold 5.0%"
    )
    # Past the auto-pause window the bounces no longer make a verdict (the figures stay).
    clock.advance(timedelta(minutes=15))
    room = await war_room.snapshot_of_drop(ctx.db, owner(tenant), drop_id, now=clock.now())
    assert not room.tile("bounced").alert and room.totals["bounced"] == 11


async def test_few_attempts_and_few_messages_make_no_verdict(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    clock = frozen(ctx)
    shop, drop_id = await shop_and_drop(app_client, ctx, tenant)
    tags: dict[str, Any] = {"drop_id": drop_id, "event_id": shop.event_id}
    # 20 of 99 bounced is far above 5 %, but auto-pause wants 100 messages first.
    await write(ctx, tenant, Kind.MESSAGE_SENT, 99, clock.now(), **tags)
    await write(ctx, tenant, Kind.MESSAGE_BOUNCED, 20, clock.now(), label="hard", **tags)
    # 3 failures of 4 attempts: too few attempts to say.
    await write(ctx, tenant, Kind.ORDER_PAID, 1, clock.now(), value=900, currency="EUR", **tags)
    await write(ctx, tenant, Kind.PAYMENT_FAILED, 3, clock.now(), **tags)
    room = await war_room.snapshot_of_drop(ctx.db, owner(tenant), drop_id, now=clock.now())
    assert not room.tile("bounced").alert and not room.tile("payment_failures").alert
    await write(ctx, tenant, Kind.MESSAGE_SENT, 1, clock.now(), **tags)
    await write(ctx, tenant, Kind.PAYMENT_FAILED, 1, clock.now(), **tags)
    room = await war_room.snapshot_of_drop(ctx.db, owner(tenant), drop_id, now=clock.now())
    assert room.tile("bounced").alert and room.tile("payment_failures").alert


def test_nearly_sold_out_is_ten_percent_or_three_units() -> None:
    assert war_room.nearly_sold_out(3, 1000) and not war_room.nearly_sold_out(4, 20)
    assert war_room.nearly_sold_out(10, 100) and not war_room.nearly_sold_out(11, 100)
    assert war_room.nearly_sold_out(0, 5) and not war_room.nearly_sold_out(0, 0)


async def test_an_events_war_room_sums_its_drops_and_reads_the_stock(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    clock = frozen(ctx)
    shop, first = await shop_and_drop(app_client, ctx, tenant)
    second = await sending_drop(ctx, tenant, shop.event_id)
    for drop_id in (first, second):
        await write(ctx, tenant, Kind.MESSAGE_SENT, 30, clock.now(), drop_id=drop_id,
                    event_id=shop.event_id)  # fmt: skip
    await write(ctx, tenant, Kind.VISIT, 5, clock.now(), event_id=shop.event_id)
    room = await war_room.snapshot_of_event(ctx.db, owner(tenant), shop.event_id, now=clock.now())
    assert room.scope == "event" and room.title == "Weekend pop-up" and not room.since_start
    assert len(room.minutes) == war_room.WINDOW_MINUTES  # the last two hours
    assert room.totals["sent"] == 60 and room.totals["checkins"] == 5
    assert [d.id for d in room.drops] == [second, first]
    [tote] = room.stock
    assert (tote.title, tote.total, tote.left, tote.low) == ("Tote bag", 40, 40, False)

    # Holds take 37 of 40: three left is nearly sold out.
    await post(app_client, tenant, "/api/v1/holds",
               {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "qty": 37})  # fmt: skip
    room = await war_room.snapshot_of_event(ctx.db, owner(tenant), shop.event_id, now=clock.now())
    stock = room.tile("stock")
    assert stock.alert and stock.value == 3
    assert stock.reason == "nearly sold out: Tote bag (3 of 40 left)"
    # Once the holds expire the units are back.
    clock.advance(timedelta(minutes=11))
    room = await war_room.snapshot_of_event(ctx.db, owner(tenant), shop.event_id, now=clock.now())
    assert not room.tile("stock").alert


# ---------------------------------------------------------------- pages and stream


def data_of(page: str) -> dict[str, Any]:
    found = re.search(r'<script type="application/json" id="war-room-data">(.*?)</script>', page)
    assert found, "the page has no data block"
    data: dict[str, Any] = json.loads(found.group(1))
    return data


def tile_of(page: str, key: str) -> str:
    found = re.search(rf'<li class="tile[^"]*" data-tile="{key}".*?</li>', page, re.S)
    assert found, key
    return found.group(0)


async def test_the_pages_show_the_room_pause_and_resume_and_hide_other_orgs(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    clock = frozen(ctx)
    shop, drop_id = await shop_and_drop(app_client, ctx, tenant)
    await write(ctx, tenant, Kind.MESSAGE_SENT, 120, clock.now(), drop_id=drop_id,
                event_id=shop.event_id)  # fmt: skip
    await write(ctx, tenant, Kind.MESSAGE_BOUNCED, 12, clock.now(), drop_id=drop_id,
                event_id=shop.event_id, label="hard")  # fmt: skip
    await login(app_client, ctx, tenant, "owner")

    drop_page = await app_client.get(f"/drops/{drop_id}", headers=HTML)
    assert f'href="/war-room/drops/{drop_id}"' in drop_page.text
    event_page = await app_client.get(f"/events/{shop.event_id}", headers=HTML)
    assert f'href="/war-room/events/{shop.event_id}"' in event_page.text

    page = await app_client.get(f"/war-room/drops/{drop_id}", headers=HTML)
    assert page.status_code == 200
    assert 'src="/static/vendor/uplot/uPlot.iife.min.js"' in page.text
    assert f'data-stream="/war-room/drops/{drop_id}/stream"' in page.text
    assert "<script>" not in page.text  # CSP: script-src 'self'
    bounced = tile_of(page.text, "bounced")
    assert 'data-alert="yes"' in bounced and "(12 of 120)" in bounced
    assert 'data-alert="no"' in tile_of(page.text, "complaints")
    data = data_of(page.text)
    assert data["totals"]["sent"] == 120 and len(data["minutes"]) == len(data["series"]["sent"])
    assert [g["key"] for g in data["groups"]] == ["messages", "conversions", "payments"]
    assert re.search(r'id="paused-banner"[^>]* hidden', page.text)

    # Pause from the war room: the drops service's move, with who did it.
    paused = await app_client.post(
        f"/war-room/drops/{drop_id}/pause", data={"csrf": csrf_of(page.text)}, headers=HTML
    )
    assert paused.status_code == 303
    assert paused.headers["location"] == f"/war-room/drops/{drop_id}?done=paused"
    async with ctx.db.reader() as session:
        drop = await session.scalar(select(Drop).where(Drop.id == drop_id))
        assert drop is not None and drop.status == "paused"
        assert drop.paused_reason == f"paused by owner-{tenant.slug}@audience.test"
    page = await app_client.get(paused.headers["location"], headers=HTML)
    assert not re.search(r'id="paused-banner"[^>]* hidden', page.text)
    assert "paused by owner-" in page.text
    assert data_of(page.text)["drops"][0]["actions"] == ["resume"]
    # Without the CSRF field nothing moves.
    refused = await app_client.post(f"/war-room/drops/{drop_id}/resume", data={}, headers=HTML)
    assert refused.status_code == 403
    # Resume from the event's war room leads back to it.
    room = await app_client.get(f"/war-room/events/{shop.event_id}", headers=HTML)
    assert room.status_code == 200 and "Weekend pop-up" in room.text
    assert 'data-tile="stock"' in room.text
    resumed = await app_client.post(
        f"/war-room/drops/{drop_id}/resume",
        data={"csrf": csrf_of(room.text), "event": str(shop.event_id)},
        headers=HTML,
    )
    assert resumed.headers["location"] == f"/war-room/events/{shop.event_id}?done=resumed"
    async with ctx.db.reader() as session:
        assert await session.scalar(select(Drop.status).where(Drop.id == drop_id)) == "sending"

    # Another organization's operator gets a 404 for this drop, this event and their streams.
    other = await make_tenant(ctx)
    await login(app_client, ctx, other, "owner")  # the same browser, now the other's operator
    for path in (
        f"/war-room/drops/{drop_id}",
        f"/war-room/events/{shop.event_id}",
        f"/war-room/drops/{drop_id}/stream",
        f"/war-room/events/{shop.event_id}/stream",
    ):
        assert (await app_client.get(path, headers=HTML)).status_code == 404, path
    page = await app_client.get(f"/war-room/drops/{drop_id}", headers=HTML)
    assert "Saturday drop" not in page.text
    moved = await app_client.post(
        f"/war-room/drops/{drop_id}/pause", data={"csrf": csrf_of(page.text)}, headers=HTML
    )
    assert moved.status_code == 404
    async with ctx.db.reader() as session:
        assert await session.scalar(select(Drop.status).where(Drop.id == drop_id)) == "sending"


async def test_an_auto_paused_drop_says_so_and_a_volunteer_is_refused(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    _shop, drop_id = await shop_and_drop(app_client, ctx, tenant)
    reason = "auto-paused: bounce rate 9.0% over the last 10 minutes (9 of 100) is above 5.0%"
    async with ctx.db.transaction() as session:
        await drops.set_state(
            session, owner(tenant), drop_id, "pause", now=ctx.clock.now(), reason=reason
        )
    room = await war_room.snapshot_of_drop(ctx.db, owner(tenant), drop_id, now=ctx.clock.now())
    [state] = room.drops
    assert state.auto_paused and state.paused_reason == reason and state.actions == ("resume",)
    # The log's window holds nothing, yet the tile keeps the auto-pause's verdict.
    assert room.tile("bounced").alert
    assert room.tile("bounced").reason == f"Saturday drop: {reason}"
    await login(app_client, ctx, tenant, "volunteer")
    refused = await app_client.get(f"/war-room/drops/{drop_id}", headers=HTML)
    assert refused.status_code == 403


async def test_the_stream_sends_the_snapshot_then_ends(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    clock = frozen(ctx)
    shop, drop_id = await shop_and_drop(app_client, ctx, tenant)
    await write(ctx, tenant, Kind.MESSAGE_SENT, 7, clock.now(), drop_id=drop_id,
                event_id=shop.event_id)  # fmt: skip
    await login(app_client, ctx, tenant, "owner")
    for path in (f"/war-room/drops/{drop_id}/stream", f"/war-room/events/{shop.event_id}/stream"):
        stream = await app_client.get(path, headers={"accept": "text/event-stream"})
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = re.findall(r"event: (\w+)\ndata: (.*)\n\n", stream.text)
        assert events[0][0] == "snapshot"
        assert events[-1] == ("end", '{"reason": "max_lifetime"}')  # EventSource reconnects
        snapshot = json.loads(events[0][1])
        assert snapshot["totals"]["sent"] == 7
        assert snapshot["tiles"][0] == {
            "key": "sent",
            "label": "Sent",
            "value": 7,
            "display": "7",
            "detail": "since the start" if "drops" in path else "last 2 h",
            "alert": False,
            "reason": None,
        }
