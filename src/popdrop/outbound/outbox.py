"""The notification outbox: one-off messages to one person (a waiting-list offer, …) that
must leave the process if, and only if, the transaction that decided them commits.

Rules:
- `enqueue` writes one `notifications` row inside the caller's transaction, so a
  rolled-back decision sends nothing and a committed one is never lost. It signals the
  `OUTBOX_TOPIC` after commit (`core.db.signal_after_commit`): a process that runs the
  worker drains at once; otherwise the worker tick finds the row.
- Rows are unique per (kind, subject, channel): enqueueing the same notice twice (a retried
  transaction, a second caller) keeps the first row.
- The row carries what rendering needs (`payload`, JSON), not the rendered text: the
  drainer renders at send time, so a notice whose reason is gone (the offer was claimed)
  is skipped, and links carry the sender's base URL. A payload may hold a secret the
  person needs (a voucher code): it lives only while the row is pending; `finish` clears
  it once the row is sent, skipped or given up.
- A drainer `claim`s due rows with a lease: a row stays `sending` until `finish` or
  `retry`; a worker that crashed mid-send leaves it `sending`, and once the lease is over
  another drainer claims it again (at-least-once; `attempts` counts every claim).
- `retry` puts a row back with exponential backoff until `max_attempts`, then `failed`.
- The moves: `NOTIFICATION_LIFECYCLE` (pending → sending → sent | skipped | failed, or
  back to pending; a lapsed lease is sending → sending); every write is a conditional
  UPDATE from the statuses that table allows.
- Consent and suppression are not this module's business (outbound sits below audience):
  the drainer in `popdrop.usecases.notify` checks them right before the provider call.
- `forget` deletes a person's rows, unsent ones included (GDPR erase).

This module imports only `core`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    delete,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.core.db import Base, BigId, UTCDateTime, dialect_insert, signal_after_commit, table_of
from popdrop.core.lifecycle import Lifecycle, status_check

OUTBOX_TOPIC = "outbox"
MAX_ATTEMPTS = 6
FIRST_RETRY_SECONDS = 30.0
MAX_RETRY_SECONDS = 3600.0
LEASE_SECONDS = 120.0


class NotificationStatus(StrEnum):
    PENDING = "pending"  # due from `not_before`
    SENDING = "sending"  # claimed by a drainer until `claimed_at` + the lease
    SENT = "sent"  # the provider accepted it
    SKIPPED = "skipped"  # refused at send time (consent, suppression) or no longer relevant
    FAILED = "failed"  # a permanent provider refusal, or out of attempts


# A claim takes a pending row, or retakes one whose lease ran out (sending → sending).
NOTIFICATION_LIFECYCLE: Lifecycle[NotificationStatus] = Lifecycle(
    "notification",
    NotificationStatus,
    {
        NotificationStatus.PENDING: frozenset({NotificationStatus.SENDING}),
        NotificationStatus.SENDING: frozenset(
            {
                NotificationStatus.SENDING,
                NotificationStatus.SENT,
                NotificationStatus.SKIPPED,
                NotificationStatus.FAILED,
                NotificationStatus.PENDING,
            }
        ),
        NotificationStatus.SENT: frozenset(),
        NotificationStatus.SKIPPED: frozenset(),
        NotificationStatus.FAILED: frozenset(),
    },
)


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    CHAT = "chat"  # into a chat conversation; the recipient is `chat:<conversation id>`


class Notification(Base):
    """One message to one address on one channel, waiting in (or done with) the outbox."""

    __tablename__ = "notifications"
    __table_args__ = (
        UniqueConstraint("kind", "subject", "channel", name="uq_notifications_dedup"),
        Index("ix_notifications_due", "status", "not_before"),
        Index("ix_notifications_recipient", "org_id", "recipient"),
        status_check(NotificationStatus),
        status_check(Channel, "channel"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    kind: Mapped[str] = mapped_column(String(40))  # what renders it, e.g. "waitlist_offer"
    subject: Mapped[str] = mapped_column(String(80))  # what it is about, e.g. "offer:12"
    channel: Mapped[str] = mapped_column(String(8))
    # An email address, an E.164 number, or `chat:<conversation id>`.
    recipient: Mapped[str] = mapped_column(String(254))
    payload: Mapped[str] = mapped_column(Text, default="{}")
    status: Mapped[str] = mapped_column(String(16), default=NotificationStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    provider_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(300), nullable=True)


_notifications = table_of(Notification)


@dataclass(frozen=True)
class Notice:
    """What a caller asks to send: `kind` names the renderer, `subject` what it is about."""

    org_id: int
    kind: str
    subject: str
    channel: Channel
    recipient: str
    payload: dict[str, Any]


async def enqueue(session: AsyncSession, notices: Sequence[Notice], *, now: datetime) -> None:
    """Write the notices in the caller's transaction (a duplicate keeps the first row) and
    wake the drainer once the transaction commits."""
    if not notices:
        return
    rows = [
        {
            "org_id": n.org_id,
            "kind": n.kind,
            "subject": n.subject,
            "channel": str(n.channel),
            "recipient": n.recipient,
            "payload": json.dumps(n.payload, sort_keys=True),
            "status": NotificationStatus.PENDING.value,
            "attempts": 0,
            "not_before": now,
            "created_at": now,
        }
        for n in notices
    ]
    conn = await session.connection()
    statement = dialect_insert(conn.dialect.name, _notifications).on_conflict_do_nothing(
        index_elements=["kind", "subject", "channel"]
    )
    await conn.execute(statement, rows)
    signal_after_commit(session, OUTBOX_TOPIC)


def due_condition(now: datetime, lease_seconds: float = LEASE_SECONDS) -> Any:
    """Rows a drainer may take now: pending and due, or `sending` past their lease."""
    stale = now - timedelta(seconds=lease_seconds)
    return or_(
        (_notifications.c.status == NotificationStatus.PENDING)
        & (_notifications.c.not_before <= now),
        (_notifications.c.status == NotificationStatus.SENDING)
        & (_notifications.c.claimed_at < stale),
    )


async def claim(
    session: AsyncSession,
    *,
    now: datetime,
    limit: int = 50,
    lease_seconds: float = LEASE_SECONDS,
) -> list[Notification]:
    """Take up to `limit` due rows (oldest first) under a lease, counting the attempt.
    Each row is taken by one conditional UPDATE, so two drainers never both hold it."""
    ids = list(
        await session.scalars(
            select(_notifications.c.id)
            .where(due_condition(now, lease_seconds))
            .order_by(_notifications.c.id)
            .limit(limit)
        )
    )
    taken: list[Notification] = []
    for row_id in ids:
        row = (
            await session.execute(
                update(Notification)
                .where(Notification.id == row_id, due_condition(now, lease_seconds))
                .values(
                    status=NotificationStatus.SENDING,
                    claimed_at=now,
                    attempts=Notification.attempts + 1,
                )
                .returning(Notification)
            )
        ).scalar_one_or_none()
        if row is not None:
            taken.append(row)
    return taken


async def finish(
    session: AsyncSession,
    row_id: int,
    status: NotificationStatus,
    *,
    now: datetime,
    provider_id: str | None = None,
    error: str | None = None,
) -> None:
    """Close a claimed row (sent, skipped or failed) and drop its payload: a secret it held
    is not kept once the message is out (or never will be)."""
    await session.execute(
        update(Notification)
        .where(
            Notification.id == row_id,
            Notification.status.in_(NOTIFICATION_LIFECYCLE.sources(status)),
        )
        .values(
            status=status,
            finished_at=now,
            provider_id=provider_id,
            last_error=error[:300] if error else None,
            payload="{}",
        )
    )


def backoff_seconds(attempts: int, retry_after: float | None = None) -> float:
    """30 s, 60 s, 120 s … capped at an hour; a provider's Retry-After wins when longer."""
    delay = min(FIRST_RETRY_SECONDS * 2.0 ** max(attempts - 1, 0), MAX_RETRY_SECONDS)
    return max(delay, retry_after or 0.0)


