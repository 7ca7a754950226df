"""one RSVP per person and slot, per-person hold limits across lanes

- `rsvps.duplicate_of` (nullable): set here only, on an active RSVP (confirmed,
  waitlisted, offered) made before this revision by a person (same email or same phone)
  who already had an earlier active RSVP for the same slot; it names that earlier RSVP.
  Such bookings are kept as they are (nothing is cancelled, no place moves): operators
  see them and decide. Later RSVPs never set it.
- Partial unique indexes `uq_rsvps_slot_email_active` and `uq_rsvps_slot_phone_active`:
  one active RSVP per (slot, email) and per (slot, phone), rows marked `duplicate_of`
  left out. Cancelled and lapsed RSVPs (and erased contact points, NULL) never count.
  PostgreSQL and SQLite both have partial indexes.
- `ix_holds_person` (event_id, contact_ref): the per-person limit of a product is
  counted over every lane of the event (the service serialises one person's holds of a
  product with an advisory lock on PostgreSQL).

Revision ID: 0015_capacity_guards
Revises: 0014_door
Create Date: 2026-12-03 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015_capacity_guards"
down_revision = "0014_door"
branch_labels = None
depends_on = None

_ACTIVE = "status IN ('confirmed', 'waitlisted', 'offered')"
_POINTS = ("email", "phone")
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# The earliest other active RSVP of the same slot and person, earlier than this one.
_EARLIER = f"""
    SELECT MIN(o.id) FROM rsvps o
    WHERE o.slot_id = rsvps.slot_id AND o.id < rsvps.id AND o.{_ACTIVE}
      AND ((rsvps.email IS NOT NULL AND o.email = rsvps.email)
        OR (rsvps.phone IS NOT NULL AND o.phone = rsvps.phone))
"""


def upgrade() -> None:
    op.add_column("rsvps", sa.Column("duplicate_of", _ID, nullable=True))
    op.execute(f"UPDATE rsvps SET duplicate_of = ({_EARLIER}) WHERE {_ACTIVE}")
    for point in _POINTS:
        where = sa.text(f"{_ACTIVE} AND {point} IS NOT NULL AND duplicate_of IS NULL")
        op.create_index(
            f"uq_rsvps_slot_{point}_active",
            "rsvps",
            ["slot_id", point],
            unique=True,
            postgresql_where=where,
            sqlite_where=where,
        )
    op.create_index("ix_holds_person", "holds", ["event_id", "contact_ref"])


def downgrade() -> None:
    op.drop_index("ix_holds_person", table_name="holds")
    for point in _POINTS:
        op.drop_index(f"uq_rsvps_slot_{point}_active", table_name="rsvps")
    # Not a batch rebuild: that would drop the 0012 status triggers of `rsvps` on SQLite.
    op.execute("ALTER TABLE rsvps DROP COLUMN duplicate_of")
