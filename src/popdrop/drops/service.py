"""Drops: create, seed-test, start (freeze recipients), pause/resume/cancel, and the send
pipeline that claims send rows and hands them to a transport.

Rules:
- Starting a drop freezes its recipients into `send_rows`, unique per (drop, contact,
  channel): only contacts sendable on the channel at that moment, and an A/B drop puts
  the contacts outside its test sample on `held` until the winner is known.
- A worker claims due rows with a lease (`claimed_at`), in small batches. For the batch it
  re-reads consent, erasure, the frequency cap and the contact's quiet hours: an opt-out
  that landed after the start (STOP, one-click unsubscribe) skips the row; quiet hours
  defer it (`not_before` = the end of the quiet window in the contact's time zone), never
  drop it. Consent is read once more per message right before its provider call
  (`pipeline._ConsentGate`): no provider call starts after an opt-out was acknowledged.
- Each message's outcome is committed right after its provider call (checkpoint what was
  *sent*), so a killed worker can only repeat the messages that were in flight; the repeat
  carries the same Message-ID and the same per-recipient voucher.
- Pause, resume and cancel are idempotent state changes; workers read the drop's state
  before every batch.
- Every change of a drop's status goes through `move_drop`, which asks the action table
  (`drops.lifecycle.DROP_ACTIONS`) and refuses any other move with `invalid_transition`;
  the set-based close of drained drops takes its WHERE from the same table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, case, func, insert, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from popdrop.accounts.service import Principal
from popdrop.accounts.service import system_principal as accounts_system_principal
from popdrop.audience import segments
from popdrop.audience.models import Contact
from popdrop.audience.schemas import SegmentRules
from popdrop.core.db import Database
from popdrop.core.errors import PopdropError
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned
from popdrop.drops.lifecycle import (
    DROP_LIFECYCLE,
    OPEN_ROW_STATUSES,
    SEED_CLEARED,
    UNSENT_ROW_STATUSES,
    DropAction,
    DropStatus,
    SeedStatus,
    SendRowStatus,
    action_leads,
    action_sources,
    can_seed_test,
)
from popdrop.drops.models import Drop, DropVariant, SendRow
from popdrop.drops.schemas import DropCreate, DropOut
from popdrop.events.models import Event
from popdrop.outbound.transports import EmailTransport, SendResult, SmsTransport
from popdrop.vouchers import service as vouchers
from popdrop.vouchers.models import VoucherBatch
from popdrop.vouchers.schemas import BatchCreate

SPLIT_MODULUS = 10_000
_SLUG = re.compile(r"[^a-z0-9]+")
_REDEEM = frozenset({"vouchers:redeem"})


def system_principal(org_id: int) -> Principal:
    """Who starts a scheduled drop on the organization's behalf."""
    return accounts_system_principal(
        org_id, "system:drops", scopes=frozenset({"drops:read", "drops:write", "audience:read"})
    )


def _bucket_sql(drop_id: int) -> Any:
    """A stable 0..9999 bucket per (drop, contact), computed by the database, so the test
    sample and the variants split the audience the same way on every run."""
    return (Contact.id * 2654435761 + drop_id * 40503) % SPLIT_MODULUS


def variant_ranges(variants: Sequence[DropVariant]) -> list[tuple[str, int, int]]:
    """(name, from, to) bucket ranges inside the test sample, by split percentage."""
    ranges: list[tuple[str, int, int]] = []
    start = 0
    for index, variant in enumerate(variants):
        end = SPLIT_MODULUS if index == len(variants) - 1 else start + variant.split_percent * 100
        ranges.append((variant.name, start, end))
        start = end
    return ranges


def slugify(name: str) -> str:
    return _SLUG.sub("-", name.lower()).strip("-")[:64] or "drop"


# ---------------------------------------------------------------- drops


