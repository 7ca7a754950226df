"""Check-in: every reason, nonce idempotency, exactly-once under concurrency, offline
verification, offline batches, tenancy, bad input. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from popdrop.checkin import service, tickets
from popdrop.checkin.models import Scan, Visit
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.checkin.helpers import issue, make_event, scan
from tests.conftest import Tenant, make_tenant

Client = httpx.AsyncClient


def _flip(secret: str, index: int) -> str:
    char = "A" if secret[index] != "A" else "B"
    return secret[:index] + char + secret[index + 1 :]


async def _case_ok(c: Client, t: Tenant, ctx: AppContext, ev: int) -> dict[str, Any]:
    return {"secret": (await issue(c, t, ev))["secret"]}


async def _case_garbage(c: Client, t: Tenant, ctx: AppContext, ev: int) -> dict[str, Any]:
    return {"secret": "not-a-ticket"}


async def _case_forged(c: Client, t: Tenant, ctx: AppContext, ev: int) -> dict[str, Any]:
    return {"secret": _flip((await issue(c, t, ev))["secret"], 100)}  # inside the signature


async def _case_tampered_id(c: Client, t: Tenant, ctx: AppContext, ev: int) -> dict[str, Any]:
    return {"secret": _flip((await issue(c, t, ev))["secret"], 20)}  # inside the payload


async def _case_other_org(c: Client, t: Tenant, ctx: AppContext, ev: int) -> dict[str, Any]:
    other = await make_tenant(ctx)
    other_event = await make_event(ctx, other.org_id)
    return {"secret": (await issue(c, other, other_event))["secret"]}


async def _case_revoked(c: Client, t: Tenant, ctx: AppContext, ev: int) -> dict[str, Any]:
    ticket = await issue(c, t, ev)
    response = await c.post(f"/api/v1/tickets/{ticket['ticket']['id']}/revoke", headers=t.headers)
    assert response.status_code == 200, response.text
    return {"secret": ticket["secret"]}


async def _case_cancelled(c: Client, t: Tenant, ctx: AppContext, ev: int) -> dict[str, Any]:
    ticket = await issue(c, t, ev)
    response = await c.post(f"/api/v1/tickets/{ticket['ticket']['id']}/cancel", headers=t.headers)
    assert response.status_code == 200, response.text
    return {"secret": ticket["secret"]}


async def _case_reissued(c: Client, t: Tenant, ctx: AppContext, ev: int) -> dict[str, Any]:
    ticket = await issue(c, t, ev)
    response = await c.post(f"/api/v1/tickets/{ticket['ticket']['id']}/reissue", headers=t.headers)
    assert response.status_code == 200, response.text
    assert response.json()["secret"] != ticket["secret"]
    return {"secret": ticket["secret"]}


async def _case_wrong_event(c: Client, t: Tenant, ctx: AppContext, ev: int) -> dict[str, Any]:
    other_event = await make_event(ctx, t.org_id)
    return {"secret": (await issue(c, t, ev))["secret"], "event_id": other_event}


async def _case_used(c: Client, t: Tenant, ctx: AppContext, ev: int) -> dict[str, Any]:
    secret = (await issue(c, t, ev))["secret"]
    assert (await scan(c, t, secret, gate="north")).status_code == 200
    return {"secret": secret}


async def _case_too_early(c: Client, t: Tenant, ctx: AppContext, ev: int) -> dict[str, Any]:
    later = await make_event(ctx, t.org_id, starts_at=ctx.clock.now() + timedelta(days=2))
    return {"secret": (await issue(c, t, later))["secret"]}


async def _case_too_late(c: Client, t: Tenant, ctx: AppContext, ev: int) -> dict[str, Any]:
    past = await make_event(ctx, t.org_id, starts_at=ctx.clock.now() - timedelta(days=2))
    return {"secret": (await issue(c, t, past))["secret"]}


async def _case_old_scan_time(c: Client, t: Tenant, ctx: AppContext, ev: int) -> dict[str, Any]:
    when = (ctx.clock.now() - timedelta(days=1)).isoformat()
    return {"secret": (await issue(c, t, ev))["secret"], "scanned_at": when}


Case = Callable[[Client, Tenant, AppContext, int], Awaitable[dict[str, Any]]]
CASES: list[tuple[str, Case, int, str]] = [
    ("ok", _case_ok, 200, "ok"),
    ("garbage", _case_garbage, 422, "invalid"),
    ("forged signature", _case_forged, 422, "invalid"),
    ("tampered ticket id", _case_tampered_id, 422, "invalid"),
    ("another org's ticket", _case_other_org, 422, "invalid"),
    ("revoked", _case_revoked, 410, "revoked"),
    ("cancelled", _case_cancelled, 410, "cancelled"),
    ("re-issued (old secret)", _case_reissued, 410, "revoked"),
    ("wrong event", _case_wrong_event, 409, "wrong_event"),
    ("already checked in", _case_used, 409, "already_checked_in"),
    ("before the window", _case_too_early, 409, "outside_window"),
    ("after the window", _case_too_late, 409, "outside_window"),
    ("scanned_at outside the window", _case_old_scan_time, 409, "outside_window"),
]


@pytest.mark.parametrize(
    ("name", "case", "status", "result"), CASES, ids=[name for name, *_ in CASES]
)
async def test_every_reason(
    app_client: Client,
    tenant: Tenant,
    ctx: AppContext,
    name: str,
    case: Case,
    status: int,
    result: str,
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    extra = await case(app_client, tenant, ctx, event_id)
    response = await scan(app_client, tenant, **extra)
    assert response.status_code == status, (name, response.text)
    body = response.json()
    assert body["result"] == result
    assert body["message"]
    if result == "ok":
        assert "reason" not in body
        assert body["subject_kind"] == "rsvp" and body["holder_ref"] == "ada@example.test"
    else:
        assert body["reason"] == result
    if result == "already_checked_in":
        assert body["first_gate"] == "north"
        assert datetime.fromisoformat(body["first_checked_in_at"]) == ctx.clock.now()
    async with ctx.db.reader() as session:  # refusals are stored too
        stored = await session.scalar(
            select(Scan.result).where(Scan.org_id == tenant.org_id, Scan.nonce == body["nonce"])
        )
    assert stored == result


async def test_nonce_idempotency(app_client: Client, tenant: Tenant, ctx: AppContext) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    secret = (await issue(app_client, tenant, event_id))["secret"]
    first = await scan(app_client, tenant, secret, nonce="nonce-aaaa-1", gate="east")
    again = await scan(app_client, tenant, secret, nonce="nonce-aaaa-1", gate="east")
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    other = await scan(app_client, tenant, secret, nonce="nonce-bbbb-2")
    assert other.status_code == 409
    assert other.json()["reason"] == "already_checked_in"
    assert other.json()["first_gate"] == "east"
    replay = await scan(app_client, tenant, secret, nonce="nonce-bbbb-2")
    assert replay.status_code == 409 and replay.json() == other.json()
    # A nonce is bound to its ticket: reusing it for another secret is refused.
    second = (await issue(app_client, tenant, event_id))["secret"]
    reused = await scan(app_client, tenant, second, nonce="nonce-aaaa-1")
    assert reused.status_code == 422 and reused.json()["reason"] == "invalid_request"
    # The same nonce in another org is a different scan.
    other_org = await make_tenant(ctx)
    other_event = await make_event(ctx, other_org.org_id)
    theirs = (await issue(app_client, other_org, other_event))["secret"]
    assert (await scan(app_client, other_org, theirs, nonce="nonce-aaaa-1")).status_code == 200
    async with ctx.db.reader() as session:
        visits = await session.scalar(
            select(func.count()).select_from(Visit).where(Visit.org_id == tenant.org_id)
        )
    assert visits == 1


async def test_issue_is_idempotent_per_subject(
    app_client: Client, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    first = await issue(app_client, tenant, event_id, subject_id=77)
    body = {"event_id": event_id, "subject_kind": "rsvp", "subject_id": 77}
    again = await app_client.post("/api/v1/tickets", json=body, headers=tenant.headers)
    assert again.status_code == 200
    assert again.json()["ticket"]["id"] == first["ticket"]["id"]
    assert again.json()["secret"] == first["secret"]  # deterministic, never stored
    assert again.json()["created"] is False
    fetched = await app_client.get(
        f"/api/v1/tickets/{first['ticket']['id']}", headers=tenant.headers
    )
    assert fetched.status_code == 200 and fetched.json()["secret"] == first["secret"]
    assert len(first["secret"]) == tickets.SECRET_CHARS


async def test_concurrent_issues_make_one_ticket(
    app_client: Client, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    body = {"event_id": event_id, "subject_kind": "hold", "subject_id": 4242}
    responses = await asyncio.gather(
        *(app_client.post("/api/v1/tickets", json=body, headers=tenant.headers) for _ in range(40))
    )
    assert sorted(r.status_code for r in responses) == [200] * 39 + [201]
    assert len({r.json()["ticket"]["id"] for r in responses}) == 1
    # Once cancelled, the subject can get a new ticket.
    ticket_id = responses[0].json()["ticket"]["id"]
    await app_client.post(f"/api/v1/tickets/{ticket_id}/cancel", headers=tenant.headers)
    again = await app_client.post("/api/v1/tickets", json=body, headers=tenant.headers)
    assert again.status_code == 201 and again.json()["ticket"]["id"] != ticket_id


async def test_concurrent_scans_check_in_once(
    app_client: Client, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    ticket = await issue(app_client, tenant, event_id)
    responses = await asyncio.gather(
        *(scan(app_client, tenant, ticket["secret"], gate=f"g{i % 4}") for i in range(200))
    )
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 1, 409: 199}, statuses
    assert {r.json()["reason"] for r in responses if r.status_code == 409} == {"already_checked_in"}
    async with ctx.db.reader() as session:
        visits = await session.scalar(
            select(func.count()).select_from(Visit).where(Visit.org_id == tenant.org_id)
        )
        scans = await session.scalar(
            select(func.count()).select_from(Scan).where(Scan.org_id == tenant.org_id)
        )
    assert visits == 1 and scans == 200


async def test_concurrent_same_nonce_gets_one_answer(
    app_client: Client, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    ticket = await issue(app_client, tenant, event_id)
    responses = await asyncio.gather(
        *(scan(app_client, tenant, ticket["secret"], nonce="same-nonce-1") for _ in range(30))
    )
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["scan_id"] for r in responses}) == 1


async def test_scans_arriving_together_are_each_all_or_nothing(
    app_client: Client,
    tenant: Tenant,
    ctx: AppContext,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Many tickets scanned at once (on PostgreSQL they share grouped statements), mixed
    with a ticket scanned twice and a nonce sent for two tickets in the same burst: each
    scan gets its own answer, one visit per ticket, one scan row per nonce, and every
    nonce replays its stored answer. Run with the group commit on and off."""
    for grouped in (True, False):
        monkeypatch.setattr(service, "GROUP_COMMIT", grouped)
        await _burst(app_client, tenant, ctx, backend, grouped)


