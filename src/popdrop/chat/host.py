"""The host side of chat: host addresses, commands from a host's own chat, broadcasts,
the pinned product card, and the outbox of host-originated messages.

A host runs the day from their phone. An inbound from an address registered as a host of
the organization (`add_host`: channel + address, kept as a keyed hash like conversation
addresses) whose text starts with `/` is a command, not a flow turn:

- `/open 14:00 10` — a slot at 14:00 today (the event's time zone) with 10 places, or 10
  more places on the slot that already starts then;
- `/soldout SKU` — the product (variant SKU, product title or `#id`) is sold out: its
  stock is set down to what is already held or sold, through `inventory.set_stock`, so
  the next card shows it sold out and offers no Reserve;
- `/stats` — today's RSVPs, check-ins, holds, vouchers issued in chat and chat sessions;
- `/pin SKU` (`/pin off`) — the product card pinned for the event's customers: every
  new session's first answer starts with it (`chat.facts.pinned_card`);
- `/orders` — the event's latest orders (number, status, total, pickup code);
- `/sales` — the event's paid orders, revenue and average checkout value
  (`commerce.orders.sales_summary`);
- `/broadcast <text>` — to the event's chat audience: per conversation, the consent of
  the contact on that channel is checked, opted-out conversations are skipped, and a
  conversation gets at most one broadcast per `BROADCAST_SPACING`;
- anything else starting with `/` — the help text.

A non-host sending `/soldout` is an ordinary customer: `maybe_host_command` answers None
and the flow runs. `parse` is pure; the rest runs in the caller's transaction.

Host-originated messages to customers (console replies, pinned cards sent from the
console, broadcasts) are queued in `chat_messages` with direction `queued` / `bqueued`;
`chat.tasks.deliver_due` takes them with `take_outbox` (marked `host` / `bcast`) and
sends them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import (
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal, system_principal
from popdrop.audience.consent import CONSENT_COLUMN
from popdrop.audience.models import Contact
from popdrop.chat import console, conversations, facts, flow_store, stats, turn
from popdrop.chat.messages import OUT_MESSAGES, Card, OutMessage, Text
from popdrop.chat.models import (
    ChatEvent,
    ChatHost,
    ChatMessage,
    ChatPin,
    Conversation,
    FlowVersion,
)
from popdrop.checkin.models import Ticket
from popdrop.commerce import orders
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.money import Money
from popdrop.core.schemas import is_clean_text
from popdrop.core.tenancy import owned
from popdrop.events import service as events
from popdrop.events.lifecycle import OPEN_EVENT_STATUSES
from popdrop.events.models import Event, TimeSlot
from popdrop.events.schemas import SlotCreate
from popdrop.inventory import service as inventory
from popdrop.inventory.models import Hold, Product, Stock, Variant
from popdrop.inventory.schemas import StockSet
from popdrop.rsvp.models import Rsvp

# A conversation gets at most one broadcast per this much time (the rate limit).
BROADCAST_SPACING = timedelta(hours=12)
BROADCAST_MAX = 1000  # text length
DEFAULT_SLOT_LENGTH = timedelta(hours=1)
QUEUED, SENT = "queued", "host"
BQUEUED, BSENT = "bqueued", "bcast"

HELP_TEXT = (
    "Host commands:\n"
    "/open 14:00 10 — open a slot at 14:00 today with 10 places (or add 10 places)\n"
    "/soldout SKU — mark a product sold out\n"
    "/stats — today's RSVPs, check-ins, holds, vouchers, chats\n"
    "/pin SKU — pin a product card for customers (/pin off to unpin)\n"
    "/orders — the latest orders of the event\n"
    "/sales — paid orders, revenue and average checkout value\n"
    "/broadcast <text> — message the event's chat audience (consent-checked)\n"
    "/help — this list"
)


# ---------------------------------------------------------------- parsing (pure)


@dataclass(frozen=True)
class OpenSlot:
    at: time
    capacity: int
    kind: Literal["open"] = "open"


@dataclass(frozen=True)
class SoldOut:
    ref: str
    kind: Literal["soldout"] = "soldout"


@dataclass(frozen=True)
class Stats:
    kind: Literal["stats"] = "stats"


@dataclass(frozen=True)
class Pin:
    ref: str | None  # None: unpin
    kind: Literal["pin"] = "pin"


@dataclass(frozen=True)
class Broadcast:
    text: str
    kind: Literal["broadcast"] = "broadcast"


@dataclass(frozen=True)
class Orders:
    kind: Literal["orders"] = "orders"


@dataclass(frozen=True)
class Sales:
    kind: Literal["sales"] = "sales"


@dataclass(frozen=True)
class Help:
    problem: str | None = None
    kind: Literal["help"] = "help"


Command = OpenSlot | SoldOut | Stats | Orders | Sales | Pin | Broadcast | Help
LATEST_ORDERS = 5  # how many orders `/orders` lists
_TIME = re.compile(r"^(\d{1,2})(?:[:h.](\d{2}))?$")


def _usage(problem: str) -> Help:
    return Help(problem)


def parse(text: str) -> Command | None:
    """A host command, or None when `text` is not one (it does not start with `/`)."""
    stripped = text.strip()
    if not stripped.startswith("/"):
        return None
    head, _, rest = stripped[1:].partition(" ")
    name = head.split("@", 1)[0].lower()  # Telegram: /stats@popdrop_bot
    rest = rest.strip()
    if name == "open":
        parts = rest.split()
        if len(parts) != 2:
            return _usage("Usage: /open 14:00 10")
        match = _TIME.match(parts[0])
        if match is None:
            return _usage("Usage: /open 14:00 10 (a time as HH:MM)")
        hour, minute = int(match.group(1)), int(match.group(2) or 0)
        if hour > 23 or minute > 59:
            return _usage("Usage: /open 14:00 10 (a time as HH:MM)")
        if not parts[1].isdecimal() or not 1 <= int(parts[1]) <= 100_000:
            return _usage("Usage: /open 14:00 10 (places from 1 to 100000)")
        return OpenSlot(time(hour, minute), int(parts[1]))
    if name == "soldout":
        return SoldOut(rest) if rest else _usage("Usage: /soldout SKU")
    if name == "stats":
        return Stats()
    if name == "orders":
        return Orders()
    if name == "sales":
        return Sales()
    if name == "pin":
        if not rest:
            return _usage("Usage: /pin SKU (or /pin off)")
        return Pin(None if rest.lower() in ("off", "none", "-") else rest)
    if name == "broadcast":
        if not rest:
            return _usage("Usage: /broadcast <text>")
        if len(rest) > BROADCAST_MAX:
            return _usage(f"A broadcast is at most {BROADCAST_MAX} characters.")
        return Broadcast(rest)
    return Help()


def help_text(problem: str | None = None) -> str:
    return f"{problem}\n\n{HELP_TEXT}" if problem else HELP_TEXT


# ---------------------------------------------------------------- host addresses


async def add_host(
    session: AsyncSession,
    deps: conversations.ChatDeps,
    org_id: int,
    *,
    channel: str,
    address: str,
    label: str = "",
    now: datetime,
) -> ChatHost:
    clean = conversations.normalize_address(channel, address)
    if len(label) > 200 or not is_clean_text(label):
        raise PopdropError("invalid_request", "label: up to 200 characters")
    digest = conversations.address_hash(deps.signer, channel, clean)
    existing = await session.scalar(
        select(ChatHost).where(
            ChatHost.org_id == org_id, ChatHost.channel == channel, ChatHost.address_hash == digest
        )
    )
    if existing is not None:
        existing.label = label or existing.label
        await session.flush()
        return existing
    host = ChatHost(
        org_id=org_id,
        channel=channel,
        address_hash=digest,
        label=label or _masked(channel, clean),
        created_at=now,
    )
    session.add(host)
    await session.flush()
    return host


def _masked(channel: str, address: str) -> str:
    shown = address if len(address) <= 6 else f"{address[:3]}…{address[-2:]}"
    return f"{channel} {shown}"


async def remove_host(session: AsyncSession, org_id: int, host_id: int) -> None:
    host = await owned(session, ChatHost, host_id, org_id, what="host")
    await session.delete(host)
    await session.flush()


async def list_hosts(session: AsyncSession, org_id: int) -> list[ChatHost]:
    return list(
        await session.scalars(
            select(ChatHost).where(ChatHost.org_id == org_id).order_by(ChatHost.id)
        )
    )


async def find_host(
    session: AsyncSession, deps: conversations.ChatDeps, org_id: int, channel: str, address: str
) -> ChatHost | None:
    try:
        clean = conversations.normalize_address(channel, address)
    except PopdropError:
        return None
    digest = conversations.address_hash(deps.signer, channel, clean)
    return await session.scalar(
        select(ChatHost).where(
            ChatHost.org_id == org_id, ChatHost.channel == channel, ChatHost.address_hash == digest
        )
    )


def host_principal(org_id: int, actor: str) -> Principal:
    return system_principal(org_id, actor[:200], role="host")


# ---------------------------------------------------------------- the event of the day


async def current_event(session: AsyncSession, org_id: int, now: datetime) -> Event | None:
    """The event the default flow's latest version is bound to, else the next open one
    (what an unbound version offers a new session)."""
    bound = await session.scalar(
        select(FlowVersion.event_id)
        .where(FlowVersion.org_id == org_id, FlowVersion.key == flow_store.DEFAULT_FLOW_KEY)
        .order_by(FlowVersion.version.desc())
        .limit(1)
    )
    if bound is not None:
        event = await session.scalar(select(Event).where(Event.id == bound, Event.org_id == org_id))
        if event is not None:
            return event
    return await session.scalar(
        select(Event)
        .where(Event.org_id == org_id, Event.status.in_(OPEN_EVENT_STATUSES), Event.ends_at > now)
        .order_by(Event.starts_at, Event.id)
        .limit(1)
    )


def _zone(event: Event) -> ZoneInfo:
    try:
        return ZoneInfo(event.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local_day(event: Event, now: datetime) -> tuple[date, datetime, datetime]:
    """Today in the event's time zone, and its start and end in UTC."""
    zone = _zone(event)
    day = now.astimezone(zone).date()
    start = datetime.combine(day, time(0), zone).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), zone).astimezone(UTC)
    return day, start, end


