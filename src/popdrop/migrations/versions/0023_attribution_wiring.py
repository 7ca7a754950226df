"""orders.click_ids: the first and the latest short-link click of the browser that placed
the order (first-party click ids), so an online sale is attributed to the message, link
and variant that brought it. Existing orders carry none.

api_tokens.acts_for: a partner's token acts for that partner's login (its email), so it
sees only that partner's orders, POS sales, codes and links. Existing tokens act for none.

Revision ID: 0023_attribution_wiring
Revises: 0022_partners
Create Date: 2026-12-03 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0023_attribution_wiring"
down_revision = "0022_partners"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("orders") as batch:
        batch.add_column(sa.Column("click_ids", sa.Text(), nullable=False, server_default="[]"))
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("acts_for", sa.String(254), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("acts_for")
    with op.batch_alter_table("orders") as batch:
        batch.drop_column("click_ids")
