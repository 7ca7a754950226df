"""The Day+1 survey's pages and API (thin: parse, call `usecases.surveys`, shape).

Public (the signed link is the key; never cached or indexed):
  GET  /q/{token}    the answer page: 0-10 as a plain form (no JavaScript needed), an
                     optional comment; then a thank-you, or "already answered" later.
                     A bad or foreign link is a 404 page.
  POST /q/{token}    the form (double-submit CSRF): 303 back to the page, or the page
                     again with what is wrong (422), or "already answered" (409).
  POST /api/v1/surveys/answers/{token}   the same answer as JSON; 409 `already_answered`.
Operator:
  GET  /insights/events/{event_id}/nps            NPS with n and its 95 % interval, the
                                                  0-10 bars, comments (`metrics:read`),
                                                  and the "schedule survey now" button
  POST /insights/events/{event_id}/nps/schedule   that button (`drops:write`)
  GET  /api/v1/surveys/events/{event_id}          the same figures as JSON (`metrics:read`)
  POST /api/v1/surveys/events/{event_id}/schedule invite the visitors (`drops:write`;
                                                  `Idempotency-Key` accepted)
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.models import Organization
from popdrop.core.errors import PopdropError
from popdrop.core.schemas import error_responses
from popdrop.core.tenancy import owned
from popdrop.events.models import Event
from popdrop.metrics.survey_models import COMMENT_MAX, SCORE_MAX, SurveyStatus
from popdrop.usecases import surveys
from popdrop.web.auth import ApiPrincipal, check_csrf
from popdrop.web.context import AppContext
from popdrop.web.idempotent import respond_once
from popdrop.web.pagekit import Operator, PageRoute
from popdrop.web.params import Ctx, IdempotencyKey, ItemId
from popdrop.web.security import NO_STORE
from popdrop.web.templating import render

_pages = APIRouter(include_in_schema=False, route_class=PageRoute)
_public_pages = APIRouter(include_in_schema=False, route_class=PageRoute)
_api = APIRouter(prefix="/api/v1/surveys", tags=["surveys"])
PUBLIC_HEADERS = {**NO_STORE, "X-Robots-Tag": "noindex"}
SCORES = list(range(SCORE_MAX + 1))


# ---------------------------------------------------------------- the public page


async def _invitation_view(ctx: AppContext, token: str) -> dict[str, Any]:
    async with ctx.db.reader() as session:
        invitation = await surveys.invitation_of_token(session, ctx.signer, token)
        title = await session.scalar(select(Event.title).where(Event.id == invitation.event_id))
        org = await session.scalar(
            select(Organization.name).where(Organization.id == invitation.org_id)
        )
    return {"invitation": invitation, "event_title": title or "", "org": org or ""}


def _public(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    response = render(request, name, context, status=status)
    response.headers.update(PUBLIC_HEADERS)
    return response


def _missing(request: Request, error: PopdropError) -> Response:
    return _public(request, "surveys/missing.html", {"error": error}, status=404)


async def _answer_page(
    request: Request,
    ctx: AppContext,
    token: str,
    *,
    state: str | None = None,
    problem: str | None = None,
    chosen: str = "",
    comment: str = "",
    status: int = 200,
) -> Response:
    try:
        view = await _invitation_view(ctx, token)
    except PopdropError as error:
        return _missing(request, error)
    invitation = view["invitation"]
    if state is None:
        answered = invitation.status == SurveyStatus.ANSWERED
        done = request.query_params.get("done") == "1"
        state = ("thanks" if done else "already") if answered else "ask"
    context = {
        **view,
        "token": token,
        "state": state,
        "scores": SCORES,
        "problem": problem,
        "chosen": chosen,
        "comment": comment,
        "comment_max": COMMENT_MAX,
    }
    return _public(request, "surveys/answer.html", context, status=status)


@_public_pages.get("/q/{token}")
async def survey_page(request: Request, token: str, ctx: Ctx) -> Response:
    return await _answer_page(request, ctx, token)


@_public_pages.post("/q/{token}")
async def survey_answer(request: Request, token: str, ctx: Ctx) -> Response:
    data = await request.form()
    raw_score, comment = str(data.get("score") or ""), str(data.get("comment") or "")
    again = {"chosen": raw_score, "comment": comment[: COMMENT_MAX * 2]}
    try:
        check_csrf(request, ctx, data)
    except PopdropError as error:
        return await _answer_page(request, ctx, token, problem=error.message, status=403, **again)
    score = int(raw_score) if raw_score.isdigit() and len(raw_score) <= 2 else None
    if score is None or score > SCORE_MAX:
        problem = f"Pick a score from 0 to {SCORE_MAX}."
        return await _answer_page(request, ctx, token, problem=problem, status=422, **again)
    try:
        async with ctx.db.transaction() as session:
            invitation = await surveys.invitation_of_token(session, ctx.signer, token)
            await surveys.answer(
                session,
                invitation.id,
                score,
                comment,
                org_id=invitation.org_id,
                now=ctx.clock.now(),
            )
    except PopdropError as error:
        if error.reason == surveys.ALREADY_ANSWERED:
            return await _answer_page(request, ctx, token, state="already", status=409)
        if error.reason == "not_found":
            return _missing(request, error)
        return await _answer_page(
            request, ctx, token, problem=error.message, status=error.status, **again
        )
    return RedirectResponse(f"/q/{token}?done=1", status_code=303, headers=PUBLIC_HEADERS)


@_api.post(
    "/answers/{token}",
    response_model=surveys.AnswerOut,
    responses=error_responses(404, 409, 422),
    summary="Answer a Day+1 survey (no token: the survey link is the key); once only",
    description="A second answer is `409 already_answered`; a bad link is `404 not_found`.",
)
async def answer_api(token: str, body: surveys.AnswerIn, ctx: Ctx) -> surveys.AnswerOut:
    async with ctx.db.transaction() as session:
        invitation = await surveys.invitation_of_token(session, ctx.signer, token)
        return await surveys.answer(
            session,
            invitation.id,
            body.score,
            body.comment,
            org_id=invitation.org_id,
            now=ctx.clock.now(),
        )


# ---------------------------------------------------------------- the host's page


@_pages.get("/insights/events/{event_id}/nps")
async def nps_page(request: Request, event_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    async with ctx.db.reader() as session:
        summary = await surveys.summary(session, principal, event_id)
        event = await owned(session, Event, event_id, principal.org_id, what="event")
    peak = max(summary.distribution) or 1
    notice = {k: request.query_params.get(k, "") for k in ("scheduled", "already", "no_channel")}
    context = {
        "principal": principal,
        "event": event,
        "summary": summary,
        "bars": [(score, n, round(100 * n / peak)) for score, n in enumerate(summary.distribution)],
        "notice": notice if notice["scheduled"].isdigit() else None,
        "can_schedule": surveys.SCHEDULE_SCOPE in principal.scopes,
    }
    response = render(request, "surveys/nps.html", context)
    response.headers.update(NO_STORE)
    return response


@_pages.post("/insights/events/{event_id}/nps/schedule")
async def nps_schedule(
    request: Request, event_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    check_csrf(request, ctx, await request.form())
    async with ctx.db.transaction() as session:
        result = await surveys.schedule_for_event(
            session, ctx.signer, principal, event_id, now=ctx.clock.now()
        )
    query = f"scheduled={result.scheduled}&already={result.already}&no_channel={result.no_channel}"
    return RedirectResponse(f"/insights/events/{event_id}/nps?{query}", status_code=303)


# ---------------------------------------------------------------- the operator API


@_api.get(
    "/events/{event_id}",
    response_model=surveys.SurveySummary,
    responses=error_responses(401, 403, 404, 422),
    summary="An event's NPS (with n and its 95 % interval), 0-10 distribution and comments",
)
async def survey_summary(
    event_id: ItemId, principal: ApiPrincipal, ctx: Ctx
) -> surveys.SurveySummary:
    async with ctx.db.reader() as session:
        return await surveys.summary(session, principal, event_id)


@_api.post(
    "/events/{event_id}/schedule",
    response_model=surveys.ScheduleResult,
    responses=error_responses(401, 403, 404, 409, 422),
    summary="Invite the event's visitors to the Day+1 survey (once per person)",
    description=(
        "Every visitor who is a contact with a channel they consented to gets one "
        "invitation, due the day after the event's end at `hour` (event's time zone). "
        "Calling again only adds visitors not invited yet."
    ),
)
async def schedule_api(
    event_id: ItemId,
    request: Request,
    principal: ApiPrincipal,
    ctx: Ctx,
    body: surveys.ScheduleIn | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    spec = body or surveys.ScheduleIn()

    async def operation(session: AsyncSession) -> tuple[int, dict[str, Any]]:
        result = await surveys.schedule_for_event(
            session, ctx.signer, principal, event_id, now=ctx.clock.now(), hour=spec.hour
        )
        return 200, result.model_dump(mode="json")

    return await respond_once(
        ctx, request, principal, idempotency_key, spec, operation, scope=surveys.SCHEDULE_SCOPE
    )


router = APIRouter()
router.include_router(_pages)
router.include_router(_api)
public_router = APIRouter()
public_router.include_router(_public_pages)
