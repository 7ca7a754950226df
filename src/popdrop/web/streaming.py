"""Streamed CSV downloads whose read session lives exactly as long as the stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.background import BackgroundTask

from popdrop.web.context import AppContext

NO_STORE = {"Cache-Control": "no-store"}


async def csv_download(
    ctx: AppContext,
    open_export: Callable[[AsyncSession], Awaitable[AsyncIterator[str]]],
    filename: str,
) -> StreamingResponse:
    """Stream an export. Its checks run before the response starts (a refusal is a proper
    4xx, not a cut-off file); the read session then lives as long as the stream, closed by
    the stream's end or, if the client went away first, by the response's background task."""
    stack = AsyncExitStack()
    session = await stack.enter_async_context(ctx.db.reader())
    try:
        chunks = await open_export(session)
    except BaseException:
        await stack.aclose()
        raise

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await stack.aclose()

    return StreamingResponse(
        body(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"', **NO_STORE},
        background=BackgroundTask(stack.aclose),
    )
