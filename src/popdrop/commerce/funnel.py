"""Commerce's events in the funnel log (`metrics.log`), written in the transaction that
changes the order (placed, paid, refunded, handed out, a payment failed) or gives a sample.

Rules:
- The person is never a contact point, and is the same person every writer names: an
  order's contact (`contact:<id>`, what a chat checkout sets) is keyed by its stored
  email (else phone) hash; otherwise its receipt email (else phone) is keyed with the
  audience's hash (`log.person_of_point`), else its contact reference, else the order
  itself. A caller without the signer (the demo seed) leaves a keyed person unset.
- Channel and partner: what brought the sale when attribution knows it (the first touch's
  channel; the partner of the first touch naming one), else the order's source. Orders
  without codes or clicks have no touches: no read for them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.attribution import service as attribution
from popdrop.attribution.models import SaleTouch
from popdrop.audience.models import Contact
from popdrop.commerce.models import Order
from popdrop.core.signing import Signer
from popdrop.metrics import log
from popdrop.metrics.kinds import Kind

CONTACT_PREFIX = "contact:"
LABEL_MAX = 24  # funnel_events.label


def contact_id_of(ref: str | None) -> int | None:
    """The contact a `contact:<id>` reference names (a chat's), else None."""
    if not ref or not ref.startswith(CONTACT_PREFIX):
        return None
    rest = ref.removeprefix(CONTACT_PREFIX)
    return int(rest) if rest.isdigit() else None


def _ref_reference(ref: str | None) -> str | None:
    """A free-text contact reference as keyed: an email in lower case, anything else as is."""
    if not ref or not ref.strip():
        return None
    return ref.strip().lower() if "@" in ref else ref.strip()


async def _contact_person(session: AsyncSession, org_id: int, contact_id: int) -> str:
    """A contact's person: the keyed hash of its email (else phone), as every other writer
    keys the same person, else its id (a reference naming no contact of this org)."""
    contact = await session.get(Contact, contact_id)
    if contact is not None and contact.org_id == org_id:
        person = log.point_person(contact.email_hash, contact.phone_hash, contact.id)
        if person is not None:
            return person
    return log.contact_person(contact_id)


async def person_of_ref(
    session: AsyncSession, signer: Signer | None, org_id: int, ref: str | None
) -> str | None:
    """The funnel person of a contact reference (a sample's)."""
    contact = contact_id_of(ref)
    if contact is not None:
        return await _contact_person(session, org_id, contact)
    reference = _ref_reference(ref)
    if signer is None or reference is None:
        return None
    if "@" in reference:
        return log.person_of_point(signer, reference, None)
    return log.keyed_person(signer, reference)


async def order_person(session: AsyncSession, signer: Signer | None, order: Order) -> str | None:
    contact = contact_id_of(order.contact_ref)
    if contact is not None:
        return await _contact_person(session, order.org_id, contact)
    if signer is None:
        return None
    person = log.person_of_point(signer, order.receipt_email, order.receipt_phone)
    if person is not None:
        return person
    return log.keyed_person(signer, _ref_reference(order.contact_ref) or f"order:{order.id}")


def _has_touches(order: Order) -> bool:
    return bool(json.loads(order.codes or "[]") or json.loads(order.click_ids or "[]"))


async def touches_of(session: AsyncSession, order: Order) -> list[SaleTouch]:
    """The order's stored touches; no read when it had no code nor click to match."""
    if not _has_touches(order):
        return []
    return await attribution.touches_for(
        session, org_id=order.org_id, sale_kind="order", sale_id=order.id
    )


def _tags(order: Order, touches: Sequence[SaleTouch], label: str) -> log.Tags:
    channel = next((t.channel for t in touches if t.channel), None) or order.source or ""
    partner = next((t.partner_id for t in touches if t.partner_id is not None), None)
    return log.Tags(
        channel=channel[:12],
        event_id=order.event_id,
        partner_id=partner,
        lane_id=order.lane_id,
        label=label[:LABEL_MAX],
    )


async def record(
    session: AsyncSession,
    signer: Signer | None,
    order: Order,
    kind: Kind,
    *,
    now: datetime,
    value: int = 0,
    currency: str | None = None,
    label: str = "",
    touches: Sequence[SaleTouch] | None = None,
) -> None:
    """One event about `order`, in the caller's transaction. `touches`: the order's, when
    the caller has them at hand (else read when it may have any)."""
    if touches is None:
        touches = await touches_of(session, order)
    await log.record(
        session,
        order.org_id,
        kind,
        at=now,
        tags=_tags(order, touches, label),
        person=await order_person(session, signer, order),
        subject=f"order:{order.id}",
        value=value,
        currency=order.currency if currency is None else currency,
    )
