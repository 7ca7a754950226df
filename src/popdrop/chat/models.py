"""Chat tables: published flow versions, conversations, their messages, and chat events.

- `chat_flow_versions`: every publish of a flow key is a new immutable version (source and
  compiled JSON); a conversation keeps the version it started on.
- `chat_conversations`: one row per (org, channel, address). The address is looked up by
  its keyed hash (`address_hash`, like contact points); the clear `address` is kept only
  to deliver scheduled messages (reminders) over the channel, and is erased with the
  contact. When a session expires or ends, the next message starts a new session on the
  same row (`session_no` + 1) with the flow's latest version.
- `chat_messages`: the transcript (JSON bodies; voucher codes and ticket secrets redacted).
- `chat_events`: append-only funnel and drop-off rows (one per node entered, plus
  chat_started, card_viewed, rsvp, hold, voucher_issued, checkout_started, survey …).
  Appends never contend on a hot row; drop-off per node is a GROUP BY on an index.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.chat.lifecycle import ConversationStatus
from popdrop.core.db import Base, BigId, UTCDateTime
from popdrop.core.lifecycle import status_check


class FlowVersion(Base):
    __tablename__ = "chat_flow_versions"
    __table_args__ = (UniqueConstraint("org_id", "key", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    key: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    event_id: Mapped[int | None] = mapped_column(ForeignKey("events.id"), nullable=True)
    title: Mapped[str] = mapped_column(String(200), default="")
    source: Mapped[str] = mapped_column(Text)
    compiled: Mapped[str] = mapped_column(Text)  # JSON of the validated flow
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(200), default="")


class Conversation(Base):
    __tablename__ = "chat_conversations"
    __table_args__ = (
        UniqueConstraint("org_id", "channel", "address_hash"),
        Index("ix_chat_conversations_wake", "wake_at"),
        Index("ix_chat_conversations_recent", "org_id", "last_message_at"),
        Index("ix_chat_conversations_contact", "contact_id"),
        status_check(ConversationStatus),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    channel: Mapped[str] = mapped_column(String(16))
    address_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    address: Mapped[str | None] = mapped_column(String(200), nullable=True)
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contacts.id"), nullable=True)
    event_id: Mapped[int | None] = mapped_column(ForeignKey("events.id"), nullable=True)
    flow_key: Mapped[str] = mapped_column(String(64))
    flow_version: Mapped[int] = mapped_column(Integer)
    session_no: Mapped[int] = mapped_column(Integer, default=1)
    node: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(Text)  # JSON of engine.ChatState
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_message_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    wake_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    opted_out_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Host takeover: who took it over and when (status handed_off while a host has it).
    host_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    taken_over_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ChatMessage(Base):
    __tablename__ = "chat_messages"
    __table_args__ = (Index("ix_chat_messages_conversation", "conversation_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("chat_conversations.id", ondelete="CASCADE")
    )
    session_no: Mapped[int] = mapped_column(Integer)
    direction: Mapped[str] = mapped_column(String(8))  # in, out, host
    body: Mapped[str] = mapped_column(Text)  # JSON: an inbound, or an OutMessage
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ChatEvent(Base):
    """One funnel step or node entry of a conversation session (append-only)."""

    __tablename__ = "chat_events"
    __table_args__ = (
        Index("ix_chat_events_flow", "org_id", "flow_key", "flow_version", "kind", "node"),
        Index("ix_chat_events_kind_at", "org_id", "kind", "at"),
        Index("ix_chat_events_conversation", "conversation_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("chat_conversations.id", ondelete="CASCADE")
    )
    session_no: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(16))
    event_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    flow_key: Mapped[str] = mapped_column(String(64))
    flow_version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(24))
    node: Mapped[str | None] = mapped_column(String(40), nullable=True)
    ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    value: Mapped[int | None] = mapped_column(Integer, nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class ChatHost(Base):
    """An address (channel + keyed hash) whose `/commands` run as the organization's host."""

    __tablename__ = "chat_hosts"
    __table_args__ = (UniqueConstraint("org_id", "channel", "address_hash"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    channel: Mapped[str] = mapped_column(String(16))
    address_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    label: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ChatPin(Base):
    """The product card pinned for an event's chat customers."""

    __tablename__ = "chat_pins"

    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"), primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    pinned_at: Mapped[datetime] = mapped_column(UTCDateTime)
    pinned_by: Mapped[str] = mapped_column(String(200))


class WebInbox(Base):
    """Scheduled and host messages for a web visitor, kept until a socket of theirs takes
    them: at once, through the relay from another process, or when they come back."""

    __tablename__ = "chat_web_inbox"
    __table_args__ = (
        Index("ix_chat_web_inbox_conversation", "conversation_id", "id"),
        Index("ix_chat_web_inbox_created_at", "created_at"),  # the purge runs every tick
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("chat_conversations.id", ondelete="CASCADE")
    )
    body: Mapped[str] = mapped_column(Text)  # JSON: the messages as the widget gets them
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