async def retry(
    session: AsyncSession,
    row: Notification,
    *,
    now: datetime,
    error: str,
    retry_after: float | None = None,
    max_attempts: int = MAX_ATTEMPTS,
) -> NotificationStatus:
    """A transient failure: back to pending after a backoff, or `failed` when this was the
    last attempt. Returns the row's new status."""
    if row.attempts >= max_attempts:
        await finish(session, row.id, NotificationStatus.FAILED, now=now, error=error)
        return NotificationStatus.FAILED
    delay = backoff_seconds(row.attempts, retry_after)
    await session.execute(
        update(Notification)
        .where(
            Notification.id == row.id,
            Notification.status.in_(NOTIFICATION_LIFECYCLE.sources(NotificationStatus.PENDING)),
        )
        .values(
            status=NotificationStatus.PENDING,
            claimed_at=None,
            not_before=now + timedelta(seconds=delay),
            last_error=error[:300],
        )
    )
    return NotificationStatus.PENDING


async def forget(session: AsyncSession, org_id: int, recipients: Sequence[str]) -> int:
    """Delete every notification to these addresses (erase); the number deleted. Unsent
    ones never go out; finished ones would keep the address in clear."""
    if not recipients:
        return 0
    result = await session.execute(
        delete(Notification).where(
            Notification.org_id == org_id, Notification.recipient.in_(list(recipients))
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)
