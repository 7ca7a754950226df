"""SMTP pool against a real aiosmtpd peer; Twilio adapter against local fakes."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import uvicorn
from aiosmtpd.controller import Controller
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from popdrop.core.errors import PopdropError
from popdrop.outbound.smtp import SmtpPool, build_message, render_message
from popdrop.outbound.transports import OutboundEmail, OutboundSms
from popdrop.outbound.twilio import (
    TwilioSms,
    compute_signature,
    parse_form,
    parse_inbound,
    parse_retry_after,
    parse_status_callback,
    validate_signature,
)

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


# --- SMTP -------------------------------------------------------------------------------


@dataclass
class Peer:
    """aiosmtpd handler: records messages and the client connections they came on."""

    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    peers: set[tuple[str, int]] = field(default_factory=set)
    ehlos: int = 0

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.ehlos += 1
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("closing"):
            return "421 4.3.2 Service shutting down, closing transmission channel"
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("gone"):
            return "550 5.1.1 <" + address + ">: Recipient address rejected: User unknown"
        if address.startswith("busy"):
            return "451 4.7.1 Greylisted, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if b"X-Test-Reject: yes" in envelope.content:
            return "554 5.7.1 Message content rejected"
        self.peers.add(session.peer)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Message accepted"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def smtp_peer() -> Iterator[tuple[Peer, Controller]]:
    peer = Peer()
    controller = Controller(peer, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield peer, controller
    finally:
        controller.stop()


def outbound(to: str = "ann@example.com", n: int = 1, **extra: Any) -> OutboundEmail:
    fields: dict[str, Any] = {
        "message_id": f"<drop-7.contact-{n}@shop.example>",
        "to": to,
        "from_address": "drops@shop.example",
        "from_name": "Pop Shop, Berlin",
        "subject": "Your drop starts now — 20 % off",
        "text": f"Hi Ann,\nyour code is K7QX-{n}.\n",
        "html": f"<p>Hi Ann, your code is <b>K7QX-{n}</b>.</p>",
        "headers": {
            "List-Unsubscribe": f"<https://shop.example/u/{'t' * 90}{n}>, <mailto:u@shop.example>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "X-Popdrop-Drop": "7",
        },
    }
    fields.update(extra)
    return OutboundEmail(**fields)


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


async def test_message_arrives_with_exact_id_both_parts_and_rfc8058_headers(
    smtp_peer: tuple[Peer, Controller],
) -> None:
    peer, controller = smtp_peer
    pool = SmtpPool(controller.hostname, controller.port, size=2)
    sent = outbound()
    result = await pool.send(sent)
    await pool.close()

    assert result.ok and result.provider_id == sent.message_id
    [(mail_from, rcpts, raw)] = peer.messages
    assert (mail_from, rcpts) == ("drops@shop.example", ["ann@example.com"])
    assert b"\r\nMessage-ID: <drop-7.contact-1@shop.example>\r\n" in b"\r\n" + raw
    got = parse(raw)
    assert got["Message-ID"] == sent.message_id
    assert got["From"].addresses[0].display_name == "Pop Shop, Berlin"
    assert got["From"].addresses[0].addr_spec == "drops@shop.example"
    assert got["To"] == "ann@example.com"
    assert got["Subject"] == sent.subject
    assert got["Date"].datetime.tzinfo is not None
    assert got["List-Unsubscribe"] == sent.headers["List-Unsubscribe"]
    assert got["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert got["X-Popdrop-Drop"] == "7"
    assert got.get_content_type() == "multipart/alternative"
    plain = got.get_body(("plain",))
    html = got.get_body(("html",))
    assert plain is not None and html is not None
    # The wire carries CRLF; the decoded parts are the exact texts.
    assert plain.get_content().replace("\r\n", "\n") == sent.text
    assert html.get_content() == sent.html
    # Every line within RFC 5322's hard limit, and 7-bit clean.
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert raw.isascii()


def test_build_message_matches_the_wire_format() -> None:
    sent = outbound(html=None, text="Only text, ünïcödé\n")
    message = build_message(sent)
    assert message["Message-ID"] == sent.message_id
    assert message.get_content_type() == "text/plain"
    assert message.get_content() == "Only text, ünïcödé\n"
    assert message.as_bytes(policy=email.policy.SMTP).count(b"\r\n") > 5
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert render_message(sent).count(b"Message-ID:") == 1


def test_header_injection_is_refused() -> None:
    with pytest.raises(ValueError):
        render_message(outbound(subject="hi\r\nBcc: victim@example.com"))
    with pytest.raises(ValueError):
        render_message(outbound(headers={"Message-ID": "<other@x>"}))


async def test_pool_reuses_its_connections(smtp_peer: tuple[Peer, Controller]) -> None:
    peer, controller = smtp_peer
    pool = SmtpPool(controller.hostname, controller.port, size=3)
    results = await asyncio.gather(*(pool.send(outbound(n=i)) for i in range(60)))
    results += [await pool.send(outbound(n=i)) for i in range(60, 70)]
    await pool.close()

    assert all(r.ok for r in results)
    assert len(peer.messages) == 70
    assert len({parse(raw)["Message-ID"] for _, _, raw in peer.messages}) == 70
    # At most `size` connections, each with one EHLO, for 70 messages.
    assert 1 <= len(peer.peers) <= 3
    assert pool.connections_opened == len(peer.peers)
    assert peer.ehlos == pool.connections_opened


async def test_550_is_permanent_with_the_server_text(smtp_peer: tuple[Peer, Controller]) -> None:
    peer, controller = smtp_peer
    pool = SmtpPool(controller.hostname, controller.port, size=1)
    result = await pool.send(outbound(to="gone@example.com"))
    assert not result.ok and result.permanent
    assert result.error is not None and "550" in result.error and "User unknown" in result.error

    rejected = await pool.send(outbound(headers={"X-Test-Reject": "yes"}))
    assert not rejected.ok and rejected.permanent
    assert rejected.error is not None and rejected.error.startswith("554")

    # The connection survives a refused transaction (RSET) and keeps being used.
    assert (await pool.send(outbound())).ok
    await pool.close()
    assert pool.connections_opened == 1
    assert len(peer.messages) == 1


async def test_451_is_transient(smtp_peer: tuple[Peer, Controller]) -> None:
    _, controller = smtp_peer
    pool = SmtpPool(controller.hostname, controller.port, size=1)
    result = await pool.send(outbound(to="busy@example.com"))
    await pool.close()
    assert not result.ok and not result.permanent
    assert result.error is not None and result.error.startswith("451")


async def test_unreachable_server_is_transient() -> None:
    pool = SmtpPool("127.0.0.1", free_port(), size=1, timeout=2)
    result = await pool.send(outbound())
    await pool.close()
    assert not result.ok and not result.permanent


async def test_pool_reconnects_after_the_server_drops_idle_connections() -> None:
    peer = Peer()
    port = free_port()
    first = Controller(peer, hostname="127.0.0.1", port=port)
    first.start()
    pool = SmtpPool("127.0.0.1", port, size=1)
    try:
        assert (await pool.send(outbound(n=1))).ok
    finally:
        first.stop()  # drops the pooled connection
    second = Controller(peer, hostname="127.0.0.1", port=port)
    second.start()
    try:
        result = await pool.send(outbound(n=2))
    finally:
        await pool.close()
        second.stop()
    assert result.ok, result.error
    assert pool.connections_opened == 2
    assert [parse(raw)["Message-ID"] for _, _, raw in peer.messages] == [
        "<drop-7.contact-1@shop.example>",
        "<drop-7.contact-2@shop.example>",
    ]


# --- Twilio ---------------------------------------------------------------------------------

SID = "ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
TOKEN = "test-auth-token"
MESSAGES_PATH = f"/2010-04-01/Accounts/{SID}/Messages.json"


def fake_twilio(request: httpx.Request) -> httpx.Response:
    """Answers like Twilio's Messages endpoint, picking the outcome from `To`."""
    assert request.method == "POST"
    assert request.url.path == MESSAGES_PATH
    expected = "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    if request.headers.get("Authorization") != expected:
        return httpx.Response(401, json={"code": 20003, "message": "Authenticate", "status": 401})
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = dict(parse_qsl(request.content.decode()))
    to = form["To"]
    if to == "+1555":
        return httpx.Response(400, content=fixture_bytes("twilio_error_21211.json"))
    if to == "+14155550999":
        return httpx.Response(400, content=fixture_bytes("twilio_error_21610.json"))
    if to == "+14155550429":
        return httpx.Response(
            429, content=fixture_bytes("twilio_error_20429.json"), headers={"Retry-After": "7"}
        )
    if to == "+14155550500":
        return httpx.Response(503, text="<html>upstream unavailable</html>")
    if to == "+14155550000":
        raise httpx.ConnectError("connection refused", request=request)
    body = json.loads(fixture_bytes("twilio_message_created.json"))
    body.update(to=to, body=form["Body"], **{"from": form["From"]})
    assert form.get("StatusCallback") == "https://popdrop.example/hooks/sms/status"
    return httpx.Response(201, json=body)


