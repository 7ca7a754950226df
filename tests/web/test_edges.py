"""What every client meets at the edge: clear JSON errors, limits, health, metrics."""

from __future__ import annotations

import httpx
import pytest

from popdrop.core.ratelimit import GuessGuard, MemoryCounter, RedisCounter
from popdrop.vouchers import codes
from popdrop.web.context import AppContext
from tests.conftest import Tenant, issue, redis_url


async def test_garbage_json_and_wrong_types_are_422_with_reason(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    headers = {**tenant.headers, "content-type": "application/json"}
    for body in (b"{not json", b"[]", b'{"code": 12}', b'{"code": "x", "extra": 1}', b""):
        response = await app_client.post("/api/v1/vouchers/redeem", content=body, headers=headers)
        assert response.status_code == 422, body
        assert response.json()["reason"] == "invalid_request"
        assert response.json()["message"]
    response = await app_client.post(
        "/api/v1/voucher-batches", json={"name": "x", "quantity": 0}, headers=tenant.headers
    )
    assert response.status_code == 422 and "quantity" in response.json()["message"]


async def test_oversized_bodies_are_413(app_client: httpx.AsyncClient, tenant: Tenant) -> None:
    huge = b'{"code": "' + b"A" * 2_000_000 + b'"}'
    response = await app_client.post(
        "/api/v1/vouchers/redeem",
        content=huge,
        headers={**tenant.headers, "content-type": "application/json"},
    )
    assert (response.status_code, response.json()["reason"]) == (413, "payload_too_large")

    async def chunks():  # no Content-Length: the cap still holds while streaming
        for _ in range(40):
            yield b"A" * 65536

    streamed = await app_client.post(
        "/api/v1/vouchers/redeem",
        content=chunks(),
        headers={**tenant.headers, "content-type": "application/json"},
    )
    assert (streamed.status_code, streamed.json()["reason"]) == (413, "payload_too_large")


async def test_unknown_routes_and_methods_answer_json(app_client: httpx.AsyncClient) -> None:
    missing = await app_client.get("/api/v1/nothing-here")
    assert (missing.status_code, missing.json()["reason"]) == (404, "not_found")
    wrong = await app_client.put("/api/v1/vouchers/redeem")
    assert wrong.status_code == 405 and wrong.json()["reason"] == "method_not_allowed"


async def test_health_ready_metrics_and_docs(
    app_client: httpx.AsyncClient, tenant: Tenant, backend: str
) -> None:
    assert (await app_client.get("/healthz")).json()["status"] == "ok"
    ready = await app_client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["database"] == backend
    _, [code] = await issue(app_client, tenant)
    await app_client.post("/api/v1/vouchers/redeem", json={"code": code}, headers=tenant.headers)
    metrics = (await app_client.get("/metrics")).text
    assert 'popdrop_voucher_redemptions_total{result="ok"}' in metrics
    assert "popdrop_http_request_seconds_bucket" in metrics
    assert (await app_client.get("/api/docs")).status_code == 200
    spec = (await app_client.get("/api/openapi.json")).json()
    assert "/api/v1/vouchers/redeem" in spec["paths"]


async def test_readyz_reports_a_dead_database(tmp_path) -> None:
    from popdrop.app import create_app
    from popdrop.core.config import Settings

    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none",
        secret_key="s" * 40,
        log_requests=False,
        _env_file=None,  # type: ignore[call-arg]
    )
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/readyz")
    assert (response.status_code, response.json()["reason"]) == (503, "unavailable")


async def test_guessing_is_rate_limited_per_token(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    ctx.guard.per_token = 5  # an authenticated till is counted by its own token
    _, [real] = await issue(app_client, tenant, max_uses=100)
    for _ in range(5):
        guess = codes.format_code(codes.new_code())
        response = await app_client.post(
            "/api/v1/vouchers/redeem", json={"code": guess}, headers=tenant.headers
        )
        assert response.json()["reason"] == "unknown"
    blocked = await app_client.post(
        "/api/v1/vouchers/redeem", json={"code": real}, headers=tenant.headers
    )
    assert blocked.status_code == 429 and blocked.json()["reason"] == "rate_limited"
    assert 1 <= int(blocked.headers["Retry-After"]) <= ctx.guard.window


async def test_a_crowd_on_a_used_up_code_is_not_guessing(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    ctx.guard.per_address = 5
    _, [code] = await issue(app_client, tenant)
    for _ in range(20):
        await app_client.post(
            "/api/v1/vouchers/redeem", json={"code": code}, headers=tenant.headers
        )
    last = await app_client.post(
        "/api/v1/vouchers/redeem", json={"code": code}, headers=tenant.headers
    )
    assert last.json()["reason"] == "exhausted"


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_guess_guard_counts_per_address_and_per_org(store: str) -> None:
    if store == "redis":
        url = redis_url()
        if url is None:
            pytest.skip("Redis run: set POPDROP_TEST_REDIS_URL (CI does)")
        import secrets

        counter = RedisCounter(url, namespace=f"popdrop-test-{secrets.token_hex(4)}")
    else:
        counter = MemoryCounter()
    guard = GuessGuard(counter, per_address=3, per_org=5, window=60)
    try:
        for _ in range(3):
            await guard.check(1, "10.0.0.1")
            await guard.failed(1, "10.0.0.1")
        with pytest.raises(Exception) as first:
            await guard.check(1, "10.0.0.1")
        assert getattr(first.value, "reason", None) == "rate_limited"
        await guard.check(1, "10.0.0.2")  # another address is still fine
        await guard.failed(1, "10.0.0.2")
        await guard.failed(1, "10.0.0.3")
        with pytest.raises(Exception):
            await guard.check(1, "10.0.0.9")  # the organization as a whole hit its cap
        await guard.check(2, "10.0.0.9")  # other organizations are not affected
    finally:
        await counter.close()


async def test_text_no_database_can_store_is_refused_not_crashed(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    # Found by schemathesis: NUL inside JSON strings made PostgreSQL fail with a 500.
    for body in ({"tag": "a\u0000b"}, {"tag": "ok", "reason": "x\u0000"}):
        response = await app_client.post(
            "/api/v1/vouchers/revoke-tag", json=body, headers=tenant.headers
        )
        assert (response.status_code, response.json()["reason"]) == (422, "invalid_request")
    lone = b'{"name": "\\udaf6", "quantity": 1}'
    response = await app_client.post(
        "/api/v1/voucher-batches",
        content=lone,
        headers={**tenant.headers, "content-type": "application/json"},
    )
    assert response.status_code == 422
