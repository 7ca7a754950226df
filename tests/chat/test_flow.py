"""The flow file format: valid flows load, invalid ones are refused with line and field."""

from __future__ import annotations

import json

import pytest

from popdrop.chat.flow import (
    SCHEMA_PATH,
    FlowError,
    MessageNode,
    load_flow,
    schema_text,
    shipped_source,
)


def refusal(text: str) -> FlowError:
    with pytest.raises(FlowError) as caught:
        load_flow(text)
    error = caught.value
    assert error.reason == "invalid_flow"
    assert error.status == 422
    return error


def test_the_shipped_flow_loads() -> None:
    flow = load_flow(shipped_source("popup_drop"))
    assert flow.start == "greet"
    assert {"greet", "cards", "reserve", "pick_slot", "rsvp", "remind", "nps"} <= set(flow.nodes)
    # The turn that resumes at the carousel may read products; the slot picker, slots.
    assert flow.resume_needs("cards").products
    assert flow.resume_needs("menu").slots
    assert not flow.resume_needs("ask_email").products  # confirming needs neither
    assert flow.entry_needs("greet") == flow.entry_needs("menu")


def test_unknown_node_names_line_and_field() -> None:
    error = refusal(
        """\
start: greet
nodes:
  greet:
    type: message
    say: Hi
    buttons:
      - label: A
        next: cards
      - label: B
        next: cards
      - label: C
        next: cardz
  cards:
    type: end
"""
    )
    assert error.message.startswith("line 12: nodes.greet.buttons[2].next: unknown node 'cardz'")
    assert "did you mean 'cards'" in error.message
    [detail] = error.detail["errors"]
    assert detail["line"] == 12
    assert detail["field"] == "nodes.greet.buttons[2].next"


def test_wrong_type_names_line_and_field() -> None:
    error = refusal(
        """\
start: ask
nodes:
  ask:
    type: number
    say: How many?
    min: lots
    next: ask
"""
    )
    assert error.message.startswith("line 6: nodes.ask.min: Input should be a valid number")


def test_missing_field_names_the_node_and_field() -> None:
    error = refusal(
        """\
start: book
nodes:
  book:
    type: rsvp
    next: book
"""
    )
    assert error.message == "line 3: nodes.book.consent_text: Field required"


def test_unknown_node_type_points_at_type_line() -> None:
    error = refusal("start: a\nnodes:\n  a:\n    say: hi\n    type: mesage\n")
    assert error.message.startswith("line 5: nodes.a.type: Input tag 'mesage'")


def test_bad_yaml_syntax_gives_its_line() -> None:
    error = refusal("start: a\nnodes:\n  a:\n    type: end\n   say: [oops\n")
    assert error.message.startswith("line 5: bad YAML:")
    assert error.detail["errors"][0]["line"] == 5


def test_unclosed_quote_gives_a_line() -> None:
    error = refusal('start: a\nnodes:\n  a:\n    type: end\n    say: "oops\n')
    assert error.detail["errors"][0]["line"] is not None
    assert "bad YAML" in error.message


def test_every_error_is_listed() -> None:
    error = refusal(
        """\
start: a
nodes:
  a:
    type: message
    say:
      - text: hi
      - card: {product: 1, buttons: [{label: Reserve, nxt: a}]}
      - bogus: 1
"""
    )
    fields = [e["field"] for e in error.detail["errors"]]
    assert "nodes.a.say[1].card.buttons[0].nxt" in fields
    assert "nodes.a.say[2]" in fields
    assert "(and 1 more)" in error.message


def test_cross_checks() -> None:
    assert "unknown node 'nowhere'" in refusal("start: nowhere\nnodes:\n  a: {type: end}\n").message
    keyword = refusal("start: a\nkeywords: {MENU: menu}\nnodes:\n  a: {type: end}\n")
    assert keyword.message.startswith("line 2: keywords.MENU: unknown node 'menu'")
    orphan = refusal("start: a\nnodes:\n  a:\n    type: message\n    buttons: [{label: Go}]\n")
    assert "nodes.a.buttons[0].next: a button needs next" in orphan.message


def test_duplicate_node_is_refused() -> None:
    error = refusal("start: a\nnodes:\n  a: {type: end}\n  a: {type: end}\n")
    assert error.message == "line 4: nodes.a: duplicate key"


def test_not_a_mapping() -> None:
    assert "a flow is a mapping" in refusal("- just\n- a list\n").message
    assert "a flow is a mapping" in refusal("").message


def test_yes_and_no_stay_words() -> None:
    flow = load_flow(
        """\
start: q
nodes:
  q:
    type: message
    say: Sure?
    buttons:
      - {label: Yes, value: yes, next: no}
      - {label: No, value: no, next: no}
  no: {type: end}
"""
    )
    node = flow.nodes["q"]
    assert isinstance(node, MessageNode)
    assert [b.value for b in node.buttons] == ["yes", "no"]
    assert "no" in flow.nodes


def test_the_published_schema_is_current() -> None:
    """docs/chat-flow.schema.json is generated: `python -m popdrop.chat.flow` rewrites it."""
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text()
    schema = json.loads(schema_text())
    assert "nodes" in schema["properties"]
    assert "MessageNode" in schema["$defs"]


def test_the_documented_example_loads() -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "chat.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert example is not None
    assert load_flow(example.group(1)).start == "greet"
