"""The Day+1 NPS survey: who is asked, when, on which channel, and what they answered.

Rules:
- `schedule_for_event` asks every person who visited the event (a check-in: the `visits`
  table) and is a known, not erased contact with a channel: an open web chat or Telegram
  conversation that has not opted out, else email with email consent granted, else SMS
  with SMS consent granted. Each gets one invitation (unique per event and contact, so
  scheduling again only adds new visitors), due the day after the event's end at 10:00
  (or the hour asked for) on the event's wall clock.
- `send_due` (the worker tick) takes due invitations and, per row, picks the channel again
  with consent as it is then: with one, the message goes into the notification outbox and
  `survey_sent` into the funnel log, in the transaction that marks the row `sent`; with
  none (STOP, revoked, erased), the row is `skipped` and nobody is messaged. The outbox
  drainer (`usecases.notify`) checks suppression and consent again right before the
  provider call, and this renderer refuses a row whose channel lost its consent meanwhile.
- `answer` records a score 0-10 (and an optional comment) once: a conditional UPDATE from
  `sent`; a second answer is `409 already_answered`. `survey_answered` goes into the
  funnel log with the score as value and its NPS class as label, in the same transaction.
- Erasing a contact (`forget_contact`) blanks its invitations' contact, person and comment;
  the score stays, anonymous, so the event's NPS still adds up.
- NPS = % promoters (9-10) - % detractors (0-6), from -100 to 100, with a 95 % interval
  (adjusted Wald: the mean of +1/0/-1 scores, with three pseudo-answers added).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.models import Organization
from popdrop.accounts.service import Principal
from popdrop.audience.lifecycle import ConsentState
from popdrop.audience.models import Contact
from popdrop.chat.lifecycle import ENDED_CONVERSATION_STATUSES
from popdrop.chat.models import Conversation
from popdrop.checkin.models import Ticket, Visit
from popdrop.core import links
from popdrop.core.clock import Clock
from popdrop.core.db import Database, dialect_insert, table_of
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.identity import identity_hash, normalize_email, normalize_phone
from popdrop.core.localtime import zone_of
from popdrop.core.schemas import StrictInput, is_clean_text
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned
from popdrop.events.models import Event
from popdrop.inventory.models import Hold
from popdrop.metrics import kpis, log
from popdrop.metrics.kinds import Kind, nps_class
from popdrop.metrics.survey_models import (
    COMMENT_MAX,
    SCORE_MAX,
    SCORE_MIN,
    SURVEY_LIFECYCLE,
    SurveyChannel,
    SurveyInvitation,
    SurveyStatus,
)
from popdrop.outbound import outbox
from popdrop.outbound.outbox import Channel, Notification
from popdrop.rsvp.models import Rsvp
from popdrop.rsvp.notices import CHAT_SOURCE, chat_conversation_of
from popdrop.usecases import notify

SURVEY_NOTICE = "survey_invitation"  # the outbox kind of an invitation's message
SCHEDULE_SCOPE = "drops:write"  # messaging people who came is the mailings' permission
READ_SCOPE = "metrics:read"
DEFAULT_HOUR = 10
SEND_BATCH = 200
COMMENTS_SHOWN = 200
ALREADY_ANSWERED = "already_answered"
_LOOKUP_CHUNK = 500
# Conversation channels an invitation can go into (an SMS conversation is just SMS).
_CONVERSATION_CHANNELS = {"web": SurveyChannel.CHAT, "telegram": SurveyChannel.TELEGRAM}
_invitations = table_of(SurveyInvitation)


# ---------------------------------------------------------------- schemas


class ScheduleIn(StrictInput):
    hour: int = Field(
        default=DEFAULT_HOUR,
        ge=0,
        le=23,
        description="The hour (event's wall clock) on the day after the event's end",
    )


class ScheduleResult(BaseModel):
    event_id: int
    due_at: datetime
    visitors: int = Field(description="Known contacts among the visitors")
    scheduled: int = Field(description="Invitations added by this call")
    already: int = Field(description="Visitors invited before")
    no_channel: int = Field(description="Visitors with no channel they consented to")


class AnswerIn(StrictInput):
    score: int = Field(ge=SCORE_MIN, le=SCORE_MAX)
    comment: str | None = Field(default=None, max_length=COMMENT_MAX)


class AnswerOut(BaseModel):
    score: int
    label: str
    answered_at: datetime


class Comment(BaseModel):
    answered_at: datetime
    score: int
    label: str
    comment: str


class SurveySummary(BaseModel):
    event_id: int
    invited: int
    sent: int
    skipped: int
    answered: int
    promoters: int
    passives: int
    detractors: int
    nps: float | None = Field(description="% promoters - % detractors (-100 to 100)")
    ci_low: float | None = Field(description="95 % interval, low end")
    ci_high: float | None = Field(description="95 % interval, high end")
    distribution: list[int] = Field(description="Answers per score, 0 to 10")
    comments: list[Comment] = Field(description="Newest first; no contact details")


# ---------------------------------------------------------------- when and where


def due_at(event_ends_at: datetime, timezone: str, hour: int = DEFAULT_HOUR) -> datetime:
    """`hour`:00 on the event's wall clock, the day after its end (UTC)."""
    zone = zone_of(timezone)
    end_day = event_ends_at.astimezone(zone).date()
    return datetime.combine(end_day + timedelta(days=1), time(hour), tzinfo=zone).astimezone(UTC)


