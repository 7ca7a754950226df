"""An event's guest list: every RSVP (with its waiting-list place and offer), every hold,
every ticket and its check-in, one row each, for the operator page and its CSV.

It sits in usecases because it reads four domains (rsvp, checkin, inventory, events).
Rules:
- Only the caller's organization, and only with `rsvps:read` (it shows contact points).
- One row per RSVP, per hold, and per ticket that is neither an RSVP's nor a hold's (a
  manual ticket); an RSVP's or a hold's ticket is shown on its row.
- A hold past its `expires_at` shows as expired even before the next hold marks it.
- Waiting positions count waitlisted RSVPs per slot, first come first served (as the
  waiting list does); an offered RSVP shows its open offer's deadline.
- Search (`q`) matches, ignoring case, the email, phone, hold contact, ticket holder,
  ticket short code, product and slot; `kind` keeps one kind of row. A list holds at most
  `MAX_ROWS` rows of each kind (newest first), and says when it was cut.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.checkin.models import Ticket
from popdrop.checkin.tickets import format_short_code
from popdrop.core.localtime import local
from popdrop.core.tenancy import owned
from popdrop.events.models import Event, Lane, TimeSlot
from popdrop.inventory.lifecycle import HoldStatus
from popdrop.inventory.models import Hold, Product, Variant
from popdrop.rsvp import service as rsvp_service
from popdrop.rsvp.models import Rsvp

SCOPE = "rsvps:read"
MAX_ROWS = 5000
KINDS = ("rsvp", "hold", "ticket")
CSV_HEADER = (
    "kind", "id", "status", "contact", "email", "phone", "places", "slot", "item", "lane",
    "waiting_position", "offer_expires", "ticket_status", "ticket_code", "checked_in_at",
    "gate", "created_at",
)  # fmt: skip


@dataclass
class GuestRow:
    kind: str  # rsvp, hold, ticket
    id: int
    status: str
    contact: str
    email: str = ""
    phone: str = ""
    places: int = 0
    slot: str = ""
    item: str = ""  # product · variant of a hold
    lane: str = ""
    position: int | None = None  # on the waiting list
    offer_expires: datetime | None = None
    ticket: Ticket | None = None
    created_at: datetime | None = None

    @property
    def checked_in(self) -> bool:
        return self.ticket is not None and self.ticket.checked_in_at is not None

    @property
    def ticket_code(self) -> str:
        """The ticket's short code as it is printed under the QR (`K7QM-4XT2-9`)."""
        code = self.ticket.short_code if self.ticket is not None else None
        return format_short_code(code) if code else ""

    def words(self) -> str:
        ticket = self.ticket
        parts = [self.contact, self.email, self.phone, self.slot, self.item, self.lane]
        if ticket is not None:
            # Both forms: typed from the page (with dashes) or from memory (without).
            parts += [ticket.holder_ref or "", ticket.short_code or "", self.ticket_code]
        return " ".join(parts).casefold()


@dataclass
class GuestList:
    event: Event
    rows: list[GuestRow]
    counts: dict[str, int] = field(default_factory=dict)  # before search and kind
    cut: bool = False  # some kind had more than MAX_ROWS rows


def _slot_names(slots: Iterable[TimeSlot], timezone: str) -> dict[int, str]:
    return {s.id: s.label or local(s.starts_at, timezone, "%a %d %b, %H:%M") for s in slots}


async def _rsvp_rows(
    session: AsyncSession, principal: Principal, event_id: int, slots: dict[int, str],
    tickets: dict[tuple[str, int], Ticket],
) -> tuple[list[GuestRow], bool]:  # fmt: skip
    rsvps = list(
        await session.scalars(
            select(Rsvp)
            .where(Rsvp.org_id == principal.org_id, Rsvp.event_id == event_id)
            .order_by(Rsvp.created_at, Rsvp.id)
            .limit(MAX_ROWS + 1)
        )
    )
    # Waiting places and open offers as the waiting list itself counts them.
    waiting = await rsvp_service.waitlist(session, principal, event_id, limit=MAX_ROWS)
    entries = {entry.rsvp_id: entry for entry in waiting.entries}
    rows: list[GuestRow] = []
    for r in rsvps[:MAX_ROWS]:
        entry = entries.get(r.id)
        offer = entry.offer if entry else None
        rows.append(
            GuestRow(
                kind="rsvp",
                id=r.id,
                status=r.status,
                contact=r.email or r.phone or "",
                email=r.email or "",
                phone=r.phone or "",
                places=r.places,
                slot=slots.get(r.slot_id, ""),
                position=entry.position if entry else None,
                offer_expires=offer.expires_at if offer else None,
                ticket=tickets.pop(("rsvp", r.id), None),
                created_at=r.created_at,
            )
        )
    return rows, len(rsvps) > MAX_ROWS


