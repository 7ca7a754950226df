"""The send loop: claim a batch, re-check each recipient at the last moment, render, call
the provider, checkpoint each outcome at once. One `Sender` per worker process.

Rules:
- Consent is checked per message, right before its provider call, by a read that started
  after the message was ready to go (`_ConsentGate`: concurrent sends share one read). On
  PostgreSQL that read share-locks the contact's row until the provider call returned,
  so an opt-out (an UPDATE of that row) commits, and is acknowledged, only after every
  call that did not see it: no provider call starts after an opt-out's acknowledgement.
- The batch-level read (consent, erasure, frequency cap, quiet hours) only saves work on
  rows that are already refused; it is not what keeps an opt-out.

Throughput comes from batching the database work (one claim, one contact read, one
voucher insert per batch; one consent read and one checkpoint commit per group of
concurrent sends) and running provider calls concurrently up to the transport's pool
size; safety from committing each message's outcome right after its provider call.

The funnel log's `message_sent` (and `message_delivered` when the transport knows the
message arrived) of a group is written by the group's checkpoint commit, in one statement:
an event is in the log exactly when its row is recorded sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, String, bindparam, func, select, update

from popdrop.audience import consent, settings, unsubscribe
from popdrop.audience.models import Contact
from popdrop.core import links as signed_links
from popdrop.core import metrics
from popdrop.core.clock import Clock
from popdrop.core.db import Database, UTCDateTime
from popdrop.core.errors import PopdropError
from popdrop.core.logging import log
from popdrop.core.signing import Signer
from popdrop.drops import content, shortlinks
from popdrop.drops.lifecycle import SENT_ROW_STATUSES, DropStatus, SendRowStatus
from popdrop.drops.models import Drop, DropVariant, SendRow
from popdrop.drops.service import Claimed, claim_batch, quiet_until
from popdrop.events.models import Event
from popdrop.metrics import log as funnel
from popdrop.metrics.kinds import Kind, Segment
from popdrop.outbound.transports import (
    EmailTransport,
    OutboundEmail,
    OutboundSms,
    SendResult,
    SmsTransport,
)
from popdrop.vouchers import service as vouchers
from popdrop.vouchers.models import VoucherBatch

MAX_ATTEMPTS = 5
# A contact row another transaction is changing (an opt-out, a click) is asked about
# again after these pauses; past them the message is put back for a later try.
_BUSY_PAUSES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
_BUSY_RETRY_SECONDS = 5.0
# Built once: a statement per message is the hot path of a send.
_CHECKPOINT = (
    update(SendRow)
    .where(SendRow.id == bindparam("row_id"), SendRow.claimed_by == bindparam("worker"))
    .values(
        status=bindparam("status"),
        message_id=bindparam("message_id"),
        voucher_id=func.coalesce(bindparam("voucher_id", type_=BigInteger), SendRow.voucher_id),
        sent_at=func.coalesce(bindparam("sent_at", type_=UTCDateTime), SendRow.sent_at),
        delivered_at=func.coalesce(
            bindparam("delivered_at", type_=UTCDateTime), SendRow.delivered_at
        ),
        provider_id=func.coalesce(bindparam("provider_id", type_=String), SendRow.provider_id),
        not_before=func.coalesce(bindparam("not_before", type_=UTCDateTime), SendRow.not_before),
        outcome=func.coalesce(bindparam("outcome", type_=String), SendRow.outcome),
        claimed_by=None,
    )
)


# The same checkpoint on PostgreSQL for a whole group, with its funnel events, as one
# statement that commits on its own (one round trip): the rows come in as arrays. A
# checkpoint whose lease another worker took matches no row but is logged: its message
# did go out (a duplicate with the same Message-ID); `subject` names the row. The commit
# does not wait for the WAL flush (`set_config(... true)` is `SET LOCAL`: this statement's
# own implicit transaction), see `_GroupCommit`.
_CHECKPOINT_COLUMNS = (
    "row_id",
    "worker",
    "status",
    "message_id",
    "voucher_id",
    "sent_at",
    "delivered_at",
    "provider_id",
    "not_before",
    "outcome",
)
_CHECKPOINT_PG = """
WITH given AS (
    SELECT * FROM unnest(
        $1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[],
        $6::timestamptz[], $7::timestamptz[], $8::text[], $9::timestamptz[], $10::text[]
    ) AS g(row_id, worker, status, message_id, voucher_id,
           sent_at, delivered_at, provider_id, not_before, outcome)
), marked AS (
    UPDATE send_rows AS s SET
        status = g.status,
        message_id = g.message_id,
        voucher_id = coalesce(g.voucher_id, s.voucher_id),
        sent_at = coalesce(g.sent_at, s.sent_at),
        delivered_at = coalesce(g.delivered_at, s.delivered_at),
        provider_id = coalesce(g.provider_id, s.provider_id),
        not_before = coalesce(g.not_before, s.not_before),
        outcome = coalesce(g.outcome, s.outcome),
        claimed_by = NULL
    FROM given AS g
    WHERE s.id = g.row_id AND s.claimed_by = g.worker
      AND set_config('synchronous_commit', 'off', true) = 'off'
    RETURNING s.id
)
INSERT INTO funnel_events (org_id, at, kind, channel, event_id, drop_id, variant, segment,
                           partner_id, lane_id, label, person, subject, value, currency,
                           rolled)
