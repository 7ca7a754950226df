"""Telegram: a Bot API adapter over httpx, and the update handling of the chat channel.

- `TelegramBot` calls `{api_url}/bot{token}/{method}` (`sendMessage` with an
  `inline_keyboard`, `sendPhoto` for images and the QR ticket, `answerCallbackQuery`)
  and reads Telegram's `{"ok": true, "result": …}` / `{"ok": false, "description": …}`.
- `handle_update` turns one webhook update into a chat turn: a text message is text, a
  `/start <payload>` deep link is `Inbound.start(ref=payload)`, a callback query (an
  inline button) is `Inbound.button(payload)`. It runs at most once per `update_id`
  (Telegram retries a webhook it thinks failed): the claim and the turn are committed
  together (`core.idempotency.run_once`), and a repeat sends nothing.
- Button payloads longer than Telegram's 64-byte `callback_data` travel as `~` + a hash;
  the hash is resolved against the buttons this conversation was last shown (the
  transcript), so nothing has to be remembered in the process.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.chat import conversations, flow_store, turn
from popdrop.chat import inbound as chat_inbound
from popdrop.chat.engine import Inbound
from popdrop.chat.messages import (
    OUT_MESSAGES,
    TELEGRAM,
    Button,
    Buttons,
    Card,
    Carousel,
    Countdown,
    Image,
    OutMessage,
    QrTicket,
    Text,
    format_time,
)
from popdrop.chat.models import ChatMessage, Conversation
from popdrop.checkin import tickets
from popdrop.core import qr
from popdrop.core.clock import Clock
from popdrop.core.db import Database
from popdrop.core.errors import PopdropError
from popdrop.core.idempotency import fingerprint, run_once
from popdrop.core.logging import log

CHANNEL = "telegram"
MAX_CALLBACK_DATA = 64  # bytes, Telegram's limit on callback_data
MAX_TEXT = 4096
MAX_CAPTION = 1024
HASHED = "~"  # prefix of a callback_data that stands for a longer payload
_RECENT_OUT = 30  # outbound messages searched to resolve a hashed payload


class TelegramError(Exception):
    """The Bot API refused a call (`ok: false`) or could not be reached."""

    def __init__(self, method: str, description: str, error_code: int | None = None) -> None:
        super().__init__(f"{method}: {description}")
        self.method = method
        self.description = description
        self.error_code = error_code


# ---------------------------------------------------------------- callback data


def callback_data(payload: str) -> str:
    """`payload` as Telegram callback_data (≤ 64 bytes): itself when it fits, else `~` and
    a hash of it (resolved later against the buttons the conversation was shown)."""
    if len(payload.encode()) <= MAX_CALLBACK_DATA and not payload.startswith(HASHED):
        return payload
    digest = hashlib.sha256(payload.encode()).digest()
    return HASHED + base64.urlsafe_b64encode(digest[:18]).decode("ascii")


def _payloads(messages: Iterable[OutMessage]) -> Iterable[str]:
    for message in messages:
        cards = message.cards if isinstance(message, Carousel) else [message]
        for item in cards:
            for button in getattr(item, "buttons", []):
                if button.payload:
                    yield button.payload


async def resolve_callback(
    session: AsyncSession, signer: Any, org_id: int, chat_id: str, data: str
) -> str:
    """The button payload behind `data` (a hashed one is looked up in the buttons this
    chat was recently shown; unknown: `data` itself, which the flow re-asks about)."""
    if not data.startswith(HASHED):
        return data
    conversation_id = await session.scalar(
        select(Conversation.id).where(
            Conversation.org_id == org_id,
            Conversation.channel == CHANNEL,
            Conversation.address_hash == conversations.address_hash(signer, CHANNEL, chat_id),
        )
    )
    if conversation_id is None:
        return data
    bodies = await session.scalars(
        select(ChatMessage.body)
        .where(ChatMessage.conversation_id == conversation_id, ChatMessage.direction == "out")
        .order_by(ChatMessage.id.desc())
        .limit(_RECENT_OUT)
    )
    for body in bodies:
        try:
            messages = OUT_MESSAGES.validate_json(f"[{body}]")
        except ValueError:
            continue
        for payload in _payloads(messages):
            if callback_data(payload) == data:
                return payload
    return data


# ---------------------------------------------------------------- Bot API client


class TelegramBot:
    """The Bot API methods the chat channel uses."""

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.base = f"{api_url.rstrip('/')}/bot{token}"
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout)

    async def call(
        self, method: str, payload: dict[str, Any], *, files: dict[str, Any] | None = None
    ) -> Any:
        """POST one method; its `result`, or `TelegramError`."""
        try:
            if files:
                form = {k: v if isinstance(v, str) else json.dumps(v) for k, v in payload.items()}
                response = await self._client.post(f"{self.base}/{method}", data=form, files=files)
            else:
                response = await self._client.post(f"{self.base}/{method}", json=payload)
        except httpx.HTTPError as exc:
            raise TelegramError(method, f"{type(exc).__name__}: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise TelegramError(method, f"HTTP {response.status_code}", response.status_code)
        if not body.get("ok"):
            code = body.get("error_code")
            raise TelegramError(
                method,
                str(body.get("description") or f"HTTP {response.status_code}"),
                code if isinstance(code, int) else response.status_code,
            )
        return body.get("result")

    async def send_message(
        self, chat_id: str, text: str, buttons: list[Button] | None = None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"chat_id": chat_id, "text": text[:MAX_TEXT]}
        if buttons:
            payload["reply_markup"] = keyboard(buttons)
        return cast(dict[str, Any], await self.call("sendMessage", payload))

    async def send_photo(
        self,
        chat_id: str,
        photo: str | bytes,
        caption: str = "",
        buttons: list[Button] | None = None,
    ) -> dict[str, Any]:
        """A photo by URL (Telegram fetches it) or uploaded as PNG bytes."""
        payload: dict[str, Any] = {"chat_id": chat_id}
        if caption:
            payload["caption"] = caption[:MAX_CAPTION]
        if buttons:
            payload["reply_markup"] = keyboard(buttons)
        if isinstance(photo, bytes):
            files = {"photo": ("ticket.png", photo, "image/png")}
            return cast(dict[str, Any], await self.call("sendPhoto", payload, files=files))
        payload["photo"] = photo
        return cast(dict[str, Any], await self.call("sendPhoto", payload))

    async def answer_callback_query(self, callback_query_id: str, text: str = "") -> bool:
        payload: dict[str, Any] = {"callback_query_id": callback_query_id}
        if text:
            payload["text"] = text[:200]
        return bool(await self.call("answerCallbackQuery", payload))

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def keyboard(buttons: list[Button]) -> dict[str, Any]:
    """An inline keyboard, one button per row: quick replies carry callback_data, links
    open their URL."""
    rows: list[list[dict[str, str]]] = []
    for button in buttons:
        if button.payload is not None:
            rows.append([{"text": button.label, "callback_data": callback_data(button.payload)}])
        elif button.url:
            rows.append([{"text": button.label, "url": button.url}])
    return {"inline_keyboard": rows}


def qr_png(secret: str) -> bytes:
    return qr.png_bytes(secret)


# ---------------------------------------------------------------- rendering


def _card_text(card: Card) -> str:
    head = card.title
    if card.price:
        head += f" — {card.price}"
    if card.available is not None:
        head += " (sold out)" if card.available <= 0 else f" ({card.available} left)"
    return "\n".join(part for part in (head, card.text, card.url or "") if part)


async def deliver(bot: TelegramBot, chat_id: str, messages: list[OutMessage]) -> int:
    """Send degraded chat messages to a Telegram chat; the number of Bot API calls made.
    Consecutive texts are sent as one message, and buttons ride on the text before them."""
    pending: list[str] = []
    calls = 0

    async def flush(buttons: list[Button] | None = None, text: str = "") -> None:
        nonlocal calls
        body = "\n\n".join([*pending, text] if text else pending).strip()
        pending.clear()
        if body or buttons:
            await bot.send_message(chat_id, body or "…", buttons or None)
            calls += 1

    for message in messages:
        if isinstance(message, Text):
            pending.append(message.text)
        elif isinstance(message, Countdown):  # TELEGRAM degrades these; kept for safety
            pending.append(f"{message.text} {format_time(message.to, message.tz)}".strip())
        elif isinstance(message, Buttons):
            await flush(message.buttons, message.text)
        elif isinstance(message, Card):
            await flush()
            if message.image_url:
                await bot.send_photo(
                    chat_id, message.image_url, _card_text(message), message.buttons or None
                )
            else:
                await bot.send_message(chat_id, _card_text(message), message.buttons or None)
            calls += 1
        elif isinstance(message, Carousel):  # degraded to cards on Telegram
            for card in message.cards:
                calls += await deliver(bot, chat_id, [card])
        elif isinstance(message, Image):
            await flush()
            await bot.send_photo(chat_id, message.url, message.alt)
            calls += 1
        elif isinstance(message, QrTicket):
            await flush()
            code = tickets.printed_short_code(message.secret)
            line = f"Ticket code: {code}" if code else ""
            caption = "\n".join(part for part in (message.text, line, message.url) if part)
            await bot.send_photo(chat_id, qr_png(message.secret), caption)
            calls += 1
    await flush()
    return calls


# ---------------------------------------------------------------- updates


@dataclass
class ParsedUpdate:
    """What an update asks for: a chat turn (`inbound` for `chat_id`), and maybe a
    callback query to answer."""

    update_id: int
    chat_id: str | None = None
    inbound: Inbound | None = None
    callback_query_id: str | None = None


def _object(value: object) -> dict[str, Any]:
    return cast(dict[str, Any], value) if isinstance(value, dict) else {}


def parse_update(update: dict[str, Any]) -> ParsedUpdate | None:
    """A Telegram Update as a chat turn; None when it is not a valid update at all.
    Updates the chat does not use (edits, stickers, channel posts) have no `inbound`."""
    update_id = update.get("update_id")
    if not isinstance(update_id, int) or isinstance(update_id, bool):
        return None
    parsed = ParsedUpdate(update_id)
    message = _object(update.get("message"))
    query = _object(update.get("callback_query"))
    if message:
        chat_id = _object(message.get("chat")).get("id")
        text = message.get("text")
        if not isinstance(chat_id, int) or not isinstance(text, str):
            return parsed
        parsed.chat_id = str(chat_id)
        command, _, rest = text.strip().partition(" ")
        if command == "/start" or command.startswith("/start@"):
            parsed.inbound = Inbound.start(rest.strip() or None)
        else:
            parsed.inbound = Inbound.of_text(text)
    elif query:
        query_id = query.get("id")
        if isinstance(query_id, str):
            parsed.callback_query_id = query_id
        chat_id = _object(_object(query.get("message")).get("chat")).get("id")
        if not isinstance(chat_id, int):
            chat_id = _object(query.get("from")).get("id")
        data = query.get("data")
        if isinstance(chat_id, int) and isinstance(data, str) and data:
            parsed.chat_id = str(chat_id)
            parsed.inbound = Inbound.button(data)
    return parsed


@dataclass
class UpdateResult:
    processed: bool  # False: a repeated update_id, or nothing for the chat
    messages: list[OutMessage] = field(default_factory=list)
    calls: int = 0


async def handle_update(
    db: Database,
    clock: Clock,
    deps: conversations.ChatDeps,
    bot: TelegramBot,
    *,
    org_id: int,
    update: dict[str, Any],
    flow_key: str = flow_store.DEFAULT_FLOW_KEY,
) -> UpdateResult:
    """Run one update at most once (per org and update_id), then deliver the answer."""
    parsed = parse_update(update)
    if parsed is None:
        return UpdateResult(False)
    ran: list[turn.TurnResult] = []
    inbound, chat_id = parsed.inbound, parsed.chat_id

    async def operation(session: Any) -> tuple[int, dict[str, Any]]:
        if inbound is None or chat_id is None:
            return 200, {"turn": False}
        turn_inbound = inbound
        if inbound.kind == "button" and inbound.payload:
            payload = await resolve_callback(session, deps.signer, org_id, chat_id, inbound.payload)
            turn_inbound = Inbound.button(payload)
        now: datetime = clock.now()
        result = await chat_inbound.turn(
            session,
            deps,
            org_id=org_id,
            channel=CHANNEL,
            address=chat_id,
            inbound=turn_inbound,
            now=now,
            flow_key=flow_key,
            capabilities=TELEGRAM,
        )
        ran.append(result)
        # Only a count is stored with the claim: the messages may hold a voucher code.
        return 200, {"turn": True, "messages": len(result.messages)}

    try:
        await run_once(
            db,
            clock,
            org_id=org_id,
            key=f"telegram-update:{parsed.update_id}",
            principal="telegram",
            request_fingerprint=fingerprint("POST", "telegram-update", parsed.update_id),
            operation=operation,
        )
    except PopdropError as exc:
        # No flow published, an address we cannot use…: answering an error would only
        # make Telegram retry the same update. The refusal is stored with the claim.
        log.warning("telegram update refused", update_id=parsed.update_id, reason=exc.reason)
        return UpdateResult(False)
    if not ran:
        return UpdateResult(False)
    messages = ran[0].messages
    calls = 0
    # The customer sees the spinner on the button stop first, then the answer.
    if parsed.callback_query_id is not None:
        try:
            await bot.answer_callback_query(parsed.callback_query_id)
            calls += 1
        except TelegramError as exc:
            log.warning("telegram answerCallbackQuery failed", error=str(exc))
    if chat_id is not None and messages:
        try:
            calls += await deliver(bot, chat_id, messages)
        except TelegramError as exc:
            # The turn is committed; a retry of this update would not send either.
            log.warning("telegram delivery failed", error=str(exc), method=exc.method)
    return UpdateResult(True, messages, calls)
