"""The Day+1 NPS survey, end to end (docs/surveys.md).

People check in at an event; the host schedules the survey; each visitor who is a contact
with a channel they agreed to gets one invitation, due the day after the event's end at
10:00 on the event's clock. At that hour the worker tick puts the message in the outbox
and sends it (a real aiosmtpd peer): a person who said STOP is not messaged, nor one who
unsubscribed between the enqueue and the send. The link's page takes one answer; the
funnel log has `survey_sent` and `survey_answered` (score, NPS class); the host's figures
show NPS with its interval, and an erased person's comment is gone.
"""

from __future__ import annotations

import email
import email.policy
import re
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from popdrop.app import build_context, create_app
from popdrop.chat.models import ChatMessage, Conversation
from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.metrics import log
from popdrop.metrics.models import FunnelEvent
from popdrop.metrics.survey_models import SurveyInvitation
from popdrop.outbound.models import MailboxMessage
from popdrop.usecases import surveys
from popdrop.web.context import AppContext
from popdrop.worker import Worker
from tests.audience.test_pages import HTML, csrf_of, login
from tests.checkin.helpers import make_event
from tests.conftest import Tenant, database_of_its_own, make_tenant, settings_for

BASE_URL = "https://pop.example"
LINK = re.compile(r"https://pop\.example(/q/[A-Za-z0-9_.\-]+)")
# Saturday 5 December 2026, 12:00 UTC (13:00 in Paris); the event ends at 16:30 Paris.
START = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
DUE = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)  # Sunday 10:00 in Paris (CET, UTC+1)


@dataclass
class SmtpPeer:
    messages: list[EmailMessage] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        return "250 2.0.0 Message accepted"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address]


