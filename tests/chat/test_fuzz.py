"""Random inbound text and buttons never crash the default flow, at any node, and never
leave a conversation on an unknown node or status."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popdrop.chat import engine as e
from popdrop.chat.flow import ButtonSpec, Flow, MessageNode, WaitNode, load_compiled
from popdrop.chat.messages import SMS, TELEGRAM, WEB, degrade, numbered_choices
from tests.chat.helpers import NOW, event_fact, facts, ok_answer, run, shipped

FLOW = shipped()
NODES = sorted(FLOW.nodes)
REASONS = ["sold_out", "insufficient_stock", "slot_full", "event_closed", "limit_per_contact"]
WORDS = sorted(
    {
        "MENU",
        "DROP",
        "RSVP",
        "yes",
        "no",
        "hoodie",
        "Reserve",
        "Sat 10:00",
        "ana@example.com",
        "+33612345678",
        "10",
        "0",
        "-1",
        "1e9",
        "nan",
        "",
        " ",
        *(
            b.label
            for node in FLOW.nodes.values()
            if isinstance(node, MessageNode)
            for b in node.buttons
        ),
    }
)


def status_for(node_id: str) -> str:
    node = FLOW.nodes[node_id]
    if isinstance(node, WaitNode):
        return "waiting_until"
    if node.BLOCKING or (isinstance(node, MessageNode) and node.waits()):
        return "waiting_input"
    return "active"


texts = st.one_of(st.sampled_from(WORDS), st.text(max_size=40), st.integers(-5, 20).map(str))
payloads = st.builds(
    lambda node, index, value: f"{node}:{index}" + (f":{value}" if value is not None else ""),
    st.sampled_from([*NODES, "x", ""]),
    st.integers(-1, 12),
    st.one_of(st.none(), st.integers(-1, 20), st.text(max_size=5)),
) | st.text(max_size=20)
inbounds = st.one_of(
    texts.map(e.Inbound.of_text),
    payloads.map(e.Inbound.button),
    st.just(e.Inbound.wake()),
    st.one_of(st.none(), st.sampled_from(["drop", "rsvp", "other"])).map(e.Inbound.start),
)


def snapshot(data: st.DataObject, minutes: int) -> e.Facts:
    now = NOW + timedelta(minutes=minutes)
    start = NOW + timedelta(days=2)
    return e.Facts(
        now=now,
        event=data.draw(st.sampled_from([event_fact(NOW), None])),
        products=[
            e.ProductFact(10, "Hoodie", "", 4500, "EUR", "", data.draw(st.integers(0, 3)), ("H",)),
            e.ProductFact(11, "Cap", "", 1500, "XXX", "", data.draw(st.integers(0, 3))),
        ],
        slots=[
            e.SlotFact(
                5, "Sat 10:00", start, start + timedelta(hours=1), data.draw(st.integers(0, 2))
            ),
            e.SlotFact(6, "", start + timedelta(hours=1), start + timedelta(hours=2), 1),
        ],
        segments=frozenset(data.draw(st.sets(st.sampled_from(["VIP", "new"])))),
    )


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    node=st.sampled_from(NODES),
    data=st.data(),
    turns=st.lists(st.tuples(inbounds, st.integers(0, 5000)), min_size=1, max_size=8),
)
def test_random_inbound_never_crashes_any_node(
    node: str, data: st.DataObject, turns: list[tuple[e.Inbound, int]]
) -> None:
    state = e.ChatState(
        flow_key="popup_drop",
        flow_version=1,
        node=node,
        status=status_for(node),
        vars=data.draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "slot_id": st.sampled_from([5, 6, 99, "x"]),
                    "product_id": st.sampled_from([10, 11, 12, "H"]),
                    "email": st.just("ana@example.com"),
                    "slot_starts_at": st.sampled_from(["2026-06-03T10:00:00+00:00", "bad"]),
                },
            )
        ),
        wake_at=NOW + timedelta(hours=data.draw(st.integers(0, 72))),
        turns=1,
    )

    def answer(effect: e.AwaitedEffect) -> e.EffectResult:
        if data.draw(st.booleans()):
            return e.EffectResult(False, reason=data.draw(st.sampled_from(REASONS)), message="no")
        return ok_answer(effect)

    minutes = 0
    for inbound, later in turns:
        minutes += later
        turn = run(FLOW, state, inbound, snapshot(data, minutes), answer)
        state = turn.state
        assert state.node in FLOW.nodes
        assert state.status in e.STATUSES
        assert state.pending is None
        if state.status == "waiting_input":
            assert not isinstance(FLOW.nodes[state.node], WaitNode)
        for caps in (WEB, SMS, TELEGRAM):
            shown = degrade(turn.out, caps, now=NOW)
            if caps is SMS:
                state = state.model_copy(update={"numbered": numbered_choices(shown)})
        state = e.ChatState.model_validate_json(state.model_dump_json())


@settings(max_examples=100, deadline=None)
@given(label=st.text(min_size=1, max_size=30), typed=st.text(max_size=30))
def test_typed_text_against_any_label(label: str, typed: str) -> None:
    flow = Flow.model_validate(
        {
            "start": "a",
            "nodes": {
                "a": {"type": "message", "say": "?", "buttons": [{"label": label, "next": "b"}]},
                "b": {"type": "end"},
            },
        }
    )
    flow = load_compiled(flow.compiled())
    state = e.ChatState.initial(flow, "k", 1)
    state = run(flow, state, e.Inbound.of_text("hi"), snapshot_plain()).state
    after = run(flow, state, e.Inbound.of_text(typed), snapshot_plain()).state
    assert after.node in ("a", "b")
    assert ButtonSpec(label=label).label == label


def snapshot_plain() -> e.Facts:
    return e.Facts(now=NOW)


def answers_for(node_id: str) -> list[e.Inbound]:
    """Every kind of answer aimed at a node: its payloads (with product, slot and score
    values), its labels, the flow's keywords, a wake-up and deep links."""
    node = FLOW.nodes[node_id]
    payloads = [f"{node_id}:{i}" for i in range(4)]
    payloads += [f"{node_id}:{i}:{v}" for i in range(3) for v in (5, 6, 7, 10, 11)]
    labels = [b.label for b in getattr(node, "buttons", [])]
    words = [*labels, *FLOW.keywords, "hoodie", "Sat 10:00", "ana@example.com", "7", "?"]
    return [
        *map(e.Inbound.button, payloads),
        *map(e.Inbound.of_text, words),
        e.Inbound.wake(),
        e.Inbound.start(None),
        *map(e.Inbound.start, FLOW.entries),
    ]


