"""Chat flows REST API (thin): list an organization's published versions, read the YAML
new sessions use (or any version), and publish a new version.

Rules: `chat:read` to read, `chat:write` to publish; a publish is validated first (an
invalid flow is 422 `invalid_flow` with every error's line and field in `errors`, and
nothing is stored), accepts `Idempotency-Key`, and never changes a running conversation,
which keeps the version its session started on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.chat import flow_store
from popdrop.chat.models import FlowVersion
from popdrop.core.schemas import error_responses
from popdrop.web.auth import ApiPrincipal
from popdrop.web.idempotent import respond_once
from popdrop.web.params import Ctx, IdempotencyKey

router = APIRouter(prefix="/api/v1/chat", tags=["chat"])

YAML = "application/yaml; charset=utf-8"
Version = Annotated[int, Path(ge=1, le=2**31 - 1)]  # an INTEGER column
VERSION_HEADER = "Popdrop-Flow-Version"
FlowKey = Annotated[
    str,
    Query(
        pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$",
        description="The flow key; the default flow every channel runs is `popup_drop`",
    ),
]


class FlowPublish(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        min_length=1, max_length=flow_store.MAX_SOURCE, description="The flow file (YAML)"
    )
    key: str = Field(
        default=flow_store.DEFAULT_FLOW_KEY,
        pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$",
        description="Which flow this is a version of",
    )
    event_id: int | None = Field(
        default=None,
        ge=1,
        le=2**62,
        description="Bind to one event; omitted: each new session gets the next open event",
    )


class FlowVersionOut(BaseModel):
    key: str
    version: int
    title: str
    event_id: int | None
    created_at: datetime
    created_by: str


class FlowVersionsOut(BaseModel):
    key: str
    current: int | None = Field(description="The version new sessions start on (None: none yet)")
    shipped_default: bool = Field(
        description="Nothing published yet: new sessions start on the shipped flow"
    )
    versions: list[FlowVersionOut]


def version_out(row: FlowVersion) -> FlowVersionOut:
    return FlowVersionOut.model_validate(row, from_attributes=True)


def _yaml(version: int, source: str) -> Response:
    return Response(source, media_type=YAML, headers={VERSION_HEADER: str(version)})


_YAML_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/yaml": {"schema": {"type": "string"}}}},
    **error_responses(401, 403, 404, 422),
}


@router.get(
    "/flows",
    response_model=FlowVersionsOut,
    responses=error_responses(401, 403, 422),
    summary="The published versions of a chat flow, newest first",
)
async def list_flows(
    principal: ApiPrincipal, ctx: Ctx, key: FlowKey = flow_store.DEFAULT_FLOW_KEY
) -> FlowVersionsOut:
    principal.require("chat:read")
    async with ctx.db.reader() as session:
        rows = await flow_store.list_versions(session, principal.org_id, key)
    return FlowVersionsOut(
        key=key,
        current=rows[0].version if rows else None,
        shipped_default=not rows and key == flow_store.DEFAULT_FLOW_KEY,
        versions=[version_out(r) for r in rows],
    )


@router.get(
    "/flows/current",
    response_class=Response,
    responses=_YAML_ANSWER,
    summary="The YAML new sessions start on (version in the Popdrop-Flow-Version header; "
    "0 = the shipped flow, not published yet)",
)
async def current_flow(
    principal: ApiPrincipal, ctx: Ctx, key: FlowKey = flow_store.DEFAULT_FLOW_KEY
) -> Response:
    principal.require("chat:read")
    async with ctx.db.reader() as session:
        version, source = await flow_store.current_source(session, principal.org_id, key)
    return _yaml(version, source)


@router.get(
    "/flows/{version}",
    response_class=Response,
    responses=_YAML_ANSWER,
    summary="The YAML of one published version",
)
async def get_flow_version(
    version: Version, principal: ApiPrincipal, ctx: Ctx, key: FlowKey = flow_store.DEFAULT_FLOW_KEY
) -> Response:
    principal.require("chat:read")
    async with ctx.db.reader() as session:
        row = await flow_store.get_version(session, principal.org_id, key, version)
    return _yaml(row.version, row.source)


@router.post(
    "/flows",
    status_code=201,
    response_model=FlowVersionOut,
    responses=error_responses(401, 403, 404, 409, 422),
    summary="Publish a new version: validated first; running conversations keep theirs",
)
async def publish_flow(
    body: FlowPublish,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    now = ctx.clock.now()

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        row = await flow_store.publish_flow(
            session,
            principal.org_id,
            body.key,
            body.source,
            now=now,
            event_id=body.event_id,
            created_by=principal.actor,
        )
        return 201, version_out(row).model_dump(mode="json")

    return await respond_once(
        ctx, request, principal, idempotency_key, body, operation, scope="chat:write"
    )
