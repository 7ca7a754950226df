"""The one way a router answers a mutating call that accepts `Idempotency-Key`.

Rules: the caller's scope is checked before anything about the key is looked at, so a
caller without the permission is refused even when the key has a stored answer; the key is
bound to the calling principal and to the route (method, path, body), which
`core.idempotency.run_once` enforces. Handlers never build a fingerprint of their own.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from popdrop.accounts.service import Principal, principal_id
from popdrop.core.idempotency import Answer, Operation, fingerprint, run_once
from popdrop.web.context import AppContext


async def answer_once(
    ctx: AppContext,
    request: Request,
    principal: Principal,
    key: str | None,
    body: BaseModel,
    operation: Operation,
    *,
    scope: str,
) -> Answer:
    """Check `scope`, then run `operation` at most once per key; its (status, payload).

    For handlers that shape the answer further (e.g. add what is shown only once).
    """
    principal.require(scope)
    return await run_once(
        ctx.db,
        ctx.clock,
        org_id=principal.org_id,
        key=key,
        principal=principal_id(principal),
        request_fingerprint=fingerprint(
            request.method, request.url.path, body.model_dump(mode="json")
        ),
        operation=operation,
    )


async def respond_once(
    ctx: AppContext,
    request: Request,
    principal: Principal,
    key: str | None,
    body: BaseModel,
    operation: Operation,
    *,
    scope: str,
) -> JSONResponse:
    """Check `scope`, run `operation` at most once per key (same caller, same request,
    same answer) and send its answer."""
    status, payload = await answer_once(ctx, request, principal, key, body, operation, scope=scope)
    return JSONResponse(payload, status_code=status)
