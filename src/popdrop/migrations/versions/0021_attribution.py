"""short links, clicks, promo codes and sale attribution

Revision ID: 0021_attribution
Revises: 0020_product_prices
Create Date: 2026-12-03 12:00:00
"""

from __future__ import annotations

revision = "0021_attribution"
down_revision = "0020_product_prices"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that owns this revision


def downgrade() -> None:
    pass
