"""Editing and removing an event's parts: time slots, pickup lanes, pickup windows and
product cards (adding them is `events.service` and `inventory.service`).

Rules:
- An edit never takes a capacity below what is taken: a slot's `capacity` below its
  `taken` (confirmed RSVPs and places held by open waiting-list offers), a pickup window's
  below its `taken` (holds for that lane and slot) → 409 `capacity_below_taken`, with
  `taken` and `capacity` in the answer. Stock per lane is set with `set_stock`, which
  refuses a total below what is held or sold.
- A removal never drops a part something points at → 409 `in_use`: a slot with places
  taken, holds, or RSVPs and offers made for it (cancelled ones too: they are the event's
  history); a lane or a product with holds made on it (any status; sold units are
  converted holds); a window with holds. What only describes the part goes with it: a
  lane's or a product's stock rows, a slot's or a lane's empty pickup windows. A reference
  kept by a higher floor (an RSVP, a chat pin) is caught by its foreign key: the delete
  runs in a SAVEPOINT and an integrity error becomes `in_use`.
- Each change locks the part's row first (the same row the RSVP and hold paths take with
  a conditional UPDATE), so a place taken meanwhile is seen; a refusal raises before the
  caller's transaction commits, so nothing is half-written.
- Tenancy: every part is found by its id and the caller's organization (`owned`).
- A product's price change records the price it replaces in `product_prices` (until
  `now`, same transaction): a checkout prices held units at the price of their hold's
  time (`commerce.orders`), so a host's new price applies to holds taken after it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.core.errors import PopdropError
from popdrop.core.tenancy import owned
from popdrop.events.models import Lane, PickupWindow, TimeSlot
from popdrop.inventory import service
from popdrop.inventory.models import Hold, Product, ProductPrice, Stock, Variant
from popdrop.inventory.schemas import (
    LaneUpdate,
    ProductOut,
    ProductUpdate,
    SlotUpdate,
    WindowUpdate,
)

EVENTS_WRITE = "events:write"  # slots, lanes and windows are the event's
INVENTORY_WRITE = "inventory:write"  # product cards are the stock's
_NO_SYNC = {"synchronize_session": False}  # the removed rows are not read again


def below_taken(what: str, taken: int, capacity: int) -> PopdropError:
    return PopdropError(
        "capacity_below_taken",
        f"{taken} places of this {what} are taken; its capacity cannot go below that",
        detail={"taken": taken, "capacity": capacity},
    )


def in_use(what: str, why: str) -> PopdropError:
    return PopdropError("in_use", f"this {what} cannot be removed: {why}")


async def _any(session: AsyncSession, *where: Any) -> bool:
    return (await session.scalar(select(Hold.id).where(*where).limit(1))) is not None


async def _delete(session: AsyncSession, what: str, why: str, *statements: Any) -> None:
    """Run the deletes in a SAVEPOINT; a row a higher floor still points at → `in_use`."""
    try:
        async with session.begin_nested():
            for statement in statements:
                await session.execute(statement, execution_options=_NO_SYNC)
    except IntegrityError as exc:
        raise in_use(what, why) from exc


async def _patch(session: AsyncSession, row: Any, spec: BaseModel) -> None:
    """Set the fields the request gave (left-out fields keep their value)."""
    for name, value in spec.model_dump(exclude_unset=True).items():
        setattr(row, name, value)
    await session.flush()


def _forget_targets(session: AsyncSession, org_id: int, pairs: list[tuple[int, int]]) -> None:
    """Drop this process's cached hold targets of removed stock (variant, lane) rows, so a
    hold on them is a 404 at once."""
    url = str(session.get_bind().engine.url)
    for variant_id, lane_id in pairs:
        service._TARGETS.pop((url, org_id, variant_id, lane_id))


# ---------------------------------------------------------------- slots


async def update_slot(
    session: AsyncSession, principal: Principal, slot_id: int, spec: SlotUpdate
) -> TimeSlot:
    principal.require(EVENTS_WRITE)
    slot = await owned(session, TimeSlot, slot_id, principal.org_id, lock=True, fresh=True)
    changes = spec.model_dump(exclude_unset=True)
    if changes.get("starts_at", slot.starts_at) >= changes.get("ends_at", slot.ends_at):
        raise PopdropError("invalid_request", "ends_at must be after starts_at")
    if "capacity" in changes and changes["capacity"] < slot.taken:
        raise below_taken("slot", slot.taken, changes["capacity"])
    await _patch(session, slot, spec)
    return slot


async def remove_slot(session: AsyncSession, principal: Principal, slot_id: int) -> None:
    principal.require(EVENTS_WRITE)
    slot = await owned(session, TimeSlot, slot_id, principal.org_id, lock=True, fresh=True)
    if slot.taken > 0:
        raise in_use("slot", f"{slot.taken} places are taken; lower its capacity instead")
    if await _any(session, Hold.slot_id == slot.id):
        raise in_use("slot", "holds were made for it")
    await _delete(
        session, "slot", "RSVPs or waiting-list offers were made for it",
        delete(PickupWindow).where(PickupWindow.slot_id == slot.id),
        delete(TimeSlot).where(TimeSlot.id == slot.id),
    )  # fmt: skip


# ---------------------------------------------------------------- lanes


async def update_lane(
    session: AsyncSession, principal: Principal, lane_id: int, spec: LaneUpdate
) -> Lane:
    principal.require(EVENTS_WRITE)
    lane = await owned(session, Lane, lane_id, principal.org_id, lock=True)
    await _patch(session, lane, spec)
    return lane


async def remove_lane(session: AsyncSession, principal: Principal, lane_id: int) -> int:
    """Remove the lane; its event's id (whose live stock changed)."""
    principal.require(EVENTS_WRITE)
    lane = await owned(session, Lane, lane_id, principal.org_id, lock=True)
    # The stock rows first: a hold takes them, so one taken meanwhile is seen below.
    stock = list(
        await session.scalars(select(Stock).where(Stock.lane_id == lane.id).with_for_update())
    )
    if await _any(session, Hold.lane_id == lane.id):
        raise in_use("lane", "holds were made at it (its units are held or sold)")
    await _delete(
        session, "lane", "something still points at it",
        delete(PickupWindow).where(PickupWindow.lane_id == lane.id),
        delete(Stock).where(Stock.lane_id == lane.id),
        delete(Lane).where(Lane.id == lane.id),
    )  # fmt: skip
    _forget_targets(session, principal.org_id, [(s.variant_id, s.lane_id) for s in stock])
    return lane.event_id


