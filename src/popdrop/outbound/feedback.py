"""Provider delivery feedback (bounces, complaints, deliveries) in one normalized form.

Formats, as the providers send them:
- ``ses``: Amazon SES notifications through SNS. The SNS envelope's ``Type`` is
  ``SubscriptionConfirmation`` (surfaced as `FeedbackBatch.subscribe_url`; the API visits
  it), ``Notification`` (``Message`` is the SES JSON as a string) or
  ``UnsubscribeConfirmation``. SNS "raw message delivery" (the SES JSON as the body) works
  too. SES JSON: ``notificationType`` (``eventType`` for configuration-set event
  publishing) Bounce / Complaint / Delivery, with ``bounce``, ``complaint``, ``delivery``
  and ``mail`` objects.
- ``sendgrid``: the Event Webhook, a JSON array of events.
- ``postmark``: one JSON record per request, told apart by ``RecordType``.
- ``generic``: ``{"email", "type": "bounce"|"complaint"|"delivered", "permanent",
  "message_id"?, "reason"?, "at"?}`` or a list of those.

Authentication (`authenticate`, before any parsing is believed): a webhook must prove
itself or it is refused with 403 — `bad_signature` when it proves nothing that is
configured, `webhook_not_configured` when nothing is configured for it (unless insecure
webhooks were switched on for development). SES through SNS proves itself by the SNS
signature (Amazon's certificate, fetched only from an SNS host and cached) on a topic
listed in `POPDROP_FEEDBACK_SNS_TOPIC_ARNS`; every provider may prove itself with the
shared secret (`verify_shared_secret`).

`parse` never lets a malformed body escape as anything but
``PopdropError("invalid_request")``. Events that do not affect deliverability (opens,
clicks, "processed", …) are skipped rather than refused, so a provider configured to send
everything does not get errors back and retry forever.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parseaddr
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from popdrop.core.errors import PopdropError

FeedbackKind = Literal["delivered", "hard_bounce", "soft_bounce", "complaint"]
PROVIDERS = ("ses", "sendgrid", "postmark", "generic")


@dataclass(frozen=True)
class FeedbackEvent:
    provider: str
    kind: FeedbackKind
    email: str  # lower-cased address
    provider_message_id: str | None  # the provider's id for the message
    message_id: str | None  # our Message-ID, when the provider echoes it
    reason: str
    at: datetime | None


@dataclass(frozen=True)
class FeedbackBatch:
    events: list[FeedbackEvent] = field(default_factory=list)
    # SNS asks the endpoint to confirm a subscription by GETting this URL.
    subscribe_url: str | None = None
    topic_arn: str | None = None


class _Malformed(Exception):
    """Internal: raised by the format parsers, turned into PopdropError by `parse_webhook`."""


# --- entry points -----------------------------------------------------------------------


def parse(provider: str, body: bytes, headers: Mapping[str, str]) -> list[FeedbackEvent]:
    """Feedback events in `body`. For SES, prefer `parse_webhook`, which also surfaces an
    SNS SubscriptionConfirmation (it yields no events here)."""
    return parse_webhook(provider, body, headers).events


def parse_webhook(provider: str, body: bytes, headers: Mapping[str, str]) -> FeedbackBatch:
    parser = _PARSERS.get(provider)
    if parser is None:
        raise PopdropError("invalid_request", f"unknown feedback provider {provider!r}")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PopdropError("invalid_request", f"{provider} feedback is not JSON") from exc
    try:
        return parser(document, _lower_keys(headers))
    except (_Malformed, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PopdropError(
            "invalid_request", f"malformed {provider} feedback: {exc or type(exc).__name__}"
        ) from exc


def sns_envelope(body: bytes) -> dict[str, Any]:
    """The SNS envelope of an SES webhook body (for signature verification)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PopdropError("invalid_request", "SNS message is not JSON") from exc
    if not isinstance(document, dict) or not isinstance(document.get("Type"), str):
        raise PopdropError("invalid_request", "not an SNS message")
    return document


# --- helpers ------------------------------------------------------------------------------


