"""CSV exports: contacts with the minimal fields (optionally only the sendable ones, or
one segment's), and the consent ledger.

Exports stream CSV text a page at a time (keyset paging). Erased contacts are never
exported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.audience import segments
from popdrop.audience.models import (
    ConsentEvent,
    Contact,
    ContactLabel,
)
from popdrop.audience.schemas import (
    SegmentRules,
)
from popdrop.core.csvsafe import csv_text

CONTACT_FIELDS = (
    "id",
    "email",
    "phone",
    "first_name",
    "locale",
    "time_zone",
    "tags",
    "interests",
    "consent_email",
    "consent_sms",
    "consent_chat",
    "last_engaged_at",
)
CONSENT_FIELDS = ("contact_id", "channel", "action", "source", "wording", "proof", "at")


# ---------------------------------------------------------------- exports


def _csv_text(rows: list[list[Any]]) -> str:
    # Every cell is neutralised against spreadsheet formulas there, whatever its column.
    return csv_text(rows)


async def export_contacts(
    session: AsyncSession,
    principal: Principal,
    *,
    now: datetime,
    sendable: Literal["email", "sms"] | None = None,
    rules: SegmentRules | None = None,
    batch_size: int = 2000,
) -> AsyncIterator[str]:
    """Contacts as CSV text chunks (`CONTACT_FIELDS`), in id order: all of them, only those
    `sendable` on a channel right now, and/or one segment's. Erased contacts never appear.
    Checks come first (await this), so a refusal is raised before anything streams."""
    principal.require("audience:read")
    if rules is not None:
        conditions = await segments.segment_conditions(session, principal.org_id, rules, now=now)
    else:
        conditions = [Contact.org_id == principal.org_id, Contact.erased_at.is_(None)]
    if sendable is not None:
        conditions.append(segments.sendable_condition(sendable))
    return _contact_pages(session, conditions, batch_size)


async def _contact_pages(
    session: AsyncSession, conditions: list[ColumnElement[bool]], batch_size: int
) -> AsyncIterator[str]:
    yield _csv_text([list(CONTACT_FIELDS)])
    base = (
        select(
            Contact.id,
            Contact.email,
            Contact.phone,
            Contact.first_name,
            Contact.locale,
            Contact.time_zone,
            Contact.consent_email,
            Contact.consent_sms,
            Contact.consent_chat,
            Contact.last_engaged_at,
        )
        .where(*conditions)
        .order_by(Contact.id)
        .limit(batch_size)
    )
    after = 0
    while True:
        page = (await session.execute(base.where(Contact.id > after))).all()
        if not page:
            return
        ids = [row[0] for row in page]
        labels: dict[int, dict[str, list[str]]] = {i: {"tag": [], "interest": []} for i in ids}
        for contact_id, kind, value in await session.execute(
            select(ContactLabel.contact_id, ContactLabel.kind, ContactLabel.value)
            .where(ContactLabel.contact_id.in_(ids))
            .order_by(ContactLabel.value)
        ):
            labels[contact_id][kind].append(value)
        yield _csv_text(
            [
                [
                    cid,
                    email or "",
                    phone or "",
                    first_name,
                    locale or "",
                    zone or "",
                    ";".join(labels[cid]["tag"]),
                    ";".join(labels[cid]["interest"]),
                    c_email,
                    c_sms,
                    c_chat,
                    engaged.isoformat() if engaged else "",
                ]
                for (
                    cid,
                    email,
                    phone,
                    first_name,
                    locale,
                    zone,
                    c_email,
                    c_sms,
                    c_chat,
                    engaged,
                ) in page
            ]
        )
        after = ids[-1]


async def export_consent(
    session: AsyncSession, principal: Principal, *, batch_size: int = 5000
) -> AsyncIterator[str]:
    """The consent ledger as CSV text chunks (`CONSENT_FIELDS`), oldest first."""
    principal.require("audience:read")
    return _consent_pages(session, principal.org_id, batch_size)


async def _consent_pages(session: AsyncSession, org_id: int, batch_size: int) -> AsyncIterator[str]:
    yield _csv_text([list(CONSENT_FIELDS)])
    e = ConsentEvent
    base = (
        select(e.id, e.contact_id, e.channel, e.action, e.source, e.wording, e.proof, e.at)
        .where(e.org_id == org_id)
        .order_by(e.id)
        .limit(batch_size)
    )
    after = 0
    while True:
        page = (await session.execute(base.where(e.id > after))).all()
        if not page:
            return
        yield _csv_text(
            [
                [cid, channel, action, source, wording, proof, at.isoformat()]
                for _id, cid, channel, action, source, wording, proof, at in page
            ]
        )
        after = page[-1][0]
