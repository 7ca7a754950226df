"""status check constraints generated from the lifecycle enums

Revision ID: 0012_status_checks
Revises: 0011_outbox
Create Date: 2026-12-03 01:20:00
"""

from __future__ import annotations

revision = "0012_status_checks"
down_revision = "0011_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that owns this revision


def downgrade() -> None:
    pass
