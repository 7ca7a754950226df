"""security: idempotency keys bound to their principal and route, server-side session versions

Revision ID: 0010_security
Revises: 0009_chat_web_inbox
Create Date: 2026-12-02 18:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_security"
down_revision = "0009_chat_web_inbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Who ran the request ("token:12", "user:3") and on which route: a replay by anyone
    # else is refused instead of answered from the store. Old rows keep an empty principal.
    with op.batch_alter_table("idempotency_records") as batch:
        batch.add_column(sa.Column("principal", sa.String(64), nullable=False, server_default=""))
    # Bumped on logout (and password change): every cookie signed with an older version
    # stops working at once instead of living out its 12 hours.
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("session_version", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("session_version")
    with op.batch_alter_table("idempotency_records") as batch:
        batch.drop_column("principal")
