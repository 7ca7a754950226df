"""Pure-engine helpers: facts for a pop-up, and a runner that answers pending effects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from popdrop.chat import engine as e
from popdrop.chat.flow import Flow, load_flow, shipped_source
from popdrop.chat.messages import OutMessage

NOW = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
Answer = Callable[[e.AwaitedEffect], e.EffectResult]


def event_fact(now: datetime = NOW) -> e.EventFact:
    return e.EventFact(
        id=1,
        title="Summer Drop",
        starts_at=now + timedelta(days=2),
        ends_at=now + timedelta(days=2, hours=6),
        timezone="Europe/Paris",
        venue="Canal St",
    )


def facts(now: datetime = NOW, **changes: object) -> e.Facts:
    base = e.Facts(
        now=now,
        event=event_fact(now),
        products=[
            e.ProductFact(10, "Hoodie", "Organic cotton", 4500, "EUR", "", 3, ("HOOD-M",)),
            e.ProductFact(11, "Cap", "", 1500, "EUR", "", 0, ("CAP",)),
        ],
        slots=[
            e.SlotFact(5, "Morning", now + timedelta(days=2), now + timedelta(days=2, hours=1), 4),
            e.SlotFact(
                6,
                "",
                now + timedelta(days=2, hours=1),
                now + timedelta(days=2, hours=2),
                0,
            ),
        ],
    )
    for name, value in changes.items():
        setattr(base, name, value)
    return base


def ok_answer(effect: e.AwaitedEffect) -> e.EffectResult:
    """Every action succeeds, with data shaped like the service's."""
    if isinstance(effect, e.RsvpEffect):
        return e.EffectResult(
            True,
            data={"rsvp_id": 7, "rsvp_status": "confirmed"},
            secrets={"ticket_secret": "SECRET", "ticket_url": "http://x/t/SECRET"},
        )
    if isinstance(effect, e.HoldEffect):
        return e.EffectResult(True, data={"hold_id": 21, "hold_until": "Sat 12:15"})
    if isinstance(effect, e.IssueVoucherEffect):
        return e.EffectResult(True, data={"voucher_id": 3}, secrets={"voucher_code": "CODE-1234"})
    if isinstance(effect, e.SendTicketEffect):
        return e.EffectResult(
            True,
            data={"ticket_id": 9},
            secrets={"ticket_secret": "SECRET", "ticket_url": "http://x/t/SECRET"},
        )
    return e.EffectResult(True, secrets={"checkout_url": "http://x/checkout/TOKEN"})


@dataclass
class Turn:
    state: e.ChatState
    out: list[OutMessage] = field(default_factory=list)
    effects: list[e.Effect] = field(default_factory=list)
    visited: list[str] = field(default_factory=list)

    def texts(self) -> list[str]:
        return [getattr(m, "text", "") for m in self.out]


def run(
    flow: Flow,
    state: e.ChatState,
    inbound: e.Inbound | None,
    snapshot: e.Facts,
    answer: Answer = ok_answer,
) -> Turn:
    """One turn as the service runs it: step, answer the pending action, step again."""
    result = e.step(flow, state, inbound, snapshot)
    turn = Turn(result.state)
    for _ in range(200):
        turn.state = result.state
        turn.out += result.outbound
        turn.effects += result.effects
        turn.visited += result.visited
        pending = result.pending
        if pending is None:
            return turn
        snapshot.results[pending.key] = answer(pending)
        result = e.step(flow, result.state, None, snapshot)
    raise AssertionError("the turn did not settle")


def shipped() -> Flow:
    return load_flow(shipped_source("popup_drop"))


def start(flow: Flow) -> e.ChatState:
    return e.ChatState.initial(flow, "test", 1)
