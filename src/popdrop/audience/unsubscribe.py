"""Email unsubscribe: signed preference links, List-Unsubscribe headers, the one-click
unsubscribe and the preferences page's save.

An opt-out is acknowledged (the one-click 200) only after its commit (see
`audience.consent`).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    delete,
)
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.audience.consent import CONSENT_COLUMN, change_consent, contact_of_link
from popdrop.audience.contacts import add_labels
from popdrop.audience.models import (
    Contact,
    ContactLabel,
)
from popdrop.audience.schemas import (
    ConsentChange,
    PreferencesIn,
)
from popdrop.core import links
from popdrop.core.signing import Signer

# ---------------------------------------------------------------- email unsubscribe


def unsubscribe_headers(signer: Signer, base_url: str, contact: Contact) -> dict[str, str]:
    """RFC 8058 headers for an email to this contact (RFC 2369 List-Unsubscribe + one-click).
    The URL's token (`core.links.preferences_token`) never expires: an unsubscribe link
    must work months later."""
    return unsubscribe_headers_for(
        links.unsubscribe_url(signer, base_url, contact.org_id, contact.id)
    )


def unsubscribe_headers_for(url: str | None) -> dict[str, str]:
    if url is None:
        return {}
    return {
        "List-Unsubscribe": f"<{url}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


async def contact_from_token(session: AsyncSession, signer: Signer, token: str) -> Contact:
    return await contact_of_link(session, links.read_preferences(signer, token))


async def one_click_unsubscribe(
    session: AsyncSession, signer: Signer, token: str, *, now: datetime
) -> Contact:
    """RFC 8058: the POST needs no body and no confirmation; email consent is revoked at once."""
    contact = await contact_from_token(session, signer, token)
    await change_consent(
        session,
        signer,
        contact,
        ConsentChange(channel="email", action="revoke", wording="List-Unsubscribe one-click"),
        now=now,
        source="unsubscribe",
    )
    return contact


async def save_preferences(
    session: AsyncSession, signer: Signer, token: str, prefs: PreferencesIn, *, now: datetime
) -> Contact:
    contact = await contact_from_token(session, signer, token)
    for channel, wanted in (("email", prefs.email), ("sms", prefs.sms)):
        state = getattr(contact, CONSENT_COLUMN[channel])
        if wanted and state != "granted":
            await change_consent(
                session,
                signer,
                contact,
                ConsentChange(channel=channel, action="grant", wording="Preferences page: yes"),
                now=now,
                source="preferences",
            )
        elif not wanted and state in ("granted", "pending"):
            await change_consent(
                session,
                signer,
                contact,
                ConsentChange(channel=channel, action="revoke", wording="Preferences page: no"),
                now=now,
                source="preferences",
            )
    await session.execute(
        delete(ContactLabel).where(
            ContactLabel.contact_id == contact.id, ContactLabel.kind == "interest"
        )
    )
    await add_labels(session, contact, "interest", prefs.topics)
    contact.frequency = prefs.frequency
    contact.updated_at = now
    await session.flush()
    return contact
