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

from popdrop.core.lifecycle import UNFINISHED_JOB_STATUSES, JobStatus, Lifecycle, job_lifecycle

# The issue job's life is core's job lifecycle (shared with the contact import job).
IssueJobStatus = JobStatus
ISSUE_JOB_LIFECYCLE: Lifecycle[JobStatus] = job_lifecycle("issue job")

# Jobs not yet finished: what the worker tick (re)starts.
UNFINISHED_ISSUE_STATUSES = UNFINISHED_JOB_STATUSES
