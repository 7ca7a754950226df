"""A turn's action effects, applied through the domain services (RSVP, hold, voucher,
ticket, consent, activity), each inside a SAVEPOINT.

A refusal (sold out, slot full…) rolls back only that effect and returns to the engine as
a failed `EffectResult`, which takes the node's failure branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.attribution import service as attribution
from popdrop.attribution.models import Channel, TargetKind
from popdrop.attribution.schemas import LinkTags, LinkTarget
from popdrop.audience import consent as audience_consent
from popdrop.audience import contacts
from popdrop.audience.models import Contact
from popdrop.audience.schemas import (
    ActivityIn,
    ConsentChange,
    ContactIn,
    clean_labels,
)
from popdrop.chat import engine
from popdrop.chat.conversations import (
    ChatDeps,
    ConversationRow,
    chat_principal,
    consent_channel,
    find_contact_id,
)
from popdrop.chat.engine import (
    EffectResult,
)
from popdrop.chat.flow import DiscountSpec
from popdrop.chat.messages import (
    format_time,
)
from popdrop.chat.models import (
    Conversation,
)
from popdrop.checkin import service as checkin
from popdrop.checkin.schemas import TicketCreate
from popdrop.core import links
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.tenancy import owned
from popdrop.events.models import Event
from popdrop.inventory import service as inventory
from popdrop.inventory.models import Hold, Product, Stock, Variant
from popdrop.inventory.schemas import HoldCreate
from popdrop.rsvp import service as rsvp_service
from popdrop.rsvp.models import Rsvp
from popdrop.rsvp.notices import CHAT_SOURCE
from popdrop.rsvp.schemas import RsvpCreate
from popdrop.vouchers import service as vouchers
from popdrop.vouchers.models import VoucherBatch
from popdrop.vouchers.schemas import BatchCreate

# Engine activity kinds that are engagement for the audience domain's recency.
_AUDIENCE_ACTIVITY = {"chat_started": "chat"}
# Channels whose customer links are sent short: an SMS pays per segment, and a signed
# link alone fills most of one. Web chat and Telegram keep the full links.
_SHORT_LINK_CHANNELS = frozenset({"sms"})


# ---------------------------------------------------------------- effects


@dataclass
class AppliedEffects:
    """What applying a turn's effects left behind for persistence."""

    events: list[dict[str, Any]] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)


def event_row(
    conv: ConversationRow | Conversation,
    kind: str,
    at: datetime,
    node: str | None = None,
    ref: str | None = None,
    value: int | None = None,
) -> dict[str, Any]:
    return {
        "org_id": conv.org_id,
        "conversation_id": conv.id,
        "session_no": conv.session_no,
        "channel": conv.channel,
        "event_id": conv.event_id,
        "flow_key": conv.flow_key,
        "flow_version": conv.flow_version,
        "kind": kind[:24],
        "node": node,
        "ref": ref[:200] if ref else None,
        "value": value,
        "at": at,
    }


def _contact_ref(conv: ConversationRow) -> str:
    return f"contact:{conv.contact_id}" if conv.contact_id else f"chat:{conv.id}"


def _failure(error: PopdropError) -> EffectResult:
    return EffectResult(ok=False, reason=error.reason, message=error.message)


async def _in_savepoint(session: AsyncSession, work: Any) -> EffectResult:
    """Run one effect; a refusal rolls back only what it wrote and becomes a failed result."""
    try:
        async with session.begin_nested():
            await session.connection()  # emit the SAVEPOINT before any Core statement
            result: EffectResult = await work()
            return result
    except PopdropError as error:
        return _failure(error)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        return EffectResult(ok=False, reason="invalid_request", message=f"{where}: {first['msg']}")


