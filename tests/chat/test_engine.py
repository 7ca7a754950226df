"""The pure engine, node type by node type (no database)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from popdrop.chat import engine as e
from popdrop.chat.flow import load_flow
from popdrop.chat.messages import (
    Buttons,
    Card,
    Carousel,
    Countdown,
    Image,
    QrTicket,
    Text,
)
from tests.chat.helpers import NOW, event_fact, facts, ok_answer, run, start


def flow_of(nodes: str, head: str = "start: a\n") -> object:
    return load_flow(head + "nodes:\n" + nodes)


def text_in(inbound: str) -> e.Inbound:
    return e.Inbound.of_text(inbound)


# ---------------------------------------------------------------- messages


def test_message_with_buttons_waits_and_routes_by_payload_label_and_alias() -> None:
    flow = load_flow(
        """\
start: a
nodes:
  a:
    type: message
    say: Pick one
    save_as: picked
    buttons:
      - {label: Red, value: r, next: red}
      - {label: Blue, next: blue, aliases: [azure]}
  red: {type: end, say: "You picked {picked}"}
  blue: {type: end, say: "You picked {picked}"}
"""
    )
    first = run(flow, start(flow), text_in("hi"), facts())
    assert first.state.status == "waiting_input"
    [buttons] = first.out
    assert isinstance(buttons, Buttons)
    assert buttons.text == "Pick one"
    assert [(b.label, b.payload) for b in buttons.buttons] == [("Red", "a:0"), ("Blue", "a:1")]
    by_payload = run(flow, first.state, e.Inbound.button("a:0"), facts())
    assert by_payload.texts() == ["You picked r"]
    assert by_payload.state.status == "done"
    by_label = run(flow, first.state, text_in("  blue! "), facts())
    assert by_label.texts() == ["You picked Blue"]
    by_alias = run(flow, first.state, text_in("AZURE"), facts())
    assert by_alias.state.node == "blue"


def test_unknown_input_reasks_then_falls_back() -> None:
    flow = load_flow(
        """\
start: a
nodes:
  a:
    type: message
    say: Pick one
    buttons: [{label: Go, next: b}]
    max_tries: 3
    retry: Use the button please.
    fallback: help
  b: {type: end}
  help: {type: end, say: A host will help.}
"""
    )
    state = run(flow, start(flow), text_in("hi"), facts()).state
    again = run(flow, state, text_in("what?"), facts())
    assert again.state.node == "a" and again.state.tries == 1
    assert again.texts()[0] == "Use the button please."
    assert isinstance(again.out[-1], Buttons)  # the question is asked again
    stale = run(flow, again.state, e.Inbound.button("other:0"), facts())  # another node's
    fallback = run(flow, stale.state, text_in("??"), facts())
    assert stale.state.node == "a"
    assert fallback.state.node == "help" and fallback.texts() == ["A host will help."]


def test_message_without_buttons_goes_on_and_ends() -> None:
    flow = load_flow(
        "start: a\nnodes:\n  a: {type: message, say: one, next: b}\n"
        "  b: {type: message, say: [{text: two}, {text: three}]}\n"
    )
    turn = run(flow, start(flow), text_in("hi"), facts())
    assert turn.texts() == ["one", "two", "three"]
    assert turn.state.status == "done"
    assert turn.visited == ["a", "b"]


def test_cards_carousel_countdown_image_render_from_facts() -> None:
    flow = load_flow(
        """\
start: a
nodes:
  a:
    type: message
    say:
      - card:
          product: HOOD-M
          buttons: [{label: Reserve, next: b}]
      - card: {product: "11", buttons: [{label: Reserve, next: b}]}
      - carousel: {text: "All:", only_available: true, button: {label: Take, next: b}}
      - countdown: {to: "{event.starts_at}", text: Doors open}
      - countdown: {to: "not a time"}
      - image: {url: "https://img.example/a.png", alt: Poster}
      - card: {product: "999"}
  b: {type: end, say: "Reserving {product_title} ({product_id})"}
