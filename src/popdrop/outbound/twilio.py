"""SMS through any provider speaking Twilio's Messages REST format, and its webhooks.

Outbound: `POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded
`To`, `From`, `Body`, `StatusCallback`, HTTP basic auth (AccountSid, AuthToken). Twilio
answers 201 with a Message resource (`sid`, `status`, `error_code`, `error_message`) or an
error document `{code, message, more_info, status}`.

Inbound: Twilio POSTs form bodies (an incoming message, or a status callback) signed with
`X-Twilio-Signature` = base64(HMAC-SHA1(auth_token, url + sorted name/value pairs)).
`require_signature` is the one gate for both: a wrong or missing signature is 403
`bad_signature`; with no auth token configured every webhook is 403
`webhook_not_configured` (an empty key would let anyone compute a valid signature),
unless insecure webhooks were switched on for development.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, cast, get_args
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import httpx

from popdrop.core.errors import PopdropError
from popdrop.outbound.transports import OutboundSms, SendResult

# Error codes Twilio returns with HTTP 400 that a later retry can cure: everything else
# under 400 is about this message or this recipient (21211 invalid To, 21610 the
# recipient replied STOP, 21614 not a mobile number, …) and is permanent.
TRANSIENT_ERROR_CODES = frozenset({20429, 14107, 30001})
# Statuses other than 400 that say nothing about the recipient: bad credentials or a
# wrong account URL are configuration faults and must not mark a number undeliverable.
_CONFIG_STATUSES = frozenset({401, 403, 404})

MessageStatus = Literal[
    "accepted",
    "scheduled",
    "queued",
    "sending",
    "sent",
    "delivered",
    "undelivered",
    "failed",
    "read",
    "canceled",
    "receiving",
    "received",
]
_STATUSES: frozenset[str] = frozenset(get_args(MessageStatus))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class TwilioSms:
    """SmsTransport for Twilio's Messages API (or a compatible provider / local fake)."""

    def __init__(
        self,
        base_url: str,
        account_sid: str,
        auth_token: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.account_sid = account_sid
        self.url = (
            f"{base_url.rstrip('/')}/2010-04-01/Accounts/{quote(account_sid, safe='')}"
            "/Messages.json"
        )
        self._auth = httpx.BasicAuth(account_sid, auth_token)
        # Only a client we created is ours to close; a shared one belongs to the caller.
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout)

    async def send(self, message: OutboundSms) -> SendResult:
        form = {"To": message.to, "From": message.from_number, "Body": message.body}
        if message.status_callback:
            form["StatusCallback"] = message.status_callback
        try:
            response = await self._client.post(self.url, data=form, auth=self._auth)
        except httpx.HTTPError as exc:
            # Timeouts, refused connections, broken streams: the provider may be fine.
            return SendResult(ok=False, permanent=False, error=f"{type(exc).__name__}: {exc}")
        return self._result(response)

    def _result(self, response: httpx.Response) -> SendResult:
        body = _json_object(response)
        status = response.status_code
        if 200 <= status < 300:
            sid = body.get("sid")
            if not isinstance(sid, str) or not sid:
                return SendResult(ok=False, error=f"HTTP {status} without a message sid")
            if body.get("status") in ("failed", "undelivered"):
                # Rare on create, but then the message is definitely not going out.
                return SendResult(
                    ok=False,
                    provider_id=sid,
                    permanent=True,
                    error=_error_text(body.get("error_code"), body.get("error_message")),
                )
            return SendResult(ok=True, provider_id=sid)
        code = body.get("code")
        error = _error_text(code, body.get("message") or response.reason_phrase)
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status == 429 or status >= 500 or status in _CONFIG_STATUSES or status == 408:
            return SendResult(ok=False, permanent=False, error=error, retry_after=retry_after)
        permanent = not (isinstance(code, int) and code in TRANSIENT_ERROR_CODES)
        return SendResult(ok=False, permanent=permanent, error=error, retry_after=retry_after)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return cast(dict[str, Any], body) if isinstance(body, dict) else {}


def _error_text(code: object, message: object) -> str:
    text = str(message) if message else "unknown error"
    return f"{code} {text}" if code is not None else text


# --- webhooks -------------------------------------------------------------------------


