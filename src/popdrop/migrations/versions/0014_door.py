"""short ticket codes and check-in keys sealed at rest

- `tickets.short_code` (nullable, unique per event): the typable code of the ticket's
  current secret (`checkin.tickets.short_code`), backfilled here for every existing
  ticket by signing its secret with its event's key. Two old tickets of one event whose
  codes collide (odds about n²/2⁴¹) keep the first; the other keeps NULL and is checked in
  by its QR only (its holder's secret must not change under them).
- `checkin_event_keys.private_key` is sealed (`checkin.keys`, a Fernet token under a key
  derived from the secret key) instead of raw. The secret key is the one of the process
  that migrates (`POPDROP_SECRET_KEY` or `<data dir>/secret_key`): `popdrop serve`,
  `worker` and `db upgrade` migrate with the settings they serve with. The column was
  `LARGEBINARY(32)`: a length neither dialect enforces (bytea, BLOB), so no type change.
  Downgrade opens the keys again (raw) and drops the column.

Revision ID: 0014_door
Revises: 0013_rsvp_source
Create Date: 2026-12-03 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from popdrop.checkin import keys, tickets

revision = "0014_door"
down_revision = "0013_rsvp_source"
branch_labels = None
depends_on = None

_key_rows = sa.table(
    "checkin_event_keys",
    sa.column("event_id", sa.BigInteger()),
    sa.column("private_key", sa.LargeBinary()),
)
_ticket_rows = sa.table(
    "tickets",
    sa.column("id", sa.BigInteger()),
    sa.column("event_id", sa.BigInteger()),
    sa.column("generation", sa.Integer()),
    sa.column("issued_epoch", sa.BigInteger()),
    sa.column("short_code", sa.String()),
)


def upgrade() -> None:
    op.add_column("tickets", sa.Column("short_code", sa.String(length=9), nullable=True))
    bind = op.get_bind()
    for event_id, stored in bind.execute(
        sa.select(_key_rows.c.event_id, _key_rows.c.private_key)
    ).all():
        private = bytes(stored)
        if len(private) != keys.RAW_KEY_BYTES:
            continue  # already sealed
        _backfill_codes(bind, event_id, private)
        bind.execute(
            sa.update(_key_rows)
            .where(_key_rows.c.event_id == event_id)
            .values(private_key=keys.seal_private(private))
        )
    op.create_index(
        "uq_tickets_event_short_code", "tickets", ["event_id", "short_code"], unique=True
    )


def _backfill_codes(bind: sa.Connection, event_id: int, private: bytes) -> None:
    seen: set[str] = set()
    updates: list[dict[str, object]] = []
    rows = bind.execute(
        sa.select(_ticket_rows.c.id, _ticket_rows.c.generation, _ticket_rows.c.issued_epoch)
        .where(_ticket_rows.c.event_id == event_id)
        .order_by(_ticket_rows.c.id)
    )
    for ticket_id, generation, issued_epoch in rows:
        secret = tickets.sign(
            private,
            event_id=event_id,
            ticket_id=ticket_id,
            generation=generation,
            issued_epoch=issued_epoch,
        )
        code = tickets.short_code(secret)
        if code not in seen:
            seen.add(code)
            updates.append({"tid": ticket_id, "code": code})
    if updates:
        bind.execute(
            sa.update(_ticket_rows)
            .where(_ticket_rows.c.id == sa.bindparam("tid"))
            .values(short_code=sa.bindparam("code")),
            updates,
        )


def downgrade() -> None:
    op.drop_index("uq_tickets_event_short_code", table_name="tickets")
    with op.batch_alter_table("tickets") as batch_op:
        batch_op.drop_column("short_code")
    bind = op.get_bind()
    for event_id, stored in bind.execute(
        sa.select(_key_rows.c.event_id, _key_rows.c.private_key)
    ).all():
        sealed = bytes(stored)
        if len(sealed) == keys.RAW_KEY_BYTES:
            continue
        raw = keys.open_private(sealed).private_bytes_raw()
        bind.execute(
            sa.update(_key_rows).where(_key_rows.c.event_id == event_id).values(private_key=raw)
        )