# ---------------------------------------------------------------- products


async def find_product(session: AsyncSession, org_id: int, event_id: int, ref: str) -> Product:
    """A product of the event by a variant SKU, `#id`/id, or its title (case-insensitive)."""
    ref = ref.strip()
    base = select(Product).where(Product.org_id == org_id, Product.event_id == event_id)
    by_sku = await session.scalar(
        base.join(Variant, Variant.product_id == Product.id)
        .where(Variant.sku != "", func.lower(Variant.sku) == ref.lower())
        .limit(1)
    )
    if by_sku is not None:
        return by_sku
    digits = ref.removeprefix("#")
    if digits.isdecimal() and len(digits) < 18:
        by_id = await session.scalar(base.where(Product.id == int(digits)))
        if by_id is not None:
            return by_id
    titled = list(await session.scalars(base.where(func.lower(Product.title) == ref.lower())))
    if len(titled) == 1:
        return titled[0]
    raise not_found(f"product {ref!r}")


async def sold_out(
    session: AsyncSession, principal: Principal, product: Product, *, now: datetime
) -> int:
    """Set every stock row of the product down to what is held or sold (`set_stock`):
    nothing is left to hold. Returns the units taken off sale."""
    rows = (
        await session.execute(
            select(Stock.variant_id, Stock.lane_id, Stock.total)
            .join(Variant, Variant.id == Stock.variant_id)
            .where(Variant.product_id == product.id, Stock.org_id == principal.org_id)
            .order_by(Stock.id)
        )
    ).all()
    removed = 0
    for variant_id, lane_id, total in rows:
        held = await session.scalar(
            select(func.coalesce(func.sum(Hold.qty), 0))
            .join(Stock, Stock.id == Hold.stock_id)
            .where(
                Stock.variant_id == variant_id,
                Stock.lane_id == lane_id,
                Hold.status == "active",
                Hold.expires_at > now,
            )
        )
        sold = await session.scalar(
            select(Stock.sold).where(Stock.variant_id == variant_id, Stock.lane_id == lane_id)
        )
        keep = int(held or 0) + int(sold or 0)
        if total > keep:
            await inventory.set_stock(
                session,
                principal,
                StockSet(variant_id=variant_id, lane_id=lane_id, total=keep),
                now=now,
            )
            removed += int(total) - keep
    return removed