@pytest.fixture
async def twilio() -> AsyncIterator[TwilioSms]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake_twilio))
    yield TwilioSms("https://api.twilio.test/", SID, TOKEN, client=client)
    await client.aclose()


def sms(to: str) -> OutboundSms:
    return OutboundSms(
        to=to,
        from_number="+15005550006",
        body="Drop is live: 20% off with code K7QX-9MPR-2WZD",
        status_callback="https://popdrop.example/hooks/sms/status",
    )


async def test_twilio_success(twilio: TwilioSms) -> None:
    result = await twilio.send(sms("+14155550123"))
    assert result.ok
    assert result.provider_id == "SM3b2a1f0e8ae6ade43cb3c0ce45254240"


async def test_twilio_invalid_number_and_unsubscribed_are_permanent(twilio: TwilioSms) -> None:
    invalid = await twilio.send(sms("+1555"))
    assert not invalid.ok and invalid.permanent
    assert invalid.error is not None and invalid.error.startswith("21211 ")
    stopped = await twilio.send(sms("+14155550999"))
    assert not stopped.ok and stopped.permanent
    assert stopped.error is not None and "21610" in stopped.error


async def test_twilio_rate_limit_and_outages_are_transient(twilio: TwilioSms) -> None:
    limited = await twilio.send(sms("+14155550429"))
    assert not limited.ok and not limited.permanent
    assert limited.retry_after == 7.0
    down = await twilio.send(sms("+14155550500"))
    assert not down.ok and not down.permanent
    unreachable = await twilio.send(sms("+14155550000"))
    assert not unreachable.ok and not unreachable.permanent


