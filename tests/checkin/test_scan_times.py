"""The door reads times on the event's clock: a second scan says when the first one was,
in the event's zone (never a UTC hour)."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx

from popdrop.web.context import AppContext
from tests.checkin.helpers import issue, make_event, scan
from tests.conftest import make_tenant


async def test_already_checked_in_says_when_on_the_event_clock(
    app_client: httpx.AsyncClient, ctx: AppContext
) -> None:
    ctx.clock.set(datetime(2030, 1, 11, 16, tzinfo=UTC))  # 17:00 in Paris (CET)
    tenant = await make_tenant(ctx)
    event_id = await make_event(ctx, tenant.org_id)  # Europe/Paris, open now
    secret = (await issue(app_client, tenant, event_id))["secret"]
    assert (await scan(app_client, tenant, secret, gate="north")).status_code == 200
    again = await scan(app_client, tenant, secret)
    assert again.status_code == 409
    assert again.json()["message"] == "already checked in Fri 11 Jan, 17:00:00 CET at gate north"