async def pin(
    session: AsyncSession,
    org_id: int,
    event_id: int,
    product_id: int | None,
    *,
    by: str,
    now: datetime,
) -> None:
    """Pin a product card for the event (None: unpin)."""
    row = await session.get(ChatPin, (org_id, event_id))
    if product_id is None:
        if row is not None:
            await session.delete(row)
            await session.flush()
        return
    await owned(session, Product, product_id, org_id, where=(Product.event_id == event_id,))
    if row is None:
        session.add(
            ChatPin(
                org_id=org_id,
                event_id=event_id,
                product_id=product_id,
                pinned_at=now,
                pinned_by=by[:200],
            )
        )
    else:
        row.product_id, row.pinned_at, row.pinned_by = product_id, now, by[:200]
    await session.flush()


# ---------------------------------------------------------------- outbox


def _row(conv: Conversation, direction: str, message: OutMessage, now: datetime) -> ChatMessage:
    return ChatMessage(
        org_id=conv.org_id,
        conversation_id=conv.id,
        session_no=conv.session_no,
        direction=direction,
        body=message.model_dump_json(),
        created_at=now,
    )


async def queue_reply(
    session: AsyncSession, org_id: int, conversation_id: int, *, text: str, now: datetime
) -> Text:
    """A host's reply typed in the console: in the transcript, queued for the channel."""
    if not text.strip() or not is_clean_text(text) or len(text) > 2000:
        raise PopdropError("invalid_request", "text: 1 to 2000 characters")
    conv = await console.get_conversation(session, org_id, conversation_id)
    message = Text(text=text)
    session.add(_row(conv, QUEUED, message, now))
    conv.last_message_at = now
    await session.flush()
    return message


