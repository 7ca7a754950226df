"""Provider webhooks must prove their origin: Twilio inbound and status callbacks, SES /
SendGrid / Postmark / generic feedback, Telegram. A webhook whose secret is not configured
is refused (403 `webhook_not_configured`) unless insecure webhooks are switched on; a
wrong or missing proof is 403 `bad_signature`; a refused webhook changes nothing."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from popdrop.outbound import feedback
from popdrop.outbound.twilio import compute_signature
from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact
from tests.conftest import Tenant

FIXTURES = Path(__file__).parent / "fixtures"
PHONE = "+33612340001"
OUR_NUMBER = "+15005550006"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:popdrop-ses-feedback"


def configure(ctx: AppContext, **settings: Any) -> None:
    ctx.settings = ctx.settings.model_copy(update=settings)


async def webhook_paths(client: httpx.AsyncClient, tenant: Tenant) -> dict[str, str]:
    urls = (await client.get("/api/v1/webhook-urls", headers=tenant.headers)).json()
    return {name: "/" + url.split("://", 1)[1].split("/", 1)[1] for name, url in urls.items()}


def stop_form(sender: str = PHONE) -> dict[str, str]:
    return {
        "MessageSid": "SM" + "1" * 32,
        "AccountSid": "AC" + "0" * 32,
        "From": sender,
        "To": OUR_NUMBER,
        "Body": "STOP",
        "NumMedia": "0",
    }


async def post_signed(
    client: httpx.AsyncClient, path: str, params: dict[str, str], key: str | None
) -> httpx.Response:
    headers = {}
    if key is not None:
        url = str(client.base_url).rstrip("/") + path
        headers["X-Twilio-Signature"] = compute_signature(key, url, params)
    return await client.post(path, data=params, headers=headers)


async def consent(client: httpx.AsyncClient, tenant: Tenant, channel: str) -> dict[str, str]:
    listed = await client.get("/api/v1/contacts?limit=100", headers=tenant.headers)
    return {
        c[channel if channel == "email" else "phone"]: c["consent"][channel]
        for c in listed.json()["items"]
    }


def refused(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 403, response.text
    assert response.json()["reason"] == reason


# --- Twilio ------------------------------------------------------------------------------------


async def test_without_an_auth_token_a_stop_signed_with_an_empty_key_is_refused(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    """Before: an empty auth token made HMAC("", …) a signature anyone could compute."""
    await add_contact(app_client, tenant, phone=PHONE)
    paths = await webhook_paths(app_client, tenant)
    configure(ctx, sms_auth_token="")
    forged = await post_signed(app_client, paths["twilio_inbound"], stop_form(), "")
    refused(forged, "webhook_not_configured")
    unsigned = await post_signed(app_client, paths["twilio_inbound"], stop_form(), None)
    refused(unsigned, "webhook_not_configured")
    status = {"MessageSid": "SM" + "2" * 32, "MessageStatus": "delivered"}
    refused(
        await post_signed(app_client, paths["twilio_status"], status, ""),
        "webhook_not_configured",
    )
    assert (await consent(app_client, tenant, "sms"))[PHONE] == "granted"


async def test_a_configured_auth_token_is_enforced(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await add_contact(app_client, tenant, phone=PHONE)
    paths = await webhook_paths(app_client, tenant)
    configure(ctx, sms_auth_token="the-real-token", insecure_webhooks=True)
    # Insecure mode never weakens a configured token.
    for key in ("", "a-guess", None):
        response = await post_signed(app_client, paths["twilio_inbound"], stop_form(), key)
        refused(response, "bad_signature")
    status = {"MessageSid": "SM" + "2" * 32, "MessageStatus": "delivered"}
    refused(await post_signed(app_client, paths["twilio_status"], status, "x"), "bad_signature")
    assert (await consent(app_client, tenant, "sms"))[PHONE] == "granted"

    signed = await post_signed(app_client, paths["twilio_inbound"], stop_form(), "the-real-token")
    assert signed.status_code == 200, signed.text
    assert (await consent(app_client, tenant, "sms"))[PHONE] == "revoked"
    ok = await post_signed(app_client, paths["twilio_status"], status, "the-real-token")
    assert ok.status_code == 204


async def test_twilio_signature_over_the_public_base_url_is_accepted(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    """Behind a proxy the request URL differs from the one Twilio signed (the base URL)."""
    await add_contact(app_client, tenant, phone=PHONE)
    paths = await webhook_paths(app_client, tenant)
    configure(ctx, sms_auth_token="tok", base_url="https://pop.example")
    params = stop_form()
    url = "https://pop.example" + paths["twilio_inbound"]
    response = await app_client.post(
        paths["twilio_inbound"],
        data=params,
        headers={"X-Twilio-Signature": compute_signature("tok", url, params)},
    )
    assert response.status_code == 200, response.text


async def test_insecure_mode_lets_unsigned_sms_in_only_when_switched_on(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await add_contact(app_client, tenant, phone=PHONE)
    paths = await webhook_paths(app_client, tenant)
    configure(ctx, sms_auth_token="", insecure_webhooks=True)
    response = await post_signed(app_client, paths["twilio_inbound"], stop_form(), None)
    assert response.status_code == 200, response.text
    assert (await consent(app_client, tenant, "sms"))[PHONE] == "revoked"


# --- delivery feedback ----------------------------------------------------------------------------

FEEDBACK = [
    ("ses", "ses_bounce_permanent", "ann.lee@example.com"),
    ("sendgrid", "sendgrid_events", "heidi@example.net"),
    ("postmark", "postmark_bounce_hard", "liam@example.com"),
    ("generic", "generic_bounce", "quinn@example.com"),
]


@pytest.mark.parametrize(("provider", "fixture", "address"), FEEDBACK)
async def test_feedback_without_a_secret_is_refused_and_suppresses_nobody(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    provider: str,
    fixture: str,
    address: str,
) -> None:
    await add_contact(app_client, tenant, email=address)
    path = (await webhook_paths(app_client, tenant))[provider]
    body = (FIXTURES / f"{fixture}.json").read_bytes()
    refused(await app_client.post(path, content=body), "webhook_not_configured")
    assert (await consent(app_client, tenant, "email"))[address] == "granted"

    configure(ctx, feedback_webhook_secret="fb-secret")
    refused(await app_client.post(path, content=body), "bad_signature")
    wrong = await app_client.post(path, content=body, params={"token": "fb-secre"})
    refused(wrong, "bad_signature")
    assert (await consent(app_client, tenant, "email"))[address] == "granted"

    basic = base64.b64encode(b"popdrop:fb-secret").decode()
    ok = await app_client.post(path, content=body, headers={"Authorization": f"Basic {basic}"})
    assert ok.status_code == 200, ok.text
    assert (await consent(app_client, tenant, "email"))[address] == "revoked"


async def test_feedback_secret_in_a_header_and_insecure_mode(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    await add_contact(app_client, tenant, email="quinn@example.com")
    await add_contact(app_client, tenant, email="sam@example.com")
    path = (await webhook_paths(app_client, tenant))["generic"]
    configure(ctx, feedback_webhook_secret="fb-secret")
    header = {feedback.TOKEN_HEADER: "fb-secret"}
    bounce = (FIXTURES / "generic_bounce.json").read_bytes()
    assert (await app_client.post(path, content=bounce, headers=header)).status_code == 200
    configure(ctx, feedback_webhook_secret="", insecure_webhooks=True)
    complaint = (FIXTURES / "generic_complaint.json").read_bytes()
    assert (await app_client.post(path, content=complaint)).status_code == 200
    states = await consent(app_client, tenant, "email")
    assert states["quinn@example.com"] == states["sam@example.com"] == "revoked"


# --- SES through SNS: the SNS signature -----------------------------------------------------------


def make_cert(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def sns_signed(envelope: dict[str, Any], key: rsa.RSAPrivateKey) -> bytes:
    envelope = {**envelope, "SignatureVersion": "2"}
    string = feedback.sns_string_to_sign(envelope)
    signature = key.sign(string, padding.PKCS1v15(), hashes.SHA256())
    return json.dumps({**envelope, "Signature": base64.b64encode(signature).decode()}).encode()


async def test_ses_notifications_signed_by_sns_on_a_listed_topic(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    certificates = feedback.SnsCertificates()
    monkeypatch.setattr(feedback, "SNS_CERTIFICATES", certificates)
    envelope = feedback.sns_envelope((FIXTURES / "ses_bounce_permanent.json").read_bytes())
    certificates.remember(envelope["SigningCertURL"], make_cert(key))
    await add_contact(app_client, tenant, email="ann.lee@example.com")
    path = (await webhook_paths(app_client, tenant))["ses"]
    configure(ctx, feedback_sns_topic_arns=f"arn:aws:sns:us-east-1:1:other, {TOPIC}")

    tampered = json.loads(sns_signed(envelope, key))
    tampered["Message"] = tampered["Message"].replace("Permanent", "Transient")
    refused(await app_client.post(path, content=json.dumps(tampered)), "bad_signature")
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused(await app_client.post(path, content=sns_signed(envelope, other_key)), "bad_signature")
    # A topic that is not listed: a valid SNS signature from someone else's AWS account.
    foreign = {**envelope, "TopicArn": "arn:aws:sns:eu-west-1:999999999999:theirs"}
    refused(await app_client.post(path, content=sns_signed(foreign, key)), "bad_signature")
    # A certificate URL that is not Amazon's is never fetched.
    elsewhere = {**envelope, "SigningCertURL": "https://evil.example/cert.pem"}
    refused(await app_client.post(path, content=sns_signed(elsewhere, key)), "bad_signature")
    # Raw message delivery carries no SNS signature: without the shared secret it is refused.
    raw = (FIXTURES / "ses_raw_bounce.json").read_bytes()
    refused(await app_client.post(path, content=raw), "bad_signature")
    assert (await consent(app_client, tenant, "email"))["ann.lee@example.com"] == "granted"

    ok = await app_client.post(path, content=sns_signed(envelope, key))
    assert ok.status_code == 200, ok.text
    assert (await consent(app_client, tenant, "email"))["ann.lee@example.com"] == "revoked"


# --- Telegram -------------------------------------------------------------------------------------


def update() -> dict[str, Any]:
    return {"update_id": 1, "message": {"message_id": 1, "chat": {"id": 5}, "text": "hi"}}


async def test_telegram_refusals_name_their_reason(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    path = "/telegram/no-such-org/webhook"
    header = "X-Telegram-Bot-Api-Secret-Token"
    configure(ctx, telegram_webhook_secret="")
    refused(await app_client.post(path, json=update()), "webhook_not_configured")
    forged = await app_client.post(path, json=update(), headers={header: ""})
    refused(forged, "webhook_not_configured")
    configure(ctx, telegram_webhook_secret="tg-secret", insecure_webhooks=True)
    refused(await app_client.post(path, json=update()), "bad_signature")
    refused(await app_client.post(path, json=update(), headers={header: "tg"}), "bad_signature")
    # Past the gate (the organization does not exist): the secret was accepted.
    passed = await app_client.post(path, json=update(), headers={header: "tg-secret"})
    assert passed.status_code == 404
    configure(ctx, telegram_webhook_secret="", insecure_webhooks=True)
    assert (await app_client.post(path, json=update())).status_code == 404
