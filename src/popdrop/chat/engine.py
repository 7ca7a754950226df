"""The chat engine: a pure step function.

    step(flow, state, inbound, facts) -> StepResult(state, outbound, effects, visited)

No I/O: `facts` is a snapshot the caller read before (now, the bound event, its products
with live availability and its slots with places left, the contact's segments, and the
results of effects already applied). The engine enters nodes until it needs the customer
(an input), hits a wait, hands off, ends, or reaches an action whose answer it needs
(`state.pending` names it; the caller applies that effect, puts its `EffectResult` in
`facts.results[key]` and calls `step` again with `inbound=None`). A turn enters at most
`MAX_STEPS` nodes: a flow that loops without waiting ends in the `error` status with the
flow's `error_text`, it never hangs.

Effects are plain data applied by the caller (`chat.turn`, through `chat.effects`) in one
transaction. Secrets an effect returns (voucher code, ticket secret, checkout link) live
in `state.secrets` for the rest of the turn only: they are never serialised with the
state.

Over 900 lines on purpose: it is one concern, the step function, and the vocabulary it
reads and writes (facts, effects, templates) must change together with it; splitting it
would scatter a pure function's invariants over several files.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from popdrop.chat import flow as f
from popdrop.chat.lifecycle import ENDED_CONVERSATION_STATUSES, ConversationStatus
from popdrop.chat.messages import (
    Button,
    Buttons,
    Card,
    Carousel,
    Countdown,
    Image,
    OutMessage,
    QrTicket,
    Text,
    format_time,
)
from popdrop.core import localtime
from popdrop.core.clock import ensure_utc
from popdrop.core.errors import PopdropError
from popdrop.core.identity import normalize_email, normalize_phone
from popdrop.core.money import Money

MAX_STEPS = 64
MAX_INPUT = 2000
# Kept when a finished conversation starts over: the customer already told us.
PERSISTENT_VARS = ("email", "phone", "first_name")
STATUSES: tuple[str, ...] = tuple(ConversationStatus)
Scalar = str | int | float | bool | None


class ChatState(BaseModel):
    """A conversation's position in its flow version: small and JSON-serialisable."""

    model_config = ConfigDict(extra="ignore")

    flow_key: str
    flow_version: int
    node: str
    status: ConversationStatus = ConversationStatus.ACTIVE
    vars: dict[str, Scalar] = Field(default_factory=dict)
    tries: int = 0
    pending: str | None = None  # key of the action effect whose result the engine awaits
    wake_at: datetime | None = None
    numbered: list[str] = Field(default_factory=list)  # payloads of "1", "2", … (degrade)
    seq: int = 0
    turns: int = 0
    turn_steps: int = 0
    secrets: dict[str, str] = Field(default_factory=dict, exclude=True)

    @classmethod
    def initial(cls, flow: f.Flow, key: str, version: int) -> ChatState:
        return cls(flow_key=key, flow_version=version, node=flow.start, vars=dict(flow.vars))


