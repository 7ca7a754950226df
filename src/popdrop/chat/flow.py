"""The flow file format: YAML validated by pydantic, with errors that name line and field.

A flow is a mapping of named nodes and a `start`. Each node has a `type` (the
discriminator): messages, inputs (which wait for the customer and re-ask on a bad answer),
conditions, actions (which ask the domain services for something and branch on the
answer), waits and jumps. `load_flow(text)` parses, validates and cross-checks a flow and
compiles what the engine and the service need per node (which facts a turn may read).
Every refusal is a `FlowError` (reason `invalid_flow`) whose message reads
`line 14: nodes.greet.buttons[2].next: unknown node 'cardz'` and whose detail lists all
errors as `{"line", "field", "message"}`.

Docs and a short example: docs/chat.md. JSON Schema: `flow_json_schema()` (published as
docs/chat-flow.schema.json).

Over 900 lines on purpose: it is one concern, the flow format. Every node type's schema,
the cross-checks between nodes and the published JSON Schema are generated from the same
pydantic models, which must be read together.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from popdrop.core.errors import PopdropError

FLOWS_DIR = Path(__file__).resolve().parent / "flows"
SCHEMA_PATH = Path(__file__).resolve().parents[3] / "docs" / "chat-flow.schema.json"
MAX_NODES = 500
MAX_ERRORS = 20
# A published file comes from the API: YAML aliases may not expand (pydantic walks every
# copy) past this many values, nor nest deeper than this.
MAX_EXPANDED = 100_000
MAX_DEPTH = 40

Loc = tuple[str | int, ...]
Scalar = str | int | float | bool | None


class FlowError(PopdropError):
    """A flow file that cannot run: every error with its line and dotted field path."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        first = errors[0]
        message = _format_error(first)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        super().__init__("invalid_flow", message, status=422, detail={"errors": errors})
        self.errors = errors


def _format_error(error: dict[str, Any]) -> str:
    where = f"line {error['line']}: " if error.get("line") else ""
    field = f"{error['field']}: " if error.get("field") else ""
    return f"{where}{field}{error['message']}"


# ---------------------------------------------------------------- shared field types


def _scalar(value: Any) -> Scalar:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise ValueError("a variable holds text, a number, true/false or null")


