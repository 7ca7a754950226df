"""Waiting-list offers reach the person, end to end (docs/notifications.md).

A full slot with a waiting list; a cancellation frees the place; the worker tick sends the
next person an email (a real aiosmtpd peer) and an SMS (a local Twilio-format HTTP fake)
with a claim link; the link's page claims the place; an unclaimed offer lapses at its
deadline (controlled clock, worker tick) and the next person gets theirs. Erasing a person
removes their pending notifications; a provider failure is retried with a backoff; an
opt-out between enqueue and send stops the message.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from aiosmtpd.controller import Controller
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from popdrop.app import build_context, create_app
from popdrop.chat import console, conversations, flow_store
from popdrop.chat import inbound as chat_inbound
from popdrop.chat.engine import Inbound
from popdrop.chat.flow import shipped_source
from popdrop.chat.messages import Buttons, OutMessage
from popdrop.chat.models import Conversation
from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.core.localtime import local
from popdrop.outbound.outbox import Notification, NotificationStatus
from popdrop.rsvp import service as rsvp_service
from popdrop.rsvp.models import Rsvp, WaitlistOffer
from popdrop.rsvp.schemas import RsvpCreate
from popdrop.usecases.notify import DEADLINE_FORMAT
from popdrop.web.context import AppContext
from popdrop.worker import Worker
from tests.conftest import Tenant, database_of_its_own, make_tenant, settings_for
from tests.rsvp.helpers import make_slot, rsvp

BASE_URL = "https://pop.example"
SID = "ACbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
TOKEN = "fake-twilio-token"
SMS_FROM = "+15005550006"
LINK = re.compile(r"https://pop\.example(/w/[A-Za-z0-9_.\-]+)")


# ---------------------------------------------------------------- the providers


@dataclass
class SmtpPeer:
    """aiosmtpd handler: keeps every accepted message."""

    messages: list[EmailMessage] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        return "250 2.0.0 Message accepted"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address]


@dataclass
class TwilioFake:
    """Twilio's Messages endpoint on a real local HTTP server; `fail_next` answers 503."""

    received: list[dict[str, str]] = field(default_factory=list)
    fail_next: int = 0
    url: str = ""

    async def messages(self, request: Request) -> JSONResponse:
        expected = "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
        if request.headers.get("authorization") != expected:
            return JSONResponse({"code": 20003, "message": "Authenticate"}, status_code=401)
        if self.fail_next:
            self.fail_next -= 1
            return JSONResponse({"code": 20500, "message": "Internal error"}, status_code=503)
        form = {k: str(v) for k, v in (await request.form()).items()}
        self.received.append(form)
        sid = f"SM{len(self.received):032d}"
        body = {"sid": sid, "status": "queued", "to": form["To"], "from": form["From"]}
        return JSONResponse(body, status_code=201)

    def to(self, number: str) -> list[str]:
        return [m["Body"] for m in self.received if m["To"] == number]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def smtp_peer() -> Iterator[tuple[SmtpPeer, int]]:
    peer = SmtpPeer()
    port = _free_port()
    controller = Controller(peer, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield peer, port
    finally:
        controller.stop()


@pytest.fixture
async def twilio_fake() -> AsyncIterator[TwilioFake]:
    fake = TwilioFake()
    path = f"/2010-04-01/Accounts/{SID}/Messages.json"
    app = Starlette(routes=[Route(path, fake.messages, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield fake
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclass
class Stack:
    ctx: AppContext
    settings: Settings
    client: httpx.AsyncClient
    tenant: Tenant
    smtp: SmtpPeer
    sms: TwilioFake
    clock: FrozenClock
    worker: Worker | None = None

    def start_worker(self) -> Worker:
        """The worker of this process: from now on a commit that enqueues a notice wakes
        its drainer at once (before, only a tick finds the rows)."""
        if self.worker is None:
            self.worker = Worker(self.settings, self.ctx.db, self.ctx.signer, self.ctx.clock)
        return self.worker

    async def tick(self) -> None:
        await self.start_worker().tick()


@pytest.fixture(scope="module")
def own_database_url(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return database_of_its_own(database_url, tmp_path_factory.mktemp("db"), "waitlist")


@pytest.fixture
def settings(own_database_url: str, tmp_path: Path) -> Settings:
    """This file's own database: its worker ticks sweep every organization's rows."""
    return settings_for(own_database_url, tmp_path)


@pytest.fixture
async def stack(
    settings: Settings,
    clock: FrozenClock,
    smtp_peer: tuple[SmtpPeer, int],
    twilio_fake: TwilioFake,
) -> AsyncIterator[Stack]:
    """The app and a worker wired to the SMTP peer and the SMS fake (one database)."""
    peer, port = smtp_peer
    configured = settings.model_copy(
        update={
            "base_url": BASE_URL,
            "mail_transport": "smtp",
            "smtp_host": "127.0.0.1",
            "smtp_port": port,
            "smtp_pool_size": 1,
            "sms_base_url": twilio_fake.url,
            "sms_account_sid": SID,
            "sms_auth_token": TOKEN,
            "chat_sms_from": SMS_FROM,
        }
    )
    ctx = build_context(configured, clock=clock)
    transport = httpx.ASGITransport(app=create_app(ctx=ctx))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        stack = Stack(ctx, configured, client, await make_tenant(ctx), peer, twilio_fake, clock)
        yield stack
    if stack.worker is not None:
        await stack.tick()  # a drain a commit kicked off ends before the database goes
        await stack.worker.close()
    await ctx.guard.counter.close()
    await ctx.db.dispose()


# ---------------------------------------------------------------- helpers


async def _join(stack: Stack, event_id: int, slot_id: int, who: str, phone: str | None) -> int:
    stack.clock.advance(timedelta(seconds=1))  # (FIFO by arrival)
    response = await rsvp(
        stack.client, event_id, slot_id, email=f"{who}@example.com", phone=phone, waitlist=True
    )
    assert response.status_code == 201, response.text
    return int(response.json()["rsvp"]["id"])


async def _cancel(stack: Stack, rsvp_id: int) -> None:
    response = await stack.client.post(
        f"/api/v1/rsvps/{rsvp_id}/cancel",
        json={"reason": "can't come"},
        headers=stack.tenant.headers,
    )
    assert response.status_code == 200, response.text


async def _status(stack: Stack, rsvp_id: int) -> str:
    response = await stack.client.get(f"/api/v1/rsvps/{rsvp_id}", headers=stack.tenant.headers)
    return str(response.json()["status"])


async def _notifications(stack: Stack, recipient: str) -> list[Notification]:
    async with stack.ctx.db.reader() as session:
        return list(
            await session.scalars(
                select(Notification)
                .where(
                    Notification.org_id == stack.tenant.org_id,
                    Notification.recipient == recipient,
                )
                .order_by(Notification.id)
            )
        )


async def _open_offer(stack: Stack, rsvp_id: int) -> WaitlistOffer:
    async with stack.ctx.db.reader() as session:
        offer = await session.scalar(
            select(WaitlistOffer).where(
                WaitlistOffer.rsvp_id == rsvp_id, WaitlistOffer.status == "open"
            )
        )
    assert offer is not None
    return offer


async def _claim_by_link(stack: Stack, path: str) -> httpx.Response:
    page = await stack.client.get(path)
    assert page.status_code == 200, page.text
    assert "Claim my place" in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    return await stack.client.post(path, data={"csrf": csrf.group(1)})


def _deadline(offer: WaitlistOffer) -> str:
    return local(offer.expires_at, "Europe/Paris", DEADLINE_FORMAT)


# ---------------------------------------------------------------- the journey


async def test_offers_reach_the_next_person_who_claims_or_lets_it_lapse(stack: Stack) -> None:
    stack.start_worker()  # as in `popdrop serve`: commits wake the drainer
    event_id, slot_id = await make_slot(stack.ctx, stack.tenant, capacity=1)
    holder = await rsvp(stack.client, event_id, slot_id, email="holder@example.com")
    assert holder.json()["rsvp"]["status"] == "confirmed"
    ann = await _join(stack, event_id, slot_id, "ann", "+14155550101")
    bob = await _join(stack, event_id, slot_id, "bob", "+14155550102")
    cyd = await _join(stack, event_id, slot_id, "cyd", "+14155550103")

    # A cancellation frees the place: Ann's offer and its two messages, one transaction.
    await _cancel(stack, int(holder.json()["rsvp"]["id"]))
    assert await _status(stack, ann) == "offered"
    assert len(await _notifications(stack, "ann@example.com")) == 1

    await stack.tick()
    offer = await _open_offer(stack, ann)
    [mail] = stack.smtp.to("ann@example.com")
    [text] = stack.sms.to("+14155550101")
    body = mail.get_content()
    assert mail["Subject"] == "A place is free for you: Pop-up"
    # The deadline in the event's time zone (Europe/Paris), in both messages.
    assert f"before {_deadline(offer)}" in body and f"by {_deadline(offer)}" in text
    assert "CET" in _deadline(offer) or "CEST" in _deadline(offer)
    mail_link, sms_link = LINK.search(body), LINK.search(text)
    assert mail_link is not None and sms_link is not None
    # The same offer (the signature's timestamp may differ by a second).
    assert mail_link.group(1).split(".")[0] == sms_link.group(1).split(".")[0]
    # Sent rows keep no copy of the code.
    assert all(
        n.status == "sent" and n.payload == "{}"
        for n in await _notifications(stack, "ann@example.com")
    )
    # Nobody else heard anything yet.
    assert stack.smtp.to("bob@example.com") == [] and stack.sms.to("+14155550102") == []

    # The link claims the place: Ann is booked, with her ticket.
    claimed = await _claim_by_link(stack, mail_link.group(1))
    assert claimed.status_code == 200, claimed.text
    assert "booked for you" in claimed.text and "/t/" in claimed.text
    assert await _status(stack, ann) == "confirmed"
    again = await stack.client.get(mail_link.group(1))
    assert again.status_code == 410 and "already claimed" in again.text

    # Ann cancels after all: Bob's turn, and Bob never answers.
    await _cancel(stack, ann)
    await stack.tick()
    bob_offer = await _open_offer(stack, bob)
    [bob_mail] = stack.smtp.to("bob@example.com")
    assert f"before {_deadline(bob_offer)}" in bob_mail.get_content()
    assert len(stack.sms.to("+14155550102")) == 1

    # Past his deadline the tick lapses it and Cyd gets hers, on both channels.
    stack.clock.advance(timedelta(hours=1, minutes=59))
    await stack.tick()
    assert await _status(stack, bob) == "offered" and stack.smtp.to("cyd@example.com") == []
    stack.clock.advance(timedelta(minutes=1, seconds=1))
    await stack.tick()
    assert await _status(stack, bob) == "lapsed"
    assert await _status(stack, cyd) == "offered"
    [cyd_mail] = stack.smtp.to("cyd@example.com")
    [cyd_text] = stack.sms.to("+14155550103")
    cyd_link = LINK.search(cyd_text)
    assert cyd_link is not None
    assert cyd_link.group(0).split(".")[0] in cyd_mail.get_content()
    # Bob's old link is dead; Cyd's works.
    bob_link = LINK.search(bob_mail.get_content())
    assert bob_link is not None
    assert (await stack.client.get(bob_link.group(1))).status_code == 410
    assert (await _claim_by_link(stack, cyd_link.group(1))).status_code == 200
    assert await _status(stack, cyd) == "confirmed"


async def _offer_to_a_contact(stack: Stack, who: str, phone: str) -> tuple[int, int]:
    """A known contact waits for a full slot and gets its freed place: (RSVP, contact)."""
    event_id, slot_id = await make_slot(stack.ctx, stack.tenant, capacity=1)
    holder = await rsvp(stack.client, event_id, slot_id, email="holder@example.com")
    waiting = await _join(stack, event_id, slot_id, who, phone)
    contact = await stack.client.post(
        "/api/v1/contacts",
        json={"email": f"{who}@example.com", "phone": phone},
        headers=stack.tenant.headers,
    )
    assert contact.status_code == 201, contact.text
    await _cancel(stack, int(holder.json()["rsvp"]["id"]))
    assert await _status(stack, waiting) == "offered"
    return waiting, int(contact.json()["contact"]["id"])


async def test_erasing_a_person_removes_their_pending_notifications(stack: Stack) -> None:
    _dee, contact_id = await _offer_to_a_contact(stack, "dee", "+14155550104")
    [mail_row] = await _notifications(stack, "dee@example.com")
    assert mail_row.status == NotificationStatus.PENDING  # no worker here yet
    assert len(await _notifications(stack, "+14155550104")) == 1

    erased = await stack.client.post(
        f"/api/v1/contacts/{contact_id}/erase", headers=stack.tenant.headers
    )
    assert erased.status_code == 200, erased.text
    assert erased.json()["scrubbed"]["notifications"] == 2
    assert await _notifications(stack, "dee@example.com") == []
    assert await _notifications(stack, "+14155550104") == []
    await stack.tick()
    assert stack.smtp.messages == [] and stack.sms.received == []


async def test_a_provider_failure_is_retried_after_a_backoff(stack: Stack) -> None:
    event_id, slot_id = await make_slot(stack.ctx, stack.tenant, capacity=1)
    holder = await rsvp(stack.client, event_id, slot_id, email="holder@example.com")
    response = await rsvp(
        stack.client, event_id, slot_id, email=None, phone="+14155550105", waitlist=True
    )
    assert response.status_code == 201, response.text
    await _cancel(stack, int(holder.json()["rsvp"]["id"]))

    stack.sms.fail_next = 1  # the provider answers 503 once
    await stack.tick()
    [row] = await _notifications(stack, "+14155550105")
    assert row.status == "pending" and row.attempts == 1 and row.last_error
    assert row.not_before == stack.ctx.clock.now() + timedelta(seconds=30)
    await stack.tick()  # not due yet: nothing is sent
    assert stack.sms.received == []

    stack.clock.advance(timedelta(seconds=31))
    await stack.tick()
    [text] = stack.sms.to("+14155550105")
    assert LINK.search(text) is not None
    [row] = await _notifications(stack, "+14155550105")
    assert row.status == "sent" and row.attempts == 2 and row.provider_id


async def test_an_opt_out_after_enqueue_stops_the_message(stack: Stack) -> None:
    _eve, contact_id = await _offer_to_a_contact(stack, "eve", "+14155550106")

    # Eve opts out of email after the offer's messages were enqueued, before the send.
    for action in ("grant", "revoke"):
        changed = await stack.client.post(
            f"/api/v1/contacts/{contact_id}/consents",
            json={"channel": "email", "action": action, "wording": "email news"},
            headers=stack.tenant.headers,
        )
        assert changed.status_code == 200, changed.text
    await stack.tick()
    assert stack.smtp.to("eve@example.com") == []  # consent is read at send time
    assert len(stack.sms.to("+14155550106")) == 1  # SMS: no opt-out there
    [mail_row] = await _notifications(stack, "eve@example.com")
    assert mail_row.status == "skipped" and mail_row.last_error in ("suppressed", "no_consent")
    assert mail_row.payload == "{}"


# ---------------------------------------------------------------- an RSVP made in chat

# The shipped flow, its RSVP node joining the waiting list when the slot is full (and
# back to the menu after, instead of the voucher and ticket of a confirmed booking).
WAITLIST_FLOW = shipped_source("popup_drop").replace(
    "  rsvp:\n    type: rsvp\n", "  rsvp:\n    type: rsvp\n    waitlist: true\n", 1
)


def _buttons(messages: list[OutMessage]) -> dict[str, str]:
    return {
        button.label: button.payload
        for message in messages
        if isinstance(message, Buttons)
        for button in message.buttons
        if button.payload
    }


async def _chat_slot(stack: Stack) -> tuple[int, int]:
    """A one-place slot whose event's chat runs `WAITLIST_FLOW`."""
    event_id, slot_id = await make_slot(stack.ctx, stack.tenant, capacity=1)
    async with stack.ctx.db.transaction() as session:
        await flow_store.publish_flow(
            session,
            stack.tenant.org_id,
            flow_store.DEFAULT_FLOW_KEY,
            WAITLIST_FLOW,
            now=stack.clock.now(),
            event_id=event_id,
        )
    return event_id, slot_id


async def _say(stack: Stack, address: str, inbound: Inbound) -> list[OutMessage]:
    """One message from a web chat visitor; the replies."""
    result = await chat_inbound.handle(
        stack.ctx.db,
        conversations.ChatDeps(stack.ctx.signer, BASE_URL),
        org_id=stack.tenant.org_id,
        channel="web",
        address=address,
        inbound=inbound,
        now=stack.clock.now(),
    )
    return result.messages


async def _book_in_chat_after_the_last_place_went(
    stack: Stack, visitor: str, email: str
) -> tuple[int, httpx.Response]:
    """The visitor picks the one-place slot in the web chat and types their email;
    meanwhile someone else takes the place, so their booking joins the waiting list.
    Returns the event and the holder's RSVP answer."""
    event_id, slot_id = await _chat_slot(stack)

    async def say(inbound: Inbound) -> list[OutMessage]:
        return await _say(stack, visitor, inbound)

    menu = await say(Inbound.of_text("hi"))
    slots = await say(Inbound.button(_buttons(menu)["RSVP a time slot"]))
    await say(Inbound.button(next(iter(_buttons(slots).values()))))
    confirm = await say(Inbound.of_text(email))
    holder = await rsvp(stack.client, event_id, slot_id, email="holder@example.com")
    assert holder.json()["rsvp"]["status"] == "confirmed"
    await say(Inbound.button(_buttons(confirm)["Yes, book it"]))
    return event_id, holder


async def test_an_offer_for_an_rsvp_made_in_chat_reaches_the_conversation(stack: Stack) -> None:
    ctx, tenant = stack.ctx, stack.tenant
    event_id, holder = await _book_in_chat_after_the_last_place_went(
        stack, "widget-ann", "ann@example.com"
    )
    async with ctx.db.reader() as session:
        ann = await session.scalar(
            select(Rsvp).where(Rsvp.event_id == event_id, Rsvp.email == "ann@example.com")
        )
        conversation_id = await session.scalar(
            select(Conversation.id).where(Conversation.org_id == tenant.org_id)
        )
    assert ann is not None and ann.status == "waitlisted"
    assert ann.source == f"chat:{conversation_id}"

    # The holder cancels: Ann's offer goes by email and into her conversation.
    await _cancel(stack, int(holder.json()["rsvp"]["id"]))
    assert await _status(stack, ann.id) == "offered"
    [queued] = await _notifications(stack, f"chat:{conversation_id}")
    assert queued.channel == "chat" and queued.status == "pending"

    await stack.tick()  # the notifier queues it in the chat, the chat tick delivers it
    offer = await _open_offer(stack, ann.id)
    assert len(stack.smtp.to("ann@example.com")) == 1
    [sent] = await _notifications(stack, f"chat:{conversation_id}")
    assert sent.status == "sent" and sent.payload == "{}"
    async with ctx.db.reader() as session:
        rows = await console.transcript(session, tenant.org_id, conversation_id or 0)
    [message] = [row for row in rows if "freed up for you" in row.body]
    assert message.direction == "host"  # taken by the chat tick (kept in the web inbox)
    text = json.loads(message.body)["text"]
    assert f"Claim by {_deadline(offer)}" in text
    link = LINK.search(text)
    assert link is not None
    claimed = await _claim_by_link(stack, link.group(1))
    assert claimed.status_code == 200, claimed.text
    assert await _status(stack, ann.id) == "confirmed"


async def test_no_chat_offer_after_the_conversation_said_stop(stack: Stack) -> None:
    ctx, tenant = stack.ctx, stack.tenant
    event_id, slot_id = await _chat_slot(stack)
    holder = await rsvp(stack.client, event_id, slot_id, email="holder@example.com")
    # Bea joins the waiting list from her chat (as chat.effects would), then says STOP.
    await _say(stack, "widget-bea", Inbound.of_text("hi"))
    async with ctx.db.transaction() as session:
        conversation = await session.scalar(
            select(Conversation).where(Conversation.org_id == tenant.org_id)
        )
        assert conversation is not None
        spec = RsvpCreate(
            slot_id=slot_id,
            email="bea@example.com",
            consent=True,
            consent_text="I agree to be contacted about this event.",
            waitlist=True,
        )
        await rsvp_service.create_rsvp(
            session,
            ctx.signer,
            event_id=event_id,
            spec=spec,
            now=ctx.clock.now(),
            actor=f"chat:{conversation.id}",
        )
    await _say(stack, "widget-bea", Inbound.of_text("STOP"))
    await _cancel(stack, int(holder.json()["rsvp"]["id"]))
    await stack.tick()
    [skipped] = await _notifications(stack, f"chat:{conversation.id}")
    assert skipped.status == "skipped" and skipped.last_error == "opted_out"
    assert len(stack.smtp.to("bea@example.com")) == 1  # the email still goes


async def test_erasing_a_person_also_drops_the_offer_queued_for_their_chat(stack: Stack) -> None:
    ctx, tenant = stack.ctx, stack.tenant
    # Cy books in the web chat (typing her email), lands on the waiting list, is offered.
    _event_id, holder = await _book_in_chat_after_the_last_place_went(
        stack, "widget-cy", "cy@example.com"
    )
    async with ctx.db.reader() as session:
        conversation_id = await session.scalar(
            select(Conversation.id).where(Conversation.org_id == tenant.org_id)
        )
    contact = await stack.client.post(
        "/api/v1/contacts", json={"email": "cy@example.com"}, headers=tenant.headers
    )
    assert contact.status_code == 201, contact.text
    await _cancel(stack, int(holder.json()["rsvp"]["id"]))
    assert len(await _notifications(stack, f"chat:{conversation_id}")) == 1

    erased = await stack.client.post(
        f"/api/v1/contacts/{contact.json()['contact']['id']}/erase", headers=tenant.headers
    )
    assert erased.status_code == 200, erased.text
    assert erased.json()["scrubbed"]["chat_conversations"] == 1
    assert erased.json()["scrubbed"]["notifications"] == 2  # the email and the chat notice
    assert await _notifications(stack, f"chat:{conversation_id}") == []
    await stack.tick()
    assert stack.smtp.messages == []