async def create_drop(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    spec: DropCreate,
    *,
    now: datetime,
) -> Drop:
    principal.require("drops:write")
    from popdrop.drops import content  # compiles templates; refuses bad ones with lines

    for variant in spec.variants:
        content.validate(variant.content)
    if spec.segment_id is not None:
        await segments.get_segment(session, principal, spec.segment_id)
    if spec.event_id is not None:
        await owned(session, Event, spec.event_id, principal.org_id)
    if "email" in spec.channels and not spec.from_email:
        raise PopdropError("invalid_request", "from_email: needed to send email")
    if "sms" in spec.channels and not spec.sms_from:
        raise PopdropError("invalid_request", "sms_from: needed to send SMS")
    batch_id = None
    if spec.voucher is not None:
        batch, _ = await vouchers.issue_batch(
            session,
            signer,
            principal,
            BatchCreate(
                name=f"Drop: {spec.name}"[:200],
                quantity=1,
                ttl_seconds=spec.voucher.ttl_seconds,
                discount_kind=spec.voucher.discount_kind,
                discount_value=spec.voucher.discount_value,
                discount_description=spec.voucher.discount_description,
                prefix=spec.voucher.prefix,
                tag=f"drop:{slugify(spec.name)}",
            ).model_copy(update={"quantity": 0}),  # codes come one per recipient at send time
            now=now,
        )
        batch_id = batch.id
    drop = Drop(
        org_id=principal.org_id,
        event_id=spec.event_id,
        name=spec.name,
        slug=slugify(spec.name),
        status=DropStatus.DRAFT,
        segment_id=spec.segment_id,
        channels=" ".join(spec.channels),
        from_email=spec.from_email,
        from_name=spec.from_name,
        sms_from=spec.sms_from,
        voucher_batch_id=batch_id,
        seed_list=json.dumps(spec.seed_list),
        seed_status=SeedStatus.UNTESTED,
        seed_report="[]",
        ab_metric=spec.ab_metric,
        ab_test_fraction=spec.ab_test_fraction if len(spec.variants) > 1 else 1.0,
        ab_decide_after_seconds=spec.ab_decide_after_seconds,
        ab_min_sample=spec.ab_min_sample,
        ab_fallback=spec.ab_fallback,
        frequency_cap=spec.frequency_cap,
        frequency_window_hours=spec.frequency_window_hours,
        quiet_start_hour=spec.quiet_start_hour,
        quiet_end_hour=spec.quiet_end_hour,
        bounce_threshold=spec.bounce_threshold,
        complaint_threshold=spec.complaint_threshold,
        scheduled_at=spec.scheduled_at,
        created_at=now,
        updated_at=now,
    )
    session.add(drop)
    await session.flush()
    for variant in spec.variants:
        session.add(
            DropVariant(
                drop_id=drop.id,
                name=variant.name,
                split_percent=variant.split_percent if len(spec.variants) > 1 else 100,
                content=variant.content.model_dump_json(),
            )
        )
    await session.flush()
    return drop


async def get_drop(session: AsyncSession, principal: Principal, drop_id: int) -> Drop:
    principal.require("drops:read")
    return await owned(session, Drop, drop_id, principal.org_id, fresh=True)


async def list_drops(session: AsyncSession, principal: Principal) -> list[Drop]:
    principal.require("drops:read")
    return list(
        (
            await session.scalars(
                select(Drop).where(Drop.org_id == principal.org_id).order_by(Drop.id.desc())
            )
        ).all()
    )


async def event_of(session: AsyncSession, drop: Drop) -> Event | None:
    """The drop's event (its `event.url` and times in the templates), if it has one."""
    if drop.event_id is None:
        return None
    found: Event | None = await session.scalar(
        select(Event).where(Event.id == drop.event_id, Event.org_id == drop.org_id)
    )
    return found


async def variants_of(session: AsyncSession, drop_id: int) -> list[DropVariant]:
    return list(
        (
            await session.scalars(
                select(DropVariant).where(DropVariant.drop_id == drop_id).order_by(DropVariant.id)
            )
        ).all()
    )


