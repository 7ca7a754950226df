"""RSVPs and the waiting list. Every function takes the caller's session and `now`.

Rules:
- A slot's `taken` counts confirmed places plus places held by open offers. Taking
  places is one conditional `UPDATE time_slots SET taken = taken + n WHERE id = :slot AND
  taken + n <= capacity RETURNING`, in the same transaction as the RSVP insert, so a slot
  is never oversold.
- Nothing is taken before the event's `opens_at` (`not_open_yet`), nor once it is not
  open (`event_closed`): `events.lifecycle.require_open`, also for waiting-list claims.
- One active RSVP per person (email or phone) and slot: a second is `already_rsvped`,
  naming the first. Partial unique indexes make it race-free (the insert is `ON CONFLICT
  DO NOTHING`); cancelled and lapsed RSVPs do not count.
- Full slot: the request is refused with `slot_full` (and the answer says the waiting
  list is open), or, when it asked to, it joins the waiting list (status `waitlisted`).
- Freed places (a cancel, an expired offer) go to the waiting list at once, in the same
  transaction: entries in order of arrival (created_at, then id); an entry whose party
  does not fit the free places is skipped and keeps its position for the next offer, and
  a later entry that fits gets the offer. Places no waiting entry fits stay free.
- An offer holds its places and carries a single-use voucher valid for the offer's TTL
  (default 2 h). Claiming redeems the voucher and confirms the RSVP; an offer that runs
  out is swept by `expire_offers` (lazily at the start of every RSVP/cancel/claim of the
  event, and by the periodic task): its voucher is revoked, its RSVP `lapsed`, and its
  places pass to the next waiting entry that fits.
- Plaintext voucher codes are never stored with the offer: the operation that makes an
  offer returns it (`OfferMade.code`) and, in the same transaction, puts the offer's
  messages in the notification outbox (`outbound.outbox`; email and/or SMS, whatever the
  RSVP gave), whose row holds the code only until the message is out.
- Lock order, everywhere: offer row -> RSVP row -> slot row -> waiting RSVP rows ->
  voucher rows and their audit chains -> the event's audit chain (always last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Update, bindparam, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.accounts.service import system_principal as system_principal_for
from popdrop.checkin import service as checkin
from popdrop.checkin.lifecycle import TicketStatus
from popdrop.checkin.models import Ticket
from popdrop.checkin.schemas import TicketCreate
from popdrop.core import audit, links
from popdrop.core.db import (
    CAPACITY_WRITE_ORDER,
    LateWriteLost,
    defer_write,
    dialect_insert,
    table_of,
)
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.identity import normalize_email, normalize_phone
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned
from popdrop.events.lifecycle import require_open
from popdrop.events.models import Event, TimeSlot
from popdrop.metrics import log as funnel
from popdrop.metrics.kinds import Kind
from popdrop.outbound import outbox
from popdrop.rsvp.lifecycle import (
    ACTIVE_RSVP_STATUSES,
    OFFER_LIFECYCLE,
    RSVP_LIFECYCLE,
    WAITING_RSVP_STATUSES,
    OfferStatus,
    RsvpStatus,
)
from popdrop.rsvp.models import Rsvp, WaitlistOffer
from popdrop.rsvp.notices import CHAT_SOURCE, OfferMade, offer_notices
from popdrop.rsvp.schemas import (
    OfferOut,
    RsvpCreate,
    RsvpOut,
    WaitlistEntryOut,
    WaitlistOut,
)
from popdrop.vouchers import codes
from popdrop.vouchers import service as vouchers
from popdrop.vouchers.models import Voucher
from popdrop.vouchers.schemas import BatchCreate

OFFER_TTL_SECONDS = 2 * 3600
PUBLIC_ACTOR = "public:rsvp"
# The organization a forged cancel token is counted under by the guessing guard: none.
NO_ORG = 0
SYSTEM_ACTOR = "system:waitlist"
SWEEP_LIMIT = 500


@dataclass
class RsvpResult:
    rsvp: Rsvp
    cancel_token: str
    offers: list[OfferMade] = field(default_factory=list)
    ticket_secret: str | None = None  # the QR ticket of a confirmed RSVP
    ticket_id: int | None = None


@dataclass
class CancelResult:
    rsvp: Rsvp
    offers: list[OfferMade] = field(default_factory=list)


def system_principal(org_id: int) -> Principal:
    """Who issues, revokes and redeems waiting-list vouchers on the organization's behalf."""
    return system_principal_for(
        org_id,
        SYSTEM_ACTOR,
        scopes=frozenset({"vouchers:write", "vouchers:redeem", "tickets:write"}),
    )