async def test_twilio_bad_credentials_do_not_condemn_the_number() -> None:
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake_twilio))
    sender = TwilioSms("https://api.twilio.test", SID, "wrong-token", client=client)
    result = await sender.send(sms("+14155550123"))
    await client.aclose()
    assert not result.ok and not result.permanent
    assert result.error is not None and "20003" in result.error


def test_retry_after_accepts_an_http_date() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 5, 14, 9, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 14 May 2026 09:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("garbage") is None
    assert parse_retry_after(None) is None


async def test_twilio_against_a_real_local_http_server() -> None:
    received: list[dict[str, str]] = []

    async def messages(request: Request) -> JSONResponse:
        auth = request.headers.get("authorization", "")
        if auth != "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode():
            return JSONResponse({"code": 20003, "message": "Authenticate"}, status_code=401)
        form = {k: str(v) for k, v in (await request.form()).items()}
        received.append(form)
        if form["To"] == "+1555":
            return JSONResponse(json.loads(fixture_bytes("twilio_error_21211.json")), 400)
        body = json.loads(fixture_bytes("twilio_message_created.json"))
        body["sid"] = f"SM{len(received):032d}"
        return JSONResponse(body, status_code=201)

    app = Starlette(routes=[Route(MESSAGES_PATH, messages, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.01)
        sender = TwilioSms(f"http://127.0.0.1:{port}", SID, TOKEN)
        ok = await sender.send(sms("+14155550123"))
        bad = await sender.send(sms("+1555"))
        await sender.close()
    finally:
        server.should_exit = True
        await task
        sock.close()
    assert ok.ok and ok.provider_id == f"SM{1:032d}"
    assert not bad.ok and bad.permanent and bad.error is not None and "21211" in bad.error
    assert received[0] == {
        "To": "+14155550123",
        "From": "+15005550006",
        "Body": "Drop is live: 20% off with code K7QX-9MPR-2WZD",
        "StatusCallback": "https://popdrop.example/hooks/sms/status",
    }


# --- Twilio webhooks ----------------------------------------------------------------------------

DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOC_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+12349013030",
    "Digits": "1234",
    "From": "+12349013030",
    "To": "+18005551212",
}
DOC_SIGNATURE = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="  # Twilio's worked example, token "12345"


def test_signature_matches_twilios_documented_example() -> None:
    assert compute_signature("12345", DOC_URL, DOC_PARAMS) == DOC_SIGNATURE
    assert validate_signature("12345", DOC_URL, DOC_PARAMS, DOC_SIGNATURE)
    # A proxy that adds the default port does not break validation.
    assert validate_signature(
        "12345", "https://mycompany.com:443/myapp.php?foo=1&bar=2", DOC_PARAMS, DOC_SIGNATURE
    )


def test_tampered_requests_fail_signature_validation() -> None:
    assert not validate_signature("12345", DOC_URL, {**DOC_PARAMS, "Digits": "9999"}, DOC_SIGNATURE)
    assert not validate_signature("12345", DOC_URL + "&baz=3", DOC_PARAMS, DOC_SIGNATURE)
    assert not validate_signature("54321", DOC_URL, DOC_PARAMS, DOC_SIGNATURE)
    assert not validate_signature("12345", DOC_URL, DOC_PARAMS, "0/KCTR6DLpKmkAf8muzZqo1nDgQ")
    assert not validate_signature("12345", DOC_URL, DOC_PARAMS, None)
    extra = {**DOC_PARAMS, "Extra": ""}  # blank params are signed too
    assert not validate_signature("12345", DOC_URL, extra, DOC_SIGNATURE)


def test_inbound_message_webhook() -> None:
    params = parse_form(fixture_bytes("twilio_inbound.form").strip())
    url = "https://popdrop.example/hooks/sms/inbound"
    signature = compute_signature(TOKEN, url, params)
    assert validate_signature(TOKEN, url, params, signature)
    inbound = parse_inbound(params)
    assert inbound.sender == "+14155550123"
    assert inbound.to == "+15005550006"
    assert inbound.body == "STOP"
    assert inbound.message_sid == "SM1f0e8ae6ade43cb3c0ce4525424e404f"
    assert inbound.account_sid == SID
    assert params["ToCity"] == ""  # blanks survive parsing (they are signed)


def test_status_callbacks() -> None:
    delivered = parse_status_callback(parse_form(fixture_bytes("twilio_status_delivered.form")))
    assert delivered.status == "delivered" and delivered.delivered and not delivered.failed
    assert delivered.error_code is None
    assert delivered.message_sid == "SM3b2a1f0e8ae6ade43cb3c0ce45254240"
    failed = parse_status_callback(parse_form(fixture_bytes("twilio_status_undelivered.form")))
    assert failed.status == "undelivered" and failed.failed
    assert failed.error_code == 30003
    assert failed.to == "+14155550124"


@pytest.mark.parametrize(
    "params",
    [
        {"MessageSid": "SM1", "MessageStatus": "exploded"},
        {"MessageStatus": "sent"},
        {"MessageSid": "SM1", "MessageStatus": "failed", "ErrorCode": "x"},
    ],
)
def test_bad_status_callbacks_are_invalid_requests(params: dict[str, str]) -> None:
    with pytest.raises(PopdropError) as caught:
        parse_status_callback(params)
    assert caught.value.reason == "invalid_request"


def test_inbound_without_sender_is_an_invalid_request() -> None:
    with pytest.raises(PopdropError):
        parse_inbound({"MessageSid": "SM1", "AccountSid": SID, "To": "+1500", "Body": "STOP"})
    with pytest.raises(PopdropError):
        parse_form(b"\xff\xfe")


def test_build_message_has_both_parts_verbatim() -> None:
    sent = outbound(text="Hällo\n\nline two = fine\n", html="<p>" + "x" * 300 + "</p>")
    message = build_message(sent)
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain is not None and html is not None
    assert plain.get_content() == sent.text
    assert html.get_content() == sent.html
    assert message["From"].addresses[0].display_name == "Pop Shop, Berlin"


async def test_421_is_transient_and_replaces_the_connection(
    smtp_peer: tuple[Peer, Controller],
) -> None:
    peer, controller = smtp_peer
    pool = SmtpPool(controller.hostname, controller.port, size=1)
    closing = await pool.send(outbound(from_address="closing@shop.example"))
    assert not closing.ok and not closing.permanent
    assert closing.error is not None and closing.error.startswith("421")
    assert (await pool.send(outbound())).ok
    await pool.close()
    assert pool.connections_opened == 2
    assert len(peer.messages) == 1


async def test_invalid_addresses_fail_permanently_without_a_connection() -> None:
    pool = SmtpPool("127.0.0.1", free_port(), size=1)
    for to in ("no-at-sign", "a b@example.com", "ünï@example.com", "x@example.com>"):
        result = await pool.send(outbound(to=to))
        assert not result.ok and result.permanent, to
    assert (await pool.send(outbound(to="ann@bücher.example"))).permanent is False  # IDNA ok
    await pool.close()
    assert pool.connections_opened == 0


async def test_waiting_senders_are_not_stranded_when_connections_die() -> None:
    peer = Peer()
    port = free_port()
    controller = Controller(peer, hostname="127.0.0.1", port=port)
    controller.start()
    pool = SmtpPool("127.0.0.1", port, size=1, timeout=2)
    assert (await pool.send(outbound(n=1))).ok
    controller.stop()  # the one pooled connection dies; nobody listens any more
    results = await asyncio.wait_for(
        asyncio.gather(*(pool.send(outbound(n=i)) for i in range(2, 6))), timeout=20
    )
    await pool.close()
    assert all(not r.ok and not r.permanent for r in results)


@pytest.mark.parametrize(
    "subject",
    [
        "Gaëlle, your hot invite: the drop is on",
        "é" * 120,
        "日本語のドロップ今日だけ" * 4,
        "Emoji 🎉 in the middle 🎉 of a long subject line that needs folding " * 2,
    ],
)
def test_non_ascii_subjects_are_encoded_words_that_decode_exactly(subject: str) -> None:
    raw = render_message(outbound(subject=subject))
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    assert all(len(line) <= 78 for line in head.split(b"\r\n") if b"=?utf-8?" in line)
    assert build_message(outbound(subject=subject))["Subject"] == subject