async def row_counts(session: AsyncSession, drop_id: int) -> dict[str, int]:
    rows = await session.execute(
        select(SendRow.status, func.count())
        .where(SendRow.drop_id == drop_id)
        .group_by(SendRow.status)
    )
    return {status: int(n) for status, n in rows}


async def drop_out(session: AsyncSession, drop: Drop) -> DropOut:
    return DropOut(
        id=drop.id,
        name=drop.name,
        status=drop.status,
        channels=drop.channels.split(),
        segment_id=drop.segment_id,
        event_id=drop.event_id,
        seed_status=drop.seed_status,
        seed_report=json.loads(drop.seed_report or "[]"),
        ab_winner=drop.ab_winner,
        ab_result=json.loads(drop.ab_result) if drop.ab_result else None,
        paused_reason=drop.paused_reason,
        scheduled_at=drop.scheduled_at,
        started_at=drop.started_at,
        finished_at=drop.finished_at,
        counts=await row_counts(session, drop.id),
    )


async def override_seed(
    session: AsyncSession, principal: Principal, drop_id: int, *, reason: str, now: datetime
) -> Drop:
    """An owner lets the drop go without a passing seed test (recorded with the reason)."""
    principal.require("tokens:write")  # owners only
    drop = await get_drop(session, principal, drop_id)
    drop.seed_status = SeedStatus.OVERRIDDEN
    report = json.loads(drop.seed_report or "[]")
    report.append({"override": reason, "by": principal.actor, "at": now.isoformat()})
    drop.seed_report = json.dumps(report)
    drop.updated_at = now
    await session.flush()
    return drop


async def start_drop(
    session: AsyncSession, principal: Principal, drop_id: int, *, now: datetime
) -> Drop:
    """Freeze the recipients and start sending (or keep `scheduled` until `scheduled_at`)."""
    principal.require("drops:write")
    drop = await get_drop(session, principal, drop_id)
    status = DropStatus(drop.status)
    if not action_leads(DropAction.START, status):
        raise DROP_LIFECYCLE.refusal(status, None, action=DropAction.START)
    if drop.seed_status not in SEED_CLEARED:
        raise PopdropError(
            "seed_test_required",
            "run the seed test first (or an owner overrides it): "
            f"the seed test is {drop.seed_status}",
        )
    if drop.scheduled_at is not None and drop.scheduled_at > now:
        if status is DropStatus.SCHEDULED:
            drop.updated_at = now  # asked again before its time: it stays scheduled
        else:
            move_drop(drop, DropAction.START, DropStatus.SCHEDULED, now=now)
        await session.flush()
        return drop
    await _start_sending(session, principal, drop, now=now)
    return drop


async def start_due_drops(session: AsyncSession, *, now: datetime) -> list[int]:
    """The worker tick's part: start every scheduled drop whose `scheduled_at` has come
    (the operator's start already passed the seed-test gate), on the organization's
    behalf. Returns the ids started."""
    due = await session.scalars(
        select(Drop)
        .where(Drop.status == DropStatus.SCHEDULED, Drop.scheduled_at <= now)
        .order_by(Drop.id)
    )
    started: list[int] = []
    for drop in due.all():
        await _start_sending(session, system_principal(drop.org_id), drop, now=now)
        started.append(drop.id)
    return started


async def _start_sending(
    session: AsyncSession, principal: Principal, drop: Drop, *, now: datetime
) -> None:
    # The move first: a refused start freezes no recipients.
    move_drop(drop, DropAction.START, DropStatus.SENDING, now=now)
    await freeze_recipients(session, principal, drop, now=now)
    await session.flush()


def move_drop(
    drop: Drop,
    action: DropAction,
    target: DropStatus,
    *,
    now: datetime,
    paused_reason: str | None = None,
) -> None:
    """The one writer of a drop's status (one drop in the session; `finish_drained` is the
    set-based form of `finish`). The move must be one `action` may make from the drop's
    status, else `invalid_transition`. Also keeps the fields that go with the status:
    `paused_reason` only while paused, `started_at` on the first `sending`, `finished_at`
    on a final status."""
    source = DropStatus(drop.status)
    if target not in action_leads(action, source):
        raise DROP_LIFECYCLE.refusal(source, target, action=action)
    drop.status = target
    drop.paused_reason = paused_reason if target is DropStatus.PAUSED else None
    drop.updated_at = now
    if target is DropStatus.SENDING and drop.started_at is None:
        drop.started_at = now
    if target in DROP_LIFECYCLE.terminal:
        drop.finished_at = now