def _template(value: Any) -> Any:
    """Numbers given where a template is expected are taken as their text (`slot: 12`)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


NodeId = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_\-]{0,39}$")]
VarName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")]
Template = Annotated[
    str,
    BeforeValidator(_template),
    Field(max_length=2000),
    WithJsonSchema(
        {"anyOf": [{"type": "string", "maxLength": 2000}, {"type": "number"}]},
        mode="validation",
    ),
]
ScalarValue = Annotated[Any, AfterValidator(_scalar)]
Seconds = Annotated[int, Field(ge=1, le=366 * 86400)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ButtonSpec(_Spec):
    """A quick reply: goes to `next` (or the node's `next`) and stores `value` in the node's
    `save_as`; or a link button (`url`) that opens a page."""

    label: Template = Field(min_length=1, max_length=200)
    next: NodeId | None = None
    value: ScalarValue = None
    url: Template | None = None
    aliases: list[Annotated[str, Field(max_length=100)]] = Field(
        default_factory=list, description="Other words a customer may type for this button"
    )
    when_sold_out: bool = Field(
        default=False, description="On a product card: keep the button when it is sold out"
    )


# ---------------------------------------------------------------- message items


class TextItem(_Spec):
    TAG: ClassVar[str] = "text"
    text: Template


class CardSpec(_Spec):
    product: Template = Field(description="Product id or variant SKU (of the bound event)")
    buttons: list[ButtonSpec] = Field(default_factory=list, max_length=3)


class CardItem(_Spec):
    TAG: ClassVar[str] = "card"
    card: CardSpec


class CarouselSpec(_Spec):
    text: Template = ""
    products: list[Template] | Literal["all"] = "all"
    only_available: bool = False
    max: int = Field(default=10, ge=1, le=30)
    button: ButtonSpec | None = None


class CarouselItem(_Spec):
    TAG: ClassVar[str] = "carousel"
    carousel: CarouselSpec


class CountdownSpec(_Spec):
    to: Template = Field(description="An ISO time or a template such as {event.starts_at}")
    text: Template = ""


class CountdownItem(_Spec):
    TAG: ClassVar[str] = "countdown"
    countdown: CountdownSpec


class ImageSpec(_Spec):
    url: Template
    alt: Template = ""


class ImageItem(_Spec):
    TAG: ClassVar[str] = "image"
    image: ImageSpec


class TicketSpec(_Spec):
    text: Template = "Your ticket: show this QR code at the door."


class TicketItem(_Spec):
    """Shows the QR ticket a `send_ticket` node fetched earlier in the same turn."""

    TAG: ClassVar[str] = "ticket"
    ticket: TicketSpec


_ITEM_TAGS = ("text", "card", "carousel", "countdown", "image", "ticket")


def _item_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((tag for tag in _ITEM_TAGS if tag in value), None)
    tag = getattr(value, "TAG", None)
    return tag if isinstance(tag, str) else None


Item = Annotated[
    Annotated[TextItem, Tag("text")]
    | Annotated[CardItem, Tag("card")]
    | Annotated[CarouselItem, Tag("carousel")]
    | Annotated[CountdownItem, Tag("countdown")]
    | Annotated[ImageItem, Tag("image")]
    | Annotated[TicketItem, Tag("ticket")],
    Discriminator(
        _item_tag,
        custom_error_type="invalid_message",
        custom_error_message="a message is one of: " + ", ".join(_ITEM_TAGS),
    ),
]


def _say(value: Any) -> Any:
    """`say: "Hello"` and `say: {card: …}` are shorthands for a one-item list."""
    if isinstance(value, str):
        return [{"text": value}]
    if isinstance(value, dict):
        return [value]
    return value


Say = Annotated[list[Item], BeforeValidator(_say), Field(max_length=20)]


# ---------------------------------------------------------------- conditions


class VarTest(_Spec):
    TAG: ClassVar[str] = "var"
    var: VarName
    equals: ScalarValue = None
    one_of: list[ScalarValue] | None = None
    set: bool | None = Field(default=None, description="true: the variable has a value")
    gte: float | None = None
    lte: float | None = None


class AvailableSpec(_Spec):
    product: Template | None = None
    slot: Template | None = None
    min: int = Field(default=1, ge=1, le=10_000)

    @model_validator(mode="after")
    def _one_target(self) -> AvailableSpec:
        if (self.product is None) == (self.slot is None):
            raise ValueError("give either product or slot")
        return self


class AvailableTest(_Spec):
    TAG: ClassVar[str] = "available"
    available: AvailableSpec


class SegmentTest(_Spec):
    TAG: ClassVar[str] = "segment"
    segment: Annotated[str, Field(min_length=1, max_length=200)]


class TimeSpec(_Spec):
    after: Template | None = None
    before: Template | None = None


class TimeTest(_Spec):
    TAG: ClassVar[str] = "time"
    time: TimeSpec


_TEST_TAGS = ("var", "available", "segment", "time")


def _test_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((tag for tag in _TEST_TAGS if tag in value), None)
    tag = getattr(value, "TAG", None)
    return tag if isinstance(tag, str) else None


Test = Annotated[
    Annotated[VarTest, Tag("var")]
    | Annotated[AvailableTest, Tag("available")]
    | Annotated[SegmentTest, Tag("segment")]
    | Annotated[TimeTest, Tag("time")],
    Discriminator(
        _test_tag,
        custom_error_type="invalid_test",
        custom_error_message="a test is one of: " + ", ".join(_TEST_TAGS),
    ),
]


def _tests(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value


class Branch(_Spec):
    when: Annotated[list[Test], BeforeValidator(_tests), Field(min_length=1)] = Field(
        description="One test, or a list of tests that must all pass"
    )
    next: NodeId


# ---------------------------------------------------------------- nodes


class _Node(_Spec):
    note: str = Field(default="", max_length=2000, description="A comment for flow authors")
    BLOCKING: ClassVar[bool] = False

    def targets(self) -> Iterator[tuple[Loc, str]]:
        next_ = getattr(self, "next", None)
        if next_ is not None:
            yield ("next",), next_

    def items(self) -> list[Any]:
        return list(getattr(self, "say", []) or [])


class Timeout(_Spec):
    seconds: Seconds
    next: NodeId


class _Input(_Node):
    """Waits for the customer; a bad answer re-asks (`retry`), `max_tries` then `fallback`."""

    BLOCKING: ClassVar[bool] = True
    say: Say = Field(default_factory=list)
    max_tries: int = Field(default=3, ge=1, le=20)
    retry: Template | None = None
    fallback: NodeId | None = None
    timeout: Timeout | None = None

    def targets(self) -> Iterator[tuple[Loc, str]]:
        yield from super().targets()
        if self.fallback is not None:
            yield ("fallback",), self.fallback
        if self.timeout is not None:
            yield ("timeout", "next"), self.timeout.next
        for index, item in enumerate(self.say):
            if isinstance(item, CardItem):
                for b, button in enumerate(item.card.buttons):
                    if button.next is not None:
                        yield ("say", index, "card", "buttons", b, "next"), button.next
            elif isinstance(item, CarouselItem) and item.carousel.button is not None:
                target = item.carousel.button.next
                if target is not None:
                    yield ("say", index, "carousel", "button", "next"), target


class MessageNode(_Input):
    """Says `say`; with buttons (its own or on cards) it waits for a choice, else goes on."""

    type: Literal["message"]
    buttons: list[ButtonSpec] = Field(default_factory=list, max_length=20)
    save_as: VarName | None = None
    next: NodeId | None = None

    def targets(self) -> Iterator[tuple[Loc, str]]:
        yield from super().targets()
        for index, button in enumerate(self.buttons):
            if button.next is not None:
                yield ("buttons", index, "next"), button.next

    def waits(self) -> bool:
        if self.buttons:
            return True
        for item in self.say:
            if isinstance(item, CardItem) and item.card.buttons:
                return True
            if isinstance(item, CarouselItem) and item.carousel.button is not None:
                return True
        return False


class ChoiceNode(_Input):
    type: Literal["choice"]
    options: list[ButtonSpec] = Field(min_length=1, max_length=20)
    save_as: VarName | None = None
    next: NodeId | None = None

    def targets(self) -> Iterator[tuple[Loc, str]]:
        yield from super().targets()
        for index, button in enumerate(self.options):
            if button.next is not None:
                yield ("options", index, "next"), button.next


class EmailNode(_Input):
    type: Literal["email"]
    save_as: VarName = "email"
    next: NodeId


class PhoneNode(_Input):
    type: Literal["phone"]
    save_as: VarName = "phone"
    region: str | None = Field(default=None, pattern=r"^[A-Z]{2}$")
    next: NodeId


class NumberNode(_Input):
    type: Literal["number"]
    save_as: VarName = "number"
    min: float | None = None
    max: float | None = None
    integer: bool = True
    next: NodeId


class TextNode(_Input):
    type: Literal["text"]
    save_as: VarName = "answer"
    min_length: int = Field(default=1, ge=0, le=2000)
    max_length: int = Field(default=500, ge=1, le=2000)
    next: NodeId


class SlotNode(_Input):
    """Offers the bound event's upcoming slots as buttons (with places left)."""

    type: Literal["slot"]
    save_as: VarName = "slot_id"
    places: int = Field(default=1, ge=1, le=10)
    only_available: bool = True
    max: int = Field(default=10, ge=1, le=30)
    next: NodeId
    none_next: NodeId | None = Field(default=None, description="No slot has room")

    def targets(self) -> Iterator[tuple[Loc, str]]:
        yield from super().targets()
        if self.none_next is not None:
            yield ("none_next",), self.none_next


class SurveyNode(_Input):
    """A one-question survey on a scale (NPS: 0 to 10); the answer is recorded."""

    type: Literal["survey"]
    name: Annotated[str, Field(min_length=1, max_length=40)] = "nps"
    min: int = Field(default=0, ge=0, le=100)
    max: int = Field(default=10, ge=1, le=100)
    save_as: VarName = "score"
    next: NodeId | None = None


class ConditionNode(_Node):
    type: Literal["condition"]
    branches: list[Branch] = Field(min_length=1, max_length=50)
    else_: NodeId = Field(alias="else")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def targets(self) -> Iterator[tuple[Loc, str]]:
        for index, branch in enumerate(self.branches):
            yield ("branches", index, "next"), branch.next
        yield ("else",), self.else_


class _Action(_Node):
    """Asks the domain services for something; `next` on success, else `on_reason[reason]`
    or `on_fail` (variables `error_reason` and `error_message` say why)."""

    next: NodeId
    on_fail: NodeId | None = None
    on_reason: dict[Annotated[str, Field(max_length=40)], NodeId] = Field(default_factory=dict)

    def targets(self) -> Iterator[tuple[Loc, str]]:
        yield from super().targets()
        if self.on_fail is not None:
            yield ("on_fail",), self.on_fail
        for reason, target in self.on_reason.items():
            yield ("on_reason", reason), target


class RsvpNode(_Action):
    """RSVP the customer to a slot; sets rsvp_id, rsvp_status (and a ticket for send_ticket)."""

    type: Literal["rsvp"]
    slot: Template = "{slot_id}"
    places: Template = "1"
    email: Template = "{email}"
    phone: Template = "{phone}"
    consent_text: Template = Field(min_length=1)
    waitlist: bool = False


class HoldNode(_Action):
    """Reserve units of a product (a hold with the event's TTL); sets hold_id."""

    type: Literal["hold"]
    product: Template = "{product_id}"
    variant: Template | None = None
    qty: Template = "1"
    slot: Template | None = None


class ReleaseNode(_Node):
    type: Literal["release"]
    hold: Template = "{hold_id}"
    next: NodeId


class DiscountSpec(_Spec):
    """The batch a flow issues from, created on first use when no batch has the tag."""

    kind: Literal["percent", "fixed", "free_item"] = "percent"
    value: int = Field(default=10, ge=0, le=10**9)
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")
    description: str = Field(default="", max_length=500)
    ttl_seconds: int | None = Field(default=7 * 86400, ge=60, le=366 * 86400)
    per_contact_limit: int | None = Field(default=1, ge=1, le=1000)


class IssueVoucherNode(_Action):
    """A single-use code from the batch tagged `batch` (one per customer: asking again
    gives the same code); sets voucher_code for this turn's messages."""

    type: Literal["issue_voucher"]
    batch: Annotated[str, Field(min_length=1, max_length=64)]
    create: DiscountSpec | None = None


class CheckoutLinkNode(_Action):
    type: Literal["checkout_link"]
    hold: Template = "{hold_id}"
    text: Template = "Pay now"


class SendTicketNode(_Action):
    """Sends the QR ticket of the RSVP (or hold) of this conversation."""

    type: Literal["send_ticket"]
    subject: Literal["rsvp", "hold"] = "rsvp"
    id: Template | None = Field(default=None, description="Default: {rsvp_id} / {hold_id}")
    text: Template = "Your ticket: show this QR code at the door."


class TagNode(_Node):
    type: Literal["tag"]
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(min_length=1)
    next: NodeId


class GrantConsentNode(_Node):
    type: Literal["grant_consent"]
    channel: Literal["email", "sms", "chat"] | None = Field(
        default=None, description="Default: the conversation's own channel"
    )
    wording: Template = Field(min_length=1)
    next: NodeId


class HandoffNode(_Node):
    """Hands the conversation to a host; `next` is where it resumes when handed back."""

    BLOCKING: ClassVar[bool] = True
    type: Literal["handoff"]
    say: Say = Field(default_factory=list)
    reason: Annotated[str, Field(max_length=200)] = ""
    next: NodeId | None = None


class WaitNode(_Node):
    """Waits `seconds`, or until a time (`until`, plus `offset` seconds, may be negative);
    `reply` answers a customer who writes meanwhile (the wait goes on)."""

    BLOCKING: ClassVar[bool] = True
    type: Literal["wait"]
    say: Say = Field(default_factory=list)
    seconds: Seconds | None = None
    until: Template | None = None
    offset: int = Field(default=0, ge=-366 * 86400, le=366 * 86400)
    reply: Say = Field(default_factory=list)
    next: NodeId

    @model_validator(mode="after")
    def _one_time(self) -> WaitNode:
        if (self.seconds is None) == (self.until is None):
            raise ValueError("give either seconds or until")
        return self

    def items(self) -> list[Any]:
        return [*self.say, *self.reply]


class JumpNode(_Node):
    type: Literal["jump"]
    to: NodeId

    def targets(self) -> Iterator[tuple[Loc, str]]:
        yield ("to",), self.to


class SetNode(_Node):
    type: Literal["set"]
    vars: dict[VarName, ScalarValue] = Field(min_length=1)
    next: NodeId


class EndNode(_Node):
    BLOCKING: ClassVar[bool] = True
    type: Literal["end"]
    say: Say = Field(default_factory=list)


Node = Annotated[
    MessageNode
    | ChoiceNode
    | EmailNode
    | PhoneNode
    | NumberNode
    | TextNode
    | SlotNode
    | SurveyNode
    | ConditionNode
    | RsvpNode
    | HoldNode
    | ReleaseNode
    | IssueVoucherNode
    | CheckoutLinkNode
    | SendTicketNode
    | TagNode
    | GrantConsentNode
    | HandoffNode
    | WaitNode
    | JumpNode
    | SetNode
    | EndNode,
    Field(discriminator="type"),
]


@dataclass(frozen=True, slots=True)
class Needs:
    """Facts a turn may read: the event's products and slots, segment memberships."""

    products: bool = False
    slots: bool = False
    segments: frozenset[str] = frozenset()

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            self.products or other.products,
            self.slots or other.slots,
            self.segments | other.segments,
        )


