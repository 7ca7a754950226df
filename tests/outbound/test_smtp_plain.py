"""SMTP to a plain local relay (no STARTTLS, no login) against a real aiosmtpd peer, and
session-level replies that must not condemn a recipient."""

from __future__ import annotations

import contextlib
import email
import email.policy
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from popdrop.outbound.smtp import SmtpPool, classify
from tests.drops.test_transports import Peer, free_port, outbound


class PlainRelay(Peer):
    """A relay that answers a MAIL for `desync@…` as if the session lost its greeting."""

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("desync"):
            return "503 5.5.1 Error: send HELO first"
        return await super().handle_MAIL(server, session, envelope, address, options)


class OldRelay(PlainRelay):
    """A relay that knows only HELO (RFC 821)."""

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return ["502 5.5.2 Error: command not recognized"]


@contextlib.contextmanager
def running(peer: PlainRelay, **smtp: Any) -> Iterator[tuple[PlainRelay, Controller]]:
    # No TLS context, no auth: what `POPDROP_SMTP_STARTTLS=false` on port 25 talks to.
    controller = Controller(peer, hostname="127.0.0.1", port=free_port(), **smtp)
    controller.start()
    try:
        yield peer, controller
    finally:
        controller.stop()


@pytest.fixture
def relay() -> Iterator[tuple[PlainRelay, Controller]]:
    with running(PlainRelay()) as started:
        yield started


def parsed(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


async def test_plain_relay_without_starttls_or_login_delivers(
    relay: tuple[PlainRelay, Controller],
) -> None:
    peer, controller = relay
    pool = SmtpPool(controller.hostname, controller.port, size=1, start_tls=False)
    try:
        first = await pool.send(outbound("ann@example.com", n=1))
        second = await pool.send(outbound("bob@example.com", n=2))  # the pooled connection
    finally:
        await pool.close()
    assert first.ok and second.ok, (first, second)
    assert pool.connections_opened == 1 and peer.ehlos == 1  # greeted once, then reused
    assert [(m[0], m[1]) for m in peer.messages] == [
        ("drops@shop.example", ["ann@example.com"]),
        ("drops@shop.example", ["bob@example.com"]),
    ]
    message = parsed(peer.messages[0][2])
    assert message["Message-ID"] == "<drop-7.contact-1@shop.example>"
    assert message["To"] == "ann@example.com"
    assert message["Subject"] == "Your drop starts now — 20 % off"
    assert message["From"].addresses[0].display_name == "Pop Shop, Berlin"
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain is not None
    assert plain.get_content().splitlines() == ["Hi Ann,", "your code is K7QX-1."]
    assert html is not None and "<b>K7QX-1</b>" in html.get_content()


async def test_a_relay_that_refuses_ehlo_is_greeted_with_helo() -> None:
    with running(OldRelay()) as (peer, controller):
        pool = SmtpPool(controller.hostname, controller.port, size=1, start_tls=False)
        try:
            result = await pool.send(outbound())
        finally:
            await pool.close()
    assert result.ok, result
    assert len(peer.messages) == 1


async def test_a_session_error_is_transient_and_retried_on_a_fresh_connection(
    relay: tuple[PlainRelay, Controller],
) -> None:
    peer, controller = relay
    pool = SmtpPool(controller.hostname, controller.port, size=1, start_tls=False)
    try:
        result = await pool.send(outbound(from_address="desync@shop.example"))
        assert pool.connections_opened == 2  # the refused session was replaced once
        after = await pool.send(outbound())
    finally:
        await pool.close()
    # Not the recipient's fault: not permanent, the server's text kept for the operator.
    assert not result.ok and not result.permanent
    assert result.error == "503 5.5.1 Error: send HELO first"
    assert after.ok and len(peer.messages) == 1


def test_session_replies_are_transient_and_recipient_replies_permanent() -> None:
    from aiosmtplib.errors import SMTPRecipientRefused, SMTPSenderRefused

    for code in (500, 502, 503, 504, 530, 535):
        verdict = classify(SMTPSenderRefused(code, "nope", "a@b.example"))
        assert not verdict.permanent and verdict.error == f"{code} nope"
    for code in (550, 551, 553, 554):
        assert classify(SMTPRecipientRefused(code, "user unknown", "a@b.example")).permanent


def self_signed(directory: Path) -> ssl.SSLContext:
    """A server TLS context with a throwaway certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


async def test_starttls_without_login_greets_again_after_the_upgrade(tmp_path: Path) -> None:
    """RFC 3207: the session starts over after STARTTLS; without AUTH nothing else would
    say EHLO on the encrypted channel."""
    tls = self_signed(tmp_path)
    with running(PlainRelay(), tls_context=tls, require_starttls=True) as (peer, controller):
        pool = SmtpPool(
            controller.hostname, controller.port, size=1, start_tls=True, validate_certs=False
        )
        try:
            result = await pool.send(outbound())
        finally:
            await pool.close()
    assert result.ok, result
    assert peer.ehlos == 2  # before STARTTLS and after it
    assert [rcpts for _from, rcpts, _raw in peer.messages] == [["ann@example.com"]]