async def freeze_recipients(
    session: AsyncSession, principal: Principal, drop: Drop, *, now: datetime
) -> None:
    rules = SegmentRules()
    if drop.segment_id is not None:
        segment = segments.segment_out(
            await segments.get_segment(session, principal, drop.segment_id)
        )
        rules = segment.rules
    variants = await variants_of(session, drop.id)
    sample = round(drop.ab_test_fraction * SPLIT_MODULUS)
    bucket = _bucket_sql(drop.id)
    # Inside the sample, buckets 0..sample-1 spread over the variants by split; the rest wait.
    scaled = bucket * SPLIT_MODULUS / max(sample, 1)
    whens = [
        (and_(bucket < sample, scaled < end), literal(name))
        for name, _s, end in variant_ranges(variants)
    ]
    variant_expr = (
        case(*whens, else_=literal(None)) if len(variants) > 1 else literal(variants[0].name)
    )
    status_expr = (
        case(
            (bucket < sample, literal(SendRowStatus.PENDING)),
            else_=literal(SendRowStatus.HELD),
        )
        if len(variants) > 1
        else literal(SendRowStatus.PENDING)
    )
    for channel in drop.channels.split():
        conditions = await segments.segment_conditions(
            session, principal.org_id, rules.model_copy(update={"channels": [channel]}), now=now
        )
        source = select(
            literal(principal.org_id),
            literal(drop.id),
            Contact.id,
            literal(channel),
            variant_expr,
            status_expr,
            literal(now),
            literal(0),
        ).where(*conditions)
        await session.execute(
            insert(SendRow).from_select(
                [
                    "org_id",
                    "drop_id",
                    "contact_id",
                    "channel",
                    "variant",
                    "status",
                    "not_before",
                    "attempts",
                ],
                source,
            )
        )


async def set_state(
    session: AsyncSession,
    principal: Principal,
    drop_id: int,
    action: str,
    *,
    now: datetime,
    reason: str | None = None,
) -> Drop:
    """pause / resume / cancel: idempotent (asking twice answers the same state). A resume
    leads back to `sending` when the drop had started, else to `scheduled`; a cancel skips
    the rows not yet sent."""
    principal.require("drops:write")
    drop = await get_drop(session, principal, drop_id)
    action = DropAction(action)
    if action not in _OPERATOR_STATE_ACTIONS:
        raise PopdropError("invalid_request", f"{action} is not pause, resume or cancel")
    target = _OPERATOR_STATE_ACTIONS[action]
    if drop.status == target:
        return drop
    if action is DropAction.RESUME and drop.started_at is None:
        target = DropStatus.SCHEDULED
    move_drop(drop, action, target, now=now, paused_reason=reason)
    if action is DropAction.CANCEL:
        await session.execute(
            update(SendRow)
            .where(SendRow.drop_id == drop.id, SendRow.status.in_(UNSENT_ROW_STATUSES))
            .values(status=SendRowStatus.SKIPPED, outcome="cancelled")
        )
    await session.flush()
    return drop


# Where pause, resume and cancel lead (what "asking twice" compares with).
_OPERATOR_STATE_ACTIONS: dict[DropAction, DropStatus] = {
    DropAction.PAUSE: DropStatus.PAUSED,
    DropAction.RESUME: DropStatus.SENDING,
    DropAction.CANCEL: DropStatus.CANCELLED,
}


