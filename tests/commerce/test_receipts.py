"""Receipts: queued with the order's settlement, rendered at send time with lines, the
discount, total, lane, pickup window in the event's time zone, pickup code and the
confirmation link, and delivered by the notification drainer (here to the mailbox)."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import httpx
from sqlalchemy import select, update

from popdrop.commerce import receipts
from popdrop.commerce.models import Order, OrderLine
from popdrop.core.clock import FrozenClock
from popdrop.core.localtime import DASH
from popdrop.outbound.mailbox import Mailbox
from popdrop.outbound.models import MailboxMessage
from popdrop.usecases.notify import Notifier
from popdrop.web.context import AppContext
from tests.commerce.test_pickup import new_code
from tests.conftest import Tenant
from tests.events.helpers import Shop, make_shop

BASE = "http://test"


async def paid_order(
    ctx: AppContext, tenant: Tenant, shop: Shop, *, status: str = "paid", method: str = "stripe"
) -> int:
    """A paid order of 2 totes (one 5.00 off) and a mug, with an email and a phone."""
    now = ctx.clock.now()
    breakdown = {
        "lines": [
            {"key": "a", "adjustments": [{"name": "Tote week", "amount_minor": 500}]},
            {"key": "b", "adjustments": []},
        ]
    }
    async with ctx.db.transaction() as session:
        order = Order(
            org_id=tenant.org_id, event_id=shop.event_id, status=status, source="web",
            lane_id=shop.lane_id, slot_id=shop.slot_id, currency="EUR", subtotal_minor=3900,
            discount_minor=500, total_minor=3400, payment_method=method,
            short_code=new_code(), price_held_until=now, created_at=now, created_by="test",
            receipt_email=f"ann-{tenant.org_id}@example.com", receipt_phone="+4915112345678",
            breakdown=json.dumps(breakdown),
        )  # fmt: skip
        session.add(order)
        await session.flush()
        for title, qty, final in (("Tote bag", 2, 2500), ("Mug", 1, 900)):
            session.add(
                OrderLine(
                    org_id=tenant.org_id, order_id=order.id, product_id=shop.product_id,
                    variant_id=shop.variant_id, title=title, qty=qty, unit_price_minor=1500,
                    list_minor=qty * 1500, final_minor=final,
                )
            )  # fmt: skip
        await receipts.enqueue_receipt(session, order, now=now)
        await receipts.enqueue_receipt(session, order, now=now)  # a retried settlement
        return order.id


async def drain(ctx: AppContext) -> dict[str, int]:
    mailbox = Mailbox(ctx.db, ctx.clock)
    notifier = Notifier(
        ctx.db, ctx.signer, ctx.clock, BASE, email=mailbox, sms=mailbox, sms_from="+15550000"
    )
    return await notifier.drain()


async def inbox(ctx: AppContext, tenant: Tenant) -> list[MailboxMessage]:
    async with ctx.db.reader() as session:
        return list(
            await session.scalars(
                select(MailboxMessage)
                .where(MailboxMessage.org_id == tenant.org_id)
                .order_by(MailboxMessage.channel)
            )
        )


async def test_the_receipt_is_delivered_by_email_and_sms(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    order_id = await paid_order(ctx, tenant, shop)
    await drain(ctx)
    email, sms = await inbox(ctx, tenant)
    async with ctx.db.reader() as session:
        code = await session.scalar(select(Order.short_code).where(Order.id == order_id))
    assert code is not None
    printed = f"{code[:4]}-{code[4:8]}-{code[8:]}"

    assert email.channel == "email" and email.recipient.startswith("ann-")
    assert email.subject == f"Your order {printed} at Weekend pop-up"
    text = email.text
    assert "2 x Tote bag: 25.00 EUR" in text and "1 x Mug: 9.00 EUR" in text
    assert "Tote week: -5.00 EUR" in text
    assert "Total: 34.00 EUR (paid)" in text
    assert "Pick it up at: Front desk" in text
    # make_shop's slot: a day from now for an hour, shown on Berlin's clock (UTC+1 in
    # December): the test clock starts at a whole hour in UTC.
    start = clock.now() + timedelta(days=1, hours=1)
    end = start + timedelta(hours=1)
    assert f"When: {start:%a %d %b, %H:%M}{DASH}{end:%H:%M} CET" in text
    assert f"Pickup code: {printed}" in text
    link = re.search(r"http://test/orders/view/\S+", text)
    assert link is not None
    token = link.group(0).rsplit("/", 1)[1]
    assert f"http://test/orders/view/{token}/qr.png" in text
    qr = await app_client.get(f"/orders/view/{token}/qr.png")
    assert qr.status_code == 200 and qr.content.startswith(b"\x89PNG")

    assert sms.channel == "sms" and sms.recipient == "+4915112345678"
    assert len(sms.text) < 320  # two SMS segments at most
    assert f"order {printed} paid 34.00 EUR" in sms.text
    # The same order's view; the SMS may be signed a second later than the email (the
    # token carries its signing time), so the payloads are compared.
    sms_link = re.search(r"/orders/view/(\S+)", sms.text)
    assert sms_link is not None and sms_link.group(1).split(".")[0] == token.split(".")[0]
    assert len(await inbox(ctx, tenant)) == 2  # enqueued twice, sent once per channel


async def test_pay_at_pickup_says_what_to_pay_and_an_ended_order_sends_nothing(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    await paid_order(ctx, tenant, shop, status="pending", method="pay_at_pickup")
    await drain(ctx)
    email, sms = await inbox(ctx, tenant)
    assert "pay 34.00 EUR when you pick it up" in email.text
    assert "Total: 34.00 EUR (to pay at pickup)" in email.text
    assert "reserved, pay 34.00 EUR at pickup" in sms.text

    cancelled = await paid_order(ctx, tenant, shop)
    async with ctx.db.transaction() as session:
        await session.execute(update(Order).where(Order.id == cancelled).values(status="refunded"))
    outcomes = await drain(ctx)
    assert outcomes == {"skipped": 2}
    assert len(await inbox(ctx, tenant)) == 2  # nothing more


def test_no_address_no_notice() -> None:
    order = Order(id=5, org_id=1, receipt_email="ann@localhost", receipt_phone="+4915112345678")
    [notice] = receipts.receipt_notices(order)
    assert (notice.kind, notice.subject, str(notice.channel)) == ("order_receipt", "order:5", "sms")
    assert receipts.receipt_notices(Order(id=6, org_id=1)) == []
    both = Order(id=7, org_id=1, receipt_email="Ann@Example.com", receipt_phone="12")
    assert [str(n.channel) for n in receipts.receipt_notices(both)] == ["email"]
