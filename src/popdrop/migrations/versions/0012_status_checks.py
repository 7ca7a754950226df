"""status check constraints generated from the lifecycle enums

Every status column accepts only its enum's values (`core.lifecycle.status_check` builds
the same constraints on the models; `tests/core/test_status_checks.py` holds the two
equal). The values are frozen here, as a migration must be: a status added to an enum
later comes with its own migration that widens the check.

- PostgreSQL: `CHECK` constraints (`ck_<table>_<column>`); adding one validates the rows
  already there, so an unknown status in old data stops the upgrade instead of hiding.
- SQLite cannot add a constraint to a table; batch mode would rebuild each table, and
  with `PRAGMA foreign_keys=ON` (always, see `core.db`) dropping the old table runs its
  `ON DELETE CASCADE` actions: rebuilding `drops` would empty `send_rows`. So on SQLite
  the same rule is two triggers per column (before INSERT, before UPDATE OF the column)
  that abort with the constraint's name, as a CHECK would. A later batch rebuild of one
  of these tables drops its triggers: that migration must create them again
  (`create_sqlite_checks`).

Revision ID: 0012_status_checks
Revises: 0011_outbox
Create Date: 2026-12-03 01:20:00
"""

from __future__ import annotations

from alembic import op

revision = "0012_status_checks"
down_revision = "0011_outbox"
branch_labels = None
depends_on = None

# (table, column) -> the values the column may hold, as the enums had them at 0012.
STATUS_CHECKS: dict[tuple[str, str], tuple[str, ...]] = {
    ("drops", "status"): ("draft", "scheduled", "sending", "paused", "done", "cancelled"),
    ("drops", "seed_status"): ("untested", "passed", "failed", "overridden"),
    ("send_rows", "status"): (
        "pending",
        "held",
        "claimed",
        "sent",
        "delivered",
        "bounced",
        "failed",
        "skipped",
    ),
    ("events", "status"): ("draft", "published", "live", "closed"),
    ("rsvps", "status"): ("confirmed", "waitlisted", "offered", "cancelled", "lapsed"),
    ("waitlist_offers", "status"): ("open", "claimed", "expired", "cancelled"),
    ("tickets", "status"): ("valid", "cancelled", "revoked"),
    ("holds", "status"): ("active", "released", "converted", "expired"),
    ("chat_conversations", "status"): (
        "active",
        "waiting_input",
        "waiting_until",
        "handed_off",
        "done",
        "expired",
        "error",
    ),
    ("contact_import_jobs", "status"): ("queued", "running", "done", "failed"),
    ("contacts", "consent_email"): ("none", "pending", "granted", "revoked"),
    ("contacts", "consent_sms"): ("none", "pending", "granted", "revoked"),
    ("contacts", "consent_chat"): ("none", "pending", "granted", "revoked"),
}


def _name(table: str, column: str) -> str:
    return f"ck_{table}_{column}"  # the models' naming convention for status_check


def _values(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def create_sqlite_checks(table: str) -> None:
    """The triggers that stand for the table's status checks on SQLite."""
    for (on_table, column), values in STATUS_CHECKS.items():
        if on_table != table:
            continue
        name = _name(table, column)
        for suffix, on in (("insert", "INSERT"), ("update", f"UPDATE OF {column}")):
            op.execute(
                f"CREATE TRIGGER {name}_{suffix} BEFORE {on} ON {table} "
                f"WHEN NEW.{column} NOT IN ({_values(values)}) "
                f"BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: {name}'); END"
            )


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table in dict.fromkeys(table for table, _column in STATUS_CHECKS):
            create_sqlite_checks(table)
        return
    for (table, column), values in STATUS_CHECKS.items():
        op.create_check_constraint(_name(table, column), table, f"{column} IN ({_values(values)})")


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table, column in reversed(STATUS_CHECKS):
        name = _name(table, column)
        if sqlite:
            op.execute(f"DROP TRIGGER IF EXISTS {name}_insert")
            op.execute(f"DROP TRIGGER IF EXISTS {name}_update")
        else:
            op.drop_constraint(name, table, type_="check")
