"""Telegram webhook (thin): `POST /telegram/{org_slug}/webhook`.

Point the bot at it with `setWebhook(url=…/telegram/<org>/webhook,
secret_token=$POPDROP_TELEGRAM_WEBHOOK_SECRET)`; Telegram then sends that secret in
`X-Telegram-Bot-Api-Secret-Token` on every update, and anything else is refused (403
`bad_signature`). With no secret configured every update is refused (403
`webhook_not_configured`) unless `POPDROP_INSECURE_WEBHOOKS` is on (development only).
The work is in `popdrop.chat.telegram`.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select

from popdrop.accounts.models import Organization
from popdrop.chat import telegram
from popdrop.chat.conversations import ChatDeps
from popdrop.core.errors import PopdropError, not_found
from popdrop.web.params import Ctx

router = APIRouter(include_in_schema=False)
SECRET_HEADER = "x-telegram-bot-api-secret-token"  # noqa: S105 (a header name)


def require_secret(configured: str, given: str | None, *, insecure: bool = False) -> None:
    """Refuse an update without the configured secret; `insecure` only lets updates in
    while no secret is configured."""
    if not configured:
        if insecure:
            return
        raise PopdropError(
            "webhook_not_configured",
            "Telegram updates are refused: set POPDROP_TELEGRAM_WEBHOOK_SECRET",
            status=403,
        )
    if given is None or not hmac.compare_digest(configured.encode(), given.encode()):
        raise PopdropError("bad_signature", "the Telegram secret token does not match", status=403)


@router.post("/telegram/{org_slug}/webhook")
async def telegram_webhook(org_slug: str, request: Request, ctx: Ctx) -> dict[str, Any]:
    """One Telegram update: a message, a `/start <payload>` deep link or a callback query."""
    settings = ctx.settings
    require_secret(
        settings.telegram_webhook_secret,
        request.headers.get(SECRET_HEADER),
        insecure=settings.insecure_webhooks,
    )
    try:
        update = json.loads(await request.body())
    except (UnicodeDecodeError, ValueError) as exc:
        raise PopdropError("invalid_request", "the update is not JSON") from exc
    if not isinstance(update, dict):
        raise PopdropError("invalid_request", "the update is not a JSON object")
    async with ctx.db.reader() as session:
        org_id = await session.scalar(select(Organization.id).where(Organization.slug == org_slug))
    if org_id is None:
        raise not_found("organization")
    bot = telegram.TelegramBot(settings.telegram_api_url, settings.telegram_bot_token)
    try:
        result = await telegram.handle_update(
            ctx.db,
            ctx.clock,
            ChatDeps(ctx.signer, settings.base_url),
            bot,
            org_id=int(org_id),
            update=update,
        )
    finally:
        await bot.close()
    return {"ok": True, "processed": result.processed}
