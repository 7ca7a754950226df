"""notification outbox (waiting-list offers and other one-off messages)

Revision ID: 0011_outbox
Revises: 0010_security
Create Date: 2026-12-03 01:20:00
"""

from __future__ import annotations

revision = "0011_outbox"
down_revision = "0010_security"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that owns this revision


def downgrade() -> None:
    pass