async def _ticket_for(
    session: AsyncSession, rsvp: Rsvp, *, now: datetime
) -> tuple[int, str] | tuple[None, None]:
    """A confirmed RSVP's QR ticket, id and secret (its check-in becomes the visit of this
    RSVP)."""
    if rsvp.status != RsvpStatus.CONFIRMED:
        return None, None
    ticket, secret, _created = await checkin.issue_ticket(
        session,
        system_principal(rsvp.org_id),
        TicketCreate(
            event_id=rsvp.event_id,
            subject_kind="rsvp",
            subject_id=rsvp.id,
            holder_ref=rsvp.email or rsvp.phone,
        ),
        now=now,
    )
    return ticket.id, secret


async def _cancel_ticket(session: AsyncSession, rsvp: Rsvp, *, now: datetime) -> None:
    ticket_id = await session.scalar(
        select(Ticket.id).where(
            Ticket.org_id == rsvp.org_id,
            Ticket.subject_kind == "rsvp",
            Ticket.subject_id == rsvp.id,
            Ticket.status == TicketStatus.VALID,
        )
    )
    if ticket_id is not None:
        await checkin.change_ticket(
            session,
            system_principal(rsvp.org_id),
            ticket_id,
            "cancel",
            now=now,
        )


# ---------------------------------------------------------------- helpers


def normalize_contact(email: str | None, phone: str | None) -> tuple[str | None, str | None]:
    """A valid email (normalized) and/or a valid phone number (E.164); at least one."""
    if not email and not phone:
        raise PopdropError("invalid_request", "contact: give an email or a phone number")
    clean_email = normalize_email(email) if email else None
    clean_phone = normalize_phone(phone) if phone else None
    return clean_email, clean_phone


def funnel_channel(source: str | None) -> str:
    """The funnel channel of an RSVP's source (its actor): a chat conversation, the public
    page, or an operator / API token."""
    if not source:
        return ""
    if source.startswith(CHAT_SOURCE):
        return "chat"
    if source == PUBLIC_ACTOR:
        return "web"
    return "api"


async def _record_confirmed(
    session: AsyncSession, signer: Signer, rsvp: Rsvp, now: datetime
) -> None:
    """The funnel's `rsvp` event, in the confirming transaction. The RSVP knows no contact
    row (audience is above this floor), so the person is keyed from its email (else phone)
    with the audience's hash: the same person as the contact with that point."""
    channel = funnel_channel(rsvp.source)
    await funnel.record(
        session,
        rsvp.org_id,
        Kind.RSVP,
        at=now,
        tags=funnel.Tags(
            channel=channel, event_id=rsvp.event_id, label="chat" if channel == "chat" else ""
        ),
        person=funnel.person_of_point(signer, rsvp.email, rsvp.phone),
        subject=f"rsvp:{rsvp.id}",
    )


def cancel_token(signer: Signer, rsvp: Rsvp) -> str:
    return links.rsvp_cancel_token(signer, rsvp.id, rsvp.org_id)


_slots = table_of(TimeSlot)
# Built once: the RSVP storm runs these on every request.
_TAKE_PLACES = (
    update(_slots)
    .where(
        _slots.c.id == bindparam("s_id"),
        _slots.c.taken + bindparam("n") <= _slots.c.capacity,
    )
    .values(taken=_slots.c.taken + bindparam("n"))
    .returning(_slots.c.taken)
)
_RELEASE_PLACES = (
    update(_slots)
    .where(_slots.c.id == bindparam("s_id"))
    .values(taken=_slots.c.taken - bindparam("n"))
)


