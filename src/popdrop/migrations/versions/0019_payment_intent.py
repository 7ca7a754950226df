"""payments.payment_intent: a Stripe Checkout Session ("cs_…", in provider_ref) and the
PaymentIntent it collects with ("pi_…", known at start or from the first webhook), which
refunds and payment_intent.* events name. orders: an index for the expiry sweep (pending
orders by the end of their price hold).

Revision ID: 0019_payment_intent
Revises: 0018_commerce
Create Date: 2026-12-03 08:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019_payment_intent"
down_revision = "0018_commerce"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        batch.add_column(sa.Column("payment_intent", sa.String(length=200), nullable=True))
        batch.create_index("ix_payments_payment_intent", ["payment_intent"])
    op.create_index("ix_orders_due", "orders", ["status", "price_held_until"])


def downgrade() -> None:
    op.drop_index("ix_orders_due", table_name="orders")
    with op.batch_alter_table("payments") as batch:
        batch.drop_index("ix_payments_payment_intent")
        batch.drop_column("payment_intent")
