"""Pickup: an order's QR secret, signed like a ticket and verifiable offline, and handing
an order out at a lane.

The secret is base64url (no padding) of `payload || signature`, the payload being
`kind (1 byte, 0x4F "O") | event_id (8) | order_id (8) | generation (4)`, big-endian, and
the signature Ed25519 (64 bytes) by the event's check-in key (`checkin.service`: the key
a door scanner already syncs): 85 bytes, 114 characters. A ticket secret has another
first byte (version 1) and another length (119 characters), so neither ever passes as the
other, online or offline. Ed25519 is deterministic, so the secret is rebuilt from the
order row whenever it is shown; bumping `Order.pickup_generation` retires older QRs.

Rules of `hand_out` (one scan at one lane, by someone with `orders:pickup`):
- The order is found by its QR secret (signature checked with the event key of the
  caller's organization; a secret of another org is `invalid`, never a hint) or by its
  typed short code (`Order.short_code`, any case, dashes optional, I/L/O read as 1/0),
  looked up in the lane's event. A code with a wrong check character is `invalid`.
- Answers, in this order: `invalid` (forged, unknown, an older generation), `wrong_event`
  (a QR of another event of this org), `cancelled` / `expired` / `refunded`,
  `already_picked_up` (with when and by whom: the same scan again says so, nothing
  changes), `wrong_lane` (with the order's lane), `outside_window` (the order's pickup
  window, from `EARLY_GRACE` before its start to `LATE_GRACE` after its end; an order
  without a slot: the event's door hours, as check-in has them), `not_paid` (pending:
  the answer carries the total so staff can take the money; marking it paid is
  `commerce.settlement`'s), then `ok`.
- `ok` is one conditional `UPDATE orders SET status = 'picked_up' … WHERE status IN
  (paid, ready) AND lane_id = :lane` (the moves `ORDER_LIFECYCLE` allows): two scanners
  racing on one order hand it out once; the loser reads the winner and answers
  `already_picked_up`.
- Capacity per lane and window is taken when units are held (`inventory`: a hold with a
  slot takes `PickupWindow.taken`, refused `slot_full` when full), so an order can never
  be placed for a full window; pickup itself takes nothing.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from popdrop.accounts.service import Principal
from popdrop.checkin import service as checkin
from popdrop.checkin import tickets
from popdrop.checkin.models import EventKey
from popdrop.commerce import funnel
from popdrop.commerce.lifecycle import ORDER_LIFECYCLE, OrderStatus, PaymentMethod
from popdrop.commerce.models import Order, OrderLine
from popdrop.core import links
from popdrop.core.db import READONLY_OPTION
from popdrop.core.errors import not_found
from popdrop.core.localtime import local, slot_label
from popdrop.core.money import Money
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned
from popdrop.events.models import Event, Lane, PickupWindow, TimeSlot
from popdrop.metrics.kinds import Kind

SCOPE = "orders:pickup"
KIND = 0x4F  # "O": an order; ticket secrets start with their version, 1
_PAYLOAD = struct.Struct(">BQQI")
PAYLOAD_BYTES = _PAYLOAD.size  # 21
SECRET_BYTES = PAYLOAD_BYTES + tickets.SIGNATURE_BYTES  # 85
SECRET_CHARS = (SECRET_BYTES * 4 + 2) // 3  # 114
# A window's pickup opens a little early and stays open a while after it (people are
# late; their goods are paid for). Orders without a slot follow the door hours.
EARLY_GRACE = timedelta(minutes=30)
LATE_GRACE = timedelta(hours=1)

PickupReason = Literal[
    "ok",
    "invalid",
    "wrong_event",
    "wrong_lane",
    "outside_window",
    "already_picked_up",
    "not_paid",
    "refunded",
    "cancelled",
    "expired",
]
# The HTTP status of each answer (the API and the pickup page answer with it).
PICKUP_STATUS: dict[str, int] = {
    "ok": 200,
    "invalid": 422,
    "wrong_event": 409,
    "wrong_lane": 409,
    "outside_window": 409,
    "already_picked_up": 409,
    "not_paid": 409,
    "refunded": 410,
    "cancelled": 410,
    "expired": 410,
}
_TEXT = {
    "ok": "hand it out",
    "invalid": "this is not a valid order code",
    "wrong_event": "this order is for another event",
    "wrong_lane": "this order is picked up at another lane",
    "outside_window": "this order's pickup window is not now",
    "already_picked_up": "this order was already picked up",
    "not_paid": "this order is not paid yet",
    "refunded": "this order was refunded",
    "cancelled": "this order was cancelled",
    "expired": "this order expired unpaid",
}
_ENDED = {
    OrderStatus.CANCELLED: "cancelled",
    OrderStatus.EXPIRED: "expired",
    OrderStatus.REFUNDED: "refunded",
}
_HANDABLE = ORDER_LIFECYCLE.sources(OrderStatus.PICKED_UP)  # paid, ready


# ---------------------------------------------------------------- the secret (pure)


@dataclass(frozen=True)
class OrderClaim:
    """What an order secret says, before anyone checked the signature."""

    event_id: int
    order_id: int
    generation: int
    payload: bytes
    signature: bytes


def sign_order(
    private_key: Ed25519PrivateKey, *, event_id: int, order_id: int, generation: int
) -> str:
    payload = _PAYLOAD.pack(KIND, event_id, order_id, generation)
    return tickets.b64encode(payload + private_key.sign(payload))


def parse_order(secret: str) -> OrderClaim | None:
    """Split an order secret into its claim; None when it cannot be one (a ticket secret
    included). No signature check."""
    if len(secret) != SECRET_CHARS or not secret.isascii():
        return None
    try:
        raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != SECRET_BYTES or tickets.b64encode(raw) != secret:
        return None
    payload, signature = raw[:PAYLOAD_BYTES], raw[PAYLOAD_BYTES:]
    kind, event_id, order_id, generation = _PAYLOAD.unpack(payload)
    if kind != KIND or not (1 <= event_id <= tickets.MAX_ID and 1 <= order_id <= tickets.MAX_ID):
        return None
    return OrderClaim(event_id, order_id, generation, payload, signature)


def _signature_ok(public_key: Ed25519PublicKey, claim: OrderClaim) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(claim.signature, claim.payload)
    except InvalidSignature:
        return False
    return True


def verify_offline(
    public_key: bytes | Ed25519PublicKey,
    secret: str,
    generations: Mapping[int, int] | None = None,
    *,
    event_id: int | None = None,
) -> tuple[Literal["ok", "invalid", "revoked"], OrderClaim | None]:
    """Check an order secret with only the event's public key (the one in the check-in key
    document): ("ok", claim), ("invalid", None) for anything forged, malformed, a ticket
    or another event's, ("revoked", claim) for an older generation than `generations`
    knows. Whether it was paid or picked up is the server's to say."""
    claim = parse_order(secret)
    if claim is None or (event_id is not None and claim.event_id != event_id):
        return "invalid", None
    key = (
        public_key
        if isinstance(public_key, Ed25519PublicKey)
        else tickets.public_key_of(public_key)
    )
    if not _signature_ok(key, claim):
        return "invalid", None
    if generations is not None and generations.get(claim.order_id, 1) != claim.generation:
        return "revoked", claim
    return "ok", claim