async def send_card(
    session: AsyncSession, org_id: int, conversation_id: int, product_id: int, *, now: datetime
) -> Card:
    """Put a product card into a conversation (queued for its channel)."""
    conv = await console.get_conversation(session, org_id, conversation_id)
    product = await session.scalar(
        select(Product).where(Product.id == product_id, Product.org_id == org_id)
    )
    card = None
    if product is not None:
        card = await facts.host_card(session, org_id, product.event_id, product.id, now)
    if card is None:
        raise not_found("product")
    session.add(_row(conv, QUEUED, card, now))
    conv.last_message_at = now
    await session.flush()
    return card


async def take_outbox(
    session: AsyncSession,
    *,
    limit: int = 200,
    org_id: int | None = None,
    channel: str | None = None,
) -> list[turn.Delivery]:
    """Host messages waiting for delivery, marked sent; one Delivery per conversation."""
    query = (
        select(ChatMessage, Conversation)
        .join(Conversation, Conversation.id == ChatMessage.conversation_id)
        .where(ChatMessage.direction.in_((QUEUED, BQUEUED)))
        .order_by(ChatMessage.id)
        .limit(limit)
    )
    if org_id is not None:
        query = query.where(ChatMessage.org_id == org_id)
    if channel is not None:
        query = query.where(Conversation.channel == channel)
    conn = await session.connection()
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(of=ChatMessage, skip_locked=True)
    grouped: dict[int, turn.Delivery] = {}
    for message, conv in (await session.execute(query)).all():
        message.direction = SENT if message.direction == QUEUED else BSENT
        if conv.address is None or conv.opted_out_at is not None:
            continue
        body = OUT_MESSAGES.validate_json(f"[{message.body}]")
        found = grouped.get(conv.id)
        if found is None:
            grouped[conv.id] = turn.Delivery(
                conv.id, conv.org_id, conv.channel, conv.address, conv.contact_id, list(body)
            )
        else:
            found.messages.extend(body)
    await session.flush()
    return list(grouped.values())


# ---------------------------------------------------------------- broadcast


def _consented(contact: Contact | None, channel: str) -> bool:
    if contact is None or contact.erased_at is not None:
        return False
    return bool(
        getattr(contact, CONSENT_COLUMN[conversations.consent_channel(channel)]) == "granted"
    )


@dataclass
class BroadcastResult:
    queued: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        why = ", ".join(
            f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(self.skipped.items())
        )
        skipped = sum(self.skipped.values())
        return f"Broadcast queued for {self.queued}; skipped {skipped}" + (
            f" ({why})." if why else "."
        )


