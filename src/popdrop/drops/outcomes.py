"""What happened after the send: clicks, provider feedback (delivered, bounces,
complaints) with suppression and auto-pause, SMS delivery reports, the A/B decision, and
per-minute war-room figures.

Auto-pause looks at each channel on its own: an email hard bounce and an SMS the carrier
could not deliver (Twilio `undelivered` / `failed`) are both bounces of their channel.

Each of these outcomes enters the funnel log in the transaction that records it on the
send row, once per row (a repeated report changes nothing and logs nothing), tagged as the
message's `message_sent` was (drop, event, variant, segment at send time); every click is
logged."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.audience import consent, contact_points, contacts
from popdrop.audience.models import Contact, ContactActivity
from popdrop.audience.schemas import ActivityIn, ConsentChange
from popdrop.core.identity import identity_hash
from popdrop.core.signing import Signer
from popdrop.drops import abtest
from popdrop.drops.lifecycle import (
    SEND_ROW_LIFECYCLE,
    SENT_ROW_STATUSES,
    DropAction,
    DropStatus,
    SendRowStatus,
)
from popdrop.drops.models import Drop, LinkClick, SendRow
from popdrop.drops.schemas import MinuteStats, WarRoom
from popdrop.drops.service import get_drop, move_drop, variants_of
from popdrop.metrics import log as funnel
from popdrop.metrics.kinds import Kind
from popdrop.metrics.models import FunnelEvent
from popdrop.outbound.feedback import FeedbackEvent
from popdrop.outbound.twilio import StatusCallback

AUTO_PAUSE_WINDOW = timedelta(minutes=10)
AUTO_PAUSE_MIN_SENT = 100  # no verdict on a handful of messages
WAR_ROOM_MINUTES = 120


async def record_click(
    session: AsyncSession,
    signer: Signer,
    *,
    drop_id: int,
    send_row_id: int | None,
    url: str,
    now: datetime,
) -> None:
    """A click on a tracked link: stored, the row's first click kept, the contact engaged."""
    drop = await session.get(Drop, drop_id)
    if drop is None:
        return
    session.add(
        LinkClick(org_id=drop.org_id, drop_id=drop_id, send_row_id=send_row_id, url=url, at=now)
    )
    if send_row_id is not None:
        row = await session.get(SendRow, send_row_id)
        if row is not None and row.drop_id == drop_id:
            if row.clicked_at is None:
                row.clicked_at = now
            await _log(session, drop, row, Kind.MESSAGE_CLICKED, now)
            await contacts.record_activity(
                session,
                signer,
                drop.org_id,
                ActivityIn(kind="click", contact_id=row.contact_id, event_id=drop.event_id),
                now=now,
            )
    await session.flush()


async def apply_feedback(
    session: AsyncSession,
    signer: Signer,
    org_id: int,
    events: Sequence[FeedbackEvent],
    *,
    now: datetime,
) -> dict[str, int]:
    """Mark rows delivered/bounced/complained; a hard bounce suppresses the address and a
    complaint also revokes email consent; then auto-pause drops over their thresholds."""
    counts: dict[str, int] = {}
    touched: set[int] = set()
    for event in events:
        row = await _row_for(session, org_id, event)
        if row is not None:
            touched.add(row.drop_id)
            logged: tuple[Kind, str] | None = None
            if event.kind == "delivered":
                if row.delivered_at is None:
                    logged = (Kind.MESSAGE_DELIVERED, "")
                if row.status == SendRowStatus.SENT:
                    row.status = SendRowStatus.DELIVERED
                row.delivered_at = row.delivered_at or now
            elif event.kind == "hard_bounce":
                if row.bounced_at is None:
                    logged = (Kind.MESSAGE_BOUNCED, "hard")
                row.status, row.bounced_at = SendRowStatus.BOUNCED, now
                row.outcome = event.reason[:200]
            elif event.kind == "complaint":
                if row.complained_at is None:
                    logged = (Kind.MESSAGE_COMPLAINED, "")
                row.complained_at = now
            else:
                if row.bounced_at is None and not (row.outcome or "").startswith(_SOFT):
                    logged = (Kind.MESSAGE_BOUNCED, "soft")
                row.outcome = f"{_SOFT}{event.reason}"[:200]
            if logged is not None:
                await _log(session, None, row, logged[0], now, label=logged[1])
        if event.kind in ("hard_bounce", "complaint"):
            await _stop_emailing(session, signer, org_id, event, now)
        counts[event.kind] = counts.get(event.kind, 0) + 1
    await session.flush()
    for drop_id in touched:
        await auto_pause(session, drop_id, now=now)
    return counts


