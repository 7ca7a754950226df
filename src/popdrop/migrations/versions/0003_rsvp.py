"""rsvps and waiting-list offers

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 09:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "rsvps",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("org_id", BigId, nullable=False),
        sa.Column("event_id", BigId, nullable=False),
        sa.Column("slot_id", BigId, nullable=False),
        sa.Column("email", sa.String(length=254), nullable=True),
        sa.Column("phone", sa.String(length=32), nullable=True),
        sa.Column("places", sa.Integer(), nullable=False),
        sa.Column("consent_text", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_reason", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(["event_id"], ["events.id"], name=op.f("fk_rsvps_event_id_events")),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_rsvps_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["slot_id"], ["time_slots.id"], name=op.f("fk_rsvps_slot_id_time_slots")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rsvps")),
    )
    with op.batch_alter_table("rsvps", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rsvps_org_id"), ["org_id"], unique=False)
        batch_op.create_index("ix_rsvps_event_status", ["event_id", "status"], unique=False)
        batch_op.create_index("ix_rsvps_waiting", ["slot_id", "status", "created_at"], unique=False)

    op.create_table(
        "waitlist_offers",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("org_id", BigId, nullable=False),
        sa.Column("event_id", BigId, nullable=False),
        sa.Column("slot_id", BigId, nullable=False),
        sa.Column("rsvp_id", BigId, nullable=False),
        sa.Column("voucher_id", BigId, nullable=False),
        sa.Column("places", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("offered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_waitlist_offers_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_waitlist_offers_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["rsvp_id"], ["rsvps.id"], name=op.f("fk_waitlist_offers_rsvp_id_rsvps")
        ),
        sa.ForeignKeyConstraint(
            ["slot_id"], ["time_slots.id"], name=op.f("fk_waitlist_offers_slot_id_time_slots")
        ),
        sa.ForeignKeyConstraint(
            ["voucher_id"], ["vouchers.id"], name=op.f("fk_waitlist_offers_voucher_id_vouchers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_waitlist_offers")),
        sa.UniqueConstraint("voucher_id", name=op.f("uq_waitlist_offers_voucher_id")),
    )
    with op.batch_alter_table("waitlist_offers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_waitlist_offers_org_id"), ["org_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_waitlist_offers_event_id"), ["event_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_waitlist_offers_rsvp_id"), ["rsvp_id"], unique=False)
        batch_op.create_index("ix_waitlist_offers_due", ["status", "expires_at"], unique=False)


def downgrade() -> None:
    op.drop_table("waitlist_offers")
    op.drop_table("rsvps")