async def _hold_rows(
    session: AsyncSession, org_id: int, event_id: int, slots: dict[int, str],
    tickets: dict[tuple[str, int], Ticket], now: datetime,
) -> tuple[list[GuestRow], bool]:  # fmt: skip
    found = list(
        (
            await session.execute(
                select(Hold, Product.title, Variant.name, Lane.name)
                .join(Variant, Variant.id == Hold.variant_id)
                .join(Product, Product.id == Variant.product_id)
                .join(Lane, Lane.id == Hold.lane_id)
                .where(Hold.org_id == org_id, Hold.event_id == event_id)
                .order_by(Hold.created_at, Hold.id)
                .limit(MAX_ROWS + 1)
            )
        ).tuples()
    )
    rows: list[GuestRow] = []
    for hold, title, variant, lane in found[:MAX_ROWS]:
        status = hold.status
        if status == HoldStatus.ACTIVE and hold.expires_at <= now:
            status = HoldStatus.EXPIRED
        rows.append(
            GuestRow(
                kind="hold",
                id=hold.id,
                status=status,
                contact=hold.contact_ref or "",
                places=hold.qty,
                slot=slots.get(hold.slot_id or 0, ""),
                item=f"{title} · {variant}",
                lane=lane,
                ticket=tickets.pop(("hold", hold.id), None),
                created_at=hold.created_at,
            )
        )
    return rows, len(found) > MAX_ROWS


async def guest_list(
    session: AsyncSession,
    principal: Principal,
    event_id: int,
    *,
    now: datetime,
    q: str = "",
    kind: str = "",
) -> GuestList:
    principal.require(SCOPE)
    event = await owned(session, Event, event_id, principal.org_id)
    org_id = principal.org_id
    slots = _slot_names(
        await session.scalars(select(TimeSlot).where(TimeSlot.event_id == event.id)),
        event.timezone,
    )
    ticket_rows = list(
        await session.scalars(
            select(Ticket)
            .where(Ticket.org_id == org_id, Ticket.event_id == event.id)
            .order_by(Ticket.id)
            .limit(3 * MAX_ROWS + 1)
        )
    )
    # The newest ticket of a subject wins (a cancelled one is replaced by a valid one).
    tickets = {(t.subject_kind, t.subject_id): t for t in ticket_rows}
    rsvp_rows, rsvps_cut = await _rsvp_rows(session, principal, event.id, slots, tickets)
    hold_rows, holds_cut = await _hold_rows(session, org_id, event.id, slots, tickets, now)
    others = [
        GuestRow(
            kind="ticket",
            id=t.id,
            status=t.status,
            contact=t.holder_ref or "",
            ticket=t,
            created_at=t.created_at,
        )
        for t in tickets.values()
        if t.subject_kind not in ("rsvp", "hold")
    ]
    rows = rsvp_rows + hold_rows + others[:MAX_ROWS]
    counts = {k: sum(1 for r in rows if r.kind == k) for k in KINDS}
    counts["checked_in"] = sum(1 for r in rows if r.checked_in)
    needle = q.strip().casefold()
    shown = [
        r for r in rows if (not kind or r.kind == kind) and (not needle or needle in r.words())
    ]
    cut = rsvps_cut or holds_cut or len(others) > MAX_ROWS or len(ticket_rows) > 3 * MAX_ROWS
    return GuestList(event=event, rows=shown, counts=counts, cut=cut)


def csv_row(row: GuestRow, timezone: str) -> list[Any]:
    """A row of the CSV (times in the event's zone; cells are neutralised by the writer)."""
    ticket = row.ticket

    def when(value: datetime | None) -> str:
        return local(value, timezone, "%Y-%m-%d %H:%M") if value else ""

    return [
        row.kind, row.id, row.status, row.contact, row.email, row.phone, row.places,
        row.slot, row.item, row.lane, row.position or "", when(row.offer_expires),
        ticket.status if ticket else "", row.ticket_code,
        when(ticket.checked_in_at) if ticket else "",
        (ticket.checked_in_gate or "") if ticket else "", when(row.created_at),
    ]  # fmt: skip
