"""Seeding for attribution tests: links and codes through the API, rows read back raw."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import func, select

from popdrop.attribution.clicks import recorder_for
from popdrop.attribution.models import ShortLink, ShortLinkClick
from popdrop.web.context import AppContext
from tests.conftest import Tenant

IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
DESKTOP = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0 Safari/537.36"
)


async def make_link(
    client: httpx.AsyncClient, tenant: Tenant, target: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/links", json={"target": target, **fields}, headers=tenant.headers
    )
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


async def visit(
    client: httpx.AsyncClient, slug: str, *, agent: str = IPHONE, **headers: str
) -> httpx.Response:
    return await client.get(
        f"/s/{slug}", headers={"User-Agent": agent, **headers}, follow_redirects=False
    )


async def flushed(ctx: AppContext) -> None:
    await recorder_for(ctx.db).flush()


async def link_row(ctx: AppContext, link_id: int) -> ShortLink:
    async with ctx.db.reader() as session:
        link = await session.get(ShortLink, link_id)
        assert link is not None
        return link


async def click_rows(ctx: AppContext, link_id: int) -> list[ShortLinkClick]:
    async with ctx.db.reader() as session:
        rows = await session.scalars(
            select(ShortLinkClick).where(ShortLinkClick.link_id == link_id)
        )
        return list(rows)


async def click_count(ctx: AppContext, link_id: int) -> int:
    async with ctx.db.reader() as session:
        count = await session.scalar(select(func.count()).where(ShortLinkClick.link_id == link_id))
        return int(count or 0)
