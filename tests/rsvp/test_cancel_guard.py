"""The guessing guard docs/rsvp.md describes for the public cancel route: forged cancel
tokens count as guessing failures, so an address that forges too many gets `429
rate_limited` (with Retry-After) — also for a genuine token — while other addresses are
untouched. Before, a forged token was refused before the guard ever saw it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from popdrop.app import create_app
from popdrop.web.context import AppContext
from tests.conftest import Tenant
from tests.rsvp.helpers import make_slot, rsvp, slot_taken

CANCEL = "/api/v1/public/rsvps/cancel"


@asynccontextmanager
async def client_at(ctx: AppContext, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A public client whose requests come from `address`."""
    transport = httpx.ASGITransport(app=create_app(ctx=ctx), client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def test_forged_cancel_tokens_are_counted_and_then_refused(
    ctx: AppContext, tenant: Tenant
) -> None:
    event_id, slot_id = await make_slot(ctx, tenant, capacity=5)
    limit = ctx.settings.guess_limit_per_address
    async with client_at(ctx, "203.0.113.7") as forger, client_at(ctx, "198.51.100.9") as guest:
        made = await rsvp(guest, event_id, slot_id, email="ana@example.com")
        assert made.status_code == 201, made.text
        genuine = made.json()["cancel_token"]
        mine = await rsvp(forger, event_id, slot_id, email="bob@example.com")
        forger_token = mine.json()["cancel_token"]
        assert await slot_taken(ctx, slot_id) == 2

        for i in range(limit):
            forged = await forger.post(CANCEL, json={"token": f"{genuine[:-6]}{i:06d}"})
            assert forged.status_code == 400, forged.text
            assert forged.json()["reason"] == "link_invalid"
        blocked = await forger.post(CANCEL, json={"token": "not-a-token"})
        assert blocked.status_code == 429, blocked.text
        assert blocked.json()["reason"] == "rate_limited"
        assert int(blocked.headers["Retry-After"]) >= 1
        # The guard is the address's: its own genuine token waits too, and nothing changed.
        own = await forger.post(CANCEL, json={"token": forger_token})
        assert own.status_code == 429
        assert await slot_taken(ctx, slot_id) == 2

        # Another address is not affected: its guest cancels at once.
        cancelled = await guest.post(CANCEL, json={"token": genuine})
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert await slot_taken(ctx, slot_id) == 1


async def test_a_genuine_cancel_is_not_a_guess(ctx: AppContext, tenant: Tenant) -> None:
    """Cancelling twice (`already_cancelled`) is the guest's own token: never counted."""
    event_id, slot_id = await make_slot(ctx, tenant, capacity=5)
    limit = ctx.settings.guess_limit_per_address
    async with client_at(ctx, "203.0.113.8") as guest:
        token = (await rsvp(guest, event_id, slot_id)).json()["cancel_token"]
        assert (await guest.post(CANCEL, json={"token": token})).status_code == 200
        for _ in range(limit + 2):
            again = await guest.post(CANCEL, json={"token": token})
            assert again.status_code == 409
            assert again.json()["reason"] == "already_cancelled"
