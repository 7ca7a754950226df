"""Tables of the funnel: the append-only event log and its rollups.

Rules the schema keeps:
- The log holds no contact detail: `person` is a contact id (`c:<id>`) or a keyed
  reference (`k:<digest>`), never an email or a phone; erasing a contact blanks it.
- `event_id`, `drop_id`, `partner_id`, `lane_id` name rows of domains on higher floors;
  they are tags, not foreign keys, so this floor depends on no domain table.
- A log row is folded into the rollups exactly once: `rolled` flips in the transaction
  that adds it to `funnel_rollups`, and only from false to true.
- A rollup row is one bucket (a minute, grain 1, or an hour, grain 60) of one combination
  of dimensions; a missing dimension is 0 or '' so the key is unique on both databases.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.core.db import Base, BigId, UTCDateTime


class FunnelEvent(Base):
    __tablename__ = "funnel_events"
    __table_args__ = (
        Index("ix_funnel_events_event", "org_id", "event_id", "kind", "at"),
        Index("ix_funnel_events_drop", "org_id", "drop_id", "kind", "at"),
        Index("ix_funnel_events_person", "org_id", "person", "at"),
        # A row's own subject (`send:40`, `rsvp:12`): outcomes and visits find the person.
        Index("ix_funnel_events_subject", "org_id", "subject"),
        # The fold's queue: only rows not yet in the rollups.
        Index(
            "ix_funnel_events_unrolled",
            "id",
            postgresql_where=text("NOT rolled"),
            sqlite_where=text("rolled = 0"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(24))
    channel: Mapped[str] = mapped_column(String(12), default="", server_default="")
    event_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    drop_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    variant: Mapped[str] = mapped_column(String(16), default="", server_default="")
    segment: Mapped[str] = mapped_column(String(8), default="", server_default="")
    partner_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    lane_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # A small category of the kind: a bounce's type, a payment failure's code, an NPS
    # answer's class (promoter / passive / detractor).
    label: Mapped[str] = mapped_column(String(24), default="", server_default="")
    person: Mapped[str | None] = mapped_column(String(48), nullable=True)
    # The row this event is about (`order:12`, `send:40`), for tracing and de-duplication.
    subject: Mapped[str | None] = mapped_column(String(48), nullable=True)
    # Money in minor units (with `currency`), or a score (NPS 0-10); 0 otherwise.
    value: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    currency: Mapped[str] = mapped_column(String(3), default="", server_default="")
    rolled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class FunnelRollup(Base):
    __tablename__ = "funnel_rollups"
    __table_args__ = (
        Index("ix_funnel_rollups_event", "org_id", "event_id", "grain", "bucket"),
        Index("ix_funnel_rollups_drop", "org_id", "drop_id", "grain", "bucket"),
        Index("ix_funnel_rollups_partner", "org_id", "partner_id", "grain", "bucket"),
    )

    org_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    grain: Mapped[int] = mapped_column(Integer, primary_key=True)  # minutes: 1 or 60
    bucket: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    kind: Mapped[str] = mapped_column(String(24), primary_key=True)
    channel: Mapped[str] = mapped_column(String(12), primary_key=True)
    event_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    drop_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    variant: Mapped[str] = mapped_column(String(16), primary_key=True)
    segment: Mapped[str] = mapped_column(String(8), primary_key=True)
    partner_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    lane_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    label: Mapped[str] = mapped_column(String(24), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[int] = mapped_column(BigInteger)
