"""A retry after a SIGKILLed server is answered in seconds (issue 13, item 7).

A real `popdrop serve` takes a redeem with an `Idempotency-Key`; the test holds the
voucher's row lock (a till's transaction that has not committed yet), so the request is
stuck mid-operation with its claim taken. The server is SIGKILLed, the lock released, a
second server started, and the client retries with the same key: it must be answered (the
crashed claim is a lease nobody renews any more, so it is taken over), within the
acceptance bound of 10 s, with exactly one redemption. The old claim blocked the key for a
minute and the retry got `409 idempotency_in_progress`.

PostgreSQL only: the multi-process deployment, and only PostgreSQL has the row lock that
holds the first request mid-operation (SQLite's lease rules are in
tests/core/test_idempotency_lease.py). It uses its own database next to the test
database, so it never touches the shared test schema.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from popdrop.accounts import service as accounts
from popdrop.accounts.service import ROLES
from popdrop.core.db import Database
from popdrop.core.signing import Signer
from tests.conftest import postgres_url, reset_postgres
from tests.server import running_server, server_env

ACCEPTANCE_SECONDS = 10.0  # issue 13: a retry after a killed server is answered within

pytestmark = pytest.mark.skipif(
    postgres_url() is None,
    reason="needs PostgreSQL: set POPDROP_TEST_DATABASE_URL (CI does)",
)


def _plain(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
async def crash_database() -> AsyncIterator[str]:
    """`<test database>_idem_crash`: created if missing, schema reset."""
    base = postgres_url()
    assert base is not None
    name = f"{make_url(base).database}_idem_crash"
    admin = await asyncpg.connect(_plain(base))
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    await reset_postgres(url)
    yield url


async def _owner_token(database_url: str, secret_key: str) -> str:
    db = Database(database_url, pool_size=1, max_overflow=0)
    now = datetime.now(UTC)
    try:
        async with db.transaction() as session:
            org = await accounts.create_organization(session, slug="till", name="Till", now=now)
            _row, token = await accounts.create_token(
                session,
                Signer(secret_key.encode()),
                org_id=org.id,
                name="till",
                scopes=ROLES["owner"],
                created_by="test",
                now=now,
            )
    finally:
        await db.dispose()
    return token


async def _wait_until(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_retry_after_a_killed_server_is_answered_once(
    crash_database: str, tmp_path: Path
) -> None:
    secret_key = server_env(tmp_path)["POPDROP_SECRET_KEY"]
    key = {"Idempotency-Key": "till-7-sale-42"}
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    lock = await asyncpg.connect(_plain(crash_database))
    try:
        with running_server(tmp_path / "first", crash_database) as first:  # migrates
            auth = {"Authorization": f"Bearer {await _owner_token(crash_database, secret_key)}"}
            async with httpx.AsyncClient(base_url=first.base_url, timeout=60) as client:
                issued = await client.post(
                    "/api/v1/voucher-batches", json={"name": "sale", "quantity": 1}, headers=auth
                )
                assert issued.status_code == 201, issued.text
                code = issued.json()["codes"][0]

                # Another till's open transaction holds the voucher's row.
                locked = lock.transaction()
                await locked.start()
                await lock.execute("SELECT id FROM vouchers FOR UPDATE")
                stuck = asyncio.create_task(
                    client.post(
                        "/api/v1/vouchers/redeem", json={"code": code}, headers={**auth, **key}
                    )
                )

                async def blocked_mid_operation() -> bool:
                    claimed = await lock.fetchval(
                        "SELECT count(*) FROM idempotency_records WHERE key = $1",
                        key["Idempotency-Key"],
                    )
                    waiting = await lock.fetchval(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    )
                    return bool(claimed and waiting)

                await _wait_until(blocked_mid_operation, within=30, what="the redeem to block")
                first.process.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                first.process.wait(timeout=10)
                with pytest.raises(httpx.HTTPError):
                    await stuck  # the first server died without answering
                await locked.rollback()  # the other till gives up; the voucher is free

        with running_server(tmp_path / "second", crash_database) as second:
            async with httpx.AsyncClient(base_url=second.base_url, timeout=60) as client:
                started = time.monotonic()
                retry = await client.post(
                    "/api/v1/vouchers/redeem", json={"code": code}, headers={**auth, **key}
                )
                took = time.monotonic() - started
                print(
                    f"\nretry answered in {took:.2f} s"
                    f" ({time.monotonic() - killed_at:.2f} s after the SIGKILL,"
                    " the second server's start included)"
                )
                assert retry.status_code == 200, retry.text
                assert retry.json()["uses"] == 1
                # The acceptance bound (issue 13), not a speed target: a claim nobody renews
                # is taken over after the lease (~4 s), where it used to take a minute.
                assert took < ACCEPTANCE_SECONDS
                again = await client.post(
                    "/api/v1/vouchers/redeem", json={"code": code}, headers={**auth, **key}
                )
                assert again.status_code == 200 and again.json() == retry.json()

        redemptions = await lock.fetchval("SELECT count(*) FROM redemptions")
        uses = await lock.fetchval("SELECT uses FROM vouchers")
        assert (redemptions, uses) == (1, 1)  # exactly one effect
    finally:
        await lock.close()
