"""Delivery you can trust: the development mailbox marks what it stored delivered, and an
outbound SMS carries a signed `StatusCallback` whose Twilio-format report (signed with
Twilio's algorithm) marks the message delivered, or bounced toward the auto-pause."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from sqlalchemy import select

from popdrop.core import links
from popdrop.drops import outcomes
from popdrop.drops.models import Drop, SendRow
from popdrop.drops.pipeline import Sender
from popdrop.outbound.mailbox import Mailbox
from popdrop.outbound.twilio import TwilioSms, compute_signature
from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact
from tests.conftest import Tenant
from tests.drops.helpers import drop_spec, owner, started_drop

FIXTURES = Path(__file__).parent / "fixtures"
SID = "AC" + "a" * 32
TOKEN = "twilio-auth-token"
MESSAGES_PATH = f"/2010-04-01/Accounts/{SID}/Messages.json"


def configure(ctx: AppContext, **settings: Any) -> None:
    ctx.settings = ctx.settings.model_copy(update=settings)


def sender(ctx: AppContext, tenant: Tenant, **transports: Any) -> Sender:
    return Sender(
        ctx.db, ctx.signer, ctx.clock, ctx.settings.base_url, org_id=tenant.org_id, **transports
    )


async def rows_of(ctx: AppContext, drop_id: int) -> dict[str, SendRow]:
    """The drop's rows by provider id (SMS) or Message-ID (email)."""
    async with ctx.db.reader() as session:
        rows = (await session.scalars(select(SendRow).where(SendRow.drop_id == drop_id))).all()
    return {str(row.provider_id or row.message_id): row for row in rows}


# ---------------------------------------------------------------- the development mailbox


