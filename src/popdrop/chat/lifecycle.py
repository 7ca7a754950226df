"""The life of a chat conversation, as data.

A conversation walks its flow: `active` while the engine runs nodes, `waiting_input` for
the customer's answer, `waiting_until` for a timer (a reminder), `handed_off` while a host
has it, and it ends `done` (the flow finished), `expired` (no answer in time, or erased)
or `error` (the flow looped without waiting). An ended conversation starts a new session
on the same row with the customer's next message.

Rules:
- A host may take over a conversation in any status; only `hand_back` (to `active`) or
  the conversation's expiry/erasure (`expired`) ends the takeover: while handed off, the
  engine does not step.
- Every other status may move to any status the engine reaches in one turn.

Pure: no I/O; the pure engine, pages and tests import it.
"""

from __future__ import annotations

from enum import StrEnum

from popdrop.core.lifecycle import Lifecycle


class ConversationStatus(StrEnum):
    ACTIVE = "active"
    WAITING_INPUT = "waiting_input"
    WAITING_UNTIL = "waiting_until"
    HANDED_OFF = "handed_off"
    DONE = "done"
    EXPIRED = "expired"
    ERROR = "error"


# Statuses whose next inbound message starts the flow over (a new session).
ENDED_CONVERSATION_STATUSES = (
    ConversationStatus.DONE,
    ConversationStatus.EXPIRED,
    ConversationStatus.ERROR,
)
# Statuses in which a conversation lapses at `expires_at`.
EXPIRING_CONVERSATION_STATUSES = (ConversationStatus.ACTIVE, ConversationStatus.WAITING_INPUT)


def _engine_moves(source: ConversationStatus) -> frozenset[ConversationStatus]:
    return frozenset(s for s in ConversationStatus if s is not source)


CONVERSATION_LIFECYCLE: Lifecycle[ConversationStatus] = Lifecycle(
    "conversation",
    ConversationStatus,
    {
        **{
            source: _engine_moves(source)
            for source in ConversationStatus
            if source is not ConversationStatus.HANDED_OFF
        },
        ConversationStatus.HANDED_OFF: frozenset(
            {ConversationStatus.ACTIVE, ConversationStatus.EXPIRED}
        ),
    },
)
