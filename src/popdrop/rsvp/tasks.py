"""Periodic work of the waiting list, run by the worker tick (no broker needed)."""

from __future__ import annotations

from sqlalchemy import select

from popdrop.core.clock import Clock
from popdrop.core.db import Database
from popdrop.core.signing import Signer
from popdrop.rsvp import service
from popdrop.rsvp.lifecycle import OfferStatus
from popdrop.rsvp.models import WaitlistOffer
from popdrop.rsvp.notices import OfferMade


async def sweep_expired_offers(db: Database, signer: Signer, clock: Clock) -> list[OfferMade]:
    """Expire every offer past its time and pass its places on; return the new offers.
    Their messages are already in the notification outbox (same transaction). Runs every
    tick: a read first, so a tick with nothing due opens no write transaction."""
    now = clock.now()
    async with db.reader() as session:
        due = await session.scalar(
            select(WaitlistOffer.id)
            .where(WaitlistOffer.status == OfferStatus.OPEN, WaitlistOffer.expires_at <= now)
            .limit(1)
        )
    if due is None:
        return []
    async with db.transaction() as session:
        return await service.expire_offers(session, signer, now=now)
