"""The guessing guard cannot be turned against a tenant: public floods and a till's own
redemptions are counted apart; forwarded headers count only from a configured proxy; the
guard keeps guarding (in-process) while Redis is unreachable."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from popdrop.app import create_app
from popdrop.core.errors import PopdropError
from popdrop.core.ratelimit import FallbackCounter, GuessGuard, RedisCounter
from popdrop.vouchers import codes
from popdrop.web.context import AppContext, forwarded_client, parse_proxies
from tests.conftest import Tenant, issue
from tests.rsvp.helpers import make_slot

CLAIM = "/api/v1/public/waitlist/claim"
REDEEM = "/api/v1/vouchers/redeem"


def _client_from(app: Any, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_330_forged_public_claims_leave_a_tills_redemptions_untouched(
    ctx: AppContext, app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    event_id, _ = await make_slot(ctx, tenant, capacity=5)
    _, real = await issue(app_client, tenant, quantity=3)
    app = create_app(ctx=ctx)
    addresses = [f"203.0.113.{n}" for n in range(1, 12)]  # 11 addresses, 30 claims each
    clients = [_client_from(app, address) for address in addresses]
    try:

        async def forge(client: httpx.AsyncClient) -> list[int]:
            statuses = []
            for _ in range(30):
                body = {"event_id": event_id, "code": codes.format_code(codes.new_code())}
                statuses.append((await client.post(CLAIM, json=body)).status_code)
            return statuses

        flood = await asyncio.gather(*(forge(c) for c in clients))
        assert sum(len(s) for s in flood) == 330
        # Unknown codes, then refused once an address (or the route's public cap) is spent.
        assert {status for s in flood for status in s} <= {404, 429}
        # The public side is still guarded, per address. Under the flood the route's
        # public cap may have refused some of this address's claims before they counted
        # as its guesses, so it may have a few left: within 30 more it is refused.
        for _ in range(30):
            body = {"event_id": event_id, "code": codes.format_code(codes.new_code())}
            again = await clients[0].post(CLAIM, json=body)
            if again.status_code != 404:
                break
        assert again.status_code == 429 and again.json()["reason"] == "rate_limited"
    finally:
        for client in clients:
            await client.aclose()

    # The till (same organization, same address as one flooder) is untouched: its unknown
    # codes are refused as unknown, not 429, and a valid code redeems.
    till = _client_from(app, addresses[0])
    async with till:
        unknown = await till.post(
            REDEEM, json={"code": codes.format_code(codes.new_code())}, headers=tenant.headers
        )
        assert (unknown.status_code, unknown.json()["reason"]) == (404, "unknown")
        for code in real:
            redeemed = await till.post(REDEEM, json={"code": code}, headers=tenant.headers)
            assert redeemed.status_code == 200, redeemed.text


async def test_a_guessing_till_is_limited_by_its_own_token_only(
    ctx: AppContext, app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    from tests.conftest import make_tenant

    ctx.guard.per_token = 3
    other_till = await make_tenant(ctx)  # another token (here of another organization)
    _, [code] = await issue(app_client, other_till)
    for _ in range(3):
        guess = {"code": codes.format_code(codes.new_code())}
        assert (
            await app_client.post(REDEEM, json=guess, headers=tenant.headers)
        ).status_code == 404
    blocked = await app_client.post(REDEEM, json={"code": "X"}, headers=tenant.headers)
    assert blocked.status_code == 429
    # Same address, different token: unaffected.
    ok = await app_client.post(REDEEM, json={"code": code}, headers=other_till.headers)
    assert ok.status_code == 200


async def test_a_public_flood_on_one_route_leaves_the_organizations_other_routes(
    ctx: AppContext, app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    from tests.rsvp.helpers import rsvp

    ctx.guard.per_org = 20  # public failures per route of the organization
    event_id, slot_id = await make_slot(ctx, tenant, capacity=5)
    app = create_app(ctx=ctx)
    for n in range(20):  # 20 addresses, one guess each: the claim route's cap is reached
        async with _client_from(app, f"198.51.100.{n + 1}") as client:
            body = {"event_id": event_id, "code": codes.format_code(codes.new_code())}
            assert (await client.post(CLAIM, json=body)).status_code == 404
    async with _client_from(app, "198.51.100.200") as newcomer:
        body = {"event_id": event_id, "code": "ABCD-EFGH"}
        assert (await newcomer.post(CLAIM, json=body)).status_code == 429
        # ...but RSVPs of the same organization go on.
        assert (await rsvp(newcomer, event_id, slot_id)).status_code == 201


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    none = parse_proxies("")
    proxies = parse_proxies("127.0.0.1, 10.1.0.0/16")
    # Default: a client cannot choose its address by sending the header.
    assert forwarded_client("127.0.0.1", "1.2.3.4", none) == "127.0.0.1"
    assert forwarded_client("192.0.2.7", "1.2.3.4", proxies) == "192.0.2.7"
    # Behind trusted proxies: the rightmost address a trusted hop added, not the leftmost
    # (which the client may have forged).
    assert forwarded_client("127.0.0.1", "6.6.6.6, 192.0.2.9", proxies) == "192.0.2.9"
    assert forwarded_client("127.0.0.1", "6.6.6.6, 192.0.2.9, 10.1.2.3", proxies) == "192.0.2.9"
    assert forwarded_client("127.0.0.1", "garbage, 192.0.2.9", proxies) == "192.0.2.9"
    assert forwarded_client("127.0.0.1", "", proxies) == "127.0.0.1"
    with pytest.raises(ValueError):
        parse_proxies("not-an-address")


async def test_rotating_forwarded_headers_do_not_escape_the_guard_by_default(
    ctx: AppContext, tenant: Tenant
) -> None:
    ctx.guard.per_address = 3
    event_id, _ = await make_slot(ctx, tenant, capacity=5)
    app = create_app(ctx=ctx)
    async with _client_from(app, "127.0.0.1") as client:
        statuses = []
        for n in range(5):
            body = {"event_id": event_id, "code": codes.format_code(codes.new_code())}
            headers = {"X-Forwarded-For": f"192.0.2.{n + 1}"}
            statuses.append((await client.post(CLAIM, json=body, headers=headers)).status_code)
    assert statuses == [404, 404, 404, 429, 429]


async def test_a_trusted_proxy_gives_each_client_its_own_count(
    ctx: AppContext, tenant: Tenant
) -> None:
    ctx.guard.per_address = 3
    ctx.settings = ctx.settings.model_copy(update={"trusted_proxies": "127.0.0.1"})
    event_id, _ = await make_slot(ctx, tenant, capacity=5)
    app = create_app(ctx=ctx)
    async with _client_from(app, "127.0.0.1") as proxy:

        async def claim(client_ip: str) -> int:
            body = {"event_id": event_id, "code": codes.format_code(codes.new_code())}
            headers = {"X-Forwarded-For": f"6.6.6.6, {client_ip}", "X-Forwarded-Proto": "https"}
            return (await proxy.post(CLAIM, json=body, headers=headers)).status_code

        assert [await claim("192.0.2.1") for _ in range(4)] == [404, 404, 404, 429]
        assert await claim("192.0.2.2") == 404  # another client behind the same proxy


def test_serve_leaves_forwarded_headers_to_the_app(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn

    from popdrop.cli import app as cli

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: seen.update(kw))
    monkeypatch.setenv("POPDROP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("POPDROP_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'p.db'}")
    monkeypatch.setenv("POPDROP_SECRET_KEY", "s" * 40)
    result = CliRunner().invoke(cli, ["serve", "--port", "1"])
    assert result.exit_code == 0, result.output
    # uvicorn's default would believe X-Forwarded-For from any 127.0.0.1 peer.
    assert seen["proxy_headers"] is False


async def test_the_guard_counts_in_process_while_redis_is_unreachable() -> None:
    shared = RedisCounter("redis://127.0.0.1:1/0", namespace=f"t-{secrets.token_hex(3)}")
    counter = FallbackCounter(shared, retry_seconds=60)
    guard = GuessGuard(counter, per_address=3, per_org=100, window=60, per_token=2)
    try:
        for _ in range(2):
            await guard.check(1, "10.0.0.1", principal="token:1:till")
            await guard.failed(1, "10.0.0.1", principal="token:1:till")
        assert guard.degraded
        with pytest.raises(PopdropError) as refused:
            await guard.check(1, "10.0.0.1", principal="token:1:till")
        assert refused.value.reason == "rate_limited"
        await guard.check(1, "10.0.0.1", principal="token:2:other")  # its own count
    finally:
        await counter.close()
