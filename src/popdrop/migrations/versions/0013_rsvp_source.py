"""rsvps.source and the chat channel of the notification outbox

- `rsvps.source` (nullable): who made the RSVP, as the actor string the service was given
  (`public:rsvp`, `chat:<conversation id>`, an operator). A waiting-list offer for an
  RSVP made in a chat conversation is also sent into that conversation. Rows made before
  this revision have NULL (their offers go by email/SMS only, as before).
- `notifications.channel` also accepts `chat` (the check 0011 created is replaced). On
  SQLite a CHECK cannot be altered in place: the table is rebuilt in batch mode from the
  definition below (nothing references `notifications`, so no `ON DELETE` action runs).

Revision ID: 0013_rsvp_source
Revises: 0012_status_checks
Create Date: 2026-12-03 02:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_rsvp_source"
down_revision = "0012_status_checks"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_STATUSES = ("pending", "sending", "sent", "skipped", "failed")
_OLD_CHANNELS = ("email", "sms")
_NEW_CHANNELS = ("email", "sms", "chat")
_CHANNEL_CHECK = "ck_notifications_channel"


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _notifications(channels: tuple[str, ...]) -> sa.Table:
    """The table as 0011 made it, with `channels` in its channel check (SQLite rebuild)."""
    return sa.Table(
        "notifications",
        sa.MetaData(),
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("org_id", _ID, nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("subject", sa.String(length=80), nullable=False),
        sa.Column("channel", sa.String(length=8), nullable=False),
        sa.Column("recipient", sa.String(length=254), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("provider_id", sa.String(length=200), nullable=True),
        sa.Column("last_error", sa.String(length=300), nullable=True),
        sa.CheckConstraint(_one_of("status", _STATUSES), name="ck_notifications_status"),
        sa.CheckConstraint(_one_of("channel", channels), name=_CHANNEL_CHECK),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name="fk_notifications_org_id_organizations"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_notifications"),
        sa.UniqueConstraint("kind", "subject", "channel", name="uq_notifications_dedup"),
        sa.Index("ix_notifications_due", "status", "not_before"),
        sa.Index("ix_notifications_recipient", "org_id", "recipient"),
    )


def _set_channels(old: tuple[str, ...], new: tuple[str, ...]) -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table(
            "notifications", recreate="always", copy_from=_notifications(old)
        ) as batch:
            batch.drop_constraint(op.f(_CHANNEL_CHECK), type_="check")
            batch.create_check_constraint(op.f(_CHANNEL_CHECK), _one_of("channel", new))
        return
    # op.f: the name is final (the naming convention would prefix `ck_notifications_`).
    op.drop_constraint(op.f(_CHANNEL_CHECK), "notifications", type_="check")
    op.create_check_constraint(op.f(_CHANNEL_CHECK), "notifications", _one_of("channel", new))


def upgrade() -> None:
    op.add_column("rsvps", sa.Column("source", sa.String(length=80), nullable=True))
    _set_channels(_OLD_CHANNELS, _NEW_CHANNELS)


def downgrade() -> None:
    op.execute("DELETE FROM notifications WHERE channel = 'chat'")
    _set_channels(_NEW_CHANNELS, _OLD_CHANNELS)
    # Not a batch rebuild: that would drop the 0012 status triggers of `rsvps` on SQLite.
    op.execute("ALTER TABLE rsvps DROP COLUMN source")