"""
    )
    turn = run(flow, start(flow), text_in("hi"), facts())
    hoodie, cap, carousel, countdown, image = turn.out
    assert isinstance(hoodie, Card) and hoodie.price == "45.00 EUR" and hoodie.available == 3
    assert [b.payload for b in hoodie.buttons] == ["a:0:10"]
    assert isinstance(cap, Card) and cap.available == 0 and cap.buttons == []  # sold out
    assert isinstance(carousel, Carousel) and [c.title for c in carousel.cards] == ["Hoodie"]
    assert carousel.cards[0].buttons[0].payload == "a:2:10"
    assert isinstance(countdown, Countdown) and countdown.to == NOW + timedelta(days=2)
    assert countdown.tz == "Europe/Paris"
    assert isinstance(image, Image) and image.alt == "Poster"
    viewed = [x.ref for x in turn.effects if isinstance(x, e.RecordActivityEffect)]
    assert viewed.count("10") == 2 and "11" in viewed
    chose = run(flow, turn.state, e.Inbound.button("a:2:10"), facts())
    assert chose.texts() == ["Reserving Hoodie (10)"]
    typed = run(flow, turn.state, text_in("hoodie"), facts())
    assert typed.state.vars["product_id"] == 10


def test_choice_saves_value() -> None:
    flow = load_flow(
        """\
start: size
nodes:
  size:
    type: choice
    say: Size?
    save_as: size
    options: [{label: Small, value: S}, {label: Large, value: L}]
    next: done
  done: {type: end, say: "Size {size}"}
"""
    )
    state = run(flow, start(flow), text_in("hi"), facts()).state
    assert run(flow, state, text_in("large"), facts()).texts() == ["Size L"]


# ---------------------------------------------------------------- inputs


INPUTS = """\
start: email
nodes:
  email: {type: email, say: "Email?", retry: Not an email., next: phone}
  phone: {type: phone, say: "Phone?", next: count}
  count: {type: number, say: "How many?", min: 1, max: 4, next: note}
  note: {type: text, say: "Anything else?", max_length: 20, next: end}
  end: {type: end, say: "{email} {phone} {number} {answer}"}
"""


def test_inputs_validate_and_reask() -> None:
    flow = load_flow(INPUTS)
    state = run(flow, start(flow), text_in("hi"), facts()).state
    bad = run(flow, state, text_in("not-an-email"), facts())
    assert bad.texts() == ["Not an email.", "Email?"]
    state = run(flow, bad.state, text_in(" Ana@Example.COM "), facts()).state
    assert state.node == "phone"
    state = run(flow, state, text_in("12"), facts()).state
    assert state.node == "phone"  # not a phone number
    state = run(flow, state, text_in("+33 6 12 34 56 78"), facts()).state
    for wrong in ("zero", "0", "5", "2.5"):
        state = run(flow, state, text_in(wrong), facts()).state
        assert state.node == "count", wrong
    state = run(flow, state, text_in("3"), facts()).state
    too_long = run(flow, state, text_in("x" * 21), facts())
    assert too_long.state.node == "note"
    end = run(flow, too_long.state, text_in("  blue   please "), facts())
    assert end.texts() == ["ana@example.com +33612345678 3 blue please"]


def test_input_timeout_wakes_to_its_branch() -> None:
    flow = load_flow(
        """\
start: q
nodes:
  q:
    type: email
    say: Email?
    timeout: {seconds: 600, next: late}
    next: ok
  ok: {type: end}
  late: {type: end, say: Maybe later then.}
"""
    )
    turn = run(flow, start(flow), text_in("hi"), facts())
    assert turn.state.wake_at == NOW + timedelta(seconds=600)
    assert any(isinstance(x, e.ScheduleEffect) and x.reason == "timeout" for x in turn.effects)
    early = run(flow, turn.state, e.Inbound.wake(), facts(NOW + timedelta(seconds=599)))
    assert early.state.node == "q" and early.out == []
    late = run(flow, turn.state, e.Inbound.wake(), facts(NOW + timedelta(seconds=600)))
    assert late.texts() == ["Maybe later then."]


def test_slot_picker_offers_open_slots_and_saves_the_choice() -> None:
    flow = load_flow(
        """\