@dataclass(frozen=True)
class Route:
    """Where one invitation goes now: its channel, and the outbox's channel and address."""

    channel: SurveyChannel
    outbox_channel: Channel
    recipient: str


def _granted(value: str) -> bool:
    return value == ConsentState.GRANTED


def route_of(contact: Contact, conversation: Conversation | None) -> Route | None:
    """The channel a contact is asked on: their open chat conversation first (it is where
    they talk to us), else email, else SMS, each only with consent; None: nowhere."""
    if contact.erased_at is not None:
        return None
    if conversation is not None and contact.consent_chat != ConsentState.REVOKED:
        return Route(
            _CONVERSATION_CHANNELS[conversation.channel],
            Channel.CHAT,
            f"{CHAT_SOURCE}{conversation.id}",
        )
    if contact.email and _granted(contact.consent_email):
        return Route(SurveyChannel.EMAIL, Channel.EMAIL, contact.email)
    if contact.phone and _granted(contact.consent_sms):
        return Route(SurveyChannel.SMS, Channel.SMS, contact.phone)
    return None


async def _open_conversations(
    session: AsyncSession, org_id: int, contact_ids: Sequence[int]
) -> dict[int, Conversation]:
    """Each contact's most recent open conversation on a channel an invitation can use."""
    found: dict[int, Conversation] = {}
    for chunk in _chunks(contact_ids):
        rows = await session.scalars(
            select(Conversation)
            .where(
                Conversation.org_id == org_id,
                Conversation.contact_id.in_(chunk),
                Conversation.channel.in_(list(_CONVERSATION_CHANNELS)),
                Conversation.address.is_not(None),
                Conversation.opted_out_at.is_(None),
                Conversation.status.not_in([str(s) for s in ENDED_CONVERSATION_STATUSES]),
            )
            .order_by(Conversation.last_message_at)
        )
        for conversation in rows:
            assert conversation.contact_id is not None
            found[conversation.contact_id] = conversation  # the latest wins
    return found


def _chunks(values: Sequence[Any]) -> Iterable[list[Any]]:
    for start in range(0, len(values), _LOOKUP_CHUNK):
        yield list(values[start : start + _LOOKUP_CHUNK])


# ---------------------------------------------------------------- scheduling