# ---------------------------------------------------------------- the secret of an order


def _read_only(conn: AsyncConnection) -> bool:
    sync = conn.sync_connection
    return bool(sync is not None and sync.get_execution_options().get(READONLY_OPTION, False))


async def _event_signer(session: AsyncSession, event_id: int, now: datetime) -> checkin.EventSigner:
    """The event's check-in key, made on first use. A reader session cannot keep a new
    key, so then it is made in its own short transaction (concurrent first uses agree:
    `checkin.event_signer` inserts with ON CONFLICT DO NOTHING and reads the winner)."""
    event = await session.get(Event, event_id)
    if event is None:
        raise not_found("event")
    conn = await session.connection()
    has_key = await session.scalar(select(EventKey.event_id).where(EventKey.event_id == event_id))
    if has_key is None and _read_only(conn):
        async with AsyncSession(bind=conn.engine, expire_on_commit=False) as own, own.begin():
            return await checkin.event_signer(own, event, now)
    return await checkin.event_signer(session, event, now)


def secret_with(signer: checkin.EventSigner, order: Order) -> str:
    return sign_order(
        signer.private,
        event_id=order.event_id,
        order_id=order.id,
        generation=order.pickup_generation,
    )


async def order_secret(session: AsyncSession, order: Order, *, now: datetime) -> str:
    """The pickup QR secret of an order (rebuilt, never stored)."""
    return secret_with(await _event_signer(session, order.event_id, now), order)


def order_qr_url(base_url: str, view_token: str, fmt: Literal["svg", "png"] = "svg") -> str:
    """The order's pickup QR as an image, for the confirmation page and the receipt; the
    token is the confirmation page's (`links.order_view_url`)."""
    return links.absolute(base_url, f"/orders/view/{view_token}/qr.{fmt}")


