"""Privacy: export everything held about a person, erase them from every table, keep them
suppressed, and the retention rule."""

from __future__ import annotations

import asyncio
import secrets
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import String, Text, select

from popdrop.chat import conversations, flow_store
from popdrop.chat import inbound as chat_inbound
from popdrop.chat.engine import Inbound
from popdrop.core.clock import FrozenClock
from popdrop.core.db import Base
from popdrop.migrations.registry import target_metadata
from popdrop.outbound.models import MailboxMessage
from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact, inbound, preview
from tests.conftest import Tenant, issue
from tests.events.helpers import make_shop


def _unique_person() -> tuple[str, str]:
    """An email and a French mobile number no other test uses (the scan reads all rows)."""
    # +33 6 12 …: an assigned mobile range (some +33 6 9x ranges are not valid numbers).
    digits = f"{secrets.randbelow(10**6):06d}"
    return f"Erin.{digits}@Mail.example", f"+33612{digits}"


async def _person_everywhere(
    client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, email: str, phone: str
) -> dict[str, Any]:
    """A contact whose email and phone also sit in an RSVP, its ticket, a hold and its
    order (with its receipt in the outbox), a voucher redemption with a per-contact limit,
    and a stored idempotent answer."""
    contact = await add_contact(
        client,
        tenant,
        email=email,
        phone=phone,
        first_name="Erin",
        tags=["vip"],
        interests=["sneakers"],
        locale="fr",
        lat=48.85,
        lon=2.35,
    )
    shop = await make_shop(client, tenant, ctx.clock.now())
    rsvp = await client.post(
        f"/api/v1/public/events/{shop.event_id}/rsvps",
        json={
            "slot_id": shop.slot_id,
            "email": email.lower(),
            "phone": phone,
            "places": 1,
            "consent": True,
            "consent_text": "I agree.",
        },
        headers={"Idempotency-Key": f"rsvp-{phone}"},
    )
    assert rsvp.status_code == 201, rsvp.text
    hold = await client.post(
        "/api/v1/holds",
        json={"variant_id": shop.variant_id, "lane_id": shop.lane_id, "contact_ref": phone},
        headers=tenant.headers,
    )
    assert hold.status_code == 201, hold.text
    order = await client.post(  # the hold checked out, its receipt to their email and phone
        "/api/v1/orders",
        json={
            "hold_ids": [hold.json()["id"]],
            "contact_ref": phone,
            "receipt_email": email.lower(),
            "receipt_phone": phone,
        },
        headers={**tenant.headers, "Idempotency-Key": f"order-{phone}"},
    )
    assert order.status_code == 201, order.text
    _batch, codes = await issue(client, tenant, per_contact_limit=2)
    redeemed = await client.post(
        "/api/v1/vouchers/redeem",
        json={"code": codes[0], "contact_ref": email.lower()},
        headers={**tenant.headers, "Idempotency-Key": f"redeem-{phone}"},
    )
    assert redeemed.status_code == 200, redeemed.text
    async with ctx.db.transaction() as session:  # a drop to them in the dev mailbox
        session.add(
            MailboxMessage(
                org_id=tenant.org_id,
                channel="email",
                recipient=email.lower(),
                subject="Drop",
                text="hi",
                headers="{}",
                at=ctx.clock.now(),
            )
        )
    # A chat over SMS from their phone, where they also type their email.
    async with ctx.db.transaction() as session:
        await flow_store.publish_default_flow(
            session, tenant.org_id, shop.event_id, now=ctx.clock.now()
        )
    chat_deps = conversations.ChatDeps(ctx.signer, ctx.settings.base_url)
    for text in ("hi", email):
        await chat_inbound.handle(
            ctx.db,
            chat_deps,
            org_id=tenant.org_id,
            channel="sms",
            address=phone,
            inbound=Inbound.of_text(text),
            now=ctx.clock.now(),
        )
    return contact


async def _tables_holding(ctx: AppContext, needles: list[str]) -> list[str]:
    """Every (table.column) whose text holds one of the needles, in any case."""
    found: list[str] = []
    lowered = [n.lower() for n in needles]
    async with ctx.db.reader() as session:
        for table in target_metadata().sorted_tables:
            columns = [c for c in table.columns if isinstance(c.type, String | Text)]
            if not columns:
                continue
            for row in (await session.execute(select(*columns))).all():
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, str) and any(n in value.lower() for n in lowered):
                        found.append(f"{table.name}.{column.name}")
    return sorted(set(found))


