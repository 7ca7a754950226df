"""Email over SMTP: a pool of persistent aiosmtplib connections.

Speed comes from three things: connections are opened once and reused (one EHLO, one
STARTTLS, one AUTH per connection, never per message); the message is serialised by
`render_message`, a small writer that produces the RFC 5322 bytes directly instead of going
through the `email` package's header parsing; and the pool hands out an idle connection
without awaiting when one is free.

`build_message` returns the same message as an `EmailMessage` (parsed from those exact
bytes, so what tests and previews see is what goes on the wire).

Every connection greets the server (EHLO, HELO when EHLO is refused) before its first
transaction, whatever the TLS and login settings: aiosmtplib only greets as part of
STARTTLS or AUTH, and a plain relay (`start_tls=False`, no login) otherwise answers
`503 send HELO first` to every MAIL. STARTTLS resets the greeting, so the check runs
after it.

Failure classes (`SendResult.permanent`): a 5xx reply to MAIL/RCPT/DATA is permanent and
keeps the server's text, unless the reply is about the session rather than the message
(`SESSION_CODES`: bad sequence, command unknown, authentication required), which is
transient and retires the connection; a 4xx reply, a dropped connection, a timeout, or a
failure while *opening* a connection (connect, EHLO, STARTTLS, AUTH) is transient too —
none of these says anything about the recipient, so none may mark an address as
undeliverable.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import email
import email.policy
import secrets
import time
from email.header import Header
from email.message import EmailMessage
from email.utils import formataddr, formatdate

import aiosmtplib
from aiosmtplib.errors import (
    SMTPException,
    SMTPHeloError,
    SMTPRecipientRefused,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
)

from popdrop.outbound.transports import OutboundEmail, SendResult

# Headers the renderer writes itself; callers may not override them through `headers`.
_RESERVED = frozenset(
    {
        "message-id",
        "date",
        "from",
        "to",
        "subject",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    }
)
# RFC 5322 §2.1.1: 998 octets per line is a MUST; past that we fold.
_MAX_LINE = 998
# 5xx replies about the SMTP session, not the message or its recipient (RFC 5321 §4.2.4,
# RFC 4954 §6): command unrecognised or not implemented, bad sequence of commands (503
# "send HELO first"), parameter not implemented, authentication required, too weak,
# failed or needing encryption.
SESSION_CODES = frozenset({500, 502, 503, 504, 530, 534, 535, 538})


class MessageError(ValueError):
    """The message cannot be written safely (header injection, unencodable address)."""


def _check_value(name: str, value: str) -> None:
    # A CR or LF in a header value would let template content inject headers.
    if "\r" in value or "\n" in value:
        raise MessageError(f"header {name} contains a line break")


def _encoded_words(value: str) -> str:
    """RFC 2047 "B" encoded words, one per continuation line. Each holds at most 42 UTF-8
    bytes (56 base64 characters, 68 with the wrapper: a line stays under 78 after a
    header name), never splitting a character;
    decoders drop the folding between adjacent encoded words (RFC 2047 §6.2). The
    stdlib's `Header` does the same in ~170 µs per subject, this in ~10 µs."""
    words: list[bytes] = []
    chunk = b""
    for char in value:
        encoded = char.encode()
        if len(chunk) + len(encoded) > 42:
            words.append(chunk)
            chunk = b""
        chunk += encoded
    words.append(chunk)
    return "\r\n ".join(f"=?utf-8?b?{base64.b64encode(w).decode('ascii')}?=" for w in words)


def _header(name: str, value: str) -> str:
    _check_value(name, value)
    if value.isascii():
        if len(name) + 2 + len(value) <= _MAX_LINE:
            return f"{name}: {value}\r\n"
    elif value.isprintable():
        return f"{name}: {_encoded_words(value)}\r\n"
    # Over-long ASCII, or control characters: the stdlib folds and encodes.
    encoded = Header(value, "utf-8" if not value.isascii() else "us-ascii", header_name=name)
    return f"{name}: {encoded.encode(linesep=chr(13) + chr(10))}\r\n"


def _ascii_address(address: str) -> str:
    """The address as SMTP and the To/From header need it: ASCII, IDNA domain."""
    _check_value("address", address)
    if address.isascii():
        return address
    local, sep, domain = address.rpartition("@")
    if not sep or not local.isascii():
        # A non-ASCII local part needs SMTPUTF8 end to end; refuse instead of mangling.
        raise MessageError(f"address {address!r} needs SMTPUTF8")
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError as exc:
        raise MessageError(f"address {address!r} has an invalid domain") from exc


_ENVELOPE_FORBIDDEN = frozenset('<>()[]\\,;:" \t')


