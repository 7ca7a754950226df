"""partners, POS credentials and POS sales

Revision ID: 0022_partners
Revises: 0021_attribution
Create Date: 2026-12-03 12:00:00
"""

from __future__ import annotations

revision = "0022_partners"
down_revision = "0021_attribution"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that owns this revision


def downgrade() -> None:
    pass
