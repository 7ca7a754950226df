"""An `Idempotency-Key` answers only its own caller, and only after the scope check (issue 13,
item 3): a token without the route's permission is refused even when the key has a stored
answer, and another caller of the same organization resending an owner's request with the
same key and body is refused (`idempotency_key_foreign`), never answered from the store and
never run a second time. SQLite, and PostgreSQL when set."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from popdrop.accounts import service as accounts
from popdrop.accounts.models import ApiToken
from popdrop.accounts.service import ROLES
from popdrop.core.idempotency import IdempotencyRecord
from popdrop.web.context import AppContext
from tests.checkin.helpers import make_event
from tests.conftest import Tenant, issue
from tests.events.helpers import make_shop

Client = httpx.AsyncClient


@dataclass
class Call:
    url: str
    body: dict[str, Any]
    # A value only the owner's answer holds (a secret, a new id): must never leak.
    telltale: Callable[[dict[str, Any]], str]


async def _ticket(c: Client, t: Tenant, ctx: AppContext) -> Call:
    event_id = await make_event(ctx, t.org_id)
    body = {"event_id": event_id, "subject_kind": "rsvp", "subject_id": 4711}
    return Call("/api/v1/tickets", body, lambda answer: answer["secret"])


async def _contact(c: Client, t: Tenant, ctx: AppContext) -> Call:
    body = {"email": f"ada-{secrets.token_hex(3)}@example.com", "first_name": "Ada"}
    return Call("/api/v1/contacts", body, lambda answer: f'"id":{answer["contact"]["id"]}')


async def _voucher_batch(c: Client, t: Tenant, ctx: AppContext) -> Call:
    body = {"name": "owner's batch", "quantity": 2}
    return Call("/api/v1/voucher-batches", body, lambda answer: f'"id":{answer["batch"]["id"]}')


async def _hold(c: Client, t: Tenant, ctx: AppContext) -> Call:
    shop = await make_shop(c, t, ctx.clock.now())
    body = {"variant_id": shop.variant_id, "lane_id": shop.lane_id, "contact_ref": "ada"}
    return Call("/api/v1/holds", body, lambda answer: f'"id":{answer["id"]}')


async def _redeem(c: Client, t: Tenant, ctx: AppContext) -> Call:
    _batch, codes = await issue(c, t)
    body = {"code": codes[0]}
    return Call("/api/v1/vouchers/redeem", body, lambda a: f'"id":{a["redemption"]["id"]}')


CASES: dict[str, Callable[[Client, Tenant, AppContext], Awaitable[Call]]] = {
    "tickets": _ticket,
    "contacts": _contact,
    "voucher-batches": _voucher_batch,
    "holds": _hold,
    "redeem": _redeem,
}


async def _token(ctx: AppContext, tenant: Tenant, scopes: frozenset[str]) -> dict[str, str]:
    async with ctx.db.transaction() as session:
        _row, plaintext = await accounts.create_token(
            session,
            ctx.signer,
            org_id=tenant.org_id,
            name=f"second-{secrets.token_hex(3)}",
            scopes=scopes,
            created_by="test",
            now=ctx.clock.now(),
        )
    return {"Authorization": f"Bearer {plaintext}"}


def _compact(text: str) -> str:
    return text.replace(" ", "")


@pytest.mark.parametrize("case", list(CASES))
async def test_replay_by_another_principal_never_gets_the_stored_answer(
    app_client: Client, tenant: Tenant, ctx: AppContext, case: str
) -> None:
    call = await CASES[case](app_client, tenant, ctx)
    key = {"Idempotency-Key": f"owner-{case}-{secrets.token_hex(4)}"}
    first = await app_client.post(call.url, json=call.body, headers={**tenant.headers, **key})
    assert first.status_code in (200, 201), first.text
    telltale = str(call.telltale(first.json()))
    # Sanity: the owner's own retry is answered from the store, the same answer.
    again = await app_client.post(call.url, json=call.body, headers={**tenant.headers, **key})
    assert again.status_code == first.status_code and telltale in _compact(again.text)

    # A token with only `checkin` (a volunteer's): refused by the scope check, the key
    # never looked at.
    reader = await _token(ctx, tenant, frozenset({"checkin"}))
    replay = await app_client.post(call.url, json=call.body, headers={**reader, **key})
    assert replay.status_code == 403, replay.text
    assert replay.json()["reason"] == "forbidden"
    assert telltale not in _compact(replay.text)

    # A token allowed to make the call, but not the key's owner: refused, not answered.
    other = await _token(ctx, tenant, ROLES["owner"])
    foreign = await app_client.post(call.url, json=call.body, headers={**other, **key})
    assert foreign.status_code == 403, foreign.text
    assert foreign.json()["reason"] == "idempotency_key_foreign"
    assert telltale not in _compact(foreign.text)

    # The owner is still answered from the store afterwards.
    last = await app_client.post(call.url, json=call.body, headers={**tenant.headers, **key})
    assert last.status_code == first.status_code and telltale in _compact(last.text)


async def test_key_records_its_principal_and_is_not_run_for_another(
    app_client: Client, tenant: Tenant, ctx: AppContext
) -> None:
    key = {"Idempotency-Key": "contact-once"}
    body = {"email": "grace@example.com", "first_name": "Grace"}
    first = await app_client.post("/api/v1/contacts", json=body, headers={**tenant.headers, **key})
    assert first.status_code == 201, first.text
    other = await _token(ctx, tenant, ROLES["owner"])
    changed = {**body, "first_name": "Mallory"}
    foreign = await app_client.post("/api/v1/contacts", json=changed, headers={**other, **key})
    assert (foreign.status_code, foreign.json()["reason"]) == (403, "idempotency_key_foreign")
    async with ctx.db.reader() as session:
        record = await session.scalar(
            select(IdempotencyRecord).where(
                IdempotencyRecord.org_id == tenant.org_id, IdempotencyRecord.key == "contact-once"
            )
        )
        owner_token = await session.scalar(
            select(ApiToken.id).where(ApiToken.org_id == tenant.org_id, ApiToken.name == "test")
        )
    assert record is not None and record.principal == f"token:{owner_token}"
    contact = await app_client.get(
        f"/api/v1/contacts/{first.json()['contact']['id']}", headers=tenant.headers
    )
    assert contact.json()["first_name"] == "Grace"  # the foreign request did not run


async def test_key_is_bound_to_its_route(
    app_client: Client, tenant: Tenant, ctx: AppContext
) -> None:
    key = {"Idempotency-Key": "one-route"}
    body = {"name": "batch", "quantity": 1}
    first = await app_client.post(
        "/api/v1/voucher-batches", json=body, headers={**tenant.headers, **key}
    )
    assert first.status_code == 201, first.text
    contact = {"email": "route@example.com"}
    elsewhere = await app_client.post(
        "/api/v1/contacts", json=contact, headers={**tenant.headers, **key}
    )
    assert (elsewhere.status_code, elsewhere.json()["reason"]) == (422, "idempotency_key_reused")
