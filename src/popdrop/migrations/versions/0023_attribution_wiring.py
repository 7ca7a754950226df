"""click ids on orders and other attribution wiring

Revision ID: 0023_attribution_wiring
Revises: 0022_partners
Create Date: 2026-12-03 12:00:00
"""

from __future__ import annotations

revision = "0023_attribution_wiring"
down_revision = "0022_partners"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that owns this revision


def downgrade() -> None:
    pass
