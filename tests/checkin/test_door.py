"""The door without a camera: every ticket has a short, typable code (check character,
unambiguous alphabet) printed under its QR, accepted by the scan API and the scanner; and
every QR the product serves is a regular QR code that ZBar reads back to what it should
hold (ticket page, voucher claim page, chat web ticket, Telegram photo)."""

from __future__ import annotations

import html
import re
import secrets
from io import BytesIO
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from popdrop.app import build_context, create_app
from popdrop.chat import telegram
from popdrop.chat.messages import SMS, QrTicket, Text, degrade
from popdrop.checkin import tickets
from popdrop.core import qr
from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.web.context import AppContext
from tests.checkin.helpers import issue, make_event, scan
from tests.conftest import Tenant, make_tenant

pyzbar = pytest.importorskip("pyzbar.pyzbar", reason="needs pyzbar and Debian's libzbar0")

CODE_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]$")


def zbar(png: bytes) -> list[tuple[str, str]]:
    """(symbol type, text) of every code ZBar finds in a PNG."""
    from PIL import Image

    found = pyzbar.decode(Image.open(BytesIO(png)))
    return [(symbol.type, symbol.data.decode()) for symbol in found]


def _svg_paths(svg: str) -> list[str]:
    return re.findall(r'<path class="qrline"[^>]* d="([^"]+)"', svg)


# ---------------------------------------------------------------- the code itself


def _secret() -> str:
    private, _ = tickets.new_keypair()
    return tickets.sign(private, event_id=7, ticket_id=42, generation=0, issued_epoch=1)


def test_short_code_shape_and_forgiving_input() -> None:
    code = tickets.short_code(_secret())
    printed = tickets.format_short_code(code)
    assert CODE_RE.match(printed), printed
    for typed in (
        printed,
        printed.lower(),
        code,
        f"  {code[:4]} {code[4:]} ",
        printed.replace("-", " "),
    ):
        assert tickets.parse_short_code(typed) == code
    # People type I or L for 1 and O for 0: the same code.
    assert tickets.parse_short_code(code.replace("1", "l").replace("0", "O")) == code
    assert tickets.looks_like_short_code(_secret()) is False  # a QR secret never is one


@given(st.binary(min_size=64, max_size=64), st.integers(0, 8), st.integers(1, 31))
def test_any_one_typo_and_nearly_any_neighbour_swap_is_caught(
    signature: bytes, where: int, shift: int
) -> None:
    secret = tickets.b64encode(bytes(tickets.PAYLOAD_BYTES) + signature)
    code = tickets.short_code(secret)
    wrong = tickets.ALPHABET[(tickets.ALPHABET.index(code[where]) + shift) % 32]
    assert tickets.parse_short_code(code[:where] + wrong + code[where + 1 :]) is None
    # Luhn mod 32 misses one swap only: 0 and Z (values 0 and 31), like 09/90 in base 10.
    if (
        where < 8
        and code[where] != code[where + 1]
        and {code[where], code[where + 1]} != {"0", "Z"}
    ):
        swapped = code[:where] + code[where + 1] + code[where] + code[where + 2 :]
        assert tickets.parse_short_code(swapped) is None


# ---------------------------------------------------------------- API and pages


