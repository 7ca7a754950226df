"""Provider rate limits: a token bucket in front of the transport."""

from __future__ import annotations

import asyncio

import pytest

from popdrop.core.clock import SystemClock
from popdrop.core.config import Settings
from popdrop.core.db import Database
from popdrop.outbound.factory import make_transports
from popdrop.outbound.throttle import Throttled
from popdrop.outbound.transports import OutboundSms, SendResult


class Recorder:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.closed = False

    async def send(self, message: OutboundSms) -> SendResult:
        self.times.append(asyncio.get_running_loop().time())
        return SendResult(ok=True, provider_id=f"SM{len(self.times)}")

    async def close(self) -> None:
        self.closed = True


def sms(i: int) -> OutboundSms:
    return OutboundSms(to=f"+3361234{i:04d}", from_number="+33700000000", body="hi")


async def test_a_burst_goes_at_once_then_the_rate_holds() -> None:
    inner = Recorder()
    limited = Throttled(inner, rate_per_s=40.0, burst=5)
    results = await asyncio.gather(*(limited.send(sms(i)) for i in range(25)))
    assert all(r.ok for r in results) and len(inner.times) == 25
    start = inner.times[0]
    # Never faster than the bucket allows: by the k-th message at most `burst` + rate * t
    # have gone out (a small tolerance for the loop clock's resolution).
    for k, at in enumerate(inner.times, start=1):
        assert k <= 5 + 40.0 * (at - start) + 1e-3 * 40.0 + 1, (k, at - start)
    # The first burst did not wait for refills.
    assert inner.times[4] - start < (1 / 40.0)
    await limited.close()
    assert inner.closed


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        Throttled(Recorder(), rate_per_s=0)
    with pytest.raises(ValueError):
        Throttled(Recorder(), rate_per_s=1, burst=0)


async def test_settings_put_a_bucket_in_front_of_each_provider(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        mail_transport="smtp",
        smtp_rate_per_s=14,
        smtp_rate_burst=3,
        sms_base_url="http://127.0.0.1:9/twilio",
        sms_rate_per_s=1,
    )
    db = Database(settings.resolved_database_url)
    try:
        email, sms_transport = make_transports(settings, db, SystemClock())
        assert isinstance(email, Throttled) and email.rate_per_s == 14 and email.burst == 3
        assert isinstance(sms_transport, Throttled) and sms_transport.rate_per_s == 1
        unlimited, _sms = make_transports(
            Settings(_env_file=None, data_dir=tmp_path), db, SystemClock()
        )
        assert not isinstance(unlimited, Throttled)
    finally:
        await db.dispose()
