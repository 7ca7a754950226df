"""Moving an order's units: held → sold, held → back, gone → taken again, sold → back.

Rules:
- Every move is a conditional UPDATE on the hold row and then the stock row (and the
  pickup window for a hold with a slot), in that order, as `inventory.service` locks them:
  hold rows → stock row → pickup window. The hold's conditional UPDATE (`status =
  'active'`) is what makes a move happen once: a hold an expiry sweep already gave back is
  never given back twice, a converted hold never sold twice.
- An active hold past its `expires_at` still counts in its stock's `held` until someone
  gives it back (`inventory.service` does that lazily), so converting it sells units that
  nobody else could have taken: a late payment on such a hold needs no new take.
- Taking units again (`retake`) is the inventory take's condition `total - held - sold >=
  qty`, after giving back the stock's expired holds; all of an order's units or none
  (a savepoint). The pickup window is taken again too: a full window is a refusal.
- Nothing here checks scopes or statuses of orders: the order services do, and call these
  inside their transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from popdrop.commerce.models import OrderLine
from popdrop.core.db import CAPACITY_WRITE_ORDER, UTCDateTime, defer_write, table_of
from popdrop.events.models import PickupWindow
from popdrop.inventory.lifecycle import HoldStatus
from popdrop.inventory.models import Hold, Stock

_holds = table_of(Hold)
_stock = table_of(Stock)
_windows = table_of(PickupWindow)
_lines = table_of(OrderLine)
_now = bindparam("now", type_=UTCDateTime())


@dataclass(frozen=True)
class Unit:
    """One hold of an order: where its units come from, and its status when read."""

    hold_id: int
    stock_id: int
    lane_id: int
    slot_id: int | None
    qty: int
    status: str = HoldStatus.ACTIVE


_UNIT_COLUMNS = (
    _holds.c.id, _holds.c.stock_id, _holds.c.lane_id, _holds.c.slot_id, _holds.c.qty,
    _holds.c.status,
)  # fmt: skip


# The statements of the checkout's hot path are built once, with bind parameters: building
# a statement and its SQLAlchemy cache key costs ~0.2-0.4 ms of CPU per call, more than
# executing it; a module-level statement memoizes its cache key.
_UNITS_OF = (
    select(*_UNIT_COLUMNS)
    .where(_holds.c.id.in_(bindparam("hold_ids", expanding=True)))
    .order_by(_holds.c.id)
)
_UNITS_OF_LOCKED = _UNITS_OF.with_for_update()
_UNITS_OF_ORDER = (
    select(*_UNIT_COLUMNS)
    .join(_lines, _lines.c.hold_id == _holds.c.id)
    .where(_lines.c.order_id == bindparam("order_id"))
    .order_by(_holds.c.id)
    .with_for_update(of=_holds)
)
_END_ACTIVE = (
    update(_holds)
    .where(_holds.c.id == bindparam("the_hold_id"), _holds.c.status == HoldStatus.ACTIVE)
    .values(status=bindparam("new_status"), ended_at=bindparam("the_ended_at"))
    .returning(_holds.c.id)
)
_SELL = (
    update(_stock)
    .where(_stock.c.id == bindparam("the_stock_id"))
    .values(held=_stock.c.held - bindparam("qty"), sold=_stock.c.sold + bindparam("qty"))
)
_GIVE_BACK = (
    update(_stock)
    .where(_stock.c.id == bindparam("the_stock_id"))
    .values(held=_stock.c.held - bindparam("qty"))
)
_RETURN_SOLD = (
    update(_stock)
    .where(_stock.c.id == bindparam("the_stock_id"))
    .values(sold=_stock.c.sold - bindparam("qty"))
)
_WINDOW_GIVE_BACK = (
    update(_windows)
    .where(
        _windows.c.lane_id == bindparam("the_lane_id"),
        _windows.c.slot_id == bindparam("the_slot_id"),
    )
    .values(taken=_windows.c.taken - bindparam("qty"))
)


async def units_of(session: AsyncSession, hold_ids: Sequence[int], *, lock: bool) -> list[Unit]:
    """The holds of an order in id order (the lock order), locked when asked."""
    query = _UNITS_OF_LOCKED if lock else _UNITS_OF
    rows = (await session.execute(query, {"hold_ids": list(hold_ids)})).all()
    return [Unit(*row) for row in rows]


async def units_of_order(session: AsyncSession, order_id: int) -> list[Unit]:
    """The holds of an order's lines, locked, in id order (one round trip)."""
    rows = (await session.execute(_UNITS_OF_ORDER, {"order_id": order_id})).all()
    return [Unit(*row) for row in rows]


async def _end_active(conn: AsyncConnection, unit: Unit, status: HoldStatus, now: datetime) -> bool:
    """Move an active hold to `status`; False when it was not active any more."""
    moved = await conn.execute(
        _END_ACTIVE, {"the_hold_id": unit.hold_id, "new_status": status, "the_ended_at": now}
    )
    return moved.first() is not None


