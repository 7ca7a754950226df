"""chat: flow versions, conversations, messages, chat events

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 16:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _id() -> sa.Column[int]:
    return sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        autoincrement=True,
        nullable=False,
    )


def _ref(name: str, nullable: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "chat_flow_versions",
        _id(),
        _ref("org_id"),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _ref("event_id", nullable=True),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("compiled", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_chat_flow_versions_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_chat_flow_versions_org_id_organizations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_flow_versions")),
        sa.UniqueConstraint(
            "org_id", "key", "version", name=op.f("uq_chat_flow_versions_org_id_key_version")
        ),
    )
    op.create_table(
        "chat_conversations",
        _id(),
        _ref("org_id"),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("address_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("address", sa.String(length=200), nullable=True),
        _ref("contact_id", nullable=True),
        _ref("event_id", nullable=True),
        sa.Column("flow_key", sa.String(length=64), nullable=False),
        sa.Column("flow_version", sa.Integer(), nullable=False),
        sa.Column("session_no", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_message_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("wake_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("opted_out_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("host_ref", sa.String(length=200), nullable=True),
        sa.Column("taken_over_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["contact_id"], ["contacts.id"], name=op.f("fk_chat_conversations_contact_id_contacts")
        ),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_chat_conversations_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_chat_conversations_org_id_organizations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_conversations")),
        sa.UniqueConstraint(
            "org_id",
            "channel",
            "address_hash",
            name=op.f("uq_chat_conversations_org_id_channel_address_hash"),
        ),
    )
    op.create_index("ix_chat_conversations_wake", "chat_conversations", ["wake_at"], unique=False)
    op.create_index(
        "ix_chat_conversations_recent",
        "chat_conversations",
        ["org_id", "last_message_at"],
        unique=False,
    )
    op.create_index(
        "ix_chat_conversations_contact", "chat_conversations", ["contact_id"], unique=False
    )
    op.create_table(
        "chat_messages",
        _id(),
        _ref("org_id"),
        _ref("conversation_id"),
        sa.Column("session_no", sa.Integer(), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["chat_conversations.id"],
            name=op.f("fk_chat_messages_conversation_id_chat_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_chat_messages_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_messages")),
    )
    op.create_index(
        "ix_chat_messages_conversation", "chat_messages", ["conversation_id", "id"], unique=False
    )
    op.create_table(
        "chat_events",
        _id(),
        _ref("org_id"),
        _ref("conversation_id"),
        sa.Column("session_no", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.Column("flow_key", sa.String(length=64), nullable=False),
        sa.Column("flow_version", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("node", sa.String(length=40), nullable=True),
        sa.Column("ref", sa.String(length=200), nullable=True),
        sa.Column("value", sa.Integer(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["chat_conversations.id"],
            name=op.f("fk_chat_events_conversation_id_chat_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_chat_events_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_events")),
    )
    op.create_index(
        "ix_chat_events_flow",
        "chat_events",
        ["org_id", "flow_key", "flow_version", "kind", "node"],
        unique=False,
    )
    op.create_index("ix_chat_events_kind_at", "chat_events", ["org_id", "kind", "at"], unique=False)
    op.create_index("ix_chat_events_conversation", "chat_events", ["conversation_id"], unique=False)


def downgrade() -> None:
    op.drop_table("chat_events")
    op.drop_table("chat_messages")
    op.drop_table("chat_conversations")
    op.drop_table("chat_flow_versions")
