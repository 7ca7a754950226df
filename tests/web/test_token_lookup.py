"""A burst of API calls that finds the token cache empty looks the token up once: the
waiting requests share that one look-up (and its refusal, for a bad token)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from popdrop.accounts import service as accounts
from tests.conftest import Tenant


@pytest.fixture
def counted_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = accounts.resolve_token

    async def slow_resolve(session: Any, signer: Any, plaintext: str, **kw: Any) -> Any:
        calls.append(plaintext)
        await asyncio.sleep(0.05)  # the burst arrives while the row is being read
        return await real(session, signer, plaintext, **kw)

    monkeypatch.setattr(accounts, "resolve_token", slow_resolve)
    accounts.forget_tokens()
    return calls


async def test_a_burst_on_a_cold_cache_reads_the_token_once(
    app_client: httpx.AsyncClient, tenant: Tenant, counted_lookups: list[str]
) -> None:
    answers = await asyncio.gather(
        *(app_client.get("/api/v1/me", headers=tenant.headers) for _ in range(20))
    )
    assert [a.status_code for a in answers] == [200] * 20
    assert {a.json()["org_id"] for a in answers} == {tenant.org_id}
    assert counted_lookups == [tenant.token]
    # Resolved once, then cached: the next call reads nothing.
    assert (await app_client.get("/api/v1/me", headers=tenant.headers)).status_code == 200
    assert len(counted_lookups) == 1


async def test_a_burst_with_an_unknown_token_is_refused_by_one_lookup(
    app_client: httpx.AsyncClient, counted_lookups: list[str]
) -> None:
    headers = {"Authorization": "Bearer pd_" + "x" * 40}
    answers = await asyncio.gather(
        *(app_client.get("/api/v1/me", headers=headers) for _ in range(10))
    )
    assert [a.status_code for a in answers] == [401] * 10
    assert {a.json()["reason"] for a in answers} == {"unauthorized"}
    assert len(counted_lookups) == 1
    # A refusal is not remembered: the next call looks again.
    assert (await app_client.get("/api/v1/me", headers=headers)).status_code == 401
    assert len(counted_lookups) == 2
