"""one RSVP per person and slot, per-person hold limits across lanes

Revision ID: 0015_capacity_guards
Revises: 0014_door
Create Date: 2026-12-03 06:00:00
"""

from __future__ import annotations

revision = "0015_capacity_guards"
down_revision = "0014_door"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the change that owns this revision


def downgrade() -> None:
    pass
