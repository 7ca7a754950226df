"""Audience statuses as data: a contact's consent per channel, and a CSV import job's life.

Consent (`contacts.consent_email|sms|chat`) is the current state of an append-only ledger
(`consent_events`), not a lifecycle of its own: any state may follow any other when the
person (or the evidence) says so — `none` (never asked), `pending` (double opt-in sent),
`granted`, `revoked`. Only `granted` sends.

Import job:

    queued ──▶ running ──▶ done
       └──────────┴──────▶ failed

Rules:
- A job relaunched after a restart stays `running` (that is not a move); `done` and
  `failed` are final.

Pure: no I/O; pages and tests import it.
"""

from __future__ import annotations

from enum import StrEnum

from popdrop.core.lifecycle import Lifecycle


class ConsentState(StrEnum):
    NONE = "none"
    PENDING = "pending"
    GRANTED = "granted"
    REVOKED = "revoked"


class ImportJobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


IMPORT_JOB_LIFECYCLE: Lifecycle[ImportJobStatus] = Lifecycle(
    "import job",
    ImportJobStatus,
    {
        ImportJobStatus.QUEUED: frozenset({ImportJobStatus.RUNNING, ImportJobStatus.FAILED}),
        ImportJobStatus.RUNNING: frozenset({ImportJobStatus.DONE, ImportJobStatus.FAILED}),
        ImportJobStatus.DONE: frozenset(),
        ImportJobStatus.FAILED: frozenset(),
    },
)

# Jobs not yet finished: what a restart launches again.
UNFINISHED_IMPORT_STATUSES = (ImportJobStatus.QUEUED, ImportJobStatus.RUNNING)