async def finish_drained(session: AsyncSession, *, now: datetime) -> list[int]:
    """Mark `done` every sending drop with nothing left to send (no row pending, held
    for an A/B winner or claimed); delivery and click feedback keep arriving after."""
    open_rows = (
        select(SendRow.id)
        .where(SendRow.drop_id == Drop.id, SendRow.status.in_(OPEN_ROW_STATUSES))
        .exists()
    )
    finished = await session.execute(
        update(Drop)
        .where(Drop.status.in_(action_sources(DropAction.FINISH, DropStatus.DONE)), ~open_rows)
        .values(status=DropStatus.DONE, finished_at=now, updated_at=now)
        .returning(Drop.id)
    )
    return [int(drop_id) for drop_id in finished.scalars()]


# ---------------------------------------------------------------- the send pipeline


@dataclass(frozen=True)
class Claimed:
    id: int
    drop_id: int
    org_id: int
    contact_id: int
    channel: str
    variant: str | None
    attempts: int


async def claim_batch(
    conn: AsyncConnection,
    *,
    worker: str,
    now: datetime,
    lease_seconds: float,
    limit: int,
    org_id: int | None = None,
) -> list[Claimed]:
    """Take up to `limit` due rows of sending drops (or rows whose lease ran out); only
    one organization's with `org_id` (a worker dedicated to one tenant)."""
    stale = now - timedelta(seconds=lease_seconds)
    due = (
        select(SendRow.id)
        .join(Drop, Drop.id == SendRow.drop_id)
        .where(
            Drop.status == DropStatus.SENDING,
            or_(
                and_(SendRow.status == SendRowStatus.PENDING, SendRow.not_before <= now),
                and_(SendRow.status == SendRowStatus.CLAIMED, SendRow.claimed_at < stale),
            ),
        )
        .order_by(SendRow.id)
        .limit(limit)
    )
    if org_id is not None:
        due = due.where(SendRow.org_id == org_id)
    if conn.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True, of=SendRow)
    taken = await conn.execute(
        update(SendRow)
        .where(SendRow.id.in_(due.scalar_subquery()))
        .values(
            status=SendRowStatus.CLAIMED,
            claimed_at=now,
            claimed_by=worker,
            attempts=SendRow.attempts + 1,
        )
        .returning(
            SendRow.id,
            SendRow.drop_id,
            SendRow.org_id,
            SendRow.contact_id,
            SendRow.channel,
            SendRow.variant,
            SendRow.attempts,
        )
    )
    return [Claimed(*row) for row in taken.all()]


def quiet_until(now: datetime, zone: str | None, start_hour: int, end_hour: int) -> datetime | None:
    """When quiet hours end for this contact, or None when it is not quiet there now."""
    if start_hour == end_hour:
        return None
    try:
        tz = ZoneInfo(zone) if zone else ZoneInfo("UTC")
    except (KeyError, ValueError):
        tz = ZoneInfo("UTC")
    local = now.astimezone(tz)
    hour = local.hour
    quiet = (
        (start_hour <= hour or hour < end_hour)
        if start_hour > end_hour
        else (start_hour <= hour < end_hour)
    )
    if not quiet:
        return None
    opening = local.replace(hour=end_hour, minute=0, second=0, microsecond=0)
    if opening <= local:
        opening += timedelta(days=1)
    return opening.astimezone(ZoneInfo("UTC"))


# ---------------------------------------------------------------- seed test

UrlCheck = Callable[[str], Awaitable[tuple[bool, str]]]


@dataclass
class SeedTransports:
    email: EmailTransport | None
    sms: SmsTransport | None


