"""Zero-cost sample drops: a sample product at price 0 with a unit cost, handed out at a
lane, one per person per campaign, its cost allocated to whoever pays for it.

Rules:
- A sample is a product marked `is_sample`, priced 0, with a `unit_cost_minor` (else 422
  `invalid_request`): the cost is what the reports charge to the allocation.
- One per person per campaign: the person is a keyed digest of the contact reference
  (`vouchers.service.contact_digest`, the same digest the vault keeps, so reports can
  follow a sample to a later purchase without the PII). The unique (product, campaign,
  person) index decides under concurrency: the grant row is inserted first, in a
  SAVEPOINT, and a twin gets 409 `already_sampled`.
- The unit comes out of the lane's stock in the same transaction with one conditional
  `UPDATE stock SET sold = sold + 1 WHERE … total - held - sold >= 1` (409 `sold_out`
  when no variant of it is left at that lane): never more samples than units.
- Who pays: `partner:<id>` (a partner of the event), `campaign:<name>` or
  `budget:<name>`. Provenance (drop, segment, conversation) is stored as given.
- The event must be open (`events.lifecycle.require_open`), like any hold.
- Giving needs `orders:pickup` (volunteers at a lane hand samples out); the cost report
  needs `orders:read`. The report counts, per allocation, the samples whose person paid
  an order of the event afterwards (sample → purchase: the order's contact ref digested
  the same way).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.commerce import funnel
from popdrop.commerce.catalog_schemas import AllocationCost, SampleCosts, SampleOut
from popdrop.commerce.lifecycle import SOLD_STATUSES
from popdrop.commerce.models import Order, SampleGrant
from popdrop.core.db import table_of
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned
from popdrop.events.lifecycle import require_open
from popdrop.events.models import Event, Lane, Partner
from popdrop.inventory.models import Product, Stock, Variant
from popdrop.metrics import log
from popdrop.metrics.kinds import Kind, Segment
from popdrop.vouchers.service import contact_digest

GIVE_SCOPE = "orders:pickup"
READ_SCOPE = "orders:read"
RECENT = 50  # grants listed with the cost report

_stock = table_of(Stock)


def sample_out(grant: SampleGrant) -> SampleOut:
    return SampleOut.model_validate(grant, from_attributes=True)


async def _check_allocation(
    session: AsyncSession, principal: Principal, event_id: int, allocated_to: str
) -> None:
    kind, _, ref = allocated_to.partition(":")
    if kind == "partner":
        await owned(
            session, Partner, int(ref), principal.org_id, what="partner of this event",
            where=(Partner.event_id == event_id,),
        )  # fmt: skip


async def _take_one_unit(session: AsyncSession, product_id: int, lane_id: int) -> None:
    """One unit of any variant of the product at the lane, counted sold; `sold_out` else."""
    stock_ids = list(
        await session.scalars(
            select(Stock.id)
            .join(Variant, Variant.id == Stock.variant_id)
            .where(Variant.product_id == product_id, Stock.lane_id == lane_id)
            .order_by(Stock.id)
        )
    )
    for stock_id in stock_ids:
        taken = await session.execute(
            update(_stock)
            .where(_stock.c.id == stock_id, _stock.c.total - _stock.c.held - _stock.c.sold >= 1)
            .values(sold=_stock.c.sold + 1)
            .returning(_stock.c.id)
        )
        if taken.first() is not None:
            return
    raise PopdropError("sold_out", "no sample is left at this lane", detail={"available": 0})


async def give_sample(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    *,
    product_id: int,
    campaign: str,
    contact_ref: str,
    allocated_to: str,
    drop_id: int | None,
    segment: str | None,
    conversation_id: int | None,
    lane_id: int,
    now: datetime,
) -> SampleGrant:
    """Hand one sample to a person at a lane (see the module rules)."""
    principal.require(GIVE_SCOPE)
    product = await owned(session, Product, product_id, principal.org_id, what="product")
    if not product.is_sample or product.price_minor != 0 or product.unit_cost_minor is None:
        raise PopdropError(
            "invalid_request",
            "this product is not a sample (a sample is marked is_sample, priced 0, "
            "with a unit cost)",
        )
    event = await session.get(Event, product.event_id)
    if event is None:
        raise not_found("event")
    require_open(event, now, takes="samples")
    await owned(
        session, Lane, lane_id, principal.org_id, what="lane of this event",
        where=(Lane.event_id == event.id,),
    )  # fmt: skip
    await _check_allocation(session, principal, event.id, allocated_to)
    person_key = contact_digest(signer, contact_ref)
    assert person_key is not None
    grant = SampleGrant(
        org_id=principal.org_id,
        event_id=event.id,
        product_id=product.id,
        campaign=campaign,
        person_key=person_key,
        unit_cost_minor=product.unit_cost_minor,
        currency=product.currency,
        allocated_to=allocated_to,
        drop_id=drop_id,
        segment=segment,
        conversation_id=conversation_id,
        given_at=now,
        given_by=principal.actor,
    )
    try:
        # The unique index decides first; a concurrent twin waits on it and lands here.
        async with session.begin_nested():
            session.add(grant)
            await session.flush()
    except IntegrityError as exc:
        raise PopdropError(
            "already_sampled",
            "this person already had this sample in this campaign",
            status=409,
        ) from exc
    await _take_one_unit(session, product.id, lane_id)
    await _record_given(session, signer, grant, contact_ref, lane_id, now)
    return grant


async def _record_given(
    session: AsyncSession,
    signer: Signer,
    grant: SampleGrant,
    contact_ref: str,
    lane_id: int,
    now: datetime,
) -> None:
    """The funnel's `sample_given`: its unit cost, and the partner paying for it."""
    kind, _, ref = grant.allocated_to.partition(":")
    segment = grant.segment if grant.segment in {s.value for s in Segment} else ""
    await log.record(
        session,
        grant.org_id,
        Kind.SAMPLE_GIVEN,
        at=now,
        tags=log.Tags(
            channel="chat" if grant.conversation_id is not None else "",
            event_id=grant.event_id,
            drop_id=grant.drop_id,
            segment=segment or "",
            partner_id=int(ref) if kind == "partner" and ref.isdigit() else None,
            lane_id=lane_id,
        ),
        person=await funnel.person_of_ref(session, signer, grant.org_id, contact_ref),
        subject=f"sample:{grant.id}",
        value=grant.unit_cost_minor,
        currency=grant.currency,
    )


