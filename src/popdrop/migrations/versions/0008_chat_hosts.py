"""chat hosts: host addresses per organization, the pinned product card per event

Revision ID: 0008_chat_hosts
Revises: 0007
Create Date: 2026-11-26 17:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_chat_hosts"
down_revision = "0007"
branch_labels = None
depends_on = None


def _ref(name: str, nullable: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "chat_hosts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        _ref("org_id"),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("address_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_chat_hosts_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_hosts")),
        sa.UniqueConstraint(
            "org_id",
            "channel",
            "address_hash",
            name=op.f("uq_chat_hosts_org_id_channel_address_hash"),
        ),
    )
    op.create_table(
        "chat_pins",
        _ref("org_id"),
        _ref("event_id"),
        _ref("product_id"),
        sa.Column("pinned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pinned_by", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_chat_pins_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_chat_pins_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["product_id"], ["products.id"], name=op.f("fk_chat_pins_product_id_products")
        ),
        sa.PrimaryKeyConstraint("org_id", "event_id", name=op.f("pk_chat_pins")),
    )


def downgrade() -> None:
    op.drop_table("chat_pins")
    op.drop_table("chat_hosts")
