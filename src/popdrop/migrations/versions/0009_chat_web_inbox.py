"""chat web inbox: scheduled and host messages kept for a web visitor until a socket takes them

Revision ID: 0009_chat_web_inbox
Revises: 0008_chat_hosts
Create Date: 2026-11-27 03:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_chat_web_inbox"
down_revision = "0008_chat_hosts"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "chat_web_inbox",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("org_id", _ID, nullable=False),
        sa.Column("conversation_id", _ID, nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["chat_conversations.id"],
            name=op.f("fk_chat_web_inbox_conversation_id_chat_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_chat_web_inbox_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_web_inbox")),
    )
    op.create_index("ix_chat_web_inbox_conversation", "chat_web_inbox", ["conversation_id", "id"])
    op.create_index("ix_chat_web_inbox_created_at", "chat_web_inbox", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_chat_web_inbox_created_at", table_name="chat_web_inbox")
    op.drop_index("ix_chat_web_inbox_conversation", table_name="chat_web_inbox")
    op.drop_table("chat_web_inbox")