start: s
nodes:
  s: {type: slot, say: "When?", next: done, none_next: full}
  done: {type: end, say: "Booked {slot_label} ({slot_id})"}
  full: {type: end, say: All full.}
"""
    )
    turn = run(flow, start(flow), text_in("hi"), facts())
    [prompt] = turn.out
    assert isinstance(prompt, Buttons)
    # The event is in Europe/Paris: 10:00 UTC on 3 June is 12:00 on the wall clock there.
    when = "Morning · Wed 03 Jun, 12:00\u201313:00 CEST"
    assert [(b.label, b.payload) for b in prompt.buttons] == [(f"{when} (4 left)", "s:0:5")]
    assert run(flow, turn.state, e.Inbound.button("s:0:6"), facts()).state.node == "s"  # full
    assert run(flow, turn.state, e.Inbound.button("s:0:5"), facts()).texts() == [
        f"Booked {when} (5)"
    ]
    assert run(flow, turn.state, text_in("morning"), facts()).state.node == "done"
    assert run(flow, turn.state, text_in(when.lower()), facts()).state.node == "done"
    none_left = facts(slots=[])
    assert run(flow, start(flow), text_in("hi"), none_left).texts() == ["All full."]


def test_survey_records_the_answer() -> None:
    flow = load_flow(
        "start: nps\nnodes:\n  nps: {type: survey, say: '0 to 10?', retry: Say 0 to 10.}\n"
    )
    turn = run(flow, start(flow), text_in("hi"), facts())
    [prompt] = turn.out
    assert isinstance(prompt, Buttons) and len(prompt.buttons) == 11
    assert run(flow, turn.state, text_in("11"), facts()).texts()[0] == "Say 0 to 10."
    done = run(flow, turn.state, text_in("9"), facts())
    assert done.state.status == "done" and done.state.vars["score"] == 9
    assert [x for x in done.effects if isinstance(x, e.SurveyAnswerEffect)] == [
        e.SurveyAnswerEffect("nps", 9, "9")
    ]
    by_button = run(flow, turn.state, e.Inbound.button("nps:0:0"), facts())
    assert by_button.state.vars["score"] == 0


# ---------------------------------------------------------------- conditions


def test_conditions_on_variables_availability_segment_and_time() -> None:
    flow = load_flow(
        """\
start: c
vars: {tier: gold, n: 5}
nodes:
  c:
    type: condition
    branches:
      - when: {var: missing, set: true}
        next: wrong
      - when: [{var: tier, one_of: [silver, GOLD]}, {var: n, gte: 5, lte: 5}]
        next: stock
    else: wrong
  stock:
    type: condition
    branches:
      - when: {available: {product: CAP}}
        next: wrong
      - when: {available: {product: "10", min: 3}}
        next: slot
    else: wrong
  slot:
    type: condition
    branches:
      - when: {available: {slot: "6"}}
        next: wrong
      - when: {available: {slot: "5"}}
        next: seg
    else: wrong
  seg:
    type: condition
    branches:
      - when: {segment: VIP}
        next: time
    else: wrong
  time:
    type: condition
    branches:
      - when: {time: {before: "{event.starts_at}"}}
        next: right
    else: wrong
  right: {type: end, say: right}
  wrong: {type: end, say: wrong}
