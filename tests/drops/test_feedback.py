"""Every provider fixture parses to the right normalized events."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from popdrop.core.errors import PopdropError
from popdrop.outbound.feedback import (
    FeedbackEvent,
    parse,
    parse_webhook,
    sns_cert_url_trusted,
    sns_envelope,
    sns_string_to_sign,
    verify_shared_secret,
    verify_sns_signature,
)

FIXTURES = Path(__file__).parent / "fixtures"


def body(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def summary(events: list[FeedbackEvent]) -> list[tuple[str, str]]:
    return [(e.kind, e.email) for e in events]


# --- Amazon SES via SNS --------------------------------------------------------------------------


def test_ses_permanent_bounce() -> None:
    events = parse("ses", body("ses_bounce_permanent.json"), {"x-amz-sns-message-type": "x"})
    assert summary(events) == [
        ("hard_bounce", "ann.lee@example.com"),
        ("hard_bounce", "bob@example.net"),
    ]
    first = events[0]
    assert first.provider == "ses"
    assert first.message_id == "<drop-7.contact-42@shop.example>"
    assert first.provider_message_id == (
        "0102018f7a1b2c3d-4e5f6a7b-8c9d-4e0f-a1b2-c3d4e5f6a7b8-000000"
    )
    assert "550 5.1.1" in first.reason
    assert first.at == datetime(2026, 5, 14, 9, 0, 2, 873000, tzinfo=UTC)


def test_ses_transient_bounce_complaint_and_delivery() -> None:
    soft = parse("ses", body("ses_bounce_transient.json"), {})
    assert summary(soft) == [("soft_bounce", "carol@example.org")]
    assert "Mailbox full" in soft[0].reason
    complaint = parse("ses", body("ses_complaint.json"), {})
    assert summary(complaint) == [("complaint", "dave@example.com")]
    assert complaint[0].reason == "abuse"
    delivered = parse("ses", body("ses_delivery.json"), {})
    assert summary(delivered) == [("delivered", "erin@example.com")]
    assert delivered[0].reason.startswith("250")


def test_ses_raw_message_delivery_and_header_fallback() -> None:
    assert summary(parse("ses", body("ses_raw_bounce.json"), {}))[0] == (
        "hard_bounce",
        "ann.lee@example.com",
    )
    note = json.loads(body("ses_raw_bounce.json"))
    del note["mail"]["commonHeaders"]  # Message-ID then comes from the headers list
    [event, _] = parse("ses", json.dumps(note).encode(), {})
    assert event.message_id == "<drop-7.contact-42@shop.example>"


def test_ses_subscription_confirmation_is_surfaced_not_fetched() -> None:
    batch = parse_webhook("ses", body("ses_subscription_confirmation.json"), {})
    assert batch.events == []
    assert batch.subscribe_url is not None
    assert batch.subscribe_url.startswith(
        "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription&"
    )
    assert batch.topic_arn == "arn:aws:sns:eu-west-1:123456789012:popdrop-ses-feedback"


def test_ses_other_event_types_are_skipped() -> None:
    note = {"eventType": "Open", "mail": {"messageId": "x"}, "open": {}}
    assert parse("ses", json.dumps(note).encode(), {}) == []


# --- SendGrid ------------------------------------------------------------------------------------


def test_sendgrid_event_batch() -> None:
    events = parse("sendgrid", body("sendgrid_events.json"), {})
    assert summary(events) == [
        ("delivered", "frank@example.com"),
        ("soft_bounce", "grace@example.org"),  # deferred
        ("hard_bounce", "heidi@example.net"),  # bounce/bounce
        ("soft_bounce", "ivan@example.com"),  # bounce/blocked: the sender's problem
        ("hard_bounce", "judy@example.com"),  # dropped: Bounced Address
        ("complaint", "ken@example.com"),  # spamreport
    ]  # processed, open and "dropped: Unsubscribed Address" are not feedback
    delivered, _, bounced, *_ = events
    assert delivered.message_id == "<drop-7.contact-50@shop.example>"
    assert delivered.provider_message_id == "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0"
    assert delivered.at == datetime.fromtimestamp(1778749203, UTC)
    assert "does not exist" in bounced.reason and "5.1.1" in bounced.reason


# --- Postmark ------------------------------------------------------------------------------------


def test_postmark_records() -> None:
    [hard] = parse("postmark", body("postmark_bounce_hard.json"), {})
    assert (hard.kind, hard.email) == ("hard_bounce", "liam@example.com")
    assert hard.provider_message_id == "883953f4-6105-42a2-a16a-77a8eac79483"
    assert hard.message_id == "<drop-7.contact-60@shop.example>"  # from Metadata
    assert "550 5.1.1" in hard.reason
    assert hard.at is not None and hard.at.utcoffset() == timedelta(hours=-4)

    assert summary(parse("postmark", body("postmark_bounce_soft.json"), {})) == [
        ("soft_bounce", "mia@example.com")
    ]
    assert summary(parse("postmark", body("postmark_spam_complaint.json"), {})) == [
        ("complaint", "noah@example.com")
    ]
    [delivered] = parse("postmark", body("postmark_delivery.json"), {})
    assert (delivered.kind, delivered.email) == ("delivered", "olivia@example.com")
    assert summary(parse("postmark", body("postmark_subscription_change.json"), {})) == [
        ("complaint", "pat@example.com")
    ]


def test_postmark_non_failures_are_skipped() -> None:
    record = json.loads(body("postmark_bounce_hard.json"))
    record["Type"] = "AutoResponder"
    assert parse("postmark", json.dumps(record).encode(), {}) == []
    assert parse("postmark", b'{"RecordType": "Open", "Recipient": "a@b.c"}', {}) == []


# --- generic -------------------------------------------------------------------------------------


def test_generic_format() -> None:
    [hard] = parse("generic", body("generic_bounce.json"), {})
    assert (hard.kind, hard.email, hard.message_id) == (
        "hard_bounce",
        "quinn@example.com",
        "<drop-7.contact-70@shop.example>",
    )
    assert hard.at == datetime(2026, 5, 14, 9, 10, tzinfo=UTC)
    assert summary(parse("generic", body("generic_soft_bounce.json"), {})) == [
        ("soft_bounce", "rita@example.com")
    ]
    assert summary(parse("generic", body("generic_complaint.json"), {})) == [
        ("complaint", "sam@example.com")
    ]
    [delivered] = parse("generic", body("generic_delivered.json"), {})
    assert delivered.kind == "delivered" and delivered.at == datetime.fromtimestamp(1778749201, UTC)


# --- malformed bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "raw"),
    [
        ("ses", b"not json"),
        ("ses", b"[]"),
        ("ses", b'{"Type": "Notification", "Message": "{not json"}'),
        ("ses", b'{"Type": "Notification", "Message": "{\\"notificationType\\": \\"Bounce\\"}"}'),
        ("ses", b'{"Type": "SubscriptionConfirmation"}'),
        ("ses", b'{"Type": "Surprise"}'),
        ("sendgrid", b'{"event": "bounce"}'),
        ("sendgrid", b'[{"event": "bounce", "email": 42}]'),
        ("postmark", b'{"RecordType": "Bounce", "Type": "HardBounce"}'),
        ("postmark", b'{"Email": "a@b.c"}'),
        (
            "postmark",
            b'{"RecordType": "Bounce", "Type": "HardBounce", "Email": "a@b.c", '
            b'"BouncedAt": "yesterday"}',
        ),
        ("generic", b'{"email": "a@b.c", "type": "exploded"}'),
        ("generic", b'{"email": "a@b.c", "type": "bounce", "permanent": "yes"}'),
        ("generic", b'{"type": "complaint"}'),
        ("generic", b"\xff\xfe"),
        ("mailgun", b"{}"),
    ],
)
def test_malformed_bodies_are_invalid_requests(provider: str, raw: bytes) -> None:
    with pytest.raises(PopdropError) as caught:
        parse(provider, raw, {})
    assert caught.value.reason == "invalid_request"
    assert caught.value.status == 422


# --- SNS signatures ------------------------------------------------------------------------------


def make_cert(key: rsa.RSAPrivateKey, *, valid_from: datetime, valid_days: int = 365) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_from + timedelta(days=valid_days))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def signed(envelope: dict[str, Any], key: rsa.RSAPrivateKey, version: str) -> dict[str, Any]:
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    envelope = {**envelope, "SignatureVersion": version}
    signature = key.sign(sns_string_to_sign(envelope), padding.PKCS1v15(), algorithm)
    return {**envelope, "Signature": base64.b64encode(signature).decode()}


@pytest.mark.parametrize(
    "fixture", ["ses_bounce_permanent.json", "ses_subscription_confirmation.json"]
)
@pytest.mark.parametrize("version", ["1", "2"])
def test_sns_signature_with_a_self_made_certificate(
    signing_key: rsa.RSAPrivateKey, fixture: str, version: str
) -> None:
    now = datetime.now(UTC)
    pem = make_cert(signing_key, valid_from=now - timedelta(days=1))
    envelope = signed(sns_envelope(body(fixture)), signing_key, version)
    assert verify_sns_signature(envelope, pem)

    tampered = {**envelope, "Message": envelope["Message"].replace("Permanent", "Transient")}
    if fixture.startswith("ses_subscription"):
        tampered = {**envelope, "SubscribeURL": "https://evil.example/confirm"}
    assert not verify_sns_signature(tampered, pem)

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert not verify_sns_signature(envelope, make_cert(other, valid_from=now - timedelta(days=1)))
    expired = make_cert(signing_key, valid_from=now - timedelta(days=30), valid_days=10)
    assert not verify_sns_signature(envelope, expired)
    assert not verify_sns_signature({**envelope, "SignatureVersion": "3"}, pem)
    assert not verify_sns_signature({**envelope, "Signature": "!!not base64"}, pem)
    assert not verify_sns_signature(envelope, b"-----BEGIN CERTIFICATE-----\nnope\n")


def test_sns_signature_refuses_non_rsa_keys() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.now(UTC)
    pem = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    envelope = {**sns_envelope(body("ses_bounce_permanent.json")), "Signature": "AAAA"}
    assert not verify_sns_signature(envelope, pem)


def test_sns_string_to_sign_follows_the_documented_order() -> None:
    envelope = {
        "Type": "Notification",
        "MessageId": "m1",
        "TopicArn": "arn:t",
        "Subject": "s",
        "Message": "hello",
        "Timestamp": "2026-01-01T00:00:00Z",
        "UnsubscribeURL": "https://ignored",
    }
    assert sns_string_to_sign(envelope) == (
        b"Message\nhello\nMessageId\nm1\nSubject\ns\nTimestamp\n2026-01-01T00:00:00Z\n"
        b"TopicArn\narn:t\nType\nNotification\n"
    )
    del envelope["Subject"]
    assert b"Subject" not in sns_string_to_sign(envelope)


@pytest.mark.parametrize(
    ("url", "trusted"),
    [
        ("https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-abc.pem", True),
        ("https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem", True),
        ("http://sns.eu-west-1.amazonaws.com/SimpleNotificationService-abc.pem", False),
        ("https://sns.eu-west-1.amazonaws.com.evil.example/x.pem", False),
        ("https://evil.example/sns.eu-west-1.amazonaws.com/x.pem", False),
        ("https://sns.eu-west-1.amazonaws.com/x.txt", False),
    ],
)
def test_sns_cert_url_trust(url: str, trusted: bool) -> None:
    assert sns_cert_url_trusted(url) is trusted


# --- shared secret -------------------------------------------------------------------------------


def test_shared_secret_check() -> None:
    secret = "s3cret-token"
    assert verify_shared_secret(secret, query_token=secret, headers={})
    assert verify_shared_secret(
        secret, query_token=None, headers={"X-Popdrop-Webhook-Token": secret}
    )
    basic = "Basic " + base64.b64encode(f"postmark:{secret}".encode()).decode()
    assert verify_shared_secret(secret, query_token=None, headers={"Authorization": basic})
    assert not verify_shared_secret(secret, query_token="s3cret-tokeN", headers={})
    assert not verify_shared_secret(secret, query_token=None, headers={})
    assert not verify_shared_secret(
        secret, query_token=None, headers={"Authorization": "Basic ###"}
    )
    assert not verify_shared_secret("", query_token="", headers={})
    assert not verify_shared_secret(None, query_token="x", headers={})
