"""product_prices: a product's earlier prices (each with the time it stopped), so a
checkout prices a held unit at the price in effect when the hold was taken. Existing
products start with no history: their holds are priced at the current price, as before.

Revision ID: 0020_product_prices
Revises: 0019_payment_intent
Create Date: 2026-12-03 09:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020_product_prices"
down_revision = "0019_payment_intent"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "product_prices",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "product_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("price_minor", sa.BigInteger(), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_product_prices_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["product_id"], ["products.id"], name=op.f("fk_product_prices_product_id_products")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_product_prices")),
    )
    op.create_index(
        "ix_product_prices_product_until", "product_prices", ["product_id", "until"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_product_prices_product_until", table_name="product_prices")
    op.drop_table("product_prices")