class Inbound(BaseModel):
    """What the customer (or the clock) sent: text, a button payload, a deep-link start
    (`payload` = the ref), or a wake-up for a scheduled wait/timeout."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["text", "button", "start", "wake"] = "text"
    text: str = Field(default="", max_length=MAX_INPUT)
    payload: str | None = Field(default=None, max_length=200)

    @classmethod
    def of_text(cls, text: str) -> Inbound:
        return cls(kind="text", text=text[:MAX_INPUT])

    @classmethod
    def button(cls, payload: str) -> Inbound:
        return cls(kind="button", payload=payload[:200])

    @classmethod
    def start(cls, ref: str | None = None) -> Inbound:
        return cls(kind="start", payload=ref[:200] if ref else None)

    @classmethod
    def wake(cls) -> Inbound:
        return cls(kind="wake")


# ---------------------------------------------------------------- facts


@dataclass(frozen=True, slots=True)
class EventFact:
    id: int
    title: str
    starts_at: datetime
    ends_at: datetime
    timezone: str
    venue: str = ""
    status: str = "published"


@dataclass(frozen=True, slots=True)
class ProductFact:
    id: int
    title: str
    text: str
    price_minor: int
    currency: str
    image_url: str
    available: int
    skus: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SlotFact:
    id: int
    label: str
    starts_at: datetime
    ends_at: datetime
    free: int


@dataclass(slots=True)
class EffectResult:
    ok: bool
    reason: str | None = None
    message: str = ""
    data: dict[str, Scalar] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)


@dataclass
class Facts:
    """The read-only snapshot a turn runs on (see the module doc)."""

    now: datetime
    event: EventFact | None = None
    products: list[ProductFact] = field(default_factory=list)
    slots: list[SlotFact] = field(default_factory=list)
    segments: frozenset[str] = frozenset()
    contact: dict[str, Scalar] = field(default_factory=dict)
    channel: str = "web"
    results: dict[str, EffectResult] = field(default_factory=dict)
    _index: dict[str, ProductFact] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def product(self, ref: str) -> ProductFact | None:
        if self._index is None:
            index: dict[str, ProductFact] = {}
            for product in self.products:
                index[str(product.id)] = product
                for sku in product.skus:
                    if sku:
                        index.setdefault(sku.casefold(), product)
            self._index = index
        return self._index.get(ref.strip().casefold())

    def slot(self, slot_id: int) -> SlotFact | None:
        return next((s for s in self.slots if s.id == slot_id), None)


# ---------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class RsvpEffect:
    key: str
    slot_id: int
    places: int
    email: str | None
    phone: str | None
    consent_text: str
    waitlist: bool = False


@dataclass(frozen=True, slots=True)
class HoldEffect:
    key: str
    product_id: int
    variant: str | None
    qty: int
    slot_id: int | None = None


@dataclass(frozen=True, slots=True)
class ReleaseEffect:
    hold_id: int


@dataclass(frozen=True, slots=True)
class IssueVoucherEffect:
    key: str
    batch: str
    create: f.DiscountSpec | None = None


@dataclass(frozen=True, slots=True)
class SendTicketEffect:
    key: str
    subject_kind: Literal["rsvp", "hold"]
    subject_id: int


@dataclass(frozen=True, slots=True)
class CheckoutLinkEffect:
    key: str
    hold_id: int


@dataclass(frozen=True, slots=True)
class TagEffect:
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GrantConsentEffect:
    channel: str | None
    wording: str


@dataclass(frozen=True, slots=True)
class HandoffEffect:
    reason: str


@dataclass(frozen=True, slots=True)
class SurveyAnswerEffect:
    survey: str
    score: int | None
    answer: str


@dataclass(frozen=True, slots=True)
class RecordActivityEffect:
    """Funnel activity: chat_started, card_viewed, rsvp, hold, voucher_issued,
    checkout_started, ticket_sent, handoff, error."""

    kind: str
    ref: str | None = None
    value: int | None = None


@dataclass(frozen=True, slots=True)
class ScheduleEffect:
    """Wake this conversation at `at` (a wait, or an input's timeout)."""

    at: datetime
    reason: Literal["wait", "timeout"]


Effect = (
    RsvpEffect
    | HoldEffect
    | ReleaseEffect
    | IssueVoucherEffect
    | SendTicketEffect
    | CheckoutLinkEffect
    | TagEffect
    | GrantConsentEffect
    | HandoffEffect
    | SurveyAnswerEffect
    | RecordActivityEffect
    | ScheduleEffect
)
AwaitedEffect = RsvpEffect | HoldEffect | IssueVoucherEffect | SendTicketEffect | CheckoutLinkEffect
AWAITED = (RsvpEffect, HoldEffect, IssueVoucherEffect, SendTicketEffect, CheckoutLinkEffect)
ACTIVITY_OF = {
    f.RsvpNode: "rsvp",
    f.HoldNode: "hold",
    f.IssueVoucherNode: "voucher_issued",
    f.CheckoutLinkNode: "checkout_started",
    f.SendTicketNode: "ticket_sent",
}


@dataclass
class StepResult:
    state: ChatState
    outbound: list[OutMessage]
    effects: list[Effect]
    visited: list[str]

    @property
    def pending(self) -> AwaitedEffect | None:
        """The action effect the engine waits on (always the last effect), if any."""
        if self.state.pending is None or not self.effects:
            return None
        last = self.effects[-1]
        return last if isinstance(last, AWAITED) else None


# ---------------------------------------------------------------- templates

_TEMPLATE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)\}")
_PUNCT = string.punctuation + string.whitespace + "\u00a1\u00bf\u2026"


@lru_cache(maxsize=8192)
def _parts(template: str) -> tuple[str | tuple[str], ...]:
    """Literal text and `(name,)` for each `{name}`; `{{` and `}}` are literal braces."""
    parts: list[str | tuple[str]] = []
    position = 0
    for match in _TEMPLATE.finditer(template):
        if match.start() > position:
            parts.append(template[position : match.start()])
        found = match.group(0)
        if found == "{{":
            parts.append("{")
        elif found == "}}":
            parts.append("}")
        else:
            parts.append((match.group(1),))
        position = match.end()
    if position < len(template):
        parts.append(template[position:])
    return tuple(parts)


def _norm(text: str) -> str:
    return " ".join(text.casefold().split()).strip(_PUNCT)


def parse_time(text: str) -> datetime | None:
    try:
        return ensure_utc(datetime.fromisoformat(text.strip()))
    except (ValueError, TypeError):
        return None


def _as_int(value: Scalar) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    text = value.strip()
    if text.lstrip("-").isdecimal() and len(text) <= 18:
        return int(text)
    return None


def _same(a: Scalar, b: Scalar) -> bool:
    if a == b:
        return True
    if a is None or b is None:
        return False
    if isinstance(a, str) and isinstance(b, str):
        return a.casefold() == b.casefold()
    return str(a).casefold() == str(b).casefold()


