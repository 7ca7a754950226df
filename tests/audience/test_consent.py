"""Consent and opt-out: every STOP form, START/HELP/YES, double opt-in, RFC 8058 headers,
and an opted-out person gone from every segment right after."""

from __future__ import annotations

import httpx
import pytest

from popdrop.audience import keywords, unsubscribe
from popdrop.audience.models import ConsentEvent, Contact, Suppression
from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact, inbound, preview
from tests.conftest import Tenant

STOP_FORMS = [
    "STOP",
    "stop",
    "Stop",
    "  stop  ",
    "STOP!",
    "stop.",
    "¡Stop!",
    "\tSTOP\n",
    "«stop»",
    "UNSUBSCRIBE",
    "unsubscribe",
    "Cancel",
    "END",
    "quit",
    "Revoke",
    "OPTOUT",
    "optout!!",
]
NOT_KEYWORDS = ["please stop", "stop it", "stopper", "STOP STOP", "", "opt out now", "🛑"]
PHONE = "+33612345678"


async def _sms_contact(client: httpx.AsyncClient, tenant: Tenant) -> dict[str, object]:
    return await add_contact(client, tenant, phone=PHONE, consents=("sms",))


@pytest.mark.parametrize("text", STOP_FORMS)
async def test_every_stop_form_opts_out_at_once(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, text: str
) -> None:
    contact = await _sms_contact(app_client, tenant)
    assert (await preview(app_client, tenant, channels=["sms"]))["total"] == 1

    result = await inbound(app_client, tenant, PHONE, text)

    assert result["action"] == "opted_out"
    assert result["contact_id"] == contact["id"]
    assert isinstance(result["reply"], str) and "START" in result["reply"]
    # Right after: in no segment, whatever the rules.
    assert (await preview(app_client, tenant, channels=["sms"]))["total"] == 0
    assert (await preview(app_client, tenant, channels=["email", "sms", "chat"]))["total"] == 0
    got = await app_client.get(f"/api/v1/contacts/{contact['id']}", headers=tenant.headers)
    assert got.json()["consent"]["sms"] == "revoked"
    history = await app_client.get(
        f"/api/v1/contacts/{contact['id']}/consents", headers=tenant.headers
    )
    last = history.json()[-1]
    assert (last["action"], last["source"]) == ("revoke", "sms_keyword")


@pytest.mark.parametrize("text", NOT_KEYWORDS)
async def test_text_that_only_contains_a_keyword_is_not_one(
    app_client: httpx.AsyncClient, tenant: Tenant, text: str
) -> None:
    await _sms_contact(app_client, tenant)
    result = await inbound(app_client, tenant, PHONE, text or " ")
    assert result["action"] is None and result["reply"] is None
    assert (await preview(app_client, tenant, channels=["sms"]))["total"] == 1