def _move_rsvps(
    source: RsvpStatus, target: RsvpStatus, *where: ColumnElement[bool], **values: Any
) -> Update:
    """The one writer of RSVP statuses: the conditional UPDATE of the RSVPs still in
    `source` (and `where`) to `target`. The move must be in `RSVP_LIFECYCLE`; asking for
    another is a bug, refused (`invalid_transition`) before any row is touched."""
    RSVP_LIFECYCLE.check(source, target)
    return update(Rsvp).where(Rsvp.status == source, *where).values(status=target, **values)


def _move_offers(
    source: OfferStatus, target: OfferStatus, *where: ColumnElement[bool], **values: Any
) -> Update:
    """The one writer of waiting-list offer statuses, like `_move_rsvps`."""
    OFFER_LIFECYCLE.check(source, target)
    return (
        update(WaitlistOffer)
        .where(WaitlistOffer.status == source, *where)
        .values(status=target, **values)
    )


async def _take_places(session: AsyncSession, slot_id: int, places: int) -> bool:
    conn = await session.connection()
    return (await conn.execute(_TAKE_PLACES, {"s_id": slot_id, "n": places})).first() is not None


async def _take_places_late(
    session: AsyncSession, slot: TimeSlot, places: int, recorded: list[Rsvp]
) -> bool:
    """In a transaction that defers hot writes: when the places look free, take them just
    before the commit (`LateWriteLost` if they went meanwhile) for the RSVP the caller
    then appends to `recorded`; none appended (it was refused, its SAVEPOINT rolled
    back): nothing is taken. False: take them now."""
    if slot.capacity - slot.taken < places:
        return False  # full as far as we can see: the ordinary path decides, locked

    async def take() -> None:
        if not recorded:
            return
        if not await _take_places(session, slot.id, places):
            raise LateWriteLost(f"slot {slot.id} filled up before the commit")

    return defer_write(session, (CAPACITY_WRITE_ORDER, slot.id), take)


async def _release_places(session: AsyncSession, slot_id: int, places: int) -> None:
    conn = await session.connection()
    await conn.execute(_RELEASE_PLACES, {"s_id": slot_id, "n": places})


async def _free_places(session: AsyncSession, slot_id: int) -> int:
    row = (
        await session.execute(
            select(_slots.c.capacity - _slots.c.taken).where(_slots.c.id == slot_id)
        )
    ).first()
    return max(int(row[0]), 0) if row else 0


async def _audit(
    session: AsyncSession,
    *,
    org_id: int,
    event_id: int,
    actor: str,
    action: str,
    payload: dict[str, Any],
    now: datetime,
) -> None:
    # One subject per event: its RSVP history stays in order on one chain.
    await audit.append(
        session,
        org_id=org_id,
        actor=actor,
        action=action,
        subject=f"event:{event_id}",
        payload=payload,
        at=now,
    )


async def _load_rsvp(session: AsyncSession, rsvp_id: int, org_id: int) -> Rsvp:
    return await owned(session, Rsvp, rsvp_id, org_id, what="RSVP", fresh=True)


async def event_org(session: AsyncSession, event_id: int) -> int:
    """The organization of a public event (for rate limits before any work)."""
    org_id = await session.scalar(select(Event.org_id).where(Event.id == event_id))
    if org_id is None:
        raise not_found("event")
    return int(org_id)


def _require_open(event: Event, slot: TimeSlot | None, now: datetime) -> None:
    require_open(event, now, takes="RSVPs")
    if slot is not None and slot.ends_at <= now:
        raise PopdropError("event_closed", "this time slot is over")


async def _refuse_second_rsvp(
    session: AsyncSession, slot_id: int, email: str | None, phone: str | None
) -> None:
    """`already_rsvped` (naming the RSVP) when this person has an active RSVP for the slot."""
    same_person = [Rsvp.email == email] if email else []
    same_person += [Rsvp.phone == phone] if phone else []
    row = (
        await session.execute(
            select(Rsvp.id, Rsvp.status)
            .where(
                Rsvp.slot_id == slot_id,
                Rsvp.status.in_(ACTIVE_RSVP_STATUSES),
                or_(*same_person),
            )
            .order_by(Rsvp.id)
            .limit(1)
        )
    ).first()
    if row is not None:
        raise PopdropError(
            "already_rsvped",
            f"you already have an RSVP for this time slot ({row.status}); "
            "cancel it first to change it",
            detail={"rsvp_id": row.id, "status": row.status},
        )


