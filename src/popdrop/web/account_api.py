"""Who am I, and API token management (owners)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field

from popdrop.accounts import service
from popdrop.core.errors import PopdropError
from popdrop.core.schemas import StrictInput, error_responses
from popdrop.web.auth import ApiPrincipal
from popdrop.web.params import Ctx

router = APIRouter(prefix="/api/v1", tags=["accounts"])


class Me(BaseModel):
    org_id: int
    actor: str
    role: str = Field(description="`token` for an API token, `partner` for a partner's one")
    acts_for: str | None = Field(default=None, description="A partner token's partner login")
    scopes: list[str]


class TokenCreate(StrictInput):
    name: str = Field(min_length=1, max_length=200)
    scopes: list[str] = Field(min_length=1, max_length=20)
    acts_for: str | None = Field(
        default=None,
        min_length=3,
        max_length=254,
        pattern=r"^[^@\s]+@[^@\s]+$",
        description="A partner's token: the partner's login email. The token then sees "
        "only that partner's orders, POS sales, codes and links, whatever its scopes.",
    )


class TokenOut(BaseModel):
    id: int
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="Shown once; only a keyed hash is stored.")


@router.get("/me", response_model=Me, responses=error_responses(401))
async def me(principal: ApiPrincipal) -> Me:
    return Me(
        org_id=principal.org_id,
        actor=principal.actor,
        role=principal.role,
        acts_for=principal.acts_for,
        scopes=sorted(principal.scopes),
    )


@router.get("/tokens", response_model=list[TokenOut], responses=error_responses(401, 403))
async def list_tokens(principal: ApiPrincipal, ctx: Ctx) -> list[TokenOut]:
    principal.require("tokens:write")
    async with ctx.db.reader() as session:
        rows = await service.list_tokens(session, principal.org_id)
    return [
        TokenOut(
            id=t.id,
            name=t.name,
            prefix=t.prefix,
            scopes=t.scopes.split(),
            created_at=t.created_at,
            revoked_at=t.revoked_at,
        )
        for t in rows
    ]


@router.post(
    "/tokens",
    status_code=201,
    response_model=TokenCreated,
    responses=error_responses(401, 403, 422),
)
async def create_token(body: TokenCreate, principal: ApiPrincipal, ctx: Ctx) -> TokenCreated:
    principal.require("tokens:write")
    scopes = service.parse_scopes(body.scopes)
    if not scopes <= principal.scopes:
        raise PopdropError("forbidden", "a token cannot get scopes its creator lacks")
    async with ctx.db.transaction() as session:
        token, plaintext = await service.create_token(
            session,
            ctx.signer,
            org_id=principal.org_id,
            name=body.name,
            scopes=scopes,
            created_by=principal.actor,
            now=ctx.clock.now(),
            acts_for=body.acts_for,
        )
    return TokenCreated(
        id=token.id,
        name=token.name,
        prefix=token.prefix,
        scopes=sorted(scopes),
        created_at=token.created_at,
        revoked_at=None,
        token=plaintext,
    )


@router.delete("/tokens/{token_id}", status_code=204, responses=error_responses(401, 403, 404))
async def revoke_token(token_id: int, principal: ApiPrincipal, ctx: Ctx) -> None:
    principal.require("tokens:write")
    if not 1 <= token_id <= 2**62:
        raise PopdropError("not_found", "token not found")
    async with ctx.db.transaction() as session:
        await service.revoke_token(
            session, org_id=principal.org_id, token_id=token_id, now=ctx.clock.now()
        )