def _envelope_address(address: str) -> bytes:
    """The address as an SMTP path argument. Checked here, once, so the transaction can
    skip aiosmtplib's per-command address re-parsing (4 parses per message otherwise)."""
    ascii_address = _ascii_address(address)
    local, sep, domain = ascii_address.rpartition("@")
    if not sep or not local or not domain or any(c in _ENVELOPE_FORBIDDEN for c in ascii_address):
        raise MessageError(f"address {address!r} is not a plain mailbox")
    if not ascii_address.isprintable():
        raise MessageError(f"address {address!r} contains control characters")
    return ascii_address.encode("ascii")


async def _transaction(
    client: aiosmtplib.SMTP, sender: bytes, recipient: bytes, data: bytes
) -> None:
    """MAIL, RCPT, DATA on an open connection: `sendmail` minus its per-message address
    parsing and SIZE computation, which cost more CPU than the protocol itself."""
    try:
        reply = await client.execute_command(b"MAIL", b"FROM:<" + sender + b">")
        if reply.code != 250:
            raise SMTPSenderRefused(reply.code, reply.message, sender.decode())
        reply = await client.execute_command(b"RCPT", b"TO:<" + recipient + b">")
        if reply.code not in (250, 251):
            raise SMTPRecipientRefused(reply.code, reply.message, recipient.decode())
        await client.data(data)  # raises SMTPDataError on a non-250 reply
    except SMTPResponseException:
        # Reset the envelope so the connection can carry the next message.
        if client.is_connected:
            with contextlib.suppress(SMTPException, OSError, TimeoutError):
                await client.rset()
        raise


def _part(subtype: str, body: str) -> str:
    # Quoted-printable in UTF-8 for every part: 7-bit safe, short lines, readable, and
    # binascii does it in C. `=` is always escaped, so a boundary containing "=_" can
    # never occur inside an encoded body (RFC 2045 §6.7 / §5.1.1 advice).
    normalized = body.replace("\r\n", "\n").replace("\r", "\n")
    encoded = binascii.b2a_qp(normalized.encode("utf-8")).decode("ascii")
    return (
        f"Content-Type: text/{subtype}; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n"
        "\r\n" + encoded.replace("\n", "\r\n")
    )


_date_cache: tuple[int, str] = (0, "")


def _date_header() -> str:
    # formatdate costs ~7 µs; one value per second is exact enough for a Date header.
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, f"Date: {formatdate(now, usegmt=True)}\r\n")
    return _date_cache[1]


