"""Statuses are enums with one lifecycle each, and the database refuses any other value.

- Migration 0012 freezes the allowed values; the models build theirs from the enums
  (`core.lifecycle.status_check`): the two must be the same set of checks.
- On each database, writing a status outside its enum fails with an integrity error
  (a CHECK constraint on PostgreSQL, its trigger stand-in on SQLite).
- `Lifecycle` refuses a table that forgets a status, and its refusal is `invalid_transition`.
"""

from __future__ import annotations

import importlib.util
from enum import StrEnum
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from sqlalchemy import CheckConstraint, select, text
from sqlalchemy.exc import IntegrityError

from popdrop.core.clock import FrozenClock
from popdrop.core.db import create_engine
from popdrop.core.errors import PopdropError
from popdrop.core.lifecycle import Lifecycle, status_check
from popdrop.migrations.registry import target_metadata
from tests.conftest import Tenant
from tests.events.helpers import make_shop

MIGRATION = (
    Path(__file__).resolve().parents[2] / "src/popdrop/migrations/versions/0012_status_checks.py"
)


LATER_TABLES = frozenset(
    {
        "notifications",
        "voucher_issue_jobs",
        "orders",
        "payments",
        "refunds",
        # issue 17: attribution and partner POS tables carry their checks from birth
        "promo_codes",
        "short_links",
        "short_link_clicks",
        "sale_touches",
        "pos_connections",
        "pos_sales",
        # issue 18: the Day+1 survey (0025)
        "survey_invitations",
    }
)


def _migration() -> ModuleType:
    spec = importlib.util.spec_from_file_location("status_checks_0012", MIGRATION)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_checks() -> dict[str, str]:
    return {
        str(constraint.name): str(constraint.sqltext)
        for table in target_metadata().sorted_tables
        for constraint in table.constraints
        # Checks of tables made later come with their own migration (0011, 0016, 0018).
        if isinstance(constraint, CheckConstraint) and table.name not in LATER_TABLES
    }


def test_the_migration_builds_the_checks_the_enums_make() -> None:
    frozen = {
        f"ck_{table}_{column}": f"{column} IN ({', '.join(repr(v) for v in values)})"
        for (table, column), values in _migration().STATUS_CHECKS.items()
    }
    assert frozen == _model_checks()


async def test_a_bogus_status_is_refused_by_the_database(
    database_url: str, app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    # Rows in the status tables: an event with a slot (make_shop) and a drop.
    await make_shop(app_client, tenant, clock.now(), status="published")
    drop = await app_client.post(
        "/api/v1/drops",
        json={
            "name": "Check drop",
            "channels": ["email"],
            "from_email": "drops@popdrop.test",
            "variants": [
                {"name": "A", "content": {"email": {"default": {"subject": "S", "text": "T"}}}}
            ],
        },
        headers=tenant.headers,
    )
    assert drop.status_code == 201, drop.text
    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    refused: list[str] = []
    try:
        for (table, column), _values in _migration().STATUS_CHECKS.items():
            async with engine.connect() as conn:
                has_rows = await conn.scalar(select(text("1")).select_from(text(table)).limit(1))
                await conn.rollback()
                if not has_rows:
                    continue
                transaction = await conn.begin()
                with pytest.raises(IntegrityError):
                    await conn.execute(text(f"UPDATE {table} SET {column} = 'bogus'"))
                await transaction.rollback()
                refused.append(f"{table}.{column}")
    finally:
        await engine.dispose()
    assert {"drops.status", "drops.seed_status", "events.status"} <= set(refused), refused


class _Light(StrEnum):
    RED = "red"
    GREEN = "green"


def test_a_lifecycle_names_every_status_and_refuses_with_a_reason() -> None:
    with pytest.raises(ValueError, match="no moves declared"):
        Lifecycle("light", _Light, {_Light.RED: frozenset({_Light.GREEN})})
    light = Lifecycle(
        "light", _Light, {_Light.RED: frozenset({_Light.GREEN}), _Light.GREEN: frozenset()}
    )
    assert light.check(_Light.RED, _Light.GREEN) is _Light.GREEN
    assert light.sources(_Light.GREEN) == {_Light.RED}
    assert light.terminal == {_Light.GREEN}
    assert list(light.pairs()) == [
        (_Light.RED, _Light.GREEN, True),
        (_Light.GREEN, _Light.RED, False),
    ]
    with pytest.raises(PopdropError) as refused:
        light.check(_Light.GREEN, _Light.RED)
    assert (refused.value.reason, refused.value.status) == ("invalid_transition", 409)
    assert refused.value.to_dict()["from"] == "green"
    assert str(status_check(_Light, "colour").sqltext) == "colour IN ('red', 'green')"
