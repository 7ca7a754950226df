"""Tokens across processes (issue 15): two real `popdrop serve` processes on one database
and one Redis. A token revoked through server A, or with `popdrop token revoke`, is
refused by server B on its very next call, although B had resolved it a moment before
and caches resolved tokens for a minute here. The command line makes an owner token from
the role (`--role owner`) and lists an organization's tokens."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from redis import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from popdrop.accounts.service import ROLES
from popdrop.web.revocation import REVOKED_CHANNEL
from tests.conftest import redis_url
from tests.server import Server, running_server


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def me(server: Server, token: str) -> int:
    return httpx.get(f"{server.base_url}/api/v1/me", headers=bearer(token), timeout=10).status_code


def created_token(server: Server, *args: str) -> tuple[int, str]:
    done = server.cli("token", "create", *args)
    assert done.returncode == 0, done.stderr
    token_id = int(done.stderr.split()[1])  # "token 12 (scopes) — shown once, …"
    return token_id, done.stdout.strip()


def listeners(url: str) -> int:
    """How many processes listen for revocations (on any Redis database of this server)."""
    client = Redis.from_url(url)
    try:
        return int(dict(client.pubsub_numsub(REVOKED_CHANNEL)).get(REVOKED_CHANNEL.encode(), 0))
    finally:
        client.close()


def wait_for_listeners(url: str, count: int) -> None:
    deadline = time.monotonic() + 15
    while listeners(url) < count:
        assert time.monotonic() < deadline, "the servers never subscribed"
        time.sleep(0.05)


def revoke_behind_their_back(database_url: str, token_id: int) -> None:
    """Revoke in the table only, as no popdrop process would: nobody is told."""

    async def go() -> None:
        engine = create_async_engine(database_url)
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE api_tokens SET revoked_at = :now WHERE id = :id"),
                {"now": datetime.now(UTC), "id": token_id},
            )
        await engine.dispose()

    asyncio.run(go())


def test_a_revoked_token_is_refused_by_another_server_at_once(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = redis_url()
    if redis is None:
        pytest.skip("needs Redis: set POPDROP_TEST_REDIS_URL (CI does)")
    monkeypatch.setenv("POPDROP_REDIS_URL", redis)
    monkeypatch.setenv("POPDROP_TOKEN_CACHE_SECONDS", "60")  # the cache would hide it
    monkeypatch.setenv("COLUMNS", "200")  # `token list` rows on one line each
    slug = f"rv-{secrets.token_hex(4)}"
    already = listeners(redis)  # pub/sub channels are not per database: others may listen
    with (
        running_server(tmp_path / "a", database_url) as a,
        running_server(tmp_path / "b", database_url) as b,
    ):
        wait_for_listeners(redis, already + 2)
        assert a.cli("org", "create", slug, "Revocations").returncode == 0
        _, owner = created_token(a, "--org", slug, "--name", "ops", "--role", "owner")
        mine = httpx.get(f"{a.base_url}/api/v1/me", headers=bearer(owner), timeout=10).json()
        assert set(mine["scopes"]) >= ROLES["owner"]

        # The control: a revocation nobody announces stays hidden by B's cache.
        hidden, hidden_token = created_token(a, "--org", slug, "--name", "x", "--scope", "checkin")
        assert me(b, hidden_token) == 200
        revoke_behind_their_back(database_url, hidden)
        assert me(b, hidden_token) == 200

        # Revoked through A's API: B refuses it on the next call.
        for round_ in range(3):
            made = httpx.post(
                f"{a.base_url}/api/v1/tokens",
                json={"name": f"till-{round_}", "scopes": ["vouchers:redeem"]},
                headers=bearer(owner),
                timeout=10,
            )
            assert made.status_code == 201, made.text
            till = made.json()
            assert me(b, till["token"]) == 200  # resolved and cached by B
            gone = httpx.delete(
                f"{a.base_url}/api/v1/tokens/{till['id']}", headers=bearer(owner), timeout=10
            )
            assert gone.status_code == 204
            assert me(b, till["token"]) == 401
            assert me(a, till["token"]) == 401

        # Revoked with the command: both servers refuse it on the next call.
        door_id, door = created_token(a, "--org", slug, "--name", "door", "--role", "volunteer")
        assert (me(a, door), me(b, door)) == (200, 200)
        done = a.cli("token", "revoke", "--org", slug, str(door_id))
        assert done.returncode == 0, done.stderr
        assert (me(a, door), me(b, door)) == (401, 401)

        listed = a.cli("token", "list", "--org", slug)
        assert listed.returncode == 0, listed.stderr
        rows = {
            line.split("│")[2].strip(): line for line in listed.stdout.splitlines() if "│" in line
        }
        assert {"ops", "x", "till-0", "till-1", "till-2", "door"} <= set(rows)
        assert "UTC" in rows["door"].split("│")[-2]  # the revoked column has a time
        assert rows["ops"].split("│")[-2].strip() == ""  # still live
        assert "role owner" in rows["ops"] and "role volunteer" in rows["door"]
        assert owner not in listed.stdout


def test_token_create_needs_a_role_or_a_scope(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        assert server.cli("org", "create", "roles", "Roles").returncode == 0
        nothing = server.cli("token", "create", "--org", "roles", "--name", "none")
        assert nothing.returncode == 2 and "at least one scope" in nothing.stderr
        wrong = server.cli("token", "create", "--org", "roles", "--name", "x", "--role=boss")
        assert wrong.returncode == 2 and "owner" in wrong.stderr
        anonymous = server.cli("token", "create", "--org", "roles", "--name", "p", "--role=partner")
        assert anonymous.returncode == 2 and "--for" in anonymous.stderr
        _, partner = created_token(
            server,
            "--org",
            "roles",
            "--name",
            "p",
            "--role",
            "partner",
            "--for",
            "pat@corner.example",
        )
        scopes = httpx.get(f"{server.base_url}/api/v1/me", headers=bearer(partner), timeout=10)
        # A partner's token reads orders and its POS sales, and its till redeems codes; it
        # stands for the partner's login.
        assert scopes.json()["scopes"] == ["orders:read", "pos:read", "pos:redeem", "roi:read"]
        assert scopes.json()["role"] == "partner"
        _, both = created_token(
            server, "--org", "roles", "--name", "v", "--role", "volunteer", "--scope", "chat:read"
        )
        scopes = httpx.get(f"{server.base_url}/api/v1/me", headers=bearer(both), timeout=10)
        assert set(scopes.json()["scopes"]) == {"checkin", "orders:pickup", "chat:read"}
