"""surveys: Day+1 NPS invitations and answers (`survey_invitations`: one per person and
event; status, channel, score 0-10 and comment checks frozen here as the enums had them).

Revision ID: 0025_surveys
Revises: 0024_funnel
Create Date: 2026-12-03 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0025_surveys"
down_revision = "0024_funnel"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "survey_invitations",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("org_id", _ID, nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("contact_id", sa.BigInteger(), nullable=True),
        sa.Column("person", sa.String(length=48), nullable=True),
        sa.Column("channel", sa.String(length=12), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("score", sa.Integer(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('scheduled', 'sent', 'answered', 'skipped')",
            name=op.f("ck_survey_invitations_status"),
        ),
        sa.CheckConstraint(
            "channel IN ('email', 'sms', 'chat', 'telegram')",
            name=op.f("ck_survey_invitations_channel"),
        ),
        sa.CheckConstraint(
            "score IS NULL OR (score >= 0 AND score <= 10)",
            name=op.f("ck_survey_invitations_score"),
        ),
        sa.CheckConstraint(
            "comment IS NULL OR length(comment) <= 1000",
            name=op.f("ck_survey_invitations_comment"),
        ),
        sa.CheckConstraint(
            "status <> 'answered' OR score IS NOT NULL",
            name=op.f("ck_survey_invitations_answered_score"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_survey_invitations_org_id_organizations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_survey_invitations")),
        sa.UniqueConstraint(
            "event_id", "contact_id", name=op.f("uq_survey_invitations_event_id_contact_id")
        ),
    )
    op.create_index("ix_survey_invitations_due", "survey_invitations", ["status", "due_at"])
    op.create_index(
        "ix_survey_invitations_event", "survey_invitations", ["org_id", "event_id", "status"]
    )
    op.create_index("ix_survey_invitations_contact", "survey_invitations", ["org_id", "contact_id"])


def downgrade() -> None:
    op.drop_table("survey_invitations")
