"""The Day+1 NPS survey: one invitation per person and event, and its answer on the same row.

Rules the schema keeps:
- A person is asked once per event: (event_id, contact_id) is unique. An erased contact's
  invitations keep their score (NPS still adds up) but lose the contact, the person
  reference and the comment, so several anonymous rows of one event may coexist.
- `event_id` and `contact_id` name rows of domains on higher floors (events, audience):
  plain ids, not foreign keys, as in the funnel log, so this floor depends on no domain.
- `person` is the funnel's reference (`c:<contact id>`), never an email or a phone.
- The status moves only as `SURVEY_LIFECYCLE` says (scheduled → sent → answered, or
  scheduled → skipped); the database refuses any other value, a score outside 0-10, a
  comment over 1000 characters, and an answered row without a score.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.core.db import Base, BigId, UTCDateTime
from popdrop.core.lifecycle import Lifecycle, status_check

COMMENT_MAX = 1000
SCORE_MIN, SCORE_MAX = 0, 10


class SurveyStatus(StrEnum):
    SCHEDULED = "scheduled"  # waiting for `due_at`
    SENT = "sent"  # its message is in the notification outbox (the drainer sends it)
    ANSWERED = "answered"  # score (and maybe a comment) recorded; once only
    SKIPPED = "skipped"  # at due time no channel was left (STOP, revoked, erased)


SURVEY_LIFECYCLE: Lifecycle[SurveyStatus] = Lifecycle(
    "survey invitation",
    SurveyStatus,
    {
        SurveyStatus.SCHEDULED: frozenset({SurveyStatus.SENT, SurveyStatus.SKIPPED}),
        SurveyStatus.SENT: frozenset({SurveyStatus.ANSWERED}),
        SurveyStatus.ANSWERED: frozenset(),
        SurveyStatus.SKIPPED: frozenset(),
    },
)


class SurveyChannel(StrEnum):
    """Where the invitation goes: a message by email or SMS, or into the person's open
    web chat (`chat`) or Telegram conversation."""

    EMAIL = "email"
    SMS = "sms"
    CHAT = "chat"
    TELEGRAM = "telegram"


class SurveyInvitation(Base):
    __tablename__ = "survey_invitations"
    __table_args__ = (
        UniqueConstraint("event_id", "contact_id"),
        # The sender's queue: scheduled rows by due time.
        Index("ix_survey_invitations_due", "status", "due_at"),
        Index("ix_survey_invitations_event", "org_id", "event_id", "status"),
        Index("ix_survey_invitations_contact", "org_id", "contact_id"),
        status_check(SurveyStatus),
        status_check(SurveyChannel, "channel"),
        CheckConstraint(
            f"score IS NULL OR (score >= {SCORE_MIN} AND score <= {SCORE_MAX})", name="score"
        ),
        CheckConstraint(f"comment IS NULL OR length(comment) <= {COMMENT_MAX}", name="comment"),
        CheckConstraint("status <> 'answered' OR score IS NOT NULL", name="answered_score"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    event_id: Mapped[int] = mapped_column(BigInteger)
    contact_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    person: Mapped[str | None] = mapped_column(String(48), nullable=True)
    channel: Mapped[str] = mapped_column(String(12))
    status: Mapped[str] = mapped_column(String(12), default=SurveyStatus.SCHEDULED)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    score: Mapped[int | None] = mapped_column(Integer, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