# ---------------------------------------------------------------- RSVP


async def create_rsvp(
    session: AsyncSession,
    signer: Signer,
    *,
    event_id: int,
    spec: RsvpCreate,
    now: datetime,
    actor: str = PUBLIC_ACTOR,
) -> RsvpResult:
    """RSVP to a slot: confirmed if its places fit, else `slot_full` or the waiting list."""
    if not spec.consent:
        raise PopdropError("invalid_request", "consent: the consent box must be ticked")
    email, phone = normalize_contact(spec.email, spec.phone)
    row = (
        await session.execute(
            select(Event, TimeSlot)
            .join(TimeSlot, (TimeSlot.event_id == Event.id) & (TimeSlot.org_id == Event.org_id))
            .where(Event.id == event_id, TimeSlot.id == spec.slot_id)
        )
    ).first()
    if row is None:
        raise not_found("time slot of this event")
    event, slot = row
    _require_open(event, slot, now)
    if spec.places > slot.capacity:
        raise PopdropError(
            "invalid_request", f"places: this slot has {slot.capacity} places in all"
        )
    offers = await expire_offers(session, signer, now=now, event_id=event.id)
    recorded: list[Rsvp] = []
    if await _take_places_late(session, slot, spec.places, recorded) or await _take_places(
        session, slot.id, spec.places
    ):
        status = RsvpStatus.CONFIRMED
    elif spec.waitlist:
        status = RsvpStatus.WAITLISTED
    else:
        await _refuse_second_rsvp(session, slot.id, email, phone)
        raise PopdropError(
            "slot_full",
            "this slot is full; you can join its waiting list (send waitlist: true)",
            detail={"waitlist": True, "free_places": await _free_places(session, slot.id)},
        )
    # One statement, race-free: the partial unique indexes of active RSVPs per person and
    # slot turn a second RSVP into no row (a refusal rolls back the places taken above).
    rsvp = await session.scalar(
        dialect_insert(session.get_bind().dialect.name, Rsvp)
        .values(
            org_id=event.org_id,
            event_id=event.id,
            slot_id=slot.id,
            email=email,
            phone=phone,
            places=spec.places,
            consent_text=spec.consent_text,
            status=status,
            created_at=now,
            confirmed_at=now if status == RsvpStatus.CONFIRMED else None,
            source=actor[:80],
        )
        .on_conflict_do_nothing()
        .returning(Rsvp)
    )
    if rsvp is None:
        await _refuse_second_rsvp(session, slot.id, email, phone)
        raise PopdropError("conflict", "this RSVP could not be recorded; try again")
    recorded.append(rsvp)
    await _audit(
        session,
        org_id=event.org_id,
        event_id=event.id,
        actor=actor,
        action="rsvp.create" if status == RsvpStatus.CONFIRMED else "waitlist.join",
        payload={"rsvp": rsvp.id, "slot": slot.id, "places": spec.places, "status": status},
        now=now,
    )
    if status == RsvpStatus.CONFIRMED:
        # Before the commit's late write of the slot: the hot row's lock is not held longer.
        await _record_confirmed(session, signer, rsvp, now)
    ticket_id, secret = await _ticket_for(session, rsvp, now=now)
    return RsvpResult(rsvp, cancel_token(signer, rsvp), offers, secret, ticket_id)


async def cancel_rsvp(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    *,
    rsvp_id: int,
    reason: str,
    now: datetime,
) -> CancelResult:
    """Operator cancel: frees the places (or leaves the waiting list)."""
    principal.require("rsvps:write")
    rsvp = await _load_rsvp(session, rsvp_id, principal.org_id)
    return await _cancel(
        session,
        signer,
        rsvp,
        actor=principal.actor,
        reason=reason,
        now=now,
    )


