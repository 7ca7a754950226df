"""What the send pipeline hands a provider, and what it gets back.

Every transport (SMTP pool, Twilio-format SMS, the development mailbox) implements one of
the two protocols below. A transport never decides whether to send: consent, suppression,
frequency caps and quiet hours are checked by the pipeline right before it calls `send`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class OutboundEmail:
    message_id: str  # "<drop-1.contact-2@example.org>": the same on every retry
    to: str
    from_address: str
    from_name: str
    subject: str
    text: str
    html: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # List-Unsubscribe, X-… tags
    org_id: int = 0  # whose message it is (the dev mailbox shows each org its own)


@dataclass(frozen=True)
class OutboundSms:
    to: str  # E.164
    from_number: str
    body: str
    status_callback: str | None = None
    org_id: int = 0


@dataclass(frozen=True)
class SendResult:
    """`ok`: the provider accepted it; `delivered`: and it is already where it was going
    (the development mailbox stores it), so no delivery report will follow. Otherwise
    `permanent` says whether a retry cannot help (a 5xx SMTP reply, an invalid number) or
    can (a timeout, a 4xx reply, HTTP 429/5xx)."""

    ok: bool
    provider_id: str | None = None
    permanent: bool = False
    error: str | None = None
    retry_after: float | None = None
    delivered: bool = False


class EmailTransport(Protocol):
    async def send(self, message: OutboundEmail) -> SendResult: ...

    async def close(self) -> None: ...


class SmsTransport(Protocol):
    async def send(self, message: OutboundSms) -> SendResult: ...

    async def close(self) -> None: ...
