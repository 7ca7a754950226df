"""Opt-outs honoured per message (issue 13, item 1): no provider call starts after the
opt-out's acknowledgement was sent.

A drop to 2,000 contacts (1,000 by email through a real aiosmtpd peer, 1,000 by SMS
through a local Twilio-format HTTP server, each in its own thread with its own clock
reading) while 50 people unsubscribe with the RFC 8058 one-click POST and 50 text STOP to
the signed Twilio inbound webhook, each just ahead of their own message. Per person the
test records when the client got the acknowledgement (the 200, the STOP reply) and when
their message reached the peer; a message that reached the peer after the
acknowledgement is a broken promise, and there must be none. The worst case (message
time minus acknowledgement time, per channel) is printed.

The guarantee rests on PostgreSQL row locks (`audience.consent.hold_consent`), so the race runs
on PostgreSQL; the per-message re-check itself is exercised on both backends below.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn
from aiosmtpd.controller import Controller
from sqlalchemy import insert, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from popdrop.audience.models import Contact
from popdrop.core import links
from popdrop.core.identity import identity_hash
from popdrop.drops.models import SendRow
from popdrop.drops.pipeline import Sender
from popdrop.outbound.smtp import SmtpPool
from popdrop.outbound.transports import OutboundEmail, OutboundSms, SendResult
from popdrop.outbound.twilio import TwilioSms, compute_signature
from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact
from tests.conftest import Tenant
from tests.drops.helpers import drop_spec, sender, started_drop

PER_CHANNEL = 1_000
OPT_OUTS = 50  # per channel
# An opt-out is fired when the peer has this many fewer messages than the person's place
# in the send order: inside the batch that is already claimed, just ahead of them.
LEAD = 25
SID = "AC" + "1" * 32
TOKEN = "fake-twilio-token"
AUTH_TOKEN = "inbound-webhook-token"
OUR_NUMBER = "+15005550006"
_sids = itertools.count(1)


@dataclass
class Arrivals:
    """Per recipient (email or phone) the wall-clock time each message reached the peer."""

    at: dict[str, list[float]] = field(default_factory=dict)
    count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, to: str) -> None:
        now = time.time()
        with self.lock:
            self.at.setdefault(to, []).append(now)
            self.count += 1

    def received(self) -> int:
        with self.lock:
            return self.count


class SmtpPeer:
    def __init__(self, arrivals: Arrivals) -> None:
        self.arrivals = arrivals

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        for rcpt in envelope.rcpt_tos:
            self.arrivals.record(rcpt)
        return "250 OK"


@pytest.fixture
def smtp_peer() -> Iterator[tuple[Arrivals, int]]:
    arrivals = Arrivals()
    port = _free_port()
    controller = Controller(SmtpPeer(arrivals), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield arrivals, port
    finally:
        controller.stop()


@pytest.fixture
def sms_peer() -> Iterator[tuple[Arrivals, int]]:
    """A Twilio-format Messages endpoint on a real socket, served from its own thread."""
    arrivals = Arrivals()
    sids = itertools.count(1)

    async def messages(request: Request) -> JSONResponse:
        form = await request.form()
        arrivals.record(str(form["To"]))
        body = {"sid": f"SM{next(sids):032d}", "status": "queued", "to": str(form["To"])}
        return JSONResponse(body, status_code=201)

    path = f"/2010-04-01/Accounts/{SID}/Messages.json"
    app = Starlette(routes=[Route(path, messages, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        yield arrivals, port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _webhook_path(client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant) -> str:
    ctx.settings = ctx.settings.model_copy(update={"sms_auth_token": AUTH_TOKEN})
    urls = (await client.get("/api/v1/webhook-urls", headers=tenant.headers)).json()
    inbound: str = urls["twilio_inbound"]
    return "/" + inbound.split("://", 1)[1].split("/", 1)[1]


async def _text_stop(client: httpx.AsyncClient, path: str, phone: str) -> None:
    params = {
        "MessageSid": f"SM{next(_sids):032x}",
        "AccountSid": SID,
        "From": phone,
        "To": OUR_NUMBER,
        "Body": "STOP",
        "NumMedia": "0",
    }
    url = str(client.base_url).rstrip("/") + path
    signature = compute_signature(AUTH_TOKEN, url, params)
    response = await client.post(path, data=params, headers={"X-Twilio-Signature": signature})
    assert response.status_code == 200, response.text
    assert "no more messages" in response.text  # the confirmation the person reads


async def _unsubscribe(client: httpx.AsyncClient, url: str) -> None:
    path = "/" + url.split("://", 1)[1].split("/", 1)[1]
    response = await client.post(path, content=b"List-Unsubscribe=One-Click")
    assert response.status_code == 200, response.text


async def _seed(ctx: AppContext, tenant: Tenant) -> None:
    """1,000 email-only and 1,000 SMS-only consenting contacts, in one insert."""
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for i in range(PER_CHANNEL):
        email = f"fan{i}@race.example"
        rows.append(
            {
                "org_id": tenant.org_id,
                "email": email,
                "email_hash": identity_hash(ctx.signer, "email", email),
                "first_name": "Sam",
                "consent_email": "granted",
                "created_at": now,
                "updated_at": now,
            }
        )
        phone = f"+336{10_000_000 + i:08d}"
        rows.append(
            {
                "org_id": tenant.org_id,
                "phone": phone,
                "phone_hash": identity_hash(ctx.signer, "phone", phone),
                "first_name": "Sam",
                "consent_sms": "granted",
                "created_at": now,
                "updated_at": now,
            }
        )
    async with ctx.db.transaction() as session:
        await session.execute(insert(Contact), rows)


async def _send_order(ctx: AppContext, drop_id: int) -> dict[str, list[Contact]]:
    """The contacts of each channel in the order their rows are claimed (by row id)."""
    async with ctx.db.reader() as session:
        rows = (
            await session.execute(
                select(SendRow.channel, Contact)
                .join(Contact, Contact.id == SendRow.contact_id)
                .where(SendRow.drop_id == drop_id)
                .order_by(SendRow.id)
            )
        ).all()
    order: dict[str, list[Contact]] = {"email": [], "sms": []}
    for channel, contact in rows:
        order[channel].append(contact)
    return order


@pytest.fixture
async def transports(
    smtp_peer: tuple[Arrivals, int], sms_peer: tuple[Arrivals, int]
) -> AsyncIterator[tuple[SmtpPool, TwilioSms]]:
    pool = SmtpPool("127.0.0.1", smtp_peer[1], size=4)
    sms = TwilioSms(f"http://127.0.0.1:{sms_peer[1]}", SID, TOKEN)
    try:
        yield pool, sms
    finally:
        await pool.close()
        await sms.close()


async def test_no_message_reaches_anyone_after_their_opt_out_was_acknowledged(
    app_client: httpx.AsyncClient,
    tenant: Tenant,
    ctx: AppContext,
    backend: str,
    smtp_peer: tuple[Arrivals, int],
    sms_peer: tuple[Arrivals, int],
    transports: tuple[SmtpPool, TwilioSms],
) -> None:
    if backend != "postgresql":
        pytest.skip("the acknowledgement guarantee rests on PostgreSQL row locks")
    await _seed(ctx, tenant)
    drop_id = await started_drop(ctx, tenant, drop_spec(channels=["email", "sms"]))
    order = await _send_order(ctx, drop_id)
    assert len(order["email"]) == len(order["sms"]) == PER_CHANNEL
    hook = await _webhook_path(app_client, ctx, tenant)
    base = "https://pop.example"
    email_peer, sms_arrivals = smtp_peer[0], sms_peer[0]
    # Emails go first (their rows come first), then SMS: each channel's opt-outs spread
    # over its own stretch of the send, skipping the first batch.
    step = (PER_CHANNEL - 2 * LEAD) // OPT_OUTS
    plan: list[tuple[str, int, Contact]] = []
    for k in range(OPT_OUTS):
        place = 2 * LEAD + k * step
        plan.append(("email", place, order["email"][place]))
        plan.append(("sms", place, order["sms"][place]))
    acks: dict[str, float] = {}

    async def opt_out(channel: str, place: int, contact: Contact) -> None:
        peer = email_peer if channel == "email" else sms_arrivals
        # The peers count in their own threads: poll rather than wait on a loop Event.
        while peer.received() < place - LEAD:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        if channel == "email":
            token = links.preferences_token(ctx.signer, contact.org_id, contact.id)
            await _unsubscribe(app_client, f"{base}/u/{token}")
            assert contact.email is not None
            acks[contact.email] = time.time()
        else:
            assert contact.phone is not None
            await _text_stop(app_client, hook, contact.phone)
            acks[contact.phone] = time.time()

    pool, sms = transports
    drop_sender = Sender(
        ctx.db,
        ctx.signer,
        ctx.clock,
        base,
        email=pool,
        sms=sms,
        org_id=tenant.org_id,
        concurrency=8,
        in_flight=4,
    )
    started = time.perf_counter()
    opt_outs = [asyncio.create_task(opt_out(*step_)) for step_ in plan]
    handled = await drop_sender.run_until_idle()
    await asyncio.wait_for(asyncio.gather(*opt_outs), 30)
    seconds = time.perf_counter() - started
    assert handled == 2 * PER_CHANNEL

    late: list[tuple[str, float]] = []
    worst: dict[str, float] = {}
    kept = 0
    for channel, _place, contact in plan:
        peer = email_peer if channel == "email" else sms_arrivals
        address = contact.email if channel == "email" else contact.phone
        assert address is not None
        arrived = peer.at.get(address, [])
        if not arrived:
            kept += 1
            continue
        gap = max(arrived) - acks[address]
        worst[channel] = max(worst.get(channel, gap), gap)
        if gap > 0:
            late.append((address, gap))
    print(
        f"\n{2 * PER_CHANNEL} messages in {seconds:.1f} s; {2 * OPT_OUTS} opt-outs, "
        f"{kept} honoured before the message; worst message-minus-acknowledgement: "
        + ", ".join(f"{ch} {gap * 1000:+.1f} ms" for ch, gap in sorted(worst.items()))
        + f"; {len(late)} after the acknowledgement"
    )
    assert late == [], f"messages after the opt-out was acknowledged: {late}"
    assert kept > 0  # the opt-outs did land mid-send
    # Everyone else got exactly their one message.
    opted = {contact.id for _ch, _p, contact in plan}
    for channel, peer in (("email", email_peer), ("sms", sms_arrivals)):
        for contact in order[channel]:
            address = contact.email if channel == "email" else contact.phone
            assert address is not None
            if contact.id not in opted:
                assert len(peer.at.get(address, [])) == 1, address


# ---------------------------------------------------------------- both backends


@dataclass
class OptOutWhileSending:
    """A provider that, while it carries the first message of a batch, has another person
    of the same batch unsubscribe (through the app) and waits for the acknowledgement."""

    client: httpx.AsyncClient
    unsubscribe_url: str
    sent: list[str] = field(default_factory=list)
    acknowledged: bool = False

    async def send(self, message: OutboundEmail | OutboundSms) -> SendResult:
        if not self.acknowledged:
            self.acknowledged = True
            await _unsubscribe(self.client, self.unsubscribe_url)
        self.sent.append(message.to)
        return SendResult(ok=True, provider_id=f"p-{len(self.sent)}")

    async def close(self) -> None:
        return None


async def test_an_opt_out_acknowledged_during_the_batch_skips_that_persons_message(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, backend: str
) -> None:
    if backend == "postgresql":
        # On PostgreSQL the consent gate share-locks the rows it checked until their
        # provider calls return, so an opt-out awaited inside a provider call waits on a
        # lock its own sender holds (a test-only cycle: real providers never call back
        # into the app). PostgreSQL is covered by the 2,000-contact race above.
        pytest.skip("PostgreSQL: covered by the concurrent race test; see the comment")
    first = await add_contact(app_client, tenant, email="first@x.io")
    await add_contact(app_client, tenant, email="second@x.io")
    last = await add_contact(app_client, tenant, email="last@x.io")
    drop_id = await started_drop(ctx, tenant, drop_spec())
    async with ctx.db.reader() as session:
        contact = await session.get(Contact, last["id"])
        assert contact is not None
        token = links.preferences_token(ctx.signer, contact.org_id, contact.id)
    provider = OptOutWhileSending(app_client, f"https://pop.example/u/{token}")
    # One at a time, so the opt-out is acknowledged before the last message is decided.
    one_by_one = sender(ctx, provider, org=tenant)  # type: ignore[arg-type]
    one_by_one.concurrency = 1
    await one_by_one.run_until_idle()

    assert provider.acknowledged
    assert provider.sent[0] == first["email"]
    assert "last@x.io" not in provider.sent
    async with ctx.db.reader() as session:
        outcome = await session.scalar(
            select(SendRow.outcome).where(
                SendRow.drop_id == drop_id, SendRow.contact_id == last["id"]
            )
        )
    assert outcome == "no_consent"