async def _bought_later(
    session: AsyncSession, signer: Signer, org_id: int, event_id: int
) -> dict[tuple[str, str], int]:
    """Per (allocation, currency): samples whose person paid an order of the event after
    getting it (the order's contact ref, digested like the grant's person key)."""
    grants = (
        await session.execute(
            select(
                SampleGrant.person_key,
                SampleGrant.allocated_to,
                SampleGrant.currency,
                SampleGrant.given_at,
            ).where(SampleGrant.org_id == org_id, SampleGrant.event_id == event_id)
        )
    ).all()
    if not grants:
        return {}
    latest_paid: dict[str, datetime] = {}  # per person: their latest paid order
    paid_orders = await session.execute(
        select(Order.contact_ref, Order.paid_at).where(
            Order.org_id == org_id,
            Order.event_id == event_id,
            Order.status.in_(SOLD_STATUSES),
            Order.contact_ref.is_not(None),
            Order.paid_at.is_not(None),
        )
    )
    for contact_ref, paid_at in paid_orders:
        key = contact_digest(signer, contact_ref)
        if key is not None and paid_at is not None:
            latest_paid[key] = max(latest_paid.get(key, paid_at), paid_at)
    counted: dict[tuple[str, str], int] = {}
    for person_key, allocated_to, currency, given_at in grants:
        paid_at = latest_paid.get(person_key)
        if paid_at is not None and paid_at >= given_at:
            counted[(allocated_to, currency)] = counted.get((allocated_to, currency), 0) + 1
    return counted


async def sample_costs(
    session: AsyncSession, principal: Principal, event_id: int, *, signer: Signer | None = None
) -> SampleCosts:
    """What an event's samples cost, per allocation (and currency), with the latest grants;
    with the `signer`, also how many of those people bought at the event afterwards."""
    principal.require(READ_SCOPE)
    event = await owned(session, Event, event_id, principal.org_id, what="event")
    where = (SampleGrant.org_id == principal.org_id, SampleGrant.event_id == event.id)
    rows = (
        await session.execute(
            select(
                SampleGrant.allocated_to,
                SampleGrant.currency,
                func.count(),
                func.coalesce(func.sum(SampleGrant.unit_cost_minor), 0),
            )
            .where(*where)
            .group_by(SampleGrant.allocated_to, SampleGrant.currency)
            .order_by(SampleGrant.allocated_to, SampleGrant.currency)
        )
    ).all()
    later = (
        {} if signer is None else await _bought_later(session, signer, principal.org_id, event.id)
    )
    allocations = [
        AllocationCost(
            allocated_to=to,
            currency=cur,
            samples=int(n),
            cost_minor=int(cost),
            bought_later=later.get((to, cur), 0),
        )
        for to, cur, n, cost in rows
    ]
    recent = await session.scalars(
        select(SampleGrant).where(*where).order_by(SampleGrant.id.desc()).limit(RECENT)
    )
    return SampleCosts(
        event_id=event.id,
        samples=sum(a.samples for a in allocations),
        allocations=allocations,
        recent=[sample_out(grant) for grant in recent],
    )