async def visitor_contacts(
    session: AsyncSession, signer: Signer, org_id: int, event_id: int
) -> list[Contact]:
    """The known, not erased contacts among the event's visitors: found through the
    ticket's holder, the RSVP's email or phone, or the hold's contact reference."""
    rows = (
        await session.execute(
            select(Ticket.holder_ref, Rsvp.email, Rsvp.phone, Hold.contact_ref)
            .select_from(Visit)
            .join(Ticket, Ticket.id == Visit.ticket_id)
            .outerjoin(Rsvp, (Visit.subject_kind == "rsvp") & (Rsvp.id == Visit.subject_id))
            .outerjoin(Hold, (Visit.subject_kind == "hold") & (Hold.id == Visit.subject_id))
            .where(Visit.org_id == org_id, Visit.event_id == event_id)
        )
    ).all()
    ids: set[int] = set()
    conversations: set[int] = set()
    hashes: set[bytes] = set()
    for holder, email, phone, contact_ref in rows:
        for ref in (holder, email, phone, contact_ref):
            if not ref:
                continue
            if ref.startswith("contact:") and ref.removeprefix("contact:").isdigit():
                ids.add(int(ref.removeprefix("contact:")))
            elif (conversation_id := chat_conversation_of(ref)) is not None:
                conversations.add(conversation_id)
            elif (digest := _point_hash(signer, ref)) is not None:
                hashes.add(digest)
    for chunk in _chunks(sorted(conversations)):
        ids.update(
            cid
            for cid in await session.scalars(
                select(Conversation.contact_id).where(
                    Conversation.org_id == org_id,
                    Conversation.id.in_(chunk),
                    Conversation.contact_id.is_not(None),
                )
            )
            if cid is not None
        )
    contacts: dict[int, Contact] = {}
    conditions = [Contact.id.in_(chunk) for chunk in _chunks(sorted(ids))]
    for chunk in _chunks(sorted(hashes)):
        conditions += [Contact.email_hash.in_(chunk), Contact.phone_hash.in_(chunk)]
    for condition in conditions:
        for contact in await session.scalars(
            select(Contact).where(Contact.org_id == org_id, Contact.erased_at.is_(None), condition)
        ):
            contacts[contact.id] = contact
    return [contacts[cid] for cid in sorted(contacts)]


def _point_hash(signer: Signer, ref: str) -> bytes | None:
    """The keyed hash of an email or a phone number as contacts store it; None for any
    other reference (or one no longer valid)."""
    try:
        if "@" in ref:
            return identity_hash(signer, "email", normalize_email(ref))
        if ref.startswith("+"):
            return identity_hash(signer, "phone", normalize_phone(ref))
    except PopdropError:
        return None
    return None


async def schedule_for_event(
    session: AsyncSession,
    signer: Signer,
    principal: Principal,
    event_id: int,
    *,
    now: datetime,
    hour: int = DEFAULT_HOUR,
) -> ScheduleResult:
    """Invite every visitor with a channel (once per event); see the module's rules."""
    principal.require(SCHEDULE_SCOPE)
    if not 0 <= hour <= 23:
        raise PopdropError("invalid_request", "hour: 0 to 23", detail={"field": "hour"})
    event = await owned(session, Event, event_id, principal.org_id, what="event")
    when = due_at(event.ends_at, event.timezone, hour)
    contacts = await visitor_contacts(session, signer, principal.org_id, event.id)
    invited = set(
        await session.scalars(
            select(SurveyInvitation.contact_id).where(
                SurveyInvitation.org_id == principal.org_id,
                SurveyInvitation.event_id == event.id,
                SurveyInvitation.contact_id.is_not(None),
            )
        )
    )
    conversations = await _open_conversations(
        session, principal.org_id, [c.id for c in contacts if c.id not in invited]
    )
    rows: list[dict[str, Any]] = []
    no_channel = 0
    for contact in contacts:
        if contact.id in invited:
            continue
        route = route_of(contact, conversations.get(contact.id))
        if route is None:
            no_channel += 1
            continue
        rows.append(
            {
                "org_id": principal.org_id,
                "event_id": event.id,
                "contact_id": contact.id,
                "person": log.point_person(contact.email_hash, contact.phone_hash, contact.id),
                "channel": route.channel.value,
                "status": SurveyStatus.SCHEDULED.value,
                "created_at": now,
                "due_at": when,
            }
        )
    if rows:
        # A concurrent schedule of the same event keeps the first row per person.
        statement = dialect_insert(
            session.get_bind().dialect.name, _invitations
        ).on_conflict_do_nothing(index_elements=["event_id", "contact_id"])
        await session.execute(statement, rows)
    return ScheduleResult(
        event_id=event.id,
        due_at=when,
        visitors=len(contacts),
        scheduled=len(rows),
        already=sum(1 for c in contacts if c.id in invited),
        no_channel=no_channel,
    )


