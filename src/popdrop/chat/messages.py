"""What the engine says, as plain data, and how a channel that cannot show it degrades it.

Every channel declares its `Capabilities`. `degrade(messages, capabilities)` rewrites what
the channel cannot render into what it can: on SMS (text only) a carousel becomes short
numbered text, buttons become "Reply 1) … 2) …", a countdown becomes a date. Numbered
options keep their button payloads in `Text.choices`; the service stores them in the
conversation state so an inbound "2" resolves to the second option's payload.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from popdrop.checkin import tickets
from popdrop.core.localtime import local


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Button(_Out):
    """A quick reply (its `payload` comes back as a button inbound) or a link (`url`)."""

    label: str
    payload: str | None = None
    url: str | None = None


class Text(_Out):
    kind: Literal["text"] = "text"
    text: str
    # Payloads of numbered options written into `text` by `degrade` ("1" → choices[0]).
    choices: list[str] = Field(default_factory=list)


class Buttons(_Out):
    """Quick-reply buttons under a line of text."""

    kind: Literal["buttons"] = "buttons"
    text: str = ""
    buttons: list[Button]


class Card(_Out):
    """A product card: live availability, price, image and its buttons (e.g. Reserve)."""

    kind: Literal["card"] = "card"
    product_id: int
    title: str
    text: str = ""
    price: str | None = None
    image_url: str | None = None
    available: int | None = None
    url: str | None = None
    buttons: list[Button] = Field(default_factory=list)


class Carousel(_Out):
    kind: Literal["carousel"] = "carousel"
    text: str = ""
    cards: list[Card]


class Countdown(_Out):
    """A live countdown to `to`; `tz` is the event's time zone for display."""

    kind: Literal["countdown"] = "countdown"
    text: str = ""
    to: datetime
    tz: str | None = None


class Image(_Out):
    kind: Literal["image"] = "image"
    url: str
    alt: str = ""


class QrTicket(_Out):
    """A check-in ticket: `secret` is what the QR code holds, `url` its ticket page."""

    kind: Literal["qr_ticket"] = "qr_ticket"
    text: str = ""
    secret: str
    url: str


OutMessage = Annotated[
    Text | Buttons | Card | Carousel | Countdown | Image | QrTicket, Field(discriminator="kind")
]
OUT_MESSAGES: TypeAdapter[list[OutMessage]] = TypeAdapter(list[OutMessage])


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a channel can render. Anything it cannot is degraded to what it can."""

    name: str
    buttons: bool = True
    cards: bool = True
    carousel: bool = True
    images: bool = True
    countdown: bool = True  # a live, ticking countdown
    qr: bool = True  # shows a QR code (widget draws it, Telegram sends a picture)
    links: bool = True
    merge_text: bool = False  # send one text per reply (SMS)
    max_text: int | None = None


WEB = Capabilities("web")
TELEGRAM = Capabilities("telegram", carousel=False, countdown=False)
SMS = Capabilities(
    "sms",
    buttons=False,
    cards=False,
    carousel=False,
    images=False,
    countdown=False,
    qr=False,
    merge_text=True,
    max_text=1600,
)
PLAIN = replace(SMS, name="plain")
# Channel name → capabilities; channel modules may add theirs with `register_channel`.
CHANNELS: dict[str, Capabilities] = {"web": WEB, "sms": SMS, "telegram": TELEGRAM}


def register_channel(capabilities: Capabilities) -> None:
    CHANNELS[capabilities.name] = capabilities


def capabilities_of(channel: str) -> Capabilities:
    """A registered channel's capabilities; text only for a channel nobody registered."""
    return CHANNELS.get(channel) or replace(PLAIN, name=channel)


# A button label this short is typed as is (NPS 0 to 10, Y/N): no numbering needed.
_TOKEN_LEN = 3


class _Numbering:
    def __init__(self) -> None:
        self.count = 0

    def lines(self, buttons: list[Button], links: bool) -> tuple[list[str], list[str]]:
        """Numbered lines for quick replies, `label: url` for link buttons."""
        lines: list[str] = []
        choices: list[str] = []
        for button in buttons:
            if button.payload is None:
                if button.url and links:
                    lines.append(f"{button.label}: {button.url}")
                continue
            self.count += 1
            choices.append(button.payload)
            lines.append(f"{self.count}) {button.label}")
        return lines, choices


def _token_list(labels: list[str]) -> str:
    """`0 to 10` for a run of consecutive numbers, else `Y, N`."""
    if len(labels) > 2 and all(label.isdigit() for label in labels):
        numbers = [int(label) for label in labels]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return f"a number from {numbers[0]} to {numbers[-1]}"
    return ", ".join(labels)


def format_time(at: datetime, tz: str | None) -> str:
    """A moment as the chat shows it: in the event's zone, with its abbreviation."""
    return local(at, tz or "UTC", "%a %d %b, %H:%M")


def remaining(to: datetime, now: datetime) -> str:
    """`2d 3h`, `3h 05m`, `12m`, or `now`."""
    seconds = int((to - now).total_seconds())
    if seconds <= 0:
        return "now"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{max(minutes, 1)}m"