def _number(value: Scalar) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value.strip().replace(",", "."))
    except ValueError:
        return None


def _event_value(event: EventFact, attr: str) -> Scalar:
    if attr == "title":
        return event.title
    if attr == "starts_at":
        return event.starts_at.isoformat()
    if attr == "ends_at":
        return event.ends_at.isoformat()
    if attr == "starts":
        return format_time(event.starts_at, event.timezone)
    if attr == "venue":
        return event.venue
    if attr == "timezone":
        return event.timezone
    if attr == "id":
        return event.id
    return None


_RETRY = object()  # an answer the node does not take: re-ask
_STAY = object()  # nothing to do for this inbound


@dataclass(frozen=True, slots=True)
class _ButtonRef:
    spec: f.ButtonSpec
    kind: Literal["static", "card", "carousel"]
    product: str | None = None  # a card's product template


def _button_refs(node: f.MessageNode | f.ChoiceNode) -> list[_ButtonRef]:
    refs: list[_ButtonRef] = []
    for item in node.say:
        if isinstance(item, f.CardItem):
            refs += [_ButtonRef(b, "card", item.card.product) for b in item.card.buttons]
        elif isinstance(item, f.CarouselItem) and item.carousel.button is not None:
            refs.append(_ButtonRef(item.carousel.button, "carousel"))
    quick = node.buttons if isinstance(node, f.MessageNode) else node.options
    refs += [_ButtonRef(b, "static") for b in quick]
    return refs


# ---------------------------------------------------------------- the turn


def card_of(
    product: ProductFact, *, text: str | None = None, buttons: list[Button] | None = None
) -> Card:
    """A product as a card: price, image and live availability (`text` overrides its
    highlights)."""
    try:
        price: str | None = Money(product.price_minor, product.currency).format()
    except PopdropError:
        price = None
    return Card(
        product_id=product.id,
        title=product.title,
        text=product.text if text is None else text,
        price=price,
        image_url=product.image_url or None,
        available=max(product.available, 0),
        buttons=buttons or [],
    )


