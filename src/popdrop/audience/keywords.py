"""SMS and chat keywords: STOP / START / HELP, and YES for a pending double opt-in.

Opt-out keywords take effect in the same transaction as the inbound message, before
anything else reads the contact: a send that re-checks consent right before the provider
call (drops) sees it at once.
"""

from __future__ import annotations

import string
from datetime import datetime

from sqlalchemy import (
    delete,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.models import Organization
from popdrop.audience.consent import CONSENT_COLUMN, change_consent, suppress
from popdrop.audience.contact_points import ContactPoints, contact_points, find_contact
from popdrop.audience.models import (
    Contact,
    Suppression,
)
from popdrop.audience.schemas import (
    ConsentChange,
    InboundResult,
)
from popdrop.audience.settings import get_settings
from popdrop.core.signing import Signer

STOP_WORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
)
START_WORDS = frozenset({"START", "UNSTOP"})
HELP_WORDS = frozenset({"HELP", "INFO"})
YES_WORDS = frozenset({"YES", "Y"})
DEFAULT_HELP = "{org}: you get event news and offers. Reply STOP to opt out, START to opt back in."
STOP_REPLY = (
    "{org}: you are unsubscribed and will get no more messages. Reply START to resubscribe."
)
START_REPLY = "{org}: you are subscribed again. Reply STOP to opt out at any time."
YES_REPLY = "{org}: thanks, your subscription is confirmed. Reply STOP to opt out."
_TRIM = (
    string.whitespace
    + string.punctuation
    + "\u00a1\u00bf\u00ab\u00bb\u201c\u201d\u2018\u2019\u2026"
)


# ---------------------------------------------------------------- keywords


def parse_keyword(text: str) -> str | None:
    """STOP-family → `stop` (`stopall` for STOPALL), START/UNSTOP → `start`, HELP → `help`,
    YES → `yes`; any case, surrounding whitespace or punctuation; the whole message only."""
    word = text.strip(_TRIM).upper()
    if word == "STOPALL":
        return "stopall"
    if word in STOP_WORDS:
        return "stop"
    if word in START_WORDS:
        return "start"
    if word in HELP_WORDS:
        return "help"
    if word in YES_WORDS:
        return "yes"
    return None


async def _org_name(session: AsyncSession, org_id: int) -> str:
    return str(
        await session.scalar(select(Organization.name).where(Organization.id == org_id)) or ""
    )


async def handle_inbound(
    session: AsyncSession,
    signer: Signer,
    *,
    org_id: int,
    channel: str,
    sender: str,
    text: str,
    now: datetime,
    contact_id: int | None = None,
) -> InboundResult:
    """STOP / START / HELP / YES before any flow, on every channel. An opt-out from a number
    we do not know still lands on the suppression list, so a later import cannot add it."""
    keyword = parse_keyword(text)
    if keyword is None:
        return InboundResult(keyword=None, action=None, reply=None, contact_id=contact_id)
    points = ContactPoints(None, None, None, None)
    if channel == "sms":
        points = contact_points(signer, None, sender)
    contact: Contact | None = None
    if contact_id is not None:
        contact = await session.get(Contact, contact_id, populate_existing=True)
        if contact is not None and contact.org_id != org_id:
            contact = None
    elif points.hashes:
        contact = await find_contact(session, org_id, points)
    org = await _org_name(session, org_id)
    found_id = contact.id if contact else None
    if keyword == "help":
        settings = await get_settings(session, org_id)
        reply = settings.help_text or DEFAULT_HELP.format(org=org)
        return InboundResult(keyword=keyword, action="help", reply=reply, contact_id=found_id)
    source = "sms_keyword" if channel == "sms" else "chat_keyword"
    wording = f"Replied {text.strip(_TRIM).upper()}"
    if keyword in ("stop", "stopall"):
        channels = list(CONSENT_COLUMN) if keyword == "stopall" else [channel]
        if contact is not None:
            for ch in channels:
                await change_consent(
                    session,
                    signer,
                    contact,
                    ConsentChange(channel=ch, action="revoke", wording=wording),
                    now=now,
                    source=source,
                )
        else:
            for ch in channels:
                await suppress(session, org_id, points, ch, "opt_out", now)
        return InboundResult(
            keyword=keyword,
            action="opted_out",
            reply=STOP_REPLY.format(org=org),
            contact_id=found_id,
        )
    if contact is None:  # START / YES from a stranger: lift their opt-out, nothing to confirm
        if keyword == "start" and points.hashes:
            await session.execute(
                delete(Suppression).where(
                    Suppression.org_id == org_id,
                    Suppression.identifier_hash.in_(points.hashes),
                    Suppression.channel == channel,
                    Suppression.reason == "opt_out",
                )
            )
            return InboundResult(
                keyword=keyword,
                action="opted_in",
                reply=START_REPLY.format(org=org),
                contact_id=None,
            )
        return InboundResult(keyword=keyword, action=None, reply=None, contact_id=None)
    if keyword == "yes" and getattr(contact, CONSENT_COLUMN[channel]) != "pending":
        return InboundResult(keyword=keyword, action=None, reply=None, contact_id=found_id)
    await change_consent(
        session,
        signer,
        contact,
        ConsentChange(channel=channel, action="grant", wording=wording),
        now=now,
        source="double_opt_in" if keyword == "yes" else source,
    )
    if keyword == "yes":
        return InboundResult(
            keyword=keyword,
            action="confirmed",
            reply=YES_REPLY.format(org=org),
            contact_id=found_id,
        )
    return InboundResult(
        keyword=keyword, action="opted_in", reply=START_REPLY.format(org=org), contact_id=found_id
    )