# ---------------------------------------------------------------- sending


async def send_due(db: Database, signer: Signer, clock: Clock, base_url: str) -> dict[str, int]:
    """Hand every due invitation to the outbox (or skip it); {"sent": n, "skipped": n}.
    One transaction per batch. The answer link is made from `signer` and `base_url` when
    the drainer renders the message (`render_invitation`, the worker's own signer and base
    URL), so a row enqueued here holds no link."""
    counts = {"sent": 0, "skipped": 0}
    while True:
        now = clock.now()
        async with db.transaction() as session:
            batch = await _send_batch(session, now)
        for outcome, n in batch.items():
            counts[outcome] += n
        if sum(batch.values()) < SEND_BATCH:
            return counts


async def _send_batch(session: AsyncSession, now: datetime) -> dict[str, int]:
    due = list(
        (
            await session.execute(
                select(
                    SurveyInvitation.id,
                    SurveyInvitation.org_id,
                    SurveyInvitation.event_id,
                    SurveyInvitation.contact_id,
                )
                .where(
                    SurveyInvitation.status == SurveyStatus.SCHEDULED,
                    SurveyInvitation.due_at <= now,
                )
                .order_by(SurveyInvitation.due_at, SurveyInvitation.id)
                .limit(SEND_BATCH)
            )
        ).all()
    )
    counts = {"sent": 0, "skipped": 0}
    if not due:
        return counts
    contact_ids = sorted({row.contact_id for row in due if row.contact_id is not None})
    contacts: dict[int, Contact] = {}
    for chunk in _chunks(contact_ids):
        for loaded in await session.scalars(
            select(Contact).where(Contact.id.in_(chunk)).execution_options(populate_existing=True)
        ):
            contacts[loaded.id] = loaded
    conversations: dict[tuple[int, int], Conversation] = {}
    for org_id in {row.org_id for row in due}:
        for cid, conversation in (await _open_conversations(session, org_id, contact_ids)).items():
            conversations[(org_id, cid)] = conversation
    notices: list[outbox.Notice] = []
    entries: list[log.Entry] = []
    for row in due:
        contact = contacts.get(row.contact_id) if row.contact_id is not None else None
        route = None
        if contact is not None and contact.org_id == row.org_id:
            route = route_of(contact, conversations.get((row.org_id, contact.id)))
        target = SurveyStatus.SENT if route is not None else SurveyStatus.SKIPPED
        values: dict[str, Any] = {"status": target}
        if route is not None:
            values |= {"channel": route.channel.value, "sent_at": now}
        moved = await session.scalar(
            update(SurveyInvitation)
            .where(
                SurveyInvitation.id == row.id,
                SurveyInvitation.status.in_(SURVEY_LIFECYCLE.sources(target)),
            )
            .values(**values)
            .returning(SurveyInvitation.id)
        )
        if moved is None:  # another sender took it
            continue
        counts[str(target)] += 1
        if route is None or contact is None:
            continue
        notices.append(
            outbox.Notice(
                row.org_id,
                SURVEY_NOTICE,
                f"survey:{row.id}",
                route.outbox_channel,
                route.recipient,
                {"invitation": row.id},
            )
        )
        entries.append(
            log.Entry(
                row.org_id,
                Kind.SURVEY_SENT,
                now,
                log.Tags(channel=route.channel.value, event_id=row.event_id),
                person=log.point_person(contact.email_hash, contact.phone_hash, contact.id),
                subject=f"survey:{row.id}",
            )
        )
    await outbox.enqueue(session, notices, now=now)
    await log.record_many(session, entries)
    return counts