async def cancel_by_token(
    session: AsyncSession, signer: Signer, *, token: str, now: datetime
) -> CancelResult:
    """Guest cancel with the signed token handed out at RSVP time."""
    rsvp_id, org_id = links.read_rsvp_cancel(signer, token)
    rsvp = await _load_rsvp(session, rsvp_id, org_id)
    return await _cancel(
        session,
        signer,
        rsvp,
        actor=PUBLIC_ACTOR,
        reason="cancelled by the guest",
        now=now,
    )


async def _cancel(
    session: AsyncSession,
    signer: Signer,
    rsvp: Rsvp,
    *,
    actor: str,
    reason: str,
    now: datetime,
) -> CancelResult:
    offers = await expire_offers(session, signer, now=now, event_id=rsvp.event_id)
    rsvp = await _load_rsvp(session, rsvp.id, rsvp.org_id)  # the sweep may have lapsed it
    old = RsvpStatus(rsvp.status)
    if old in RSVP_LIFECYCLE.terminal:
        raise PopdropError("already_cancelled", f"this RSVP is already {old}")
    offer: WaitlistOffer | None = None
    if old == RsvpStatus.OFFERED:
        offer = (
            await session.execute(
                _move_offers(
                    OfferStatus.OPEN,
                    OfferStatus.CANCELLED,
                    WaitlistOffer.rsvp_id == rsvp.id,
                    closed_at=now,
                ).returning(WaitlistOffer)
            )
        ).scalar_one_or_none()
    done = (
        await session.execute(
            _move_rsvps(
                old,
                RsvpStatus.CANCELLED,
                Rsvp.id == rsvp.id,
                cancelled_at=now,
                cancel_reason=reason,
            ).returning(Rsvp.id)
        )
    ).first()
    if done is None:
        raise PopdropError("conflict", "this RSVP changed meanwhile; try again")
    if old == RsvpStatus.CONFIRMED:
        await _cancel_ticket(session, rsvp, now=now)
    freed = rsvp.places if old == RsvpStatus.CONFIRMED else (offer.places if offer else 0)
    if freed:
        await _release_places(session, rsvp.slot_id, freed)
    if offer is not None:
        await vouchers.revoke_voucher(
            session,
            system_principal(rsvp.org_id),
            voucher_id=offer.voucher_id,
            reason="waiting-list RSVP cancelled",
            now=now,
        )
    if freed:
        offers += await _offer_free_places(
            session,
            signer,
            org_id=rsvp.org_id,
            event_id=rsvp.event_id,
            slot_id=rsvp.slot_id,
            now=now,
        )
    await _audit(
        session,
        org_id=rsvp.org_id,
        event_id=rsvp.event_id,
        actor=actor,
        action="rsvp.cancel",
        payload={"rsvp": rsvp.id, "was": old, "freed": freed, "reason": reason},
        now=now,
    )
    await _audit_offers(session, offers, now=now)
    return CancelResult(await _load_rsvp(session, rsvp.id, rsvp.org_id), offers)


# ---------------------------------------------------------------- waiting list


