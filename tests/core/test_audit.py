"""The audit ledger: every issue/redeem/rollback/revoke is chained; tampering shows."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from popdrop.app import build_context, create_app
from popdrop.core import audit
from popdrop.core.audit import AuditEntry
from popdrop.core.config import DEFAULT_AUDIT_CHAINS, Settings
from popdrop.web.context import AppContext
from tests.conftest import SECRET, Tenant, issue, make_tenant

POPDROP = [sys.executable, "-m", "popdrop"]


async def test_every_vault_change_is_chained_and_verifies(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    _batch, [code, other] = await issue(app_client, tenant, quantity=2)
    redeemed = await app_client.post(
        "/api/v1/vouchers/redeem", json={"code": code}, headers=tenant.headers
    )
    await app_client.post(
        f"/api/v1/redemptions/{redeemed.json()['redemption']['id']}/rollback",
        json={"reason": "return"},
        headers=tenant.headers,
    )
    await app_client.post("/api/v1/vouchers/revoke", json={"code": other}, headers=tenant.headers)
    async with ctx.db.reader() as session:
        entries = list(
            await session.scalars(
                select(AuditEntry).where(AuditEntry.org_id == tenant.org_id).order_by(AuditEntry.id)
            )
        )
        result = await audit.verify(session)
    assert [e.action for e in entries] == [
        "voucher.issue",
        "voucher.redeem",
        "voucher.rollback",
        "voucher.revoke",
    ]
    assert all(e.actor.startswith("token:") for e in entries)
    assert code not in "".join(e.payload for e in entries)  # no plaintext codes in the ledger
    assert result.ok, result.describe()
    assert result.entries >= 4


async def test_postgres_refuses_update_delete_truncate(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, backend: str
) -> None:
    if backend != "postgresql":
        pytest.skip("the append-only trigger is PostgreSQL's; SQLite is covered by verify")
    await issue(app_client, tenant)
    for statement in (
        "UPDATE audit_entries SET actor = 'mallory' WHERE org_id = :org",
        "DELETE FROM audit_entries WHERE org_id = :org",
        "TRUNCATE audit_entries CASCADE",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            async with ctx.db.transaction() as session:
                await session.execute(text(statement), {"org": tenant.org_id})


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*POPDROP, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    db = tmp_path / "ledger.db"
    return {
        **os.environ,
        "POPDROP_DATA_DIR": str(tmp_path),
        "POPDROP_DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        "POPDROP_SECRET_KEY": SECRET,
        "POPDROP_LOG_LEVEL": "WARNING",
    }


def _seed(env: dict[str, str], tmp_path: Path) -> Path:
    assert _cli(env, "db", "upgrade").returncode == 0
    assert _cli(env, "org", "create", "shop", "Shop").returncode == 0
    for n in range(3):
        out = tmp_path / f"codes{n}.csv"
        done = _cli(
            env,
            "vouchers",
            "issue",
            "--org",
            "shop",
            "--name",
            f"b{n}",
            "--quantity",
            "5",
            "--out",
            str(out),
        )
        assert done.returncode == 0, done.stderr
    ok = _cli(env, "audit", "verify")
    assert ok.returncode == 0 and "OK 3 entries" in ok.stdout
    return Path(env["POPDROP_DATABASE_URL"].split("///", 1)[1])


def test_cli_verify_names_an_edited_row(cli_env: dict[str, str], tmp_path: Path) -> None:
    db = _seed(cli_env, tmp_path)
    with sqlite3.connect(db) as conn:
        victim = conn.execute(
            "SELECT id FROM audit_entries ORDER BY id LIMIT 1 OFFSET 1"
        ).fetchone()[0]
        conn.execute(
            "UPDATE audit_entries SET payload = "
            "replace(payload, '\"quantity\":5', '\"quantity\":500') WHERE id = ?",
            (victim,),
        )
    broken = _cli(cli_env, "audit", "verify")
    assert broken.returncode == 1
    assert f"entry id={victim}" in broken.stderr
    assert "payload does not match" in broken.stderr


def test_cli_verify_catches_a_rehashed_edit_and_a_dropped_tail(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    db = _seed(cli_env, tmp_path)
    with sqlite3.connect(db) as conn:
        # A careful forger fixes the payload digest too: the chain hash still breaks.
        row = conn.execute("SELECT id, payload FROM audit_entries ORDER BY id LIMIT 1").fetchone()
        forged = row[1].replace('"quantity":5', '"quantity":9')
        conn.execute(
            "UPDATE audit_entries SET payload = ?, payload_digest = ? WHERE id = ?",
            (forged, audit.payload_digest(forged), row[0]),
        )
    broken = _cli(cli_env, "audit", "verify")
    assert broken.returncode == 1 and f"entry id={row[0]}" in broken.stderr
    assert "entry hash does not match" in broken.stderr

    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE audit_entries SET payload = ?, payload_digest = ? WHERE id = ?",
            (row[1], audit.payload_digest(row[1]), row[0]),
        )
        conn.commit()
        assert _cli(cli_env, "audit", "verify").returncode == 0
        conn.execute("DELETE FROM audit_entries WHERE id = (SELECT max(id) FROM audit_entries)")
    dropped = _cli(cli_env, "audit", "verify")
    assert dropped.returncode == 1 and "chain head does not match" in dropped.stderr


def test_chain_choice_is_stable_and_total() -> None:
    # Found by schemathesis: a tag like "³" passed str.isdigit() and then broke int().
    assert audit.chain_count() == DEFAULT_AUDIT_CHAINS  # unconfigured: the settings' default
    assert audit.chain_for("voucher:42") == 42 % DEFAULT_AUDIT_CHAINS
    for subject in ("tag:³", "tag:٣", "batch:", "tag:sat", "x"):
        assert 0 <= audit.chain_for(subject) < DEFAULT_AUDIT_CHAINS
        assert audit.chain_for(subject) == audit.chain_for(subject)


def test_the_chain_count_is_configured_once_and_must_be_positive() -> None:
    audit.configure(chains=3)
    assert audit.chain_count() == 3
    assert audit.chain_for("voucher:42") == 42 % 3
    with pytest.raises(ValueError, match="at least 1"):
        audit.configure(chains=0)
    assert audit.chain_count() == 3


async def test_a_context_with_another_chain_count_writes_and_verifies(
    settings: Settings, ctx: AppContext
) -> None:
    """`build_context` configures the ledger from its settings; entries written with one
    count and then another all verify (verify walks the chains that exist)."""
    few = build_context(settings.model_copy(update={"audit_chains": 2}), clock=ctx.clock)
    try:
        assert audit.chain_count() == 2
        tenant = await make_tenant(few)
        transport = httpx.ASGITransport(app=create_app(ctx=few))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            _batch, codes = await issue(client, tenant, quantity=6)
            for code in codes:
                redeemed = await client.post(
                    "/api/v1/vouchers/redeem", json={"code": code}, headers=tenant.headers
                )
                assert redeemed.status_code == 200, redeemed.text
        async with few.db.reader() as session:
            chains = set(
                await session.scalars(
                    select(AuditEntry.chain).where(AuditEntry.org_id == tenant.org_id)
                )
            )
        assert chains == {0, 1}
        # Back to the deployment default (another context in the same process).
        build_context(settings, clock=ctx.clock)
        assert audit.chain_count() == DEFAULT_AUDIT_CHAINS
        async with ctx.db.transaction() as session:
            await audit.append(
                session,
                org_id=tenant.org_id,
                actor="test",
                action="test.note",
                subject="note:7",
                payload={},
                at=ctx.clock.now(),
            )
        async with ctx.db.reader() as session:
            result = await audit.verify(session, tenant.org_id)
        assert result.ok, result.describe()
        assert result.entries == 1 + 6 + 1
    finally:
        await few.guard.counter.close()
        await few.db.dispose()