def _lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _obj(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(f"{what} must be an object")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Malformed(f"{what} must be a non-empty string")
    return value


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _address(value: object, what: str) -> str:
    raw = _str(value, what).strip()
    # Some providers send "Name <addr>"; keep only the address.
    if "<" in raw:
        raw = parseaddr(raw)[1] or raw
    return raw.lower()


def _iso(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        # Python 3.11 reads "Z" and 7-digit fractions (Postmark's .NET timestamps).
        when = datetime.fromisoformat(value)
    except ValueError as exc:
        raise _Malformed(f"bad timestamp {value!r}") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _unix(value: object) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return datetime.fromtimestamp(value, UTC)


# --- Amazon SES via SNS ---------------------------------------------------------------------


def _parse_ses(document: Any, headers: Mapping[str, str]) -> FeedbackBatch:
    document = _obj(document, "SNS message")
    sns_type = document.get("Type") or headers.get("x-amz-sns-message-type")
    if sns_type is None and ("notificationType" in document or "eventType" in document):
        return FeedbackBatch(_ses_events(document))  # raw message delivery
    if sns_type == "SubscriptionConfirmation":
        return FeedbackBatch(
            subscribe_url=_str(document.get("SubscribeURL"), "SubscribeURL"),
            topic_arn=_opt_str(document.get("TopicArn")),
        )
    if sns_type == "UnsubscribeConfirmation":
        return FeedbackBatch(topic_arn=_opt_str(document.get("TopicArn")))
    if sns_type != "Notification":
        raise _Malformed(f"unknown SNS Type {sns_type!r}")
    try:
        inner = json.loads(_str(document.get("Message"), "Message"))
    except ValueError as exc:
        raise _Malformed("SNS Message is not SES JSON") from exc
    return FeedbackBatch(
        _ses_events(_obj(inner, "SES notification")), topic_arn=_opt_str(document.get("TopicArn"))
    )


def _ses_message_id(mail: Mapping[str, Any]) -> str | None:
    common = mail.get("commonHeaders")
    if isinstance(common, dict) and isinstance(common.get("messageId"), str):
        return str(common["messageId"])
    for header in mail.get("headers") or []:
        if isinstance(header, dict) and str(header.get("name", "")).lower() == "message-id":
            return _opt_str(header.get("value"))
    return None


def _ses_events(note: dict[str, Any]) -> list[FeedbackEvent]:
    kind = note.get("notificationType") or note.get("eventType")
    mail = _obj(note.get("mail"), "mail")
    provider_id = _opt_str(mail.get("messageId"))
    message_id = _ses_message_id(mail)

    def event(kind: FeedbackKind, email: object, reason: str, at: object) -> FeedbackEvent:
        return FeedbackEvent(
            provider="ses",
            kind=kind,
            email=_address(email, "recipient"),
            provider_message_id=provider_id,
            message_id=message_id,
            reason=reason,
            at=_iso(at),
        )

    if kind == "Bounce":
        bounce = _obj(note.get("bounce"), "bounce")
        bounce_type = bounce.get("bounceType")
        # Only "Permanent" suppresses; "Transient" and "Undetermined" may cure themselves.
        bounce_kind: FeedbackKind = "hard_bounce" if bounce_type == "Permanent" else "soft_bounce"
        summary = f"{bounce_type}/{bounce.get('bounceSubType')}"
        return [
            event(
                bounce_kind,
                _obj(r, "bouncedRecipients[]").get("emailAddress"),
                _opt_str(r.get("diagnosticCode")) or summary,
                bounce.get("timestamp"),
            )
            for r in _list(bounce.get("bouncedRecipients"), "bouncedRecipients")
        ]
    if kind == "Complaint":
        complaint = _obj(note.get("complaint"), "complaint")
        reason = _opt_str(complaint.get("complaintFeedbackType")) or "complaint"
        return [
            event(
                "complaint",
                _obj(r, "complainedRecipients[]").get("emailAddress"),
                reason,
                complaint.get("timestamp"),
            )
            for r in _list(complaint.get("complainedRecipients"), "complainedRecipients")
        ]
    if kind == "Delivery":
        delivery = _obj(note.get("delivery"), "delivery")
        reason = _opt_str(delivery.get("smtpResponse")) or "delivered"
        return [
            event("delivered", r, reason, delivery.get("timestamp"))
            for r in _list(delivery.get("recipients"), "recipients")
        ]
    if isinstance(kind, str):
        return []  # Send, Open, Click, DeliveryDelay, …: not deliverability verdicts
    raise _Malformed("notificationType is missing")


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Malformed(f"{what} must be a list")
    return value


def sns_cert_url_trusted(url: str) -> bool:
    """Whether a SigningCertURL may be fetched: HTTPS from an SNS endpoint, a .pem file.
    Anything else would let a forger point us at their own certificate."""
    parts = urlsplit(url)
    return (
        parts.scheme == "https"
        and parts.port in (None, 443)
        and re.fullmatch(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?", parts.hostname or "")
        is not None
        and parts.path.endswith(".pem")
    )


_SNS_SIGNED_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
}
_SNS_SIGNED_FIELDS["UnsubscribeConfirmation"] = _SNS_SIGNED_FIELDS["SubscriptionConfirmation"]


def sns_string_to_sign(envelope: Mapping[str, Any]) -> bytes:
    """SNS's canonical string: "Name\\nvalue\\n" for each signed field, in this fixed
    order; Subject only when present."""
    names = _SNS_SIGNED_FIELDS.get(str(envelope.get("Type")))
    if names is None:
        raise ValueError(f"unknown SNS Type {envelope.get('Type')!r}")
    parts: list[str] = []
    for name in names:
        value = envelope.get(name)
        if value is None:
            if name == "Subject":
                continue
            raise ValueError(f"SNS field {name} is missing")
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode("utf-8")


def verify_sns_signature(
    envelope: Mapping[str, Any], cert_pem: bytes, *, now: datetime | None = None
) -> bool:
    """Check an SNS message's RSA signature against the PEM certificate from its
    SigningCertURL (the caller fetches and caches it after `sns_cert_url_trusted`).
    SignatureVersion 1 is SHA1withRSA, 2 is SHA256withRSA."""
    algorithm: hashes.HashAlgorithm
    version = str(envelope.get("SignatureVersion", "1"))
    if version == "1":
        algorithm = hashes.SHA1()  # noqa: S303 - mandated by SNS SignatureVersion 1
    elif version == "2":
        algorithm = hashes.SHA256()
    else:
        return False
    try:
        signature = base64.b64decode(str(envelope.get("Signature", "")), validate=True)
        message = sns_string_to_sign(envelope)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, binascii.Error):
        return False
    moment = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        return False
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return False
    try:
        key.verify(signature, message, padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        return False
    return True


# --- SendGrid event webhook ------------------------------------------------------------------

# `dropped` reasons that say something about the address (others are about our request).
_SENDGRID_DROPPED: dict[str, FeedbackKind] = {
    "bounced address": "hard_bounce",
    "invalid": "hard_bounce",
    "spam reporting address": "complaint",
}


def _parse_sendgrid(document: Any, headers: Mapping[str, str]) -> FeedbackBatch:
    events: list[FeedbackEvent] = []
    for raw in _list(document, "SendGrid events"):
        item = _obj(raw, "event")
        name = _str(item.get("event"), "event")
        reason = _opt_str(item.get("reason")) or _opt_str(item.get("response")) or name
        kind: FeedbackKind | None
        if name == "delivered":
            kind = "delivered"
        elif name == "bounce":
            # type "blocked" is a refusal of the sender (reputation, content), not of the
            # address, so it must not suppress the recipient.
            kind = "soft_bounce" if item.get("type") == "blocked" else "hard_bounce"
        elif name == "deferred":
            kind = "soft_bounce"
        elif name == "spamreport":
            kind = "complaint"
        elif name == "dropped":
            kind = _SENDGRID_DROPPED.get(str(item.get("reason", "")).lower())
        else:
            kind = None  # processed, open, click, unsubscribe, …
        if kind is None:
            continue
        status = _opt_str(item.get("status"))
        events.append(
            FeedbackEvent(
                provider="sendgrid",
                kind=kind,
                email=_address(item.get("email"), "email"),
                provider_message_id=_opt_str(item.get("sg_message_id")),
                # "smtp-id" is the Message-ID header of the message SendGrid relayed.
                message_id=_opt_str(item.get("smtp-id")),
                reason=f"{status} {reason}" if status and status not in reason else reason,
                at=_unix(item.get("timestamp")),
            )
        )
    return FeedbackBatch(events)


# --- Postmark --------------------------------------------------------------------------------

_POSTMARK_HARD = frozenset({"HardBounce", "BadEmailAddress", "ManuallyDeactivated"})
_POSTMARK_SUPPRESSION: dict[str, FeedbackKind] = {
    "HardBounce": "hard_bounce",
    "SpamComplaint": "complaint",
}
_POSTMARK_COMPLAINT = frozenset({"SpamComplaint", "SpamNotification"})
# Bounce "types" that are not delivery failures at all (auto-replies, list requests, …).
_POSTMARK_IGNORED = frozenset(
    {
        "AutoResponder",
        "AddressChange",
        "Subscribe",
        "Unsubscribe",
        "OpenRelayTest",
        "VirusNotification",
        "ChallengeVerification",
        "InboundError",
        "TemplateRenderingFailed",
        "SMTPApiError",
    }
)


def _parse_postmark(document: Any, headers: Mapping[str, str]) -> FeedbackBatch:
    record = _obj(document, "Postmark record")
    record_type = record.get("RecordType")
    provider_id = _opt_str(record.get("MessageID"))
    metadata = record.get("Metadata")
    # Postmark does not echo our Message-ID; the pipeline may pass it as metadata.
    message_id = _opt_str(metadata.get("message_id")) if isinstance(metadata, dict) else None

    def event(kind: FeedbackKind, email: object, reason: str, at: object) -> FeedbackBatch:
        return FeedbackBatch(
            [
                FeedbackEvent(
                    provider="postmark",
                    kind=kind,
                    email=_address(email, "Email"),
                    provider_message_id=provider_id,
                    message_id=message_id,
                    reason=reason,
                    at=_iso(at),
                )
            ]
        )

    if record_type == "Delivery":
        return event(
            "delivered",
            record.get("Recipient"),
            _opt_str(record.get("Details")) or "delivered",
            record.get("DeliveredAt"),
        )
    if record_type in ("Bounce", "SpamComplaint"):
        bounce_type = _str(record.get("Type"), "Type")
        if bounce_type in _POSTMARK_IGNORED:
            return FeedbackBatch()
        kind: FeedbackKind
        if record_type == "SpamComplaint" or bounce_type in _POSTMARK_COMPLAINT:
            kind = "complaint"
        elif bounce_type in _POSTMARK_HARD:
            kind = "hard_bounce"
        else:
            kind = "soft_bounce"  # SoftBounce, Transient, DnsError, Blocked, Unknown, …
        reason = " — ".join(
            text
            for text in (_opt_str(record.get("Description")), _opt_str(record.get("Details")))
            if text
        )
        return event(kind, record.get("Email"), reason or bounce_type, record.get("BouncedAt"))
    if record_type == "SubscriptionChange":
        # Broadcast streams report complaints and hard bounces only this way.
        if record.get("SuppressSending") is not True:
            return FeedbackBatch()
        why = record.get("SuppressionReason")
        change = _POSTMARK_SUPPRESSION.get(str(why))
        if change is None:
            return FeedbackBatch()  # ManualSuppression: the customer's own choice
        return event(change, record.get("Recipient"), str(why), record.get("ChangedAt"))
    if isinstance(record_type, str):
        return FeedbackBatch()  # Open, Click, …
    raise _Malformed("RecordType is missing")


# --- generic ---------------------------------------------------------------------------------


def _parse_generic(document: Any, headers: Mapping[str, str]) -> FeedbackBatch:
    items: Sequence[Any] = document if isinstance(document, list) else [document]
    events: list[FeedbackEvent] = []
    for raw in items:
        item = _obj(raw, "event")
        kind_name = item.get("type")
        permanent = item.get("permanent", False)
        if not isinstance(permanent, bool):
            raise _Malformed("permanent must be true or false")
        kind: FeedbackKind
        if kind_name == "bounce":
            # Without an explicit "permanent": true we do not suppress anybody.
            kind = "hard_bounce" if permanent else "soft_bounce"
        elif kind_name == "complaint":
            kind = "complaint"
        elif kind_name == "delivered":
            kind = "delivered"
        else:
            raise _Malformed(f"type must be bounce, complaint or delivered, not {kind_name!r}")
        at = item.get("at")
        events.append(
            FeedbackEvent(
                provider="generic",
                kind=kind,
                email=_address(item.get("email"), "email"),
                provider_message_id=_opt_str(item.get("provider_message_id")),
                message_id=_opt_str(item.get("message_id")),
                reason=_opt_str(item.get("reason")) or kind_name,
                at=_iso(at) if isinstance(at, str) else _unix(at),
            )
        )
    return FeedbackBatch(events)


_PARSERS: dict[str, Callable[[Any, Mapping[str, str]], FeedbackBatch]] = {
    "ses": _parse_ses,
    "sendgrid": _parse_sendgrid,
    "postmark": _parse_postmark,
    "generic": _parse_generic,
}


# --- shared-secret check ----------------------------------------------------------------------

TOKEN_HEADER = "x-popdrop-webhook-token"  # noqa: S105 - a header name, not a secret


def verify_shared_secret(
    secret: str | None, *, query_token: str | None, headers: Mapping[str, str]
) -> bool:
    """Whether a generic/SendGrid/Postmark webhook carries the configured secret: as
    ``?token=``, an ``X-Popdrop-Webhook-Token`` header, or the password of HTTP basic auth
    (Postmark's recommended way: ``https://user:secret@host/…``). Constant-time. An unset
    secret never matches: the caller decides whether checking is switched on."""
    if not secret:
        return False
    expected = secret.encode()
    lowered = _lower_keys(headers)
    candidates = [query_token, lowered.get(TOKEN_HEADER)]
    auth = lowered.get("authorization", "")
    if auth[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(auth[6:], validate=True).decode()
            candidates.append(decoded.partition(":")[2])
        except (binascii.Error, UnicodeDecodeError):
            pass
    # Compare every candidate (no early exit) so timing reveals nothing about which matched.
    matched = False
    for candidate in candidates:
        if candidate is not None:
            matched |= hmac.compare_digest(candidate.encode(), expected)
    return matched


# --- authentication ----------------------------------------------------------------------


class SnsCertificates:
    """SNS signing certificates by URL: fetched once (only from a trusted SNS URL) and kept,
    at most `limit` of them, so a stream of notifications costs no extra request."""

    def __init__(self, *, limit: int = 16, timeout: float = 5.0) -> None:
        self.limit = limit
        self.timeout = timeout
        self._pem: dict[str, bytes] = {}

    def remember(self, url: str, pem: bytes) -> None:
        if url not in self._pem and len(self._pem) >= self.limit:
            self._pem.pop(next(iter(self._pem)))  # oldest first
        self._pem[url] = pem

    async def get(self, url: str) -> bytes:
        known = self._pem.get(url)
        if known is not None:
            return known
        if not sns_cert_url_trusted(url):
            raise PopdropError(
                "bad_signature", "the SNS signing certificate URL is not Amazon's", status=403
            )
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.get(url)
                response.raise_for_status()
        except httpx.HTTPError as exc:
            # Not the sender's fault: SNS retries a 503, and by then AWS may answer.
            raise PopdropError(
                "unavailable", f"the SNS signing certificate could not be fetched: {exc}"
            ) from exc
        self.remember(url, response.content)
        return response.content


SNS_CERTIFICATES = SnsCertificates()


@dataclass(frozen=True)
class WebhookSecrets:
    """What a feedback webhook can prove itself with (from the settings)."""

    shared_secret: str = ""
    sns_topic_arns: frozenset[str] = frozenset()
    insecure: bool = False

    @classmethod
    def parse(cls, shared_secret: str, topic_arns: str, *, insecure: bool) -> WebhookSecrets:
        arns = frozenset(a.strip() for a in topic_arns.split(",") if a.strip())
        return cls(shared_secret, arns, insecure)


async def authenticate(
    provider: str,
    body: bytes,
    headers: Mapping[str, str],
    secrets: WebhookSecrets,
    *,
    query_token: str | None = None,
    certificates: SnsCertificates | None = None,
) -> None:
    """Refuse (403) a feedback webhook that proves none of the configured ways."""
    sns = provider == "ses" and bool(secrets.sns_topic_arns)
    if not secrets.shared_secret and not sns:
        if secrets.insecure:
            return
        raise PopdropError(
            "webhook_not_configured",
            f"{provider} feedback is refused: set POPDROP_FEEDBACK_WEBHOOK_SECRET"
            + (" or POPDROP_FEEDBACK_SNS_TOPIC_ARNS" if provider == "ses" else ""),
            status=403,
        )
    if verify_shared_secret(secrets.shared_secret, query_token=query_token, headers=headers):
        return
    cache = certificates or SNS_CERTIFICATES  # looked up now: tests swap the module's cache
    if sns and await _sns_signed(body, secrets.sns_topic_arns, cache):
        return
    raise PopdropError(
        "bad_signature", f"the {provider} feedback webhook did not prove its origin", status=403
    )


async def _sns_signed(
    body: bytes, topic_arns: frozenset[str], certificates: SnsCertificates
) -> bool:
    try:
        envelope = sns_envelope(body)
    except PopdropError:
        return False  # raw message delivery carries no signature: only the secret proves it
    cert_url = envelope.get("SigningCertURL")
    if envelope.get("TopicArn") not in topic_arns or not isinstance(cert_url, str):
        return False
    return verify_sns_signature(envelope, await certificates.get(cert_url))