NO_NEEDS = Needs()


class Flow(_Spec):
    format: Literal[1] = 1
    title: Annotated[str, Field(max_length=200)] = ""
    start: NodeId
    session_ttl: int = Field(
        default=86400, ge=60, le=90 * 86400, description="Seconds of silence before a fresh start"
    )
    vars: dict[VarName, ScalarValue] = Field(default_factory=dict)
    keywords: dict[Annotated[str, Field(min_length=1, max_length=40)], NodeId] = Field(
        default_factory=dict, description="A whole message equal to a keyword jumps to its node"
    )
    entries: dict[Annotated[str, Field(min_length=1, max_length=64)], NodeId] = Field(
        default_factory=dict, description="Deep-link / QR payloads (?ref=, /start) → node"
    )
    retry_text: Template = "Sorry, I did not get that."
    error_text: Template = "Sorry, something went wrong. A host will get back to you."
    nodes: dict[NodeId, Node] = Field(min_length=1, max_length=MAX_NODES)

    _entry_needs: dict[str, Needs] = PrivateAttr(default_factory=dict)
    _resume_needs: dict[str, Needs] = PrivateAttr(default_factory=dict)
    _keywords: dict[str, str] = PrivateAttr(default_factory=dict)

    def entry_needs(self, node_id: str) -> Needs:
        """What entering `node_id` may read: it and every node reached from it without
        waiting for the customer."""
        return self._entry_needs.get(node_id, NO_NEEDS)

    def resume_needs(self, node_id: str) -> Needs:
        """What answering the node waiting at `node_id` may read (its own prompt, when it
        asks again, and entering any node it leads to)."""
        return self._resume_needs.get(node_id, NO_NEEDS)

    def keyword_target(self, text: str) -> str | None:
        return self._keywords.get(text.strip().casefold()) if self._keywords else None

    def compiled(self) -> dict[str, Any]:
        """The validated flow as JSON data (stored next to the source)."""
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        return data