class Effects:
    def __init__(
        self, session: AsyncSession, deps: ChatDeps, conv: ConversationRow, now: datetime
    ) -> None:
        self.session = session
        self.deps = deps
        self.conv = conv
        self.now = now
        self.principal = chat_principal(conv.org_id)
        self.applied = AppliedEffects()
        self.event_tz: str | None = None
        self.state_vars: dict[str, Any] = {}
        # Tickets this turn's RSVPs issued, (subject kind, id) → (ticket id, secret): the
        # send-ticket step that usually follows needs no second look-up.
        self.issued_tickets: dict[tuple[str, int], tuple[int, str]] = {}

    def event(
        self,
        kind: str,
        *,
        node: str | None = None,
        ref: str | None = None,
        value: int | None = None,
    ) -> None:
        self.applied.events.append(event_row(self.conv, kind, self.now, node, ref, value))

    async def apply(self, effect: engine.Effect, node: str) -> EffectResult | None:
        """Apply one effect; an awaited (action) effect returns its result."""
        if isinstance(effect, engine.RsvpEffect):
            result = await _in_savepoint(self.session, lambda: self.rsvp(effect))
        elif isinstance(effect, engine.HoldEffect):
            result = await _in_savepoint(self.session, lambda: self.hold(effect))
        elif isinstance(effect, engine.IssueVoucherEffect):
            result = await _in_savepoint(self.session, lambda: self.voucher(effect))
        elif isinstance(effect, engine.SendTicketEffect):
            issued = self.issued_tickets.get((effect.subject_kind, effect.subject_id))
            if issued is not None:
                result = await self._ticket_result(*issued)
            else:
                result = await _in_savepoint(self.session, lambda: self.ticket(effect))
        elif isinstance(effect, engine.CheckoutLinkEffect):
            result = await _in_savepoint(self.session, lambda: self.checkout(effect))
        else:
            await self.side_effect(effect, node)
            return None
        self.applied.secrets.update(v for v in result.secrets.values() if v)
        return result

    async def side_effect(self, effect: engine.Effect, node: str) -> None:
        conv = self.conv
        if isinstance(effect, engine.RecordActivityEffect):
            self.event(effect.kind, node=node, ref=effect.ref, value=effect.value)
            kind = _AUDIENCE_ACTIVITY.get(effect.kind)
            if kind is not None and conv.contact_id is not None:
                await contacts.record_activity(
                    self.session,
                    self.deps.signer,
                    conv.org_id,
                    ActivityIn(kind=kind, contact_id=conv.contact_id, event_id=conv.event_id),
                    now=self.now,
                )
        elif isinstance(effect, engine.SurveyAnswerEffect):
            self.event("survey", node=node, ref=effect.survey, value=effect.score)
        elif isinstance(effect, engine.ReleaseEffect):
            await _in_savepoint(self.session, lambda: self.release(effect))
        elif isinstance(effect, engine.TagEffect):
            contact = await self.contact()
            if contact is not None:
                labels = clean_labels(list(effect.tags))
                await contacts.add_labels(self.session, contact, "tag", labels)
        elif isinstance(effect, engine.GrantConsentEffect):
            await _in_savepoint(self.session, lambda: self.consent(effect, node))
        elif isinstance(effect, engine.HandoffEffect):
            conv.taken_over_at = None
            conv.host_ref = None
        # ScheduleEffect: the state's wake_at is persisted with the conversation.

    async def contact(self) -> Contact | None:
        conv = self.conv
        if conv.contact_id is None:
            return None
        found = await self.session.get(Contact, conv.contact_id)
        return found if found is not None and found.erased_at is None else None

    async def _ok(
        self, data: dict[str, Any], secrets: dict[str, str] | None = None
    ) -> EffectResult:
        return EffectResult(ok=True, data=data, secrets=secrets or {})

    async def _link_contact(self, email: str | None, phone: str | None) -> None:
        conv = self.conv
        if conv.contact_id is None:
            conv.contact_id = await find_contact_id(
                self.session, self.deps.signer, conv.org_id, email=email, phone=phone
            )

    async def rsvp(self, effect: engine.RsvpEffect) -> EffectResult:
        conv = self.conv
        if conv.event_id is None:
            raise PopdropError("invalid_request", "this chat flow is not bound to an event")
        spec = RsvpCreate(
            slot_id=effect.slot_id,
            email=effect.email,
            phone=effect.phone,
            places=effect.places,
            consent=True,
            consent_text=effect.consent_text,
            waitlist=effect.waitlist,
        )
        result = await rsvp_service.create_rsvp(
            self.session,
            self.deps.signer,
            event_id=conv.event_id,
            spec=spec,
            now=self.now,
            actor=f"{CHAT_SOURCE}{conv.id}",
        )
        rsvp = result.rsvp
        await self._link_contact(rsvp.email, rsvp.phone)
        await contacts.record_activity(
            self.session,
            self.deps.signer,
            conv.org_id,
            ActivityIn(kind="rsvp", email=rsvp.email, phone=rsvp.phone, event_id=conv.event_id),
            now=self.now,
        )
        secrets: dict[str, str] = {}
        if result.ticket_secret is not None:
            if result.ticket_id is not None:
                self.issued_tickets[("rsvp", rsvp.id)] = (result.ticket_id, result.ticket_secret)
                secrets = await self._ticket_secrets(result.ticket_id, result.ticket_secret)
            else:
                secrets = {
                    "ticket_secret": result.ticket_secret,
                    "ticket_url": links.ticket_url(self.deps.base_url, result.ticket_secret),
                }
        return await self._ok({"rsvp_id": rsvp.id, "rsvp_status": rsvp.status}, secrets)

    async def _tz(self) -> str | None:
        if self.event_tz is None and self.conv.event_id is not None:
            self.event_tz = await self.session.scalar(
                select(Event.timezone).where(Event.id == self.conv.event_id)
            )
        return self.event_tz

    async def hold(self, effect: engine.HoldEffect) -> EffectResult:
        conv = self.conv
        product = await owned(
            self.session,
            Product,
            effect.product_id,
            conv.org_id,
            what="product of this event",
            where=(Product.event_id == conv.event_id,),
        )
        variants = list(
            await self.session.scalars(
                select(Variant).where(Variant.product_id == product.id).order_by(Variant.id)
            )
        )
        wanted = (effect.variant or "").strip().casefold()
        chosen = [
            v
            for v in variants
            if not wanted or wanted in (v.name.casefold(), v.sku.casefold(), str(v.id))
        ]
        if not chosen:
            raise PopdropError(
                "invalid_request", f"{product.title} has no variant {effect.variant!r}"
            )
        # The lane with the most units left for the first variant that has any.
        rows = (
            await self.session.execute(
                select(Stock.variant_id, Stock.lane_id, Stock.total - Stock.held - Stock.sold)
                .where(Stock.variant_id.in_([v.id for v in chosen]))
                .order_by((Stock.total - Stock.held - Stock.sold).desc(), Stock.id)
            )
        ).all()
        if not rows:
            raise PopdropError("sold_out", "sold out", detail={"available": 0})
        order = {v.id: i for i, v in enumerate(chosen)}
        variant_id, lane_id, _left = min(
            rows, key=lambda r: (0 if r[2] >= effect.qty else 1, order[r[0]])
        )
        hold = await inventory.create_hold(
            self.session,
            self.principal,
            HoldCreate(
                variant_id=variant_id,
                lane_id=lane_id,
                qty=effect.qty,
                slot_id=effect.slot_id,
                contact_ref=_contact_ref(conv),
            ),
            now=self.now,
        )
        return await self._ok(
            {
                "hold_id": hold.id,
                "hold_expires_at": hold.expires_at.isoformat(),
                "hold_until": format_time(hold.expires_at, await self._tz()),
                "product_id": product.id,
                "product_title": product.title,
            }
        )

    async def _our_hold(self, hold_id: int) -> Hold | None:
        hold: Hold | None = await self.session.scalar(
            select(Hold).where(
                Hold.id == hold_id,
                Hold.org_id == self.conv.org_id,
                Hold.contact_ref.in_([_contact_ref(self.conv), f"chat:{self.conv.id}"]),
            )
        )
        return hold

    async def release(self, effect: engine.ReleaseEffect) -> EffectResult:
        if await self._our_hold(effect.hold_id) is None:
            raise not_found("hold")
        await inventory.end_hold(
            self.session, self.principal, effect.hold_id, convert=False, now=self.now
        )
        return await self._ok({})

    async def _batch(self, tag: str, create: DiscountSpec | None) -> VoucherBatch:
        conv = self.conv
        batch: VoucherBatch | None = await self.session.scalar(
            select(VoucherBatch)
            .where(VoucherBatch.org_id == conv.org_id, VoucherBatch.tag == tag)
            .order_by(VoucherBatch.revoked_at.is_not(None), VoucherBatch.id)
            .limit(1)
        )
        if batch is not None:
            if batch.revoked_at is not None:
                raise PopdropError("revoked", "these vouchers were withdrawn")
            return batch
        if create is None:
            raise not_found(f"voucher batch tagged {tag!r}")
        made, _codes = await vouchers.issue_batch(
            self.session,
            self.deps.signer,
            self.principal,
            BatchCreate(
                name=f"Chat vouchers ({tag})",
                quantity=1,
                tag=tag,
                ttl_seconds=create.ttl_seconds,
                per_contact_limit=create.per_contact_limit,
                currency=create.currency,
                discount_kind=create.kind,
                discount_value=create.value,
                discount_description=create.description,
                event_ref=str(conv.event_id) if conv.event_id else None,
                offer_ref=f"chat:{conv.flow_key}",
            ),
            now=self.now,
        )
        return made

    async def voucher(self, effect: engine.IssueVoucherEffect) -> EffectResult:
        batch = await self._batch(effect.batch, effect.create)
        subject = _contact_ref(self.conv)
        issued = await vouchers.issue_derived(
            self.session, self.deps.signer, batch, [subject], now=self.now
        )
        if subject not in issued:
            raise PopdropError("unavailable", "the voucher could not be issued")
        voucher_id, code = issued[subject]
        return await self._ok(
            {"voucher_id": voucher_id, "voucher_discount": vouchers.describe_discount(batch)},
            {"voucher_code": code},
        )

    async def ticket(self, effect: engine.SendTicketEffect) -> EffectResult:
        conv = self.conv
        if effect.subject_kind == "rsvp":
            row = (
                await self.session.execute(
                    select(Rsvp.event_id, Rsvp.status, Rsvp.email, Rsvp.phone).where(
                        Rsvp.id == effect.subject_id, Rsvp.org_id == conv.org_id
                    )
                )
            ).first()
            if row is None:
                raise not_found("RSVP")
            if row.status != "confirmed":
                raise PopdropError("conflict", f"this RSVP is {row.status}: no ticket yet")
            event_id, holder = row.event_id, row.email or row.phone
        else:
            hold = await self._our_hold(effect.subject_id)
            if hold is None:
                raise not_found("hold")
            event_id, holder = hold.event_id, None
        ticket, secret, _created = await checkin.issue_ticket(
            self.session,
            self.principal,
            TicketCreate(
                event_id=event_id,
                subject_kind=effect.subject_kind,
                subject_id=effect.subject_id,
                holder_ref=holder,
            ),
            now=self.now,
        )
        return await self._ticket_result(ticket.id, secret)

    async def _customer_link(self, kind: TargetKind, row_id: int, full_url: str) -> str:
        """The link sent to the customer: on SMS a short link to the row (it stores no
        secret: the signed link is rebuilt at redirect), tagged with this conversation so
        a sale through it is attributed to the chat; elsewhere the full link."""
        conv = self.conv
        if conv.channel not in _SHORT_LINK_CHANNELS:
            return full_url
        return await attribution.short_url_for(
            self.session,
            org_id=conv.org_id,
            target=LinkTarget(kind=kind, id=row_id),
            tags=LinkTags(
                channel=Channel(conv.channel), conversation_id=conv.id, event_id=conv.event_id
            ),
            now=self.now,
            base_url=self.deps.short_base_url or self.deps.base_url,
        )

    async def _ticket_secrets(self, ticket_id: int, secret: str) -> dict[str, str]:
        full_url = links.ticket_url(self.deps.base_url, secret)
        url = await self._customer_link(TargetKind.TICKET, ticket_id, full_url)
        return {"ticket_secret": secret, "ticket_url": url}

    async def _ticket_result(self, ticket_id: int, secret: str) -> EffectResult:
        secrets = await self._ticket_secrets(ticket_id, secret)
        return await self._ok({"ticket_id": ticket_id}, secrets)

    async def checkout(self, effect: engine.CheckoutLinkEffect) -> EffectResult:
        hold = await self._our_hold(effect.hold_id)
        if hold is None:
            raise not_found("hold")
        if hold.status != "active" or hold.expires_at <= self.now:
            raise PopdropError("hold_expired", "this reservation has expired")
        full_url = links.checkout_url(self.deps.signer, self.deps.base_url, hold.id, hold.org_id)
        url = await self._customer_link(TargetKind.CHECKOUT, hold.id, full_url)
        return await self._ok({"checkout_hold_id": hold.id}, {"checkout_url": url})

    async def consent(self, effect: engine.GrantConsentEffect, node: str) -> EffectResult:
        conv = self.conv
        contact = await self.contact()
        state_vars = self.state_vars
        if contact is None:
            email = state_vars.get("email")
            phone = state_vars.get("phone")
            contact, _created = await contacts.upsert_contact(
                self.session,
                self.deps.signer,
                self.principal,
                ContactIn(
                    email=email if isinstance(email, str) else None,
                    phone=phone if isinstance(phone, str) else None,
                    source=f"chat:{conv.flow_key}",
                ),
                now=self.now,
            )
            conv.contact_id = contact.id
        channel = effect.channel or consent_channel(conv.channel)
        await audience_consent.change_consent(
            self.session,
            self.deps.signer,
            contact,
            ConsentChange(
                channel=channel,
                action="grant",
                wording=effect.wording,
                source="chat_keyword",
                proof=f"chat conversation {conv.id}, node {node}",
            ),
            now=self.now,
        )
        return await self._ok({})
