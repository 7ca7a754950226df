"""An org's audience settings and the recency buckets (active, lapsing, dormant…) they
define.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    and_,
)
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.audience.models import (
    AudienceSettings,
    Contact,
)
from popdrop.audience.schemas import (
    AudienceSettingsIn,
    AudienceSettingsOut,
    Bucket,
)
from popdrop.core.errors import PopdropError

# ---------------------------------------------------------------- settings


async def get_settings(session: AsyncSession, org_id: int) -> AudienceSettingsOut:
    row = await session.get(AudienceSettings, org_id)
    if row is None:
        return AudienceSettingsOut(hot_days=7, warm_days=60, help_text="", retention_months=None)
    return AudienceSettingsOut(
        hot_days=row.hot_days,
        warm_days=row.warm_days,
        help_text=row.help_text,
        retention_months=row.retention_months,
    )


async def update_settings(
    session: AsyncSession, principal: Principal, spec: AudienceSettingsIn
) -> AudienceSettingsOut:
    principal.require("audience:write")
    if spec.warm_days <= spec.hot_days:
        raise PopdropError("invalid_request", "warm_days: must be more than hot_days")
    row = await session.get(AudienceSettings, principal.org_id)
    if row is None:
        row = AudienceSettings(org_id=principal.org_id)
        session.add(row)
    row.hot_days = spec.hot_days
    row.warm_days = spec.warm_days
    row.help_text = spec.help_text
    row.retention_months = spec.retention_months
    await session.flush()
    return await get_settings(session, principal.org_id)


# ---------------------------------------------------------------- recency


def bucket_of(
    last_engaged_at: datetime | None, now: datetime, hot_days: int, warm_days: int
) -> Bucket:
    """hot: engaged within `hot_days` (the boundary itself is hot); warm: within `warm_days`
    (boundary warm); cold: longer ago; never: no activity recorded."""
    if last_engaged_at is None:
        return "never"
    age = now - last_engaged_at
    if age <= timedelta(days=hot_days):
        return "hot"
    if age <= timedelta(days=warm_days):
        return "warm"
    return "cold"


def bucket_condition(
    bucket: Bucket, now: datetime, hot_days: int, warm_days: int
) -> ColumnElement[bool]:
    """The same buckets as `bucket_of`, as a SQL condition on `contacts.last_engaged_at`."""
    column = Contact.last_engaged_at
    hot_from = now - timedelta(days=hot_days)
    warm_from = now - timedelta(days=warm_days)
    if bucket == "never":
        return column.is_(None)
    if bucket == "hot":
        return column >= hot_from
    if bucket == "warm":
        return and_(column >= warm_from, column < hot_from)
    return column < warm_from