def is_blocking(node: _Node) -> bool:
    if isinstance(node, MessageNode):
        return node.waits()
    return node.BLOCKING


def _own_needs(node: _Node) -> Needs:
    products = slots = False
    segments: set[str] = set()
    for item in node.items():
        if isinstance(item, CardItem | CarouselItem):
            products = True
    if isinstance(node, SlotNode):
        slots = True
    if isinstance(node, ConditionNode):
        for branch in node.branches:
            for test in branch.when:
                if isinstance(test, AvailableTest):
                    products = products or test.available.product is not None
                    slots = slots or test.available.slot is not None
                elif isinstance(test, SegmentTest):
                    segments.add(test.segment)
    return Needs(products, slots, frozenset(segments))


def _compile(flow: Flow) -> Flow:
    """Per node, the facts a turn may read (see `Flow.entry_needs` / `resume_needs`)."""
    own = {node_id: _own_needs(node) for node_id, node in flow.nodes.items()}
    succ = {node_id: [t for _, t in node.targets()] for node_id, node in flow.nodes.items()}
    blocking = {node_id: is_blocking(node) for node_id, node in flow.nodes.items()}

    def entered(start: str) -> Needs:
        needs, seen, todo = NO_NEEDS, {start}, [start]
        while todo:
            current = todo.pop()
            needs = needs | own[current]
            if blocking[current]:
                continue
            for target in succ[current]:
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return needs

    on_entry = {node_id: entered(node_id) for node_id in flow.nodes}
    resume: dict[str, Needs] = {}
    for node_id in flow.nodes:
        needs = own[node_id]
        for target in succ[node_id]:
            needs = needs | on_entry[target]
        resume[node_id] = needs
    flow._entry_needs = on_entry
    flow._resume_needs = resume
    flow._keywords = {word.strip().casefold(): target for word, target in flow.keywords.items()}
    return flow


