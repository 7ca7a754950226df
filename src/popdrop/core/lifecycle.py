"""Lifecycles as data: a status enum, the moves its table allows, the refusal of the rest.

Each aggregate with a status (a drop, an event, an RSVP, a ticket …) declares its statuses
as a `StrEnum` and ONE `Lifecycle`: for every status, the statuses it may move to. The
aggregate's writer asks the lifecycle before it writes (`check`), or, for set-based
conditional UPDATEs, lets the lifecycle say which rows may move (`sources`).

Rules:
- The table names every status of the enum (a terminal status maps to nothing), so a
  status added to the enum without a decision about its moves fails at import time.
- Staying in the same status is not a move: a writer that answers a repeated request
  idempotently does so before it asks (`check(s, s)` refuses unless the table says so).
- A refused move is `PopdropError("invalid_transition", …)`, a 409: the request was
  well-formed, the aggregate is in a state that does not allow it.
- `status_check` builds the database CHECK constraint from the same enum, so the schema
  refuses a status no code knows (a typo in raw SQL, a bad backfill).

Pure: no I/O, importable by pages and tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

from sqlalchemy import CheckConstraint

from popdrop.core.errors import PopdropError

S = TypeVar("S", bound=StrEnum)

INVALID_TRANSITION = "invalid_transition"


@dataclass(frozen=True)
class Lifecycle(Generic[S]):
    """The allowed moves of one aggregate's status: `moves[source]` = allowed targets."""

    noun: str  # what the aggregate is called in refusals ("drop", "event", …)
    statuses: type[S]
    moves: Mapping[S, frozenset[S]]
    _sources: Mapping[S, frozenset[S]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        missing = set(self.statuses) - set(self.moves)
        unknown = set(self.moves).union(*self.moves.values()) - set(self.statuses)
        if missing or unknown:
            raise ValueError(
                f"{self.noun} lifecycle: no moves declared for {sorted(missing)}, "
                f"unknown statuses {sorted(unknown)}"
            )
        sources = {
            target: frozenset(s for s, targets in self.moves.items() if target in targets)
            for target in self.statuses
        }
        object.__setattr__(self, "_sources", sources)

    def allows(self, source: S, target: S) -> bool:
        return target in self.moves[source]

    def check(self, source: S, target: S, *, action: str | None = None) -> S:
        """The target if the table allows the move; else the `invalid_transition` refusal
        (worded with the action the person asked for, when there is one)."""
        if self.allows(source, target):
            return target
        raise self.refusal(source, target, action=action)

    def refusal(self, source: S, target: S | None, *, action: str | None = None) -> PopdropError:
        """The `invalid_transition` error: worded with the action when there is one
        ("cannot resume a drop that is cancelled"); the target is left out when the
        action is refused from this status whatever it would lead to."""
        message = (
            f"cannot {action} a {self.noun} that is {source}"
            if action
            else f"a {self.noun} cannot go from {source} to {target}"
        )
        detail = {"from": str(source)} | ({"to": str(target)} if target is not None else {})
        return PopdropError(INVALID_TRANSITION, message, detail=detail)

    def sources(self, target: S) -> frozenset[S]:
        """Every status that may move to `target` (the WHERE of a conditional UPDATE)."""
        return self._sources[target]

    @property
    def terminal(self) -> frozenset[S]:
        """Statuses nothing leaves."""
        return frozenset(s for s, targets in self.moves.items() if not targets)

    def pairs(self) -> Iterable[tuple[S, S, bool]]:
        """Every (source, target, allowed) pair of distinct statuses: what tests walk."""
        for source in self.statuses:
            for target in self.statuses:
                if source != target:
                    yield source, target, self.allows(source, target)


def status_check(statuses: type[StrEnum], column: str = "status") -> CheckConstraint:
    """`CHECK (column IN (…every value of the enum…))`, named after the column (the naming
    convention makes it `ck_<table>_<column>`). The values are the enum's, in its order."""
    values = ", ".join(f"'{member.value}'" for member in statuses)
    return CheckConstraint(f"{column} IN ({values})", name=column)


class JobStatus(StrEnum):
    """A background job's life (a contact import, a large voucher issue):

        queued ──▶ running ──▶ done
           └──────────┴──────▶ failed

    A job taken over or relaunched after its runner stopped stays `running` (not a move);
    `done` and `failed` are final."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


# Jobs not yet finished: what a restart or the worker tick launches again.
UNFINISHED_JOB_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)


def job_lifecycle(name: str) -> Lifecycle[JobStatus]:
    """The one job table, under the name its refusals use ("import job", "issue job")."""
    return Lifecycle(
        name,
        JobStatus,
        {
            JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED}),
            JobStatus.RUNNING: frozenset({JobStatus.DONE, JobStatus.FAILED}),
            JobStatus.DONE: frozenset(),
            JobStatus.FAILED: frozenset(),
        },
    )