def pickable(order: Order) -> bool:
    """Whether the order's QR is worth showing: paid or set aside, or reserved to pay at
    pickup."""
    return order.status in _HANDABLE or (
        order.status == OrderStatus.PENDING and order.payment_method == PaymentMethod.PAY_AT_PICKUP
    )


def format_code(code: str | None) -> str | None:
    """`K7QM4XT29` -> `K7QM-4XT2-9`, as printed under the QR."""
    return None if code is None else tickets.format_short_code(code)


# ---------------------------------------------------------------- hand out


class PickupLine(BaseModel):
    title: str
    qty: int


class PickupResult(BaseModel):
    result: str  # a PickupReason
    reason: str | None  # None when ok
    message: str
    order_id: int | None = None
    event_id: int | None = None
    short_code: str | None = None  # as printed (K7QM-4XT2-9)
    status: str | None = None  # the order's status after the scan
    summary: str = ""  # "Order #12 · 2 x Tote bag, 1 x Mug"
    lines: list[PickupLine] = []
    lane_id: int | None = None  # the order's lane
    lane_name: str | None = None
    window: str | None = None  # the order's pickup window, in the event's time zone
    total_minor: int | None = None
    currency: str | None = None
    payment_method: str | None = None
    picked_up_at: datetime | None = None
    picked_up_by: str | None = None

    @property
    def http_status(self) -> int:
        return PICKUP_STATUS[self.result]


def _invalid(message: str | None = None) -> PickupResult:
    return PickupResult(result="invalid", reason="invalid", message=message or _TEXT["invalid"])


async def _find_order(
    session: AsyncSession, principal: Principal, text: str, lane: Lane, now: datetime
) -> Order | PickupResult:
    """The order a scan names, or the answer when it names none of ours."""
    text = text.strip()
    claim = parse_order(text)
    if claim is not None:
        signer_row = await session.scalar(
            select(EventKey).where(
                EventKey.event_id == claim.event_id, EventKey.org_id == principal.org_id
            )
        )
        if signer_row is None:
            return _invalid()
        signer = await _event_signer(session, claim.event_id, now)
        if not _signature_ok(signer.public, claim):
            return _invalid()
        order = await session.scalar(
            select(Order)
            .where(
                Order.id == claim.order_id,
                Order.event_id == claim.event_id,
                Order.org_id == principal.org_id,
            )
            .execution_options(populate_existing=True)
        )
        if order is None:
            return _invalid()
        if order.pickup_generation != claim.generation:
            return _invalid("this QR was replaced by a newer one; show the latest")
        return order
    if tickets.parse(text) is not None:
        return _invalid("this is a ticket, not an order: scan it at the door")
    if not tickets.looks_like_short_code(text):
        return _invalid()
    code = tickets.parse_short_code(text)
    if code is None:
        return _invalid("this code has a typo (its check character does not match)")
    order = await session.scalar(
        select(Order)
        .where(
            Order.org_id == principal.org_id,
            Order.event_id == lane.event_id,
            Order.short_code == code,
        )
        .execution_options(populate_existing=True)
    )
    return _invalid() if order is None else order


async def _details(session: AsyncSession, order: Order) -> tuple[Event, Lane, TimeSlot | None]:
    event = await session.get(Event, order.event_id)
    lane = await session.get(Lane, order.lane_id)
    assert event is not None and lane is not None  # foreign keys
    slot = await session.get(TimeSlot, order.slot_id) if order.slot_id is not None else None
    return event, lane, slot


def window_of(event: Event, slot: TimeSlot | None) -> tuple[datetime, datetime]:
    """When the order may be handed out (grace included)."""
    if slot is None:
        return event.starts_at - checkin.OPENS_BEFORE, event.ends_at + checkin.CLOSES_AFTER
    return slot.starts_at - EARLY_GRACE, slot.ends_at + LATE_GRACE


def window_label(event: Event, slot: TimeSlot | None) -> str:
    if slot is None:
        return slot_label(event.starts_at, event.ends_at, event.timezone, "During the event")
    return slot_label(slot.starts_at, slot.ends_at, event.timezone, slot.label)


async def _lines(session: AsyncSession, order_id: int) -> list[PickupLine]:
    rows = await session.execute(
        select(OrderLine.title, OrderLine.qty - OrderLine.refunded_qty)
        .where(OrderLine.order_id == order_id)
        .order_by(OrderLine.id)
    )
    return [PickupLine(title=title, qty=int(qty)) for title, qty in rows if qty > 0]


