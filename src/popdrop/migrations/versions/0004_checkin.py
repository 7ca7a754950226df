"""check-in: event keys, tickets, scans, visits

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-22 09:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkin_scans",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("secret_digest", sa.LargeBinary(length=16), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.Column("ticket_id", sa.BigInteger(), nullable=True),
        sa.Column("result", sa.String(length=32), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("gate", sa.String(length=64), nullable=True),
        sa.Column("offline", sa.Boolean(), nullable=False),
        sa.Column("scanned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_checkin_scans_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkin_scans")),
        sa.UniqueConstraint("org_id", "nonce", name=op.f("uq_checkin_scans_org_id_nonce")),
    )
    with op.batch_alter_table("checkin_scans", schema=None) as batch_op:
        batch_op.create_index("ix_checkin_scans_ticket", ["ticket_id"], unique=False)

    op.create_table(
        "checkin_event_keys",
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("public_key", sa.LargeBinary(length=32), nullable=False),
        sa.Column("private_key", sa.LargeBinary(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_checkin_event_keys_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_checkin_event_keys_org_id_organizations"),
        ),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_checkin_event_keys")),
    )
    with op.batch_alter_table("checkin_event_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_checkin_event_keys_org_id"), ["org_id"], unique=False)

    op.create_table(
        "tickets",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("subject_kind", sa.String(length=16), nullable=False),
        sa.Column("subject_id", sa.BigInteger(), nullable=False),
        sa.Column("holder_ref", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("issued_epoch", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checked_in_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("checked_in_gate", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_tickets_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_tickets_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tickets")),
    )
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.create_index(
            "ix_tickets_org_event", ["org_id", "event_id", "status"], unique=False
        )
        batch_op.create_index(
            "ix_tickets_subject", ["org_id", "subject_kind", "subject_id"], unique=False
        )
        batch_op.create_index(
            "uq_tickets_valid_subject",
            ["org_id", "event_id", "subject_kind", "subject_id"],
            unique=True,
            postgresql_where=sa.text("status = 'valid'"),
            sqlite_where=sa.text("status = 'valid'"),
        )

    op.create_table(
        "visits",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "ticket_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("subject_kind", sa.String(length=16), nullable=False),
        sa.Column("subject_id", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("gate", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_visits_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_visits_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["ticket_id"], ["tickets.id"], name=op.f("fk_visits_ticket_id_tickets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_visits")),
        sa.UniqueConstraint("ticket_id", name=op.f("uq_visits_ticket_id")),
    )
    with op.batch_alter_table("visits", schema=None) as batch_op:
        batch_op.create_index("ix_visits_org_event", ["org_id", "event_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("visits", schema=None) as batch_op:
        batch_op.drop_index("ix_visits_org_event")

    op.drop_table("visits")
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.drop_index("uq_tickets_valid_subject")
        batch_op.drop_index("ix_tickets_subject")
        batch_op.drop_index("ix_tickets_org_event")

    op.drop_table("tickets")
    with op.batch_alter_table("checkin_event_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_checkin_event_keys_org_id"))

    op.drop_table("checkin_event_keys")
    with op.batch_alter_table("checkin_scans", schema=None) as batch_op:
        batch_op.drop_index("ix_checkin_scans_ticket")

    op.drop_table("checkin_scans")