@pytest.mark.parametrize("node", NODES)
def test_the_facts_a_turn_asks_for_are_enough(node: str) -> None:
    """The service reads only `engine.needs(...)`: at every node, for every kind of answer,
    a turn on those facts alone says and does exactly what it would with every fact."""
    full_facts = facts(NOW + timedelta(days=2, hours=-1), event=event_fact(NOW))
    full_facts.segments = frozenset({"VIP"})
    for status in sorted({status_for(node), "done", "active", "handed_off"}):
        state = e.ChatState(
            flow_key="popup_drop",
            flow_version=1,
            node=node,
            status=status,  # type: ignore[arg-type]
            vars={"slot_id": 5, "product_id": 10, "slot_starts_at": "2026-06-03T10:00:00+00:00"},
            wake_at=full_facts.now,
            turns=1,
        )
        for inbound in answers_for(node):
            need = e.needs(FLOW, state, inbound)
            for fail in (False, True):

                def answer(effect: e.AwaitedEffect, fail: bool = fail) -> e.EffectResult:
                    if fail:
                        return e.EffectResult(False, reason="sold_out", message="no")
                    return ok_answer(effect)

                limited = e.Facts(
                    now=full_facts.now,
                    event=full_facts.event,
                    products=full_facts.products if need.products else [],
                    slots=full_facts.slots if need.slots else [],
                    segments=full_facts.segments & need.segments,
                )
                full = e.Facts(
                    now=full_facts.now,
                    event=full_facts.event,
                    products=full_facts.products,
                    slots=full_facts.slots,
                    segments=full_facts.segments,
                )
                everything = run(FLOW, state, inbound, full, answer)
                enough = run(FLOW, state, inbound, limited, answer)
                where = (node, status, inbound, fail)
                assert enough.out == everything.out, where
                assert enough.effects == everything.effects, where
                assert enough.state == everything.state, where
