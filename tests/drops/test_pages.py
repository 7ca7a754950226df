"""Drop and mailbox pages driven like a browser over ASGI: a small drop goes through the
seed test, the start button and the development mailbox, and the list, the detail page
and its per-minute chart show what happened; the state buttons, refusals with their
reason, the A/B result, the mailbox's search and paging, tenancy, and the demo's drop.
Runs on SQLite, and on PostgreSQL when POPDROP_TEST_DATABASE_URL is set."""

from __future__ import annotations

import html
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select, update

from popdrop.accounts import service as accounts
from popdrop.core.clock import FrozenClock
from popdrop.drops import abtest, outcomes
from popdrop.drops import service as drops
from popdrop.drops.models import Drop, SendRow
from popdrop.drops.pipeline import Sender
from popdrop.outbound.feedback import FeedbackEvent
from popdrop.outbound.mailbox import Mailbox
from popdrop.outbound.models import MailboxMessage
from popdrop.outbound.transports import OutboundEmail, OutboundSms
from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact
from tests.audience.test_pages import HTML, csrf_of, login
from tests.conftest import Tenant, make_tenant
from tests.drops.helpers import drop_spec, owner
from tests.events.helpers import make_shop

SEED = "seed@popdrop.test"


def counts_of(page: str, scope: str | None = None) -> dict[str, int]:
    """`data-count="name">N<` figures of the page (or of one table row / section)."""
    if scope is not None:
        start = page.index(scope)
        page = page[start : page.index("</tr>", start) if "<tr" in scope else None]
    found = re.findall(r'data-count="(\w+)"><strong>([\d,]+)</strong>', page)
    found += re.findall(r'data-count="(\w+)">([\d,]+)<', page)
    return {name: int(value.replace(",", "")) for name, value in found}


def minutes_of(page: str) -> dict[str, dict[str, int]]:
    """The chart's minutes that carry data: label → sent / delivered / bounced / clicked."""
    found: dict[str, dict[str, int]] = {}
    pattern = (
        r'data-minute="([\d:]+)" data-sent="(\d+)" data-delivered="(\d+)" '
        r'data-bounced="(\d+)" data-clicked="(\d+)"'
    )
    for label, *values in re.findall(pattern, page):
        numbers = dict(
            zip(("sent", "delivered", "bounced", "clicked"), map(int, values), strict=True)
        )
        if any(numbers.values()):
            found[label] = numbers
    return found


async def post_form(
    client: httpx.AsyncClient, url: str, page: str, **fields: str
) -> httpx.Response:
    return await client.post(url, data={"csrf": csrf_of(page), **fields}, headers=HTML)


async def create_drop(ctx: AppContext, tenant: Tenant, **overrides: Any) -> int:
    async with ctx.db.transaction() as session:
        drop = await drops.create_drop(
            session,
            ctx.signer,
            owner(tenant),
            drop_spec(seed_list=[SEED], **overrides),
            now=ctx.clock.now(),
        )
        return drop.id


async def status_of(ctx: AppContext, drop_id: int) -> str:
    async with ctx.db.reader() as session:
        return str(await session.scalar(select(Drop.status).where(Drop.id == drop_id)))


def mailbox_sender(ctx: AppContext, tenant: Tenant, batch_size: int = 200) -> Sender:
    """The send loop with the development mailbox as its transport, for one tenant."""
    mailbox = Mailbox(ctx.db, ctx.clock)
    return Sender(
        ctx.db,
        ctx.signer,
        ctx.clock,
        ctx.settings.base_url,
        email=mailbox,
        sms=mailbox,
        batch_size=batch_size,
        org_id=tenant.org_id,
    )


# ---------------------------------------------------------------- a drop, start to finish


