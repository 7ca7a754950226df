"""Facts a turn may need (event, catalogue, availability, slots, segments, first name),
read only when the flow says a node needs them, and the host's pinned product card.

Event details and catalogues are cached per process for a few seconds; availability and
slots are read live on every turn that needs them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.audience import segments
from popdrop.audience.models import Contact, Segment
from popdrop.audience.schemas import (
    SegmentRules,
)
from popdrop.chat import engine
from popdrop.chat.conversations import ConversationRow
from popdrop.chat.engine import (
    EventFact,
    Facts,
    ProductFact,
    SlotFact,
)
from popdrop.chat.flow import Needs
from popdrop.chat.flow_store import db_key
from popdrop.chat.messages import (
    Card,
)
from popdrop.chat.models import (
    ChatPin,
)
from popdrop.core.cache import ProcessCache
from popdrop.core.db import UTCDateTime, table_of
from popdrop.events.models import Event, TimeSlot
from popdrop.inventory import service as inventory
from popdrop.inventory.models import Product, Variant

# ---------------------------------------------------------------- facts


# Event details and product catalogues change rarely: each process keeps them a few seconds.
# Availability and slots are read live on every turn that needs them.
CACHE_SECONDS = 5.0
_CACHE_MAX = 10_000
_EVENTS: ProcessCache[tuple[str, int], EventFact | None] = ProcessCache(
    maxsize=_CACHE_MAX, ttl=CACHE_SECONDS
)
_CATALOGS: ProcessCache[tuple[str, int, int], list[ProductFact]] = ProcessCache(
    maxsize=_CACHE_MAX, ttl=CACHE_SECONDS
)

_now_param = bindparam("now", type_=UTCDateTime())


async def _event_fact(session: AsyncSession, event_id: int) -> EventFact | None:
    key = (db_key(session), event_id)
    cached = _EVENTS.get(key)
    if cached is not None:
        return cached
    row = (
        await session.execute(
            select(
                Event.id,
                Event.title,
                Event.starts_at,
                Event.ends_at,
                Event.timezone,
                Event.venue_name,
                Event.status,
            ).where(Event.id == event_id)
        )
    ).first()
    fact = None
    if row is not None:
        fact = EventFact(
            id=row.id,
            title=row.title,
            starts_at=row.starts_at,
            ends_at=row.ends_at,
            timezone=row.timezone,
            venue=row.venue_name,
            status=row.status,
        )
    _EVENTS.put(key, fact)
    return fact


async def _catalog(session: AsyncSession, org_id: int, event_id: int) -> list[ProductFact]:
    key = (db_key(session), org_id, event_id)
    cached = _CATALOGS.get(key)
    if cached is not None:
        return cached
    rows = (
        await session.execute(
            select(
                Product.id,
                Product.title,
                Product.highlights,
                Product.price_minor,
                Product.currency,
                Product.image_url,
            )
            .where(Product.event_id == event_id, Product.org_id == org_id)
            .order_by(Product.id)
        )
    ).all()
    skus: dict[int, list[str]] = {}
    if rows:
        for product_id, sku in await session.execute(
            select(Variant.product_id, Variant.sku).where(
                Variant.product_id.in_([r[0] for r in rows]), Variant.sku != ""
            )
        ):
            skus.setdefault(int(product_id), []).append(sku)
    catalog = [
        ProductFact(
            id=int(r[0]),
            title=r[1],
            text=r[2] or "",
            price_minor=int(r[3]),
            currency=r[4],
            image_url=r[5] or "",
            available=0,
            skus=tuple(skus.get(int(r[0]), ())),
        )
        for r in rows
    ]
    _CATALOGS.put(key, catalog)
    return catalog


async def _products(
    session: AsyncSession, org_id: int, event_id: int, now: datetime
) -> list[ProductFact]:
    """The event's products (catalogue cached briefly) with live availability."""
    catalog = await _catalog(session, org_id, event_id)
    if not catalog:
        return []
    left = await inventory.units_left_by_product(session, org_id, event_id, now)
    return [replace(p, available=left.get(p.id, 0)) for p in catalog]


