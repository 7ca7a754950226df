"""Provider webhook requests: Twilio's signature is checked over the URL it was given (as it
arrived, or as the base URL names it behind a proxy). The URLs and their signed token
(naming the organization) are made and read in `core.links`."""

from __future__ import annotations

from starlette.requests import Request

from popdrop.core import links
from popdrop.core.config import Settings
from popdrop.outbound import twilio


async def twilio_params(settings: Settings, request: Request) -> dict[str, str]:
    params = twilio.parse_form(await request.body())
    # Twilio signs the URL it was given: as this request arrived, or as the base URL names
    # it when a proxy in front rewrote the scheme or host.
    public = links.absolute(settings.base_url, request.url.path)
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
