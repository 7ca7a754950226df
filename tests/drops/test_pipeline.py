"""The send pipeline: every recipient once, per-recipient vouchers, consent re-checked at
the last moment, quiet hours defer, frequency caps, pause/resume/cancel."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx

from popdrop.drops.models import SendRow
from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact, inbound
from tests.conftest import Tenant
from tests.drops.helpers import Recorder, drop_spec, sender, started_drop


async def test_every_recipient_gets_one_message_with_a_working_code(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    emails = [f"buyer{i}@x.io" for i in range(5)]
    for email in emails:
        await add_contact(app_client, tenant, email=email, first_name="Sam")
    await add_contact(app_client, tenant, email="no-consent@x.io", consents=())
    drop_id = await started_drop(ctx, tenant, drop_spec())
    email = Recorder()

    handled = await sender(ctx, email, org=tenant).run_until_idle()

    assert handled == 5
    assert sorted(email.to()) == sorted(emails)
    ids = {m.message_id for m in email.sent}  # type: ignore[union-attr]
    assert len(ids) == 5
    first = email.sent[0]
    assert first.subject == "Hi Sam, the drop is on"  # type: ignore[union-attr]
    assert "List-Unsubscribe" in first.headers  # type: ignore[union-attr]
    assert "/r/" in first.text  # type: ignore[union-attr]
    code = first.text.split("Your code ")[1].split()[0]  # type: ignore[union-attr]
    valid = await app_client.post(
        "/api/v1/vouchers/validate", json={"code": code}, headers=tenant.headers
    )
    assert valid.status_code == 200, valid.text
    # Nothing left to do: a second run sends nothing again.
    assert await sender(ctx, email, org=tenant).run_until_idle() == 0
    assert len(email.sent) == 5
    async with ctx.db.reader() as session:
        statuses = (
            await session.scalars(SendRow.__table__.select().where(SendRow.drop_id == drop_id))
        ).all()
    assert len(statuses) == 5


async def test_opt_out_after_the_start_receives_nothing(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    await add_contact(app_client, tenant, phone="+33611111111", consents=("sms",))
    await add_contact(app_client, tenant, phone="+33622222222", consents=("sms",))
    await started_drop(ctx, tenant, drop_spec(channels=["sms"]))
    # The drop started (recipients frozen); one of them texts STOP before their batch.
    await inbound(app_client, tenant, "+33622222222", "stop")
    sms = Recorder()
    await sender(ctx, Recorder(), sms, org=tenant).run_until_idle()
    assert sms.to() == ["+33611111111"]


async def test_quiet_hours_defer_until_the_window_opens(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    clock = ctx.clock
    clock.set(datetime(2026, 7, 4, 21, 30, tzinfo=UTC))  # type: ignore[attr-defined]  # 23:30 in Paris
    await add_contact(app_client, tenant, email="night@x.io", time_zone="Europe/Paris")
    await add_contact(app_client, tenant, email="ny@x.io", time_zone="America/New_York")  # 17:30
    await started_drop(ctx, tenant, drop_spec(quiet_start_hour=21, quiet_end_hour=8))
    email = Recorder()
    await sender(ctx, email, org=tenant).run_until_idle()
    assert email.to() == ["ny@x.io"]

    clock.set(datetime(2026, 7, 5, 5, 59, 59, tzinfo=UTC))  # type: ignore[attr-defined]  # 07:59:59
    assert await sender(ctx, email, org=tenant).run_until_idle() == 0
    clock.set(datetime(2026, 7, 5, 6, 0, 0, tzinfo=UTC))  # type: ignore[attr-defined]  # 08:00 Paris
    await sender(ctx, email, org=tenant).run_until_idle()
    assert email.to() == ["ny@x.io", "night@x.io"]


async def test_the_tick_starts_a_scheduled_drop_when_due_and_closes_it_when_drained(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    from datetime import timedelta

    from sqlalchemy import func, select

    from popdrop.drops.models import Drop
    from popdrop.outbound.models import MailboxMessage
    from popdrop.worker import Worker

    clock = ctx.clock
    start = datetime(2026, 7, 4, 10, 0, tzinfo=UTC)
    clock.set(start)  # type: ignore[attr-defined]
    await add_contact(app_client, tenant, email="early@x.io")
    drop_id = await started_drop(
        ctx, tenant, drop_spec(scheduled_at=(start + timedelta(hours=1)).isoformat())
    )
    worker = Worker(ctx.settings, ctx.db, ctx.signer, clock)
    await worker.broker.startup()
    try:

        async def status() -> tuple[str, datetime | None]:
            async with ctx.db.reader() as session:
                drop = await session.get(Drop, drop_id, populate_existing=True)
                assert drop is not None
                return drop.status, drop.finished_at

        assert drop_id not in await worker.tick()
        assert (await status())[0] == "scheduled"
        clock.set(start + timedelta(hours=1))  # type: ignore[attr-defined]
        # Starts it (recipients frozen) and hands the due rows to the worker's own sender,
        # which sends through the development mailbox.
        assert drop_id in await worker.tick()
        for _ in range(200):
            async with ctx.db.reader() as session:
                rows = (
                    (
                        await session.execute(
                            select(SendRow.status).where(SendRow.drop_id == drop_id)
                        )
                    )
                    .scalars()
                    .all()
                )
            if rows == ["delivered"]:  # the mailbox stores it: delivered at once
                break
            await asyncio.sleep(0.05)
        assert rows == ["delivered"]
        async with ctx.db.reader() as session:
            delivered = await session.scalar(
                select(func.count()).where(
                    MailboxMessage.org_id == tenant.org_id,
                    MailboxMessage.recipient == "early@x.io",
                )
            )
        assert delivered == 1
        assert (await status())[0] == "sending"  # until a tick sees it drained
        await worker.tick()
        assert await status() == ("done", start + timedelta(hours=1))
    finally:
        await worker.broker.shutdown()