class _Turn:
    def __init__(self, flow: f.Flow, state: ChatState, facts: Facts) -> None:
        self.flow = flow
        self.state = state
        self.facts = facts
        self.out: list[OutMessage] = []
        self.effects: list[Effect] = []
        self.visited: list[str] = []

    # ------------------------------------------------------------ templates

    def lookup(self, name: str) -> Scalar:
        state = self.state
        if name in state.secrets:
            return state.secrets[name]
        if name in state.vars:
            return state.vars[name]
        head, _, attr = name.partition(".")
        if head == "event" and self.facts.event is not None:
            return _event_value(self.facts.event, attr)
        if head == "contact":
            return self.facts.contact.get(attr)
        if name == "now":
            return self.facts.now.isoformat()
        if name == "channel":
            return self.facts.channel
        return None

    def render(self, template: str) -> str:
        parts = _parts(template)
        if len(parts) == 1 and isinstance(parts[0], str):
            return parts[0]
        out: list[str] = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
            else:
                value = self.lookup(part[0])
                if value is not None:
                    out.append(str(value))
        return "".join(out)

    def value(self, template: str) -> Scalar:
        """A template that is exactly one `{var}` keeps the variable's type."""
        parts = _parts(template)
        if len(parts) == 1 and isinstance(parts[0], tuple):
            return self.lookup(parts[0][0])
        return self.render(template)

    def time_of(self, template: str) -> datetime | None:
        return parse_time(self.render(template))

    # ------------------------------------------------------------ output

    def say(self, items: list[f.Item], node_id: str, refs: list[_ButtonRef] | None) -> None:
        """Render message items; card/carousel buttons get payloads of `node_id`."""
        index = 0
        for item in items:
            if isinstance(item, f.TextItem):
                text = self.render(item.text)
                if text:
                    self.out.append(Text(text=text))
            elif isinstance(item, f.CardItem):
                specs = item.card.buttons
                first = index
                index += len(specs)
                product = self.facts.product(self.render(item.card.product))
                if product is not None:
                    self.out.append(self.card(product, node_id, specs, first, refs))
            elif isinstance(item, f.CarouselItem):
                spec = item.carousel
                position = index
                if spec.button is not None:
                    index += 1
                products = self._carousel_products(spec)
                if products:
                    buttons = [spec.button] if spec.button is not None else []
                    cards = [self.card(p, node_id, buttons, position, refs) for p in products]
                    self.out.append(Carousel(text=self.render(spec.text), cards=cards))
            elif isinstance(item, f.CountdownItem):
                to = self.time_of(item.countdown.to)
                if to is not None:
                    tz = self.facts.event.timezone if self.facts.event else None
                    self.out.append(Countdown(text=self.render(item.countdown.text), to=to, tz=tz))
            elif isinstance(item, f.ImageItem):
                url = self.render(item.image.url)
                if url:
                    self.out.append(Image(url=url, alt=self.render(item.image.alt)))
            elif isinstance(item, f.TicketItem):
                secret = self.state.secrets.get("ticket_secret")
                page = self.state.secrets.get("ticket_url")
                if secret and page:
                    self.out.append(
                        QrTicket(text=self.render(item.ticket.text), secret=secret, url=page)
                    )

    def _carousel_products(self, spec: f.CarouselSpec) -> list[ProductFact]:
        if spec.products == "all":
            found = list(self.facts.products)
        else:
            found = []
            for ref in spec.products:
                product = self.facts.product(self.render(ref))
                if product is not None and product not in found:
                    found.append(product)
        if spec.only_available:
            found = [p for p in found if p.available > 0]
        return found[: spec.max]

    def card(
        self,
        product: ProductFact,
        node_id: str,
        specs: list[f.ButtonSpec],
        first: int,
        refs: list[_ButtonRef] | None,
    ) -> Card:
        buttons: list[Button] = []
        for offset, spec in enumerate(specs):
            if product.available <= 0 and not spec.when_sold_out:
                continue
            if spec.url is not None:
                buttons.append(Button(label=self.render(spec.label), url=self.render(spec.url)))
            elif refs is not None:
                payload = f"{node_id}:{first + offset}:{product.id}"
                buttons.append(Button(label=self.render(spec.label), payload=payload))
        self.effects.append(RecordActivityEffect("card_viewed", ref=str(product.id)))
        return card_of(product, buttons=buttons)

    def quick_replies(self, node_id: str, specs: list[f.ButtonSpec], first: int) -> None:
        buttons: list[Button] = []
        for offset, spec in enumerate(specs):
            if spec.url is not None:
                buttons.append(Button(label=self.render(spec.label), url=self.render(spec.url)))
            else:
                buttons.append(
                    Button(label=self.render(spec.label), payload=f"{node_id}:{first + offset}")
                )
        self.attach(buttons)

    def attach(self, buttons: list[Button]) -> None:
        """Put buttons under the last text said, or on their own."""
        if not buttons:
            return
        if self.out and isinstance(self.out[-1], Text):
            last = self.out.pop()
            assert isinstance(last, Text)
            self.out.append(Buttons(text=last.text, buttons=buttons))
        else:
            self.out.append(Buttons(text="", buttons=buttons))

    # ------------------------------------------------------------ prompts

    def prompt(self, node_id: str, node: f._Node) -> None:
        if isinstance(node, f.MessageNode | f.ChoiceNode):
            refs = _button_refs(node)
            self.say(node.say, node_id, refs)
            quick = node.buttons if isinstance(node, f.MessageNode) else node.options
            self.quick_replies(node_id, quick, len(refs) - len(quick))
        elif isinstance(node, f.SlotNode):
            self.say(node.say, node_id, None)
            self.attach(
                [
                    Button(label=self.slot_label(slot, True), payload=f"{node_id}:0:{slot.id}")
                    for slot in self.open_slots(node)
                ]
            )
        elif isinstance(node, f.SurveyNode):
            self.say(node.say, node_id, None)
            self.attach(
                [
                    Button(label=str(score), payload=f"{node_id}:0:{score}")
                    for score in range(node.min, node.max + 1)
                ]
            )
        elif isinstance(node, f._Input):
            self.say(node.say, node_id, None)

    def open_slots(self, node: f.SlotNode) -> list[SlotFact]:
        now = self.facts.now
        slots = [s for s in self.facts.slots if s.ends_at > now]
        if node.only_available:
            slots = [s for s in slots if s.free >= node.places]
        return sorted(slots, key=lambda s: (s.starts_at, s.id))[: node.max]

    def slot_label(self, slot: SlotFact, with_free: bool) -> str:
        tz = self.facts.event.timezone if self.facts.event else "UTC"
        label = localtime.slot_label(slot.starts_at, slot.ends_at, tz, slot.label)
        return f"{label} ({slot.free} left)" if with_free else label

    # ------------------------------------------------------------ running

    def run(self, node_id: str | None) -> None:
        while node_id is not None:
            if self.state.turn_steps >= MAX_STEPS:
                self.fail("step_limit")
                return
            self.state.turn_steps += 1
            node_id = self.enter(node_id)

    def fail(self, why: str, message: str | None = None) -> None:
        state = self.state
        state.status = ConversationStatus.ERROR
        state.pending = None
        state.wake_at = None
        self.out.append(Text(text=message or self.render(self.flow.error_text)))
        self.effects.append(RecordActivityEffect("error", ref=why))

    def restart(self, entry: str) -> str:
        state = self.state
        keep = {k: state.vars[k] for k in PERSISTENT_VARS if state.vars.get(k) is not None}
        state.vars = {**self.flow.vars, **keep}
        state.status = ConversationStatus.ACTIVE
        state.tries = 0
        state.pending = None
        state.wake_at = None
        state.numbered = []
        self.effects.append(RecordActivityEffect("chat_started"))
        return entry

    def schedule(self, at: datetime, reason: Literal["wait", "timeout"]) -> None:
        self.state.wake_at = at
        self.effects.append(ScheduleEffect(at, reason))

    def wait_for_input(self, node: f._Input) -> None:
        self.state.status = ConversationStatus.WAITING_INPUT
        if node.timeout is not None:
            self.schedule(self.facts.now + timedelta(seconds=node.timeout.seconds), "timeout")

    def enter(self, node_id: str) -> str | None:
        node = self.flow.nodes.get(node_id)
        state = self.state
        if node is None:
            self.fail("unknown_node")
            return None
        state.node = node_id
        state.tries = 0
        state.wake_at = None
        state.status = ConversationStatus.ACTIVE
        self.visited.append(node_id)
        if isinstance(node, f.MessageNode):
            self.prompt(node_id, node)
            if node.waits():
                self.wait_for_input(node)
                return None
            if node.next is None:
                state.status = ConversationStatus.DONE
            return node.next
        if isinstance(node, f.SlotNode):
            if not self.open_slots(node):
                target = node.none_next or node.fallback
                if target is None:
                    self.fail("no_slot")
                return target
            self.prompt(node_id, node)
            self.wait_for_input(node)
            return None
        if isinstance(node, f._Input):
            self.prompt(node_id, node)
            self.wait_for_input(node)
            return None
        if isinstance(node, f.ConditionNode):
            for branch in node.branches:
                if all(self.test(t) for t in branch.when):
                    return branch.next
            return node.else_
        if isinstance(node, f.JumpNode):
            return node.to
        if isinstance(node, f.SetNode):
            for name, raw in node.vars.items():
                state.vars[name] = self.value(raw) if isinstance(raw, str) else raw
            return node.next
        if isinstance(node, f._Action):
            return self.act(node_id, node)
        if isinstance(node, f.ReleaseNode):
            hold_id = _as_int(self.value(node.hold))
            if hold_id is not None:
                self.effects.append(ReleaseEffect(hold_id))
            state.vars.pop("hold_id", None)
            return node.next
        if isinstance(node, f.TagNode):
            self.effects.append(TagEffect(tuple(node.tags)))
            return node.next
        if isinstance(node, f.GrantConsentNode):
            self.effects.append(GrantConsentEffect(node.channel, self.render(node.wording)))
            return node.next
        if isinstance(node, f.HandoffNode):
            self.say(node.say, node_id, None)
            self.effects.append(HandoffEffect(node.reason))
            self.effects.append(RecordActivityEffect("handoff", ref=node.reason or None))
            state.status = ConversationStatus.HANDED_OFF
            return None
        if isinstance(node, f.WaitNode):
            self.say(node.say, node_id, None)
            if node.seconds is not None:
                at: datetime | None = self.facts.now + timedelta(seconds=node.seconds)
            else:
                assert node.until is not None
                base = self.time_of(node.until)
                at = base + timedelta(seconds=node.offset) if base is not None else None
            if at is None or at <= self.facts.now:
                return node.next  # an unknown or past time: nothing to wait for
            state.status = ConversationStatus.WAITING_UNTIL
            self.schedule(at, "wait")
            return None
        if isinstance(node, f.EndNode):
            self.say(node.say, node_id, None)
            state.status = ConversationStatus.DONE
            return None
        self.fail("unknown_node_type")
        return None

    # ------------------------------------------------------------ actions

    def act(self, node_id: str, node: f._Action) -> str | None:
        state = self.state
        key = f"{node_id}#{state.seq}"
        effect: AwaitedEffect | None = None
        problem = "this step is missing what it needs"
        if isinstance(node, f.RsvpNode):
            slot_id = _as_int(self.value(node.slot))
            places = _as_int(self.value(node.places)) or 1
            email = self.render(node.email) or None
            phone = self.render(node.phone) or None
            if slot_id is None:
                problem = "pick a time slot first"
            elif email is None and phone is None:
                problem = "we need your email or phone number first"
            else:
                effect = RsvpEffect(
                    key,
                    slot_id,
                    places,
                    email,
                    phone,
                    self.render(node.consent_text),
                    node.waitlist,
                )
        elif isinstance(node, f.HoldNode):
            product = self.facts.product(self.render(node.product))
            product_id = product.id if product else _as_int(self.value(node.product))
            qty = _as_int(self.value(node.qty)) or 1
            slot = _as_int(self.value(node.slot)) if node.slot is not None else None
            variant = self.render(node.variant) if node.variant is not None else None
            if product_id is None:
                problem = "pick a product first"
            else:
                effect = HoldEffect(key, product_id, variant or None, qty, slot)
        elif isinstance(node, f.IssueVoucherNode):
            effect = IssueVoucherEffect(key, node.batch, node.create)
        elif isinstance(node, f.CheckoutLinkNode):
            hold_id = _as_int(self.value(node.hold))
            if hold_id is None:
                problem = "reserve an item first"
            else:
                effect = CheckoutLinkEffect(key, hold_id)
        elif isinstance(node, f.SendTicketNode):
            default = "{rsvp_id}" if node.subject == "rsvp" else "{hold_id}"
            subject_id = _as_int(self.value(node.id or default))
            if subject_id is None:
                problem = "there is no ticket to send yet"
            else:
                effect = SendTicketEffect(key, node.subject, subject_id)
        if effect is None:
            failed = EffectResult(ok=False, reason="invalid_request", message=problem)
            return self.after(node, failed)
        state.seq += 1
        state.pending = key
        self.effects.append(effect)
        return None

    def after(self, node: f._Action, result: EffectResult) -> str | None:
        state = self.state
        if result.ok:
            state.vars.update(result.data)
            state.vars.pop("error_reason", None)
            state.vars.pop("error_message", None)
            state.secrets.update(result.secrets)
            activity = ACTIVITY_OF.get(type(node))
            if activity is not None:
                ref = next((str(v) for v in result.data.values() if v is not None), None)
                self.effects.append(RecordActivityEffect(activity, ref=ref))
            if isinstance(node, f.SendTicketNode):
                secret = result.secrets.get("ticket_secret")
                url = result.secrets.get("ticket_url")
                if secret and url:
                    self.out.append(QrTicket(text=self.render(node.text), secret=secret, url=url))
            if isinstance(node, f.CheckoutLinkNode):
                url = result.secrets.get("checkout_url")
                if url:
                    self.attach([Button(label=self.render(node.text), url=url)])
            return node.next
        reason = result.reason or "failed"
        state.vars["error_reason"] = reason
        state.vars["error_message"] = result.message
        target = node.on_reason.get(reason) or node.on_fail
        if target is None:
            self.fail(reason, result.message or None)
        return target

    # ------------------------------------------------------------ conditions

    def test(self, test: f.Test) -> bool:
        if isinstance(test, f.VarTest):
            value = self.lookup(test.var)
            if test.set is not None and (value not in (None, "")) != test.set:
                return False
            if test.equals is not None and not _same(value, test.equals):
                return False
            if test.one_of is not None and not any(_same(value, v) for v in test.one_of):
                return False
            if test.gte is not None or test.lte is not None:
                number = _number(value)
                if number is None:
                    return False
                if test.gte is not None and number < test.gte:
                    return False
                if test.lte is not None and number > test.lte:
                    return False
            return True
        if isinstance(test, f.AvailableTest):
            spec = test.available
            if spec.product is not None:
                product = self.facts.product(self.render(spec.product))
                return product is not None and product.available >= spec.min
            slot_id = _as_int(self.value(spec.slot or ""))
            slot = self.facts.slot(slot_id) if slot_id is not None else None
            return slot is not None and slot.free >= spec.min and slot.ends_at > self.facts.now
        if isinstance(test, f.SegmentTest):
            return test.segment in self.facts.segments
        if isinstance(test, f.TimeTest):
            now = self.facts.now
            after = self.time_of(test.time.after) if test.time.after else None
            before = self.time_of(test.time.before) if test.time.before else None
            if test.time.after and (after is None or now < after):
                return False
            return not (test.time.before and (before is None or now >= before))
        return False

    # ------------------------------------------------------------ inbound

    def resolve_payload(self, inbound: Inbound) -> str | None:
        """The button payload an inbound stands for: a button, or "2" for numbered option 2."""
        if inbound.kind == "button":
            return inbound.payload
        numbered = self.state.numbered
        text = inbound.text.strip()
        if numbered and text.isdecimal() and len(text) <= 3 and 1 <= int(text) <= len(numbered):
            return numbered[int(text) - 1]
        return None

    def on_input(self, node_id: str, node: f._Input, inbound: Inbound) -> object:
        """The node to go to for this answer, `_RETRY` to re-ask."""
        payload = self.resolve_payload(inbound)
        button: tuple[int, str | None] | None = None
        if payload is not None:
            head, _, rest = payload.partition(":")
            if head != node_id:
                return _RETRY
            index_text, _, value = rest.partition(":")
            if not index_text.isdecimal() or len(index_text) > 3:
                return _RETRY
            button = (int(index_text), value or None)
        elif inbound.kind != "text":
            return _RETRY
        text = inbound.text.strip()
        vars_ = self.state.vars
        if isinstance(node, f.MessageNode | f.ChoiceNode):
            return self.on_choice(node_id, node, button, text)
        if isinstance(node, f.SlotNode):
            slots = self.open_slots(node)
            chosen: SlotFact | None = None
            if button is not None:
                slot_id = _as_int(button[1]) if button[1] else None
                chosen = next((s for s in slots if s.id == slot_id), None)
            else:
                wanted = _norm(text)
                for slot in slots:
                    labels = (
                        _norm(slot.label) if slot.label else None,
                        _norm(self.slot_label(slot, False)),
                        _norm(self.slot_label(slot, True)),
                    )
                    if wanted and wanted in labels:
                        chosen = slot
                        break
            if chosen is None:
                return _RETRY
            vars_[node.save_as] = chosen.id
            vars_["slot_label"] = self.slot_label(chosen, False)
            vars_["slot_starts_at"] = chosen.starts_at.isoformat()
            return node.next
        if isinstance(node, f.SurveyNode):
            raw = button[1] if button is not None else text
            score = _as_int(raw) if raw else None
            if score is None or not node.min <= score <= node.max:
                return _RETRY
            vars_[node.save_as] = score
            self.effects.append(SurveyAnswerEffect(node.name, score, str(score)))
            if node.next is None:
                self.state.status = ConversationStatus.DONE
            return node.next
        if button is not None:
            return _RETRY
        if isinstance(node, f.EmailNode):
            try:
                vars_[node.save_as] = normalize_email(text)
            except PopdropError:
                return _RETRY
            return node.next
        if isinstance(node, f.PhoneNode):
            try:
                vars_[node.save_as] = normalize_phone(text, node.region)
            except PopdropError:
                return _RETRY
            return node.next
        if isinstance(node, f.NumberNode):
            number = _number(text)
            if number is None or number != number or number in (float("inf"), float("-inf")):
                return _RETRY
            if node.integer and not number.is_integer():
                return _RETRY
            if (node.min is not None and number < node.min) or (
                node.max is not None and number > node.max
            ):
                return _RETRY
            vars_[node.save_as] = int(number) if node.integer else number
            return node.next
        if isinstance(node, f.TextNode):
            clean = " ".join(text.split())
            if not node.min_length <= len(clean) <= node.max_length:
                return _RETRY
            vars_[node.save_as] = clean
            return node.next
        return _RETRY

    def on_choice(
        self,
        node_id: str,
        node: f.MessageNode | f.ChoiceNode,
        button: tuple[int, str | None] | None,
        text: str,
    ) -> object:
        refs = _button_refs(node)
        chosen: _ButtonRef | None = None
        product: ProductFact | None = None
        if button is not None:
            index, value = button
            if index >= len(refs) or refs[index].spec.url is not None:
                return _RETRY
            chosen = refs[index]
            if chosen.kind != "static":
                product_id = _as_int(value) if value else None
                if product_id is None:
                    return _RETRY
                product = self.facts.product(str(product_id))
                if product is None:
                    product = ProductFact(product_id, "", "", 0, "EUR", "", 0)
        else:
            wanted = _norm(text)
            if not wanted:
                return _RETRY
            for ref in refs:
                if ref.spec.url is not None:
                    continue
                if ref.kind == "static":
                    words = [self.render(ref.spec.label), *ref.spec.aliases]
                    if any(_norm(w) == wanted for w in words):
                        chosen = ref
                        break
                    continue
                candidates = (
                    [self.facts.product(self.render(ref.product))]
                    if ref.kind == "card" and ref.product is not None
                    else list(self.facts.products)
                )
                for candidate in candidates:
                    if candidate is None:
                        continue
                    if candidate.available <= 0 and not ref.spec.when_sold_out:
                        continue
                    label = _norm(self.render(ref.spec.label))
                    title = _norm(candidate.title)
                    if wanted in (title, f"{label} {title}") or (
                        ref.kind == "card" and wanted == label
                    ):
                        chosen, product = ref, candidate
                        break
                if chosen is not None:
                    break
            if chosen is None:
                return _RETRY
        spec = chosen.spec
        vars_ = self.state.vars
        if product is not None:
            vars_["product_id"] = product.id
            if product.title:
                vars_["product_title"] = product.title
        if node.save_as is not None:
            vars_[node.save_as] = spec.value if spec.value is not None else self.render(spec.label)
        target = spec.next or node.next
        if target is None:
            self.state.status = ConversationStatus.DONE
        return target

    def on_wake(self) -> object:
        state = self.state
        if state.wake_at is None or self.facts.now < state.wake_at:
            return _STAY
        node = self.flow.nodes.get(state.node)
        if state.status == "waiting_until" and isinstance(node, f.WaitNode):
            state.wake_at = None
            return node.next
        if state.status == "waiting_input" and isinstance(node, f._Input) and node.timeout:
            state.wake_at = None
            return node.timeout.next
        return _STAY

    def reask(self, node_id: str, node: f._Input) -> str | None:
        state = self.state
        state.tries += 1
        if state.tries >= node.max_tries and node.fallback is not None:
            return node.fallback
        self.out.append(Text(text=self.render(node.retry or self.flow.retry_text)))
        self.prompt(node_id, node)
        return None