"""
    )
    vip = facts(segments=frozenset({"VIP"}))
    turn = run(flow, start(flow), text_in("hi"), vip)
    assert turn.texts() == ["right"]
    assert turn.visited == ["c", "stock", "slot", "seg", "time", "right"]
    assert run(flow, start(flow), text_in("hi"), facts()).texts() == ["wrong"]  # no segment
    late = facts(NOW + timedelta(days=3), segments=frozenset({"VIP"}), event=event_fact(NOW))
    assert run(flow, start(flow), text_in("hi"), late).texts() == ["wrong"]


# ---------------------------------------------------------------- actions


ACTIONS = """\
start: hold
nodes:
  hold:
    type: hold
    product: HOOD-M
    next: voucher
    on_reason: {sold_out: gone}
    on_fail: failed
  voucher: {type: issue_voucher, batch: chat, next: say_code, on_fail: failed}
  say_code: {type: message, say: "Code {voucher_code} for hold {hold_id}", next: pay}
  pay: {type: checkout_link, text: Pay now, next: ticket, on_fail: failed}
  ticket: {type: send_ticket, subject: hold, next: tag, on_fail: failed}
  tag: {type: tag, tags: [chat, vip], next: consent}
  consent: {type: grant_consent, wording: Yes to news, next: release}
  release: {type: release, next: end}
  end: {type: end, say: Done.}
  gone: {type: end, say: "Sold out: {error_message}"}
  failed: {type: end, say: "Failed: {error_reason}"}
"""


def test_actions_run_in_order_and_keep_secrets_out_of_the_state() -> None:
    flow = load_flow(ACTIONS)
    turn = run(flow, start(flow), text_in("hi"), facts())
    kinds = [type(x).__name__ for x in turn.effects if not isinstance(x, e.RecordActivityEffect)]
    assert kinds == [
        "HoldEffect",
        "IssueVoucherEffect",
        "CheckoutLinkEffect",
        "SendTicketEffect",
        "TagEffect",
        "GrantConsentEffect",
        "ReleaseEffect",
    ]
    assert turn.effects[1] == e.HoldEffect("hold#0", 10, None, 1, None)
    assert turn.texts()[0] == "Code CODE-1234 for hold 21"
    pay = turn.out[1]
    assert isinstance(pay, Buttons) and pay.buttons[0].url == "http://x/checkout/TOKEN"
    assert isinstance(turn.out[2], QrTicket) and turn.out[2].secret == "SECRET"
    activity = [x.kind for x in turn.effects if isinstance(x, e.RecordActivityEffect)]
    assert activity[:1] == ["chat_started"]
    assert {"hold", "voucher_issued", "checkout_started", "ticket_sent"} <= set(activity)
    assert turn.state.status == "done"
    saved = turn.state.model_dump_json()
    assert "CODE-1234" not in saved and "SECRET" not in saved and "TOKEN" not in saved
    assert "hold_id" not in e.ChatState.model_validate_json(saved).vars  # released


def test_a_refused_action_takes_its_reason_branch_or_on_fail() -> None:
    flow = load_flow(ACTIONS)

    def sold_out(effect: e.AwaitedEffect) -> e.EffectResult:
        return e.EffectResult(False, reason="sold_out", message="sold out")

    def closed(effect: e.AwaitedEffect) -> e.EffectResult:
        return e.EffectResult(False, reason="event_closed", message="closed")

    assert run(flow, start(flow), text_in("hi"), facts(), sold_out).texts() == [
        "Sold out: sold out"
    ]
    turn = run(flow, start(flow), text_in("hi"), facts(), closed)
    assert turn.texts() == ["Failed: event_closed"]
    assert turn.state.vars["error_reason"] == "event_closed"


def test_an_action_missing_its_input_fails_without_an_effect() -> None:
    flow = load_flow(
        """\
start: book
nodes:
  book: {type: rsvp, consent_text: ok, next: end, on_fail: no}
  end: {type: end}
  no: {type: end, say: "{error_message}"}
"""
    )
    turn = run(flow, start(flow), text_in("hi"), facts())
    assert turn.texts() == ["pick a time slot first"]
    assert not any(isinstance(x, e.RsvpEffect) for x in turn.effects)


def test_a_failure_without_a_branch_ends_in_error() -> None:
    flow = load_flow("start: h\nnodes:\n  h: {type: hold, product: '10', next: h}\n")

    def refuse(effect: e.AwaitedEffect) -> e.EffectResult:
        return e.EffectResult(False, reason="sold_out", message="sold out")

    turn = run(flow, start(flow), text_in("hi"), facts(), refuse)
    assert turn.state.status == "error" and turn.texts() == ["sold out"]


def test_rsvp_then_ticket() -> None:
    flow = load_flow(
        """\