async def _answer(
    session: AsyncSession, order: Order, result: str, *, message: str | None = None
) -> PickupResult:
    event, lane, slot = await _details(session, order)
    lines = await _lines(session, order.id)
    items = ", ".join(f"{line.qty} x {line.title}" for line in lines)
    return PickupResult(
        result=result,
        reason=None if result == "ok" else result,
        message=message or _TEXT[result],
        order_id=order.id,
        event_id=order.event_id,
        short_code=format_code(order.short_code),
        status=order.status,
        summary=f"Order #{order.id}" + (f" · {items}" if items else ""),
        lines=lines,
        lane_id=lane.id,
        lane_name=lane.name,
        window=window_label(event, slot),
        total_minor=order.total_minor,
        currency=order.currency,
        payment_method=order.payment_method,
        picked_up_at=order.picked_up_at,
        picked_up_by=order.picked_up_by,
    )


async def _refusal(
    session: AsyncSession, order: Order, lane: Lane, now: datetime
) -> PickupResult | None:
    """Why this order cannot be handed out at this lane now, or None."""
    status = OrderStatus(order.status)
    if status in _ENDED:
        return await _answer(session, order, _ENDED[status])
    event, order_lane, slot = await _details(session, order)
    if status == OrderStatus.PICKED_UP:
        when = local(order.picked_up_at, event.timezone, "%a %d %b, %H:%M")
        by = f" by {order.picked_up_by}" if order.picked_up_by else ""
        return await _answer(
            session, order, "already_picked_up", message=f"already picked up {when}{by}"
        )
    if order.lane_id != lane.id:
        return await _answer(
            session, order, "wrong_lane", message=f"this order is picked up at {order_lane.name}"
        )
    opens, closes = window_of(event, slot)
    if not opens <= now <= closes:
        label = window_label(event, slot)
        return await _answer(
            session, order, "outside_window", message=f"this order is picked up {label}"
        )
    if status == OrderStatus.PENDING:
        total = Money(order.total_minor, order.currency)
        return await _answer(
            session, order, "not_paid",
            message=f"not paid yet: take {total.format()}, mark it paid, then scan again",
        )  # fmt: skip
    return None


async def hand_out(
    session: AsyncSession,
    principal: Principal,
    *,
    secret_or_code: str,
    lane_id: int,
    now: datetime,
    signer: Signer | None = None,
) -> PickupResult:
    """Hand an order out at a lane (see the module rules); the answer for the scanner."""
    principal.require(SCOPE)
    lane = await owned(session, Lane, lane_id, principal.org_id, what="lane")
    found = await _find_order(session, principal, secret_or_code[:512], lane, now)
    if isinstance(found, PickupResult):
        return found
    order = found
    if order.event_id != lane.event_id:
        return PickupResult(
            result="wrong_event",
            reason="wrong_event",
            message=_TEXT["wrong_event"],
            order_id=order.id,
            event_id=order.event_id,
        )
    refused = await _refusal(session, order, lane, now)
    if refused is not None:
        return refused
    taken = await session.execute(
        update(Order)
        .where(
            Order.id == order.id,
            Order.lane_id == lane.id,
            Order.status.in_(_HANDABLE),
        )
        .values(status=OrderStatus.PICKED_UP, picked_up_at=now, picked_up_by=principal.actor)
        .returning(Order.id)
        .execution_options(synchronize_session=False)
    )
    won = taken.first() is not None
    await session.refresh(order)
    if not won:  # another scanner (or a refund) got there first: say what happened
        refused = await _refusal(session, order, lane, now)
        if refused is not None:
            return refused
    else:  # this scan handed it out: the funnel's pickup, once per order
        await funnel.record(session, signer, order, Kind.ORDER_PICKED_UP, now=now)
    return await _answer(session, order, "ok")


# ---------------------------------------------------------------- the lane's queue


class QueueOrder(BaseModel):
    order_id: int
    short_code: str | None
    status: str
    payment_method: str | None
    total_minor: int
    currency: str
    paid_at: datetime | None
    lines: list[PickupLine]


class QueueWindow(BaseModel):
    slot_id: int | None  # None: orders without a pickup slot (any time of the event)
    label: str  # in the event's time zone
    starts_at: datetime | None
    ends_at: datetime | None
    capacity: int | None  # the lane's pickup window, when it has one
    taken: int | None  # units held or sold for it
    picked_up: int  # orders handed out already
    orders: list[QueueOrder]  # to hand out: paid, set aside, or to pay at pickup


class LaneQueue(BaseModel):
    event_id: int
    lane_id: int
    lane_name: str
    pickup_point: str
    windows: list[QueueWindow]