async def test_short_code_checks_in_like_the_qr(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    ticket = await issue(app_client, tenant, event_id)
    printed = ticket["short_code"]
    assert CODE_RE.match(printed)
    assert printed == tickets.format_short_code(tickets.short_code(ticket["secret"]))

    # The ticket page prints it under the QR.
    page = await app_client.get(f"/t/{ticket['secret']}")
    assert page.status_code == 200
    assert re.search(rf'<figcaption[^>]*aria-label="Ticket code"[^>]*>{printed}<', page.text)

    typed = printed.lower().replace("-", " ")
    done = await scan(app_client, tenant, typed, event_id=event_id)
    assert done.status_code == 200, done.text
    assert done.json()["result"] == "ok" and done.json()["ticket_id"] == ticket["ticket"]["id"]
    again = await scan(app_client, tenant, printed, event_id=event_id)
    assert again.status_code == 409 and again.json()["reason"] == "already_checked_in"
    by_qr = await scan(app_client, tenant, ticket["secret"])
    assert by_qr.status_code == 409 and by_qr.json()["reason"] == "already_checked_in"

    # A typo in the check character: refused with its reason, nothing stored.
    code = tickets.short_code(ticket["secret"])
    typo = code[:8] + tickets.ALPHABET[(tickets.ALPHABET.index(code[8]) + 1) % 32]
    refused = await scan(app_client, tenant, typo, event_id=event_id)
    assert refused.status_code == 422 and refused.json()["reason"] == "short_code_invalid"
    # A well-formed code no ticket of the event has: `invalid`, like a forged QR.
    data = "ZZZZZZZZ"
    unknown = data + tickets.check_char(data)
    assert tickets.parse_short_code(unknown) == unknown
    nobody = await scan(app_client, tenant, unknown, event_id=event_id)
    assert nobody.status_code == 422 and nobody.json()["reason"] == "invalid"
    # Codes are unique per event only: the API needs the event.
    blind = await scan(app_client, tenant, printed)
    assert blind.status_code == 422 and blind.json()["reason"] == "invalid_request"
    # Another event's scanner does not find it.
    other_event = await make_event(ctx, tenant.org_id)
    elsewhere = await scan(app_client, tenant, printed, event_id=other_event)
    assert elsewhere.status_code == 422 and elsewhere.json()["reason"] == "invalid"


async def test_reissue_changes_the_short_code(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    ticket = await issue(app_client, tenant, event_id)
    moved = await app_client.post(
        f"/api/v1/tickets/{ticket['ticket']['id']}/reissue", headers=tenant.headers
    )
    assert moved.status_code == 200, moved.text
    new = moved.json()
    assert new["short_code"] != ticket["short_code"]
    old = await scan(app_client, tenant, ticket["short_code"], event_id=event_id)
    assert old.status_code == 422 and old.json()["reason"] == "invalid"
    ok = await scan(app_client, tenant, new["short_code"], event_id=event_id)
    assert ok.status_code == 200 and ok.json()["result"] == "ok"
    fetched = await app_client.get(
        f"/api/v1/tickets/{ticket['ticket']['id']}", headers=tenant.headers
    )
    assert fetched.json()["short_code"] == new["short_code"]


async def test_offline_batch_takes_short_codes(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    ticket = await issue(app_client, tenant, event_id)
    code = tickets.short_code(ticket["secret"])
    typo = code[:8] + tickets.ALPHABET[(tickets.ALPHABET.index(code[8]) + 3) % 32]
    body = {
        "scans": [
            {"secret": typo, "nonce": secrets.token_hex(8), "event_id": event_id},
            {"secret": code, "nonce": secrets.token_hex(8), "event_id": event_id},
        ]
    }
    done = await app_client.post("/api/v1/checkins/batch", json=body, headers=tenant.headers)
    assert done.status_code == 200, done.text
    first, second = done.json()["results"]
    assert first["status"] == 422 and first["body"]["reason"] == "short_code_invalid"
    assert second["status"] == 200 and second["body"]["result"] == "ok"


# ---------------------------------------------------------------- every QR, read by ZBar


def test_the_qr_helper_never_makes_a_micro_qr() -> None:
    for payload in ("A", "K7QM4XT29", "12345", "ABCD-EFGH"):
        code = qr.make(payload)
        assert not code.is_micro and code.designator[0].isdigit(), code.designator
        assert zbar(qr.png_bytes(payload)) == [("QRCODE", payload)]


async def test_ticket_page_qr_reads_back_the_secret(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    ticket = await issue(app_client, tenant, event_id)
    page = await app_client.get(f"/t/{ticket['secret']}")
    # The page embeds exactly the helper's code of the secret, which ZBar reads back.
    assert _svg_paths(page.text) == _svg_paths(str(qr.svg_inline(ticket["secret"])))
    assert zbar(qr.png_bytes(ticket["secret"])) == [("QRCODE", ticket["secret"])]


async def _claim_link(client: httpx.AsyncClient, tenant: Tenant, prefix: str | None) -> str:
    body = {"name": f"door-{secrets.token_hex(3)}", "quantity": 1, "prefix": prefix}
    made = await client.post(
        "/api/v1/voucher-batches", params={"links": "true"}, json=body, headers=tenant.headers
    )
    assert made.status_code == 201, made.text
    link: str = made.json()["links"][0]
    return link


async def test_voucher_claim_qr_opens_the_claim_page(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    for prefix in (None, "SPRNG"):  # no prefix: a short code, which segno made Micro QR
        link = await _claim_link(app_client, tenant, prefix)
        token = link.rsplit("/v/", 1)[1]
        page = await app_client.get(f"/v/{token}")
        assert page.status_code == 200, page.text
        assert _svg_paths(page.text) == _svg_paths(str(qr.svg_inline(link)))
        assert zbar(qr.png_bytes(link)) == [("QRCODE", link)]
        saved = await app_client.get(f"/v/{token}/qr.svg")
        assert saved.status_code == 200
        assert _svg_paths(saved.text) == _svg_paths(qr.svg_bytes(link).decode())


async def test_chat_ticket_qr_and_telegram_photo(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    ticket = await issue(app_client, tenant, event_id)
    secret, printed = ticket["secret"], ticket["short_code"]

    image = await app_client.get(f"/chat/qr/{secret}.svg")
    assert image.status_code == 200 and image.headers["content-type"] == "image/svg+xml"
    assert _svg_paths(image.text) == _svg_paths(qr.svg_bytes(secret, scale=6, border=2).decode())
    assert f">{html.escape(printed)}</text>" in image.text  # the code, under the QR
    assert zbar(qr.png_bytes(secret, scale=6, border=2)) == [("QRCODE", secret)]

    class Bot(telegram.TelegramBot):
        def __init__(self) -> None:
            self.photos: list[tuple[bytes | str, str]] = []

        async def send_photo(
            self, chat_id: str, photo: str | bytes, caption: str = "", *a: Any, **k: Any
        ) -> dict[str, Any]:  # type: ignore[override]
            self.photos.append((photo, caption))
            return {}

    bot = Bot()
    url = f"http://test/t/{secret}"
    await telegram.deliver(bot, "1", [QrTicket(text="Your ticket", secret=secret, url=url)])
    [(photo, caption)] = bot.photos
    assert isinstance(photo, bytes)
    assert zbar(photo) == [("QRCODE", secret)]
    assert printed in caption and url in caption


async def test_typed_codes_that_miss_count_as_guesses(
    settings: Settings, clock: FrozenClock
) -> None:
    """Three misses (unknown codes, a typo) and the token's next short code is refused
    429 until the window ends; QR secrets are never counted nor refused."""
    context = build_context(settings.model_copy(update={"guess_limit_per_token": 3}), clock=clock)
    transport = httpx.ASGITransport(app=create_app(ctx=context))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            tenant = await make_tenant(context)
            event_id = await make_event(context, tenant.org_id)
            ticket = await issue(client, tenant, event_id)
            code = tickets.short_code(ticket["secret"])
            typo = code[:8] + tickets.ALPHABET[(tickets.ALPHABET.index(code[8]) + 1) % 32]
            for data in ("ZZZZZZZZ", "YYYYYYYY"):
                miss = await scan(
                    client, tenant, data + tickets.check_char(data), event_id=event_id
                )
                assert miss.status_code == 422 and miss.json()["reason"] == "invalid"
            wrong = await scan(client, tenant, typo, event_id=event_id)
            assert wrong.json()["reason"] == "short_code_invalid"
            limited = await scan(client, tenant, code, event_id=event_id)
            assert limited.status_code == 429 and limited.json()["reason"] == "rate_limited"
            assert "retry-after" in limited.headers
            by_qr = await scan(client, tenant, ticket["secret"])
            assert by_qr.status_code == 200 and by_qr.json()["result"] == "ok"
    finally:
        await context.guard.counter.close()
        await context.db.dispose()


def test_a_ticket_sent_as_text_carries_its_short_code() -> None:
    """SMS (no pictures): the ticket becomes text with the code to read out and the link."""
    secret = _secret()
    url = f"https://pop.test/t/{secret}"
    [text] = degrade([QrTicket(text="Your ticket", secret=secret, url=url)], SMS)
    assert isinstance(text, Text)
    printed = tickets.format_short_code(tickets.short_code(secret))
    assert text.text == f"Your ticket\nTicket code: {printed}\n{url}"
