"""surveys: Day+1 NPS invitations and answers

Revision ID: 0025_surveys
Revises: 0024_funnel
Create Date: 2026-12-03 06:00:00
"""

from __future__ import annotations

revision = "0025_surveys"
down_revision = "0024_funnel"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that owns this revision


def downgrade() -> None:
    pass