async def render_invitation(
    session: AsyncSession,
    row: Notification,
    payload: dict[str, Any],
    ctx: notify.RenderContext,
) -> notify.Message | None:
    """The invitation's message with its answer link; None once it is answered or its
    person was erased, or when the channel's consent is no longer granted."""
    found = (
        await session.execute(
            select(SurveyInvitation, Event.title, Organization.name)
            .join(Event, Event.id == SurveyInvitation.event_id)
            .join(Organization, Organization.id == SurveyInvitation.org_id)
            .where(
                SurveyInvitation.id == payload.get("invitation"),
                SurveyInvitation.org_id == row.org_id,
            )
        )
    ).first()
    if found is None:
        return None
    invitation, title, org_name = found
    if invitation.status != SurveyStatus.SENT or invitation.contact_id is None:
        return None
    if row.channel in (Channel.EMAIL, Channel.SMS):
        column = "consent_email" if row.channel == Channel.EMAIL else "consent_sms"
        state = await session.scalar(
            select(getattr(Contact, column)).where(Contact.id == invitation.contact_id)
        )
        if state != ConsentState.GRANTED:
            return None
    link = links.survey_url(ctx.signer, ctx.base_url, invitation.id, invitation.org_id)
    if row.channel != Channel.EMAIL:
        text = (
            f"Thanks for coming to {title}! How likely are you to recommend it to a friend, "
            f"0-10? One tap: {link}"
        )
        return notify.Message(subject="", text=text)
    text = (
        f"Thanks for coming to {title}.\n\n"
        f"How likely are you to recommend it to a friend or colleague, from 0 (not at all) "
        f"to 10 (extremely)? One tap answers:\n{link}\n\n"
        f"A comment is welcome but optional. It takes ten seconds, and it helps "
        f"{org_name} make the next one better.\n"
    )
    return notify.Message(subject=f"How was {title}?", text=text)


# The drainer renders invitations with this (its table lists the kinds it knows).
notify.RENDERERS.setdefault(SURVEY_NOTICE, render_invitation)


# ---------------------------------------------------------------- answering


async def invitation_of_token(
    session: AsyncSession, signer: Signer, token: str
) -> SurveyInvitation:
    """The invitation a survey link names; a bad or foreign token is simply not found."""
    try:
        invitation_id, org_id = links.read_survey(signer, token)
    except PopdropError as error:
        raise not_found("survey") from error
    invitation = await session.scalar(
        select(SurveyInvitation)
        .where(SurveyInvitation.id == invitation_id, SurveyInvitation.org_id == org_id)
        .execution_options(populate_existing=True)
    )
    if invitation is None or invitation.status not in (SurveyStatus.SENT, SurveyStatus.ANSWERED):
        raise not_found("survey")
    return invitation


def clean_comment(comment: str | None) -> str | None:
    """The comment as stored: stripped, None when empty; refused when too long or not text."""
    if comment is None or not comment.strip():
        return None
    comment = comment.strip()
    if len(comment) > COMMENT_MAX or not is_clean_text(comment):
        raise PopdropError(
            "invalid_request",
            f"comment: at most {COMMENT_MAX} characters of text",
            detail={"field": "comment"},
        )
    return comment


async def answer(
    session: AsyncSession,
    invitation_id: int,
    score: int,
    comment: str | None,
    *,
    org_id: int,
    now: datetime,
) -> AnswerOut:
    """Record the answer once (a second one is `409 already_answered`) and log it."""
    if isinstance(score, bool) or not SCORE_MIN <= score <= SCORE_MAX:
        raise PopdropError(
            "invalid_request",
            f"score: a whole number from {SCORE_MIN} to {SCORE_MAX}",
            detail={"field": "score"},
        )
    text = clean_comment(comment)
    moved = (
        await session.execute(
            update(SurveyInvitation)
            .where(
                SurveyInvitation.id == invitation_id,
                SurveyInvitation.org_id == org_id,
                SurveyInvitation.status.in_(SURVEY_LIFECYCLE.sources(SurveyStatus.ANSWERED)),
            )
            .values(status=SurveyStatus.ANSWERED, score=score, comment=text, answered_at=now)
            .returning(SurveyInvitation.event_id, SurveyInvitation.person, SurveyInvitation.channel)
        )
    ).first()
    if moved is None:
        status = await session.scalar(
            select(SurveyInvitation.status).where(
                SurveyInvitation.id == invitation_id, SurveyInvitation.org_id == org_id
            )
        )
        if status == SurveyStatus.ANSWERED:
            raise PopdropError(ALREADY_ANSWERED, "this survey is already answered", status=409)
        raise not_found("survey")
    label = nps_class(score)
    await log.record(
        session,
        org_id,
        Kind.SURVEY_ANSWERED,
        at=now,
        tags=log.Tags(channel=moved.channel, event_id=moved.event_id, label=label),
        person=moved.person,
        subject=f"survey:{invitation_id}",
        value=score,
    )
    return AnswerOut(score=score, label=label, answered_at=now)


