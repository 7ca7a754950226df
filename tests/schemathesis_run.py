"""Property-based run over the OpenAPI spec against a real server: whatever the input,
the API answers with a 4xx carrying a `reason`, never a 500.

The run itself lives here; `test_schemathesis_sqlite.py` and `test_schemathesis_postgres.py`
each drive it on one backend, as two files, so `make test` (xdist, one file per worker)
runs the two minutes-long legs side by side instead of one after the other.

The fuzzer is an owner, so it may call `DELETE /api/v1/tokens/{id}`: it deletes any token
id but its own, or every later request would be a 401 and prove nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from popdrop.accounts.service import ROLES
from popdrop.app import build_context
from popdrop.core.config import Settings
from popdrop.core.migrate import upgrade
from tests.conftest import make_tenant, postgres_url, side_postgres
from tests.server import Server, running_server


def owner_token(server: Server) -> str:
    """A token with every owner scope (every route, not only the voucher vault) for a fresh
    organization in the server's database, made in-process: two CLI runs cost seconds."""
    env = server.env
    config = Settings(
        data_dir=Path(env["POPDROP_DATA_DIR"]),
        database_url=env["POPDROP_DATABASE_URL"],
        secret_key=env["POPDROP_SECRET_KEY"],
        redis_url=None,
        log_requests=False,
        log_level="WARNING",
        _env_file=None,  # type: ignore[call-arg]
    )

    async def make() -> str:
        ctx = build_context(config)
        try:
            return (await make_tenant(ctx, ROLES["owner"])).token
        finally:
            await ctx.guard.counter.close()
            await ctx.db.dispose()

    # On a thread of its own: asyncio.run leaves the main thread's loop (pytest-asyncio's) be.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, make()).result()


def own_database() -> str:
    """A database of its own, migrated: the server runs with its own secret key, and rows
    other tests sealed under the test key (a till's webhook secret) would not open."""

    async def make() -> str:
        url = await side_postgres("schemathesis")
        await upgrade(url)
        return url

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, make()).result()


@contextmanager
def fuzzed_server(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real `popdrop serve` on `backend` ("sqlite" or "postgres") with an owner token."""
    database_url = None
    if backend == "postgres":
        if postgres_url() is None:
            pytest.skip("PostgreSQL run: set POPDROP_TEST_DATABASE_URL (CI does)")
        database_url = own_database()
    with running_server(tmp_path_factory.mktemp("schemathesis"), database_url) as srv:
        srv.env["TOKEN"] = owner_token(srv)
        yield srv


def refusals_carry_a_reason(ctx: Any, response: Any, case: Any) -> bool | None:
    if 400 <= response.status_code < 500:
        body = json.loads(response.content or b"{}")
        assert isinstance(body.get("reason"), str) and body["reason"], response.content[:200]
        assert isinstance(body.get("message"), str)
    return None


REVOKE_TOKEN = ("DELETE", "/api/v1/tokens/{token_id}")


def api_never_answers_500(server: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.base_url}/api/openapi.json")
    headers = {"Authorization": f"Bearer {server.env['TOKEN']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    own_tokens = {
        str(t["id"]) for t in httpx.get(f"{server.base_url}/api/v1/tokens", headers=headers).json()
    }
    assert len(own_tokens) == 1

    def keeps_own_token(case: Any) -> bool:
        return str(case.path_parameters.get("token_id")) not in own_tokens

    for operation in operations:
        strategy = operation.as_strategy()
        if (operation.method.upper(), operation.path) == REVOKE_TOKEN:
            strategy = strategy.filter(keeps_own_token)

        @given(case=strategy)
        @settings(
            max_examples=30,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            case.call_and_validate(
                base_url=server.base_url,
                headers=headers,
                checks=[not_a_server_error, refusals_carry_a_reason],
                # The slowest legal call is a 100,000-code batch issue with ?links=true
                # (the API's cap): ~15 s on a loaded 2-core machine.
                timeout=120,
            )

        run()

    # The run really exercised the server (a vacuous run would also be "green"): the
    # fuzzer was still signed in at the end, and got at least 10 answers other than 401
    # per operation.
    assert httpx.get(f"{server.base_url}/api/v1/me", headers=headers).status_code == 200
    metrics = httpx.get(f"{server.base_url}/metrics").text
    served = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("popdrop_http_requests_total{") and 'status="401"' not in line
    )
    assert served >= 10 * len(operations)
    assert 'status="500"' not in metrics