_slots_t = table_of(TimeSlot)
_SLOTS = (
    select(
        _slots_t.c.id,
        _slots_t.c.label,
        _slots_t.c.starts_at,
        _slots_t.c.ends_at,
        _slots_t.c.capacity - _slots_t.c.taken,
    )
    .where(
        _slots_t.c.event_id == bindparam("e_id"),
        _slots_t.c.org_id == bindparam("o_id"),
        _slots_t.c.ends_at > _now_param,
    )
    .order_by(_slots_t.c.starts_at, _slots_t.c.id)
)
_contacts_t = table_of(Contact)
_FIRST_NAME = select(_contacts_t.c.first_name).where(_contacts_t.c.id == bindparam("c_id"))


async def _slots(
    session: AsyncSession, org_id: int, event_id: int, now: datetime
) -> list[SlotFact]:
    """The event's slots not over yet, with places left (live)."""
    conn = await session.connection()
    rows = await conn.execute(_SLOTS, {"e_id": event_id, "o_id": org_id, "now": now})
    return [
        SlotFact(
            id=int(r[0]), label=r[1] or "", starts_at=r[2], ends_at=r[3], free=max(int(r[4]), 0)
        )
        for r in rows
    ]


async def _segments(
    session: AsyncSession, org_id: int, contact_id: int, names: Iterable[str], now: datetime
) -> frozenset[str]:
    member: set[str] = set()
    for name in names:
        rules_text = await session.scalar(
            select(Segment.rules).where(Segment.org_id == org_id, Segment.name == name)
        )
        if rules_text is None:
            continue
        rules = SegmentRules.model_validate(json.loads(rules_text))
        conditions = await segments.segment_conditions(session, org_id, rules, now=now)
        found = await session.scalar(
            select(Contact.id).where(Contact.id == contact_id, *conditions).limit(1)
        )
        if found is not None:
            member.add(name)
    return frozenset(member)


async def read_facts(
    session: AsyncSession, conv: ConversationRow, needs: Needs, now: datetime
) -> Facts:
    facts = Facts(now=now, channel=conv.channel)
    if conv.event_id is not None:
        facts.event = await _event_fact(session, conv.event_id)
        if needs.products:
            facts.products = await _products(session, conv.org_id, conv.event_id, now)
        if needs.slots:
            facts.slots = await _slots(session, conv.org_id, conv.event_id, now)
    if conv.contact_id is not None:
        conn = await session.connection()
        first_name = (await conn.execute(_FIRST_NAME, {"c_id": conv.contact_id})).scalar()
        facts.contact = {"id": conv.contact_id, "first_name": first_name}
        if needs.segments:
            facts.segments = await _segments(
                session, conv.org_id, conv.contact_id, needs.segments, now
            )
    return facts


_pins_t = table_of(ChatPin)
_PINNED = select(_pins_t.c.product_id).where(
    _pins_t.c.org_id == bindparam("o_id"), _pins_t.c.event_id == bindparam("e_id")
)
PINNED_PREFIX = "Pinned by the host. "


async def host_card(
    session: AsyncSession, org_id: int, event_id: int, product_id: int, now: datetime
) -> Card | None:
    """A product of the event as a host's card (pinned, or sent from the console): live
    availability, no action buttons; None when the event has no such product."""
    for product in await _products(session, org_id, event_id, now):
        if product.id == product_id:
            return engine.card_of(product, text=PINNED_PREFIX + product.text)
    return None


async def pinned_card(
    session: AsyncSession, org_id: int, event_id: int | None, now: datetime
) -> Card | None:
    """The card a host pinned for the event (`/pin`, or from the console) with live
    availability; every new session's first answer starts with it."""
    if event_id is None:
        return None
    conn = await session.connection()
    product_id = (await conn.execute(_PINNED, {"o_id": org_id, "e_id": event_id})).scalar()
    if product_id is None:
        return None
    return await host_card(session, org_id, event_id, int(product_id), now)