# ---------------------------------------------------------------- results


def nps_interval(promoters: int, detractors: int, n: int) -> tuple[float, float, float] | None:
    """(NPS, low, high) in points, rounded to a tenth: `kpis.nps_of` (the adjusted Wald
    interval); None for n=0."""
    nps = kpis.nps_of(promoters, n - promoters - detractors, detractors)
    if nps.score is None or nps.ci_low is None or nps.ci_high is None:
        return None
    return (round(nps.score, 1), round(nps.ci_low, 1), round(nps.ci_high, 1))


async def summary(session: AsyncSession, principal: Principal, event_id: int) -> SurveySummary:
    """The event's answers: NPS with its interval, the 0-10 distribution and the comments
    (newest first, never who wrote them)."""
    principal.require(READ_SCOPE)
    event = await owned(session, Event, event_id, principal.org_id, what="event")
    where = (SurveyInvitation.org_id == principal.org_id, SurveyInvitation.event_id == event.id)
    statuses = dict(
        (
            await session.execute(
                select(SurveyInvitation.status, func.count())
                .where(*where)
                .group_by(SurveyInvitation.status)
            )
        ).all()
    )
    distribution = [0] * (SCORE_MAX + 1)
    for score, n in await session.execute(
        select(SurveyInvitation.score, func.count())
        .where(*where, SurveyInvitation.status == SurveyStatus.ANSWERED)
        .group_by(SurveyInvitation.score)
    ):
        if score is not None:
            distribution[int(score)] = int(n)
    answered = sum(distribution)
    promoters, passives = sum(distribution[9:]), sum(distribution[7:9])
    detractors = answered - promoters - passives
    interval = nps_interval(promoters, detractors, answered)
    comments = [
        Comment(answered_at=at, score=score, label=nps_class(score), comment=text)
        for at, score, text in await session.execute(
            select(
                SurveyInvitation.answered_at,
                func.coalesce(SurveyInvitation.score, 0),  # answered rows have one (a CHECK)
                SurveyInvitation.comment,
            )
            .where(
                *where,
                SurveyInvitation.status == SurveyStatus.ANSWERED,
                SurveyInvitation.comment.is_not(None),
            )
            .order_by(SurveyInvitation.answered_at.desc(), SurveyInvitation.id.desc())
            .limit(COMMENTS_SHOWN)
        )
    ]
    sent = sum(int(statuses.get(s, 0)) for s in (SurveyStatus.SENT, SurveyStatus.ANSWERED))
    return SurveySummary(
        event_id=event.id,
        invited=sum(int(n) for n in statuses.values()),
        sent=sent,
        skipped=int(statuses.get(SurveyStatus.SKIPPED, 0)),
        answered=answered,
        promoters=promoters,
        passives=passives,
        detractors=detractors,
        nps=interval[0] if interval else None,
        ci_low=interval[1] if interval else None,
        ci_high=interval[2] if interval else None,
        distribution=distribution,
        comments=comments,
    )


# ---------------------------------------------------------------- erasure


async def forget_contact(session: AsyncSession, org_id: int, contact_id: int) -> int:
    """Erase: the contact's invitations lose the person, its link and the comment (the
    score stays, anonymous); one not sent yet never will be. The rows changed."""
    where = (SurveyInvitation.org_id == org_id, SurveyInvitation.contact_id == contact_id)
    await session.execute(
        update(SurveyInvitation)
        .where(
            *where,
            SurveyInvitation.status.in_(SURVEY_LIFECYCLE.sources(SurveyStatus.SKIPPED)),
        )
        .values(status=SurveyStatus.SKIPPED)
    )
    result = await session.execute(
        update(SurveyInvitation).where(*where).values(contact_id=None, person=None, comment=None)
    )
    return int(getattr(result, "rowcount", 0) or 0)
