"""short links, clicks, promo codes and sale attribution

Four new tables, nothing else changes: `promo_codes` (attributable codes from the vault),
`short_links` (no secret stored: bearer targets keep only kind + row id),
`short_link_clicks` (no IP, no user agent) and `sale_touches` (first/last touch per sale).
Enum CHECKs are frozen here as the enums had them at 0021.

Revision ID: 0021_attribution
Revises: 0020_product_prices
Create Date: 2026-12-03 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021_attribution"
down_revision = "0020_product_prices"
branch_labels = None
depends_on = None


# The channels as the enum had them at 0021.
CHANNELS = (
    "channel IN ('email', 'sms', 'chat', 'telegram', 'web', 'qr', 'poster', 'partner', "
    "'social', 'other')"
)


def upgrade() -> None:
    op.create_table(
        "promo_codes",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("code", sa.String(length=40), nullable=True),
        sa.Column("code_key", sa.String(length=32), nullable=True),
        sa.Column("batch_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "voucher_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "partner_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("channel", sa.String(length=16), nullable=True),
        sa.Column("drop_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("variant", sa.String(length=32), nullable=True),
        sa.Column(
            "segment_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.CheckConstraint(
            CHANNELS,
            name=op.f("ck_promo_codes_channel"),
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["voucher_batches.id"],
            name=op.f("fk_promo_codes_batch_id_voucher_batches"),
        ),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_promo_codes_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_promo_codes_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["partner_id"], ["partners.id"], name=op.f("fk_promo_codes_partner_id_partners")
        ),
        sa.ForeignKeyConstraint(
            ["voucher_id"], ["vouchers.id"], name=op.f("fk_promo_codes_voucher_id_vouchers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_promo_codes")),
        sa.UniqueConstraint("org_id", "code_key", name=op.f("uq_promo_codes_org_id_code_key")),
    )
    op.create_index("ix_promo_codes_batch", "promo_codes", ["batch_id"], unique=False)
    op.create_table(
        "short_links",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("slug", sa.String(length=32), nullable=False),
        sa.Column("target_kind", sa.String(length=16), nullable=False),
        sa.Column("target_url", sa.String(length=2000), nullable=True),
        sa.Column("target_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("utm_source", sa.String(length=100), nullable=True),
        sa.Column("utm_medium", sa.String(length=100), nullable=True),
        sa.Column("utm_campaign", sa.String(length=100), nullable=True),
        sa.Column("utm_content", sa.String(length=100), nullable=True),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("max_clicks", sa.Integer(), nullable=True),
        sa.Column("fallback_url", sa.String(length=2000), nullable=True),
        sa.Column("clicks", sa.Integer(), nullable=False),
        sa.Column("bot_hits", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "partner_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("drop_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("variant", sa.String(length=32), nullable=True),
        sa.Column(
            "segment_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("channel", sa.String(length=16), nullable=True),
        sa.Column(
            "conversation_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "promo_code_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("reuse_key", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.CheckConstraint(
            CHANNELS,
            name=op.f("ck_short_links_channel"),
        ),
        sa.CheckConstraint(
            "target_kind IN ('url', 'event', 'ticket', 'checkout')",
            name=op.f("ck_short_links_target_kind"),
        ),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_short_links_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_short_links_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["partner_id"], ["partners.id"], name=op.f("fk_short_links_partner_id_partners")
        ),
        sa.ForeignKeyConstraint(
            ["promo_code_id"],
            ["promo_codes.id"],
            name=op.f("fk_short_links_promo_code_id_promo_codes"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_short_links")),
        sa.UniqueConstraint("org_id", "reuse_key", name=op.f("uq_short_links_org_id_reuse_key")),
        sa.UniqueConstraint("slug", name=op.f("uq_short_links_slug")),
    )
    op.create_index("ix_short_links_org", "short_links", ["org_id", "id"], unique=False)
    op.create_table(
        "sale_touches",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("sale_kind", sa.String(length=16), nullable=False),
        sa.Column("sale_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("touch", sa.String(length=8), nullable=False),
        sa.Column("via", sa.String(length=8), nullable=False),
        sa.Column("touched_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "promo_code_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("link_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("click_id", sa.String(length=32), nullable=True),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "partner_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("drop_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("variant", sa.String(length=32), nullable=True),
        sa.Column(
            "segment_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "conversation_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("channel", sa.String(length=16), nullable=True),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reversed_minor", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            CHANNELS,
            name=op.f("ck_sale_touches_channel"),
        ),
        sa.CheckConstraint(
            "sale_kind IN ('order', 'pos_sale')", name=op.f("ck_sale_touches_sale_kind")
        ),
        sa.CheckConstraint("touch IN ('first', 'last')", name=op.f("ck_sale_touches_touch")),
        sa.CheckConstraint("via IN ('code', 'click')", name=op.f("ck_sale_touches_via")),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_sale_touches_event_id_events")
        ),
        sa.ForeignKeyConstraint(
            ["link_id"], ["short_links.id"], name=op.f("fk_sale_touches_link_id_short_links")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_sale_touches_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["partner_id"], ["partners.id"], name=op.f("fk_sale_touches_partner_id_partners")
        ),
        sa.ForeignKeyConstraint(
            ["promo_code_id"],
            ["promo_codes.id"],
            name=op.f("fk_sale_touches_promo_code_id_promo_codes"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sale_touches")),
        sa.UniqueConstraint(
            "sale_kind", "sale_id", "touch", name=op.f("uq_sale_touches_sale_kind_sale_id_touch")
        ),
    )
    op.create_index(
        "ix_sale_touches_org_event", "sale_touches", ["org_id", "event_id"], unique=False
    )
    op.create_index("ix_sale_touches_partner", "sale_touches", ["partner_id"], unique=False)
    op.create_table(
        "short_link_clicks",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("org_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("link_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("click_id", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=True),
        sa.Column("device_class", sa.String(length=8), nullable=False),
        sa.Column("referrer_host", sa.String(length=255), nullable=True),
        sa.CheckConstraint(
            CHANNELS,
            name=op.f("ck_short_link_clicks_channel"),
        ),
        sa.CheckConstraint(
            "device_class IN ('mobile', 'tablet', 'desktop', 'bot', 'other')",
            name=op.f("ck_short_link_clicks_device_class"),
        ),
        sa.ForeignKeyConstraint(
            ["link_id"], ["short_links.id"], name=op.f("fk_short_link_clicks_link_id_short_links")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_short_link_clicks_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_short_link_clicks")),
        sa.UniqueConstraint("click_id", name=op.f("uq_short_link_clicks_click_id")),
    )
    op.create_index(
        "ix_short_link_clicks_link_at", "short_link_clicks", ["link_id", "at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_short_link_clicks_link_at", table_name="short_link_clicks")
    op.drop_table("short_link_clicks")
    op.drop_index("ix_sale_touches_partner", table_name="sale_touches")
    op.drop_index("ix_sale_touches_org_event", table_name="sale_touches")
    op.drop_table("sale_touches")
    op.drop_index("ix_short_links_org", table_name="short_links")
    op.drop_table("short_links")
    op.drop_index("ix_promo_codes_batch", table_name="promo_codes")
    op.drop_table("promo_codes")
