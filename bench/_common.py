"""Shared helpers for the benchmarks: database set-up, seeding and result output.

Files starting with `_` are helpers, not benchmarks (`run_all.py` skips them).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts import service as accounts
from popdrop.accounts.service import ROLES, Principal
from popdrop.core.signing import Signer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/popdrop_bench"
SECRET_KEY = "popdrop-bench-secret-key-not-for-production-0123456789"
SIGNER = Signer(SECRET_KEY.encode())
# The `popdrop` that serves: this checkout's, unless POPDROP_BENCH_BIN names another (an
# older checkout's, to measure before and after in one sitting with the same bench code).
POPDROP_BIN = os.environ.get("POPDROP_BENCH_BIN") or str(ROOT / ".venv/bin/popdrop")


def server_env(url: str, data_dir: str, **extra: str) -> dict[str, str]:
    """The environment of a benchmarked `popdrop serve`: this database, the bench's key, a
    quiet log, its own data folder, and the bench's own settings (`extra`)."""
    return {
        **os.environ,
        "POPDROP_DATABASE_URL": url,
        "POPDROP_SECRET_KEY": SECRET_KEY,
        "POPDROP_LOG_LEVEL": "WARNING",
        "POPDROP_LOG_REQUESTS": "0",
        "POPDROP_DATA_DIR": data_dir,
        **extra,
    }


def pg_url(override: str | None) -> str:
    return override or os.environ.get("POPDROP_BENCH_DATABASE_URL") or DEFAULT_PG_URL


def libpq_url(url: str) -> URL:
    """The same database as a plain `postgresql://` URL (asyncpg, pgbench)."""
    return make_url(url).set(drivername="postgresql")


async def pg_connect(url: str, database: str | None = None) -> asyncpg.Connection:
    parts = libpq_url(url)
    if database is not None:
        parts = parts.set(database=database)
    return await asyncpg.connect(parts.render_as_string(hide_password=False))


async def reset_postgres(url: str) -> None:
    """Create the bench database if missing, then drop and recreate its schema."""
    name = libpq_url(url).database
    if not name or not name.replace("_", "").isalnum():
        raise SystemExit(f"refusing odd database name {name!r}")
    admin = await pg_connect(url, "postgres")
    try:
        found = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not found:
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await pg_connect(url)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


async def pg_reachable(url: str) -> bool:
    try:
        conn = await pg_connect(url, "postgres")
    except (OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


def now() -> datetime:
    return datetime.now(UTC)


async def seed_org(session: AsyncSession, slug: str = "bench") -> Principal:
    """An organization and an owner principal acting on it."""
    org = await accounts.create_organization(session, slug=slug, name="Benchmark", now=now())
    return Principal(org.id, "bench:seed", "owner", ROLES["owner"])


async def seed_token(session: AsyncSession, org_id: int, scopes: frozenset[str]) -> str:
    _, plaintext = await accounts.create_token(
        session, SIGNER, org_id=org_id, name="bench", scopes=scopes, created_by="bench", now=now()
    )
    return plaintext


def busy_cpu_seconds() -> float:
    """CPU seconds spent busy on the whole machine so far, all cores (Linux /proc/stat):
    the server, PostgreSQL and the load generator together."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages: how busy it was around this run."""
    return [round(x, 2) for x in os.getloadavg()]


def emit(result: dict[str, Any]) -> None:
    """The benchmark's last line: one JSON object, with the load average at its end
    (a ratio only compares figures of one run; the load says how noisy that run was)."""
    result.setdefault("load_avg", load_average())
    print(json.dumps(result, separators=(", ", ": ")), flush=True)