async def _offer_free_places(
    session: AsyncSession,
    signer: Signer,
    *,
    org_id: int,
    event_id: int,
    slot_id: int,
    now: datetime,
    ttl_seconds: int = OFFER_TTL_SECONDS,
) -> list[OfferMade]:
    """Offer a slot's free places to its waiting list (skip entries that do not fit)."""
    made: list[OfferMade] = []
    free = await _free_places(session, slot_id)
    while free > 0:
        waiting = (
            await session.execute(
                select(Rsvp.id, Rsvp.places, Rsvp.email, Rsvp.phone, Rsvp.source)
                .where(
                    Rsvp.slot_id == slot_id,
                    Rsvp.status == RsvpStatus.WAITLISTED,
                    Rsvp.places <= free,
                )
                .order_by(Rsvp.created_at, Rsvp.id)
                .limit(1)
            )
        ).first()
        if waiting is None:
            break
        rsvp_id, places, email, phone, source = waiting
        # Slot row before the waiting RSVP row (the lock order).
        if not await _take_places(session, slot_id, places):
            break
        marked = (
            await session.execute(
                _move_rsvps(
                    RsvpStatus.WAITLISTED, RsvpStatus.OFFERED, Rsvp.id == rsvp_id
                ).returning(Rsvp.id)
            )
        ).first()
        if marked is None:  # left the list meanwhile: give the places back, look again
            await _release_places(session, slot_id, places)
            free = await _free_places(session, slot_id)
            continue
        batch, [code] = await vouchers.issue_batch(
            session,
            signer,
            system_principal(org_id),
            BatchCreate(
                name=f"Waiting-list offer for RSVP {rsvp_id}",
                quantity=1,
                max_uses=1,
                ttl_seconds=ttl_seconds,
                tag=f"waitlist:{event_id}",
                event_ref=str(event_id),
                offer_ref=f"rsvp:{rsvp_id}",
                discount_kind="free_item",
                discount_description=f"{places} place(s) from the waiting list",
            ),
            now=now,
        )
        voucher_id = await session.scalar(select(Voucher.id).where(Voucher.batch_id == batch.id))
        assert voucher_id is not None
        expires_at = now + timedelta(seconds=ttl_seconds)
        offer = WaitlistOffer(
            org_id=org_id,
            event_id=event_id,
            slot_id=slot_id,
            rsvp_id=rsvp_id,
            voucher_id=voucher_id,
            places=places,
            status=OfferStatus.OPEN,
            offered_at=now,
            expires_at=expires_at,
        )
        session.add(offer)
        await session.flush()
        made.append(
            OfferMade(
                offer.id,
                rsvp_id,
                org_id,
                event_id,
                slot_id,
                places,
                code,
                expires_at,
                email,
                phone,
                source,
            )
        )
        free -= places
    await outbox.enqueue(session, [n for offer in made for n in offer_notices(offer)], now=now)
    return made


async def _audit_offers(session: AsyncSession, offers: list[OfferMade], *, now: datetime) -> None:
    for made in offers:
        await _audit(
            session,
            org_id=made.org_id,
            event_id=made.event_id,
            actor=SYSTEM_ACTOR,
            action="waitlist.offer",
            payload={
                "offer": made.offer_id,
                "rsvp": made.rsvp_id,
                "slot": made.slot_id,
                "places": made.places,
                "expires_at": made.expires_at.isoformat(),
            },
            now=now,
        )


async def expire_offers(
    session: AsyncSession,
    signer: Signer,
    *,
    now: datetime,
    event_id: int | None = None,
    limit: int = SWEEP_LIMIT,
) -> list[OfferMade]:
    """Sweep offers past their expiry (of one event, or all): revoke their vouchers, lapse
    their RSVPs and pass their places on. With an event, also offer any free places a
    waiting entry fits (e.g. after capacity grew). Returns the offers made."""
    due = select(WaitlistOffer.id).where(
        WaitlistOffer.status == OfferStatus.OPEN, WaitlistOffer.expires_at <= now
    )
    if event_id is not None:
        due = due.where(WaitlistOffer.event_id == event_id)
    offer_ids = list(await session.scalars(due.order_by(WaitlistOffer.expires_at).limit(limit)))
    slots: dict[int, tuple[int, int]] = {}  # slot -> (org, event)
    expired: list[WaitlistOffer] = []
    for offer_id in offer_ids:
        offer = (
            await session.execute(
                _move_offers(
                    OfferStatus.OPEN,
                    OfferStatus.EXPIRED,
                    WaitlistOffer.id == offer_id,
                    WaitlistOffer.expires_at <= now,
                    closed_at=now,
                ).returning(WaitlistOffer)
            )
        ).scalar_one_or_none()
        if offer is None:  # claimed or swept meanwhile
            continue
        await session.execute(
            _move_rsvps(RsvpStatus.OFFERED, RsvpStatus.LAPSED, Rsvp.id == offer.rsvp_id)
        )
        await _release_places(session, offer.slot_id, offer.places)
        await vouchers.revoke_voucher(
            session,
            system_principal(offer.org_id),
            voucher_id=offer.voucher_id,
            reason="waiting-list offer expired",
            now=now,
        )
        slots[offer.slot_id] = (offer.org_id, offer.event_id)
        expired.append(offer)
    if event_id is not None:
        fitting = exists(
            select(Rsvp.id).where(
                Rsvp.slot_id == TimeSlot.id,
                Rsvp.status == RsvpStatus.WAITLISTED,
                Rsvp.places <= TimeSlot.capacity - TimeSlot.taken,
            )
        )
        rows = await session.execute(
            select(TimeSlot.id, TimeSlot.org_id).where(TimeSlot.event_id == event_id, fitting)
        )
        for slot_id, org_id in rows:
            slots.setdefault(slot_id, (org_id, event_id))
    made: list[OfferMade] = []
    for slot_id, (org_id, slot_event) in sorted(slots.items()):
        made += await _offer_free_places(
            session,
            signer,
            org_id=org_id,
            event_id=slot_event,
            slot_id=slot_id,
            now=now,
        )
    for offer in expired:
        await _audit(
            session,
            org_id=offer.org_id,
            event_id=offer.event_id,
            actor=SYSTEM_ACTOR,
            action="waitlist.offer_expired",
            payload={"offer": offer.id, "rsvp": offer.rsvp_id, "places": offer.places},
            now=now,
        )
    await _audit_offers(session, made, now=now)
    return made