@pytest.fixture
def smtp_peer() -> Iterator[tuple[SmtpPeer, int]]:
    peer = SmtpPeer()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    controller = Controller(peer, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield peer, port
    finally:
        controller.stop()


@dataclass
class Stack:
    ctx: AppContext
    client: httpx.AsyncClient
    tenant: Tenant
    smtp: SmtpPeer
    clock: FrozenClock
    worker: Worker


@pytest.fixture(scope="module")
def own_database_url(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return database_of_its_own(database_url, tmp_path_factory.mktemp("db"), "surveys")


@pytest.fixture
def settings(own_database_url: str, tmp_path: Path) -> Settings:
    """This file's own database: its worker ticks sweep every organization's rows."""
    return settings_for(own_database_url, tmp_path)


@pytest.fixture
async def stack(settings: Settings, smtp_peer: tuple[SmtpPeer, int]) -> AsyncIterator[Stack]:
    """The app and a worker wired to the SMTP peer (SMS goes to the development mailbox)."""
    peer, port = smtp_peer
    configured = settings.model_copy(
        update={
            "base_url": BASE_URL,
            "mail_transport": "smtp",
            "smtp_host": "127.0.0.1",
            "smtp_port": port,
            "smtp_pool_size": 1,
        }
    )
    clock = FrozenClock(START)
    ctx = build_context(configured, clock=clock)
    worker = Worker(configured, ctx.db, ctx.signer, clock)
    transport = httpx.ASGITransport(app=create_app(ctx=ctx))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield Stack(ctx, client, await make_tenant(ctx), peer, clock, worker)
    await worker.tick()  # a drain a commit kicked off ends before the database goes
    await worker.close()
    await ctx.guard.counter.close()
    await ctx.db.dispose()


# ---------------------------------------------------------------- helpers


def _tag() -> str:
    return secrets.token_hex(4)


async def _contact(stack: Stack, **fields: Any) -> int:
    response = await stack.client.post(
        "/api/v1/contacts", json=fields, headers=stack.tenant.headers
    )
    assert response.status_code == 201, response.text
    return int(response.json()["contact"]["id"])


def _consent(channel: str) -> list[dict[str, str]]:
    return [{"channel": channel, "wording": "Yes, you may message me about your events."}]


async def _visit(stack: Stack, event_id: int, holder: str) -> None:
    """A ticket for `holder` (an email or a phone), scanned at the door."""
    issued = await stack.client.post(
        "/api/v1/tickets",
        json={
            "event_id": event_id,
            "subject_kind": "manual",
            "subject_id": secrets.randbelow(10**9) + 1,
            "holder_ref": holder,
        },
        headers=stack.tenant.headers,
    )
    assert issued.status_code == 201, issued.text
    scanned = await stack.client.post(
        "/api/v1/checkins",
        json={"secret": issued.json()["secret"], "nonce": secrets.token_hex(12)},
        headers=stack.tenant.headers,
    )
    assert scanned.status_code == 200, scanned.text


async def _schedule(stack: Stack, event_id: int, **body: Any) -> dict[str, Any]:
    response = await stack.client.post(
        f"/api/v1/surveys/events/{event_id}/schedule", json=body, headers=stack.tenant.headers
    )
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def _invitations(stack: Stack, event_id: int) -> dict[int | None, SurveyInvitation]:
    async with stack.ctx.db.reader() as session:
        rows = await session.scalars(
            select(SurveyInvitation).where(SurveyInvitation.event_id == event_id)
        )
        return {row.contact_id: row for row in rows}


async def _log(stack: Stack, event_id: int) -> list[FunnelEvent]:
    async with stack.ctx.db.reader() as session:
        return list(
            await session.scalars(
                select(FunnelEvent)
                .where(
                    FunnelEvent.org_id == stack.tenant.org_id,
                    FunnelEvent.event_id == event_id,
                    FunnelEvent.kind.in_(("survey_sent", "survey_answered")),
                )
                .order_by(FunnelEvent.id)
            )
        )


async def _event(stack: Stack) -> int:
    """A live event in Paris from 12:30 to 15:30 UTC (13:30 to 16:30 local)."""
    return await make_event(
        stack.ctx,
        stack.tenant.org_id,
        starts_at=START - timedelta(minutes=30),
        ends_at=START + timedelta(hours=3, minutes=30),
    )


async def _csrf_form(client: httpx.AsyncClient, path: str) -> str:
    page = await client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


# ---------------------------------------------------------------- scheduling


async def test_visitors_are_invited_once_for_day_plus_one_at_ten_local(stack: Stack) -> None:
    event_id = await _event(stack)
    tag = _tag()
    ann = await _contact(stack, email=f"ann-{tag}@example.com", consents=_consent("email"))
    sam = await _contact(stack, phone="+14155550123", consents=_consent("sms"))
    # A visitor who never agreed to messages, and a contact who did but never came.
    quiet = await _contact(stack, email=f"quiet-{tag}@example.com")
    away = await _contact(stack, email=f"away-{tag}@example.com", consents=_consent("email"))
    await _visit(stack, event_id, f"Ann-{tag}@Example.com")  # the address as typed at the door
    await _visit(stack, event_id, "+14155550123")
    await _visit(stack, event_id, f"quiet-{tag}@example.com")

    first = await _schedule(stack, event_id)
    assert first["due_at"] == DUE.isoformat().replace("+00:00", "Z")
    assert (first["visitors"], first["scheduled"], first["no_channel"]) == (3, 2, 1)
    invited = await _invitations(stack, event_id)
    assert set(invited) == {ann, sam}
    assert {row.channel for row in invited.values()} == {"email", "sms"}
    assert all(row.due_at == DUE and row.status == "scheduled" for row in invited.values())
    assert quiet not in invited and away not in invited

    # Asked again (a late visitor walked in): only the new person is added.
    await _visit(stack, event_id, f"away-{tag}@example.com")
    again = await _schedule(stack, event_id, hour=18)
    assert (again["scheduled"], again["already"]) == (1, 2)
    invited = await _invitations(stack, event_id)
    assert invited[away].due_at == datetime(2026, 12, 6, 17, 0, tzinfo=UTC)  # 18:00 Paris
    assert invited[ann].due_at == DUE  # the first invitations keep their time

    bad = await stack.client.post(
        f"/api/v1/surveys/events/{event_id}/schedule",
        json={"hour": 24},
        headers=stack.tenant.headers,
    )
    assert bad.status_code == 422
    other = await make_tenant(stack.ctx)
    foreign = await stack.client.post(
        f"/api/v1/surveys/events/{event_id}/schedule", json={}, headers=other.headers
    )
    assert foreign.status_code == 404 and foreign.json()["reason"] == "not_found"


# ---------------------------------------------------------------- sending and answering


async def test_due_invitations_are_sent_once_never_to_someone_who_said_stop(
    stack: Stack,
) -> None:
    event_id = await _event(stack)
    tag = _tag()
    ann_email, cat_email = f"ann-{tag}@example.com", f"cat-{tag}@example.com"

    def person(email: str) -> str | None:  # the person every domain keys this address as
        return log.person_of_point(stack.ctx.signer, email, None)

    phone = f"+1415555{secrets.randbelow(10**4):04d}"
    ann = await _contact(stack, email=ann_email, consents=_consent("email"))
    bob = await _contact(stack, phone=phone, consents=_consent("sms"))
    cat = await _contact(stack, email=cat_email, consents=_consent("email"))
    for holder in (ann_email, phone, cat_email):
        await _visit(stack, event_id, holder)
    assert (await _schedule(stack, event_id))["scheduled"] == 3

    # Bob texts STOP before the survey is due.
    stop = await stack.client.post(
        "/api/v1/audience/inbound",
        json={"channel": "sms", "sender": phone, "text": "STOP"},
        headers=stack.tenant.headers,
    )
    assert stop.status_code == 200 and stop.json()["action"] == "opted_out", stop.text

    # Before 10:00 the next day nothing goes out.
    stack.clock.set(DUE - timedelta(minutes=1))
    await stack.worker.tick()
    assert stack.smtp.messages == []
    assert {r.status for r in (await _invitations(stack, event_id)).values()} == {"scheduled"}

    # At 10:00 the invitations go into the outbox (Bob's is skipped) ...
    stack.clock.set(DUE)
    await surveys.send_due(stack.ctx.db, stack.ctx.signer, stack.clock, BASE_URL)
    invited = await _invitations(stack, event_id)
    assert {c: invited[c].status for c in (ann, bob, cat)} == {
        ann: "sent",
        bob: "skipped",
        cat: "sent",
    }
    # ... and Cat unsubscribes from email before the drainer sends: the last-moment check.
    revoke = await stack.client.post(
        f"/api/v1/contacts/{cat}/consents",
        json={"channel": "email", "action": "revoke", "wording": "Unsubscribed"},
        headers=stack.tenant.headers,
    )
    assert revoke.status_code == 200, revoke.text
    await stack.worker.tick()
    await stack.worker.tick()  # a second tick sends nothing twice

    [mail] = stack.smtp.to(ann_email)
    assert mail["Subject"] == "How was Corner pop-up?"
    body = mail.get_content()
    link = LINK.search(body)
    assert link is not None and "0 (not at all)" in body
    assert stack.smtp.to(cat_email) == []
    async with stack.ctx.db.reader() as session:
        texts = list(
            await session.scalars(select(MailboxMessage).where(MailboxMessage.recipient == phone))
        )
    assert texts == []  # Bob said STOP: no SMS at all
    invited = await _invitations(stack, event_id)
    assert (invited[ann].status, invited[bob].status) == ("sent", "skipped")
    assert invited[ann].sent_at == DUE
    sent_log = [e for e in await _log(stack, event_id) if e.kind == "survey_sent"]
    assert sorted((e.person, e.channel) for e in sent_log) == sorted(
        [(person(ann_email), "email"), (person(cat_email), "email")]
    )

    # Ann answers on the page: 9 and a comment; the page thanks her.
    path = link.group(1)
    csrf = await _csrf_form(stack.client, path)
    page = await stack.client.get(path)
    assert page.headers["cache-control"].startswith("no-store")
    assert all(f'value="{s}"' in page.text for s in range(11))
    answered = await stack.client.post(
        path, data={"csrf": csrf, "score": "9", "comment": "  Loved the coffee corner.  "}
    )
    assert answered.status_code == 303, answered.text
    thanks = await stack.client.get(answered.headers["location"])
    assert thanks.status_code == 200 and "Thank you!" in thanks.text and "9/10" in thanks.text

    # Once only: the page, the form and the API all say so.
    later = await stack.client.get(path)
    assert "You already answered" in later.text and 'name="score"' not in later.text
    twice = await stack.client.post(path, data={"csrf": csrf, "score": "2"})
    assert twice.status_code == 409 and "You already answered" in twice.text
    token = path.removeprefix("/q/")
    api_twice = await stack.client.post(f"/api/v1/surveys/answers/{token}", json={"score": 0})
    assert api_twice.status_code == 409 and api_twice.json()["reason"] == "already_answered"
    stored = (await _invitations(stack, event_id))[ann]
    assert (stored.status, stored.score, stored.comment) == (
        "answered",
        9,
        "Loved the coffee corner.",
    )

    answers = [e for e in await _log(stack, event_id) if e.kind == "survey_answered"]
    assert [(e.value, e.label, e.channel, e.person) for e in answers] == [
        (9, "promoter", "email", person(ann_email))
    ]

    # The host's figures: one promoter, NPS 100, the comment without who wrote it.
    figures = await stack.client.get(
        f"/api/v1/surveys/events/{event_id}", headers=stack.tenant.headers
    )
    assert figures.status_code == 200, figures.text
    data = figures.json()
    assert (data["answered"], data["nps"], data["distribution"][9]) == (1, 100.0, 1)
    assert data["comments"][0]["comment"] == "Loved the coffee corner."
    assert ann_email not in figures.text and person(ann_email) not in figures.text


async def test_answers_are_checked_and_bad_links_are_not_found(stack: Stack) -> None:
    event_id = await _event(stack)
    tag = _tag()
    dee = await _contact(stack, email=f"dee-{tag}@example.com", consents=_consent("email"))
    await _visit(stack, event_id, f"dee-{tag}@example.com")
    await _schedule(stack, event_id)
    stack.clock.set(DUE)
    await stack.worker.tick()
    invitation = (await _invitations(stack, event_id))[dee]
    from popdrop.core import links

    token = links.survey_url(stack.ctx.signer, BASE_URL, invitation.id, stack.tenant.org_id)
    token = token.rsplit("/", 1)[1]
    for body, field_name in (
        ({"score": 11}, "score"),
        ({"score": -1}, "score"),
        ({"score": True}, "score"),
        ({"score": 5, "comment": "x" * 1001}, "comment"),
        ({}, "score"),
    ):
        refused = await stack.client.post(f"/api/v1/surveys/answers/{token}", json=body)
        assert refused.status_code == 422, (body, refused.text)
        assert field_name in refused.text
    # The form refuses a missing score with the reason next to it, keeping the comment.
    path = f"/q/{token}"
    csrf = await _csrf_form(stack.client, path)
    missing = await stack.client.post(path, data={"csrf": csrf, "comment": "Great staff"})
    assert missing.status_code == 422 and "Pick a score from 0 to 10" in missing.text
    assert "Great staff" in missing.text
    # A bad, tampered or foreign link is a 404 page, never a 500.
    for bad in ("nonsense", token[:-2] + "xx", token + "a"):
        page = await stack.client.get(f"/q/{bad}")
        assert page.status_code == 404 and "can't be found" in page.text
        api = await stack.client.post(f"/api/v1/surveys/answers/{bad}", json={"score": 5})
        assert api.status_code == 404 and api.json()["reason"] == "not_found"
    other = links.survey_url(stack.ctx.signer, BASE_URL, invitation.id, stack.tenant.org_id + 1)
    assert (await stack.client.get(other.removeprefix(BASE_URL))).status_code == 404

    # A detractor through the API: the log labels it, the figures count it.
    ok = await stack.client.post(
        f"/api/v1/surveys/answers/{token}", json={"score": 3, "comment": "Too crowded"}
    )
    assert ok.status_code == 200 and ok.json()["label"] == "detractor", ok.text
    [answered] = [e for e in await _log(stack, event_id) if e.kind == "survey_answered"]
    assert (answered.value, answered.label) == (3, "detractor")

    # Erased: the comment and the link to the person go, the score stays.
    async with stack.ctx.db.transaction() as session:
        assert await surveys.forget_contact(session, stack.tenant.org_id, dee) == 1
    [row] = (await _invitations(stack, event_id)).values()
    assert (row.contact_id, row.person, row.comment, row.score) == (None, None, None, 3)
    figures = (
        await stack.client.get(f"/api/v1/surveys/events/{event_id}", headers=stack.tenant.headers)
    ).json()
    assert (figures["answered"], figures["nps"], figures["comments"]) == (1, -100.0, [])


async def test_the_host_page_shows_nps_with_its_interval_and_schedules(stack: Stack) -> None:
    event_id = await _event(stack)
    tag = _tag()
    people = []
    for i in range(4):
        address = f"p{i}-{tag}@example.com"
        people.append(await _contact(stack, email=address, consents=_consent("email")))
        await _visit(stack, event_id, address)
    # One more visitor had not agreed to messages yet.
    late_address = f"late-{tag}@example.com"
    late = await _contact(stack, email=late_address)
    await _visit(stack, event_id, late_address)
    assert (await _schedule(stack, event_id))["no_channel"] == 1
    stack.clock.set(DUE)
    await stack.worker.tick()
    invited = await _invitations(stack, event_id)
    for contact_id, score in zip(people, (10, 9, 8, 2), strict=True):
        async with stack.ctx.db.transaction() as session:
            await surveys.answer(
                session,
                invited[contact_id].id,
                score,
                f"comment {score}",
                org_id=stack.tenant.org_id,
                now=stack.clock.now(),
            )
        stack.clock.advance(timedelta(minutes=1))
    data = (
        await stack.client.get(f"/api/v1/surveys/events/{event_id}", headers=stack.tenant.headers)
    ).json()
    # 2 promoters, 1 passive, 1 detractor of 4: NPS 25, with a wide interval (adjusted
    # Wald: n + 3 with 0.75 promoter and 0.75 detractor added).
    assert (data["promoters"], data["passives"], data["detractors"], data["nps"]) == (
        2,
        1,
        1,
        25.0,
    )
    assert (data["ci_low"], data["ci_high"]) == (-44.2, 72.7)
    # One promoter is NPS 100, yet the interval says how little one answer proves.
    assert surveys.nps_interval(1, 0, 1) == (100.0, -48.5, 100.0)
    assert surveys.nps_interval(50, 20, 100) == (30.0, 14.1, 44.2)
    assert [c["score"] for c in data["comments"]] == [2, 8, 9, 10]  # newest first
    assert surveys.nps_interval(0, 0, 0) is None

    # The host's page: the same figures, the 0-10 bars, and the "schedule now" button,
    # which invites the visitor who has agreed to messages since.
    await login(stack.client, stack.ctx, stack.tenant, "host")
    page = await stack.client.get(f"/insights/events/{event_id}/nps", headers=HTML)
    assert page.status_code == 200, page.text
    assert 'id="nps">+25<' in page.text and 'id="n">4<' in page.text
    assert 'id="ci">-44 to +73<' in page.text
    assert all(f'data-score="{s}" data-n="{n}"' in page.text for s, n in ((2, 1), (8, 1), (0, 0)))
    assert "comment 2" in page.text and "@example.com" not in page.text
    granted = await stack.client.post(
        f"/api/v1/contacts/{late}/consents",
        json={"channel": "email", "action": "grant", "wording": "Yes, email me."},
        headers=stack.tenant.headers,
    )
    assert granted.status_code == 200, granted.text
    scheduled = await stack.client.post(
        f"/insights/events/{event_id}/nps/schedule", data={"csrf": csrf_of(page.text)}, headers=HTML
    )
    assert scheduled.status_code == 303, scheduled.text
    notice = await stack.client.get(scheduled.headers["location"], headers=HTML)
    assert "Survey scheduled: 1 new invitation, 4 invited before." in notice.text

    # Another organization's token finds no such event; one without metrics:read is refused.
    other = await make_tenant(stack.ctx, frozenset({"metrics:read", "drops:write"}))
    for method, url in (("GET", ""), ("POST", "/schedule")):
        foreign = await stack.client.request(
            method, f"/api/v1/surveys/events/{event_id}{url}", headers=other.headers
        )
        assert foreign.status_code == 404, foreign.text
    no_scope = await make_tenant(stack.ctx, frozenset({"events:read"}))
    refused = await stack.client.get(f"/api/v1/surveys/events/{event_id}", headers=no_scope.headers)
    assert refused.status_code == 403


async def test_a_visitor_in_an_open_web_chat_is_asked_there(stack: Stack) -> None:
    """A visitor with an open web chat conversation gets the invitation in it (queued like
    a host's reply), not by email; once that chat said STOP, email is used instead."""
    event_id = await _event(stack)
    tag = _tag()
    eve_email, fay_email = f"eve-{tag}@example.com", f"fay-{tag}@example.com"
    eve = await _contact(stack, email=eve_email, consents=_consent("email"))
    fay = await _contact(stack, email=fay_email, consents=_consent("email"))
    chats: dict[int, int] = {}
    async with stack.ctx.db.transaction() as session:
        for contact_id in (eve, fay):
            conversation = Conversation(
                org_id=stack.tenant.org_id,
                channel="web",
                address_hash=secrets.token_bytes(32),
                address=f"visitor-{secrets.token_hex(6)}",
                contact_id=contact_id,
                flow_key="shop",
                flow_version=1,
                node="menu",
                status="waiting_input",
                state="{}",
                started_at=START,
                last_message_at=START,
                expires_at=START + timedelta(days=30),
            )
            session.add(conversation)
            await session.flush()
            chats[contact_id] = conversation.id
    for holder in (eve_email, fay_email):
        await _visit(stack, event_id, holder)
    await _schedule(stack, event_id)
    invited = await _invitations(stack, event_id)
    assert (invited[eve].channel, invited[fay].channel) == ("chat", "chat")
    # Fay says STOP in her chat before the survey is due: she is asked by email instead.
    async with stack.ctx.db.transaction() as session:
        conversation = await session.get(Conversation, chats[fay])
        assert conversation is not None
        conversation.opted_out_at = START + timedelta(hours=1)

    stack.clock.set(DUE)
    await stack.worker.tick()
    async with stack.ctx.db.reader() as session:
        bodies = list(
            await session.scalars(
                select(ChatMessage.body).where(ChatMessage.conversation_id == chats[eve])
            )
        )
        fay_chat = list(
            await session.scalars(
                select(ChatMessage.id).where(ChatMessage.conversation_id == chats[fay])
            )
        )
    assert len(bodies) == 1 and "/q/" in bodies[0] and "Corner pop-up" in bodies[0]
    assert stack.smtp.to(eve_email) == []
    assert fay_chat == [] and len(stack.smtp.to(fay_email)) == 1
    invited = await _invitations(stack, event_id)
    assert (invited[eve].channel, invited[fay].channel) == ("chat", "email")
    sent = {e.person: e.channel for e in await _log(stack, event_id) if e.kind == "survey_sent"}
    assert sent == {
        log.person_of_point(stack.ctx.signer, eve_email, None): "chat",
        log.person_of_point(stack.ctx.signer, fay_email, None): "email",
    }