async def apply_sms_status(
    session: AsyncSession, org_id: int, callback: StatusCallback, *, now: datetime
) -> str | None:
    """A Twilio status callback for one of this organization's drop messages: `delivered`
    marks the row delivered; `undelivered` / `failed` mark it bounced with the carrier's
    error code, which counts toward the drop's bounce auto-pause (the number's consent
    stays as it is: an undelivered message is not an opt-out). Interim statuses (queued,
    sent, …) change nothing, and a repeated callback changes nothing again. Returns the
    row's status, or None when no drop message has this sid."""
    row = await session.scalar(
        select(SendRow)
        .where(
            SendRow.org_id == org_id,
            SendRow.channel == "sms",
            SendRow.provider_id == callback.message_sid,
        )
        .limit(1)
    )
    if row is None:
        return None
    status = SendRowStatus(row.status)
    if callback.delivered and SEND_ROW_LIFECYCLE.allows(status, SendRowStatus.DELIVERED):
        row.status, row.delivered_at = SendRowStatus.DELIVERED, row.delivered_at or now
        await _log(session, None, row, Kind.MESSAGE_DELIVERED, now)
    elif callback.failed and SEND_ROW_LIFECYCLE.allows(status, SendRowStatus.BOUNCED):
        row.status, row.bounced_at = SendRowStatus.BOUNCED, now
        code = f" {callback.error_code}" if callback.error_code is not None else ""
        row.outcome = f"twilio {callback.status}{code}"
        await _log(session, None, row, Kind.MESSAGE_BOUNCED, now, label=str(callback.status))
        await session.flush()
        await auto_pause(session, row.drop_id, now=now)
    return str(row.status)


_SOFT = "soft bounce: "


async def _sent_tags(
    session: AsyncSession, drop: Drop | None, row: SendRow
) -> tuple[funnel.Tags, str | None]:
    """The tags and person this message's `message_sent` carried (its variant and the
    contact's segment when it went out, which later engagement has changed since); the
    drop's own and the contact's when the log has no such row (retention deleted it)."""
    sent = (
        await session.execute(
            select(FunnelEvent.variant, FunnelEvent.segment, FunnelEvent.person)
            .where(
                FunnelEvent.org_id == row.org_id,
                FunnelEvent.subject == f"send:{row.id}",
                FunnelEvent.kind == Kind.MESSAGE_SENT,
            )
            .limit(1)
        )
    ).first()
    if drop is None:
        drop = await session.get(Drop, row.drop_id)
    if sent is not None:
        person = sent.person
    else:
        contact = await session.get(Contact, row.contact_id)
        person = (
            funnel.point_person(contact.email_hash, contact.phone_hash, contact.id)
            if contact is not None
            else None
        )
    tags = funnel.Tags(
        channel=row.channel,
        event_id=drop.event_id if drop is not None else None,
        drop_id=row.drop_id,
        variant=sent.variant if sent is not None else (row.variant or "")[:16],
        segment=sent.segment if sent is not None else "",
    )
    return tags, person


async def _log(
    session: AsyncSession,
    drop: Drop | None,
    row: SendRow,
    kind: Kind,
    now: datetime,
    *,
    label: str = "",
) -> None:
    """One outcome of a drop message in the funnel log, in the caller's transaction."""
    tags, person = await _sent_tags(session, drop, row)
    if label:
        tags = dataclasses.replace(tags, label=label[:24])
    await funnel.record(
        session,
        row.org_id,
        kind,
        at=now,
        tags=tags,
        person=person,
        subject=f"send:{row.id}",
    )


async def _row_for(session: AsyncSession, org_id: int, event: FeedbackEvent) -> SendRow | None:
    ids = [i for i in (event.message_id, event.provider_message_id) if i]
    if not ids:
        return None
    wanted = [*ids, *(f"<{i.strip('<>')}>" for i in ids)]
    return await session.scalar(
        select(SendRow)
        .where(
            SendRow.org_id == org_id,
            or_(SendRow.message_id.in_(wanted), SendRow.provider_id.in_(ids)),
        )
        .limit(1)
    )


async def _stop_emailing(
    session: AsyncSession, signer: Signer, org_id: int, event: FeedbackEvent, now: datetime
) -> None:
    digest = identity_hash(signer, "email", event.email.strip().lower())
    contact = await session.scalar(
        select(Contact).where(Contact.org_id == org_id, Contact.email_hash == digest)
    )
    reason = "bounce" if event.kind == "hard_bounce" else "complaint"
    points = contact_points.ContactPoints(event.email.lower(), None, digest, None)
    if contact is not None and contact.consent_email in ("granted", "pending"):
        await consent.change_consent(
            session,
            signer,
            contact,
            ConsentChange(channel="email", action="revoke", wording=f"{event.provider} {reason}"),
            now=now,
            source=reason,
        )
    await consent.suppress(session, org_id, points, "email", reason, now)


