"""Who a person is: the contact points (email, phone) of a request, and finding the
contact they name.

A contact is recognised by the keyed hash of its normalised email or phone
(`core.identity`); a request that names two existing contacts is refused (`conflict`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.audience.models import (
    Contact,
    Suppression,
)
from popdrop.core.errors import PopdropError
from popdrop.core.identity import (
    identity_hash,
    normalize_email,
    normalize_phone,
)
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned

# ---------------------------------------------------------------- contact points


@dataclass(frozen=True)
class ContactPoints:
    email: str | None
    phone: str | None
    email_hash: bytes | None
    phone_hash: bytes | None

    @property
    def hashes(self) -> list[bytes]:
        return [h for h in (self.email_hash, self.phone_hash) if h is not None]


def contact_points(
    signer: Signer, email: str | None, phone: str | None, region: str | None = None
) -> ContactPoints:
    """Validate and normalise; refuse with `invalid_request` (detail `field`) when neither
    is given or one is malformed."""
    if not (email and email.strip()) and not (phone and phone.strip()):
        raise PopdropError(
            "invalid_request",
            "contact: give an email or a phone number",
            detail={"field": "contact"},
        )
    clean_email = normalize_email(email) if email and email.strip() else None
    clean_phone = normalize_phone(phone, region) if phone and phone.strip() else None
    return ContactPoints(
        clean_email,
        clean_phone,
        identity_hash(signer, "email", clean_email) if clean_email else None,
        identity_hash(signer, "phone", clean_phone) if clean_phone else None,
    )


async def get_contact(session: AsyncSession, principal: Principal, contact_id: int) -> Contact:
    principal.require("audience:read")
    return await owned(session, Contact, contact_id, principal.org_id, fresh=True)


async def find_contact(session: AsyncSession, org_id: int, points: ContactPoints) -> Contact | None:
    """The one contact these points name; `conflict` if they name two."""
    if not points.hashes:
        return None
    conditions = []
    if points.email_hash is not None:
        conditions.append(Contact.email_hash == points.email_hash)
    if points.phone_hash is not None:
        conditions.append(Contact.phone_hash == points.phone_hash)
    found = list(
        (
            await session.scalars(
                select(Contact)
                .where(Contact.org_id == org_id, or_(*conditions))
                .execution_options(populate_existing=True)
            )
        ).all()
    )
    if len(found) > 1:
        raise PopdropError("conflict", "this email and this phone belong to two different contacts")
    return found[0] if found else None


async def suppressed_channels(
    session: AsyncSession, org_id: int, points: ContactPoints
) -> dict[str, str]:
    """{channel: reason} of every suppression on these points (`all` when erased)."""
    if not points.hashes:
        return {}
    rows = await session.execute(
        select(Suppression.channel, Suppression.reason).where(
            Suppression.org_id == org_id, Suppression.identifier_hash.in_(points.hashes)
        )
    )
    return {channel: reason for channel, reason in rows}


def is_erased(suppressions: dict[str, str]) -> bool:
    return suppressions.get("all") == "erased"


def points_of(contact: Contact) -> ContactPoints:
    return ContactPoints(contact.email, contact.phone, contact.email_hash, contact.phone_hash)
