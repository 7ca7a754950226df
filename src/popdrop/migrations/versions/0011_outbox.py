"""notification outbox (waiting-list offers and other one-off messages)

Revision ID: 0011_outbox
Revises: 0010_security
Create Date: 2026-12-03 01:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_outbox"
down_revision = "0010_security"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_STATUSES = ("pending", "sending", "sent", "skipped", "failed")
_CHANNELS = ("email", "sms")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("org_id", _ID, nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("subject", sa.String(length=80), nullable=False),
        sa.Column("channel", sa.String(length=8), nullable=False),
        sa.Column("recipient", sa.String(length=254), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("provider_id", sa.String(length=200), nullable=True),
        sa.Column("last_error", sa.String(length=300), nullable=True),
        sa.CheckConstraint(_one_of("status", _STATUSES), name=op.f("ck_notifications_status")),
        sa.CheckConstraint(_one_of("channel", _CHANNELS), name=op.f("ck_notifications_channel")),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_notifications_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
        sa.UniqueConstraint("kind", "subject", "channel", name="uq_notifications_dedup"),
    )
    op.create_index("ix_notifications_due", "notifications", ["status", "not_before"])
    op.create_index("ix_notifications_recipient", "notifications", ["org_id", "recipient"])


def downgrade() -> None:
    op.drop_index("ix_notifications_recipient", table_name="notifications")
    op.drop_index("ix_notifications_due", table_name="notifications")
    op.drop_table("notifications")