async def broadcast(
    session: AsyncSession, org_id: int, event_id: int, text: str, *, now: datetime
) -> BroadcastResult:
    """Queue `text` to every conversation of the event: skipped when opted out (STOP),
    without the contact's consent on that channel (sms, or chat for web/Telegram), erased,
    or already broadcast to within `BROADCAST_SPACING` (rate limit)."""
    if not text.strip() or not is_clean_text(text) or len(text) > BROADCAST_MAX:
        raise PopdropError("invalid_request", f"text: 1 to {BROADCAST_MAX} characters")
    recent = set(
        await session.scalars(
            select(ChatMessage.conversation_id).where(
                ChatMessage.org_id == org_id,
                ChatMessage.direction.in_((BQUEUED, BSENT)),
                ChatMessage.created_at > now - BROADCAST_SPACING,
            )
        )
    )
    rows = (
        await session.execute(
            select(Conversation, Contact)
            .outerjoin(Contact, Contact.id == Conversation.contact_id)
            .where(Conversation.org_id == org_id, Conversation.event_id == event_id)
            .order_by(Conversation.id)
        )
    ).all()
    result = BroadcastResult()
    message = Text(text=text)
    for conv, contact in rows:
        if conv.address is None:
            result.skip("no_address")
        elif conv.opted_out_at is not None:
            result.skip("opted_out")
        elif not _consented(contact, conv.channel):
            result.skip("no_consent")
        elif conv.id in recent:
            result.skip("rate_limited")
        else:
            session.add(_row(conv, BQUEUED, message, now))
            result.queued += 1
    await session.flush()
    return result


# ---------------------------------------------------------------- stats


@dataclass(frozen=True)
class DayStats:
    day: date
    rsvps: int
    checkins: int
    holds: int
    vouchers: int
    chats: int

    def text(self, title: str) -> str:
        return (
            f"{title}, {self.day.isoformat()}:\n"
            f"RSVPs {self.rsvps} · check-ins {self.checkins} · holds {self.holds}\n"
            f"vouchers issued in chat {self.vouchers} · chats {self.chats}"
        )


async def day_stats(session: AsyncSession, org_id: int, event: Event, now: datetime) -> DayStats:
    day, start, end = local_day(event, now)

    async def count(query: object) -> int:
        return int(await session.scalar(query) or 0)  # type: ignore[call-overload]

    rsvps = await count(
        select(func.count())
        .select_from(Rsvp)
        .where(Rsvp.event_id == event.id, Rsvp.created_at >= start, Rsvp.created_at < end)
    )
    checkins = await count(
        select(func.count())
        .select_from(Ticket)
        .where(
            Ticket.event_id == event.id, Ticket.checked_in_at >= start, Ticket.checked_in_at < end
        )
    )
    holds = await count(
        select(func.count())
        .select_from(Hold)
        .where(Hold.event_id == event.id, Hold.created_at >= start, Hold.created_at < end)
    )
    vouchers = await count(
        select(func.count())
        .select_from(ChatEvent)
        .where(
            ChatEvent.org_id == org_id,
            ChatEvent.event_id == event.id,
            ChatEvent.kind == "voucher_issued",
            ChatEvent.at >= start,
            ChatEvent.at < end,
        )
    )
    chats = await stats.chats_started(session, org_id, event.id, start, end)
    return DayStats(day, rsvps, checkins, holds, vouchers, chats)


# ---------------------------------------------------------------- orders


async def latest_orders(session: AsyncSession, principal: Principal, event: Event) -> str:
    rows = await orders.list_orders(session, principal, event_id=event.id, limit=LATEST_ORDERS)
    if not rows:
        return f"No orders yet for {event.title}."
    lines = [f"Latest orders, {event.title}:"]
    for order in rows:
        total = Money(order.total_minor, order.currency).format()
        code = f" · {order.short_code}" if order.short_code else ""
        lines.append(f"#{order.id} {order.status.replace('_', ' ')} · {total}{code}")
    return "\n".join(lines)


async def sales_text(session: AsyncSession, principal: Principal, event: Event) -> str:
    summary = await orders.sales_summary(session, principal, event.id)
    if summary.paid_orders == 0 or summary.currency is None:
        return f"{event.title}: no paid orders yet."
    currency = summary.currency
    return (
        f"{event.title}: {summary.paid_orders} paid orders · "
        f"revenue {Money(summary.revenue_minor, currency).format()} · "
        f"average checkout {Money(summary.average_minor, currency).format()} · "
        f"{summary.units_sold} units"
    )