# ---------------------------------------------------------------- pickup windows


async def _locked_window(
    session: AsyncSession, principal: Principal, window_id: int
) -> PickupWindow:
    principal.require(EVENTS_WRITE)
    return await owned(
        session, PickupWindow, window_id, principal.org_id, what="pickup window",
        lock=True, fresh=True,
    )  # fmt: skip


async def update_window(
    session: AsyncSession, principal: Principal, window_id: int, spec: WindowUpdate
) -> PickupWindow:
    window = await _locked_window(session, principal, window_id)
    if spec.capacity < window.taken:
        raise below_taken("pickup window", window.taken, spec.capacity)
    window.capacity = spec.capacity
    await session.flush()
    return window


async def remove_window(session: AsyncSession, principal: Principal, window_id: int) -> None:
    window = await _locked_window(session, principal, window_id)
    if window.taken > 0:
        raise in_use("pickup window", f"{window.taken} units are held for it")
    await _delete(
        session, "pickup window", "something still points at it",
        delete(PickupWindow).where(PickupWindow.id == window.id),
    )  # fmt: skip


# ---------------------------------------------------------------- product cards


async def _product_out(session: AsyncSession, product: Product) -> ProductOut:
    variants = list(
        await session.scalars(
            select(Variant).where(Variant.product_id == product.id).order_by(Variant.id)
        )
    )
    return service.product_out(product, variants)


async def update_product(
    session: AsyncSession,
    principal: Principal,
    product_id: int,
    spec: ProductUpdate,
    *,
    now: datetime,
) -> ProductOut:
    """Edit the card. A new price keeps the old one in `product_prices` (in effect until
    `now`), so units held before the change keep the price their holder saw."""
    principal.require(INVENTORY_WRITE)
    product = await owned(session, Product, product_id, principal.org_id, lock=True)
    price_before = product.price_minor
    await _patch(session, product, spec)
    if product.price_minor != price_before:
        session.add(
            ProductPrice(
                org_id=product.org_id,
                product_id=product.id,
                price_minor=price_before,
                until=now,
            )
        )
        await session.flush()
    if product.is_sample and (product.price_minor != 0 or product.unit_cost_minor is None):
        raise PopdropError("invalid_request", "a sample is priced 0 and needs its unit cost")
    return await _product_out(session, product)


async def remove_product(session: AsyncSession, principal: Principal, product_id: int) -> int:
    """Remove the product card with its variants and stock; its event's id."""
    principal.require(INVENTORY_WRITE)
    product = await owned(session, Product, product_id, principal.org_id, lock=True)
    variant_ids = select(Variant.id).where(Variant.product_id == product.id)
    stock = list(
        await session.scalars(
            select(Stock).where(Stock.variant_id.in_(variant_ids)).with_for_update()
        )
    )
    if await _any(session, Hold.variant_id.in_(variant_ids)):
        raise in_use("product", "holds were made on it (its units are held or sold)")
    await _delete(
        session, "product", "it is pinned in the chat; unpin it first",
        delete(Stock).where(Stock.variant_id.in_(variant_ids)),
        delete(Variant).where(Variant.product_id == product.id),
        delete(ProductPrice).where(ProductPrice.product_id == product.id),
        delete(Product).where(Product.id == product.id),
    )  # fmt: skip
    _forget_targets(session, principal.org_id, [(s.variant_id, s.lane_id) for s in stock])
    return product.event_id
