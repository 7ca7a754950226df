"""Voucher vault statuses as data: a background issue job's life.

Issue job (a batch above `schemas.JOB_THRESHOLD` codes, issued in chunks by the worker):

    queued ──▶ running ──▶ done
       └──────────┴──────▶ failed

Rules:
- A job claimed again after its runner stopped (its lease ran out) stays `running`: that
  is not a move. `done` and `failed` are final.
- Whether a done job's codes were downloaded is not a status (`downloaded_at`).

Pure: no I/O; pages and tests import it.
"""

from __future__ import annotations

from enum import StrEnum

from popdrop.core.lifecycle import Lifecycle


class IssueJobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


ISSUE_JOB_LIFECYCLE: Lifecycle[IssueJobStatus] = Lifecycle(
    "issue job",
    IssueJobStatus,
    {
        IssueJobStatus.QUEUED: frozenset({IssueJobStatus.RUNNING, IssueJobStatus.FAILED}),
        IssueJobStatus.RUNNING: frozenset({IssueJobStatus.DONE, IssueJobStatus.FAILED}),
        IssueJobStatus.DONE: frozenset(),
        IssueJobStatus.FAILED: frozenset(),
    },
)

# Jobs not yet finished: what the worker tick (re)starts.
UNFINISHED_ISSUE_STATUSES = (IssueJobStatus.QUEUED, IssueJobStatus.RUNNING)
