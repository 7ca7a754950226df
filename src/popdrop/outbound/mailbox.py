"""The development transport: messages are stored in the database and shown on the
operator's mailbox page, so the demo sends drops without an SMTP server or SMS provider.
A stored message is a delivered one (`SendResult.delivered`): no provider report follows."""

from __future__ import annotations

import json
import uuid

from popdrop.core.clock import Clock
from popdrop.core.db import Database
from popdrop.outbound.models import MailboxMessage
from popdrop.outbound.transports import OutboundEmail, OutboundSms, SendResult


class Mailbox:
    """Both an EmailTransport and an SmsTransport."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    async def send(self, message: OutboundEmail | OutboundSms) -> SendResult:
        async with self.db.transaction() as session:
            if isinstance(message, OutboundEmail):
                row = MailboxMessage(
                    org_id=message.org_id,
                    channel="email",
                    recipient=message.to,
                    subject=message.subject,
                    text=message.text,
                    html=message.html,
                    headers=json.dumps(message.headers),
                    message_id=message.message_id,
                    at=self.clock.now(),
                )
            else:
                row = MailboxMessage(
                    org_id=message.org_id,
                    channel="sms",
                    recipient=message.to,
                    subject="",
                    text=message.body,
                    html=None,
                    headers="{}",
                    message_id=None,
                    at=self.clock.now(),
                )
            session.add(row)
        # Stored is delivered: the mailbox is the recipient's inbox in development.
        return SendResult(ok=True, provider_id=f"mailbox-{uuid.uuid4().hex[:12]}", delivered=True)

    async def close(self) -> None:
        return None
