"""chat flows published per organization

Revision ID: 0017_chat_flows
Revises: 0016_voucher_jobs
Create Date: 2026-12-03 06:00:00
"""

from __future__ import annotations

revision = "0017_chat_flows"
down_revision = "0016_voucher_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that owns this revision


def downgrade() -> None:
    pass