def _card_lines(card: Card, links: bool) -> list[str]:
    head = card.title
    if card.price:
        head += f" — {card.price}"
    if card.available is not None:
        head += " (sold out)" if card.available <= 0 else f" ({card.available} left)"
    lines = [head]
    if card.text:
        lines.append(card.text)
    if card.url and links:
        lines.append(card.url)
    return lines


def _degrade_one(
    message: OutMessage, caps: Capabilities, numbering: _Numbering, now: datetime | None
) -> list[OutMessage]:
    if isinstance(message, Carousel):
        if caps.carousel:
            return [message]
        if caps.cards:
            head: list[OutMessage] = [Text(text=message.text)] if message.text else []
            cards: list[OutMessage] = [
                m for card in message.cards for m in _degrade_one(card, caps, numbering, now)
            ]
            return head + cards
        lines = [message.text] if message.text else []
        choices: list[str] = []
        for card in message.cards:
            primary = next((b for b in card.buttons if b.payload), None)
            summary = " ".join(_card_lines(card, caps.links)[:1])
            if primary is not None and primary.payload is not None:
                numbering.count += 1
                choices.append(primary.payload)
                lines.append(f"{numbering.count}) {summary} — {primary.label}")
            else:
                lines.append(f"- {summary}")
            if card.url and caps.links:
                lines.append(f"   {card.url}")
        return [Text(text="\n".join(lines), choices=choices)]
    if isinstance(message, Card):
        if caps.cards:
            if caps.buttons or not message.buttons:
                return [message]
            plain = message.model_copy(update={"buttons": []})
            return [plain, *_degrade_one(Buttons(buttons=message.buttons), caps, numbering, now)]
        lines = _card_lines(message, caps.links)
        if message.image_url and caps.images:
            return [
                Image(url=message.image_url, alt=message.title),
                *_degrade_one(
                    Buttons(text="\n".join(lines), buttons=message.buttons), caps, numbering, now
                ),
            ]
        return _degrade_one(
            Buttons(text="\n".join(lines), buttons=message.buttons), caps, numbering, now
        )
    if isinstance(message, Buttons):
        if caps.buttons or not message.buttons:
            return [message] if message.buttons else [Text(text=message.text)]
        quick = [b for b in message.buttons if b.payload is not None]
        if quick and all(len(b.label) <= _TOKEN_LEN for b in quick):
            tokens = _token_list([b.label for b in quick])
            links = [f"{b.label}: {b.url}" for b in message.buttons if b.url and caps.links]
            text = "\n".join([t for t in (message.text, f"Reply {tokens}") if t] + links)
            return [Text(text=text)]
        lines, choices = numbering.lines(message.buttons, caps.links)
        if choices:
            lines.append("Reply with a number.")
        return [Text(text="\n".join([message.text, *lines]).strip(), choices=choices)]
    if isinstance(message, Countdown):
        if caps.countdown:
            return [message]
        when = format_time(message.to, message.tz)
        left = f" (in {remaining(message.to, now)})" if now is not None else ""
        return [Text(text=f"{message.text} {when}{left}".strip())]
    if isinstance(message, Image):
        if caps.images:
            return [message]
        if caps.links:
            return [Text(text=f"{message.alt}: {message.url}" if message.alt else message.url)]
        return [Text(text=message.alt)] if message.alt else []
    if isinstance(message, QrTicket):
        if caps.qr:
            return [message]
        code = tickets.printed_short_code(message.secret)
        line = f"Ticket code: {code}" if code else ""
        return [Text(text="\n".join(p for p in (message.text, line, message.url) if p))]
    return [message]


def degrade(
    messages: list[OutMessage], capabilities: Capabilities, *, now: datetime | None = None
) -> list[OutMessage]:
    """Rewrite `messages` into what `capabilities` can render (see the module doc)."""
    numbering = _Numbering()
    out: list[OutMessage] = []
    for message in messages:
        out.extend(_degrade_one(message, capabilities, numbering, now))
    out = [m for m in out if not (isinstance(m, Text) and not m.text)]
    if capabilities.merge_text and out and all(isinstance(m, Text) for m in out):
        texts = [m for m in out if isinstance(m, Text)]
        out = [
            Text(
                text="\n\n".join(m.text for m in texts),
                choices=[c for m in texts for c in m.choices],
            )
        ]
    if capabilities.max_text is not None:
        limit = capabilities.max_text
        out = [
            m.model_copy(update={"text": m.text[: limit - 1] + "…"})
            if isinstance(m, Text) and len(m.text) > limit
            else m
            for m in out
        ]
    return out


def numbered_choices(messages: list[OutMessage]) -> list[str]:
    """The payloads of the numbered options in degraded messages, in number order."""
    return [c for m in messages if isinstance(m, Text) for c in m.choices]


def to_json(messages: list[OutMessage]) -> list[dict[str, object]]:
    return [m.model_dump(mode="json", exclude_defaults=False) for m in messages]
