"""Drop pages: the operator's drop list and drop detail (`/drops`, with the war-room chart,
the seed-test report, the A/B result and the start / pause / resume / cancel / seed-test
buttons), and the development mailbox (`/mailbox`).

Handlers stay thin: read the form, call `drops.service` / `outcomes`, render. The
rules of the other operator pages hold (`PageRoute`):
- every page needs a session and `drops:read` (`drops:write` to act), and shows only the
  operator's own organization: another organization's drop or message is a 404;
- every POST carries the double-submit CSRF field and calls `check_csrf` first;
- a refusal of the service (a `PopdropError` with its `reason`) is shown on the drop's
  page with its 4xx status, never a 500.

The mailbox shows what the development transport stored. A message's HTML is shown in a
sandboxed `<iframe srcdoc>` (no scripts, no same-origin access); its links are the real
tracked links, so clicking one records the click and redirects, as in a mail client.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from markupsafe import Markup, escape
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.audience.models import Segment
from popdrop.core.db import after_commit
from popdrop.core.errors import PopdropError
from popdrop.core.tenancy import owned
from popdrop.drops import abtest, content, outcomes, service
from popdrop.drops.lifecycle import DropStatus, operator_actions
from popdrop.drops.models import Drop, DropVariant
from popdrop.drops.outcomes import DropCounts
from popdrop.drops.render import RenderedSms
from popdrop.drops.schemas import ChannelContent, WarRoom
from popdrop.events.models import Event
from popdrop.outbound.models import MailboxMessage
from popdrop.web.auth import check_csrf
from popdrop.web.context import AppContext
from popdrop.web.pagekit import Operator, PageRoute
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE
from popdrop.web.templating import render, templates

router = APIRouter(include_in_schema=False, route_class=PageRoute)

MAILBOX_PAGE = 50
STATUS_BADGE = {
    "draft": "",
    "scheduled": "warn",
    "sending": "good",
    "paused": "warn",
    "done": "good",
    "cancelled": "bad",
}
_NOTICES: dict[str, tuple[str, str]] = {
    "started": ("good", "Started: the recipients are frozen and the messages are going out."),
    "scheduled": ("good", "Scheduled: the drop starts by itself at its time."),
    "paused": ("warn", "Paused: no new message goes out until you resume."),
    "resumed": ("good", "Resumed."),
    "cancelled": ("bad", "Cancelled: every message not yet sent is skipped."),
    "seed-passed": ("good", "Seed test passed: every link resolves and every seed code is valid."),
    "seed-failed": ("bad", "Seed test failed: see the report below; the drop cannot start."),
}
_MESSAGE_DROP = re.compile(r"^<drop-(\d+)\.(seed|contact)-")
_TEXT_URL = re.compile(r"https?://[^\s<>\"']+")
_HEAD = re.compile(r"<head(\s[^>]*)?>", re.IGNORECASE)


def linkify(text: str) -> Markup:
    """Plain text with its http(s) URLs as links that open in a new tab (escaped)."""
    out: list[str] = []
    pos = 0
    for match in _TEXT_URL.finditer(text):
        url = match.group(0)
        out.append(str(escape(text[pos : match.start()])))
        out.append(f'<a href="{escape(url)}" target="_blank" rel="noopener">{escape(url)}</a>')
        pos = match.end()
    out.append(str(escape(text[pos:])))
    return Markup("".join(out))  # noqa: S704 (every piece is escaped above)


def in_new_tab(html: str) -> str:
    """The email's HTML with `<base target="_blank">`, so a click in the sandboxed frame
    opens the (tracked) link in a new tab instead of inside the frame."""
    base = '<base target="_blank">'
    match = _HEAD.search(html)
    if match is None:
        return base + html
    return html[: match.end()] + base + html[match.end() :]


def ratio(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f} %"


templates.env.filters["linkify"] = linkify
templates.env.filters["ratio"] = ratio


# ---------------------------------------------------------------- the drop list


@dataclass
class DropRow:
    drop: Drop
    counts: DropCounts


@router.get("/drops")
async def drop_list(request: Request, principal: Operator, ctx: Ctx) -> Response:
    async with ctx.db.reader() as session:
        drops = await service.list_drops(session, principal)
        counts = await outcomes.drop_counts(session, principal, [d.id for d in drops])
    context = {
        "principal": principal,
        "rows": [DropRow(d, counts[d.id]) for d in drops],
        "badge": STATUS_BADGE,
        "live": any(d.status in ("sending", "scheduled") for d in drops),
    }
    return render(request, "drops/drops.html", context)


# ---------------------------------------------------------------- the war-room chart

SERIES: tuple[tuple[str, str, str], ...] = (
    ("sent", "Sent", "#5b3df5"),
    ("delivered", "Delivered", "#176c3a"),
    ("bounced", "Bounced", "#b42318"),
    ("clicked", "Clicked", "#d97706"),
)
BAR_SERIES = SERIES[:3]  # bars; clicks are the line over them
CHART_W, CHART_H = 720.0, 240.0
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 44.0, 12.0, 12.0, 30.0
MIN_SPAN_MINUTES = 10


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    color: str


@dataclass
class MinuteView:
    label: str  # HH:MM in the chart's zone
    values: dict[str, int]
    x: float  # left edge of the minute's slot
    width: float
    bars: list[Bar] = field(default_factory=list)

    @property
    def title(self) -> str:
        parts = ", ".join(f"{self.values[key]} {key}" for key, _l, _c in SERIES)
        return f"{self.label}: {parts}, {self.values['failed']} failed"

    @property
    def busy(self) -> bool:
        return any(self.values.values())


@dataclass
class Chart:
    width: float
    height: float
    left: float
    top: float
    right: float
    bottom: float
    zone: str
    minutes: list[MinuteView]
    click_points: str  # the clicks line, SVG polyline points
    y_ticks: list[tuple[float, str]]
    x_ticks: list[tuple[float, str]]
    totals: dict[str, int]
    series: tuple[tuple[str, str, str], ...] = SERIES

    @property
    def empty(self) -> bool:
        return not any(m.busy for m in self.minutes)


def _nice_step(top: int, ticks: int = 4) -> int:
    raw = max(1.0, top / ticks)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * power >= raw:
            return int(factor * power)
    return int(10 * power)  # pragma: no cover


def build_chart(room: WarRoom, *, now: datetime, zone: str, live: bool) -> Chart | None:
    """Per-minute bars (sent, delivered, bounced) and a clicks line, rendered server-side
    as SVG: minutes from the start to the last busy one (to now while sending), two
    hours at most."""
    if room.started_at is None:
        return None
    try:
        tz = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        tz, zone = ZoneInfo("UTC"), "UTC"
    first = room.started_at.replace(second=0, microsecond=0)
    by_minute = {m.minute: m for m in room.minutes}
    last = max(by_minute, default=first)
    if live:
        last = max(last, now.replace(second=0, microsecond=0))
    span = int((last - first).total_seconds() // 60) + 1
    span = min(max(span, MIN_SPAN_MINUTES), outcomes.WAR_ROOM_MINUTES)
    left, top = PAD_LEFT, PAD_TOP
    right, bottom = CHART_W - PAD_RIGHT, CHART_H - PAD_BOTTOM
    slot = (right - left) / span
    keys = ("sent", "delivered", "bounced", "failed", "clicked")
    values: list[dict[str, int]] = []
    for index in range(span):
        stats = by_minute.get(first + timedelta(minutes=index))
        values.append({k: int(getattr(stats, k)) if stats else 0 for k in keys})
    peak = max([1, *(v[k] for v in values for k, _l, _c in SERIES)])
    step = _nice_step(peak)
    scale_top = step * math.ceil(peak / step)

    def y_of(n: int) -> float:
        return bottom - (bottom - top) * n / scale_top

    minutes: list[MinuteView] = []
    points: list[str] = []
    bar_w = slot * 0.8 / len(BAR_SERIES)
    for index, counted in enumerate(values):
        x = left + index * slot
        at = (first + timedelta(minutes=index)).astimezone(tz)
        view = MinuteView(label=f"{at:%H:%M}", values=counted, x=x, width=slot)
        for number, (key, _label, colour) in enumerate(BAR_SERIES):
            if counted[key]:
                y = y_of(counted[key])
                bar_x = x + slot * 0.1 + number * bar_w
                view.bars.append(Bar(bar_x, y, bar_w, bottom - y, colour))
        minutes.append(view)
        points.append(f"{x + slot / 2:.1f},{y_of(counted['clicked']):.1f}")
    y_ticks = [(y_of(n), str(n)) for n in range(0, scale_top + 1, step)]
    every = next((k for k in (1, 2, 5, 10, 15, 30) if span / k <= 8), 30)
    x_ticks = [(m.x + slot / 2, m.label) for i, m in enumerate(minutes) if i % every == 0]
    return Chart(
        width=CHART_W,
        height=CHART_H,
        left=left,
        top=top,
        right=right,
        bottom=bottom,
        zone=zone,
        minutes=minutes,
        click_points=" ".join(points),
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        totals=room.totals,
    )


# ---------------------------------------------------------------- the drop page


@dataclass
class VariantView:
    name: str
    split_percent: int
    email: list[tuple[str, list[str]]]  # (subject, the buckets that get it)
    sms: list[tuple[str, list[str]]]  # (body, the buckets that get it)
    sent: int
    clicked: int
    probability_to_beat: float | None = None
    # body → "2 segments · GSM-7", counted on the SMS as sent (short links in place)
    sms_segments: dict[str, str] = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        return self.clicked / self.sent if self.sent else None


@dataclass
class AbView:
    metric: str
    test_fraction: float
    min_sample: int
    decide_at: datetime | None
    decide_after_minutes: float
    fallback: str
    variants: list[VariantView]
    result: dict[str, Any] | None  # the stored decision (`ab_result`)


def _grouped(parts: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """(bucket, text) pairs grouped by text: a subject shared by every bucket shows once."""
    grouped: dict[str, list[str]] = {}
    for bucket, text in parts:
        grouped.setdefault(text, []).append(bucket)
    return list(grouped.items())


def _segments_label(sms: Callable[[str], RenderedSms], body: str) -> str:
    try:
        rendered = sms(body)
    except PopdropError:
        return "segments: see the preview"  # it needs a contact's own values
    plural = "" if rendered.segments == 1 else "s"
    return f"{rendered.segments} segment{plural} · {rendered.encoding}"


def _variant_views(
    variants: list[DropVariant],
    counted: dict[str, abtest.VariantOutcome],
    sms: Callable[[str], RenderedSms],
) -> list[VariantView]:
    views: list[VariantView] = []
    for variant in variants:
        stored = ChannelContent.model_validate_json(variant.content)
        outcome = counted.get(variant.name, abtest.VariantOutcome(variant.name, 0, 0))
        views.append(
            VariantView(
                name=variant.name,
                split_percent=variant.split_percent,
                email=_grouped([(b, part.subject) for b, part in stored.email.items()]),
                sms=_grouped([(b, part.body) for b, part in stored.sms.items()]),
                sent=outcome.sent,
                clicked=outcome.converted,
                sms_segments={p.body: _segments_label(sms, p.body) for p in stored.sms.values()},
            )
        )
    return views


def _ab_view(
    drop: Drop,
    variants: list[DropVariant],
    counted: dict[str, abtest.VariantOutcome],
    sms: Callable[[str], RenderedSms],
) -> AbView:
    result: dict[str, Any] | None = json.loads(drop.ab_result) if drop.ab_result else None
    if result is not None and result.get("outcomes"):  # the figures the decision used
        counted = {
            str(o["variant"]): abtest.VariantOutcome(
                str(o["variant"]), int(o["sent"]), int(o["converted"])
            )
            for o in result["outcomes"]
        }
    views = _variant_views(variants, counted, sms)
    if len(views) > 1:
        control = abtest.VariantOutcome(views[0].name, views[0].sent, views[0].clicked)
        for view in views[1:]:
            challenger = abtest.VariantOutcome(view.name, view.sent, view.clicked)
            view.probability_to_beat = abtest.probability_to_beat(control, challenger)
    decide_at = (
        drop.started_at + timedelta(seconds=drop.ab_decide_after_seconds)
        if drop.started_at
        else None
    )
    return AbView(
        metric="click rate" if drop.ab_metric == "click" else "RSVP rate",
        test_fraction=drop.ab_test_fraction,
        min_sample=drop.ab_min_sample,
        decide_at=decide_at,
        decide_after_minutes=drop.ab_decide_after_seconds / 60,
        fallback=drop.ab_fallback,
        variants=views,
        result=result,
    )


async def _names(session: AsyncSession, drop: Drop) -> tuple[str | None, Event | None]:
    segment = (
        await session.scalar(
            select(Segment.name).where(Segment.id == drop.segment_id, Segment.org_id == drop.org_id)
        )
        if drop.segment_id
        else None
    )
    event = (
        await session.scalar(
            select(Event).where(Event.id == drop.event_id, Event.org_id == drop.org_id)
        )
        if drop.event_id
        else None
    )
    return segment, event


async def _drop_page(
    request: Request,
    ctx: AppContext,
    principal: Principal,
    drop_id: int,
    *,
    error: PopdropError | None = None,
) -> Response:
    now = ctx.clock.now()
    async with ctx.db.reader() as session:
        drop = await service.get_drop(session, principal, drop_id)
        counts = (await outcomes.drop_counts(session, principal, [drop.id]))[drop.id]
        variants = await service.variants_of(session, drop.id)
        counted = await outcomes.variant_counts(session, principal, drop.id)
        room = await outcomes.war_room(session, principal, drop.id)
        segment, event = await _names(session, drop)
    report: list[dict[str, Any]] = json.loads(drop.seed_report or "[]")
    live = drop.status in ("sending", "scheduled")
    zone = event.timezone if event else "UTC"  # times show in the event's zone
    context = {
        "principal": principal,
        "drop": drop,
        "badge": STATUS_BADGE,
        "counts": counts,
        "segment": segment,
        "event": event,
        "seeds": json.loads(drop.seed_list or "[]"),
        "seed_tests": [e for e in report if "seed" in e],
        "overrides": [e for e in report if "override" in e],
        "ab": _ab_view(
            drop,
            variants,
            counted,
            partial(
                content.preview_sms,
                ctx.signer,
                ctx.settings.base_url,
                ctx.settings.short_links_base,
                drop,
                event,
            ),
        ),
        "zone": zone,
        "chart": build_chart(room, now=now, zone=zone, live=drop.status == "sending"),
        # The buttons come from the action table: a button shows only where its move may go.
        "actions": operator_actions(DropStatus(drop.status)),
        "can_write": "drops:write" in principal.scopes,
        "live": live,
        "error": error,
        "notice": _NOTICES.get(request.query_params.get("done", "")),
    }
    response = render(request, "drops/drop.html", context, status=error.status if error else 200)
    response.headers.update(NO_STORE)  # seed codes are on it
    return response


@router.get("/drops/{drop_id}")
async def drop_detail(request: Request, drop_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    return await _drop_page(request, ctx, principal, drop_id)


def _shown(error: PopdropError) -> bool:
    """Refusals shown on the drop's page; a missing drop or a missing permission gets
    its own error page, and anything else is not the operator's to fix."""
    return error.status < 500 and error.reason not in ("not_found", "forbidden", "csrf_failed")