# ---------------------------------------------------------------- loading


def _field_path(parts: list[str | int]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


NODE_CLASSES: tuple[type[_Node], ...] = (
    MessageNode,
    ChoiceNode,
    EmailNode,
    PhoneNode,
    NumberNode,
    TextNode,
    SlotNode,
    SurveyNode,
    ConditionNode,
    RsvpNode,
    HoldNode,
    ReleaseNode,
    IssueVoucherNode,
    CheckoutLinkNode,
    SendTicketNode,
    TagNode,
    GrantConsentNode,
    HandoffNode,
    WaitNode,
    JumpNode,
    SetNode,
    EndNode,
)
NODE_TYPES: dict[str, type[_Node]] = {
    str(get_args(cls.model_fields["type"].annotation)[0]): cls for cls in NODE_CLASSES
}
_NODE_TAGS = frozenset(NODE_TYPES)
_UNION_TAGS = _NODE_TAGS | frozenset(_ITEM_TAGS) | frozenset(_TEST_TAGS)


def _locate(root: yaml.Node | None, loc: Loc) -> tuple[int | None, str]:
    """The line of the deepest YAML node `loc` reaches, and its dotted path. Pydantic puts
    union tags (a node's type, a message kind) into `loc`: those are skipped."""
    node = root
    line = root.start_mark.line + 1 if root is not None else None
    path: list[str | int] = []
    last = len(loc) - 1
    for position, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            match = next(
                (
                    (key, value)
                    for key, value in node.value
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part)
                ),
                None,
            )
            if match is not None:
                key, node = match
                line = key.start_mark.line + 1
                path.append(part)
                continue
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
            path.append(part)
            continue
        if isinstance(part, str) and part in _UNION_TAGS and position != last:
            continue
        path.append(part)
        node = None
    return line, _field_path(path)