async def _burst(
    app_client: Client, tenant: Tenant, ctx: AppContext, backend: str, grouped: bool
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    issued = [await issue(app_client, tenant, event_id, subject_id=100 + i) for i in range(40)]
    await scan(app_client, tenant, issued[0]["secret"])  # the event's key is cached
    plain = [(t["secret"], secrets.token_hex(12)) for t in issued[1:31]]
    twice = [(issued[31]["secret"], secrets.token_hex(12)) for _ in range(3)]
    nonce = f"shared-nonce-{grouped}"
    shared = [(issued[32]["secret"], nonce), (issued[33]["secret"], nonce)]
    sent = plain + twice + shared
    groups = list(service._GROUPS.values())
    before = sum(g.items for g in groups), sum(g.batches for g in groups)
    responses = await asyncio.gather(*(scan(app_client, tenant, s, nonce=n) for s, n in sent))
    answers = [(r.status_code, r.json()) for r in responses]
    for (status, body), (_, nonce) in zip(answers[: len(plain)], plain, strict=True):
        assert status == 200 and body["result"] == "ok" and body["nonce"] == nonce
        assert body["subject_kind"] == "rsvp" and body["scan_id"] > 0
    assert sorted(status for status, _ in answers[len(plain) : len(plain) + 3]) == [200, 409, 409]
    shared_statuses = sorted(status for status, _ in answers[-2:])
    assert shared_statuses == [200, 422], answers[-2:]
    # Every nonce replays exactly what it got.
    for (secret, nonce), (status, body) in zip(sent, answers, strict=True):
        if status == 422:
            continue
        again = await scan(app_client, tenant, secret, nonce=nonce)
        assert (again.status_code, again.json()) == (status, body)
    async with ctx.db.reader() as session:
        visits = await session.scalar(
            select(func.count()).select_from(Visit).where(Visit.event_id == event_id)
        )
        doubles = await session.scalar(
            select(func.count()).select_from(
                select(Visit.ticket_id)
                .where(Visit.event_id == event_id)
                .group_by(Visit.ticket_id)
                .having(func.count() > 1)
                .subquery()
            )
        )
        scans = await session.scalar(
            select(func.count()).select_from(Scan).where(Scan.event_id == event_id)
        )
    assert visits == 1 + len(plain) + 1 + 1 and doubles == 0
    assert scans == 1 + len(plain) + 3 + 1  # the shared nonce is stored once
    if grouped and backend == "postgresql":
        groups = list(service._GROUPS.values())
        items, batches = sum(g.items for g in groups), sum(g.batches for g in groups)
        assert items - before[0] >= len(plain) and batches - before[1] < items - before[0]


async def test_offline_verification_with_public_key_and_revocation_list(
    app_client: Client, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    keep = await issue(app_client, tenant, event_id)
    drop = await issue(app_client, tenant, event_id)
    moved = await issue(app_client, tenant, event_id)
    key_url = f"/api/v1/events/{event_id}/checkin-key"
    synced = (await app_client.get(key_url, headers=tenant.headers)).json()
    public = tickets.base64_decode(synced["public_key"])
    assert len(public) == 32

    def offline(secret: str, sync: dict[str, Any]) -> str:
        generations = {int(k): v for k, v in sync["generations"].items()}
        result, _ = tickets.verify_offline(
            public, secret, set(sync["revoked"]), generations, event_id=event_id
        )
        return result

    assert offline(keep["secret"], synced) == "ok"
    assert offline(drop["secret"], synced) == "ok"
    assert offline(_flip(keep["secret"], 90), synced) == "invalid"
    assert offline(keep["secret"][:-1], synced) == "invalid"
    # Another event's key does not accept this event's tickets.
    other_public = tickets.new_keypair()[1]
    assert tickets.verify_offline(other_public, keep["secret"])[0] == "invalid"

    assert (
        await app_client.post(
            f"/api/v1/tickets/{drop['ticket']['id']}/revoke", headers=tenant.headers
        )
    ).status_code == 200
    reissued = await app_client.post(
        f"/api/v1/tickets/{moved['ticket']['id']}/reissue", headers=tenant.headers
    )
    assert offline(drop["secret"], synced) == "ok"  # not synced yet: the scanner can't know
    synced = (await app_client.get(key_url, headers=tenant.headers)).json()
    assert synced["revoked"] == [drop["ticket"]["id"]]
    assert offline(drop["secret"], synced) == "revoked"
    assert offline(moved["secret"], synced) == "revoked"
    assert offline(reissued.json()["secret"], synced) == "ok"
    assert offline(keep["secret"], synced) == "ok"


async def test_offline_batch_keeps_scan_times(
    app_client: Client, tenant: Tenant, ctx: AppContext, clock: FrozenClock
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    a = (await issue(app_client, tenant, event_id))["secret"]
    b = (await issue(app_client, tenant, event_id))["secret"]
    early = clock.now() - timedelta(minutes=20)
    later = clock.now() - timedelta(minutes=10)
    scans = [
        {"secret": a, "nonce": "offline-3", "scanned_at": later.isoformat(), "offline": True},
        {"secret": a, "nonce": "offline-1", "scanned_at": early.isoformat(), "offline": True},
        {"secret": b, "nonce": "offline-2", "scanned_at": early.isoformat(), "gate": "side"},
        {"secret": "junk", "nonce": "offline-4", "scanned_at": early.isoformat()},
    ]
    clock.advance(timedelta(minutes=30))  # uploaded later, when the network came back
    response = await app_client.post(
        "/api/v1/checkins/batch", json={"scans": scans}, headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [409, 200, 200, 422]
    assert [r["body"]["result"] for r in results] == [
        "already_checked_in",
        "ok",
        "ok",
        "invalid",
    ]
    assert datetime.fromisoformat(results[1]["body"]["checked_in_at"]) == early
    assert datetime.fromisoformat(results[0]["body"]["first_checked_in_at"]) == early
    # Uploading the same batch again changes nothing and answers the same.
    again = await app_client.post(
        "/api/v1/checkins/batch", json={"scans": scans}, headers=tenant.headers
    )
    assert again.json()["results"] == results


async def test_tenancy(app_client: Client, tenant: Tenant, ctx: AppContext) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    ticket = await issue(app_client, tenant, event_id)
    ticket_id = ticket["ticket"]["id"]
    other = await make_tenant(ctx)
    for method, path in [
        ("GET", f"/api/v1/tickets/{ticket_id}"),
        ("POST", f"/api/v1/tickets/{ticket_id}/cancel"),
        ("POST", f"/api/v1/tickets/{ticket_id}/revoke"),
        ("POST", f"/api/v1/tickets/{ticket_id}/reissue"),
        ("GET", f"/api/v1/events/{event_id}/checkin-key"),
        ("GET", f"/api/v1/events/{event_id}/checkin-counts"),
    ]:
        response = await app_client.request(method, path, headers=other.headers)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["reason"] == "not_found"
    body = {"event_id": event_id, "subject_kind": "manual", "subject_id": 5}
    response = await app_client.post("/api/v1/tickets", json=body, headers=other.headers)
    assert response.status_code == 404
    response = await scan(app_client, other, ticket["secret"])
    assert response.status_code == 422 and response.json()["reason"] == "invalid"
    # The ticket is untouched and still checks in for its own org.
    assert (await scan(app_client, tenant, ticket["secret"])).status_code == 200


async def test_scopes(app_client: Client, tenant: Tenant, ctx: AppContext) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    scanner = await make_tenant(ctx, frozenset({"checkin"}))  # refused before any lookup
    body = {"event_id": event_id, "subject_kind": "manual", "subject_id": 5}
    response = await app_client.post("/api/v1/tickets", json=body, headers=scanner.headers)
    assert response.status_code == 403 and response.json()["reason"] == "forbidden"
    writer = await make_tenant(ctx, frozenset({"tickets:write"}))
    response = await scan(app_client, writer, "x" * 119)
    assert response.status_code == 403
    assert (await app_client.post("/api/v1/checkins", json={})).status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"secret": "abc"},
        {"nonce": "nonce-123"},
        {"secret": "abc", "nonce": "short"},
        {"secret": "abc", "nonce": "bad nonce with spaces"},
        {"secret": "a\x00b", "nonce": "nonce-123"},
        {"secret": "x" * 600, "nonce": "nonce-123"},
        {"secret": "abc", "nonce": "nonce-123", "event_id": 0},
        {"secret": "abc", "nonce": "nonce-123", "event_id": 2**63},
        {"secret": "abc", "nonce": "nonce-123", "scanned_at": "2026-01-01T10:00:00"},
        {"secret": "abc", "nonce": "nonce-123", "scanned_at": "yesterday"},
        {"secret": "abc", "nonce": "nonce-123", "scanned_at": "0001-01-01T00:00:00Z"},
        {"secret": "abc", "nonce": "nonce-123", "scanned_at": "9999-12-31T23:59:59Z"},
        {"secret": "abc", "nonce": "nonce-123", "gate": ""},
        {"secret": "abc", "nonce": "nonce-123", "surprise": 1},
        {"secret": ["abc"], "nonce": "nonce-123"},
    ],
)
async def test_bad_scan_input(app_client: Client, tenant: Tenant, body: dict[str, Any]) -> None:
    response = await app_client.post("/api/v1/checkins", json=body, headers=tenant.headers)
    assert response.status_code == 422, response.text
    assert response.json()["reason"] == "invalid_request"


async def test_bad_ticket_input(app_client: Client, tenant: Tenant, ctx: AppContext) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    for body in [
        {"event_id": event_id, "subject_kind": "order", "subject_id": 1},
        {"event_id": event_id, "subject_kind": "rsvp", "subject_id": 0},
        {"event_id": 2**62 + 1, "subject_kind": "rsvp", "subject_id": 1},
        {"event_id": event_id, "subject_kind": "rsvp", "subject_id": 1, "holder_ref": "a\x00"},
    ]:
        response = await app_client.post("/api/v1/tickets", json=body, headers=tenant.headers)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["reason"] == "invalid_request"
    missing = {"event_id": 2**62, "subject_kind": "rsvp", "subject_id": 1}
    response = await app_client.post("/api/v1/tickets", json=missing, headers=tenant.headers)
    assert response.status_code == 404
    for path in ("/api/v1/tickets/0", f"/api/v1/tickets/{2**63}", "/api/v1/tickets/abc"):
        assert (await app_client.get(path, headers=tenant.headers)).status_code == 422
    future = {
        "secret": "abc",
        "nonce": "nonce-future",
        "scanned_at": (ctx.clock.now() + timedelta(hours=1)).isoformat(),
    }
    response = await app_client.post("/api/v1/checkins", json=future, headers=tenant.headers)
    assert response.status_code == 422 and response.json()["reason"] == "invalid_request"
    ticket = await issue(app_client, tenant, event_id)
    path = f"/api/v1/tickets/{ticket['ticket']['id']}"
    assert (await app_client.post(f"{path}/cancel", headers=tenant.headers)).status_code == 200
    again = await app_client.post(f"{path}/revoke", headers=tenant.headers)
    assert again.status_code == 409 and again.json()["reason"] == "invalid_transition"
    batch = await app_client.post(
        "/api/v1/checkins/batch", json={"scans": []}, headers=tenant.headers
    )
    assert batch.status_code == 422


async def test_ticket_page_and_calendar(
    app_client: Client, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    ticket = await issue(app_client, tenant, event_id)
    page = await app_client.get(f"/t/{ticket['secret']}")
    assert page.status_code == 200
    assert "<svg" in page.text and "Corner pop-up" in page.text
    assert page.headers["cache-control"] == "no-store"
    ics = await app_client.get(f"/t/{ticket['secret']}/event.ics")
    assert ics.status_code == 200
    assert ics.headers["content-type"].startswith("text/calendar")
    text = ics.text
    assert text.startswith("BEGIN:VCALENDAR\r\n") and text.endswith("END:VCALENDAR\r\n")
    assert "\n" not in text.replace("\r\n", "")
    assert all(len(line.encode()) <= 75 for line in text.split("\r\n"))
    assert "SUMMARY:Corner pop-up\r\n" in text
    assert "DESCRIPTION:Sneakers\\, coffee\\; and friends" in text
    assert f"UID:ticket-{ticket['ticket']['id']}@127.0.0.1" in text  # base_url's host
    for bad in ("nope", _flip(ticket["secret"], 100), "x" * 119):
        response = await app_client.get(f"/t/{bad}")
        assert response.status_code == 404
        assert (await app_client.get(f"/t/{bad}/event.ics")).status_code == 404
    # After a re-issue the old page says so and shows no QR.
    await app_client.post(
        f"/api/v1/tickets/{ticket['ticket']['id']}/reissue", headers=tenant.headers
    )
    old = await app_client.get(f"/t/{ticket['secret']}")
    assert old.status_code == 200 and "replaced" in old.text and "<svg" not in old.text


async def test_counts(app_client: Client, tenant: Tenant, ctx: AppContext) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    secrets_ = [(await issue(app_client, tenant, event_id))["secret"] for _ in range(3)]
    await scan(app_client, tenant, secrets_[0])
    response = await app_client.get(
        f"/api/v1/events/{event_id}/checkin-counts", headers=tenant.headers
    )
    assert response.json() == {"event_id": event_id, "checked_in": 1, "expected": 3}


def test_secret_format_roundtrip() -> None:
    private, public = tickets.new_keypair()
    secret = tickets.sign(private, event_id=7, ticket_id=2**62, generation=3, issued_epoch=1)
    assert len(secret) == tickets.SECRET_CHARS == 119
    result, claim = tickets.verify_offline(public, secret)
    assert result == "ok" and claim is not None
    assert (claim.event_id, claim.ticket_id, claim.generation) == (7, 2**62, 3)
    assert tickets.verify_offline(public, secret, event_id=8)[0] == "invalid"
    assert tickets.verify_offline(public, secret, generations={2**62: 4})[0] == "revoked"
    assert tickets.verify_offline(public, secret + "=")[0] == "invalid"
    assert tickets.verify_offline(public, "é" * 119)[0] == "invalid"
    for _ in range(200):  # random text never raises
        assert tickets.verify_offline(public, secrets.token_urlsafe(90)[:119])[0] == "invalid"
