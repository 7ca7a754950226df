"""The one way a router answers a mutating call that accepts `Idempotency-Key`."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from popdrop.accounts.service import Principal
from popdrop.core.idempotency import Operation, fingerprint, run_once
from popdrop.web.context import AppContext


async def respond_once(
    ctx: AppContext,
    request: Request,
    principal: Principal,
    key: str | None,
    body: BaseModel,
    operation: Operation,
) -> JSONResponse:
    """Run `operation` at most once per key (same request, same answer) and send its answer."""
    status, payload = await run_once(
        ctx.db,
        ctx.clock,
        org_id=principal.org_id,
        key=key,
        request_fingerprint=fingerprint(
            request.method, request.url.path, body.model_dump(mode="json")
        ),
        operation=operation,
    )
    return JSONResponse(payload, status_code=status)