# ---------------------------------------------------------------- slots


async def open_slot(
    session: AsyncSession,
    principal: Principal,
    event: Event,
    at: time,
    capacity: int,
    now: datetime,
) -> str:
    zone = _zone(event)
    day = now.astimezone(zone).date()
    starts = datetime.combine(day, at, zone).astimezone(UTC)
    existing = await session.scalar(
        select(TimeSlot)
        .where(TimeSlot.event_id == event.id, TimeSlot.org_id == principal.org_id)
        .where(TimeSlot.starts_at == starts)
        .with_for_update()
    )
    label = at.strftime("%H:%M")
    if existing is not None:
        principal.require("events:write")
        await session.execute(
            update(TimeSlot)
            .where(TimeSlot.id == existing.id)
            .values(capacity=TimeSlot.capacity + capacity)
        )
        await session.refresh(existing)
        left = existing.capacity - existing.taken
        return f"Slot {label} now has {existing.capacity} places ({left} left)."
    last = await session.scalar(
        select(TimeSlot)
        .where(TimeSlot.event_id == event.id, TimeSlot.org_id == principal.org_id)
        .order_by(TimeSlot.starts_at.desc())
        .limit(1)
    )
    length = (last.ends_at - last.starts_at) if last is not None else DEFAULT_SLOT_LENGTH
    if starts + length <= now:
        raise PopdropError("invalid_request", f"{label} today is already over")
    await events.add_slot(
        session,
        principal,
        event.id,
        SlotCreate(label="", starts_at=starts, ends_at=starts + length, capacity=capacity),
    )
    return f"Slot {label} opened today with {capacity} places."


# ---------------------------------------------------------------- routing


async def run_command(
    session: AsyncSession,
    command: Command,
    *,
    org_id: int,
    actor: str,
    now: datetime,
) -> str:
    """Run a parsed command as the organization's host; the reply text."""
    if isinstance(command, Help):
        return help_text(command.problem)
    principal = host_principal(org_id, actor)
    event = await current_event(session, org_id, now)
    if event is None:
        return "No open event to run: publish an event (and its chat flow) first."
    if isinstance(command, Stats):
        return (await day_stats(session, org_id, event, now)).text(event.title)
    if isinstance(command, Orders):
        return await latest_orders(session, principal, event)
    if isinstance(command, Sales):
        return await sales_text(session, principal, event)
    if isinstance(command, OpenSlot):
        return await open_slot(session, principal, event, command.at, command.capacity, now)
    if isinstance(command, SoldOut):
        product = await find_product(session, org_id, event.id, command.ref)
        removed = await sold_out(session, principal, product, now=now)
        return f"{product.title} is sold out ({removed} units taken off sale)."
    if isinstance(command, Pin):
        if command.ref is None:
            await pin(session, org_id, event.id, None, by=actor, now=now)
            return "Unpinned."
        product = await find_product(session, org_id, event.id, command.ref)
        await pin(session, org_id, event.id, product.id, by=actor, now=now)
        return f"Pinned {product.title} for {event.title}."
    result = await broadcast(session, org_id, event.id, command.text, now=now)
    return result.summary()


async def maybe_host_command(
    session: AsyncSession,
    deps: conversations.ChatDeps,
    *,
    org_id: int,
    channel: str,
    address: str,
    text: str,
    now: datetime,
) -> list[OutMessage] | None:
    """The reply to a host's `/command`; None when the text is not a command or the
    sender is not a host of the organization (then the flow handles it as usual)."""
    command = parse(text)
    if command is None:
        return None
    host = await find_host(session, deps, org_id, channel, address)
    if host is None:
        return None
    actor = f"chat-host:{host.id}:{host.label}"
    try:
        async with session.begin_nested():
            reply = await run_command(session, command, org_id=org_id, actor=actor, now=now)
    except PopdropError as error:
        reply = f"Not done: {error.message}"
    return [Text(text=reply)]


__all__ = [
    "BroadcastResult",
    "Command",
    "DayStats",
    "add_host",
    "broadcast",
    "current_event",
    "day_stats",
    "find_host",
    "help_text",
    "list_hosts",
    "maybe_host_command",
    "parse",
    "pin",
    "queue_reply",
    "remove_host",
    "run_command",
    "send_card",
    "take_outbox",
]