def _pressed_target(flow: f.Flow, state: ChatState, inbound: Inbound | None) -> str | None:
    """Where a quick-reply button of the node waiting for input leads ("" when it ends the
    flow), when the answer is exactly such a button; None otherwise. A browse turn (Back,
    See the drop) then reads the facts of where it goes, not of every way out of the node."""
    if inbound is None or inbound.kind != "button" or inbound.payload is None:
        return None
    if state.status != "waiting_input" or state.pending is not None:
        return None
    node = flow.nodes.get(state.node)
    if not isinstance(node, f.MessageNode | f.ChoiceNode):
        return None
    head, _, rest = inbound.payload.partition(":")
    index_text, _, _value = rest.partition(":")
    if head != state.node or not index_text.isdecimal() or len(index_text) > 3:
        return None
    refs = _button_refs(node)
    index = int(index_text)
    if index >= len(refs) or refs[index].kind != "static" or refs[index].spec.url is not None:
        return None
    return refs[index].spec.next or node.next or ""


def needs(flow: f.Flow, state: ChatState, inbound: Inbound | None) -> f.Needs:
    """The facts `step(flow, state, inbound, …)` may read, so the caller reads only those
    (the same snapshot then serves the continuations after each action)."""
    restart = (
        state.node not in flow.nodes
        or state.status in ENDED_CONVERSATION_STATUSES
        or (inbound is not None and inbound.kind == "start")
    )
    if restart:
        ref = inbound.payload if inbound is not None and inbound.kind == "start" else None
        result = flow.entry_needs(flow.entries.get(ref, flow.start) if ref else flow.start)
    elif (pressed := _pressed_target(flow, state, inbound)) is not None:
        result = flow.entry_needs(pressed) if pressed else f.NO_NEEDS
    elif state.status == "active" and state.pending is None:
        result = flow.entry_needs(state.node)
    else:
        result = flow.resume_needs(state.node)
    if inbound is not None and inbound.kind == "text":
        keyword = flow.keyword_target(inbound.text)
        if keyword is not None:
            result = result | flow.entry_needs(keyword)
    return result


