"""Scheduled chat work, run by the worker tick: wake the conversations that are due
(countdown reminders, the day-after survey, input timeouts) and hand host messages
(console replies, pinned cards, broadcasts) to their channels.

The messages are taken in one transaction (the conversations step on, outbox rows are
marked sent) and sent after its commit, each conversation on its own channel: SMS
through the drops' SMS transport from `POPDROP_CHAT_SMS_FROM`, Telegram through the Bot
API, web to the visitor's open socket (in this process, or through the Redis relay when
`POPDROP_REDIS_URL` is set: `chat.live`). A crash
between the commit and a send loses that one message rather than sending it twice, as a
reminder should. Opted-out conversations were left out when the messages were taken.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from popdrop.chat import host, live
from popdrop.chat import service as chat
from popdrop.chat import telegram as tg
from popdrop.chat.messages import capabilities_of, degrade, to_json
from popdrop.chat.sms import as_text
from popdrop.core.db import Database
from popdrop.core.logging import log
from popdrop.messaging.transports import OutboundSms, SmsTransport


@dataclass
class ChatChannels:
    """How scheduled and host messages leave: what is not configured is not sent."""

    sms: SmsTransport | None = None
    sms_from: str = ""
    telegram: tg.TelegramBot | None = None
    web_relay: live.Relay | None = None  # reaches sockets open in other processes


async def _send(channels: ChatChannels, delivery: chat.Delivery, now: datetime) -> str:
    """Send one conversation's messages; the outcome, for the log."""
    messages = degrade(delivery.messages, capabilities_of(delivery.channel), now=now)
    if not messages:
        return "empty"
    if delivery.channel == "web":
        frame = {"type": "messages", "messages": to_json(messages), "pushed": True}
        if await live.push(delivery.org_id, delivery.address, frame):
            return "sent"
        if channels.web_relay is not None:
            listening = await channels.web_relay.publish(delivery.org_id, delivery.address, frame)
            return "relayed" if listening else "offline"
        return "offline"
    if delivery.channel == "sms":
        if channels.sms is None or not channels.sms_from:
            return "no_sms_sender"
        body = "\n\n".join(text for text in (as_text(m) for m in messages) if text)
        result = await channels.sms.send(
            OutboundSms(
                to=delivery.address,
                from_number=channels.sms_from,
                body=body,
                org_id=delivery.org_id,
            )
        )
        return "sent" if result.ok else "failed"
    if delivery.channel == "telegram":
        if channels.telegram is None:
            return "no_telegram_bot"
        try:
            await tg.deliver(channels.telegram, delivery.address, messages)
        except tg.TelegramError:
            return "failed"
        return "sent"
    return "unknown_channel"


async def deliver_due(
    db: Database,
    deps: chat.ChatDeps,
    channels: ChatChannels,
    *,
    now: datetime,
    org_id: int | None = None,
) -> Counter[str]:
    """Wake what is due and empty the host outbox (of every organization, or one);
    outcomes counted per channel and kind (`sms:sent`, `web:relayed`, `web:offline`…)."""
    async with db.transaction() as session:
        deliveries = await chat.wake_due(session, deps, now=now, org_id=org_id)
        deliveries += await host.take_outbox(session, org_id=org_id)
    outcomes: Counter[str] = Counter()
    for delivery in deliveries:
        outcome = await _send(channels, delivery, now)
        outcomes[f"{delivery.channel}:{outcome}"] += 1
        if outcome not in ("sent", "relayed", "offline", "empty"):
            log.warning(
                "chat message not delivered",
                conversation=delivery.conversation_id,
                channel=delivery.channel,
                outcome=outcome,
            )
    return outcomes


__all__ = ["ChatChannels", "deliver_due"]
