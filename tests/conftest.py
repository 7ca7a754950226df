"""Shared fixtures. Every database test runs on SQLite, and again on PostgreSQL when
POPDROP_TEST_DATABASE_URL is set (otherwise those runs are skipped with the reason).

Tests isolate by tenancy: each test gets fresh organizations, so one schema serves all.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from popdrop.accounts import service as accounts
from popdrop.accounts.service import ROLES
from popdrop.app import build_context, create_app
from popdrop.core import audit
from popdrop.core.clock import FrozenClock
from popdrop.core.config import DEFAULT_AUDIT_CHAINS, Settings
from popdrop.core.migrate import upgrade
from popdrop.web.context import AppContext

SECRET = "test-secret-key-" + "k" * 40
_slugs = itertools.count(1)


def _own_worker_services() -> None:
    """Under pytest-xdist (`make test` runs several workers) each worker gets its own
    PostgreSQL database (`<test database>_<worker>`, created if missing) and its own Redis
    database index, so one worker's schema reset never pulls the tables from under
    another. Rewrites the environment, so servers the tests start inherit it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or os.environ.get("POPDROP_TEST_WORKER_SERVICES") == worker:
        return
    os.environ["POPDROP_TEST_WORKER_SERVICES"] = worker
    number = int(worker.removeprefix("gw") or 0)
    raw = os.environ.get("POPDROP_TEST_DATABASE_URL")
    if raw:
        import asyncio

        import asyncpg
        from sqlalchemy.engine import make_url

        base = make_url(raw)
        name = f"{base.database}_{worker}"
        admin = base.set(drivername="postgresql").render_as_string(hide_password=False)

        async def create() -> None:
            connection = await asyncpg.connect(admin)
            try:
                if not await connection.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", name
                ):
                    await connection.execute(f'CREATE DATABASE "{name}"')
            finally:
                await connection.close()

        asyncio.run(create())
        os.environ["POPDROP_TEST_DATABASE_URL"] = base.set(database=name).render_as_string(
            hide_password=False
        )
    redis = os.environ.get("POPDROP_TEST_REDIS_URL")
    if redis:
        head, _, index = redis.rstrip("/").rpartition("/")
        if not index.isdigit():
            head, index = redis.rstrip("/"), "0"
        os.environ["POPDROP_TEST_REDIS_URL"] = f"{head}/{(int(index) + 1 + number) % 16}"


_own_worker_services()


def postgres_url() -> str | None:
    raw = os.environ.get("POPDROP_TEST_DATABASE_URL")
    if not raw:
        return None
    for plain in ("postgresql://", "postgres://"):
        if raw.startswith(plain):
            return "postgresql+asyncpg://" + raw[len(plain) :]
    return raw


def redis_url() -> str | None:
    return os.environ.get("POPDROP_TEST_REDIS_URL") or None


async def reset_postgres(url: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        await conn.execute(text("CREATE SCHEMA public"))
    await engine.dispose()


async def side_postgres(suffix: str) -> str:
    """`<test database>_<suffix>` on the test server, created if missing, its schema reset:
    for tests that migrate step by step or touch every row of a table."""
    import asyncpg
    from sqlalchemy.engine import make_url

    base = postgres_url()
    assert base is not None
    name = f"{make_url(base).database}_{suffix}"
    plain = make_url(base).set(drivername="postgresql").render_as_string(hide_password=False)
    admin = await asyncpg.connect(plain)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    await reset_postgres(url)
    return url


# The database of each backend, made once per process. Under xdist a worker switches
# between the backends as its files come (the session fixture is set up again each time);
# the database must not be reset then: caches that live in the process (event keys, views)
# are keyed by ids, and ids that restart at 1 would meet stale entries.
_prepared: dict[str, str] = {}


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
async def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    if request.param in _prepared:
        return _prepared[request.param]
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'popdrop.db'}"
    else:
        pg = postgres_url()
        if pg is None:
            pytest.skip("PostgreSQL run: set POPDROP_TEST_DATABASE_URL (CI does)")
        url = pg
        await reset_postgres(url)
    await upgrade(url)
    _prepared[request.param] = url
    return url


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for every test that seeds the demo organization: the demo is
    seeded once per database and its codes file is read again by any later seed."""
    return tmp_path_factory.mktemp("demo")


@pytest.fixture
def backend(database_url: str) -> str:
    return "sqlite" if database_url.startswith("sqlite") else "postgresql"


def settings_for(database_url: str, data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        secret_key=SECRET,
        log_requests=False,
        log_level="WARNING",
        redis_url=None,
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return settings_for(database_url, tmp_path)


def database_of_its_own(database_url: str, folder: Path, suffix: str) -> str:
    """A migrated database on the same backend as `database_url`, for tests that run the
    whole worker tick or a real server: the tick sweeps every organization's rows (lapsed
    waiting-list offers, due invitations, scheduled drops) and, on the shared database,
    acts on what other test files left there, sending their messages to this test's
    peers. (A plain function run on a thread: module-scoped fixtures call it.)"""

    async def make() -> str:
        if database_url.startswith("sqlite"):
            url = f"sqlite+aiosqlite:///{folder / f'{suffix}.db'}"
        else:
            url = await side_postgres(suffix)
        await upgrade(url)
        return url

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, make()).result()


@pytest.fixture(autouse=True)
def default_audit_chains() -> Iterator[None]:
    """The audit ledger's chain count is per process (`build_context` configures it from
    the settings); a test that builds a context with another count must not leak it."""
    audit.configure(chains=DEFAULT_AUDIT_CHAINS)
    yield
    audit.configure(chains=DEFAULT_AUDIT_CHAINS)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
async def ctx(settings: Settings, clock: FrozenClock) -> AsyncIterator[AppContext]:
    context = build_context(settings, clock=clock)
    yield context
    await context.guard.counter.close()
    await context.db.dispose()


@pytest.fixture
async def app_client(ctx: AppContext) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(ctx=ctx)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@dataclass
class Tenant:
    org_id: int
    slug: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def make_tenant(ctx: AppContext, scopes: frozenset[str] | None = None) -> Tenant:
    slug = f"org-{next(_slugs)}-{secrets.token_hex(3)}"
    now = ctx.clock.now()
    async with ctx.db.transaction() as session:
        org = await accounts.create_organization(session, slug=slug, name=slug, now=now)
        _, token = await accounts.create_token(
            session,
            ctx.signer,
            org_id=org.id,
            name="test",
            scopes=scopes or ROLES["owner"],
            created_by="test",
            now=now,
        )
    return Tenant(org.id, slug, token)


@pytest.fixture
async def tenant(ctx: AppContext) -> Tenant:
    return await make_tenant(ctx)


async def issue(
    client: httpx.AsyncClient, tenant: Tenant, **spec: Any
) -> tuple[dict[str, Any], list[str]]:
    """Issue a batch through the API; return (batch, plaintext codes)."""
    body = {"name": "test batch", "quantity": 1, **spec}
    response = await client.post("/api/v1/voucher-batches", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    data = response.json()
    return data["batch"], data["codes"]


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where browser tests save screenshots: $POPDROP_SCREENSHOTS when set, else tmp."""
    target = Path(os.environ.get("POPDROP_SCREENSHOTS") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    return target