async def run_seed_test(
    db: Database,
    signer: Signer,
    principal: Principal,
    drop_id: int,
    *,
    base_url: str,
    transports: SeedTransports,
    check_url: UrlCheck,
    now: datetime,
) -> Drop:
    """Send every variant to the seed list, then check by itself that every link in every
    seed message resolves and that each seed voucher validates (dry run). The real send
    stays blocked until this passes (or an owner overrides it).

    No transaction is held while the providers are called or the links are fetched (on
    SQLite the development mailbox writes through the same lock)."""
    from popdrop.drops import content
    from popdrop.outbound.transports import OutboundEmail, OutboundSms

    principal.require("drops:write")
    async with db.transaction() as session:
        drop = await get_drop(session, principal, drop_id)
        if not can_seed_test(DropStatus(drop.status)):
            raise PopdropError("conflict", f"this drop is {drop.status}")
        seeds: list[str] = json.loads(drop.seed_list or "[]")
        if not seeds:
            raise PopdropError("invalid_request", "seed_list: add at least one seed address")
        batch = (
            await session.get(VoucherBatch, drop.voucher_batch_id)
            if drop.voucher_batch_id
            else None
        )
        event = await session.get(Event, drop.event_id) if drop.event_id else None
        variants = [(v.name, v.content) for v in await variants_of(session, drop.id)]
        codes = (
            await vouchers.issue_derived(
                session, signer, batch, [f"seed:{drop.id}:{seed}" for seed in seeds], now=now
            )
            if batch is not None
            else {}
        )
    channels = drop.channels.split()
    report: list[dict[str, Any]] = []
    for name, stored in variants:
        compiled = content.compile_variant(stored)
        for number, seed in enumerate(seeds):
            channel = "email" if "@" in seed else "sms"
            if channel not in channels:
                continue
            voucher = codes.get(f"seed:{drop.id}:{seed}")
            entry: dict[str, Any] = {"seed": seed, "variant": name, "channel": channel}
            links = content.Links(signer, base_url, drop, None, None)
            values = content.context_for(drop, None, event, voucher, links, first_name="Seed")
            result: SendResult | None = None
            try:
                if channel == "email" and transports.email is not None:
                    rendered = compiled.render_email("default", values, links)
                    urls = [link.url for link in rendered.links]
                    result = await transports.email.send(
                        OutboundEmail(
                            message_id=f"<drop-{drop.id}.seed-{number}.{name}@popdrop>",
                            to=seed,
                            from_address=drop.from_email,
                            from_name=drop.from_name,
                            subject=f"[seed] {rendered.subject}",
                            text=rendered.text,
                            html=rendered.html,
                            org_id=drop.org_id,
                        )
                    )
                else:
                    rendered_sms = compiled.render_sms("default", values, links)
                    urls = [link.url for link in rendered_sms.links]
                    if transports.sms is not None:
                        result = await transports.sms.send(
                            OutboundSms(
                                to=seed,
                                from_number=drop.sms_from,
                                body=rendered_sms.body,
                                org_id=drop.org_id,
                            )
                        )
            except PopdropError as error:  # a template that cannot render is a failed test
                entry |= {"delivered": False, "error": error.message, "links": [], "ok": False}
                report.append(entry)
                continue
            entry["delivered"] = bool(result and result.ok)
            if not entry["delivered"]:  # the provider's own words, for the operator
                entry["error"] = (
                    (result.error or "refused by the provider")
                    if result is not None
                    else f"no {channel} transport is configured"
                )
            entry["links"] = []
            for url in urls:
                ok, detail = await check_url(url)
                entry["links"].append({"url": url, "ok": ok, "detail": detail})
            if voucher is not None:
                entry["code"] = voucher[1]
            report.append(entry)
    async with db.transaction() as session:
        checker = accounts_system_principal(drop.org_id, "system:seed-test", scopes=_REDEEM)
        for entry in report:
            code = entry.pop("code", None)
            if code is not None:
                try:
                    await vouchers.validate(
                        session, signer, checker, code=code, contact_ref=None, now=now
                    )
                    entry["voucher"] = "valid"
                except PopdropError as error:
                    entry["voucher"] = error.reason
            entry.setdefault(
                "ok",
                entry["delivered"]
                and all(link["ok"] for link in entry["links"])
                and entry.get("voucher", "valid") == "valid",
            )
        drop = await get_drop(session, principal, drop_id)
        drop.seed_report = json.dumps(report)
        passed = bool(report) and all(e["ok"] for e in report)
        drop.seed_status = SeedStatus.PASSED if passed else SeedStatus.FAILED
        drop.updated_at = now
        await session.flush()
        return drop
