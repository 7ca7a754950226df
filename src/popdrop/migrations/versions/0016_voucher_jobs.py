"""voucher batch issue as a background job

Revision ID: 0016_voucher_jobs
Revises: 0015_capacity_guards
Create Date: 2026-12-03 06:00:00
"""

from __future__ import annotations

revision = "0016_voucher_jobs"
down_revision = "0015_capacity_guards"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that owns this revision


def downgrade() -> None:
    pass
