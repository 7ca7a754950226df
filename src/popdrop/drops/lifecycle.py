"""The life of a drop and of its send rows, as data.

A drop moves by actions. `DROP_ACTIONS` is the one table: for each action, the statuses it
may start from and where it may lead from each. The status-to-status table
(`DROP_LIFECYCLE`), the buttons the drop page offers (`operator_actions`) and the
conditional UPDATE that closes drained drops are all derived from it.

    draft ──start──▶ scheduled ──start (due)──▶ sending ──finish──▶ done
      │ └──────────start (now)─────────────────▶  │ ▲
      │               │ ▲                  pause  │ │ resume
      │         pause │ │ resume (never started)  ▼ │
      │               └─▶ paused ◀────────────────┘
      └──── cancel (from draft, scheduled, sending, paused) ──▶ cancelled

Rules:
- `start` leads to `scheduled` while `scheduled_at` is ahead, else to `sending` (the
  recipients are frozen at that moment); the worker's tick starts a due scheduled drop
  with the same action.
- `resume` leads back to `sending` when the drop had started, else to `scheduled`.
- `finish` is the system's: a sending drop with nothing left to send is `done`.
- `done` and `cancelled` are final.
- The seed test runs while the drop can still be started (it gates the start).

Send rows: `pending` (due at `not_before`), `held` (outside an A/B sample until the
winner is known), `claimed` (leased by a worker), then `sent`, `failed` or `skipped`
(`delivered` at once when the transport delivers by itself: the development mailbox);
provider feedback turns a sent row `delivered` or `bounced`.

Pure: no I/O; pages and tests import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from popdrop.core.lifecycle import Lifecycle


class DropStatus(StrEnum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    SENDING = "sending"
    PAUSED = "paused"
    DONE = "done"
    CANCELLED = "cancelled"


class SeedStatus(StrEnum):
    """The seed test's verdict; a drop starts only when it passed or an owner overrode it."""

    UNTESTED = "untested"
    PASSED = "passed"
    FAILED = "failed"
    OVERRIDDEN = "overridden"


SEED_CLEARED = frozenset({SeedStatus.PASSED, SeedStatus.OVERRIDDEN})


class DropAction(StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    FINISH = "finish"  # the system's: nothing left to send


# Where each action may lead, from each status it may start from.
DROP_ACTIONS: Mapping[DropAction, Mapping[DropStatus, frozenset[DropStatus]]] = {
    DropAction.START: {
        DropStatus.DRAFT: frozenset({DropStatus.SCHEDULED, DropStatus.SENDING}),
        DropStatus.SCHEDULED: frozenset({DropStatus.SENDING}),
    },
    DropAction.PAUSE: {
        DropStatus.SCHEDULED: frozenset({DropStatus.PAUSED}),
        DropStatus.SENDING: frozenset({DropStatus.PAUSED}),
    },
    DropAction.RESUME: {
        DropStatus.PAUSED: frozenset({DropStatus.SENDING, DropStatus.SCHEDULED}),
    },
    DropAction.CANCEL: {
        source: frozenset({DropStatus.CANCELLED})
        for source in (
            DropStatus.DRAFT,
            DropStatus.SCHEDULED,
            DropStatus.SENDING,
            DropStatus.PAUSED,
        )
    },
    DropAction.FINISH: {
        DropStatus.SENDING: frozenset({DropStatus.DONE}),
    },
}

# The status-to-status table: every move some action makes.
DROP_LIFECYCLE: Lifecycle[DropStatus] = Lifecycle(
    "drop",
    DropStatus,
    {
        source: frozenset().union(
            *(table.get(source, frozenset()) for table in DROP_ACTIONS.values())
        )
        for source in DropStatus
    },
)

# The buttons of the drop page, in the order they are shown (`finish` is the system's).
OPERATOR_ACTIONS = (DropAction.START, DropAction.PAUSE, DropAction.RESUME, DropAction.CANCEL)
SEED_TEST = "seed-test"


def action_leads(action: DropAction, source: DropStatus) -> frozenset[DropStatus]:
    """Where `action` may lead a drop that is `source` (empty: the action is refused)."""
    return DROP_ACTIONS[action].get(source, frozenset())


def action_sources(action: DropAction, target: DropStatus) -> tuple[DropStatus, ...]:
    """The statuses from which `action` may lead to `target` (a conditional UPDATE's WHERE),
    in the enum's order."""
    return tuple(s for s in DropStatus if target in action_leads(action, s))


def can_seed_test(status: DropStatus) -> bool:
    """The seed test gates the start, so it runs while the drop can still be started."""
    return bool(action_leads(DropAction.START, status))


def operator_actions(status: DropStatus) -> frozenset[str]:
    """The buttons a drop in `status` offers: every operator action the table allows from
    it, plus the seed test while the drop can start."""
    offered = {str(action) for action in OPERATOR_ACTIONS if action_leads(action, status)}
    if can_seed_test(status):
        offered.add(SEED_TEST)
    return frozenset(offered)


class SendRowStatus(StrEnum):
    PENDING = "pending"
    HELD = "held"
    CLAIMED = "claimed"
    SENT = "sent"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    FAILED = "failed"
    SKIPPED = "skipped"


# The moves a send row makes: the pipeline's (claim, release, defer, send, skip), the A/B
# decision's (held rows go to the winner or are skipped), cancel's (unsent rows skipped)
# and the providers' feedback (delivery, bounce, a late SMS failure).
SEND_ROW_LIFECYCLE: Lifecycle[SendRowStatus] = Lifecycle(
    "send row",
    SendRowStatus,
    {
        SendRowStatus.PENDING: frozenset({SendRowStatus.CLAIMED, SendRowStatus.SKIPPED}),
        SendRowStatus.HELD: frozenset({SendRowStatus.PENDING, SendRowStatus.SKIPPED}),
        SendRowStatus.CLAIMED: frozenset(
            {
                SendRowStatus.PENDING,
                SendRowStatus.SENT,
                SendRowStatus.DELIVERED,  # a transport that delivers at once (the mailbox)
                SendRowStatus.FAILED,
                SendRowStatus.SKIPPED,
            }
        ),
        SendRowStatus.SENT: frozenset(
            {SendRowStatus.DELIVERED, SendRowStatus.BOUNCED, SendRowStatus.FAILED}
        ),
        SendRowStatus.DELIVERED: frozenset({SendRowStatus.BOUNCED, SendRowStatus.FAILED}),
        SendRowStatus.BOUNCED: frozenset(),
        SendRowStatus.FAILED: frozenset({SendRowStatus.DELIVERED, SendRowStatus.BOUNCED}),
        SendRowStatus.SKIPPED: frozenset(),
    },
)

# Rows a provider accepted: what rates and A/B outcomes count.
SENT_ROW_STATUSES = (SendRowStatus.SENT, SendRowStatus.DELIVERED, SendRowStatus.BOUNCED)
# Rows with something still to do: a drop with none of these left is drained.
OPEN_ROW_STATUSES = (SendRowStatus.PENDING, SendRowStatus.HELD, SendRowStatus.CLAIMED)
# Rows a cancel skips (a claimed row is in a worker's hands; it sees the cancel itself).
UNSENT_ROW_STATUSES = (SendRowStatus.PENDING, SendRowStatus.HELD)