start: book
vars: {slot_id: 5, email: ana@example.com}
nodes:
  book: {type: rsvp, consent_text: "I agree", places: "2", next: ticket}
  ticket: {type: send_ticket, next: end}
  end: {type: end, say: "RSVP {rsvp_id}"}
"""
    )
    turn = run(flow, start(flow), text_in("hi"), facts())
    rsvp = turn.effects[1]
    assert rsvp == e.RsvpEffect("book#0", 5, 2, "ana@example.com", None, "I agree", False)
    assert e.SendTicketEffect("ticket#1", "rsvp", 7) in turn.effects
    assert isinstance(turn.out[0], QrTicket)
    assert turn.texts()[-1] == "RSVP 7"


def test_handoff_pauses_the_flow() -> None:
    flow = load_flow(
        "start: h\nnodes:\n  h: {type: handoff, say: A host is coming., reason: asked, next: b}\n"
        "  b: {type: end}\n"
    )
    turn = run(flow, start(flow), text_in("help me"), facts())
    assert turn.state.status == "handed_off"
    assert e.HandoffEffect("asked") in turn.effects
    silent = run(flow, turn.state, text_in("hello?"), facts())
    assert silent.out == [] and silent.state.status == "handed_off"


# ---------------------------------------------------------------- waits, jumps, set, end


def test_wait_for_seconds_and_until_a_time() -> None:
    flow = load_flow(
        """\
start: w
nodes:
  w: {type: wait, seconds: 3600, say: Wait an hour., reply: Still waiting., next: u}
  u: {type: wait, until: "{event.starts_at}", offset: -7200, next: past}
  past: {type: wait, until: "2020-01-01T00:00:00Z", next: end}
  end: {type: end, say: Go!}
"""
    )
    turn = run(flow, start(flow), text_in("hi"), facts())
    assert turn.state.status == "waiting_until"
    assert turn.state.wake_at == NOW + timedelta(hours=1)
    assert run(flow, turn.state, text_in("now?"), facts()).texts() == ["Still waiting."]
    early = run(flow, turn.state, e.Inbound.wake(), facts(NOW + timedelta(minutes=59)))
    assert early.out == [] and early.state.node == "w"
    later = NOW + timedelta(hours=1)
    woke = run(flow, turn.state, e.Inbound.wake(), facts(later))
    # The event fact moves with `now` in this helper: starts_at is two days after `later`.
    assert woke.state.node == "u" and woke.state.wake_at == later + timedelta(days=2, hours=-2)
    assert woke.state.wake_at is not None
    end = run(flow, woke.state, e.Inbound.wake(), facts(woke.state.wake_at))
    assert end.texts() == ["Go!"]  # the past `until` did not wait
    assert end.visited == ["past", "end"]


def test_set_and_jump() -> None:
    flow = load_flow(
        """\
start: s
nodes:
  s: {type: set, vars: {greeting: "Hello {event.title}", n: 3}, next: j}
  j: {type: jump, to: e}
  e: {type: end, say: "{greeting} x{n}"}
"""
    )
    assert run(flow, start(flow), text_in("hi"), facts()).texts() == ["Hello Summer Drop x3"]


def test_a_jump_loop_ends_in_a_defined_error_state() -> None:
    flow = load_flow(
        "start: a\nerror_text: Oops.\nnodes:\n  a: {type: jump, to: b}\n  b: {type: jump, to: a}\n"
    )
    turn = run(flow, start(flow), text_in("hi"), facts())
    assert turn.state.status == "error"
    assert turn.texts() == ["Oops."]
    assert len(turn.visited) == e.MAX_STEPS
    assert turn.state.node in flow.nodes
    again = run(flow, turn.state, text_in("hi"), facts())  # an error restarts on a message
    assert again.state.status == "error" and len(again.visited) == e.MAX_STEPS


def test_a_loop_through_actions_also_stops() -> None:
    flow = load_flow(
        "start: h\nnodes:\n  h: {type: hold, product: '10', next: r}\n"
        "  r: {type: release, hold: '{hold_id}', next: h}\n"
    )
    turn = run(flow, start(flow), text_in("hi"), facts(), ok_answer)
    assert turn.state.status == "error"
    assert sum(isinstance(x, e.HoldEffect) for x in turn.effects) <= e.MAX_STEPS


# ---------------------------------------------------------------- triggers


def test_keywords_entries_and_restart() -> None:
    flow = load_flow(
        """\
