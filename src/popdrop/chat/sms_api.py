"""Inbound SMS (Twilio's webhook format): keywords first (STOP/START/HELP/YES, shared
audience handling), then the SMS chat. The URL is the organization's signed webhook URL
listed by `GET /api/v1/webhook-urls`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from popdrop.chat import sms
from popdrop.chat.conversations import ChatDeps
from popdrop.core import links
from popdrop.outbound import twilio, webhooks
from popdrop.web.params import Ctx

router = APIRouter(prefix="/api/v1", tags=["chat"])


@router.post("/sms/{token}/inbound", include_in_schema=False)
async def sms_inbound(token: str, request: Request, ctx: Ctx) -> Response:
    """Twilio inbound message: STOP/START/HELP/YES before any flow, then the SMS chat."""
    org_id = links.read_webhook(ctx.signer, token)
    message = twilio.parse_inbound(await webhooks.twilio_params(ctx.settings, request))
    # Keywords first (shared audience handling), then the chat flow: popdrop.chat.sms.
    deps = ChatDeps(ctx.signer, ctx.settings.base_url, ctx.settings.short_links_base)
    replies = await sms.reply_to(
        ctx.db, deps, org_id=org_id, sender=message.sender, body=message.body, now=ctx.clock.now()
    )
    return Response(sms.twiml(replies), media_type="application/xml")
