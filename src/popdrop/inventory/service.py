"""Stock and holds. Never oversold, and an expired hold is free the moment it expires.

Taking stock is one conditional `UPDATE stock SET held = held + :qty WHERE … AND
total - held - sold >= :qty`: the stock row serialises concurrent holds of a variant at a
lane. `held` counts holds marked active; holds past `expires_at` are marked expired and
given back by the next hold on the same stock (in the same transaction, before the
check), and availability reads count only unexpired holds, so no sweeper is needed for
correctness. Nothing is taken before the event's `opens_at` (`not_open_yet`): the take's
condition is `events.lifecycle.open_clause`. A product's per-person limit counts every
lane; on PostgreSQL one person's holds of a product queue on an advisory lock keyed by
(product, person), taken first. Lock order everywhere: the person's advisory lock -> hold
rows -> stock row -> pickup window. A hold taken is a `hold` event in the funnel log,
written with it (same statement on PostgreSQL).

Group commit (`core.group_commit`; PostgreSQL, plain holds: no slot, no per-person limit, no
Idempotency-Key): the holds of one stock row that arrive while a batch of it is in the
database wait in this process and go as the next batch: ONE statement that locks the
row, grants the requests in arrival order while their running sum of units fits
(`total - held - sold`, read under the lock), takes the units once, and inserts a hold
row and a funnel row per granted request, answering one row per request. The row's lock
and the commit are paid once per batch instead of once per hold. Each request stays
all-or-nothing with its own answer; a request the batch could not grant is refused from
the batch's own figures (`sold_out` / `insufficient_stock`) only when that is exact (the
event open, no expired hold to give back, more units asked than are left); otherwise it
takes the one-hold path, which knows every other answer.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import (
    String,
    and_,
    bindparam,
    cast,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from popdrop.accounts.service import Principal
from popdrop.core import metrics
from popdrop.core.cache import ProcessCache
from popdrop.core.db import Database, UTCDateTime, table_of
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.group_commit import GroupCommit, GroupFailed, for_loop
from popdrop.core.tenancy import owned
from popdrop.events.lifecycle import OPEN_EVENT_STATUSES, open_clause, require_open
from popdrop.events.models import Event, Lane, PickupWindow, TimeSlot
from popdrop.inventory.lifecycle import HOLD_LIFECYCLE, HoldStatus
from popdrop.inventory.models import Hold, Product, Stock, Variant
from popdrop.inventory.schemas import (
    Availability,
    HoldCreate,
    HoldOut,
    ProductCreate,
    ProductOut,
    StockOut,
    StockSet,
    VariantOut,
)
from popdrop.metrics import log as funnel
from popdrop.metrics.kinds import Kind

_stock = table_of(Stock)
_holds = table_of(Hold)
_windows = table_of(PickupWindow)
_now = bindparam("now", type_=UTCDateTime())

_EXPIRE = (
    update(_holds)
    .where(
        _holds.c.stock_id == bindparam("h_stock"),
        _holds.c.status == HoldStatus.ACTIVE,
        _holds.c.expires_at <= _now,
    )
    .values(status=HoldStatus.EXPIRED, ended_at=_now)
    .returning(_holds.c.qty, _holds.c.slot_id, _holds.c.lane_id)
)
_GIVE_BACK = (
    update(_stock)
    .where(_stock.c.id == bindparam("s_id"))
    .values(held=_stock.c.held - bindparam("s_qty"))
)
_events = table_of(Event)
_EVENT_TAKES_HOLDS = open_clause(_events.c.status, _events.c.opens_at, _now)
_TAKE = (
    update(_stock)
    .where(
        _stock.c.id == bindparam("s_id"),
        _stock.c.total - _stock.c.held - _stock.c.sold >= bindparam("s_qty"),
        # The event must take holds (open, opens_at reached), checked in the same
        # statement as the take.
        select(_events.c.id)
        .where(_events.c.id == bindparam("s_event"), _EVENT_TAKES_HOLDS)
        .exists(),
    )
    .values(held=_stock.c.held + bindparam("s_qty"))
    .returning(_stock.c.total - _stock.c.held - _stock.c.sold)
)
_WINDOW_TAKE = (
    update(_windows)
    .where(
        _windows.c.lane_id == bindparam("w_lane"),
        _windows.c.slot_id == bindparam("w_slot"),
        _windows.c.taken + bindparam("w_qty") <= _windows.c.capacity,
    )
    .values(taken=_windows.c.taken + bindparam("w_qty"))
    .returning(_windows.c.id)
)
_WINDOW_GIVE_BACK = (
    update(_windows)
    .where(_windows.c.lane_id == bindparam("w_lane"), _windows.c.slot_id == bindparam("w_slot"))
    .values(taken=_windows.c.taken - bindparam("w_qty"))
)
_INSERT_HOLD = insert(_holds).returning(_holds.c.id)
_HOLD_COLUMNS = (
    "org_id", "event_id", "stock_id", "variant_id", "lane_id", "slot_id", "qty",
    "contact_ref", "status", "created_at", "expires_at", "renewals", "ended_at",
)  # fmt: skip
# The funnel's `hold` event (`metrics.log`) is written with the hold: in the same
# statement on PostgreSQL, so a hot-SKU burst pays no extra round trip and the stock row
# is not locked any longer; right after the hold's INSERT on SQLite.
_funnel = funnel.funnel_events
CONTACT_PREFIX = "contact:"  # a chat's hold names its contact: `contact:<id>`
_LOG_COLUMNS = (
    "org_id", "at", "kind", "channel", "event_id", "drop_id", "variant", "segment",
    "partner_id", "lane_id", "label", "person", "subject", "value", "currency", "rolled",
)  # fmt: skip


def _log_values(subject: Any) -> list[Any]:
    """The log row's columns, from the hold's bound values and its `subject`."""
    return [
        bindparam("n_org_id", type_=_holds.c.org_id.type),
        bindparam("n_created_at", type_=_holds.c.created_at.type),
        literal(Kind.HOLD.value, String()),
        bindparam("f_channel", type_=String()),
        bindparam("n_event_id", type_=_holds.c.event_id.type),
        literal(None, _funnel.c.drop_id.type),
        literal("", String()),
        literal("", String()),
        literal(None, _funnel.c.partner_id.type),
        bindparam("n_lane_id", type_=_holds.c.lane_id.type),
        literal("", String()),
        bindparam("f_person", type_=String()),
        subject,
        literal(0, _funnel.c.value.type),
        literal("", String()),
        false(),
    ]


_taken = _TAKE.cte("taken")
_held = (
    insert(_holds)
    .from_select(
        list(_HOLD_COLUMNS),
        select(
            *(bindparam(f"n_{name}", type_=_holds.c[name].type) for name in _HOLD_COLUMNS)
        ).where(select(_taken.c[0]).exists()),
    )
    .returning(_holds.c.id)
    .cte("held")
)
_logged = (
    insert(_funnel)
    .from_select(
        list(_LOG_COLUMNS),
        select(*_log_values(literal("hold:", String()) + cast(_held.c.id, String()))),
    )
    .cte("logged")
)
_TAKE_AND_INSERT = select(_held.c.id).add_cte(_logged)
_INSERT_LOG = insert(_funnel).from_select(
    list(_LOG_COLUMNS), select(*_log_values(bindparam("f_subject", type_=String())))
)
_ANY_EXPIRED = (
    select(_holds.c.id)
    .where(
        _holds.c.stock_id == bindparam("h_stock"),
        _holds.c.status == HoldStatus.ACTIVE,
        _holds.c.expires_at <= _now,
    )
    .limit(1)
)
# Why a take failed, in one round trip: is the event open, what is left, and are there
# expired holds to give back first.
_STATE = select(
    select(_events.c.id)
    .where(_events.c.id == bindparam("e_id"), _EVENT_TAKES_HOLDS)
    .exists()
    .label("open"),
    select(_stock.c.total - _stock.c.held - _stock.c.sold)
    .where(_stock.c.id == bindparam("s_id"))
    .scalar_subquery()
    .label("available"),
    _ANY_EXPIRED.exists().label("any_expired"),
)
_AVAILABLE = select(_stock.c.total - _stock.c.held - _stock.c.sold).where(
    _stock.c.id == bindparam("s_id")
)


# ---------------------------------------------------------------- catalogue


async def _event_of_org(session: AsyncSession, principal: Principal, event_id: int) -> Event:
    return await owned(session, Event, event_id, principal.org_id)


async def create_product(
    session: AsyncSession, principal: Principal, event_id: int, spec: ProductCreate
) -> ProductOut:
    principal.require("inventory:write")
    event = await _event_of_org(session, principal, event_id)
    fields = spec.model_dump(exclude={"variants"})
    product = Product(org_id=principal.org_id, event_id=event.id, **fields)
    session.add(product)
    await session.flush()
    variants = [
        Variant(org_id=principal.org_id, product_id=product.id, name=n) for n in spec.variants
    ]
    session.add_all(variants)
    await session.flush()
    return product_out(product, variants)


def product_out(product: Product, variants: list[Variant]) -> ProductOut:
    return ProductOut(
        id=product.id,
        event_id=product.event_id,
        title=product.title,
        highlights=product.highlights,
        image_url=product.image_url,
        price_minor=product.price_minor,
        currency=product.currency,
        limit_per_contact=product.limit_per_contact,
        unit_cost_minor=product.unit_cost_minor,
        margin_floor_bp=product.margin_floor_bp,
        margin_floor_minor=product.margin_floor_minor,
        is_sample=product.is_sample,
        variants=[VariantOut(id=v.id, name=v.name, sku=v.sku) for v in variants],
    )


async def list_products(
    session: AsyncSession, principal: Principal, event_id: int
) -> list[ProductOut]:
    await _event_of_org(session, principal, event_id)
    products = list(
        await session.scalars(
            select(Product)
            .where(Product.event_id == event_id, Product.org_id == principal.org_id)
            .order_by(Product.id)
        )
    )
    variants = list(
        await session.scalars(
            select(Variant)
            .where(Variant.product_id.in_([p.id for p in products]))
            .order_by(Variant.id)
        )
    )
    return [product_out(p, [v for v in variants if v.product_id == p.id]) for p in products]


async def set_stock(
    session: AsyncSession, principal: Principal, spec: StockSet, *, now: datetime
) -> StockOut:
    """Set the units of a variant at a lane. Never below what is held or sold."""
    principal.require("inventory:write")
    missing = "variant or lane"  # one message: which of the two is not said
    variant = await owned(session, Variant, spec.variant_id, principal.org_id, what=missing)
    lane = await owned(session, Lane, spec.lane_id, principal.org_id, what=missing)
    product = await session.get(Product, variant.product_id)
    if product is None or product.event_id != lane.event_id:
        raise PopdropError("invalid_request", "the lane belongs to another event")
    stock = await session.scalar(
        select(Stock)
        .where(Stock.variant_id == variant.id, Stock.lane_id == lane.id)
        .with_for_update()
    )
    if stock is None:
        stock = Stock(
            org_id=principal.org_id, variant_id=variant.id, lane_id=lane.id, total=0, held=0, sold=0
        )
        session.add(stock)
        await session.flush()
    committed = stock.sold + await _active_held(session, stock.id, now)
    if spec.total < committed:
        raise PopdropError(
            "conflict", f"{committed} units are held or sold; total cannot go below that"
        )
    stock.total = spec.total
    await session.flush()
    return StockOut(
        id=stock.id,
        variant_id=stock.variant_id,
        lane_id=stock.lane_id,
        total=stock.total,
        sold=stock.sold,
        available=stock.total - committed,
    )


async def _active_held(session: AsyncSession, stock_id: int, now: datetime) -> int:
    held = await session.scalar(
        select(func.coalesce(func.sum(Hold.qty), 0)).where(
            Hold.stock_id == stock_id, Hold.status == HoldStatus.ACTIVE, Hold.expires_at > now
        )
    )
    return int(held or 0)


async def availability(
    session: AsyncSession, event_id: int, now: datetime, *, org_id: int | None = None
) -> list[Availability]:
    """Live stock of an event: total - sold - unexpired active holds, per variant and lane."""
    active = (
        select(Hold.stock_id, func.sum(Hold.qty).label("held"))
        .where(Hold.event_id == event_id, Hold.status == HoldStatus.ACTIVE, Hold.expires_at > now)
        .group_by(Hold.stock_id)
        .subquery()
    )
    query = (
        select(Stock, func.coalesce(active.c.held, 0))
        .join(Lane, Lane.id == Stock.lane_id)
        .outerjoin(active, active.c.stock_id == Stock.id)
        .where(Lane.event_id == event_id)
        .order_by(Stock.variant_id, Stock.lane_id)
    )
    if org_id is not None:
        query = query.where(Stock.org_id == org_id)
    rows = (await session.execute(query)).all()
    return [
        Availability(
            variant_id=stock.variant_id,
            lane_id=stock.lane_id,
            total=stock.total,
            held=int(held),
            sold=stock.sold,
            available=max(stock.total - stock.sold - int(held), 0),
        )
        for stock, held in rows
    ]


_products = table_of(Product)
_variants = table_of(Variant)
# Per product of an event: + (total - sold) of each stock row, - qty of each unexpired
# active hold; summed, that is `availability`'s rule added up over variants and lanes.
_UNIT_MOVES = union_all(
    select(
        _variants.c.product_id.label("product_id"),
        (_stock.c.total - _stock.c.sold).label("n"),
    )
    .join(_stock, _stock.c.variant_id == _variants.c.id)
    .join(_products, _products.c.id == _variants.c.product_id)
    .where(_products.c.event_id == bindparam("e_id"), _products.c.org_id == bindparam("o_id")),
    select(_variants.c.product_id, -_holds.c.qty)
    .join(_variants, _variants.c.id == _holds.c.variant_id)
    .where(
        _holds.c.event_id == bindparam("e_id"),
        _holds.c.status == HoldStatus.ACTIVE,
        _holds.c.expires_at > _now,
    ),
).subquery()
_UNITS_LEFT = select(_UNIT_MOVES.c.product_id, func.sum(_UNIT_MOVES.c.n)).group_by(
    _UNIT_MOVES.c.product_id
)


async def units_left_by_product(
    session: AsyncSession, org_id: int, event_id: int, now: datetime
) -> dict[int, int]:
    """Units left per product of an event, in one round trip: total - sold - unexpired
    active holds (the rule of `availability`), summed over the product's variants and
    lanes, never below 0. A product without stock is absent (read it as 0)."""
    conn = await session.connection()
    rows = await conn.execute(_UNITS_LEFT, {"e_id": event_id, "o_id": org_id, "now": now})
    return {int(product_id): max(int(n or 0), 0) for product_id, n in rows}


# ---------------------------------------------------------------- holds


@dataclass(frozen=True)
class _Target:
    stock_id: int
    event_id: int
    product_id: int
    limit_per_contact: int | None
    ttl_seconds: int  # events have no way to change their hold TTL once created


# (database, org, variant, lane) -> target: the mapping never changes once stock exists.
_TARGETS: ProcessCache[tuple[str, int, int, int], _Target] = ProcessCache(maxsize=16_384)
_EVENT_STATE = select(Event.status, Event.opens_at, Event.timezone, Event.hold_ttl_seconds).where(
    Event.id == bindparam("e_id")
)


def _target_key(url: str, principal: Principal, spec: HoldCreate) -> tuple[str, int, int, int]:
    return (url, principal.org_id, spec.variant_id, spec.lane_id)


async def _target(session: AsyncSession, principal: Principal, spec: HoldCreate) -> _Target:
    key = _target_key(str(session.get_bind().engine.url), principal, spec)
    cached = _TARGETS.get(key)
    if cached is not None:
        return cached
    row = (
        await session.execute(
            select(
                Stock.id,
                Product.event_id,
                Product.id,
                Product.limit_per_contact,
                Event.hold_ttl_seconds,
            )
            .join(Variant, Variant.id == Stock.variant_id)
            .join(Product, Product.id == Variant.product_id)
            .join(Event, Event.id == Product.event_id)
            .where(
                Stock.variant_id == spec.variant_id,
                Stock.lane_id == spec.lane_id,
                Stock.org_id == principal.org_id,
            )
        )
    ).first()
    if row is None:
        raise not_found("stock for that variant at that lane")
    target = _Target(*row)
    _TARGETS.put(key, target)
    return target


async def _reclaim_expired(conn: AsyncConnection, stock_id: int, now: datetime) -> None:
    expired = (await conn.execute(_EXPIRE, {"h_stock": stock_id, "now": now})).all()
    if not expired:
        return
    await conn.execute(_GIVE_BACK, {"s_id": stock_id, "s_qty": sum(r.qty for r in expired)})
    for row in expired:
        if row.slot_id is not None:
            await conn.execute(
                _WINDOW_GIVE_BACK, {"w_lane": row.lane_id, "w_slot": row.slot_id, "w_qty": row.qty}
            )


async def _require_open(conn: AsyncConnection, event_id: int, now: datetime) -> int:
    """Refuse unless the event takes holds at `now` (`events.lifecycle.require_open`:
    `event_closed`, `not_open_yet`); the event's hold TTL in seconds."""
    event = (await conn.execute(_EVENT_STATE, {"e_id": event_id})).one()
    require_open(event, now, takes="reservations")
    return int(event.hold_ttl_seconds)


