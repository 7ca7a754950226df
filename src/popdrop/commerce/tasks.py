"""Commerce work for the worker tick: expire unpaid orders whose hold ended, give back the
codes and budget spend of expired orders whose online payment can no longer come (see
`settlement`), and send the refunds a crash (or an unreachable provider) left unsent.

All are re-found from the database every tick, so a lost wake-up costs one tick at most;
all are safe to run in several processes at once (the order row lock decides who
expires or releases an order; a refund's `Idempotency-Key: refund-<id>` makes a second
send a replay).
"""

from __future__ import annotations

from popdrop.commerce import settlement
from popdrop.commerce.payments import provider_from_settings
from popdrop.core.clock import Clock
from popdrop.core.config import Settings
from popdrop.core.db import Database


async def tick(db: Database, settings: Settings, clock: Clock) -> dict[str, int]:
    """One pass: {"orders_expired": n, "payments_lapsed": l, "refunds_sent": m} (zeros are
    left out)."""
    now = clock.now()
    done = {
        "orders_expired": await settlement.expire_due(db, now),
        "payments_lapsed": await settlement.release_lapsed_payments(db, now),
    }
    provider = provider_from_settings(settings)
    if provider is not None:
        try:
            done["refunds_sent"] = await settlement.send_pending_refunds(db, provider, now=now)
        finally:
            await provider.aclose()
    return {name: count for name, count in done.items() if count}
