"""The life of a stock hold, as data.

    active ──release──▶ released
      ├─────convert───▶ converted
      └─────expiry────▶ expired

Rules:
- An `active` hold counts in its stock's `held` (and its pickup window's `taken`) until
  it ends; every other status is final. An active hold past `expires_at` is treated as
  ended before the sweep writes `expired`.

Pure: no I/O; pages and tests import it.
"""

from __future__ import annotations

from enum import StrEnum

from popdrop.core.lifecycle import Lifecycle


class HoldStatus(StrEnum):
    ACTIVE = "active"
    RELEASED = "released"
    CONVERTED = "converted"
    EXPIRED = "expired"


HOLD_LIFECYCLE: Lifecycle[HoldStatus] = Lifecycle(
    "hold",
    HoldStatus,
    {
        HoldStatus.ACTIVE: frozenset(
            {HoldStatus.RELEASED, HoldStatus.CONVERTED, HoldStatus.EXPIRED}
        ),
        HoldStatus.RELEASED: frozenset(),
        HoldStatus.CONVERTED: frozenset(),
        HoldStatus.EXPIRED: frozenset(),
    },
)