def render_message(message: OutboundEmail) -> bytes:
    """The complete RFC 5322 message as CRLF bytes, ready for SMTP DATA."""
    out = [
        _header("Message-ID", message.message_id),
        _date_header(),
        # formataddr quotes display names and RFC 2047-encodes non-ASCII ones.
        _header("From", formataddr((message.from_name, _ascii_address(message.from_address)))),
        _header("To", _ascii_address(message.to)),
        _header("Subject", message.subject),
    ]
    for name, value in message.headers.items():
        if name.lower() in _RESERVED or not name.isascii() or not name.replace("-", "").isalnum():
            raise MessageError(f"header {name!r} cannot be set by the caller")
        out.append(_header(name, value))
    out.append("MIME-Version: 1.0\r\n")
    if message.html is None:
        out.append(_part("plain", message.text))
    else:
        boundary = "=_pd_" + secrets.token_hex(12)
        out.append(f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n')
        # Plain first, HTML last: clients show the last alternative they understand.
        out.append(f"--{boundary}\r\n{_part('plain', message.text)}\r\n")
        out.append(f"--{boundary}\r\n{_part('html', message.html)}\r\n")
        out.append(f"--{boundary}--\r\n")
    return "".join(out).encode("ascii")


def build_message(message: OutboundEmail) -> EmailMessage:
    """The message as an `EmailMessage`, parsed from the bytes `SmtpPool` sends (with
    `\n` line ends, the stdlib's native form: `as_bytes(policy=SMTP)` gives CRLF back)."""
    raw = render_message(message).replace(b"\r\n", b"\n")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _replied(code: int, message: str) -> SendResult:
    # 421 ("closing channel") is 4xx, hence transient like every other 4xx; a session
    # error is the connection's fault, so it is transient as well.
    permanent = 500 <= code < 600 and code not in SESSION_CODES
    return SendResult(ok=False, permanent=permanent, error=f"{code} {message}")


def classify(exc: BaseException) -> SendResult:
    """Map an aiosmtplib failure during a mail transaction to a `SendResult`."""
    if isinstance(exc, SMTPRecipientsRefused):
        # One recipient per transaction, so the first refusal is the answer.
        first = exc.recipients[0] if exc.recipients else None
        if first is None:
            return SendResult(ok=False, permanent=False, error="recipient refused")
        return _replied(first.code, first.message)
    if isinstance(exc, SMTPResponseException):
        return _replied(exc.code, exc.message)
    return SendResult(ok=False, permanent=False, error=f"{type(exc).__name__}: {exc}")


_BEFORE_DATA = (SMTPSenderRefused, SMTPRecipientRefused)


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO (HELO when EHLO is refused) unless STARTTLS or AUTH already greeted."""
    if not client.is_ehlo_or_helo_needed:
        return
    try:
        await client.ehlo()
    except SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()


class SmtpPool:
    """EmailTransport over `size` persistent SMTP connections, opened lazily."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        size: int = 4,
        username: str | None = None,
        password: str | None = None,
        use_tls: bool = False,
        start_tls: bool | None = None,
        timeout: float = 30,
        validate_certs: bool = True,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.host = host
        self.port = port
        self.size = size
        self._username = username
        self._password = password
        self._use_tls = use_tls
        self._start_tls = start_tls
        self._timeout = timeout
        self._validate_certs = validate_certs
        # A slot is the right to hold one connection: idle connections + slots taken never
        # exceed `size`, and a discarded connection frees its slot for a waiting sender.
        self._slots = asyncio.Semaphore(size)
        self._idle: collections.deque[aiosmtplib.SMTP] = collections.deque()
        self._closed = False
        self.connections_opened = 0  # total over the pool's life (observability, tests)

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            username=self._username,
            password=self._password,
            use_tls=self._use_tls,
            start_tls=self._start_tls,
            timeout=self._timeout,
            validate_certs=self._validate_certs,
        )
        # connect() performs STARTTLS and AUTH (each greeting first) once for the
        # connection's life; a plain connection is greeted here.
        await client.connect()
        try:
            await _greet(client)
        except BaseException:
            client.close()
            raise
        self.connections_opened += 1
        return client

    async def _acquire(self) -> tuple[aiosmtplib.SMTP, bool]:
        """An idle connection (reused=True), else a new one; waits while all are busy."""
        await self._slots.acquire()  # returns without suspending while a slot is free
        if self._idle:
            return self._idle.pop(), True  # fast path: no NOOP probe, no EHLO
        try:
            return await self._connect(), False
        except BaseException:
            self._slots.release()
            raise

    def _release(self, client: aiosmtplib.SMTP) -> None:
        if self._closed:
            client.close()
        else:
            self._idle.append(client)
        self._slots.release()

    def _discard(self, client: aiosmtplib.SMTP) -> None:
        # close() drops the socket without a QUIT round trip: the connection is broken
        # or unwanted, and waiting for the server helps nobody.
        client.close()
        self._slots.release()

    async def send(self, message: OutboundEmail) -> SendResult:
        if self._closed:
            return SendResult(ok=False, permanent=False, error="transport closed")
        try:
            data = render_message(message)
            sender = _envelope_address(message.from_address)
            recipient = _envelope_address(message.to)
        except MessageError as exc:
            return SendResult(ok=False, permanent=True, error=str(exc))
        # A reused connection may have been closed by the server while idle, or its session
        # refused (a session-level reply to MAIL or RCPT); the message then never reached
        # DATA, so one retry on a fresh connection is safe.
        for attempt in range(2):
            try:
                client, reused = await self._acquire()
            except (SMTPException, OSError, TimeoutError) as exc:
                return SendResult(ok=False, permanent=False, error=f"connect failed: {exc}")
            try:
                await _transaction(client, sender, recipient, data)
            except SMTPServerDisconnected as exc:
                self._discard(client)
                if reused and attempt == 0:
                    continue
                return classify(exc)
            except SMTPResponseException as exc:
                # _transaction has sent RSET; the connection stays usable unless the server
                # announced it is closing (421), the RSET found it gone, or the server
                # finds fault with the session itself (a fresh connection starts clean).
                session_fault = exc.code in SESSION_CODES
                if exc.code == 421 or session_fault or not client.is_connected:
                    self._discard(client)
                else:
                    self._release(client)
                # Refused at MAIL or RCPT, the message never reached DATA: one more try on
                # a fresh connection is safe.
                if session_fault and attempt == 0 and isinstance(exc, _BEFORE_DATA):
                    continue
                return classify(exc)
            except (SMTPException, OSError, TimeoutError) as exc:
                # Protocol state unknown after a timeout or socket error: drop it.
                self._discard(client)
                return classify(exc)
            except BaseException:
                # Cancellation mid-transaction leaves the session in an unknown state.
                self._discard(client)
                raise
            self._release(client)
            return SendResult(ok=True, provider_id=message.message_id)
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        """Say QUIT on idle connections; connections still lent out close on release."""
        self._closed = True
        while self._idle:
            client = self._idle.pop()
            with contextlib.suppress(SMTPException, OSError, TimeoutError):
                await client.quit()
            client.close()