start: a
keywords: {MENU: menu}
entries: {qr: b}
vars: {source: direct}
nodes:
  a: {type: end, say: start}
  b: {type: end, say: "from {ref}"}
  menu: {type: end, say: menu}
"""
    )
    done = run(flow, start(flow), text_in("hi"), facts())
    assert done.texts() == ["start"] and done.state.status == "done"
    assert run(flow, done.state, text_in(" menu "), facts()).texts() == ["menu"]
    assert run(flow, done.state, text_in("again"), facts()).texts() == ["start"]
    deep = run(flow, start(flow), e.Inbound.start("qr"), facts())
    assert deep.texts() == ["from qr"]
    unknown = run(flow, start(flow), e.Inbound.start("nope"), facts())
    assert unknown.texts() == ["start"]
    fresh = run(flow, start(flow), text_in("MENU"), facts())
    assert fresh.texts() == ["menu"]


def test_state_from_another_version_starts_over() -> None:
    flow = load_flow("start: a\nnodes:\n  a: {type: end, say: hello}\n")
    stale = start(flow).model_copy(update={"node": "gone", "status": "waiting_input"})
    turn = run(flow, stale, text_in("hi"), facts())
    assert turn.texts() == ["hello"] and turn.state.node == "a"


def test_step_does_not_change_its_input_state() -> None:
    flow = load_flow(
        "start: s\nnodes:\n  s: {type: set, vars: {x: 1}, next: e}\n  e: {type: end}\n"
    )
    state = start(flow)
    before = state.model_dump()
    e.step(flow, state, text_in("hi"), facts())
    assert state.model_dump() == before


@pytest.mark.parametrize("kind", ["text", "button", "wake", "start"])
def test_inbound_constructors(kind: str) -> None:
    inbound = {
        "text": e.Inbound.of_text("x" * 5000),
        "button": e.Inbound.button("a:0"),
        "wake": e.Inbound.wake(),
        "start": e.Inbound.start("ref"),
    }[kind]
    assert inbound.kind == kind
    assert len(inbound.text) <= e.MAX_INPUT


def test_text_answers_on_a_node_resolve_numbered_options() -> None:
    flow = load_flow(
        "start: a\nnodes:\n  a:\n    type: message\n    say: Pick\n"
        "    buttons: [{label: Red, next: r}, {label: Blue, next: b}]\n"
        "  r: {type: end, say: red}\n  b: {type: end, say: blue}\n"
    )
    state = run(flow, start(flow), text_in("hi"), facts()).state
    assert run(flow, state, text_in("2"), facts()).state.node == "a"  # no numbering shown
    numbered = state.model_copy(update={"numbered": ["a:0", "a:1"]})
    assert run(flow, numbered, text_in("2"), facts()).texts() == ["blue"]
    assert run(flow, numbered, text_in("3"), facts()).state.node == "a"
    assert isinstance(Text(text="x"), Text)


def test_channel_is_a_variable() -> None:
    flow = load_flow(
        """\
start: c
nodes:
  c:
    type: condition
    branches: [{when: {var: channel, equals: SMS}, next: sms}]
    else: web
  sms: {type: end, say: "text me on {channel}"}
  web: {type: end, say: web}
"""
    )
    assert run(flow, start(flow), text_in("hi"), facts(channel="sms")).texts() == ["text me on sms"]
    assert run(flow, start(flow), text_in("hi"), facts()).texts() == ["web"]
