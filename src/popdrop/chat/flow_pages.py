"""The chat flow page (`/chat/flows`): the YAML new sessions start on, the published
versions, and a form to check or publish a new version (typed, pasted or uploaded).

The rules of the other operator pages hold (`PageRoute`): a session and `chat:read` to
see, `chat:write` to publish; every POST carries the double-submit CSRF field; an invalid
flow is answered 422 with the page again, the text as sent and each error next to its
line (nothing is stored); never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select
from starlette.datastructures import FormData, UploadFile

from popdrop.accounts.service import Principal
from popdrop.chat import flow_store
from popdrop.chat.flow import FlowError, load_flow
from popdrop.core.errors import PopdropError
from popdrop.events.models import Event
from popdrop.web.auth import check_csrf
from popdrop.web.context import AppContext
from popdrop.web.pagekit import Operator, PageRoute
from popdrop.web.params import Ctx
from popdrop.web.security import NO_STORE
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False, route_class=PageRoute)

KEY = flow_store.DEFAULT_FLOW_KEY


@dataclass(frozen=True)
class SourceLine:
    number: int
    text: str
    errors: tuple[str, ...]


def annotate(source: str, errors: list[dict[str, Any]]) -> tuple[list[SourceLine], list[str]]:
    """The source as numbered lines, each with its errors; and the errors without a line."""
    by_line: dict[int, list[str]] = {}
    loose: list[str] = []
    for error in errors:
        text = f"{error['field']}: {error['message']}" if error.get("field") else error["message"]
        line = error.get("line")
        if isinstance(line, int) and line >= 1:
            by_line.setdefault(line, []).append(text)
        else:
            loose.append(text)
    lines = source.splitlines() or [""]
    last = max(by_line, default=0)
    lines += [""] * max(0, last - len(lines))  # an error past the end (e.g. a missing key)
    return [
        SourceLine(n, text, tuple(by_line.get(n, ()))) for n, text in enumerate(lines, 1)
    ], loose


async def _page(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    *,
    source: str | None = None,
    event_id: int | None = None,
    errors: list[dict[str, Any]] | None = None,
    checked: str | None = None,
    status: int = 200,
) -> Response:
    principal.require("chat:read")
    now = ctx.clock.now()
    async with ctx.db.reader() as session:
        versions = await flow_store.list_versions(session, principal.org_id, KEY)
        current, current_source = await flow_store.current_source(session, principal.org_id, KEY)
        offered = await flow_store.next_open_event_id(session, principal.org_id, now)
        loaded = request.query_params.get("from", "")
        if source is None and loaded.isdecimal() and len(loaded) <= 9:
            row = await flow_store.get_version(session, principal.org_id, KEY, int(loaded))
            source, event_id = row.source, row.event_id
        events = list(
            await session.scalars(
                select(Event)
                .where(Event.org_id == principal.org_id)
                .order_by(Event.starts_at.desc(), Event.id.desc())
                .limit(100)
            )
        )
    titles = {e.id: e.title for e in events}
    lines, loose = annotate(source or "", errors) if errors else ([], [])
    if not any(line.errors for line in lines):
        lines = []
    context = {
        "principal": principal,
        "key": KEY,
        "versions": versions,
        "current": current,
        "source": current_source if source is None else source,
        "event_id": event_id,
        "events": events,
        "titles": titles,
        "offered": titles.get(offered) if offered is not None else None,
        "errors": errors or [],
        "lines": lines,
        "loose": loose,
        "checked": checked,
        "can_write": "chat:write" in principal.scopes,
        "notice": request.query_params.get("published", "")[:9],
    }
    response = render(request, "chat/flows.html", context, status=status)
    response.headers.update(NO_STORE)
    return response


@router.get("/chat/flows")
async def flows(request: Request, principal: Operator, ctx: Ctx) -> Response:
    return await _page(request, ctx, principal)


async def _source_of(data: FormData) -> str:
    """The uploaded file when one is chosen, else the text box."""
    upload = data.get("file")
    if isinstance(upload, UploadFile) and upload.filename:
        raw = await upload.read(flow_store.MAX_SOURCE * 4 + 1)
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise PopdropError("invalid_request", "file: not UTF-8 text") from None
    return str(data.get("source", ""))


def _event_of(data: FormData) -> int | None:
    raw = str(data.get("event_id", ""))
    if not raw:
        return None
    if not raw.isdecimal() or len(raw) > 18:
        raise PopdropError("invalid_request", "event: choose one")
    return int(raw)


@router.post("/chat/flows")
async def publish(request: Request, principal: Operator, ctx: Ctx) -> Response:
    data = await request.form()
    check_csrf(request, ctx, data)
    principal.require("chat:write")
    source = ""
    event_id = None
    errors: list[dict[str, Any]] = []
    status = 422
    try:
        source = (await _source_of(data)).replace("\r\n", "\n")
        event_id = _event_of(data)
        if data.get("action") == "check":
            flow = load_flow(source)
            checked = f"{flow.title or 'The flow'} is valid: {len(flow.nodes)} nodes."
            return await _page(
                request, ctx, principal, source=source, event_id=event_id, checked=checked
            )
        async with ctx.db.transaction() as session:
            row = await flow_store.publish_flow(
                session,
                principal.org_id,
                KEY,
                source,
                now=ctx.clock.now(),
                event_id=event_id,
                created_by=principal.actor,
            )
            version = row.version
    except FlowError as error:
        errors = error.errors
    except PopdropError as error:
        if error.reason not in ("invalid_request", "not_found", "conflict"):
            raise
        errors = [{"line": None, "field": "", "message": error.message}]
        status = 409 if error.reason == "conflict" else 422
    if errors:
        return await _page(
            request, ctx, principal, source=source, event_id=event_id, errors=errors, status=status
        )
    return RedirectResponse(f"/chat/flows?published={version}", status_code=303)
