"""The migrations build exactly the schema the models declare: a column added to a model
without its migration (or the reverse) fails here, on both databases, before it fails a
deployment."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

from popdrop.core.db import create_engine
from popdrop.migrations.registry import target_metadata


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": False})
    diffs = compare_metadata(context, target_metadata())
    # Index and constraint naming differ by dialect (batch mode rebuilds tables on SQLite);
    # what must match is which tables and columns exist and whether they take NULL.
    kinds = {"add_table", "remove_table", "add_column", "remove_column", "modify_nullable"}
    flat: list[Any] = []
    for diff in diffs:
        for item in diff if isinstance(diff, list) else [diff]:
            if item[0] in kinds:
                flat.append(item)
    return flat


async def test_migrations_match_models(database_url: str) -> None:
    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            differences = await conn.run_sync(_differences)
    finally:
        await engine.dispose()
    assert differences == [], differences
