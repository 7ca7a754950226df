"""Minimal PII by construction: tills send names, emails, phones, addresses and card
numbers; none of it lands in any table of the database, nor in the logs."""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from sqlalchemy import MetaData, select

from popdrop import app as app_module
from popdrop.app import build_context, create_app
from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings
from popdrop.core.logging import configure_logging, log
from popdrop.web.context import AppContext
from tests.conftest import SECRET, make_tenant
from tests.partners.helpers import (
    SHOPIFY_ORDER,
    SQUARE_PAYMENT,
    make_till,
    send_shopify,
    send_square,
    send_standard,
    standard_sale,
)

NAME, SURNAME = "Zanzibar", "Quillfeather"
EMAIL = "zanzibar.quillfeather@pii-example.org"
PHONE = "+14155550199"
STREET = "742 Evergreen Terrace"
CARD = "4242424242424242"
CUSTOMER_REF = "cust-ZQ-77731"
NOTE = "leave at the blue door, buzzer 4"
PII = (NAME, SURNAME, EMAIL, PHONE, STREET, CARD, CUSTOMER_REF, NOTE, "Springfield-XY-98765")

ADDRESS = {
    "first_name": NAME,
    "last_name": SURNAME,
    "name": f"{NAME} {SURNAME}",
    "address1": STREET,
    "city": "Springfield-XY-98765",
    "phone": PHONE,
}


def shopify_order() -> dict[str, Any]:
    order = copy.deepcopy(SHOPIFY_ORDER)
    order.update(
        id=555000111,
        email=EMAIL,
        contact_email=EMAIL,
        phone=PHONE,
        note=NOTE,
        billing_address=ADDRESS,
        shipping_address=ADDRESS,
        customer={
            "id": CUSTOMER_REF,
            "email": EMAIL,
            "first_name": NAME,
            "last_name": SURNAME,
            "phone": PHONE,
            "default_address": ADDRESS,
        },
        payment_details={"credit_card_number": CARD, "credit_card_company": "Visa"},
    )
    order["line_items"][0]["name"] = f"Engraved for {NAME} {SURNAME}"
    return order


def square_payment() -> dict[str, Any]:
    body = copy.deepcopy(SQUARE_PAYMENT)
    payment = body["data"]["object"]["payment"]
    payment.update(
        buyer_email_address=EMAIL,
        customer_id=CUSTOMER_REF,
        note=NOTE,
        billing_address={"address_line_1": STREET, "first_name": NAME, "last_name": SURNAME},
        shipping_address={"address_line_1": STREET, "locality": "Springfield-XY-98765"},
    )
    payment["card_details"]["card"]["number"] = CARD
    payment["card_details"]["card"]["cardholder_name"] = f"{NAME} {SURNAME}"
    return body


def standard_payload() -> dict[str, Any]:
    body = standard_sale(
        external_id="PII-1",
        event_id="pii-evt-1",
        customer_ref=CUSTOMER_REF,
        customer={"name": f"{NAME} {SURNAME}", "email": EMAIL, "phone": PHONE},
        card={"number": CARD, "holder": f"{NAME} {SURNAME}"},
        shipping={"street": STREET},
        note=NOTE,
    )
    body["lines"][0]["title"] = f"Mug for {NAME}"
    body["source"]["cashier"] = SURNAME
    return body


def _uncache(proxy: Any) -> None:
    """Forget the logger structlog cached on first use, so the next use follows the
    current configuration."""
    proxy.__dict__.pop("bind", None)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Every structlog line, rendered as deployed (JSON) at DEBUG, into a buffer."""
    before = structlog.get_config()
    lines = io.StringIO()
    configure_logging("DEBUG")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=lines))
    _uncache(log)
    yield lines
    structlog.configure(**before)
    _uncache(log)


@pytest.fixture
async def loud_ctx(
    database_url: str, tmp_path: Path, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AppContext]:
    """The app with request logging on, at DEBUG: the most a deployment could log."""
    monkeypatch.setattr(app_module, "configure_logging", lambda level: None)
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        secret_key=SECRET,
        log_requests=True,
        log_level="DEBUG",
        redis_url=None,
        _env_file=None,  # type: ignore[call-arg]
    )
    context = build_context(settings, clock=clock)
    yield context
    await context.guard.counter.close()
    await context.db.dispose()


async def every_stored_value(ctx: AppContext) -> list[str]:
    """Every value of every column of every table, as text (bytes both ways)."""
    metadata = MetaData()
    async with ctx.db.connect() as conn:
        await conn.run_sync(metadata.reflect)
        values: list[str] = []
        for table in metadata.sorted_tables:
            for row in (await conn.execute(select(table))).all():
                for value in row:
                    if isinstance(value, bytes | memoryview):
                        raw = bytes(value)
                        values += [raw.decode("latin-1"), raw.hex()]
                    elif value is not None:
                        values.append(str(value))
    return values


async def test_no_pii_is_stored_anywhere_nor_logged(
    log_lines: io.StringIO,
    loud_ctx: AppContext,
    clock: FrozenClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    app = create_app(ctx=loud_ctx)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        tenant = await make_tenant(loud_ctx)
        till = await make_till(client, tenant, clock.now(), slug="pii-pop-up")
        accepted = [
            await send_shopify(client, till, "orders/create", "pii-1", shopify_order()),
            await send_square(client, till, square_payment()),
            await send_standard(client, till, standard_payload(), clock.now()),
        ]
        assert [r.json()["outcome"] for r in accepted] == ["sale_recorded"] * 3
        # Refused deliveries full of PII must not echo it either.
        broken = standard_payload() | {"currency": CARD, "event_id": "pii-evt-2"}
        refused = await send_standard(client, till, broken, clock.now(), webhook_id="msg_2")
        assert refused.status_code == 422
        assert not any(p in refused.text for p in PII)
        listed = await client.get("/api/v1/pos/sales", headers=tenant.headers)
        assert len(listed.json()) == 3
        assert not any(p in listed.text for p in PII)

    stored = await every_stored_value(loud_ctx)
    # The scan reads what is legitimately stored (the partner's own contact email).
    assert any("till@corner.example" in value for value in stored)
    leaks = {p for p in PII for value in stored if p in value}
    assert leaks == set()
    logs = log_lines.getvalue() + caplog.text
    assert "/pos/" in logs  # requests were logged, so the logs were really looked at
    assert {p for p in PII if p in logs} == set()


async def test_the_customer_ref_is_kept_as_a_keyed_hash_only(
    app_client: httpx.AsyncClient, ctx: AppContext, clock: FrozenClock
) -> None:
    tenant = await make_tenant(ctx)
    till = await make_till(app_client, tenant, clock.now(), slug="hash-pop-up")
    for n in range(2):
        body = standard_sale(external_id=f"H-{n}", event_id=f"hash-{n}", customer_ref=CUSTOMER_REF)
        assert (await send_standard(app_client, till, body, clock.now())).status_code == 200
    from popdrop.partners.models import PosSale

    async with ctx.db.reader() as session:
        hashes = (
            await session.scalars(
                select(PosSale.customer_hash).where(PosSale.org_id == tenant.org_id)
            )
        ).all()
    # The same customer twice: one hash, so repeat visits can be counted without the id.
    assert len(set(hashes)) == 1 and hashes[0] is not None and len(hashes[0]) == 64
    assert CUSTOMER_REF not in hashes[0]