def _duplicates(node: yaml.Node, loc: list[str | int], found: list[tuple[Loc, int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key)
            if name in seen:
                found.append(((*loc, name), key.start_mark.line + 1))
            seen.add(name)
            _duplicates(value, [*loc, name], found)
    elif isinstance(node, yaml.SequenceNode):
        for index, value in enumerate(node.value):
            _duplicates(value, [*loc, index], found)


class _FlowLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. In YAML 1.1 `yes`, `no`, `on`, `y` are booleans,
    which would turn a button alias "yes" or a node named `no` into true/false."""


_FlowLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_FlowLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _check_size(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand past `MAX_EXPANDED` values or that nests
    deeper than `MAX_DEPTH` (sizes memoised per node: linear in the text, not the copies)."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            raise FlowError(
                [{"line": node.start_mark.line + 1, "field": "", "message": "nested too deeply"}]
            )
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if done:
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            if size[id(node)] > MAX_EXPANDED:
                message = f"too large: aliases expand to more than {MAX_EXPANDED} values"
                raise FlowError(
                    [{"line": node.start_mark.line + 1, "field": "", "message": message}]
                )
        elif id(node) not in size:
            stack.append((node, depth, True))
            stack.extend((c, depth + 1, False) for c in children if id(c) not in size)


def _parse(text: str) -> tuple[yaml.Node | None, Any]:
    try:
        loader = _FlowLoader(text)
    except yaml.YAMLError as exc:  # a character YAML does not allow (read up front)
        raise FlowError([{"line": None, "field": "", "message": f"bad YAML: {exc}"}]) from exc
    try:
        root = loader.get_single_node()
        if root is not None:
            _check_size(root)
        data = loader.construct_document(root) if root is not None else None
        return root, data
    except RecursionError as exc:
        deep = {"line": None, "field": "", "message": "bad YAML: nested too deeply"}
        raise FlowError([deep]) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "not valid YAML"
        raise FlowError([{"line": line, "field": "", "message": f"bad YAML: {problem}"}]) from exc
    except yaml.YAMLError as exc:
        raise FlowError([{"line": None, "field": "", "message": f"bad YAML: {exc}"}]) from exc
    finally:
        loader.dispose()


def _cross_check(flow: Flow) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    nodes = flow.nodes

    def check(loc: Loc, target: str) -> None:
        if target not in nodes:
            hint = _closest(target, list(nodes))
            problems.append((loc, f"unknown node {target!r}{hint}"))

    check(("start",), flow.start)
    for word, target in flow.keywords.items():
        check(("keywords", word), target)
    for ref, target in flow.entries.items():
        check(("entries", ref), target)
    for node_id, node in nodes.items():
        for suffix, target in node.targets():
            check(("nodes", node_id, *suffix), target)
        node_next = getattr(node, "next", None)
        buttons: list[tuple[Loc, ButtonSpec]] = []
        if isinstance(node, MessageNode):
            buttons += [(("buttons", i), b) for i, b in enumerate(node.buttons)]
        if isinstance(node, ChoiceNode):
            buttons += [(("options", i), b) for i, b in enumerate(node.options)]
        for index, item in enumerate(node.items()):
            if isinstance(item, CardItem):
                buttons += [
                    (("say", index, "card", "buttons", i), b)
                    for i, b in enumerate(item.card.buttons)
                ]
            elif isinstance(item, CarouselItem) and item.carousel.button is not None:
                buttons.append((("say", index, "carousel", "button"), item.carousel.button))
        for loc, button in buttons:
            if button.next is None and button.url is None and node_next is None:
                message = "a button needs next (or a next on its node)"
                problems.append((("nodes", node_id, *loc, "next"), message))
        if isinstance(node, SurveyNode) and node.max <= node.min:
            problems.append((("nodes", node_id, "max"), "max must be greater than min"))
        if (
            isinstance(node, NumberNode)
            and node.max is not None
            and node.min is not None
            and node.max < node.min
        ):
            problems.append((("nodes", node_id, "max"), "max must not be below min"))
    return problems


def _closest(name: str, names: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_flow(text: str) -> Flow:
    """Parse, validate and compile a flow; `FlowError` with line and field otherwise."""
    root, data = _parse(text)
    if root is not None:
        found: list[tuple[Loc, int]] = []
        _duplicates(root, [], found)
        if found:
            raise FlowError(
                [
                    {"line": line, "field": _field_path(list(loc)), "message": "duplicate key"}
                    for loc, line in found[:MAX_ERRORS]
                ]
            )
    if not isinstance(data, dict):
        raise FlowError(
            [
                {
                    "line": root.start_mark.line + 1 if root is not None else 1,
                    "field": "",
                    "message": "a flow is a mapping with start and nodes",
                }
            ]
        )
    try:
        flow = Flow.model_validate(data)
    except ValidationError as exc:
        errors = []
        for error in exc.errors(include_url=False)[:MAX_ERRORS]:
            loc = tuple(error["loc"])
            if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
                loc = (*loc, "type")  # point at the node's `type:` line
            line, field = _locate(root, loc)
            errors.append({"line": line, "field": field, "message": error["msg"]})
        raise FlowError(errors) from exc
    problems = _cross_check(flow)
    if problems:
        errors = []
        for loc, message in problems[:MAX_ERRORS]:
            line, field = _locate(root, loc)
            errors.append({"line": line, "field": field, "message": message})
        raise FlowError(errors)
    return _compile(flow)


def load_compiled(data: dict[str, Any]) -> Flow:
    """A flow from its stored compiled JSON (validated again; it was valid when stored)."""
    return _compile(Flow.model_validate(data))


@lru_cache(maxsize=8)
def shipped_source(name: str = "popup_drop") -> str:
    """The source text of a flow shipped with popdrop (`chat/flows/<name>.yaml`)."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise PopdropError("not_found", f"no shipped flow {name!r}")
    path = FLOWS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PopdropError("not_found", f"no shipped flow {name!r}")
    return path.read_text(encoding="utf-8")


def flow_json_schema() -> dict[str, Any]:
    """The JSON Schema of a flow file (pydantic's), as published in docs/."""
    schema = Flow.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def schema_text() -> str:
    return json.dumps(flow_json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    """(Re)generate docs/chat-flow.schema.json: `python -m popdrop.chat.flow`."""
    path.write_text(schema_text(), encoding="utf-8")
    return path


if __name__ == "__main__":  # pragma: no cover
    print(write_schema())
