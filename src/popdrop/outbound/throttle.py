"""A provider's rate limit in front of its transport.

Providers cap how fast they take messages (an SMTP relay's messages per second, a Twilio
number's 1 SMS/s on a long code, 100/s on a short code); going over them earns 4xx/429
replies and, worse, a reputation hit. `Throttled` wraps any transport in a token bucket:
`burst` messages may go at once, then `rate_per_s` on average. The bucket is aiolimiter's
(a leaky bucket, the same thing seen from the other side) and lives in the process: with
several `popdrop worker` processes, give each its share of the provider's limit.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from aiolimiter import AsyncLimiter

from popdrop.outbound.transports import SendResult

M = TypeVar("M", contravariant=True)


class _Transport(Protocol[M]):
    async def send(self, message: M) -> SendResult: ...

    async def close(self) -> None: ...


class Throttled(Generic[M]):
    def __init__(self, inner: _Transport[M], rate_per_s: float, burst: int = 1) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be positive and burst at least 1")
        self.inner = inner
        self.rate_per_s = rate_per_s
        self.burst = burst
        # `burst` tokens, refilled one every 1/rate seconds.
        self._bucket = AsyncLimiter(burst, burst / rate_per_s)

    async def send(self, message: M) -> SendResult:
        async with self._bucket:
            return await self.inner.send(message)

    async def close(self) -> None:
        await self.inner.close()