_CLOSED_OFFER = {
    OfferStatus.CLAIMED: ("exhausted", "this offer was already claimed"),
    OfferStatus.EXPIRED: ("expired", "this offer has expired"),
    OfferStatus.CANCELLED: ("revoked", "this offer was withdrawn"),
    OfferStatus.OPEN: ("expired", "this offer has expired"),
}


async def claim_offer(
    session: AsyncSession,
    signer: Signer,
    *,
    event_id: int,
    code: str,
    now: datetime,
) -> RsvpResult:
    """Claim a waiting-list offer with its voucher code: the held places become a
    confirmed RSVP, and the voucher is redeemed in the same transaction."""
    event = await session.scalar(select(Event).where(Event.id == event_id))
    if event is None:
        raise not_found("event")
    code_hash = signer.keyed_hash(codes.normalize(code))
    offers = await expire_offers(session, signer, now=now, event_id=event.id)
    offer = await session.scalar(
        select(WaitlistOffer)
        .join(Voucher, Voucher.id == WaitlistOffer.voucher_id)
        .where(
            Voucher.code_hash == code_hash,
            Voucher.org_id == event.org_id,
            WaitlistOffer.event_id == event.id,
        )
        .execution_options(populate_existing=True)
    )
    if offer is None:
        raise PopdropError("unknown", "no waiting-list offer of this event has this code")
    _require_open(event, None, now)
    claimed = (
        await session.execute(
            _move_offers(
                OfferStatus.OPEN,
                OfferStatus.CLAIMED,
                WaitlistOffer.id == offer.id,
                WaitlistOffer.expires_at > now,
                closed_at=now,
            ).returning(WaitlistOffer.id)
        )
    ).first()
    if claimed is None:
        reason, message = _CLOSED_OFFER.get(
            OfferStatus(offer.status), ("expired", "this offer has expired")
        )
        raise PopdropError(reason, message)
    await vouchers.redeem(
        session,
        signer,
        system_principal(event.org_id),
        code=code,
        contact_ref=f"rsvp:{offer.rsvp_id}",
        order_ref=f"waitlist-offer:{offer.id}",
        now=now,
    )
    confirmed = (
        await session.execute(
            _move_rsvps(
                RsvpStatus.OFFERED,
                RsvpStatus.CONFIRMED,
                Rsvp.id == offer.rsvp_id,
                confirmed_at=now,
            ).returning(Rsvp.id)
        )
    ).first()
    if confirmed is None:
        raise PopdropError("conflict", "this RSVP changed meanwhile; try again")
    await _audit(
        session,
        org_id=event.org_id,
        event_id=event.id,
        actor=PUBLIC_ACTOR,
        action="waitlist.claim",
        payload={"offer": offer.id, "rsvp": offer.rsvp_id, "places": offer.places},
        now=now,
    )
    rsvp = await _load_rsvp(session, offer.rsvp_id, event.org_id)
    await _record_confirmed(session, signer, rsvp, now)
    ticket_id, secret = await _ticket_for(session, rsvp, now=now)
    return RsvpResult(rsvp, cancel_token(signer, rsvp), offers, secret, ticket_id)