def compute_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """X-Twilio-Signature for a POST to `url` with form `params`."""
    data = url + "".join(name + params[name] for name in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _port_variants(url: str) -> list[str]:
    """The URL as given, plus with the default port added or removed: Twilio signs the
    URL exactly as configured, and proxies often add or strip `:443`."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    if default is None or parts.hostname is None:
        return [url]
    host = parts.hostname
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    if parts.port is None:
        other = parts._replace(netloc=f"{prefix}{host}:{default}")
    elif parts.port == default:
        other = parts._replace(netloc=f"{prefix}{host}")
    else:
        return [url]
    return [url, urlunsplit(other)]


def validate_signature(
    auth_token: str, url: str, params: Mapping[str, str], signature: str | None
) -> bool:
    """True when `signature` (the X-Twilio-Signature header) matches; constant-time."""
    if not signature:
        return False
    expected = signature.encode()
    return any(
        hmac.compare_digest(compute_signature(auth_token, candidate, params).encode(), expected)
        for candidate in _port_variants(url)
    )


def require_signature(
    auth_token: str,
    urls: Sequence[str],
    params: Mapping[str, str],
    signature: str | None,
    *,
    insecure: bool = False,
) -> None:
    """Refuse a webhook that does not carry a valid signature for one of `urls` (the URL as
    this request arrived and as the public base URL names it: a proxy may rewrite one).
    `insecure` only lets unsigned webhooks in while no auth token is configured; a
    configured token is always enforced."""
    if not auth_token:
        if insecure:
            return
        raise PopdropError(
            "webhook_not_configured",
            "SMS webhooks are refused: set POPDROP_SMS_AUTH_TOKEN (the provider's auth token)",
            status=403,
        )
    if not any(validate_signature(auth_token, url, params, signature) for url in urls):
        raise PopdropError("bad_signature", "the Twilio signature does not match", status=403)


def parse_form(body: bytes) -> dict[str, str]:
    """A Twilio webhook body (application/x-www-form-urlencoded) as a dict, blanks kept
    because the signature covers them too."""
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PopdropError("invalid_request", "webhook body is not a form") from exc
    return dict(pairs)


def _required(params: Mapping[str, str], name: str) -> str:
    value = params.get(name)
    if not value:
        raise PopdropError("invalid_request", f"webhook field {name} is missing")
    return value


@dataclass(frozen=True)
class InboundSms:
    """An incoming message (`From` is the customer, `To` our number)."""

    message_sid: str
    account_sid: str
    sender: str
    to: str
    body: str


@dataclass(frozen=True)
class StatusCallback:
    message_sid: str
    account_sid: str | None
    status: MessageStatus
    error_code: int | None
    to: str | None

    @property
    def delivered(self) -> bool:
        return self.status == "delivered"

    @property
    def failed(self) -> bool:
        return self.status in ("undelivered", "failed")


def parse_inbound(params: Mapping[str, str]) -> InboundSms:
    return InboundSms(
        message_sid=_required(params, "MessageSid"),
        account_sid=_required(params, "AccountSid"),
        sender=_required(params, "From"),
        to=_required(params, "To"),
        body=params.get("Body", ""),  # an MMS may come without text
    )


def parse_status_callback(params: Mapping[str, str]) -> StatusCallback:
    # Older callbacks carry SmsStatus/SmsSid; MessageStatus/MessageSid win when present.
    status = params.get("MessageStatus") or params.get("SmsStatus") or ""
    if status not in _STATUSES:
        raise PopdropError("invalid_request", f"unknown MessageStatus {status!r}")
    sid = params.get("MessageSid") or params.get("SmsSid") or ""
    if not sid:
        raise PopdropError("invalid_request", "webhook field MessageSid is missing")
    raw_code = params.get("ErrorCode") or ""
    try:
        error_code = int(raw_code) if raw_code else None
    except ValueError as exc:
        raise PopdropError("invalid_request", f"ErrorCode {raw_code!r} is not a number") from exc
    return StatusCallback(
        message_sid=sid,
        account_sid=params.get("AccountSid") or None,
        status=cast(MessageStatus, status),
        error_code=error_code,
        to=params.get("To") or None,
    )