async def lane_queue(
    session: AsyncSession, principal: Principal, event_id: int, lane_id: int
) -> LaneQueue:
    """The orders a lane has to hand out, per pickup window (earliest first): paid, ready,
    and pending ones to pay at pickup, with their lines; and how many are handed out."""
    principal.require(SCOPE)
    event = await owned(session, Event, event_id, principal.org_id, what="event")
    lane = await owned(
        session, Lane, lane_id, principal.org_id, what="lane of this event",
        where=(Lane.event_id == event.id,),
    )  # fmt: skip
    waiting = Order.status.in_(_HANDABLE) | (
        (Order.status == OrderStatus.PENDING)
        & (Order.payment_method == PaymentMethod.PAY_AT_PICKUP)
    )
    orders = list(
        await session.scalars(
            select(Order)
            .where(Order.org_id == principal.org_id, Order.lane_id == lane.id, waiting)
            .order_by(Order.id)
        )
    )
    counted = await session.execute(
        select(Order.slot_id, func.count())
        .where(
            Order.org_id == principal.org_id,
            Order.lane_id == lane.id,
            Order.status == OrderStatus.PICKED_UP,
        )
        .group_by(Order.slot_id)
    )
    picked: dict[int | None, int] = {slot_id: int(n) for slot_id, n in counted}
    lines: dict[int, list[PickupLine]] = {}
    if orders:
        rows = await session.execute(
            select(OrderLine.order_id, OrderLine.title, OrderLine.qty - OrderLine.refunded_qty)
            .where(OrderLine.order_id.in_([o.id for o in orders]))
            .order_by(OrderLine.id)
        )
        for order_id, title, qty in rows:
            if qty > 0:
                lines.setdefault(order_id, []).append(PickupLine(title=title, qty=int(qty)))
    slot_ids = {o.slot_id for o in orders} | set(picked)
    slots = {
        slot.id: slot
        for slot in await session.scalars(
            select(TimeSlot).where(TimeSlot.id.in_([s for s in slot_ids if s is not None]))
        )
    }
    windows = {
        window.slot_id: window
        for window in await session.scalars(
            select(PickupWindow).where(PickupWindow.lane_id == lane.id)
        )
    }
    by_slot: dict[int | None, list[QueueOrder]] = {slot_id: [] for slot_id in slot_ids}
    for order in orders:
        by_slot[order.slot_id].append(
            QueueOrder(
                order_id=order.id,
                short_code=format_code(order.short_code),
                status=order.status,
                payment_method=order.payment_method,
                total_minor=order.total_minor,
                currency=order.currency,
                paid_at=order.paid_at,
                lines=lines.get(order.id, []),
            )
        )

    def when(slot_id: int | None) -> tuple[int, datetime | None]:
        slot = slots.get(slot_id) if slot_id is not None else None
        return (0, slot.starts_at) if slot is not None else (1, None)

    out = []
    for slot_id in sorted(by_slot, key=lambda s: (when(s)[0], when(s)[1] or event.starts_at)):
        slot = slots.get(slot_id) if slot_id is not None else None
        window = windows.get(slot_id) if slot_id is not None else None
        out.append(
            QueueWindow(
                slot_id=slot_id,
                label=window_label(event, slot),
                starts_at=slot.starts_at if slot else None,
                ends_at=slot.ends_at if slot else None,
                capacity=window.capacity if window else None,
                taken=window.taken if window else None,
                picked_up=int(picked.get(slot_id, 0)),
                orders=by_slot[slot_id],
            )
        )
    return LaneQueue(
        event_id=event.id,
        lane_id=lane.id,
        lane_name=lane.name,
        pickup_point=lane.pickup_point,
        windows=out,
    )


async def set_aside(
    session: AsyncSession, principal: Principal, order_id: int, *, now: datetime
) -> None:
    """Staff packed a paid order and put it aside at its lane (paid → ready), so the lane
    view shows it ready to hand over. One conditional UPDATE; saying it twice is fine."""
    if not ({"orders:pickup", "orders:write"} & principal.scopes):
        principal.require("orders:pickup")
    moved = await session.execute(
        update(Order)
        .where(
            Order.id == order_id,
            Order.org_id == principal.org_id,
            Order.status.in_(ORDER_LIFECYCLE.sources(OrderStatus.READY)),
        )
        .values(status=OrderStatus.READY, ready_at=now)
        .returning(Order.id)
    )
    if moved.first() is not None:
        return
    order = await owned(session, Order, order_id, principal.org_id, what="order")
    if order.status != OrderStatus.READY:
        raise ORDER_LIFECYCLE.refusal(OrderStatus(order.status), None, action="set aside")
