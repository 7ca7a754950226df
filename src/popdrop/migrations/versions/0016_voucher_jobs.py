"""voucher batch issue as a background job

`voucher_issue_jobs`: a batch above the job threshold is issued by the worker, a chunk of
codes per transaction, with its progress (`issued` of `total`), a lease (`attempt`,
`heartbeat_at`) so an interrupted job is resumed by the next tick, and the seed its codes
are derived from until they are downloaded (see `vouchers.issue_jobs`).

The status check is part of the new table on both databases (a CHECK in CREATE TABLE
works on SQLite too; the trigger stand-in of 0012 is only for tables that already
existed). Its values are frozen here, as the lifecycle had them at 0016.

Revision ID: 0016_voucher_jobs
Revises: 0015_capacity_guards
Create Date: 2026-12-03 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016_voucher_jobs"
down_revision = "0015_capacity_guards"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
STATUSES = ("queued", "running", "done", "failed")


def upgrade() -> None:
    op.create_table(
        "voucher_issue_jobs",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("org_id", _ID, nullable=False),
        sa.Column("batch_id", _ID, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("issued", sa.Integer(), nullable=False),
        sa.Column("with_links", sa.Boolean(), nullable=False),
        sa.Column("seed", sa.LargeBinary(length=32), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("downloaded_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ({})".format(", ".join(f"'{s}'" for s in STATUSES)),
            name=op.f("ck_voucher_issue_jobs_status"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_voucher_issue_jobs_org_id_organizations"),
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["voucher_batches.id"],
            name=op.f("fk_voucher_issue_jobs_batch_id_voucher_batches"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_voucher_issue_jobs")),
    )
    op.create_index(
        op.f("ix_voucher_issue_jobs_org_id"), "voucher_issue_jobs", ["org_id"], unique=False
    )
    op.create_index(
        op.f("ix_voucher_issue_jobs_batch_id"), "voucher_issue_jobs", ["batch_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_voucher_issue_jobs_batch_id"), table_name="voucher_issue_jobs")
    op.drop_index(op.f("ix_voucher_issue_jobs_org_id"), table_name="voucher_issue_jobs")
    op.drop_table("voucher_issue_jobs")