async def test_export_holds_everything_about_the_person(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    email, phone = _unique_person()
    contact = await _person_everywhere(app_client, tenant, ctx, email, phone)
    response = await app_client.get(
        f"/api/v1/contacts/{contact['id']}/export", headers=tenant.headers
    )
    assert response.status_code == 200
    assert "attachment" in response.headers["content-disposition"]
    data = response.json()
    assert data["contact"]["email"] == email.lower()
    assert data["contact"]["tags"] == ["vip"]
    assert [e["channel"] for e in data["consent_ledger"]] == ["email", "sms"]
    assert data["consent_ledger"][0]["wording"].startswith("Yes, send me")
    assert len(data["rsvps"]) == 1 and len(data["tickets"]) == 1 and len(data["orders"]) == 1
    assert [a["kind"] for a in data["activity"]] == ["rsvp", "chat"]


async def test_erase_leaves_no_email_or_phone_in_any_table(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    email, phone = _unique_person()
    contact = await _person_everywhere(app_client, tenant, ctx, email, phone)
    needles = [email, phone, phone.lstrip("+")]
    before = await _tables_holding(ctx, needles)
    assert "contacts.email" in before and "rsvps.email" in before  # the scan does see them

    response = await app_client.post(
        f"/api/v1/contacts/{contact['id']}/erase", headers=tenant.headers
    )
    assert response.status_code == 200, response.text
    assert response.json()["scrubbed"]["rsvps"] >= 1

    assert await _tables_holding(ctx, needles) == []
    view = await app_client.get(f"/api/v1/contacts/{contact['id']}", headers=tenant.headers)
    erased = view.json()
    assert erased["erased_at"] is not None
    assert (erased["email"], erased["phone"], erased["first_name"]) == (None, None, None)
    # Activity stays, anonymously: the funnel still counts the RSVP.
    export = await app_client.get(
        f"/api/v1/contacts/{contact['id']}/export", headers=tenant.headers
    )
    assert [a["kind"] for a in export.json()["activity"]] == ["rsvp", "chat"]
    assert (await preview(app_client, tenant, channels=["email", "sms", "chat"]))["total"] == 0

    # Coming back through the API is refused as suppressed, whatever the consent source.
    again = await app_client.post("/api/v1/contacts", json={"email": email}, headers=tenant.headers)
    assert again.status_code == 409 and again.json()["reason"] == "suppressed"
    again = await app_client.post("/api/v1/contacts", json={"phone": phone}, headers=tenant.headers)
    assert again.status_code == 409
    # A re-import of the same row is refused and reported as suppressed, by line.
    started = await client_import(app_client, tenant, f"email,phone\n{email},{phone}\n")
    assert started["problems"] == [
        {
            "line": 2,
            "reason": "suppressed",
            "field": started["problems"][0]["field"],
            "message": started["problems"][0]["message"],
        }
    ]
    assert (started["created"], started["updated"], started["refused"]) == (0, 0, 1)
    # STOP from the erased number still answers, and stores nothing new in clear.
    assert (await inbound(app_client, tenant, phone, "STOP"))["action"] == "opted_out"
    assert await _tables_holding(ctx, needles) == []
    twice = await app_client.post(f"/api/v1/contacts/{contact['id']}/erase", headers=tenant.headers)
    assert twice.status_code == 409


async def test_erase_keeps_the_voucher_contact_limit(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    lim = f"lim-{secrets.token_hex(4)}@x.io"
    contact = await add_contact(app_client, tenant, email=lim)
    _batch, codes = await issue(app_client, tenant, quantity=3, per_contact_limit=1)
    ok = await app_client.post(
        "/api/v1/vouchers/redeem",
        json={"code": codes[0], "contact_ref": lim},
        headers=tenant.headers,
    )
    assert ok.status_code == 200
    await app_client.post(f"/api/v1/contacts/{contact['id']}/erase", headers=tenant.headers)
    assert await _tables_holding(ctx, [lim]) == []


async def test_retention_purges_only_long_inactive_contacts(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    start = clock.now()
    old = await add_contact(app_client, tenant, email="old@x.io")
    active = await add_contact(app_client, tenant, email="active@x.io")
    clock.set(start + timedelta(days=300))
    await app_client.post(
        "/api/v1/contacts/activity",
        json={"kind": "purchase", "contact_id": active["id"]},
        headers=tenant.headers,
    )
    clock.set(start + timedelta(days=400))
    no_rule = await app_client.post("/api/v1/contacts/purge", json={}, headers=tenant.headers)
    assert no_rule.status_code == 422
    await app_client.put(
        "/api/v1/audience/settings",
        json={"hot_days": 7, "warm_days": 60, "retention_months": 12},
        headers=tenant.headers,
    )
    purged = await app_client.post("/api/v1/contacts/purge", json={}, headers=tenant.headers)
    assert purged.status_code == 200, purged.text
    assert purged.json()["erased"] == 1
    gone = await app_client.get(f"/api/v1/contacts/{old['id']}", headers=tenant.headers)
    kept = await app_client.get(f"/api/v1/contacts/{active['id']}", headers=tenant.headers)
    assert gone.json()["erased_at"] is not None and gone.json()["email"] is None
    assert kept.json()["erased_at"] is None


async def client_import(client: httpx.AsyncClient, tenant: Tenant, csv_text: str) -> dict[str, Any]:
    """Import through the API's background job and wait for it to finish."""
    started = await client.post(
        "/api/v1/contact-imports",
        content=csv_text.encode(),
        headers={**tenant.headers, "Content-Type": "text/csv"},
    )
    assert started.status_code == 202, started.text
    for _ in range(200):
        job = await client.get(
            f"/api/v1/contact-imports/{started.json()['id']}", headers=tenant.headers
        )
        if job.json()["status"] in ("done", "failed"):
            assert job.json()["status"] == "done", job.text
            result: dict[str, Any] = job.json()
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("the import job did not finish")


def test_every_table_is_scanned() -> None:
    # The erase scan walks the metadata: make sure the audience tables are part of it.
    names = {t.name for t in target_metadata().sorted_tables}
    assert {"contacts", "rsvps", "tickets", "holds", "redemptions"} <= names
    assert Base.metadata is target_metadata()
