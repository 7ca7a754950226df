"""Two-way SMS chat: a Twilio inbound message in, TwiML `<Message>` replies out.

The Twilio webhook (`chat.sms_api.sms_inbound`, signature checked there) hands the
message to `reply_to`:

1. STOP / START / HELP (and YES) are answered through the audience domain, the one
   implementation shared with SMS drops and every chat channel (`chat.turn` runs them
   before any flow). A STOP from a number that is already opted out changes nothing and
   is not confirmed again: one confirmation per opt-out.
2. Anything else is a chat turn (`chat.inbound.turn`, channel `sms`): cards and
   carousels arrive as short text with numbered options (`messages.SMS`), and a reply
   "2" picks the second option.
3. An organization without a published chat flow gets the keyword handling only, as
   before chat existed.

The replies go back in the webhook's answer as TwiML, so Twilio sends them from the
number the customer wrote to.
"""

from __future__ import annotations

from datetime import datetime
from xml.sax.saxutils import escape

from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.audience import contact_points, keywords
from popdrop.chat import conversations, flow_store
from popdrop.chat import inbound as chat_inbound
from popdrop.chat.engine import Inbound
from popdrop.chat.messages import SMS, OutMessage, Text
from popdrop.core.db import Database
from popdrop.core.errors import PopdropError
from popdrop.core.identity import normalize_phone

CHANNEL = "sms"


def as_text(message: OutMessage) -> str:
    """A degraded SMS message is a `Text`; anything else falls back to its text/url."""
    if isinstance(message, Text):
        return message.text
    parts = [str(getattr(message, name, "") or "") for name in ("text", "title", "url")]
    return "\n".join(part for part in parts if part)


def twiml(replies: list[str]) -> str:
    """A TwiML answer with one `<Message>` per reply (none: an empty `<Response/>`)."""
    body = "".join(f"<Message>{escape(reply)}</Message>" for reply in replies if reply)
    return f'<?xml version="1.0" encoding="UTF-8"?><Response>{body}</Response>'


async def _opted_out(
    session: AsyncSession, deps: conversations.ChatDeps, org_id: int, phone: str
) -> bool:
    """Whether this number is already on the SMS suppression list (a known contact's
    revoked SMS consent puts it there too)."""
    points = contact_points.contact_points(deps.signer, None, phone)
    suppressed = await contact_points.suppressed_channels(session, org_id, points)
    return CHANNEL in suppressed or "all" in suppressed


async def answer_sms(
    session: AsyncSession,
    deps: conversations.ChatDeps,
    *,
    org_id: int,
    sender: str,
    body: str,
    now: datetime,
    flow_key: str = flow_store.DEFAULT_FLOW_KEY,
) -> list[str]:
    """The texts to answer one inbound SMS with, in the caller's transaction."""
    keyword = keywords.parse_keyword(body)
    try:
        phone = normalize_phone(sender)
    except PopdropError:
        phone = None  # a short code or an alphanumeric sender: keywords only, as before
    stop = keyword in ("stop", "stopall")
    again = stop and phone is not None and await _opted_out(session, deps, org_id, phone)
    if phone is None or not await flow_store.flow_available(session, org_id, flow_key, now):
        result = await keywords.handle_inbound(
            session, deps.signer, org_id=org_id, channel=CHANNEL, sender=sender, text=body, now=now
        )
        if again and result.action == "opted_out":
            return []  # already opted out: the confirmation went with the first STOP
        return [result.reply] if result.reply else []
    turn = await chat_inbound.turn(
        session,
        deps,
        org_id=org_id,
        channel=CHANNEL,
        address=phone,
        inbound=Inbound.of_text(body),
        now=now,
        flow_key=flow_key,
        capabilities=SMS,
    )
    if again and turn.keyword in ("stop", "stopall"):
        return []  # already opted out: the confirmation went with the first STOP
    return [text for text in (as_text(m) for m in turn.messages) if text]


async def reply_to(
    db: Database,
    deps: conversations.ChatDeps,
    *,
    org_id: int,
    sender: str,
    body: str,
    now: datetime,
    flow_key: str = flow_store.DEFAULT_FLOW_KEY,
) -> list[str]:
    """`answer_sms` in its own transaction (run again on a PostgreSQL deadlock)."""

    async def work(session: AsyncSession) -> list[str]:
        return await answer_sms(
            session, deps, org_id=org_id, sender=sender, body=body, now=now, flow_key=flow_key
        )

    return await db.in_transaction(work)