_PERSON_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


def _person_key(target: _Target, spec: HoldCreate) -> int:
    """The advisory lock key of one person's holds of one product (signed 64 bits)."""
    digest = hashlib.blake2b(
        f"hold-limit:{target.product_id}:{spec.contact_ref}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


@metrics.counted(metrics.HOLDS, "placed")
async def create_hold(
    session: AsyncSession, principal: Principal, spec: HoldCreate, *, now: datetime
) -> HoldOut:
    principal.require("holds:write")
    target = await _target(session, principal, spec)
    conn = await session.connection()
    ttl_seconds = await _require_open(conn, target.event_id, now)
    if spec.slot_id is not None:
        slot = await session.scalar(
            select(TimeSlot.id).where(
                TimeSlot.id == spec.slot_id, TimeSlot.event_id == target.event_id
            )
        )
        if slot is None:
            raise not_found("slot of this event")
    limit = target.limit_per_contact if spec.contact_ref is not None else None
    if limit is not None and conn.dialect.name == "postgresql":
        # One person's holds of a product queue here, whichever lane they take from, so
        # the count below sees the previous one committed (SQLite writers queue anyway).
        await conn.execute(_PERSON_LOCK, {"key": _person_key(target, spec)})
    await _reclaim_expired(conn, target.stock_id, now)
    values = _hold_values(principal, target, spec, now, ttl_seconds)
    channel = funnel_channel(principal.actor)
    hold_id = await _take_and_record(conn, target, spec.qty, values, channel)
    if hold_id is None:
        raise await _refusal(conn, target.stock_id, spec.qty)
    # Whatever follows runs under the stock row lock: keep it short. A refusal below rolls
    # the whole transaction back, the units taken above included.
    if limit is not None:
        mine = await session.scalar(
            select(func.coalesce(func.sum(Hold.qty), 0))
            .join(Variant, Variant.id == Hold.variant_id)
            .where(
                Hold.event_id == target.event_id,
                Variant.product_id == target.product_id,
                Hold.contact_ref == spec.contact_ref,
                or_(
                    Hold.status == HoldStatus.CONVERTED,
                    and_(Hold.status == HoldStatus.ACTIVE, Hold.expires_at > now),
                ),
            )
        )
        if int(mine or 0) > limit:  # this hold is already counted
            raise PopdropError(
                "limit_per_contact",
                f"at most {limit} per person for this product",
            )
    if spec.slot_id is not None:
        window = await conn.execute(
            _WINDOW_TAKE, {"w_lane": spec.lane_id, "w_slot": spec.slot_id, "w_qty": spec.qty}
        )
        if window.first() is None:
            raise PopdropError("slot_full", "this pickup window is full; pick another slot")
    return HoldOut(id=hold_id, **{k: v for k, v in values.items() if k in HoldOut.model_fields})


@metrics.counted(metrics.HOLDS, "placed")
async def take_hold(
    db: Database, principal: Principal, spec: HoldCreate, *, now: datetime
) -> HoldOut:
    """`create_hold` for a burst on one hot variant.

    Holds with a pickup slot or a per-contact limit need several checks under the stock
    lock and go through `create_hold` in one transaction. A plain hold is a single
    statement that takes the units and records the hold, committing on its own, so the
    stock row is locked only while the database runs it. Expired holds are given back
    only when the units are not there, then the take is tried once more.
    """
    principal.require("holds:write")
    target = _TARGETS.get(_target_key(str(db.engine.url), principal, spec))
    if target is None:
        async with db.reader() as session:
            target = await _target(session, principal, spec)
    if spec.slot_id is not None or target.limit_per_contact is not None:
        async with db.transaction() as session:
            return await create_hold(session, principal, spec, now=now)
    values = _hold_values(principal, target, spec, now, target.ttl_seconds)
    channel = funnel_channel(principal.actor)
    if db.dialect == "postgresql":
        hold_id = await _batched_take(db, target, values, channel)
        if hold_id is not None:
            return HoldOut(
                id=hold_id, **{k: v for k, v in values.items() if k in HoldOut.model_fields}
            )
    return await _take_one(db, target, spec, values, channel, now)


async def _take_one(
    db: Database,
    target: _Target,
    spec: HoldCreate,
    values: dict[str, Any],
    channel: str,
    now: datetime,
) -> HoldOut:
    """One plain hold in its own statement; every refusal with its exact reason."""
    async with db.single_statements() as conn:
        hold_id = await _take_and_record(conn, target, spec.qty, values, channel)
        if hold_id is None:
            state = (await conn.execute(_STATE, _state_params(target, now))).one()
            if state.open and state.any_expired:
                await _reclaim_in_own_transaction(db, conn, target.stock_id, now)
                hold_id = await _take_and_record(conn, target, spec.qty, values, channel)
                if hold_id is None:
                    state = (await conn.execute(_STATE, _state_params(target, now))).one()
        if hold_id is None:
            if not state.open:
                await _require_open(conn, target.event_id, now)
                raise PopdropError("conflict", "this event changed meanwhile; try again")
            raise _short(state.available, spec.qty)
    return HoldOut(id=hold_id, **{k: v for k, v in values.items() if k in HoldOut.model_fields})


# ---------------------------------------------------------------- group commit (PostgreSQL)

# Arrays in (one element per request, in arrival order), one row per request out: its new
# hold id or NULL, the units left after the batch (NULL when the row is not there or the
# event takes no holds), and whether expired holds wait to be given back. `locked` reads
# the stock row under its lock (FOR UPDATE returns the latest committed version), so the
# running sums compare with what is really left; `taken` moves `held` once by the units
# granted. Hold ids come from the sequence up front, to answer each request with its own.
_BATCH_TAKE = text(
    """\
WITH req AS (
  SELECT r.i, r.qty, r.created_at, r.expires_at, r.contact_ref, r.channel, r.person,
         sum(r.qty) OVER (ORDER BY r.i) AS upto
  FROM unnest(CAST(:qtys AS INTEGER[]), CAST(:created AS TIMESTAMPTZ[]),
              CAST(:expires AS TIMESTAMPTZ[]), CAST(:refs AS VARCHAR[]),
              CAST(:channels AS VARCHAR[]), CAST(:persons AS VARCHAR[]))
       WITH ORDINALITY AS r(qty, created_at, expires_at, contact_ref, channel, person, i)
), locked AS (
  SELECT stock.total - stock.held - stock.sold AS avail FROM stock
  WHERE stock.id = :stock_id AND EXISTS (
    SELECT 1 FROM events WHERE events.id = :event_id
    AND events.status = ANY(CAST(:open_statuses AS VARCHAR[]))
    AND (events.opens_at IS NULL OR events.opens_at <= :opened_by))
  FOR UPDATE OF stock
), granted AS MATERIALIZED (
  SELECT req.i, req.qty, req.created_at, req.expires_at, req.contact_ref, req.channel,
         req.person, nextval('holds_id_seq') AS id
  FROM req, locked WHERE req.upto <= locked.avail
), taken AS (
  UPDATE stock SET held = stock.held + (SELECT sum(granted.qty) FROM granted)
  WHERE stock.id = :stock_id AND EXISTS (SELECT 1 FROM granted)
  RETURNING stock.id
), held AS (
  INSERT INTO holds (id, org_id, event_id, stock_id, variant_id, lane_id, slot_id, qty,
                     contact_ref, status, created_at, expires_at, renewals, ended_at)
  SELECT g.id, :org_id, :event_id, :stock_id, :variant_id, :lane_id, NULL, g.qty,
         g.contact_ref, :active, g.created_at, g.expires_at, 0, NULL
  FROM granted g ORDER BY g.i
), logged AS (
  INSERT INTO funnel_events (org_id, at, kind, channel, event_id, drop_id, variant, segment,
                             partner_id, lane_id, label, person, subject, value, currency,
                             rolled)
  SELECT :org_id, g.created_at, :kind, g.channel, :event_id, NULL, '', '', NULL, :lane_id,
         '', g.person, 'hold:' || g.id, 0, '', false
  FROM granted g ORDER BY g.i
)
SELECT req.i, granted.id AS hold_id,
       (SELECT avail FROM locked) - coalesce((SELECT sum(qty) FROM granted), 0) AS left_after,
       EXISTS (SELECT 1 FROM holds h WHERE h.stock_id = :stock_id
               AND h.status = :active AND h.expires_at <= :expired_by) AS any_expired
FROM req LEFT JOIN granted ON granted.i = req.i ORDER BY req.i"""
)
_BATCH_MAX = 512  # requests in one statement


@dataclass(frozen=True)
class _Ask:
    target: _Target
    values: dict[str, Any]
    channel: str
    person: str | None


# One coalescer (`core.group_commit`) per database and stock row, per event loop: one batch
# in flight per row in this process (the row's lock would queue a second one anyway).
_GROUPS: dict[tuple[tuple[Database, int], asyncio.AbstractEventLoop], GroupCommit[_Ask, int | None]]
_GROUPS = {}
BATCH_SIZES: list[int] = []  # the last batches' sizes (tests, benchmarks); bounded below


async def _batched_take(
    db: Database, target: _Target, values: dict[str, Any], channel: str
) -> int | None:
    """The new hold's id, or None when its batch could not grant it (the caller then
    takes the one-hold path, which answers exactly)."""
    group = for_loop(
        _GROUPS,
        (db, target.stock_id),
        lambda: GroupCommit(partial(_send_batch, db), max_batch=_BATCH_MAX),
    )
    person = _log_params(values, channel)["f_person"]
    try:
        return await group.submit(_Ask(target, values, channel, person))
    except GroupFailed:
        return None  # the batch rolled back as a whole: this hold goes its own way


async def _send_batch(db: Database, batch: Sequence[_Ask]) -> list[int | BaseException | None]:
    target = batch[0].target  # one coalescer per stock row: the same target for all
    first = batch[0].values
    params = {
        "qtys": [a.values["qty"] for a in batch],
        "created": [a.values["created_at"] for a in batch],
        "expires": [a.values["expires_at"] for a in batch],
        "refs": [a.values["contact_ref"] for a in batch],
        "channels": [a.channel for a in batch],
        "persons": [a.person for a in batch],
        "stock_id": target.stock_id,
        "event_id": target.event_id,
        "org_id": first["org_id"],
        "variant_id": first["variant_id"],
        "lane_id": first["lane_id"],
        "open_statuses": [str(status) for status in OPEN_EVENT_STATUSES],
        # Open for every request of the batch, and any hold expired for any of them: a
        # request at another instant is refused here only when that is exact for it too.
        "opened_by": min(a.values["created_at"] for a in batch),
        "expired_by": max(a.values["created_at"] for a in batch),
        "active": str(HoldStatus.ACTIVE),
        "kind": Kind.HOLD.value,
    }
    async with db.single_statements() as conn:
        rows = (await conn.execute(_BATCH_TAKE, params)).all()
    del BATCH_SIZES[: max(len(BATCH_SIZES) - 1000, 0)]
    BATCH_SIZES.append(len(batch))
    answers: list[int | BaseException | None] = []
    for ask, row in zip(batch, rows, strict=True):
        if row.hold_id is not None:
            answers.append(int(row.hold_id))
            continue
        exact = row.left_after is not None and not row.any_expired
        if exact and ask.values["qty"] > row.left_after:
            answers.append(_short(row.left_after, ask.values["qty"]))
        else:
            answers.append(None)
    return answers


def _state_params(target: _Target, now: datetime) -> dict[str, Any]:
    return {
        "s_id": target.stock_id,
        "e_id": target.event_id,
        "h_stock": target.stock_id,
        "now": now,
    }


async def _reclaim_in_own_transaction(
    db: Database, conn: AsyncConnection, stock_id: int, now: datetime
) -> None:
    if conn.in_transaction() and db.dialect == "sqlite":
        await _reclaim_expired(conn, stock_id, now)  # SQLite: already one transaction
        return
    async with db.engine.begin() as tx:
        await _reclaim_expired(tx, stock_id, now)


def _hold_values(
    principal: Principal, target: _Target, spec: HoldCreate, now: datetime, ttl_seconds: int
) -> dict[str, Any]:
    return {
        "org_id": principal.org_id,
        "event_id": target.event_id,
        "stock_id": target.stock_id,
        "variant_id": spec.variant_id,
        "lane_id": spec.lane_id,
        "slot_id": spec.slot_id,
        "qty": spec.qty,
        "contact_ref": spec.contact_ref,
        "status": HoldStatus.ACTIVE,
        "created_at": now,
        "expires_at": now + timedelta(seconds=ttl_seconds),
        "renewals": 0,
        "ended_at": None,
    }


async def _take_and_record(
    conn: AsyncConnection, target: _Target, qty: int, values: dict[str, Any], channel: str
) -> int | None:
    """Take `qty` units and insert the hold; None when the units are not there (or the
    event is not open)."""
    take = {
        "s_id": target.stock_id,
        "s_qty": qty,
        "s_event": target.event_id,
        "now": values["created_at"],
    }
    params = {**take, **_hold_params(values), **_log_params(values, channel)}
    if conn.dialect.name == "postgresql":
        # One statement: the stock row is locked for the shortest time (until COMMIT).
        row = await conn.execute(_TAKE_AND_INSERT, params)
        hold_id = row.scalar_one_or_none()
        return int(hold_id) if hold_id is not None else None
    if (await conn.execute(_TAKE, take)).first() is None:
        return None
    hold_id = int((await conn.execute(_INSERT_HOLD, values)).scalar_one())
    await conn.execute(_INSERT_LOG, {**params, "f_subject": f"hold:{hold_id}"})
    return hold_id


def _hold_params(values: dict[str, Any]) -> dict[str, Any]:
    return {f"n_{name}": value for name, value in values.items()}


def _log_params(values: dict[str, Any], channel: str) -> dict[str, Any]:
    """The funnel row's own values: who holds (a contact known by id; a chat or a buyer
    known only by a reference stays anonymous here, no signer on this path) and through
    what the hold came (`funnel_channel`)."""
    ref = values["contact_ref"] or ""
    contact = ref.removeprefix(CONTACT_PREFIX)
    person = funnel.contact_person(int(contact)) if ref != contact and contact.isdigit() else None
    return {"f_channel": channel, "f_person": person}


def funnel_channel(actor: str) -> str:
    """The funnel channel of who placed a hold: a chat, the public web page, an API token."""
    kind = actor.partition(":")[0]
    if actor == "system:chat":
        return "chat"
    if kind == "web":
        return "web"
    if kind == "token":
        return "api"
    return ""


async def _refusal(conn: AsyncConnection, stock_id: int, qty: int) -> PopdropError:
    # Exact: expired holds were given back in this transaction just before the check.
    available = (await conn.execute(_AVAILABLE, {"s_id": stock_id})).scalar_one_or_none()
    return _short(available, qty)


def _short(available: int | None, qty: int) -> PopdropError:
    if available is None:  # removed (inventory.parts) after another process cached it
        return not_found("stock for that variant at that lane")
    if available <= 0:
        return PopdropError("sold_out", "sold out", detail={"available": 0})
    return PopdropError(
        "insufficient_stock",
        f"only {available} left",
        detail={"available": available, "requested": qty},
    )


async def _active_hold(
    session: AsyncSession, principal: Principal, hold_id: int, now: datetime
) -> Hold:
    hold = await owned(session, Hold, hold_id, principal.org_id, lock=True)
    if hold.status == HoldStatus.ACTIVE and hold.expires_at <= now:
        raise PopdropError("hold_expired", "this hold has expired")
    if hold.status != HoldStatus.ACTIVE:
        raise PopdropError("conflict", f"this hold is {hold.status}")
    return hold


def hold_out(hold: Hold) -> HoldOut:
    return HoldOut.model_validate(hold, from_attributes=True)


async def extend_hold(
    session: AsyncSession, principal: Principal, hold_id: int, *, now: datetime
) -> HoldOut:
    principal.require("holds:write")
    hold = await _active_hold(session, principal, hold_id, now)
    event = await session.get(Event, hold.event_id)
    assert event is not None
    if hold.renewals >= event.max_hold_renewals:
        raise PopdropError("renewals_exhausted", "this hold cannot be extended again")
    hold.renewals += 1
    hold.expires_at = now + timedelta(seconds=event.hold_ttl_seconds)
    await session.flush()
    return hold_out(hold)


async def end_hold(
    session: AsyncSession, principal: Principal, hold_id: int, *, convert: bool, now: datetime
) -> HoldOut:
    """Release a hold (units go back) or convert it (units count as sold)."""
    principal.require("holds:write")
    hold = await _active_hold(session, principal, hold_id, now)
    conn = await session.connection()
    stock_change: dict[str, Any] = {"held": _stock.c.held - hold.qty}
    if convert:
        stock_change["sold"] = _stock.c.sold + hold.qty
    await conn.execute(update(_stock).where(_stock.c.id == hold.stock_id).values(stock_change))
    if hold.slot_id is not None and not convert:
        await conn.execute(
            _WINDOW_GIVE_BACK, {"w_lane": hold.lane_id, "w_slot": hold.slot_id, "w_qty": hold.qty}
        )
    # The hold's one status writer: an active hold ends converted or released.
    target = HoldStatus.CONVERTED if convert else HoldStatus.RELEASED
    hold.status = HOLD_LIFECYCLE.check(HoldStatus(hold.status), target)
    hold.ended_at = now
    await session.flush()
    return hold_out(hold)


async def get_hold(session: AsyncSession, principal: Principal, hold_id: int) -> HoldOut:
    principal.require("holds:write")
    return hold_out(await owned(session, Hold, hold_id, principal.org_id))
