"""Provider webhook URLs: a signed token names the organization, Twilio's signature is
checked over the URL it was given (as it arrived, or as the base URL names it behind a
proxy)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from popdrop.core.config import Settings
from popdrop.core.errors import PopdropError
from popdrop.core.signing import Signer
from popdrop.outbound import twilio

WEBHOOK_PURPOSE = "provider-webhook"


def webhook_token(signer: Signer, org_id: int) -> str:
    return signer.sign(WEBHOOK_PURPOSE, {"o": org_id})


def webhook_org(signer: Signer, token: str) -> int:
    """The organization a provider webhook URL belongs to (its token is signed)."""
    payload: Any = signer.unsign(WEBHOOK_PURPOSE, token)
    if not isinstance(payload, dict) or not isinstance(payload.get("o"), int):
        raise PopdropError("link_invalid", "this webhook URL is not valid")
    return int(payload["o"])


async def twilio_params(settings: Settings, request: Request) -> dict[str, str]:
    params = twilio.parse_form(await request.body())
    # Twilio signs the URL it was given: as this request arrived, or as the base URL names
    # it when a proxy in front rewrote the scheme or host.
    public = settings.base_url.rstrip("/") + request.url.path
    if request.url.query:
        public += "?" + request.url.query
    twilio.require_signature(
        settings.sms_auth_token,
        [str(request.url), public],
        params,
        request.headers.get("x-twilio-signature"),
        insecure=settings.insecure_webhooks,
    )
    return params
