"""Capabilities-based degradation: what each channel gets, and numbered replies."""

from __future__ import annotations

from datetime import timedelta

from popdrop.chat import engine as e
from popdrop.chat.flow import load_flow
from popdrop.chat.messages import (
    OUT_MESSAGES,
    SMS,
    TELEGRAM,
    WEB,
    Button,
    Buttons,
    Capabilities,
    Card,
    Carousel,
    Countdown,
    Image,
    OutMessage,
    QrTicket,
    Text,
    capabilities_of,
    degrade,
    numbered_choices,
    register_channel,
)
from tests.chat.helpers import NOW, facts, run, start

HOODIE = Card(
    product_id=10,
    title="Hoodie",
    text="Organic cotton",
    price="45.00 EUR",
    available=3,
    url="https://x.test/p/10",
    buttons=[Button(label="Reserve", payload="cards:0:10")],
)
CAP = Card(product_id=11, title="Cap", price="15.00 EUR", available=0)


def test_web_keeps_everything() -> None:
    messages: list[OutMessage] = [
        Carousel(cards=[HOODIE, CAP]),
        Countdown(to=NOW, text="Doors"),
        Image(url="https://x.test/i.png"),
        QrTicket(secret="S", url="https://x.test/t/S"),
    ]
    assert degrade(messages, WEB) == messages


def test_sms_turns_a_carousel_into_numbered_text_and_2_resolves() -> None:
    messages: list[OutMessage] = [
        Carousel(text="Dropping:", cards=[HOODIE, CAP]),
        Buttons(
            text="Or:",
            buttons=[
                Button(label="RSVP a time slot", payload="cards:1"),
                Button(label="Website", url="https://x.test"),
            ],
        ),
    ]
    [sms] = degrade(messages, SMS)
    assert isinstance(sms, Text)
    assert sms.text == (
        "Dropping:\n"
        "1) Hoodie — 45.00 EUR (3 left) — Reserve\n"
        "   https://x.test/p/10\n"
        "- Cap — 15.00 EUR (sold out)\n"
        "\n"
        "Or:\n"
        "2) RSVP a time slot\n"
        "Website: https://x.test\n"
        "Reply with a number."
    )
    assert numbered_choices([sms]) == ["cards:0:10", "cards:1"]


def test_sms_numbers_resolve_in_the_engine() -> None:
    flow = load_flow(
        """\
start: cards
nodes:
  cards:
    type: message
    say: [{carousel: {button: {label: Reserve, next: got}}}]
    buttons: [{label: Back, next: back}]
  got: {type: end, say: "Got {product_title}"}
  back: {type: end, say: back}
"""
    )
    turn = run(flow, start(flow), e.Inbound.of_text("hi"), facts())
    shown = degrade(turn.out, SMS)
    state = turn.state.model_copy(update={"numbered": numbered_choices(shown)})
    assert "1) Hoodie" in shown[0].text  # type: ignore[union-attr]
    assert run(flow, state, e.Inbound.of_text("1"), facts()).texts() == ["Got Hoodie"]
    assert run(flow, state, e.Inbound.of_text(" 2 "), facts()).texts() == ["back"]
    assert run(flow, state, e.Inbound.of_text("3"), facts()).state.node == "cards"


def test_sms_short_tokens_are_typed_as_they_are() -> None:
    nps = Buttons(
        text="0 to 10?", buttons=[Button(label=str(n), payload=f"n:0:{n}") for n in range(11)]
    )
    [sms] = degrade([nps], SMS)
    assert sms == Text(text="0 to 10?\nReply a number from 0 to 10")
    yes_no = Buttons(
        text="OK?", buttons=[Button(label="Y", payload="a:0"), Button(label="N", payload="a:1")]
    )
    assert degrade([yes_no], SMS) == [Text(text="OK?\nReply Y, N")]


def test_sms_degrades_countdown_image_and_ticket_and_merges() -> None:
    messages: list[OutMessage] = [
        Text(text="Hi!"),
        Countdown(to=NOW + timedelta(days=2, hours=3), text="Doors open", tz="Europe/Paris"),
        Image(url="https://x.test/i.png", alt="Poster"),
        QrTicket(text="Your ticket", secret="S", url="https://x.test/t/S"),
    ]
    [sms] = degrade(messages, SMS, now=NOW)
    assert isinstance(sms, Text)
    assert sms.text == (
        "Hi!\n\nDoors open Wed 03 Jun, 15:00 CEST (in 2d 3h)\n\n"
        "Poster: https://x.test/i.png\n\nYour ticket\nhttps://x.test/t/S"
    )


def test_sms_text_is_capped() -> None:
    [sms] = degrade([Text(text="x" * 5000)], SMS)
    assert isinstance(sms, Text) and len(sms.text) == 1600 and sms.text.endswith("…")


def test_telegram_gets_cards_for_a_carousel_and_a_dated_countdown() -> None:
    out = degrade([Carousel(text="Drop:", cards=[HOODIE, CAP]), Countdown(to=NOW)], TELEGRAM)
    assert [type(m).__name__ for m in out] == ["Text", "Card", "Card", "Text"]
    assert out[1] == HOODIE


def test_a_cards_only_channel_without_buttons_numbers_them() -> None:
    caps = Capabilities("kiosk", buttons=False)
    out = degrade([HOODIE], caps)
    assert isinstance(out[0], Card) and out[0].buttons == []
    assert out[1] == Text(text="1) Reserve\nReply with a number.", choices=["cards:0:10"])


def test_unknown_channels_are_text_only_and_channels_register() -> None:
    assert capabilities_of("whatsapp").buttons is False
    register_channel(Capabilities("kiosk-test"))
    assert capabilities_of("kiosk-test").cards is True


def test_messages_serialise_with_their_kind() -> None:
    data = OUT_MESSAGES.dump_python([HOODIE, Text(text="x")], mode="json")
    assert [m["kind"] for m in data] == ["card", "text"]
    assert OUT_MESSAGES.validate_python(data) == [HOODIE, Text(text="x")]