async def convert_active(session: AsyncSession, units: Sequence[Unit], now: datetime) -> bool:
    """Sell the units of holds that are all still active (expired or not), as read under
    their lock: True when done, False (nothing written) when one of them had ended.

    The stock rows are the hot rows of a sale: in a transaction that defers hot writes
    (`core.db.defer_hot_writes`) their UPDATEs run just before the commit, in stock id
    order; they cannot fail (the units are already counted in `held`)."""
    if not units or any(u.status != HoldStatus.ACTIVE for u in units):
        return False
    conn = await session.connection()
    for unit in units:
        if not await _end_active(conn, unit, HoldStatus.CONVERTED, now):
            raise AssertionError("a locked active hold changed under us")
        sell = {"the_stock_id": unit.stock_id, "qty": unit.qty}

        async def write(sell: dict[str, Any] = sell) -> None:
            await conn.execute(_SELL, sell)

        if not defer_write(session, (CAPACITY_WRITE_ORDER, unit.stock_id), write):
            await write()
    return True


async def release_active(
    conn: AsyncConnection, units: Sequence[Unit], now: datetime, *, status: HoldStatus
) -> int:
    """Give back the units of the holds still active (`released` or `expired`); the
    number of holds given back (the others were already ended)."""
    released = 0
    for unit in units:
        if not await _end_active(conn, unit, status, now):
            continue
        released += 1
        await conn.execute(_GIVE_BACK, {"the_stock_id": unit.stock_id, "qty": unit.qty})
        if unit.slot_id is not None:
            await _window_give_back(conn, unit)
    return released


async def return_sold(conn: AsyncConnection, units: Sequence[Unit]) -> None:
    """Put sold units back on sale (a full refund before pickup)."""
    for unit in units:
        await conn.execute(_RETURN_SOLD, {"the_stock_id": unit.stock_id, "qty": unit.qty})
        if unit.slot_id is not None:
            await _window_give_back(conn, unit)


async def _window_give_back(conn: AsyncConnection, unit: Unit) -> None:
    await conn.execute(
        _WINDOW_GIVE_BACK,
        {"the_lane_id": unit.lane_id, "the_slot_id": unit.slot_id, "qty": unit.qty},
    )


class _Short(Exception):
    """A unit could not be taken again: roll the savepoint back."""


async def retake(session: AsyncSession, units: Sequence[Unit], now: datetime) -> bool:
    """Sell units whose holds were given back, if the stock (and the pickup window) still
    has them: all of them or none. True when sold."""
    try:
        async with session.begin_nested():
            conn = await session.connection()
            for unit in units:
                await _give_back_expired(conn, unit.stock_id, now)
                taken = await conn.execute(
                    update(_stock)
                    .where(
                        _stock.c.id == unit.stock_id,
                        _stock.c.total - _stock.c.held - _stock.c.sold >= unit.qty,
                    )
                    .values(sold=_stock.c.sold + unit.qty)
                    .returning(_stock.c.id)
                )
                if taken.first() is None:
                    raise _Short
                if unit.slot_id is not None:
                    window = await conn.execute(
                        update(_windows)
                        .where(
                            _windows.c.lane_id == unit.lane_id,
                            _windows.c.slot_id == unit.slot_id,
                            _windows.c.taken + unit.qty <= _windows.c.capacity,
                        )
                        .values(taken=_windows.c.taken + unit.qty)
                        .returning(_windows.c.id)
                    )
                    if window.first() is None:
                        raise _Short
    except _Short:
        return False
    return True


async def _give_back_expired(conn: AsyncConnection, stock_id: int, now: datetime) -> None:
    """The inventory rule: active holds past their expiry give their units back (the same
    statements as `inventory.service`'s lazy reclaim, run before a take)."""
    expired = (
        await conn.execute(
            update(_holds)
            .where(
                _holds.c.stock_id == stock_id,
                _holds.c.status == HoldStatus.ACTIVE,
                _holds.c.expires_at <= _now,
            )
            .values(status=HoldStatus.EXPIRED, ended_at=_now)
            .returning(_holds.c.qty, _holds.c.slot_id, _holds.c.lane_id),
            {"now": now},
        )
    ).all()
    if not expired:
        return
    await conn.execute(
        update(_stock)
        .where(_stock.c.id == stock_id)
        .values(held=_stock.c.held - sum(row.qty for row in expired))
    )
    for row in expired:
        if row.slot_id is not None:
            await conn.execute(
                update(_windows)
                .where(_windows.c.lane_id == row.lane_id, _windows.c.slot_id == row.slot_id)
                .values(taken=_windows.c.taken - row.qty)
            )


async def extend_until(conn: AsyncConnection, units: Sequence[Unit], until: datetime) -> None:
    """Keep active holds until `until` (pay at pickup: the units wait for the lane)."""
    await conn.execute(
        update(_holds)
        .where(
            _holds.c.id.in_([u.hold_id for u in units]),
            _holds.c.status == HoldStatus.ACTIVE,
            _holds.c.expires_at < until,
        )
        .values(expires_at=until)
    )
