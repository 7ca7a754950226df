"""short ticket codes and check-in keys encrypted at rest

Revision ID: 0014_door
Revises: 0013_rsvp_source
Create Date: 2026-12-03 06:00:00
"""

from __future__ import annotations

revision = "0014_door"
down_revision = "0013_rsvp_source"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that owns this revision


def downgrade() -> None:
    pass