async def test_stop_twice_answers_once_each_and_records_one_revoke(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    contact = await _sms_contact(app_client, tenant)
    first = await inbound(app_client, tenant, PHONE, "STOP")
    second = await inbound(app_client, tenant, PHONE, "stop")
    assert first["reply"] and second["reply"]
    async with ctx.db.reader() as session:
        revokes = (
            await session.scalars(
                ConsentEvent.__table__.select().where(
                    ConsentEvent.contact_id == contact["id"], ConsentEvent.action == "revoke"
                )
            )
        ).all()
    assert len(revokes) == 1


async def test_start_and_unstop_resubscribe(app_client: httpx.AsyncClient, tenant: Tenant) -> None:
    await _sms_contact(app_client, tenant)
    for word in ("START", "unstop!"):
        await inbound(app_client, tenant, PHONE, "STOP")
        assert (await preview(app_client, tenant, channels=["sms"]))["total"] == 0
        result = await inbound(app_client, tenant, PHONE, word)
        assert result["action"] == "opted_in"
        assert (await preview(app_client, tenant, channels=["sms"]))["total"] == 1


async def test_stopall_opts_out_of_every_channel(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    await add_contact(app_client, tenant, email="ana@example.com", phone=PHONE)
    assert (await preview(app_client, tenant, channels=["email"]))["total"] == 1
    await inbound(app_client, tenant, PHONE, "Stopall")
    assert (await preview(app_client, tenant, channels=["email", "sms"]))["total"] == 0


async def test_help_answers_with_the_organizations_text(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    default = await inbound(app_client, tenant, PHONE, "help")
    assert default["action"] == "help" and "STOP" in default["reply"]
    response = await app_client.put(
        "/api/v1/audience/settings",
        json={"hot_days": 7, "warm_days": 60, "help_text": "Tram Depot pop-up: call 0800 123"},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    assert (await inbound(app_client, tenant, PHONE, "HELP?"))["reply"] == (
        "Tram Depot pop-up: call 0800 123"
    )


async def test_stop_from_an_unknown_number_blocks_a_later_import_consent(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    result = await inbound(app_client, tenant, "+447911123456", "STOP")
    assert result["action"] == "opted_out" and result["contact_id"] is None
    body = {
        "phone": "+44 7911 123456",
        "consents": [
            {"channel": "sms", "wording": "imported", "source": "import", "proof": "list.csv"}
        ],
    }
    refused = await app_client.post("/api/v1/contacts", json=body, headers=tenant.headers)
    assert refused.status_code == 409 and refused.json()["reason"] == "suppressed"
    async with ctx.db.reader() as session:  # nothing half-written
        assert (
            await session.scalar(Contact.__table__.select().where(Contact.org_id == tenant.org_id))
        ) is None
    # The person's own fresh consent (a form) does lift it.
    body["consents"][0]["source"] = "form"
    accepted = await app_client.post("/api/v1/contacts", json=body, headers=tenant.headers)
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["contact"]["consent"]["sms"] == "granted"


async def test_email_double_opt_in(app_client: httpx.AsyncClient, tenant: Tenant) -> None:
    contact = await add_contact(app_client, tenant, email="bo@example.com", consents=())
    response = await app_client.post(
        f"/api/v1/contacts/{contact['id']}/consents",
        json={"channel": "email", "action": "request", "wording": "Drop news by email"},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["contact"]["consent"]["email"] == "pending"
    assert (await preview(app_client, tenant, channels=["email"]))["total"] == 0
    confirm = data["confirm_url"].split("://", 1)[1].split("/", 1)[1]
    page = await app_client.get(f"/{confirm}")
    assert page.status_code == 200
    assert (await preview(app_client, tenant, channels=["email"]))["total"] == 1
    history = await app_client.get(
        f"/api/v1/contacts/{contact['id']}/consents", headers=tenant.headers
    )
    grant = history.json()[-1]
    assert (grant["action"], grant["source"], grant["wording"]) == (
        "grant",
        "double_opt_in",
        "Drop news by email",
    )
    tampered = await app_client.get(f"/{confirm[:-3]}xyz")
    assert tampered.status_code == 400


async def test_sms_double_opt_in_by_replying_yes(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    contact = await add_contact(app_client, tenant, phone=PHONE, consents=())
    stray = await inbound(app_client, tenant, PHONE, "yes")
    assert stray["action"] is None  # nothing was pending
    await app_client.post(
        f"/api/v1/contacts/{contact['id']}/consents",
        json={"channel": "sms", "action": "request", "wording": "Reply YES for drop alerts"},
        headers=tenant.headers,
    )
    assert (await preview(app_client, tenant, channels=["sms"]))["total"] == 0
    result = await inbound(app_client, tenant, PHONE, "Yes!")
    assert result["action"] == "confirmed"
    assert (await preview(app_client, tenant, channels=["sms"]))["total"] == 1


async def test_rfc8058_headers_and_one_click_post_without_body(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    contact = await add_contact(app_client, tenant, email="cy@example.com", phone=PHONE)
    async with ctx.db.reader() as session:
        row = await session.get(Contact, contact["id"])
        assert row is not None
        headers = unsubscribe.unsubscribe_headers(ctx.signer, ctx.settings.base_url, row)
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = headers["List-Unsubscribe"].strip("<>")
    assert url.startswith("https://") or url.startswith("http://")
    path = "/" + url.split("://", 1)[1].split("/", 1)[1]

    for body in (b"", b"List-Unsubscribe=One-Click"):
        response = await app_client.post(
            path, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert response.status_code == 200, response.text

    assert (await preview(app_client, tenant, channels=["email"]))["total"] == 0
    assert (await preview(app_client, tenant, channels=["sms"]))["total"] == 1  # SMS untouched
    async with ctx.db.reader() as session:
        suppressed = await session.scalar(
            Suppression.__table__.select().where(
                Suppression.org_id == tenant.org_id, Suppression.channel == "email"
            )
        )
    assert suppressed is not None
    bad = await app_client.post(path[:-4] + "AAAA", content=b"")
    assert bad.status_code == 400


async def test_operator_cannot_regrant_after_opt_out(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    contact = await add_contact(app_client, tenant, phone=PHONE, consents=("sms",))
    await inbound(app_client, tenant, PHONE, "STOP")
    response = await app_client.post(
        f"/api/v1/contacts/{contact['id']}/consents",
        json={
            "channel": "sms",
            "action": "grant",
            "wording": "operator says so",
            "source": "operator",
        },
        headers=tenant.headers,
    )
    assert response.status_code == 409 and response.json()["reason"] == "suppressed"


async def test_bad_contact_points_are_refused_with_the_field(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    for body, field in (
        ({"email": "not-an-email"}, "email"),
        ({"phone": "12"}, "phone"),
        ({"first_name": "Ana"}, "contact"),
    ):
        response = await app_client.post("/api/v1/contacts", json=body, headers=tenant.headers)
        assert response.status_code == 422, response.text
        assert response.json()["reason"] == "invalid_request"
        assert response.json()["field"] == field
    listed = await app_client.get("/api/v1/contacts", headers=tenant.headers)
    assert listed.json()["items"] == []


def test_parse_keyword_table() -> None:
    assert keywords.parse_keyword(" Stop. ") == "stop"
    assert keywords.parse_keyword("STOPALL") == "stopall"
    assert keywords.parse_keyword("unstop") == "start"
    assert keywords.parse_keyword("Info") == "help"
    assert keywords.parse_keyword("stop please") is None