async def auto_pause(session: AsyncSession, drop_id: int, *, now: datetime) -> bool:
    """Pause a sending drop whose bounce or complaint rate over the last ten minutes, on
    one channel, is above its threshold; the reason is stored on the drop."""
    drop = await session.get(Drop, drop_id, populate_existing=True)
    if drop is None or drop.status != DropStatus.SENDING:
        return False
    since = now - AUTO_PAUSE_WINDOW
    by_channel = await session.execute(
        select(
            SendRow.channel,
            func.count(),
            func.count(SendRow.bounced_at),
            func.count(SendRow.complained_at),
        )
        .where(SendRow.drop_id == drop_id, SendRow.sent_at >= since)
        .group_by(SendRow.channel)
        .order_by(SendRow.channel)
    )
    for channel, sent, bounced, complained in by_channel:
        if sent < AUTO_PAUSE_MIN_SENT:
            continue
        for label, count, threshold in (
            ("bounce", bounced, drop.bounce_threshold),
            ("complaint", complained, drop.complaint_threshold),
        ):
            rate = count / sent
            if rate > threshold:
                what = label if channel == "email" else f"{channel} {label}"
                reason = (
                    f"auto-paused: {what} rate {rate:.1%} over the last 10 minutes "
                    f"({count} of {sent}) is above {threshold:.1%}"
                )
                move_drop(drop, DropAction.PAUSE, DropStatus.PAUSED, now=now, paused_reason=reason)
                await session.flush()
                return True
    return False


async def decide_ab(session: AsyncSession, drop: Drop, *, now: datetime) -> abtest.Decision | None:
    """When the test window is over: pick the winner, then release the held rows to it."""
    if (
        drop.ab_decided_at is not None
        or drop.started_at is None
        or drop.status != DropStatus.SENDING
    ):
        return None
    variants = await variants_of(session, drop.id)
    if len(variants) < 2 or drop.started_at + timedelta(seconds=drop.ab_decide_after_seconds) > now:
        return None
    outcomes = []
    for variant in variants:
        sent = await session.scalar(
            select(func.count()).where(
                SendRow.drop_id == drop.id,
                SendRow.variant == variant.name,
                SendRow.status.in_(SENT_ROW_STATUSES),
            )
        )
        converted = await session.scalar(_converted(drop, variant.name))
        outcomes.append(abtest.VariantOutcome(variant.name, int(sent or 0), int(converted or 0)))
    decision = abtest.decide(
        outcomes,
        min_sample=drop.ab_min_sample,
        fallback="control" if drop.ab_fallback == "control" else "none",
        metric_label="click rate" if drop.ab_metric == "click" else "RSVP rate",
    )
    drop.ab_decided_at = now
    drop.ab_winner = decision.winner
    drop.ab_result = json.dumps(
        {
            "winner": decision.winner,
            "significant": decision.significant,
            "reason": decision.reason,
            "message": decision.message,
            "lift": decision.lift,
            "p_value": decision.p_value,
            "confidence_interval": decision.confidence_interval,
            "fallback_applied": decision.fallback_applied,
            "outcomes": [
                {"variant": o.variant, "sent": o.sent, "converted": o.converted} for o in outcomes
            ],
        }
    )
    released: dict[str, Any] = (
        {"status": SendRowStatus.PENDING, "variant": decision.winner, "not_before": now}
        if decision.winner
        else {"status": SendRowStatus.SKIPPED, "outcome": "no A/B winner"}
    )
    await session.execute(
        update(SendRow)
        .where(SendRow.drop_id == drop.id, SendRow.status == SendRowStatus.HELD)
        .values(**released)
    )
    await session.flush()
    return decision


def _converted(drop: Drop, variant: str) -> Any:
    if drop.ab_metric == "click":
        return select(func.count()).where(
            SendRow.drop_id == drop.id, SendRow.variant == variant, SendRow.clicked_at.is_not(None)
        )
    return select(func.count(func.distinct(SendRow.contact_id))).where(
        SendRow.drop_id == drop.id,
        SendRow.variant == variant,
        SendRow.status.in_(SENT_ROW_STATUSES),
        select(ContactActivity.id)
        .where(
            ContactActivity.contact_id == SendRow.contact_id,
            ContactActivity.kind == "rsvp",
            ContactActivity.at >= SendRow.sent_at,
        )
        .exists(),
    )


