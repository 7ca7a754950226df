"""Writing the funnel log: one INSERT in the caller's transaction, so an event is in the
log exactly when what it records committed.

Rules:
- Callers pass a `person` built here, never an email or a phone number. One person is one
  key everywhere, so a funnel can follow them from a message to an RSVP, a visit and a
  sale: the keyed hash of their contact point (email first, else phone; the same HMAC
  the audience stores as `email_hash` / `phone_hash`), from `point_person` (a contact
  row's hashes) or `person_of_point` (a raw email or phone). `contact_person` (a contact
  id) is only for a writer that knows nothing else; `keyed_person` for a reference that
  is no contact point (a chat with no contact, a till's customer id).
- The statement is built once; a hot path pays one round trip and no statement building.
- Nothing here touches the rollups: the fold (`rollups.fold`) adds new rows to them, so
  concurrent writers never queue on a shared counter row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.core.db import table_of
from popdrop.core.errors import PopdropError
from popdrop.core.identity import identity_hash, normalize_email, normalize_phone
from popdrop.core.signing import Signer
from popdrop.metrics.kinds import Kind
from popdrop.metrics.models import FunnelEvent

funnel_events = table_of(FunnelEvent)
_INSERT = insert(funnel_events)


@dataclass(frozen=True, slots=True)
class Tags:
    """Where an event belongs: the dimensions dashboards break figures down by."""

    channel: str = ""
    event_id: int | None = None
    drop_id: int | None = None
    variant: str = ""
    segment: str = ""
    partner_id: int | None = None
    lane_id: int | None = None
    label: str = ""


NO_TAGS = Tags()


def contact_person(contact_id: int) -> str:
    return f"c:{contact_id}"


def point_person(
    email_hash: bytes | None, phone_hash: bytes | None = None, contact_id: int | None = None
) -> str | None:
    """The person of a contact point's keyed hash (email first, else phone), else of the
    contact id, else nobody."""
    digest = email_hash or phone_hash
    if digest:
        return "k:" + digest[:20].hex()
    return contact_person(contact_id) if contact_id is not None else None


def person_of_point(signer: Signer, email: str | None, phone: str | None) -> str | None:
    """The person of a raw email or phone: normalized as the audience does, then keyed
    with the audience's hash, so it is the same person as the contact with that point."""
    for kind, raw, normalize in (
        ("email", email, normalize_email),
        ("phone", phone, normalize_phone),
    ):
        if raw and raw.strip():
            try:
                return point_person(identity_hash(signer, kind, normalize(raw)))
            except PopdropError:
                return keyed_person(signer, raw.strip().lower())
    return None


def keyed_person(signer: Signer, reference: str) -> str:
    """A person known only by something secret-ish (an order's email digest, a chat
    address): a keyed digest of it, so the log never holds the reference itself."""
    return "k:" + signer.mac("funnel-person", reference)[:20].hex()


def _row(
    org_id: int,
    kind: Kind,
    at: datetime,
    tags: Tags,
    person: str | None,
    subject: str | None,
    value: int,
    currency: str,
) -> dict[str, Any]:
    return {
        "org_id": org_id,
        "kind": kind.value,
        "at": at,
        **asdict(tags),
        "person": person,
        "subject": subject,
        "value": value,
        "currency": currency,
        "rolled": False,
    }


async def record(
    session: AsyncSession,
    org_id: int,
    kind: Kind,
    *,
    at: datetime,
    tags: Tags = NO_TAGS,
    person: str | None = None,
    subject: str | None = None,
    value: int = 0,
    currency: str = "",
) -> None:
    """Append one event to the log, in the caller's transaction."""
    await session.execute(_INSERT, _row(org_id, kind, at, tags, person, subject, value, currency))


@dataclass(frozen=True, slots=True)
class Entry:
    """One event for `record_many`."""

    org_id: int
    kind: Kind
    at: datetime
    tags: Tags = NO_TAGS
    person: str | None = None
    subject: str | None = None
    value: int = 0
    currency: str = ""


async def record_many(session: AsyncSession, entries: Sequence[Entry]) -> None:
    """Append several events in one statement (a send batch, a sweep)."""
    if not entries:
        return
    await session.execute(
        _INSERT,
        [
            _row(e.org_id, e.kind, e.at, e.tags, e.person, e.subject, e.value, e.currency)
            for e in entries
        ],
    )