async def test_the_mailbox_marks_what_it_stored_delivered(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    for i in range(3):
        await add_contact(app_client, tenant, email=f"box{i}@x.io")
    drop_id = await started_drop(ctx, tenant, drop_spec())
    mailbox = Mailbox(ctx.db, ctx.clock)
    assert await sender(ctx, tenant, email=mailbox).run_until_idle() == 3

    rows = list((await rows_of(ctx, drop_id)).values())
    assert [row.status for row in rows] == ["delivered"] * 3
    assert all(row.delivered_at == row.sent_at is not None for row in rows)
    async with ctx.db.reader() as session:
        room = await outcomes.war_room(session, owner(tenant), drop_id)
        counts = (await outcomes.drop_counts(session, owner(tenant), [drop_id]))[drop_id]
    assert room.totals["sent"] == room.totals["delivered"] == 3  # the war room counts them
    assert counts.sent == counts.delivered == 3


# ---------------------------------------------------------------- SMS delivery reports


class TwilioFake:
    """Twilio's Messages endpoint, Twilio's wire format: keeps each form, answers 201 with
    a Message resource whose sid it makes up."""

    def __init__(self) -> None:
        self.forms: list[dict[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == MESSAGES_PATH
        form = dict(parse_qsl(request.content.decode(), keep_blank_values=True))
        self.forms.append(form)
        body = json.loads((FIXTURES / "twilio_message_created.json").read_bytes())
        body.update(sid=f"SM{len(self.forms):032x}", to=form["To"], status="queued")
        return httpx.Response(201, json=body)


@pytest.fixture
async def twilio_fake() -> Any:
    fake = TwilioFake()
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    yield fake, TwilioSms("https://api.twilio.test", SID, TOKEN, client=client)
    await client.aclose()


async def sms_drop(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, phones: list[str]
) -> int:
    for phone in phones:
        await add_contact(app_client, tenant, phone=phone, consents=("sms",))
    return await started_drop(ctx, tenant, drop_spec(channels=["sms"]))


async def report(
    client: httpx.AsyncClient, callback_url: str, sid: str, status: str, **extra: str
) -> httpx.Response:
    """What Twilio posts to a StatusCallback, signed over the URL as it was handed out."""
    params = {
        "AccountSid": SID,
        "ApiVersion": "2010-04-01",
        "From": "+15005550006",
        "MessageSid": sid,
        "MessageStatus": status,
        "SmsSid": sid,
        "SmsStatus": status,
        **extra,
    }
    signature = compute_signature(TOKEN, callback_url, params)
    path = urlsplit(callback_url).path
    return await client.post(path, data=params, headers={"X-Twilio-Signature": signature})


async def test_an_sms_carries_its_status_callback_and_a_signed_report_marks_it_delivered(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, twilio_fake: Any
) -> None:
    fake, twilio = twilio_fake
    configure(ctx, sms_auth_token=TOKEN)
    drop_id = await sms_drop(app_client, ctx, tenant, ["+33611110001", "+33611110002"])
    assert await sender(ctx, tenant, sms=twilio).run_until_idle() == 2

    # The organization's signed status URL (the token is timestamped: compare what it says).
    callback = fake.forms[0]["StatusCallback"]
    assert all(form["StatusCallback"] == callback for form in fake.forms)
    prefix = f"{ctx.settings.base_url}/api/v1/sms/"
    assert callback.startswith(prefix) and callback.endswith("/status")
    token = callback.removeprefix(prefix).removesuffix("/status")
    assert links.read_webhook(ctx.signer, token) == tenant.org_id
    first, second = sorted(await rows_of(ctx, drop_id))
    assert {row.status for row in (await rows_of(ctx, drop_id)).values()} == {"sent"}

    # Interim statuses change nothing; `delivered` marks the row delivered, once.
    assert (await report(app_client, callback, first, "sent")).status_code == 204
    assert (await rows_of(ctx, drop_id))[first].status == "sent"
    ctx.clock.advance(timedelta(seconds=20))  # type: ignore[attr-defined]
    delivered_at = ctx.clock.now()
    assert (await report(app_client, callback, first, "delivered")).status_code == 204
    ctx.clock.advance(timedelta(seconds=20))  # type: ignore[attr-defined]
    assert (await report(app_client, callback, first, "delivered")).status_code == 204
    row = (await rows_of(ctx, drop_id))[first]
    assert row.status == "delivered" and row.delivered_at == delivered_at
    assert (await rows_of(ctx, drop_id))[second].status == "sent"

    # A report that is not Twilio's (wrong signature) or for another message changes nothing.
    forged = await app_client.post(
        urlsplit(callback).path,
        data={"MessageSid": second, "MessageStatus": "delivered"},
        headers={"X-Twilio-Signature": "bm90IHR3aWxpbw=="},
    )
    assert forged.status_code == 403 and forged.json()["reason"] == "bad_signature"
    assert (await report(app_client, callback, "SM" + "f" * 32, "delivered")).status_code == 204
    assert (await rows_of(ctx, drop_id))[second].status == "sent"

    async with ctx.db.reader() as session:
        room = await outcomes.war_room(session, owner(tenant), drop_id)
    assert room.totals["sent"] == 2 and room.totals["delivered"] == 1


async def test_undelivered_sms_reports_are_bounces_that_auto_pause_the_drop(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    twilio_fake: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outcomes, "AUTO_PAUSE_MIN_SENT", 4)  # a verdict on a few messages
    fake, twilio = twilio_fake
    configure(ctx, sms_auth_token=TOKEN)
    phones = [f"+3361111100{i}" for i in range(4)]
    drop_id = await sms_drop(app_client, ctx, tenant, phones)
    assert await sender(ctx, tenant, sms=twilio).run_until_idle() == 4
    callback = fake.forms[0]["StatusCallback"]
    sids = sorted(await rows_of(ctx, drop_id))

    failed = await report(app_client, callback, sids[0], "undelivered", ErrorCode="30003")
    assert failed.status_code == 204
    row = (await rows_of(ctx, drop_id))[sids[0]]
    assert row.status == "bounced" and row.bounced_at is not None
    assert row.outcome == "twilio undelivered 30003"
    async with ctx.db.reader() as session:
        drop = await session.get(Drop, drop_id)
        assert drop is not None
    # One of four is a 25 % bounce rate, above the default 5 %: the drop stops.
    assert drop.status == "paused"
    assert drop.paused_reason is not None
    assert drop.paused_reason.startswith("auto-paused: sms bounce rate 25.0%")
    # An undelivered text is not an opt-out: the number keeps its consent.
    listed = await app_client.get("/api/v1/contacts?limit=100", headers=tenant.headers)
    assert {c["phone"]: c["consent"]["sms"] for c in listed.json()["items"]} == dict.fromkeys(
        phones, "granted"
    )
