"""partners: POS connections (sealed webhook secrets), deliveries applied once, POS sales
and their lines, and refunds (linked to their sale, or waiting for it).

Status and provider CHECKs are frozen here as the enums had them at 0022.

Revision ID: 0022_partners
Revises: 0021_attribution
Create Date: 2026-12-03 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0022_partners"
down_revision = "0021_attribution"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pos_connections",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "partner_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("account_id", sa.String(length=200), nullable=True),
        sa.Column("location_id", sa.String(length=200), nullable=True),
        sa.Column("secrets_sealed", sa.LargeBinary(), nullable=False),
        sa.Column("notification_url", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "provider IN ('square', 'shopify', 'standard')",
            name=op.f("ck_pos_connections_provider"),
        ),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_pos_connections_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_pos_connections_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["partner_id"], ["partners.id"], name=op.f("fk_pos_connections_partner_id_partners")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pos_connections")),
    )
    op.create_index(op.f("ix_pos_connections_org_id"), "pos_connections", ["org_id"], unique=False)
    op.create_index(
        op.f("ix_pos_connections_partner_id"), "pos_connections", ["partner_id"], unique=False
    )
    op.create_table(
        "pos_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "connection_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("provider_event_id", sa.String(length=200), nullable=False),
        sa.Column("topic", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["pos_connections.id"],
            name=op.f("fk_pos_events_connection_id_pos_connections"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_pos_events_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pos_events")),
        sa.UniqueConstraint(
            "connection_id",
            "provider_event_id",
            name=op.f("uq_pos_events_connection_id_provider_event_id"),
        ),
    )
    op.create_table(
        "pos_sales",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "connection_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "partner_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        sa.Column("account", sa.String(length=200), nullable=True),
        sa.Column("location", sa.String(length=200), nullable=True),
        sa.Column("device", sa.String(length=200), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("subtotal_minor", sa.BigInteger(), nullable=False),
        sa.Column("discount_minor", sa.BigInteger(), nullable=False),
        sa.Column("tax_minor", sa.BigInteger(), nullable=False),
        sa.Column("total_minor", sa.BigInteger(), nullable=False),
        sa.Column("refunded_minor", sa.BigInteger(), nullable=False),
        sa.Column("payment_methods", sa.String(length=100), nullable=False),
        sa.Column("code_count", sa.Integer(), nullable=False),
        sa.Column("customer_hash", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.CheckConstraint(
            "status IN ('active', 'partially_refunded', 'reversed')",
            name=op.f("ck_pos_sales_status"),
        ),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["pos_connections.id"],
            name=op.f("fk_pos_sales_connection_id_pos_connections"),
        ),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_pos_sales_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_pos_sales_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["partner_id"], ["partners.id"], name=op.f("fk_pos_sales_partner_id_partners")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pos_sales")),
        sa.UniqueConstraint(
            "connection_id", "external_id", name=op.f("uq_pos_sales_connection_id_external_id")
        ),
    )
    op.create_index(
        "ix_pos_sales_org_partner", "pos_sales", ["org_id", "partner_id", "id"], unique=False
    )
    op.create_table(
        "pos_refunds",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "connection_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        sa.Column("refunds_external_id", sa.String(length=200), nullable=False),
        sa.Column("sale_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["pos_connections.id"],
            name=op.f("fk_pos_refunds_connection_id_pos_connections"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_pos_refunds_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["sale_id"], ["pos_sales.id"], name=op.f("fk_pos_refunds_sale_id_pos_sales")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pos_refunds")),
        sa.UniqueConstraint(
            "connection_id", "external_id", name=op.f("uq_pos_refunds_connection_id_external_id")
        ),
    )
    op.create_index(
        "ix_pos_refunds_waiting",
        "pos_refunds",
        ["connection_id", "refunds_external_id"],
        unique=False,
    )
    op.create_table(
        "pos_sale_lines",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("sale_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("sku", sa.String(length=64), nullable=True),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("unit_price_minor", sa.BigInteger(), nullable=False),
        sa.Column("discount_minor", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sale_id"], ["pos_sales.id"], name=op.f("fk_pos_sale_lines_sale_id_pos_sales")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pos_sale_lines")),
    )
    op.create_index(op.f("ix_pos_sale_lines_sale_id"), "pos_sale_lines", ["sale_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_pos_sale_lines_sale_id"), table_name="pos_sale_lines")
    op.drop_table("pos_sale_lines")
    op.drop_index("ix_pos_refunds_waiting", table_name="pos_refunds")
    op.drop_table("pos_refunds")
    op.drop_index("ix_pos_sales_org_partner", table_name="pos_sales")
    op.drop_table("pos_sales")
    op.drop_table("pos_events")
    op.drop_index(op.f("ix_pos_connections_partner_id"), table_name="pos_connections")
    op.drop_index(op.f("ix_pos_connections_org_id"), table_name="pos_connections")
    op.drop_table("pos_connections")