SELECT e.*, false FROM unnest(
    $11::bigint[], $12::timestamptz[], $13::text[], $14::text[], $15::bigint[],
    $16::bigint[], $17::text[], $18::text[], $19::bigint[], $20::bigint[], $21::text[],
    $22::text[], $23::text[], $24::bigint[], $25::text[]
) AS e
"""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class _DropContext:
    drop: Drop
    variants: dict[str, content.CompiledVariant]
    batch: VoucherBatch | None
    event: Event | None
    hot_days: int
    warm_days: int
    # Where the SMS provider reports each message's fate (Twilio's StatusCallback).
    sms_status_url: str
    # SMS short links made in this run: variant → destination → slug (`drops.shortlinks`).
    short_slugs: dict[str, dict[str, str]] = field(default_factory=dict)
    short_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Ready:
    """A drop's share of a claimed batch, checked and with its vouchers, ready to send."""

    context: _DropContext
    to_send: list[tuple[Claimed, Contact]]
    codes: dict[int, tuple[int, str]]
    now: datetime


@dataclass
class Sender:
    db: Database
    signer: Signer
    clock: Clock
    base_url: str
    email: EmailTransport | None = None
    sms: SmsTransport | None = None
    worker: str = field(default_factory=worker_name)
    lease_seconds: float = 60.0
    batch_size: int = 200
    concurrency: int = 8
    # Messages between the start of their provider call and their committed checkpoint:
    # the most a crash can send twice. Defaults to `concurrency`; a worker sets it to the
    # SMTP pool size and runs twice as many tasks, so rendering overlaps sending.
    in_flight: int | None = None
    org_id: int | None = None  # only this organization's drops (None: every organization)
    # Where SMS short links are printed (`Settings.short_links_base`); None: `base_url`.
    short_base_url: str | None = None
    _drops: dict[int, _DropContext] = field(default_factory=dict)
    # Consent reads holding their row locks at once (each holds a connection while its
    # group's provider calls run).
    consent_holds: int = 2
    _checkpoints: _GroupCommit | None = None
    _consent: _ConsentGate | None = None
    _permits: asyncio.Semaphore | None = None

    async def run_until_idle(self, *, max_batches: int | None = None) -> int:
        """Send every due row; the number of rows handled.

        Batches overlap: while one batch is on the wire, the next is claimed, its
        recipients read and its vouchers issued, and its sends start as soon as it is
        ready (they share the provider-call permits with the batch before, so the
        in-flight bound holds across both). At most two batches are out at once: the
        next claim waits for the older one to finish.
        """
        handled = 0
        batches = 0
        sending: list[asyncio.Task[None]] = []
        try:
            while max_batches is None or batches < max_batches:
                claimed = await self._claim()
                if not claimed:
                    break
                handled += len(claimed)
                batches += 1
                ready = await self._prepare_batch(claimed)
                sending.append(asyncio.create_task(self._send_batch(ready)))
                while len(sending) > 1:
                    await sending.pop(0)
        finally:
            # Whatever happened, every started send finishes and records its outcome.
            results = await asyncio.gather(*sending, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return handled

    async def run_once(self) -> int:
        claimed = await self._claim()
        if claimed:
            await self._send_batch(await self._prepare_batch(claimed))
        return len(claimed)

    async def _claim(self) -> list[Claimed]:
        now = self.clock.now()
        async with self.db.transaction() as session:
            conn = await session.connection()
            return await claim_batch(
                conn,
                worker=self.worker,
                now=now,
                lease_seconds=self.lease_seconds,
                limit=self.batch_size,
                org_id=self.org_id,
            )

    async def _drop(self, drop_id: int) -> _DropContext:
        """The drop's compiled content, cached; its state re-read on every batch."""
        async with self.db.reader() as session:
            drop = await session.get(Drop, drop_id, populate_existing=True)
            assert drop is not None
            known = self._drops.get(drop_id)
            if known is not None:
                known.drop = drop
                return known
            variants = (
                await session.scalars(select(DropVariant).where(DropVariant.drop_id == drop_id))
            ).all()
            batch = (
                await session.get(VoucherBatch, drop.voucher_batch_id)
                if drop.voucher_batch_id
                else None
            )
            event = await session.get(Event, drop.event_id) if drop.event_id else None
            recency = await settings.get_settings(session, drop.org_id)
        context = _DropContext(
            drop,
            {v.name: content.compile_variant(v.content) for v in variants},
            batch,
            event,
            recency.hot_days,
            recency.warm_days,
            signed_links.webhook_urls(self.signer, self.base_url, drop.org_id, ())["twilio_status"],
        )
        self._drops[drop_id] = context
        return context

    async def _prepare_batch(self, claimed: list[Claimed]) -> list[_Ready]:
        """Per drop of the batch: the rows that may go out now, with their contacts and
        vouchers (the refused and deferred ones are recorded here)."""
        by_drop: dict[int, list[Claimed]] = defaultdict(list)
        for row in claimed:
            by_drop[row.drop_id].append(row)
        ready: list[_Ready] = []
        for drop_id, rows in by_drop.items():
            context = await self._drop(drop_id)
            if context.drop.status != DropStatus.SENDING:  # paused or cancelled since the claim
                await self._release(rows)
                continue
            ready.append(await self._prepare_rows(context, rows))
        return ready

    async def _send_batch(self, ready: list[_Ready]) -> None:
        for batch in ready:
            await self._send_rows(batch)

    async def _release(self, rows: Sequence[Claimed]) -> None:
        async with self.db.transaction() as session:
            await session.execute(
                update(SendRow)
                .where(SendRow.id.in_([r.id for r in rows]), SendRow.claimed_by == self.worker)
                .values(status=SendRowStatus.PENDING, claimed_at=None, claimed_by=None)
            )

    async def _prepare_rows(self, context: _DropContext, rows: list[Claimed]) -> _Ready:
        drop = context.drop
        now = self.clock.now()
        contacts, recent = await self._recipients(drop, rows, now)
        to_send: list[tuple[Claimed, Contact]] = []
        skipped: dict[str, list[int]] = defaultdict(list)
        deferred: dict[datetime, list[int]] = defaultdict(list)
        for row in rows:
            contact = contacts.get(row.contact_id)
            reason = _refusal(row, contact)
            if (
                reason is None
                and recent.get((row.contact_id, row.channel), 0) >= drop.frequency_cap
            ):
                reason = "frequency_cap"
            if reason is not None:
                skipped[reason].append(row.id)
                continue
            assert contact is not None
            zone = contact.time_zone or (context.event.timezone if context.event else None)
            opening = quiet_until(now, zone, drop.quiet_start_hour, drop.quiet_end_hour)
            if opening is not None:
                deferred[opening].append(row.id)
                continue
            to_send.append((row, contact))
        async with self.db.transaction() as session:
            for reason, ids in skipped.items():
                await session.execute(
                    update(SendRow)
                    .where(SendRow.id.in_(ids))
                    .values(status=SendRowStatus.SKIPPED, outcome=reason, claimed_by=None)
                )
            for opening, ids in deferred.items():
                await session.execute(
                    update(SendRow)
                    .where(SendRow.id.in_(ids))
                    .values(
                        status=SendRowStatus.PENDING,
                        not_before=opening,
                        claimed_at=None,
                        claimed_by=None,
                    )
                )
            codes = await self._vouchers(session, context, to_send, now)
        return _Ready(context, to_send, codes, now)

    async def _send_rows(self, ready: _Ready) -> None:
        context, to_send, codes, now = ready.context, ready.to_send, ready.codes, ready.now
        gate = asyncio.Semaphore(self.concurrency)

        async def one(row: Claimed, contact: Contact) -> None:
            async with gate:
                await self._send_one(context, row, contact, codes.get(row.id), now)

        if self._checkpoints is None:
            self._checkpoints = _GroupCommit(self.db)
            self._consent = _ConsentGate(self.db, self.consent_holds)
            self._permits = asyncio.Semaphore(self.in_flight or self.concurrency)

        ids = [row.id for row, _c in to_send]
        heartbeat = asyncio.create_task(self._heartbeat(ids))
        try:
            await asyncio.gather(*(one(row, contact) for row, contact in to_send))
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _heartbeat(self, ids: list[int]) -> None:
        """Keep this batch's lease fresh while it sends (a slow provider, a rate limit), so
        no other worker takes rows that are still on their way out."""
        while ids:
            await asyncio.sleep(self.lease_seconds / 3)
            async with self.db.single_statements() as conn:
                await conn.execute(
                    update(SendRow)
                    .where(
                        SendRow.id.in_(ids),
                        SendRow.claimed_by == self.worker,
                        SendRow.status == SendRowStatus.CLAIMED,
                    )
                    .values(claimed_at=self.clock.now())
                )

    async def _recipients(
        self, drop: Drop, rows: Sequence[Claimed], now: datetime
    ) -> tuple[dict[int, Contact], dict[tuple[int, str], int]]:
        """The contacts as they are now, and how many messages each got in the cap window."""
        ids = list({r.contact_id for r in rows})
        window = now - timedelta(hours=drop.frequency_window_hours)
        async with self.db.reader() as session:
            contacts = {
                c.id: c
                for c in (
                    await session.scalars(
                        select(Contact)
                        .where(Contact.id.in_(ids))
                        .execution_options(populate_existing=True)
                    )
                ).all()
            }
            counted = await session.execute(
                select(SendRow.contact_id, SendRow.channel, func.count())
                .where(
                    SendRow.contact_id.in_(ids),
                    SendRow.status.in_(SENT_ROW_STATUSES),
                    SendRow.sent_at >= window,
                    SendRow.drop_id != drop.id,
                )
                .group_by(SendRow.contact_id, SendRow.channel)
            )
            recent = {(cid, ch): int(n) for cid, ch, n in counted}
        return contacts, recent

    async def _vouchers(
        self,
        session: Any,
        context: _DropContext,
        rows: Sequence[tuple[Claimed, Contact]],
        now: datetime,
    ) -> dict[int, tuple[int, str]]:
        if context.batch is None:
            return {}
        # One code per contact and drop, whichever channel carries it.
        subjects = {row.id: f"drop:{row.drop_id}:{row.contact_id}" for row, _contact in rows}
        issued = await vouchers.issue_derived(
            session, self.signer, context.batch, list(set(subjects.values())), now=now
        )
        return {row_id: issued[subject] for row_id, subject in subjects.items()}

    async def _send_one(
        self,
        context: _DropContext,
        row: Claimed,
        contact: Contact,
        voucher: tuple[int, str] | None,
        now: datetime,
    ) -> None:
        drop = context.drop
        message_id = f"<drop-{drop.id}.contact-{contact.id}.{row.channel}@popdrop>"
        tags = _funnel_tags(context, row, contact, now)
        person = funnel.point_person(contact.email_hash, contact.phone_hash, contact.id)
        message: OutboundEmail | OutboundSms | SendResult
        try:
            message, missing = self._prepare(context, row, contact, voucher, message_id, now)
            if missing and await self._shorten(context, row, missing, now):
                message, _missing = self._prepare(context, row, contact, voucher, message_id, now)
        except PopdropError as error:  # a template that fails for this contact's data
            message = SendResult(ok=False, permanent=True, error=f"render: {error.message}")
        assert self._permits is not None and self._consent is not None
        if isinstance(message, SendResult):
            async with self._permits:
                await self._checkpoint(row, message, message_id, voucher, tags, person)
            return
        gate = self._consent
        # Rendered outside the permit (it is CPU only); from the provider call to the
        # committed checkpoint inside it, so at most `in_flight` messages are unrecorded.
        # Where the consent read holds a row lock (PostgreSQL) it is taken before the
        # permit, so it overlaps other messages' calls and the answer still holds when this
        # call starts; without locks (SQLite) it is read inside, as late as it can be.
        async with contextlib.AsyncExitStack() as stack:
            if gate.locks:
                ask = await gate.ask(row)
                stack.callback(ask.release)
                await stack.enter_async_context(self._permits)
            else:
                await stack.enter_async_context(self._permits)
                ask = await gate.ask(row)
                stack.callback(ask.release)
            refusal = ask.refusal
            if refusal is None:
                try:
                    if isinstance(message, OutboundEmail):
                        assert self.email is not None
                        result = await self.email.send(message)
                    else:
                        assert self.sms is not None
                        result = await self.sms.send(message)
                finally:
                    ask.release()  # the call returned: an opt-out may commit now
                await self._checkpoint(row, result, message_id, voucher, tags, person)
            elif refusal in _REFUSALS:
                await self._skip(row, refusal)
            else:  # consent could not be read now: not sent, tried again later
                retry = SendResult(ok=False, error=refusal, retry_after=_BUSY_RETRY_SECONDS)
                await self._checkpoint(row, retry, message_id, voucher, tags, person)

    async def _shorten(
        self, context: _DropContext, row: Claimed, destinations: set[str], now: datetime
    ) -> bool:
        """Make (or find) the short links of these SMS destinations and commit them before
        any message carries one; False when the database refused (the message then goes
        out with its `/r/{token}` links, which work and are attributed too)."""
        slugs = context.short_slugs.setdefault(_variant_name(context, row), {})
        async with context.short_lock:  # concurrent sends of one drop make each link once
            todo = sorted(d for d in destinations if d not in slugs)
            if not todo:
                return True
            try:
                async with self.db.transaction() as session:
                    made = {
                        destination: await shortlinks.drop_link(
                            session,
                            context.drop,
                            variant=_variant_name(context, row),
                            channel="sms",
                            destination=destination,
                            now=now,
                        )
                        for destination in todo
                    }
                    found = {d: link.slug for d, link in made.items()}
            except Exception as error:  # the links stay /r/ for this message
                log.warning("drops: short links not made", drop=context.drop.id, error=repr(error))
                return False
            slugs.update(found)
        return True

    def _prepare(
        self,
        context: _DropContext,
        row: Claimed,
        contact: Contact,
        voucher: tuple[int, str] | None,
        message_id: str,
        now: datetime,
    ) -> tuple[OutboundEmail | OutboundSms, set[str]]:
        """The message, and the SMS destinations that have no short link yet (they are
        `/r/{token}` links in this render)."""
        drop = context.drop
        variant_name = _variant_name(context, row)
        variant = context.variants[variant_name]
        bucket = settings.bucket_of(
            contact.last_engaged_at, now, context.hot_days, context.warm_days
        )
        links = content.Links(
            self.signer, self.base_url, drop, row.id, contact, short_base_url=self.short_base_url
        )
        values = content.context_for(drop, contact, context.event, voucher, links)
        if row.channel == "email":
            assert contact.email is not None
            rendered = variant.render_email(bucket, values, links)
            email = OutboundEmail(
                message_id=message_id,
                to=contact.email,
                from_address=drop.from_email,
                from_name=drop.from_name,
                subject=rendered.subject,
                text=rendered.text,
                html=rendered.html,
                headers=unsubscribe.unsubscribe_headers_for(links.unsubscribe_url),
                org_id=drop.org_id,
            )
            return email, set()
        assert contact.phone is not None
        links.slug_of = context.short_slugs.get(variant_name, {}).get
        rendered_sms = variant.render_sms(bucket, values, links)
        sms = OutboundSms(
            to=contact.phone,
            from_number=drop.sms_from,
            body=rendered_sms.body,
            status_callback=context.sms_status_url,
            org_id=drop.org_id,
        )
        return sms, links.missing

    async def _skip(self, row: Claimed, reason: str) -> None:
        """The last-moment check refused the row (an opt-out since the batch was read)."""
        assert self._checkpoints is not None
        await self._checkpoints.write(
            {
                "row_id": row.id,
                "worker": self.worker,
                "status": SendRowStatus.SKIPPED,
                "message_id": None,
                "voucher_id": None,
                "sent_at": None,
                "delivered_at": None,
                "provider_id": None,
                "not_before": None,
                "outcome": reason,
            }
        )
        metrics.drop_message(row.channel, SendRowStatus.SKIPPED)

    async def _checkpoint(
        self,
        row: Claimed,
        result: SendResult,
        message_id: str,
        voucher: tuple[int, str] | None,
        tags: funnel.Tags,
        person: str | None,
    ) -> None:
        """Commit this one message's outcome now: a crash after this line never resends it.
        A message that went out enters the funnel log in the same commit."""
        now = self.clock.now()
        events: list[funnel.Entry] = []
        params: dict[str, Any] = {
            "row_id": row.id,
            "worker": self.worker,
            "message_id": message_id,
            "voucher_id": voucher[0] if voucher else None,
            "sent_at": None,
            "delivered_at": None,
            "provider_id": None,
            "not_before": None,
            "outcome": None,
        }
        if result.ok:
            # A transport that knows the message arrived (the development mailbox) says
            # so; any other delivery is reported later by the provider's feedback.
            params |= {
                "status": SendRowStatus.DELIVERED if result.delivered else SendRowStatus.SENT,
                "sent_at": now,
                "delivered_at": now if result.delivered else None,
                "provider_id": result.provider_id,
            }
            kinds = [Kind.MESSAGE_SENT]
            if result.delivered:
                kinds.append(Kind.MESSAGE_DELIVERED)
            events = [
                funnel.Entry(
                    row.org_id,
                    kind,
                    now,
                    tags,
                    person,
                    f"send:{row.id}",
                )
                for kind in kinds
            ]
        elif result.permanent or row.attempts >= MAX_ATTEMPTS:
            params |= {"status": SendRowStatus.FAILED, "outcome": (result.error or "failed")[:200]}
        else:  # transient: back off and let any worker retry it
            delay = result.retry_after or min(300.0, 5.0 * 2 ** (row.attempts - 1))
            params |= {
                "status": SendRowStatus.PENDING,
                "not_before": now + timedelta(seconds=delay),
                "outcome": (result.error or "retry")[:200],
            }
        assert self._checkpoints is not None
        await self._checkpoints.write(params, events)
        metrics.drop_message(row.channel, params["status"])


class _GroupCommit:
    """Checkpoints of concurrent sends, committed together: whoever arrives while a commit
    is running joins the next one, and each `write` returns once its own row is committed.

    On PostgreSQL the commit does not wait for the WAL flush (`synchronous_commit off`):
    a killed worker loses nothing (the server has the commit), and a crash of the database
    server itself can forget the last fraction of a second of checkpoints, whose messages
    are then sent again with the same Message-ID: a duplicate receivers can drop, never a
    loss.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending: list[
            tuple[dict[str, Any], Sequence[funnel.Entry], asyncio.Future[None]]
        ] = []
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, params: dict[str, Any], events: Sequence[funnel.Entry] = ()) -> None:
        """Commit this checkpoint, and these funnel events with it."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((params, events, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        while self._pending:
            group, self._pending = self._pending, []
            try:
                rows = [params for params, _e, _done in group]
                events = [e for _p, events, _d in group for e in events]
                if self._db.dialect == "postgresql":
                    await self._commit_one_statement(rows, events)
                else:
                    await self._commit_transaction(rows, events)
            except BaseException as error:
                for _params, _events, done in group:
                    if not done.done():
                        done.set_exception(error)
                if not isinstance(error, Exception):
                    raise
            else:
                for _params, _events, done in group:
                    if not done.done():
                        done.set_result(None)

    async def _commit_one_statement(
        self, rows: list[dict[str, Any]], events: list[funnel.Entry]
    ) -> None:
        """PostgreSQL: the group's rows and their funnel events in one statement that
        commits on its own: one round trip, no transaction block around it."""
        columns: list[list[Any]] = [[row[name] for row in rows] for name in _CHECKPOINT_COLUMNS]
        logged: list[list[Any]] = [[] for _ in range(15)]
        for e in events:
            tags = e.tags
            for column, value in zip(
                logged,
                (
                    e.org_id,
                    e.at,
                    e.kind.value,
                    tags.channel,
                    tags.event_id,
                    tags.drop_id,
                    tags.variant,
                    tags.segment,
                    tags.partner_id,
                    tags.lane_id,
                    tags.label,
                    e.person,
                    e.subject,
                    e.value,
                    e.currency,
                ),
                strict=True,
            ):
                column.append(value)
        async with self._db.connect() as conn:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            await driver.execute(_CHECKPOINT_PG, *columns, *logged)

    async def _commit_transaction(
        self, rows: list[dict[str, Any]], events: list[funnel.Entry]
    ) -> None:
        async with self._db.transaction() as session:
            conn = await session.connection()
            await conn.execute(_CHECKPOINT, rows)
            # A checkpoint whose lease another worker took matches no row but is logged:
            # its message did go out (a duplicate with the same Message-ID); `subject`
            # names the row.
            await funnel.record_many(session, events)


# Why the last-moment check refuses a row for good (it is skipped, never retried).
_REFUSALS = frozenset({"erased", "no_consent", "no_address"})
# The consent of a contact could not be read in time: the row goes back to pending.
_BUSY = "consent_busy"


class _ConsentGate:
    """The last-moment consent check, one read shared by the sends that wait for it.

    A send asks right before its provider call; whoever asks while a read is running
    joins the next one, so every answer comes from a read that started after the send
    was decided. On PostgreSQL the group's transaction stays open, its contact rows
    share-locked (`consent.hold_consent`), until each member's provider call returned:
    an opt-out's UPDATE of such a row waits, so the opt-out commits (and is acknowledged)
    after the call, never between the read and the call. At most `holds` groups keep
    their locks (and a connection each) at once; the next read waits for a slot.
    """

    def __init__(self, db: Database, holds: int) -> None:
        self._db = db
        self.locks = db.dialect == "postgresql"  # SQLite has no row locks to hold
        self._slots = asyncio.Semaphore(max(1, holds))
        self._pending: list[_Ask] = []
        self._reader: asyncio.Task[None] | None = None
        self._holders: set[asyncio.Task[None]] = set()

    async def ask(self, row: Claimed) -> _Ask:
        """The row's verdict (`_Ask.refusal`): None when it may go out now (make the call,
        then `release`), a refusal in `_REFUSALS`, or `_BUSY` / a read error (try later)."""
        for pause in (*_BUSY_PAUSES, None):
            ask = _Ask(row, asyncio.get_running_loop().create_future(), asyncio.Event())
            self._pending.append(ask)
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read())
            try:
                ask.refusal = await ask.verdict
            except Exception as error:  # the database: this message waits for a retry
                ask.refusal = f"consent check failed: {type(error).__name__}"[:200]
            except BaseException:
                ask.release()
                raise
            if ask.refusal != _BUSY or pause is None:
                return ask
            ask.release()
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def _read(self) -> None:
        while self._pending:
            await self._slots.acquire()
            group, self._pending = self._pending, []
            read: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            holder = asyncio.create_task(self._hold(group, read))
            self._holders.add(holder)
            holder.add_done_callback(self._holders.discard)
            with contextlib.suppress(Exception):
                await read

    async def _hold(self, group: list[_Ask], read: asyncio.Future[None]) -> None:
        try:
            async with self._db.reader() as session:
                found, busy = await consent.hold_consent(
                    session, [ask.row.contact_id for ask in group]
                )
                for ask in group:
                    contact = found.get(ask.row.contact_id)
                    verdict = _BUSY if ask.row.contact_id in busy else _refusal(ask.row, contact)
                    if not ask.verdict.done():
                        ask.verdict.set_result(verdict)
                read.set_result(None)
                if self.locks:
                    for ask in group:
                        await ask.done.wait()
        except BaseException as error:
            for ask in group:
                if not ask.verdict.done():
                    ask.verdict.set_exception(error)
            if not read.done():
                read.set_exception(error)
            if not isinstance(error, Exception):
                raise
        finally:
            self._slots.release()


