"""Drops over the API: the seed test blocks a broken send, provider feedback suppresses
the right addresses, clicks are tracked, pause/resume/cancel, A/B winner and war room."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from popdrop.core.links import Purpose
from popdrop.drops.models import SendRow
from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact, preview
from tests.conftest import Tenant
from tests.drops.helpers import Recorder, sender
from tests.events.helpers import make_shop

FIXTURES = Path(__file__).parent / "fixtures"


def _drop(base: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "Saturday drop",
        "channels": ["email"],
        "from_email": "drops@popdrop.test",
        "variants": [
            {
                "name": "A",
                "content": {
                    "email": {
                        "default": {
                            "subject": "The drop is on",
                            "text": "Code {{ voucher_code }}.",
                        }
                    }
                },
            }
        ],
        "voucher": {"discount_value": 15},
        "seed_list": ["seed@popdrop.test"],
        "quiet_start_hour": 0,
        "quiet_end_hour": 0,
    }
    body.update(overrides)
    return body


async def _create(
    client: httpx.AsyncClient, tenant: Tenant, body: dict[str, Any]
) -> dict[str, Any]:
    response = await client.post("/api/v1/drops", json=body, headers=tenant.headers)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def _post(
    client: httpx.AsyncClient, tenant: Tenant, url: str, body: Any = None
) -> httpx.Response:
    return await client.post(url, json=body, headers=tenant.headers)


async def test_seed_test_passes_then_unblocks_the_send(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    await add_contact(app_client, tenant, email="buyer@x.io")
    body = _drop(ctx.settings.base_url, event_id=shop.event_id)
    body["variants"][0]["content"]["email"]["default"]["text"] = (
        "Code {{ voucher_code }}: {{ event.url }}"
    )
    drop = await _create(app_client, tenant, body)

    blocked = await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/start")
    assert blocked.status_code == 409 and blocked.json()["reason"] == "seed_test_required"

    tested = await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/seed-test")
    assert tested.status_code == 200, tested.text
    result = tested.json()
    assert result["seed_status"] == "passed", result["seed_report"]
    entry = result["seed_report"][0]
    assert entry["voucher"] == "valid" and entry["delivered"] is True
    assert entry["links"] and all(link["ok"] for link in entry["links"])

    started = await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/start")
    assert started.status_code == 200 and started.json()["status"] == "sending"
    assert started.json()["counts"] == {"pending": 1}


async def test_a_broken_link_fails_the_seed_test_and_blocks_the_send(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    base = ctx.settings.base_url.rstrip("/")
    body = _drop(base)
    body["variants"][0]["content"]["email"]["default"]["text"] = f"Shop: {base}/e/987654321"
    drop = await _create(app_client, tenant, body)
    tested = await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/seed-test")
    assert tested.status_code == 200, tested.text
    result = tested.json()
    assert result["seed_status"] == "failed"
    link = result["seed_report"][0]["links"][0]
    assert link["ok"] is False and link["detail"] == "HTTP 404"
    blocked = await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/start")
    assert blocked.status_code == 409 and blocked.json()["reason"] == "seed_test_required"
    # An owner may override it, with a reason on record.
    override = await _post(
        app_client, tenant, f"/api/v1/drops/{drop['id']}/seed-override", {"reason": "known 404"}
    )
    assert override.json()["seed_status"] == "overridden"
    started = await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/start")
    assert started.status_code == 200


async def test_a_revoked_voucher_fails_the_seed_test(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    drop = await _create(app_client, tenant, _drop(ctx.settings.base_url))
    batches = await app_client.get("/api/v1/voucher-batches", headers=tenant.headers)
    batch = next(b for b in batches.json() if b["name"] == "Drop: Saturday drop")
    revoked = await _post(
        app_client, tenant, f"/api/v1/voucher-batches/{batch['id']}/revoke", {"reason": "oops"}
    )
    assert revoked.status_code == 200, revoked.text
    tested = await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/seed-test")
    assert tested.status_code == 200, tested.text
    result = tested.json()
    assert result["seed_status"] == "failed"
    assert result["seed_report"][0]["voucher"] == "revoked"


async def test_clicks_are_tracked_and_redirect_with_utm(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    await add_contact(app_client, tenant, email="clicker@x.io")
    body = _drop(ctx.settings.base_url)
    body["variants"][0]["content"]["email"]["default"]["text"] = "https://shop.example/drop?x=1"
    drop = await _create(app_client, tenant, body)
    await _post(
        app_client, tenant, f"/api/v1/drops/{drop['id']}/seed-override", {"reason": "test run"}
    )
    started = await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/start")
    assert started.status_code == 200, started.text
    email = Recorder()
    await sender(ctx, email, org=tenant).run_until_idle()
    assert email.sent, started.json()
    text = email.sent[0].text  # type: ignore[union-attr]
    tracked = next(word for word in text.split() if "/r/" in word)
    path = "/r/" + tracked.split("/r/", 1)[1]
    response = await app_client.get(path)
    assert response.status_code == 302
    assert response.headers["location"].startswith("https://shop.example/drop?x=1&utm_source=")
    assert "utm_campaign=saturday-drop" in response.headers["location"]
    async with ctx.db.reader() as session:
        row = await session.scalar(SendRow.__table__.select().where(SendRow.drop_id == drop["id"]))
    assert row is not None
    tampered = await app_client.get(path[:-3] + "abc")
    assert tampered.status_code == 400
    # A link in mail sent before the short token (JSON payload) still redirects.
    legacy = ctx.signer.sign(
        Purpose.DROP_CLICK, {"d": drop["id"], "r": None, "u": "https://shop.example/old"}
    )
    old = await app_client.get(f"/r/{legacy}")
    assert old.status_code == 302 and old.headers["location"] == "https://shop.example/old"


@pytest.mark.parametrize(
    ("provider", "fixture", "suppressed", "kept"),
    [
        ("ses", "ses_bounce_permanent", ["ann.lee@example.com", "bob@example.net"], []),
        ("ses", "ses_complaint", ["dave@example.com"], []),
        ("ses", "ses_bounce_transient", [], ["carol@example.org"]),
        (
            "sendgrid",
            "sendgrid_events",
            ["heidi@example.net", "judy@example.com", "ken@example.com"],
            ["frank@example.com", "grace@example.org", "ivan@example.com"],
        ),
        ("postmark", "postmark_bounce_hard", ["liam@example.com"], []),
        ("postmark", "postmark_spam_complaint", ["noah@example.com"], []),
        ("postmark", "postmark_bounce_soft", [], ["mia@example.com"]),
        ("generic", "generic_bounce", ["quinn@example.com"], []),
        ("generic", "generic_complaint", ["sam@example.com"], []),
        ("generic", "generic_soft_bounce", [], ["rita@example.com"]),
    ],
)
async def test_provider_feedback_suppresses_the_right_addresses(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    provider: str,
    fixture: str,
    suppressed: list[str],
    kept: list[str],
) -> None:
    ctx.settings = ctx.settings.model_copy(update={"feedback_webhook_secret": "fb-secret"})
    for address in suppressed + kept:
        await add_contact(app_client, tenant, email=address)
    assert (await preview(app_client, tenant, channels=["email"]))["total"] == len(
        suppressed + kept
    )
    urls = (await app_client.get("/api/v1/webhook-urls", headers=tenant.headers)).json()
    path = "/" + urls[provider].split("://", 1)[1].split("/", 1)[1]
    body = (FIXTURES / f"{fixture}.json").read_bytes()
    response = await app_client.post(path, content=body, params={"token": "fb-secret"})
    assert response.status_code == 200, response.text

    assert (await preview(app_client, tenant, channels=["email"]))["total"] == len(kept)
    listed = await app_client.get("/api/v1/contacts?limit=100", headers=tenant.headers)
    states = {c["email"]: c["consent"]["email"] for c in listed.json()["items"]}
    assert all(states[a] == "revoked" for a in suppressed)
    assert all(states[a] == "granted" for a in kept)
    # A later import cannot re-subscribe them: the suppression list holds them.
    for address in suppressed:
        again = await app_client.post(
            "/api/v1/contacts",
            json={
                "email": address,
                "consents": [
                    {"channel": "email", "wording": "w", "source": "import", "proof": "p"}
                ],
            },
            headers=tenant.headers,
        )
        assert again.status_code == 409 and again.json()["reason"] == "suppressed"


async def test_feedback_with_a_forged_url_is_refused(app_client: httpx.AsyncClient) -> None:
    body = (FIXTURES / "generic_bounce.json").read_bytes()
    response = await app_client.post("/api/v1/feedback/generic/not-a-token", content=body)
    assert response.status_code == 400
    bad = await app_client.post("/api/v1/feedback/generic/x", content=b"{not json")
    assert bad.status_code in (400, 422)


async def test_pause_resume_cancel_are_idempotent(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    for i in range(3):
        await add_contact(app_client, tenant, email=f"p{i}@x.io")
    drop = await _create(app_client, tenant, _drop(ctx.settings.base_url))
    await _post(
        app_client, tenant, f"/api/v1/drops/{drop['id']}/seed-override", {"reason": "test run"}
    )
    await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/start")
    for _ in range(2):
        paused = await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/pause")
        assert paused.status_code == 200 and paused.json()["status"] == "paused"
    email = Recorder()
    assert await sender(ctx, email, org=tenant).run_until_idle() == 0  # paused: nothing goes out
    for _ in range(2):
        resumed = await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/resume")
        assert resumed.json()["status"] == "sending"
    await sender(ctx, email, org=tenant).run_until_idle()
    assert len(email.sent) == 3
    cancelled = await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled"
    again = await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/resume")
    assert again.status_code == 409


async def test_ab_test_sends_the_winner_to_the_rest(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    from popdrop.drops import outcomes
    from popdrop.drops.models import Drop

    for i in range(60):
        await add_contact(app_client, tenant, email=f"ab{i}@x.io")
    body = _drop(
        ctx.settings.base_url, ab_test_fraction=0.5, ab_min_sample=5, ab_decide_after_seconds=600
    )
    content = body["variants"][0]["content"]
    body["variants"] = [
        {"name": "A", "split_percent": 50, "content": content},
        {"name": "B", "split_percent": 50, "content": json.loads(json.dumps(content))},
    ]
    body["variants"][1]["content"]["email"]["default"]["subject"] = "B subject"
    drop = await _create(app_client, tenant, body)
    await _post(
        app_client, tenant, f"/api/v1/drops/{drop['id']}/seed-override", {"reason": "test run"}
    )
    started = await _post(app_client, tenant, f"/api/v1/drops/{drop['id']}/start")
    counts = started.json()["counts"]
    assert counts["held"] > 0 and counts["pending"] > 0
    email = Recorder()
    await sender(ctx, email, org=tenant).run_until_idle()
    assert len(email.sent) == counts["pending"]
    # Everyone who got B clicked; nobody who got A did.
    async with ctx.db.transaction() as session:
        await session.execute(
            SendRow.__table__.update()
            .where(SendRow.drop_id == drop["id"], SendRow.variant == "B")
            .values(clicked_at=ctx.clock.now())
        )
    ctx.clock.advance(timedelta(seconds=601))  # type: ignore[attr-defined]
    async with ctx.db.transaction() as session:
        row = await session.get(Drop, drop["id"])
        assert row is not None
        decision = await outcomes.decide_ab(session, row, now=ctx.clock.now())
    assert decision is not None and decision.winner == "B" and decision.significant
    await sender(ctx, email, org=tenant).run_until_idle()
    assert len(email.sent) == 60
    late = [m for m in email.sent[counts["pending"] :]]
    assert all(m.subject == "B subject" for m in late)  # type: ignore[union-attr]
    result = (await app_client.get(f"/api/v1/drops/{drop['id']}", headers=tenant.headers)).json()
    assert result["ab_winner"] == "B" and result["ab_result"]["significant"] is True
    room = (
        await app_client.get(f"/api/v1/drops/{drop['id']}/war-room", headers=tenant.headers)
    ).json()
    assert room["totals"]["sent"] == 60
