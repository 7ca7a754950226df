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

from popdrop.core.lifecycle import UNFINISHED_JOB_STATUSES, JobStatus, Lifecycle, job_lifecycle


class ConsentState(StrEnum):
    NONE = "none"
    PENDING = "pending"
    GRANTED = "granted"
    REVOKED = "revoked"


# The import job's life is core's job lifecycle (shared with the voucher issue job).
ImportJobStatus = JobStatus
IMPORT_JOB_LIFECYCLE: Lifecycle[JobStatus] = job_lifecycle("import job")
UNFINISHED_IMPORT_STATUSES = UNFINISHED_JOB_STATUSES