async def test_a_small_drop_through_the_pages_and_the_mailbox(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    clock = ctx.clock
    assert isinstance(clock, FrozenClock)
    shop = await make_shop(app_client, tenant, clock.now())
    for i in range(4):
        await add_contact(app_client, tenant, email=f"fan{i}@x.io", first_name=f"Fan{i}")
    variants = drop_spec().model_dump()["variants"]
    variants[0]["content"]["email"]["default"]["text"] = (
        "Your code {{ voucher_code }}: {{ voucher_url }}"
    )
    drop_id = await create_drop(ctx, tenant, event_id=shop.event_id, variants=variants)
    await login(app_client, ctx, tenant, "owner")

    listed = await app_client.get("/drops", headers=HTML)
    assert listed.status_code == 200 and 'href="/drops"' in listed.text  # the nav link
    assert f'href="/drops/{drop_id}"' in listed.text and "Saturday drop" in listed.text
    page = await app_client.get(f"/drops/{drop_id}", headers=HTML)
    assert page.status_code == 200
    assert 'data-seed-status="untested"' in page.text and "Run seed test" in page.text

    # Start before the seed test: refused on the page, with the reason, not a 500.
    refused = await post_form(app_client, f"/drops/{drop_id}/start", page.text)
    assert refused.status_code == 409
    assert "seed_test_required" in refused.text and "Run the seed test first" in refused.text
    assert await status_of(ctx, drop_id) == "draft"

    tested = await post_form(app_client, f"/drops/{drop_id}/seed-test", page.text)
    assert tested.status_code == 303, tested.text
    page = await app_client.get(tested.headers["location"], headers=HTML)
    assert "Seed test passed" in page.text and 'data-seed-status="passed"' in page.text
    report = page.text[page.text.index('id="seed"') : page.text.index('id="ab"')]
    assert SEED in report and 'data-seed-ok="yes"' in report and 'data-seed-ok="no"' not in report
    assert f"/e/{shop.event_id}?code=" in report and "HTTP 200" in report  # each link, checked
    assert ">valid</span>" in report  # the seed voucher's dry run

    started = await post_form(app_client, f"/drops/{drop_id}/start", page.text)
    assert started.status_code == 303 and started.headers["location"].endswith("done=started")
    assert await status_of(ctx, drop_id) == "sending"

    # Two minutes of sending through the development mailbox.
    sender = mailbox_sender(ctx, tenant, batch_size=3)
    assert await sender.run_once() == 3
    clock.advance(timedelta(minutes=1))
    assert await sender.run_until_idle() == 1
    async with ctx.db.reader() as session:
        pairs = await session.execute(
            select(MailboxMessage.recipient, SendRow.message_id)
            .join(SendRow, SendRow.message_id == MailboxMessage.message_id)
            .where(SendRow.drop_id == drop_id)
        )
        message_ids = {to: message_id for to, message_id in pairs}
    assert set(message_ids) == {f"fan{i}@x.io" for i in range(4)}  # one message each
    # The mailbox delivered all four at once; the provider then says: one delivered (a
    # repeat, which keeps the first delivery time), one hard bounce.
    async with ctx.db.transaction() as session:
        await outcomes.apply_feedback(
            session,
            ctx.signer,
            tenant.org_id,
            [
                FeedbackEvent(
                    "generic", "delivered", "fan0@x.io", None, message_ids["fan0@x.io"], "", None
                ),
                FeedbackEvent(
                    "generic",
                    "hard_bounce",
                    "fan1@x.io",
                    None,
                    message_ids["fan1@x.io"],
                    "550",
                    None,
                ),
            ],
            now=clock.now(),
        )

    # fan2 opens the message in the mailbox and clicks its tracked link.
    box = await app_client.get("/mailbox", params={"q": "FAN2@"}, headers=HTML)
    assert box.status_code == 200 and 'data-total="1"' in box.text
    message_id = int(re.findall(r'data-message="(\d+)"', box.text)[0])
    shown = await app_client.get(f"/mailbox/{message_id}", headers=HTML)
    assert "fan2@x.io" in shown.text and "Hi Fan2, the drop is on" in shown.text
    tracked = re.search(r'href="(http://[^"]+/r/[^"]+)"', shown.text)
    assert tracked, shown.text
    click = await app_client.get(httpx.URL(html.unescape(tracked.group(1))).raw_path.decode())
    assert click.status_code == 302 and f"/e/{shop.event_id}?code=" in click.headers["location"]

    listed = await app_client.get("/drops", headers=HTML)
    row_counts = counts_of(listed.text, f'<tr data-drop="{drop_id}"')
    assert row_counts == {
        "frozen": 4,
        "sent": 4,
        "delivered": 3,
        "bounced": 1,
        "failed": 0,
        "clicked": 1,
    }
    assert 'aria-valuenow="100"' in listed.text and 'data-status="sending"' in listed.text

    page = await app_client.get(f"/drops/{drop_id}", headers=HTML)
    tiles = counts_of(
        page.text[page.text.index('id="progress"') : page.text.index('id="war-room"')]
    )
    assert tiles["frozen"] == 4 and tiles["sent"] == 4 and tiles["clicked"] == 1
    assert tiles["bounced"] == 1 and tiles["pending"] == 0
    chart = minutes_of(page.text)
    # Minute one: three sent and delivered; minute two: one more, the bounce, the click.
    assert list(chart.values()) == [
        {"sent": 3, "delivered": 3, "bounced": 0, "clicked": 0},
        {"sent": 1, "delivered": 1, "bounced": 1, "clicked": 1},
    ]
    assert "<svg" in page.text and "Sent 4" in page.text and "Clicked 1" in page.text


# ---------------------------------------------------------------- state buttons


async def test_pause_resume_cancel_buttons_change_the_state(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    for i in range(2):
        await add_contact(app_client, tenant, email=f"p{i}@x.io")
    drop_id = await create_drop(ctx, tenant)
    async with ctx.db.transaction() as session:
        await drops.override_seed(
            session, owner(tenant), drop_id, reason="test", now=ctx.clock.now()
        )
    await login(app_client, ctx, tenant, "owner")
    page = await app_client.get(f"/drops/{drop_id}", headers=HTML)
    assert 'data-seed-status="overridden"' in page.text and "Overridden by" in page.text
    assert (await post_form(app_client, f"/drops/{drop_id}/start", page.text)).status_code == 303

    page = await app_client.get(f"/drops/{drop_id}", headers=HTML)
    assert f'action="/drops/{drop_id}/pause"' in page.text
    assert f'action="/drops/{drop_id}/resume"' not in page.text
    paused = await post_form(app_client, f"/drops/{drop_id}/pause", page.text)
    assert paused.status_code == 303 and await status_of(ctx, drop_id) == "paused"
    page = await app_client.get(paused.headers["location"], headers=HTML)
    assert 'data-status="paused"' in page.text and "Paused: no new message" in page.text
    assert "paused by owner-" in page.text  # the reason, and who
    assert await mailbox_sender(ctx, tenant).run_until_idle() == 0  # nothing goes out

    resumed = await post_form(app_client, f"/drops/{drop_id}/resume", page.text)
    assert resumed.status_code == 303 and await status_of(ctx, drop_id) == "sending"
    assert await mailbox_sender(ctx, tenant).run_until_idle() == 2

    cancelled = await post_form(app_client, f"/drops/{drop_id}/cancel", page.text)
    assert cancelled.status_code == 303 and await status_of(ctx, drop_id) == "cancelled"
    page = await app_client.get(f"/drops/{drop_id}", headers=HTML)
    assert 'data-status="cancelled"' in page.text and 'id="actions"' not in page.text

    # A button that no longer applies (an old tab): the reason on the page, with a 409.
    again = await post_form(app_client, f"/drops/{drop_id}/resume", page.text)
    assert again.status_code == 409 and 'id="refusal"' in again.text
    assert "Cannot resume a drop that is cancelled" in again.text
    assert "invalid_transition" in again.text
    assert await status_of(ctx, drop_id) == "cancelled"
    # No CSRF field: refused, nothing changes.
    forged = await app_client.post(f"/drops/{drop_id}/pause", headers=HTML)
    assert forged.status_code == 403 and await status_of(ctx, drop_id) == "cancelled"
    unknown = await post_form(app_client, f"/drops/{drop_id}/explode", page.text)
    assert unknown.status_code == 404


async def test_a_seed_test_without_seeds_explains_itself(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    async with ctx.db.transaction() as session:
        drop = await drops.create_drop(
            session, ctx.signer, owner(tenant), drop_spec(), now=ctx.clock.now()
        )
    await login(app_client, ctx, tenant, "owner")
    page = await app_client.get(f"/drops/{drop.id}", headers=HTML)
    refused = await post_form(app_client, f"/drops/{drop.id}/seed-test", page.text)
    assert refused.status_code == 422
    assert "Seed_list: add at least one seed address" in refused.text
    assert 'data-seed-status="untested"' in refused.text


# ---------------------------------------------------------------- A/B


async def test_the_ab_result_shows_lift_p_value_and_the_fallback(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    for i in range(40):
        await add_contact(app_client, tenant, email=f"ab{i}@x.io")
    content = drop_spec().model_dump()["variants"][0]["content"]
    variants = [
        {"name": "A", "split_percent": 50, "content": content},
        {"name": "B", "split_percent": 50, "content": json.loads(json.dumps(content))},
    ]
    variants[1]["content"]["email"]["default"]["subject"] = "B: early access"
    drop_id = await create_drop(
        ctx,
        tenant,
        variants=variants,
        ab_test_fraction=1.0,
        ab_min_sample=5,
        ab_decide_after_seconds=600,
    )
    now = ctx.clock.now()
    async with ctx.db.transaction() as session:
        await drops.override_seed(session, owner(tenant), drop_id, reason="test", now=now)
        await drops.start_drop(session, owner(tenant), drop_id, now=now)
    await mailbox_sender(ctx, tenant).run_until_idle()
    # One click in A, two in B: a lift, but far from significant.
    async with ctx.db.transaction() as session:
        for variant, clicks in (("A", 1), ("B", 2)):
            ids = (
                await session.scalars(
                    select(SendRow.id)
                    .where(SendRow.drop_id == drop_id, SendRow.variant == variant)
                    .order_by(SendRow.id)
                    .limit(clicks)
                )
            ).all()
            await session.execute(update(SendRow).where(SendRow.id.in_(ids)).values(clicked_at=now))
    await login(app_client, ctx, tenant, "owner")
    before = await app_client.get(f"/drops/{drop_id}", headers=HTML)
    assert "No decision yet" in before.text and "<code>B: early access</code>" in before.text

    ctx.clock.advance(timedelta(seconds=601))  # type: ignore[attr-defined]
    async with ctx.db.transaction() as session:
        row = await session.get(Drop, drop_id)
        assert row is not None
        decision = await outcomes.decide_ab(session, row, now=ctx.clock.now())
    assert decision is not None and not decision.significant
    page = await app_client.get(f"/drops/{drop_id}", headers=HTML)
    result = page.text[page.text.index('id="ab-result"') :]
    assert "Not significant." in result and "Fallback: the control (A) goes to the rest" in result
    assert decision.lift is not None and decision.p_value is not None
    assert f"{decision.lift * 100:+.1f} %" in result
    assert f"{decision.p_value:.4f}" in result
    assert decision.confidence_interval is not None
    assert f"{decision.confidence_interval[0] * 100:+.2f} to" in result
    a, b = (
        abtest.VariantOutcome(o["variant"], o["sent"], o["converted"])
        for o in json.loads(row.ab_result or "{}")["outcomes"]
    )
    beat = abtest.probability_to_beat(a, b)
    b_row = page.text[
        page.text.index('data-variant="B"') : page.text.index(
            "</tr>", page.text.index('data-variant="B"')
        )
    ]
    assert f"{beat * 100:.1f} %" in b_row
    assert (
        '<span class="badge good">winner</span>' in page.text[page.text.index('data-variant="A"') :]
    )


# ---------------------------------------------------------------- mailbox


async def test_the_mailbox_lists_searches_pages_and_shows_a_message(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    mailbox = Mailbox(ctx.db, ctx.clock)
    for i in range(53):
        await mailbox.send(
            OutboundEmail(
                message_id=f"<m{i}@test>",
                to=f"guest{i:02d}@x.io",
                from_address="drops@x.io",
                from_name="X",
                subject=f"Hello number {i}",
                text=f"Plain part {i}: https://shop.example/{i}",
                html=f'<p>HTML part {i} <a href="https://shop.example/{i}">shop</a></p>'
                "<script>alert(1)</script>",
                headers={"List-Unsubscribe": "<https://x.io/u/1>"},
                org_id=tenant.org_id,
            )
        )
        ctx.clock.advance(timedelta(seconds=1))  # type: ignore[attr-defined]
    await mailbox.send(
        OutboundSms(to="+33612345678", from_number="+1500", body="Drop on!", org_id=tenant.org_id)
    )
    await login(app_client, ctx, tenant, "owner")

    first = await app_client.get("/mailbox", headers=HTML)
    assert first.status_code == 200 and 'data-total="54"' in first.text
    shown = re.findall(r'data-message="(\d+)"', first.text)
    assert len(shown) == 50 and shown == sorted(shown, key=int, reverse=True)  # newest first
    assert "Drop on!" in first.text and "guest52@x.io" in first.text
    assert "guest02@x.io" not in first.text and 'rel="prev"' not in first.text
    older_link = re.search(r'href="(/mailbox\?before=\d+)" rel="next"', first.text)
    assert older_link
    second = await app_client.get(older_link.group(1), headers=HTML)
    rest = re.findall(r'data-message="(\d+)"', second.text)
    assert len(rest) == 4 and max(map(int, rest)) < min(map(int, shown))
    assert "guest00@x.io" in second.text and 'rel="next"' not in second.text
    newer_link = re.search(r'href="(/mailbox\?after=\d+)" rel="prev"', second.text)
    assert newer_link
    back = await app_client.get(newer_link.group(1), headers=HTML)
    assert re.findall(r'data-message="(\d+)"', back.text) == shown

    found = await app_client.get("/mailbox", params={"q": "GUEST1"}, headers=HTML)
    assert 'data-total="10"' in found.text
    assert "guest15@x.io" in found.text and "guest25@x.io" not in found.text
    nobody = await app_client.get("/mailbox", params={"q": "50%_"}, headers=HTML)
    assert 'data-total="0"' in nobody.text and "No message to an address" in nobody.text

    message_id = re.search(r'data-message="(\d+)"', found.text)
    assert message_id
    page = await app_client.get(f"/mailbox/{message_id.group(1)}", headers=HTML)
    assert page.status_code == 200
    assert "List-Unsubscribe" in page.text and "&lt;https://x.io/u/1&gt;" in page.text
    frame = re.search(r"<iframe [^>]*sandbox=\"([^\"]*)\"[^>]*srcdoc=\"([^\"]*)\"", page.text)
    assert frame, page.text
    assert "allow-scripts" not in frame.group(1) and "allow-same-origin" not in frame.group(1)
    srcdoc = html.unescape(frame.group(2))
    assert '<base target="_blank">' in srcdoc and "<script>alert(1)</script>" in srcdoc
    assert "<script>alert" not in page.text.replace(frame.group(2), "")  # only inside the frame
    assert re.search(r'<a href="https://shop.example/1\d" target="_blank"', page.text)  # text part
    missing = await app_client.get("/mailbox/999999999", headers=HTML)
    assert missing.status_code == 404


# ---------------------------------------------------------------- who sees what


async def test_an_operator_never_sees_another_organizations_drops_or_mail(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await add_contact(app_client, tenant, email="secret-fan@x.io")
    drop_id = await create_drop(ctx, tenant, name="Org A secret drop")
    async with ctx.db.transaction() as session:
        await drops.override_seed(session, owner(tenant), drop_id, reason="t", now=ctx.clock.now())
        await drops.start_drop(session, owner(tenant), drop_id, now=ctx.clock.now())
    await mailbox_sender(ctx, tenant).run_until_idle()
    async with ctx.db.reader() as session:
        message_id = await session.scalar(
            select(func.max(MailboxMessage.id)).where(MailboxMessage.org_id == tenant.org_id)
        )
    assert message_id is not None

    other = await make_tenant(ctx)
    await login(app_client, ctx, other, "owner")
    listed = await app_client.get("/drops", headers=HTML)
    assert listed.status_code == 200 and "Org A secret drop" not in listed.text
    assert (await app_client.get(f"/drops/{drop_id}", headers=HTML)).status_code == 404
    page = await app_client.get("/drops", headers=HTML)
    for action in ("pause", "cancel", "start", "seed-test"):
        refused = await post_form(app_client, f"/drops/{drop_id}/{action}", page.text)
        assert refused.status_code == 404, action
    assert await status_of(ctx, drop_id) == "sending"
    box = await app_client.get("/mailbox", headers=HTML)
    assert 'data-total="0"' in box.text and "secret-fan" not in box.text
    searched = await app_client.get("/mailbox", params={"q": "secret"}, headers=HTML)
    assert "secret-fan" not in searched.text
    message = await app_client.get(f"/mailbox/{message_id}", headers=HTML)
    assert message.status_code == 404 and "secret-fan" not in message.text


async def test_a_volunteer_is_refused_and_a_stranger_sent_to_login(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    drop_id = await create_drop(ctx, tenant)
    anonymous = await app_client.get("/drops", headers=HTML)
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/login")
    await login(app_client, ctx, tenant, "volunteer")
    for url in ("/drops", f"/drops/{drop_id}", "/mailbox"):
        page = await app_client.get(url, headers=HTML)
        assert page.status_code == 403, url
        assert 'href="/drops"' not in page.text and "Saturday drop" not in page.text


# ---------------------------------------------------------------- the demo


async def test_the_demo_seeds_a_vip_drop_whose_seed_test_passed(
    app_client: httpx.AsyncClient, ctx: AppContext, demo_dir: Path
) -> None:
    from popdrop import demo

    settings = ctx.settings.model_copy(update={"data_dir": demo_dir})
    info = await demo.seed(settings, ctx.db, ctx.signer)
    async with ctx.db.reader() as session:
        org = await accounts.get_organization_by_slug(session, demo.DEMO_ORG)
        drop = await session.scalar(select(Drop).where(Drop.org_id == org.id))
        assert drop is not None
        report = json.loads(drop.seed_report)
        frozen = await session.scalar(
            select(func.count()).select_from(SendRow).where(SendRow.drop_id == drop.id)
        )
        seeds = (
            await session.scalars(
                select(MailboxMessage.subject).where(
                    MailboxMessage.org_id == org.id, MailboxMessage.recipient == demo.DEMO_EMAIL
                )
            )
        ).all()
    assert drop.seed_status == "passed" and drop.status == "sending"
    assert {e["variant"] for e in report} == {"A", "B"}
    assert all(e["ok"] and e["voucher"] == "valid" and e["links"] for e in report)
    assert sorted(seeds) == [
        "[seed] Seed, your VIP code for Saturday",
        "[seed] VIP early access: 15% off before anyone else, Seed",
    ]
    assert frozen and 50 <= frozen <= 100  # the VIPs with email consent
    assert f"/drops/{drop.id}" in info["drop"] and "/mailbox" in info["drop"]
    assert "seed test passed" in info["drop"]

    # The in-process worker's send loop delivers the test half into the mailbox.
    ctx.clock.set(datetime.now(UTC) + timedelta(seconds=1))  # type: ignore[attr-defined]
    demo_tenant = Tenant(org.id, demo.DEMO_ORG, "")
    sent = await mailbox_sender(ctx, demo_tenant).run_until_idle()
    async with ctx.db.reader() as session:
        held = await session.scalar(
            select(func.count()).where(SendRow.drop_id == drop.id, SendRow.status == "held")
        )
    assert sent > 0 and held and sent + held == frozen

    # The owner sees it on the pages.
    page = await app_client.get("/login", headers=HTML)
    form = {
        "csrf": csrf_of(page.text),
        "email": demo.DEMO_EMAIL,
        "password": info["password"],
        "next": "/drops",
    }
    assert (await app_client.post("/login", data=form, headers=HTML)).status_code == 303
    detail = await app_client.get(f"/drops/{drop.id}", headers=HTML)
    assert "Saturday VIP drop" in detail.text and 'data-seed-status="passed"' in detail.text
    assert counts_of(detail.text)["sent"] == sent
    box = await app_client.get("/mailbox", headers=HTML)
    assert f'data-total="{sent + 2}"' in box.text and "your VIP code for Saturday" in box.text
    # Leave no work behind for a worker ticking over the shared test database.
    async with ctx.db.transaction() as session:
        await drops.set_state(session, owner(demo_tenant), drop.id, "cancel", now=ctx.clock.now())