async def war_room(session: AsyncSession, principal: Principal, drop_id: int) -> WarRoom:
    """Per-minute sent, delivered, bounced, failed, clicked for the first two hours."""
    drop = await get_drop(session, principal, drop_id)
    start = drop.started_at
    minutes: dict[datetime, dict[str, int]] = {}
    totals = {"sent": 0, "delivered": 0, "bounced": 0, "failed": 0, "clicked": 0}
    if start is not None:
        end = start + timedelta(minutes=WAR_ROOM_MINUTES)
        columns = {
            "sent": SendRow.sent_at,
            "delivered": SendRow.delivered_at,
            "bounced": SendRow.bounced_at,
            "clicked": SendRow.clicked_at,
        }
        for name, column in columns.items():
            for (at,) in await session.execute(
                select(column).where(SendRow.drop_id == drop.id, column >= start, column < end)
            ):
                if at is not None:
                    _bump(minutes, totals, at, name)
        failed = await session.execute(
            select(SendRow.claimed_at).where(
                SendRow.drop_id == drop.id, SendRow.status == SendRowStatus.FAILED
            )
        )
        for (at,) in failed:
            if at is not None and start <= at < end:
                _bump(minutes, totals, at, "failed")
    series = [
        MinuteStats(minute=minute, **{k: counts.get(k, 0) for k in totals})
        for minute, counts in sorted(minutes.items())
    ]
    return WarRoom(drop_id=drop.id, started_at=start, minutes=series, totals=totals)


def _bump(
    minutes: dict[datetime, dict[str, int]], totals: dict[str, int], at: datetime, name: str
) -> None:
    minute = at.replace(second=0, microsecond=0)
    bucket = minutes.setdefault(minute, {})
    bucket[name] = bucket.get(name, 0) + 1
    totals[name] += 1


# ---------------------------------------------------------------- page queries


@dataclass(frozen=True)
class DropCounts:
    """What became of a drop's frozen rows. `sent` counts every row that went out
    (sent, delivered or bounced); `delivered`, `bounced`, `failed`, `skipped` are states;
    `clicked` and `complained` count rows whatever their state."""

    frozen: int = 0
    pending: int = 0
    held: int = 0
    claimed: int = 0
    sent: int = 0
    delivered: int = 0
    bounced: int = 0
    failed: int = 0
    skipped: int = 0
    clicked: int = 0
    complained: int = 0

    @property
    def progress(self) -> int:
        """Percent of the frozen rows sent (0 before the start)."""
        return 0 if self.frozen <= 0 else min(100, round(100 * self.sent / self.frozen))


async def drop_counts(
    session: AsyncSession, principal: Principal, drop_ids: Sequence[int]
) -> dict[int, DropCounts]:
    """Per drop of this organization: its rows by state, one grouped query for a list."""
    principal.require("drops:read")
    found: dict[int, dict[str, int]] = {drop_id: {} for drop_id in drop_ids}
    if not drop_ids:
        return {}
    rows = await session.execute(
        select(
            SendRow.drop_id,
            SendRow.status,
            func.count(),
            func.count(SendRow.clicked_at),
            func.count(SendRow.complained_at),
        )
        .where(SendRow.org_id == principal.org_id, SendRow.drop_id.in_(list(drop_ids)))
        .group_by(SendRow.drop_id, SendRow.status)
    )
    for drop_id, status, n, clicked, complained in rows:
        tally = found[drop_id]
        for key, value in (
            ("frozen", n),
            (status, n),
            ("clicked", clicked),
            ("complained", complained),
        ):
            tally[key] = tally.get(key, 0) + int(value)
    return {
        drop_id: DropCounts(
            frozen=t.get("frozen", 0),
            pending=t.get("pending", 0),
            held=t.get("held", 0),
            claimed=t.get("claimed", 0),
            sent=sum(t.get(state, 0) for state in SENT_ROW_STATUSES),
            delivered=t.get("delivered", 0),
            bounced=t.get("bounced", 0),
            failed=t.get("failed", 0),
            skipped=t.get("skipped", 0),
            clicked=t.get("clicked", 0),
            complained=t.get("complained", 0),
        )
        for drop_id, t in found.items()
    }


async def variant_counts(
    session: AsyncSession, principal: Principal, drop_id: int
) -> dict[str, abtest.VariantOutcome]:
    """Per A/B variant of one drop: messages sent and rows clicked so far (the live view
    of the test before the decision)."""
    drop = await get_drop(session, principal, drop_id)
    rows = await session.execute(
        select(SendRow.variant, func.count(), func.count(SendRow.clicked_at))
        .where(
            SendRow.drop_id == drop.id,
            SendRow.variant.is_not(None),
            SendRow.status.in_(SENT_ROW_STATUSES),
        )
        .group_by(SendRow.variant)
    )
    return {
        str(name): abtest.VariantOutcome(str(name), int(sent), int(clicked))
        for name, sent, clicked in rows
    }