def step(flow: f.Flow, state: ChatState, inbound: Inbound | None, facts: Facts) -> StepResult:
    """Advance a conversation by one inbound (or, with `inbound=None`, continue after the
    pending action's result was put in `facts.results`). Pure: see the module doc."""
    state = state.model_copy(
        update={
            "vars": dict(state.vars),
            "numbered": list(state.numbered),
            "secrets": dict(state.secrets),
        }
    )
    turn = _Turn(flow, state, facts)
    if state.node not in flow.nodes or state.status not in STATUSES:
        # A state from another flow version or a corrupted row: start over.
        state.node = flow.start
        turn.run(turn.restart(flow.start))
        return StepResult(state, turn.out, turn.effects, turn.visited)
    if inbound is None:
        if state.pending is not None:
            key, state.pending = state.pending, None
            node = flow.nodes[state.node]
            result = facts.results.get(key) or EffectResult(
                ok=False, reason="unavailable", message="this step could not be completed"
            )
            if isinstance(node, f._Action):
                turn.run(turn.after(node, result))
            else:
                turn.fail("bad_pending")
        elif state.status == "active":
            turn.run(state.node)
        return StepResult(state, turn.out, turn.effects, turn.visited)

    state.turn_steps = 0
    first = state.turns == 0
    state.turns += 1
    if state.pending is not None:  # a result that never came: the action failed
        key, state.pending = state.pending, None
        node = flow.nodes[state.node]
        if isinstance(node, f._Action):
            turn.run(turn.after(node, facts.results.get(key) or EffectResult(ok=False)))
        return StepResult(state, turn.out, turn.effects, turn.visited)
    if inbound.kind == "start":
        ref = inbound.payload
        entry = flow.entries.get(ref, flow.start) if ref else flow.start
        target = turn.restart(entry)
        if ref:
            state.vars["ref"] = ref
        turn.run(target)
        return StepResult(state, turn.out, turn.effects, turn.visited)
    if inbound.kind == "wake":
        woke = turn.on_wake()
        if isinstance(woke, str):
            turn.run(woke)
        return StepResult(state, turn.out, turn.effects, turn.visited)
    status = state.status
    if status == "handed_off":
        return StepResult(state, turn.out, turn.effects, turn.visited)
    keyword = flow.keyword_target(inbound.text) if inbound.kind == "text" else None
    if status in ENDED_CONVERSATION_STATUSES:
        turn.run(turn.restart(keyword or flow.start))
    elif keyword is not None:
        if first:
            turn.effects.append(RecordActivityEffect("chat_started"))
        turn.run(keyword)
    elif status == "active":
        if first:
            turn.effects.append(RecordActivityEffect("chat_started"))
        turn.run(state.node)
    elif status == "waiting_input":
        node = flow.nodes[state.node]
        if not isinstance(node, f._Input):
            turn.run(state.node)
        else:
            answer = turn.on_input(state.node, node, inbound)
            if answer is _RETRY:
                turn.run(turn.reask(state.node, node))
            elif isinstance(answer, str):
                turn.run(answer)
            # None: the answer ended the flow (status done)
    elif status == "waiting_until":
        node = flow.nodes[state.node]
        if isinstance(node, f.WaitNode):
            turn.say(node.reply, state.node, None)
    return StepResult(state, turn.out, turn.effects, turn.visited)
