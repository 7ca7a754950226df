"""messaging: drops, variants, send rows (the outbox), link clicks, the dev mailbox

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 13:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mailbox_messages",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=8), nullable=False),
        sa.Column("recipient", sa.String(length=254), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("html", sa.Text(), nullable=True),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("message_id", sa.String(length=200), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mailbox_messages")),
    )
    op.create_index("ix_mailbox_messages_org", "mailbox_messages", ["org_id", "id"], unique=False)
    op.create_table(
        "drops",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("slug", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column(
            "segment_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("channels", sa.String(length=32), nullable=False),
        sa.Column("from_email", sa.String(length=254), nullable=False),
        sa.Column("from_name", sa.String(length=200), nullable=False),
        sa.Column("sms_from", sa.String(length=32), nullable=False),
        sa.Column(
            "voucher_batch_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("seed_list", sa.Text(), nullable=False),
        sa.Column("seed_status", sa.String(length=16), nullable=False),
        sa.Column("seed_report", sa.Text(), nullable=False),
        sa.Column("ab_metric", sa.String(length=8), nullable=False),
        sa.Column("ab_test_fraction", sa.Float(), nullable=False),
        sa.Column("ab_decide_after_seconds", sa.Integer(), nullable=False),
        sa.Column("ab_min_sample", sa.Integer(), nullable=False),
        sa.Column("ab_fallback", sa.String(length=8), nullable=False),
        sa.Column("ab_decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ab_winner", sa.String(length=32), nullable=True),
        sa.Column("ab_result", sa.Text(), nullable=True),
        sa.Column("frequency_cap", sa.Integer(), nullable=False),
        sa.Column("frequency_window_hours", sa.Integer(), nullable=False),
        sa.Column("quiet_start_hour", sa.Integer(), nullable=False),
        sa.Column("quiet_end_hour", sa.Integer(), nullable=False),
        sa.Column("bounce_threshold", sa.Float(), nullable=False),
        sa.Column("complaint_threshold", sa.Float(), nullable=False),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("paused_reason", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["event_id"], ["events.id"], name=op.f("fk_drops_event_id_events")),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_drops_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["segment_id"], ["segments.id"], name=op.f("fk_drops_segment_id_segments")
        ),
        sa.ForeignKeyConstraint(
            ["voucher_batch_id"],
            ["voucher_batches.id"],
            name=op.f("fk_drops_voucher_batch_id_voucher_batches"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drops")),
    )
    op.create_index(op.f("ix_drops_org_id"), "drops", ["org_id"], unique=False)
    op.create_table(
        "drop_variants",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("drop_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("split_percent", sa.Integer(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["drop_id"],
            ["drops.id"],
            name=op.f("fk_drop_variants_drop_id_drops"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drop_variants")),
        sa.UniqueConstraint("drop_id", "name", name=op.f("uq_drop_variants_drop_id_name")),
    )
    op.create_table(
        "link_clicks",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("drop_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("send_row_id", sa.BigInteger(), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["drop_id"], ["drops.id"], name=op.f("fk_link_clicks_drop_id_drops"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_link_clicks")),
    )
    op.create_index("ix_link_clicks_drop", "link_clicks", ["drop_id", "at"], unique=False)
    op.create_table(
        "send_rows",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("drop_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "contact_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("channel", sa.String(length=8), nullable=False),
        sa.Column("variant", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("message_id", sa.String(length=200), nullable=True),
        sa.Column("provider_id", sa.String(length=200), nullable=True),
        sa.Column("voucher_id", sa.BigInteger(), nullable=True),
        sa.Column("outcome", sa.String(length=200), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("bounced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("complained_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("clicked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["contact_id"], ["contacts.id"], name=op.f("fk_send_rows_contact_id_contacts")
        ),
        sa.ForeignKeyConstraint(
            ["drop_id"], ["drops.id"], name=op.f("fk_send_rows_drop_id_drops"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_send_rows")),
        sa.UniqueConstraint(
            "drop_id", "contact_id", "channel", name=op.f("uq_send_rows_drop_id_contact_id_channel")
        ),
    )
    op.create_index(
        "ix_send_rows_due", "send_rows", ["drop_id", "status", "not_before"], unique=False
    )
    op.create_index(op.f("ix_send_rows_message_id"), "send_rows", ["message_id"], unique=False)
    op.create_index(op.f("ix_send_rows_provider_id"), "send_rows", ["provider_id"], unique=False)
    op.create_index("ix_send_rows_sent", "send_rows", ["drop_id", "sent_at"], unique=False)
    op.create_index(
        "ix_send_rows_contact", "send_rows", ["contact_id", "channel", "sent_at"], unique=False
    )


def downgrade() -> None:
    op.drop_table("send_rows")
    op.drop_table("link_clicks")
    op.drop_table("drop_variants")
    op.drop_table("drops")
    op.drop_table("mailbox_messages")
