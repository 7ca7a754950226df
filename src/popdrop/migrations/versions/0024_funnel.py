"""funnel: the append-only funnel event log (no contact details: a contact id or a keyed
reference) and its per-minute and per-hour rollups.

Revision ID: 0024_funnel
Revises: 0023_attribution_wiring
Create Date: 2026-12-03 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0024_funnel"
down_revision = "0023_attribution_wiring"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "funnel_events",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("org_id", _ID, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("channel", sa.String(length=12), server_default="", nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.Column("drop_id", sa.BigInteger(), nullable=True),
        sa.Column("variant", sa.String(length=16), server_default="", nullable=False),
        sa.Column("segment", sa.String(length=8), server_default="", nullable=False),
        sa.Column("partner_id", sa.BigInteger(), nullable=True),
        sa.Column("lane_id", sa.BigInteger(), nullable=True),
        sa.Column("label", sa.String(length=24), server_default="", nullable=False),
        sa.Column("person", sa.String(length=48), nullable=True),
        sa.Column("subject", sa.String(length=48), nullable=True),
        sa.Column("value", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("currency", sa.String(length=3), server_default="", nullable=False),
        sa.Column("rolled", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_funnel_events_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_funnel_events")),
    )
    op.create_index("ix_funnel_events_event", "funnel_events", ["org_id", "event_id", "kind", "at"])
    op.create_index("ix_funnel_events_drop", "funnel_events", ["org_id", "drop_id", "kind", "at"])
    op.create_index("ix_funnel_events_person", "funnel_events", ["org_id", "person", "at"])
    op.create_index("ix_funnel_events_subject", "funnel_events", ["org_id", "subject"])
    op.create_index(
        "ix_funnel_events_unrolled",
        "funnel_events",
        ["id"],
        postgresql_where=sa.text("NOT rolled"),
        sqlite_where=sa.text("rolled = 0"),
    )
    op.create_table(
        "funnel_rollups",
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("grain", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("channel", sa.String(length=12), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("drop_id", sa.BigInteger(), nullable=False),
        sa.Column("variant", sa.String(length=16), nullable=False),
        sa.Column("segment", sa.String(length=8), nullable=False),
        sa.Column("partner_id", sa.BigInteger(), nullable=False),
        sa.Column("lane_id", sa.BigInteger(), nullable=False),
        sa.Column("label", sa.String(length=24), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "org_id",
            "grain",
            "bucket",
            "kind",
            "channel",
            "event_id",
            "drop_id",
            "variant",
            "segment",
            "partner_id",
            "lane_id",
            "label",
            "currency",
            name=op.f("pk_funnel_rollups"),
        ),
    )
    op.create_index(
        "ix_funnel_rollups_event", "funnel_rollups", ["org_id", "event_id", "grain", "bucket"]
    )
    op.create_index(
        "ix_funnel_rollups_drop", "funnel_rollups", ["org_id", "drop_id", "grain", "bucket"]
    )
    op.create_index(
        "ix_funnel_rollups_partner", "funnel_rollups", ["org_id", "partner_id", "grain", "bucket"]
    )


def downgrade() -> None:
    op.drop_table("funnel_rollups")
    op.drop_table("funnel_events")
