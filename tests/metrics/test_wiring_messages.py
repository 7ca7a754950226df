"""The messaging and chat domains write the funnel log in their own transactions: a drop
sent through the real pipeline logs each message with its drop, event, A/B variant and
the contact's segment at send time; provider feedback, SMS status reports and clicks log
their outcome once per message (a click once per click) with the same tags; a chat logs
its sessions and the cards it shows; the rollups count all of it once."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import re
from collections.abc import Iterator
from datetime import timedelta
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import func, select, update

from popdrop.audience.models import Contact
from popdrop.chat import stats
from popdrop.chat.engine import Inbound
from popdrop.chat.messages import Buttons, Carousel
from popdrop.drops import outcomes
from popdrop.drops.models import SendRow
from popdrop.drops.pipeline import Sender
from popdrop.metrics import log, rollups
from popdrop.metrics.kinds import Kind
from popdrop.metrics.models import FunnelEvent, FunnelRollup
from popdrop.outbound.smtp import SmtpPool
from popdrop.outbound.twilio import TwilioSms
from popdrop.rsvp import service as rsvp_service
from popdrop.rsvp.schemas import RsvpCreate
from popdrop.web.context import AppContext
from tests.attribution.helpers import IPHONE
from tests.audience.helpers import add_contact
from tests.chat.test_service import buttons, say, shop_with_flow
from tests.conftest import Tenant
from tests.drops.helpers import Recorder, drop_spec, started_drop
from tests.drops.test_delivery_reports import SID, TOKEN, TwilioFake, report
from tests.drops.test_transports import Peer, free_port
from tests.events.helpers import make_shop

Row = tuple[str, str, int | None, int | None, str, str, str, str | None, str | None]


@pytest.fixture
def smtp_peer() -> Iterator[tuple[Peer, Controller]]:
    peer = Peer()
    controller = Controller(peer, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield peer, controller
    finally:
        controller.stop()


def configure(ctx: AppContext, **settings: Any) -> None:
    ctx.settings = ctx.settings.model_copy(update=settings)


async def logged(ctx: AppContext, org_id: int, *kinds: Kind) -> list[Row]:
    """(kind, channel, drop, event, variant, segment, label, person, subject) in order."""
    async with ctx.db.reader() as session:
        rows = await session.execute(
            select(
                FunnelEvent.kind,
                FunnelEvent.channel,
                FunnelEvent.drop_id,
                FunnelEvent.event_id,
                FunnelEvent.variant,
                FunnelEvent.segment,
                FunnelEvent.label,
                FunnelEvent.person,
                FunnelEvent.subject,
            )
            .where(FunnelEvent.org_id == org_id, FunnelEvent.kind.in_([k.value for k in kinds]))
            .order_by(FunnelEvent.id)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


async def rolled_up(ctx: AppContext, org_id: int, **where: Any) -> dict[tuple[str, str], int]:
    """Hourly rollups: (kind, label) → n."""
    await rollups.fold_pending(ctx.db)
    async with ctx.db.reader() as session:
        query = (
            select(FunnelRollup.kind, FunnelRollup.label, func.sum(FunnelRollup.n))
            .where(FunnelRollup.org_id == org_id, FunnelRollup.grain == 60)
            .group_by(FunnelRollup.kind, FunnelRollup.label)
        )
        for name, value in where.items():
            query = query.where(getattr(FunnelRollup, name) == value)
        return {(str(k), str(label)): int(n) for k, label, n in await session.execute(query)}


async def rows_by_contact(ctx: AppContext, drop_id: int) -> dict[int, SendRow]:
    async with ctx.db.reader() as session:
        rows = await session.scalars(select(SendRow).where(SendRow.drop_id == drop_id))
        return {row.contact_id: row for row in rows}


def two_variants(event_id: int) -> Any:
    text = "Your code {{ voucher_code }} {{ event.url }}"
    return drop_spec(
        event_id=event_id,
        ab_test_fraction=1.0,
        variants=[
            {
                "name": name,
                "split_percent": 50,
                "content": {"email": {"default": {"subject": f"Drop {name}", "text": text}}},
            }
            for name in ("A", "B")
        ],
    )


async def test_a_sent_drop_logs_each_message_and_its_feedback_and_clicks(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    smtp_peer: tuple[Peer, Controller],
) -> None:
    peer, controller = smtp_peer
    now = ctx.clock.now()
    shop = await make_shop(app_client, tenant, now)
    # Engaged a day, a month, a season ago, and never (as cold as it gets).
    ages = {"hot": 1, "warm": 30, "cold": 200, "never": None}
    contacts: dict[str, int] = {}
    for name, age in ages.items():
        contact = await add_contact(app_client, tenant, email=f"{name}@x.io")
        contacts[name] = contact["id"]
        async with ctx.db.transaction() as session:
            await session.execute(
                update(Contact)
                .where(Contact.id == contact["id"])
                .values(last_engaged_at=None if age is None else now - timedelta(days=age))
            )
    drop_id = await started_drop(ctx, tenant, two_variants(shop.event_id))
    pool = SmtpPool(controller.hostname, controller.port, size=2)
    try:
        sender = Sender(
            ctx.db, ctx.signer, ctx.clock, ctx.settings.base_url, email=pool, org_id=tenant.org_id
        )
        assert await sender.run_until_idle() == 4
    finally:
        await pool.close()
    assert len(peer.messages) == 4

    rows = await rows_by_contact(ctx, drop_id)
    assert {row.variant for row in rows.values()} <= {"A", "B"}
    segment = {"hot": "hot", "warm": "warm", "cold": "cold", "never": "cold"}

    def person(name: str) -> str | None:  # keyed from the email, as every domain keys it
        return log.person_of_point(ctx.signer, f"{name}@x.io", None)

    expected = {
        (
            "message_sent",
            "email",
            drop_id,
            shop.event_id,
            str(rows[cid].variant),
            segment[name],
            "",
            person(name),
            f"send:{rows[cid].id}",
        )
        for name, cid in contacts.items()
    }
    assert set(await logged(ctx, tenant.org_id, Kind.MESSAGE_SENT)) == expected
    assert await logged(ctx, tenant.org_id, Kind.MESSAGE_DELIVERED) == []  # SMTP: not yet

    # Provider feedback: a hard bounce (reported twice), a complaint, a soft bounce, a
    # delivery; each logged once, with the tags of the message it is about.
    configure(ctx, feedback_webhook_secret="fb-secret")
    urls = (await app_client.get("/api/v1/webhook-urls", headers=tenant.headers)).json()
    path = "/" + urls["generic"].split("://", 1)[1].split("/", 1)[1]
    basic = base64.b64encode(b"popdrop:fb-secret").decode()

    async def feedback(name: str, **body: Any) -> None:
        body |= {"email": f"{name}@x.io", "message_id": rows[contacts[name]].message_id}
        answer = await app_client.post(
            path, content=json.dumps(body), headers={"Authorization": f"Basic {basic}"}
        )
        assert answer.status_code == 200, answer.text

    for _ in range(2):
        await feedback("hot", type="bounce", permanent=True, reason="550 no such user")
    await feedback("warm", type="complaint")
    await feedback("cold", type="bounce", permanent=False, reason="452 mailbox full")
    await feedback("cold", type="delivered")
    await feedback("cold", type="delivered")

    def tags_of(name: str, kind: str, label: str = "") -> Row:
        cid = contacts[name]
        variant = str(rows[cid].variant)
        return (
            kind,
            "email",
            drop_id,
            shop.event_id,
            variant,
            segment[name],
            label,
            person(name),
            f"send:{rows[cid].id}",
        )

    reported = (Kind.MESSAGE_BOUNCED, Kind.MESSAGE_COMPLAINED, Kind.MESSAGE_DELIVERED)
    assert await logged(ctx, tenant.org_id, *reported) == [
        tags_of("hot", "message_bounced", "hard"),
        tags_of("warm", "message_complained"),
        tags_of("cold", "message_bounced", "soft"),
        tags_of("cold", "message_delivered"),
    ]

    # Two clicks on the never-engaged contact's /r/ link: two clicks logged, still in the
    # segment it was sent to (the click itself makes the contact hot).
    [raw] = [m for _from, to, m in peer.messages if to == ["never@x.io"]]
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    plain = message.get_body(("plain",))
    assert plain is not None
    [tracked] = re.findall(r"https?://\S+/r/\S+", plain.get_content())
    for _ in range(2):
        clicked = await app_client.get(urlsplit(tracked).path)
        assert clicked.status_code in (302, 303, 307), clicked.text
    clicks = await logged(ctx, tenant.org_id, Kind.MESSAGE_CLICKED)
    assert clicks == [tags_of("never", "message_clicked")] * 2

    assert await rolled_up(ctx, tenant.org_id, drop_id=drop_id) == {
        ("message_sent", ""): 4,
        ("message_bounced", "hard"): 1,
        ("message_bounced", "soft"): 1,
        ("message_complained", ""): 1,
        ("message_delivered", ""): 1,
        ("message_clicked", ""): 2,
    }
    sent_by_segment = await rolled_up(ctx, tenant.org_id, drop_id=drop_id, segment="cold")
    assert sent_by_segment[("message_sent", "")] == 2


@pytest.fixture
async def twilio_fake() -> Any:
    fake = TwilioFake()
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    yield fake, TwilioSms("https://api.twilio.test", SID, TOKEN, client=client)
    await client.aclose()


async def test_sms_status_reports_and_short_link_clicks_are_logged(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, twilio_fake: Any
) -> None:
    fake, twilio = twilio_fake
    configure(ctx, sms_auth_token=TOKEN)
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    phones = ["+33611110001", "+33611110002"]
    for phone in phones:
        await add_contact(app_client, tenant, phone=phone, consents=("sms",))
    spec = drop_spec(
        channels=["sms"],
        event_id=shop.event_id,
        variants=[{"name": "A", "content": {"sms": {"default": {"body": "On {{ event.url }}"}}}}],
    )
    drop_id = await started_drop(ctx, tenant, spec)
    sender = Sender(
        ctx.db, ctx.signer, ctx.clock, ctx.settings.base_url, sms=twilio, org_id=tenant.org_id
    )
    assert await sender.run_until_idle() == 2
    callback = fake.forms[0]["StatusCallback"]
    by_phone = {form["To"]: form for form in fake.forms}
    async with ctx.db.reader() as session:
        rows = {
            str(row.provider_id): row
            for row in await session.scalars(select(SendRow).where(SendRow.drop_id == drop_id))
        }
    first, second = sorted(rows)

    for status in ("sent", "delivered", "delivered"):  # interim, then twice the same
        assert (await report(app_client, callback, first, status)).status_code == 204
    failed = await report(app_client, callback, second, "undelivered", ErrorCode="30003")
    assert failed.status_code == 204
    [short] = re.findall(r"http://\S+/s/\S+", by_phone[phones[0]]["Body"])
    clicked = await app_client.get(urlsplit(short).path, headers={"User-Agent": IPHONE})
    assert clicked.status_code == 302

    kinds = (Kind.MESSAGE_DELIVERED, Kind.MESSAGE_BOUNCED, Kind.MESSAGE_CLICKED)
    found = [
        (k, ch, d, label, subject)
        for k, ch, d, _e, _v, _s, label, _p, subject in await logged(ctx, tenant.org_id, *kinds)
    ]
    async with ctx.db.reader() as session:
        clicked_id = await session.scalar(
            select(SendRow.id).where(SendRow.drop_id == drop_id, SendRow.clicked_at.is_not(None))
        )
    assert found == [
        ("message_delivered", "sms", drop_id, "", f"send:{rows[first].id}"),
        ("message_bounced", "sms", drop_id, "undelivered", f"send:{rows[second].id}"),
        ("message_clicked", "sms", drop_id, "", f"send:{clicked_id}"),
    ]
    assert await rolled_up(ctx, tenant.org_id, drop_id=drop_id, channel="sms") == {
        ("message_sent", ""): 2,
        ("message_delivered", ""): 1,
        ("message_bounced", "undelivered"): 1,
        ("message_clicked", ""): 1,
    }


async def test_a_preview_click_with_no_recipient_logs_nothing(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await add_contact(app_client, tenant, email="one@x.io")
    drop_id = await started_drop(ctx, tenant, drop_spec())
    email = Recorder()
    sender = Sender(
        ctx.db, ctx.signer, ctx.clock, "https://pop.example", email=email, org_id=tenant.org_id
    )
    assert await sender.run_until_idle() == 1
    assert len(await logged(ctx, tenant.org_id, Kind.MESSAGE_SENT)) == 1
    # A render of the drop for the operator carries links without a recipient.
    async with ctx.db.transaction() as session:
        await outcomes.record_click(
            session,
            ctx.signer,
            drop_id=drop_id,
            send_row_id=None,
            url="https://shop.example/drop",
            now=ctx.clock.now(),
        )
    assert await logged(ctx, tenant.org_id, Kind.MESSAGE_CLICKED) == []


async def test_a_chat_logs_its_sessions_and_cards_and_its_funnel_reads_the_log(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    shop = await shop_with_flow(app_client, ctx, tenant)
    hello = await say(ctx, tenant, "hi", address="visitor-1")
    await say(ctx, tenant, "hi", address="visitor-2")
    drop = await say(
        ctx, tenant, Inbound.button(buttons(hello.messages)["See the drop"]), address="visitor-1"
    )
    assert any(isinstance(m, Carousel) for m in drop.messages)
    started = await logged(ctx, tenant.org_id, Kind.CHAT_STARTED)
    assert [(k, ch, e) for k, ch, _d, e, *_rest in started] == [
        ("chat_started", "web", shop.event_id)
    ] * 2
    # No contact is known in a web widget: a keyed digest per conversation, never the
    # address; one person per conversation.
    persons = [person for *_rest, person, _subject in started]
    assert all(p is not None and p.startswith("k:") for p in persons)
    assert len(set(persons)) == 2 and not any("visitor" in str(p) for p in persons)
    # The card shown in visitor 1's session: their person, their session.
    cards = await logged(ctx, tenant.org_id, Kind.CARD_VIEWED)
    assert [(k, ch, e, p, subject) for k, ch, _d, e, _v, _s, _l, p, subject in cards] == [
        ("card_viewed", "web", shop.event_id, persons[0], f"chat:{hello.conversation_id}:1")
    ]
    # The chat logs no RSVP, hold or checkout itself: their services log their own.
    others = (Kind.RSVP, Kind.HOLD, Kind.CHECKOUT_STARTED, Kind.MESSAGE_SENT)
    assert await logged(ctx, tenant.org_id, *others) == []

    # Visitor 1 books a slot in the chat; someone else RSVPs on the public page.
    slots = await say(
        ctx, tenant, Inbound.button(buttons(drop.messages)["RSVP a time slot"]), address="visitor-1"
    )
    [pick] = [m for m in slots.messages if isinstance(m, Buttons)]
    await say(ctx, tenant, Inbound.button(pick.buttons[0].payload or ""), address="visitor-1")
    confirm = await say(ctx, tenant, "ana@example.com", address="visitor-1")
    booked = await say(
        ctx, tenant, Inbound.button(buttons(confirm.messages)["Yes, book it"]), address="visitor-1"
    )
    assert "You are in for" in "\n".join(getattr(m, "text", "") for m in booked.messages)
    async with ctx.db.transaction() as session:
        await rsvp_service.create_rsvp(
            session,
            ctx.signer,
            event_id=shop.event_id,
            spec=RsvpCreate(
                slot_id=shop.slot_id, email="walk@example.com", consent=True, consent_text="ok"
            ),
            now=ctx.clock.now(),
        )
    assert len(await logged(ctx, tenant.org_id, Kind.RSVP)) == 2

    async with ctx.db.reader() as session:
        before = await stats.funnel(session, tenant.org_id, event_id=shop.event_id)
    # Chat→RSVP counts the RSVP made in the chat only, as the insights' chat_rsvp does.
    assert before["chat_started"] == 2 and before["card_viewed"] == 1 and before["rsvp"] == 1
    folded = await rolled_up(ctx, tenant.org_id, event_id=shop.event_id)
    assert folded[("chat_started", "")] == 2 and folded[("card_viewed", "")] == 1
    async with ctx.db.reader() as session:
        after = await stats.funnel(session, tenant.org_id, event_id=shop.event_id)
        elsewhere = await stats.funnel(session, tenant.org_id, event_id=shop.event_id + 1000)
    assert after == before  # folded rows are counted once, from the rollups now
    assert elsewhere["chat_started"] == 0
    # A host's day: the minute rollups of that window only.
    minute = ctx.clock.now().replace(second=0, microsecond=0)
    async with ctx.db.reader() as session:
        today = await stats.chats_started(
            session, tenant.org_id, shop.event_id, minute, minute + timedelta(days=1)
        )
        yesterday = await stats.chats_started(
            session, tenant.org_id, shop.event_id, minute - timedelta(days=1), minute
        )
    assert (today, yesterday) == (2, 0)
