"""Telegram round trips against a local fake Bot API (a real HTTP server speaking the Bot
API's JSON): webhook secret, /start deep links, inline keyboards, callback queries, the QR
ticket as a photo, and update_id idempotency (SQLite, and PostgreSQL when set)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from popdrop.chat import flow_store, telegram
from popdrop.chat.messages import Button, Buttons
from popdrop.chat.models import ChatMessage, Conversation
from popdrop.web.context import AppContext
from tests.conftest import Tenant
from tests.events.helpers import make_shop

BOT_TOKEN = "123456:TEST-token_for-the-fake"
SECRET = "webhook-secret_42"
CHAT_ID = 424242


@dataclass
class FakeBotApi:
    """What the fake Bot API received: (method, parameters) in order."""

    url: str = ""
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    message_ids: int = 0

    def methods(self) -> list[str]:
        return [method for method, _ in self.calls]


@pytest.fixture
async def bot_api() -> AsyncIterator[FakeBotApi]:
    fake = FakeBotApi()

    async def method(request: Request) -> JSONResponse:
        if request.path_params["token"] != BOT_TOKEN:
            return JSONResponse(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status_code=401
            )
        name = request.path_params["method"]
        params: dict[str, Any]
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            params = {}
            for key, value in (await request.form()).multi_items():
                if isinstance(value, UploadFile):
                    params[key] = {"filename": value.filename, "content": await value.read()}
                else:
                    params[key] = value
            if "reply_markup" in params:
                params["reply_markup"] = json.loads(params["reply_markup"])
        else:
            params = await request.json()
        fake.calls.append((name, params))
        if name == "answerCallbackQuery":
            return JSONResponse({"ok": True, "result": True})
        if name not in ("sendMessage", "sendPhoto"):
            return JSONResponse(
                {"ok": False, "error_code": 404, "description": "Not Found"}, status_code=404
            )
        fake.message_ids += 1
        result: dict[str, Any] = {
            "message_id": fake.message_ids,
            "date": int(datetime.now(UTC).timestamp()),
            "chat": {"id": int(params["chat_id"]), "type": "private"},
        }
        if name == "sendMessage":
            result["text"] = params["text"]
        else:
            result["photo"] = [{"file_id": "AgAD", "file_unique_id": "u", "width": 1, "height": 1}]
        return JSONResponse({"ok": True, "result": result})

    app = Starlette(routes=[Route("/bot{token}/{method}", method, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.01)
        fake.url = f"http://127.0.0.1:{port}"
        yield fake
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def hook(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, bot_api: FakeBotApi
) -> str:
    """Telegram configured against the fake, and the default flow published."""
    ctx.settings = ctx.settings.model_copy(
        update={
            "telegram_api_url": bot_api.url,
            "telegram_bot_token": BOT_TOKEN,
            "telegram_webhook_secret": SECRET,
        }
    )
    shop = await make_shop(app_client, tenant, ctx.clock.now())
    async with ctx.db.transaction() as session:
        await flow_store.publish_default_flow(
            session, tenant.org_id, shop.event_id, now=ctx.clock.now()
        )
    return f"/telegram/{tenant.slug}/webhook"


_updates = iter(range(10_000, 1_000_000))


def message_update(text: str, update_id: int | None = None) -> dict[str, Any]:
    user = {"id": CHAT_ID, "is_bot": False, "first_name": "Ana", "language_code": "en"}
    return {
        "update_id": update_id if update_id is not None else next(_updates),
        "message": {
            "message_id": 1,
            "from": user,
            "chat": {"id": CHAT_ID, "first_name": "Ana", "type": "private"},
            "date": 1_780_000_000,
            "text": text,
            **(
                {"entities": [{"offset": 0, "length": 6, "type": "bot_command"}]}
                if text[:1] == "/"
                else {}
            ),
        },
    }


def callback_update(data: str, update_id: int | None = None) -> dict[str, Any]:
    user = {"id": CHAT_ID, "is_bot": False, "first_name": "Ana"}
    return {
        "update_id": update_id if update_id is not None else next(_updates),
        "callback_query": {
            "id": f"cbq-{data[:8]}",
            "from": user,
            "message": {
                "message_id": 1,
                "chat": {"id": CHAT_ID, "type": "private"},
                "date": 1_780_000_000,
                "text": "…",
            },
            "chat_instance": "-99",
            "data": data,
        },
    }


async def deliver(
    client: httpx.AsyncClient, path: str, update: dict[str, Any], secret: str | None = SECRET
) -> httpx.Response:
    headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret is not None else {}
    return await client.post(path, json=update, headers=headers)


def keyboard_of(params: dict[str, Any]) -> dict[str, str]:
    rows = params["reply_markup"]["inline_keyboard"]
    return {button["text"]: button.get("callback_data") or button["url"] for [button] in rows}


async def test_round_trip_start_keyboard_callback_and_ticket_photo(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, hook: str, bot_api: FakeBotApi
) -> None:
    started = await deliver(app_client, hook, message_update("/start ev1"))
    assert started.status_code == 200, started.text
    assert started.json() == {"ok": True, "processed": True}
    [(method, sent)] = bot_api.calls
    assert method == "sendMessage"
    assert sent["chat_id"] == str(CHAT_ID)
    assert "Weekend pop-up pops up at Old Tram Depot" in sent["text"]
    assert "Doors open" in sent["text"] and "What would you like to do?" in sent["text"]
    menu = keyboard_of(sent)
    assert list(menu) == ["See the drop", "RSVP a time slot"]
    assert all(0 < len(data.encode()) <= 64 for data in menu.values())
    async with ctx.db.reader() as session:
        state = await session.scalar(
            select(Conversation.state).where(
                Conversation.org_id == tenant.org_id, Conversation.channel == "telegram"
            )
        )
    assert state is not None and json.loads(state)["vars"]["ref"] == "ev1"  # the deep link

    bot_api.calls.clear()
    pressed = await deliver(app_client, hook, callback_update(menu["See the drop"]))
    assert pressed.status_code == 200 and pressed.json()["processed"] is True
    assert bot_api.calls[0] == (
        "answerCallbackQuery",
        {"callback_query_id": "cbq-" + menu["See the drop"][:8]},
    )
    sends = [params for method, params in bot_api.calls[1:] if method == "sendMessage"]
    card = next(params for params in sends if params["text"].startswith("Tote bag"))
    assert "15.00" in card["text"] and "(10 left)" in card["text"]
    assert list(keyboard_of(card)) == ["Reserve"]
    assert any(
        list(keyboard_of(p)) == ["RSVP a time slot", "Back"] for p in sends if "reply_markup" in p
    )

    bot_api.calls.clear()
    reserved = await deliver(app_client, hook, callback_update(keyboard_of(card)["Reserve"]))
    assert reserved.status_code == 200
    methods = bot_api.methods()
    assert methods[0] == "answerCallbackQuery" and "sendPhoto" in methods
    said = next(params["text"] for method, params in bot_api.calls if method == "sendMessage")
    assert said.startswith("Tote bag is yours until")
    photo = next(params for method, params in bot_api.calls if method == "sendPhoto")
    assert photo["chat_id"] == str(CHAT_ID)
    assert photo["photo"]["content"].startswith(b"\x89PNG\r\n\x1a\n")  # the QR ticket
    assert "/t/" in photo["caption"]


async def test_wrong_or_missing_secret_is_refused(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, hook: str, bot_api: FakeBotApi
) -> None:
    wrong = await deliver(app_client, hook, message_update("hi"), secret="nope")
    missing = await deliver(app_client, hook, message_update("hi"), secret=None)
    assert wrong.status_code == 403 and missing.status_code == 403
    assert bot_api.calls == []
    async with ctx.db.reader() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(Conversation)
            .where(Conversation.org_id == tenant.org_id)
        )
    assert count == 0
    unknown = await deliver(app_client, "/telegram/no-such-org/webhook", message_update("hi"))
    assert unknown.status_code == 404


async def test_unconfigured_secret_refuses_everything(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant
) -> None:
    ctx.settings = ctx.settings.model_copy(update={"telegram_webhook_secret": ""})
    response = await deliver(
        app_client, f"/telegram/{tenant.slug}/webhook", message_update("hi"), ""
    )
    assert response.status_code == 403


async def test_a_repeated_update_id_is_processed_once(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, hook: str, bot_api: FakeBotApi
) -> None:
    update = message_update("hello", update_id=777)
    first = await deliver(app_client, hook, update)
    assert first.json()["processed"] is True
    sent = len(bot_api.calls)
    assert sent >= 1
    again = await deliver(app_client, hook, update)  # Telegram retrying
    assert again.status_code == 200 and again.json()["processed"] is False
    assert len(bot_api.calls) == sent
    async with ctx.db.reader() as session:
        inbound = await session.scalar(
            select(func.count())
            .select_from(ChatMessage)
            .where(ChatMessage.org_id == tenant.org_id, ChatMessage.direction == "in")
        )
    assert inbound == 1
    # Another update is a new turn.
    other = await deliver(app_client, hook, message_update("MENU"))
    assert other.json()["processed"] is True and len(bot_api.calls) > sent


async def test_stop_on_telegram_goes_through_the_shared_keywords(
    app_client: httpx.AsyncClient, hook: str, bot_api: FakeBotApi
) -> None:
    await deliver(app_client, hook, message_update("/start"))
    bot_api.calls.clear()
    await deliver(app_client, hook, message_update("STOP"))
    [(method, sent)] = bot_api.calls
    assert method == "sendMessage" and "unsubscribed" in sent["text"]
    bot_api.calls.clear()
    await deliver(app_client, hook, message_update("hi"))
    assert bot_api.calls == []


def test_long_payloads_fit_callback_data() -> None:
    short = "menu:0"
    assert telegram.callback_data(short) == short
    long = "cards:" + "x" * 100
    data = telegram.callback_data(long)
    assert data.startswith("~") and len(data.encode()) <= 64
    assert telegram.callback_data(long) == data  # stable across processes
    assert telegram.callback_data("~looks-hashed") != "~looks-hashed"
    unicode = "pick:" + "é" * 40  # 85 bytes although 45 characters
    assert len(telegram.callback_data(unicode).encode()) <= 64


async def test_a_hashed_payload_resolves_against_the_buttons_shown(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, hook: str
) -> None:
    await deliver(app_client, hook, message_update("/start"))
    long = "menu:9:" + "v" * 90
    shown = Buttons(text="pick", buttons=[Button(label="Long", payload=long)])
    async with ctx.db.transaction() as session:
        conv = await session.scalar(
            select(Conversation).where(
                Conversation.org_id == tenant.org_id, Conversation.channel == "telegram"
            )
        )
        assert conv is not None
        session.add(
            ChatMessage(
                org_id=tenant.org_id,
                conversation_id=conv.id,
                session_no=conv.session_no,
                direction="out",
                body=shown.model_dump_json(),
                created_at=ctx.clock.now(),
            )
        )
    data = telegram.callback_data(long)
    async with ctx.db.reader() as session:
        found = await telegram.resolve_callback(
            session, ctx.signer, tenant.org_id, str(CHAT_ID), data
        )
        unknown = await telegram.resolve_callback(
            session, ctx.signer, tenant.org_id, str(CHAT_ID), "~nothing"
        )
    assert found == long
    assert unknown == "~nothing"


def test_parse_update_ignores_what_the_chat_does_not_use() -> None:
    assert telegram.parse_update({"no": "id"}) is None
    edited = telegram.parse_update({"update_id": 5, "edited_message": {"text": "x"}})
    assert edited is not None and edited.inbound is None
    sticker = telegram.parse_update(
        {"update_id": 6, "message": {"chat": {"id": 1}, "sticker": {"file_id": "x"}}}
    )
    assert sticker is not None and sticker.inbound is None
    deep = telegram.parse_update(message_update("/start@popdrop_bot drop", update_id=7))
    assert deep is not None and deep.inbound is not None
    assert deep.inbound.kind == "start" and deep.inbound.payload == "drop"
