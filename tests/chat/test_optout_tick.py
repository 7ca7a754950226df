"""Consent at the last moment for chat messages sent by the worker tick (issue 13, item 1):
a STOP that is confirmed after the tick took its reminders, but before one of them is
texted, means that reminder is not sent."""

from __future__ import annotations

from datetime import timedelta

import httpx

from popdrop.chat.tasks import ChatChannels
from popdrop.core.clock import FrozenClock
from popdrop.outbound.transports import OutboundSms, SendResult
from popdrop.web.context import AppContext
from tests.chat.test_service import say, shop_with_flow
from tests.chat.test_tasks import FROM, tick
from tests.conftest import Tenant

FIRST = "+33612345671"
SECOND = "+33612345672"


async def book(ctx: AppContext, tenant: Tenant, phone: str) -> None:
    for text in ("Hello", "2", "1", "1"):  # RSVP the first time slot, yes book it
        await say(ctx, tenant, text, channel="sms", address=phone)


class StopDuringTheTick:
    """An SMS provider: while it carries the first reminder, the second person texts STOP
    and gets the confirmation."""

    def __init__(self, ctx: AppContext, tenant: Tenant) -> None:
        self.ctx, self.tenant = ctx, tenant
        self.sent: list[OutboundSms] = []
        self.confirmation = ""

    async def send(self, message: OutboundSms) -> SendResult:
        if not self.confirmation:
            stop = await say(self.ctx, self.tenant, "STOP", channel="sms", address=SECOND)
            self.confirmation = " ".join(getattr(m, "text", "") for m in stop.messages)
        self.sent.append(message)
        return SendResult(True, provider_id=f"SM{len(self.sent)}")

    async def close(self) -> None:
        return None


async def test_a_stop_confirmed_during_the_tick_stops_that_persons_reminder(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await shop_with_flow(app_client, ctx, tenant)
    await book(ctx, tenant, FIRST)
    await book(ctx, tenant, SECOND)
    sms = StopDuringTheTick(ctx, tenant)
    later = clock.now() + timedelta(hours=22)  # both reminders are due

    done = await tick(ctx, tenant, ChatChannels(sms=sms, sms_from=FROM), later)

    assert "no more messages" in sms.confirmation
    assert [m.to for m in sms.sent] == [FIRST]
    assert done == {"sms:sent": 1, "sms:opted_out": 1}