@router.post("/drops/{drop_id}/start")
async def drop_start(request: Request, drop_id: ItemId, principal: Operator, ctx: Ctx) -> Response:
    check_csrf(request, ctx, await request.form())
    try:
        async with ctx.db.transaction() as session:
            drop = await service.start_drop(session, principal, drop_id, now=ctx.clock.now())
            status = drop.status
            if ctx.worker is not None and status == "sending":  # `popdrop serve`: in-process
                after_commit(session, partial(ctx.worker.send_drop.kiq, drop_id))
    except PopdropError as error:
        if not _shown(error):
            raise
        return await _drop_page(request, ctx, principal, drop_id, error=error)
    done = "started" if status == "sending" else "scheduled"
    return RedirectResponse(f"/drops/{drop_id}?done={done}", status_code=303)


@router.post("/drops/{drop_id}/seed-test")
async def drop_seed_test(
    request: Request, drop_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    check_csrf(request, ctx, await request.form())
    from popdrop.drops import api  # the API's seed test: same transports, same link check

    try:
        out = await api.seed_test(drop_id, request, principal, ctx)
    except PopdropError as error:
        if not _shown(error):
            raise
        return await _drop_page(request, ctx, principal, drop_id, error=error)
    done = "seed-passed" if out.seed_status == "passed" else "seed-failed"
    return RedirectResponse(f"/drops/{drop_id}?done={done}#seed", status_code=303)


@router.post("/drops/{drop_id}/{action}")
async def drop_state(
    request: Request,
    drop_id: ItemId,
    action: Literal["pause", "resume", "cancel"],
    principal: Operator,
    ctx: Ctx,
) -> Response:
    check_csrf(request, ctx, await request.form())
    who = principal.actor.split(":", 1)[-1]
    try:
        async with ctx.db.transaction() as session:
            await service.set_state(
                session,
                principal,
                drop_id,
                action,
                now=ctx.clock.now(),
                reason=f"paused by {who}" if action == "pause" else None,
            )
    except PopdropError as error:
        if not _shown(error):
            raise
        return await _drop_page(request, ctx, principal, drop_id, error=error)
    done = {"pause": "paused", "resume": "resumed", "cancel": "cancelled"}[action]
    return RedirectResponse(f"/drops/{drop_id}?done={done}", status_code=303)


# ---------------------------------------------------------------- the mailbox


@dataclass
class Stored:
    message: MailboxMessage
    drop_id: int | None
    drop_name: str | None
    seed: bool

    @property
    def headline(self) -> str:
        if self.message.channel == "email":
            return self.message.subject or "(no subject)"
        text = " ".join(self.message.text.split())
        return text if len(text) <= 90 else text[:89] + "…"


def drop_of(message: MailboxMessage) -> tuple[int | None, bool]:
    """(drop id, is a seed message) from the Message-ID the pipeline gives every email."""
    match = _MESSAGE_DROP.match(message.message_id or "")
    if match is None:
        return None, False
    return int(match.group(1)), match.group(2) == "seed"


async def _stored(
    session: AsyncSession, org_id: int, messages: list[MailboxMessage]
) -> list[Stored]:
    refs = [drop_of(m) for m in messages]
    ids = {drop_id for drop_id, _seed in refs if drop_id is not None}
    names: dict[int, str] = {}
    if ids:
        rows = await session.execute(
            select(Drop.id, Drop.name).where(Drop.org_id == org_id, Drop.id.in_(ids))
        )
        names = {int(i): str(n) for i, n in rows}
    return [
        Stored(m, drop_id if drop_id in names else None, names.get(drop_id or 0), seed)
        for m, (drop_id, seed) in zip(messages, refs, strict=True)
    ]


@dataclass
class MailboxPage:
    messages: list[Stored]
    total: int
    newer: int | None  # `after` cursor of the newer page, if any
    older: int | None  # `before` cursor of the older page, if any


async def mailbox_page(
    session: AsyncSession,
    principal: Principal,
    *,
    query: str | None,
    before: int | None,
    after: int | None,
    limit: int = MAILBOX_PAGE,
) -> MailboxPage:
    """One page of this organization's stored messages, newest first; keyset paging on
    the id (the `(org_id, id)` index), so a page costs the same deep in a big mailbox."""
    principal.require("drops:read")
    conditions: list[Any] = [MailboxMessage.org_id == principal.org_id]
    if query:
        conditions.append(
            func.lower(MailboxMessage.recipient).contains(query.lower(), autoescape=True)
        )
    total = int(
        await session.scalar(select(func.count()).select_from(MailboxMessage).where(*conditions))
        or 0
    )
    statement = select(MailboxMessage).where(*conditions)
    if after is not None:  # the newer page: read upwards, then show newest first
        statement = statement.where(MailboxMessage.id > after).order_by(MailboxMessage.id)
    else:
        if before is not None:
            statement = statement.where(MailboxMessage.id < before)
        statement = statement.order_by(MailboxMessage.id.desc())
    found = list((await session.scalars(statement.limit(limit + 1))).all())
    more = len(found) > limit
    found = found[:limit]
    if after is not None:
        found.reverse()
    newer = older = None
    if found:
        newest, oldest = found[0].id, found[-1].id
        if after is not None:
            newer, older = (newest if more else None), oldest
        else:
            newer = newest if before is not None else None
            older = oldest if more else None
    if newer is not None:  # only link to a newer page that has messages
        has_newer = await session.scalar(
            select(MailboxMessage.id).where(*conditions, MailboxMessage.id > newer).limit(1)
        )
        newer = newer if has_newer is not None else None
    return MailboxPage(await _stored(session, principal.org_id, found), total, newer, older)


def _cursor(raw: str | None) -> int | None:
    if raw is None or not raw.isdecimal() or len(raw) > 18:
        return None
    return int(raw)


@router.get("/mailbox")
async def mailbox(request: Request, principal: Operator, ctx: Ctx) -> Response:
    q = request.query_params.get("q", "").strip()[:254]
    before = _cursor(request.query_params.get("before"))
    after = _cursor(request.query_params.get("after"))
    async with ctx.db.reader() as session:
        page = await mailbox_page(session, principal, query=q or None, before=before, after=after)
    context = {
        "principal": principal,
        "page": page,
        "q": q,
        "transport": ctx.settings.mail_transport,
    }
    response = render(request, "drops/mailbox.html", context)
    response.headers.update(NO_STORE)  # addresses and codes
    return response


@router.get("/mailbox/{message_id}")
async def mailbox_message(
    request: Request, message_id: ItemId, principal: Operator, ctx: Ctx
) -> Response:
    principal.require("drops:read")
    async with ctx.db.reader() as session:
        message = await owned(session, MailboxMessage, message_id, principal.org_id, what="message")
        (stored,) = await _stored(session, principal.org_id, [message])
        sender = (
            await session.scalar(
                select(Drop).where(Drop.id == stored.drop_id, Drop.org_id == principal.org_id)
            )
            if stored.drop_id
            else None
        )
    try:
        headers: dict[str, str] = json.loads(message.headers or "{}")
    except ValueError:
        headers = {}
    context = {
        "principal": principal,
        "stored": stored,
        "message": message,
        "sender": sender,
        "headers": headers,
        "srcdoc": in_new_tab(message.html) if message.html else None,
    }
    response = render(request, "drops/message.html", context)
    response.headers.update(NO_STORE)
    return response