@dataclass
class _Ask:
    row: Claimed
    verdict: asyncio.Future[str | None]
    done: asyncio.Event
    refusal: str | None = None

    def release(self) -> None:
        """The provider call returned (or never started): the row lock may go."""
        self.done.set()


def _variant_name(context: _DropContext, row: Claimed) -> str:
    return row.variant or next(iter(context.variants))


# The audience's recency bucket as a funnel segment: a contact with no recorded activity
# is as cold as it gets.
_SEGMENT_OF_BUCKET = {"hot": Segment.HOT, "warm": Segment.WARM, "cold": Segment.COLD}


def _funnel_tags(
    context: _DropContext, row: Claimed, contact: Contact, now: datetime
) -> funnel.Tags:
    """What the log says of this message: its drop, event, variant, channel and the
    contact's recency bucket when it was sent (the bucket its content was rendered for)."""
    bucket = settings.bucket_of(contact.last_engaged_at, now, context.hot_days, context.warm_days)
    return funnel.Tags(
        channel=row.channel,
        event_id=context.drop.event_id,
        drop_id=context.drop.id,
        variant=_variant_name(context, row)[:16],
        segment=_SEGMENT_OF_BUCKET.get(bucket, Segment.COLD).value,
    )


def _refusal(row: Claimed, contact: Contact | consent.ConsentNow | None) -> str | None:
    """Why this row may not go out right now (consent is read at the last moment)."""
    if contact is None or contact.erased_at is not None:
        return "erased"
    column = consent.CONSENT_COLUMN[row.channel]
    if getattr(contact, column) != "granted":
        return "no_consent"
    if row.channel == "email" and not contact.email:
        return "no_address"
    if row.channel == "sms" and not contact.phone:
        return "no_address"
    return None