# ---------------------------------------------------------------- read


async def _event_of(session: AsyncSession, principal: Principal, event_id: int) -> Event:
    return await owned(session, Event, event_id, principal.org_id)


async def get_rsvp(session: AsyncSession, principal: Principal, rsvp_id: int) -> Rsvp:
    principal.require("rsvps:read")
    return await _load_rsvp(session, rsvp_id, principal.org_id)


async def list_rsvps(
    session: AsyncSession,
    principal: Principal,
    event_id: int,
    *,
    status: str | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[Rsvp]:
    principal.require("rsvps:read")
    await _event_of(session, principal, event_id)
    query = select(Rsvp).where(Rsvp.event_id == event_id, Rsvp.org_id == principal.org_id)
    if status is not None:
        query = query.where(Rsvp.status == status)
    if before_id is not None:
        query = query.where(Rsvp.id < before_id)
    return list(await session.scalars(query.order_by(Rsvp.id.desc()).limit(limit)))


async def waitlist(
    session: AsyncSession, principal: Principal, event_id: int, *, limit: int = 500
) -> WaitlistOut:
    """Waiting and offered entries in order, with each offer's state (never its code)."""
    principal.require("rsvps:read")
    await _event_of(session, principal, event_id)
    rows = list(
        await session.scalars(
            select(Rsvp)
            .where(
                Rsvp.event_id == event_id,
                Rsvp.org_id == principal.org_id,
                Rsvp.status.in_(WAITING_RSVP_STATUSES),
            )
            .order_by(Rsvp.slot_id, Rsvp.created_at, Rsvp.id)
            .limit(limit)
        )
    )
    offers = {
        o.rsvp_id: o
        for o in await session.scalars(
            select(WaitlistOffer).where(
                WaitlistOffer.event_id == event_id,
                WaitlistOffer.org_id == principal.org_id,
                WaitlistOffer.status == OfferStatus.OPEN,
            )
        )
    }
    positions: dict[int, int] = {}
    entries: list[WaitlistEntryOut] = []
    for rsvp in rows:
        position = None
        if rsvp.status == RsvpStatus.WAITLISTED:
            position = positions[rsvp.slot_id] = positions.get(rsvp.slot_id, 0) + 1
        offer = offers.get(rsvp.id)
        entries.append(
            WaitlistEntryOut(
                rsvp_id=rsvp.id,
                slot_id=rsvp.slot_id,
                places=rsvp.places,
                status=rsvp_status(rsvp),
                created_at=rsvp.created_at,
                position=position,
                offer=offer_out(offer) if offer else None,
            )
        )
    return WaitlistOut(event_id=event_id, entries=entries)


def rsvp_status(rsvp: Rsvp) -> Any:
    return rsvp.status


def offer_out(offer: WaitlistOffer) -> OfferOut:
    return OfferOut(
        id=offer.id,
        places=offer.places,
        status=offer.status,
        offered_at=offer.offered_at,
        expires_at=offer.expires_at,
        closed_at=offer.closed_at,
    )


def rsvp_out(rsvp: Rsvp) -> RsvpOut:
    return RsvpOut(
        id=rsvp.id,
        event_id=rsvp.event_id,
        slot_id=rsvp.slot_id,
        status=rsvp_status(rsvp),
        places=rsvp.places,
        email=rsvp.email,
        phone=rsvp.phone,
        consent_text=rsvp.consent_text,
        created_at=rsvp.created_at,
        confirmed_at=rsvp.confirmed_at,
        cancelled_at=rsvp.cancelled_at,
        cancel_reason=rsvp.cancel_reason,
    )
