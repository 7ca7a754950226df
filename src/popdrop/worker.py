"""Background work with Taskiq. The database is the truth (send rows, drop states); the
broker only carries drop ids, and a periodic tick re-finds anything a lost broker message
would have carried: due scheduled drops, due (or deferred, or orphaned) send rows, A/B
decisions. `popdrop serve` runs it in-process (InMemoryBroker); `popdrop worker`
processes consume a Redis stream (taskiq-redis, acknowledged) when POPDROP_BROKER_URL is
set.

Without Redis the worker degrades, it does not fail: a kick that cannot reach the broker
is logged and dropped (the next tick re-finds the due rows from the database), a broker
that cannot start is started again on a later tick, and a receiver that lost Redis is
restarted. So a route that kicks a drop never answers 500 because Redis is down.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import select
from taskiq import AsyncBroker, InMemoryBroker
from taskiq.api import run_receiver_task
from taskiq.exceptions import SendTaskError

from popdrop.chat import live
from popdrop.chat import tasks as chat_tasks
from popdrop.chat.conversations import ChatDeps
from popdrop.chat.tasks import ChatChannels
from popdrop.chat.telegram import TelegramBot
from popdrop.commerce import tasks as commerce_tasks
from popdrop.core import audit, sealing
from popdrop.core.clock import Clock
from popdrop.core.config import Settings
from popdrop.core.db import Database
from popdrop.core.logging import log
from popdrop.core.signing import Signer
from popdrop.drops import outcomes
from popdrop.drops import service as drops
from popdrop.drops.lifecycle import DropStatus, SendRowStatus
from popdrop.drops.models import Drop, SendRow
from popdrop.drops.pipeline import Sender
from popdrop.metrics import rollups
from popdrop.outbound.factory import make_transports
from popdrop.outbound.outbox import OUTBOX_TOPIC
from popdrop.rsvp import tasks as rsvp_tasks
from popdrop.usecases import surveys
from popdrop.usecases.notify import Notifier
from popdrop.vouchers import issue_jobs as voucher_jobs


def make_broker(settings: Settings) -> AsyncBroker:
    if settings.broker_url:
        from taskiq_redis import RedisStreamBroker

        # Unacknowledged messages of a dead consumer are claimed again after idle_timeout.
        # A short connect timeout: a kick must not hold a request while Redis is away.
        return RedisStreamBroker(
            settings.broker_url,
            queue_name="popdrop",
            idle_timeout=30_000,
            maxlen=10_000,
            socket_connect_timeout=settings.redis_timeout_seconds,
        )
    return InMemoryBroker()


# taskiq wraps a failed send in SendTaskError; startup raises redis-py's errors as they are.
BROKER_DOWN: tuple[type[BaseException], ...] = (SendTaskError, RedisError, OSError)
KICK_TIMEOUT_SECONDS = 2.0


class Kicker:
    """`kiq` for a drop that never fails its caller: the broker only carries a hint (the
    database holds the due rows, and the tick re-finds them), so a kick lost to a broker
    outage is logged, not raised."""

    def __init__(self, task: Any) -> None:
        self.task = task

    async def kiq(self, drop_id: int) -> bool:
        try:
            await asyncio.wait_for(self.task.kiq(drop_id), KICK_TIMEOUT_SECONDS)
        except BROKER_DOWN as exc:
            log.warning(
                "broker unreachable; the tick will find the drop", drop=drop_id, error=repr(exc)
            )
            return False
        return True


class Worker:
    """One per process: the broker, its tasks, the sender and the periodic tick."""

    def __init__(self, settings: Settings, db: Database, signer: Signer, clock: Clock) -> None:
        audit.configure(chains=settings.audit_chains)
        sealing.configure_from(settings)
        self.settings = settings
        self.db = db
        self.clock = clock
        self.broker = make_broker(settings)
        email, sms = make_transports(settings, db, clock)
        self.sender = Sender(
            db,
            signer,
            clock,
            settings.base_url,
            email=email,
            sms=sms,
            short_base_url=settings.short_base_url,
            lease_seconds=settings.send_lease_seconds,
            batch_size=settings.send_batch_size,
            # Twice the pool's tasks, so one message renders while another is on the wire;
            # never more unrecorded provider calls than open SMTP connections.
            concurrency=2 * settings.smtp_pool_size,
            in_flight=settings.smtp_pool_size,
        )

        # A plain function, not the bound method: taskiq renames the function it registers
        # (`__name__`), which a bound method does not allow (AttributeError).
        async def send_drop(drop_id: int) -> int:
            return await self._send_drop(drop_id)

        self.send_drop = Kicker(self.broker.register_task(send_drop, task_name="popdrop.send_drop"))
        # The notification outbox: drained by every tick, and at once after a transaction
        # that enqueued a notice commits (its after-commit signal kicks this task).
        self.notifier = Notifier(
            db,
            signer,
            clock,
            settings.base_url,
            email=email,
            sms=sms,
            sms_from=settings.chat_sms_from,
        )

        async def drain_outbox(hint: int) -> int:
            del hint  # the outbox rows are the truth; the kick only wakes the drainer
            return sum((await self.notifier.drain()).values())

        self.drain_outbox = Kicker(
            self.broker.register_task(drain_outbox, task_name="popdrop.drain_outbox")
        )

        async def kick_outbox() -> None:
            await self.drain_outbox.kiq(0)

        db.on_commit_signal(OUTBOX_TOPIC, kick_outbox)
        self._busy = False
        self.chat_deps = ChatDeps(signer, settings.base_url, settings.short_links_base)
        bot = None
        if settings.telegram_bot_token:
            bot = TelegramBot(settings.telegram_api_url, settings.telegram_bot_token)
        relay = live.Relay(settings.redis_url) if settings.redis_url else None
        self.chat_channels = ChatChannels(
            sms=sms, sms_from=settings.chat_sms_from, telegram=bot, web_relay=relay
        )

    async def close(self) -> None:
        for transport in (self.sender.email, self.sender.sms):
            if transport is not None:
                await transport.close()
        if self.chat_channels.telegram is not None:
            await self.chat_channels.telegram.close()
        if self.chat_channels.web_relay is not None:
            await self.chat_channels.web_relay.close()

    async def _send_drop(self, drop_id: int) -> int:
        """Send what is due (the drop id is a hint: rows of any sending drop are taken).
        One send loop per process, so at most `in_flight` (the SMTP pool size) messages
        are ever between a provider call and their checkpoint here — the bound on what a
        killed worker can send twice."""
        del drop_id
        if self._busy:
            return 0
        self._busy = True
        try:
            return await self.sender.run_until_idle()
        finally:
            self._busy = False

    async def tick(self) -> list[int]:
        """Start due scheduled drops, decide A/B tests, close drained drops, kick every drop
        with due rows (their ids are returned), lapse expired waiting-list offers, launch
        due voucher issue jobs, hand due survey invitations to the notification outbox and
        drain it, then deliver due chat messages."""
        now = self.clock.now()
        async with self.db.transaction() as session:
            for drop_id in await drops.start_due_drops(session, now=now):
                log.info("scheduled drop started", drop=drop_id)
            testing = (
                await session.scalars(
                    select(Drop).where(
                        Drop.status == DropStatus.SENDING, Drop.ab_decided_at.is_(None)
                    )
                )
            ).all()
            for drop in testing:
                decision = await outcomes.decide_ab(session, drop, now=now)
                if decision is not None:
                    log.info("a/b decided", drop=drop.id, winner=decision.winner)
            for drop_id in await drops.finish_drained(session, now=now):
                log.info("drop done", drop=drop_id)
        stale = now - timedelta(seconds=self.settings.send_lease_seconds)
        async with self.db.reader() as session:
            due = (
                await session.scalars(
                    select(SendRow.drop_id)
                    .join(Drop, Drop.id == SendRow.drop_id)
                    .where(
                        Drop.status == DropStatus.SENDING,
                        ((SendRow.status == SendRowStatus.PENDING) & (SendRow.not_before <= now))
                        | (
                            (SendRow.status == SendRowStatus.CLAIMED) & (SendRow.claimed_at < stale)
                        ),
                    )
                    .distinct()
                )
            ).all()
        for drop_id in due:
            await self.send_drop.kiq(drop_id)
        # Lapse the waiting-list offers past their deadline (the next person's offer is
        # enqueued in the same transaction), then send what the outbox holds.
        await rsvp_tasks.sweep_expired_offers(self.db, self.notifier.signer, self.clock)
        # Big voucher batches: start queued issue jobs, resume those whose runner stopped.
        for job_id in await voucher_jobs.launch_due(self.db, self.notifier.signer, self.clock):
            log.info("voucher issue job launched", job=job_id)
        # Orders: unpaid ones whose hold ended expire; unsent refunds go to the provider.
        commerce = await commerce_tasks.tick(self.db, self.settings, self.clock)
        if commerce:
            log.info("commerce tick", **commerce)
        # The funnel's rollups take what the log gained since the last tick.
        await rollups.fold_pending(self.db)
        # Day+1 survey invitations now due go into the outbox this drain empties.
        asked = await surveys.send_due(
            self.db, self.notifier.signer, self.clock, self.settings.base_url
        )
        if any(asked.values()):
            log.info("survey invitations", **asked)
        notified = await self.notifier.drain()
        if notified:
            log.info("notifications drained", **notified)
        sent = await chat_tasks.deliver_due(self.db, self.chat_deps, self.chat_channels, now=now)
        if sent:
            log.info("chat messages delivered", **sent)
        return list(due)

    async def run(self, *, receive: bool, stop: asyncio.Event | None = None) -> None:
        """Tick until stopped; with `receive`, also consume the broker (a worker process).
        A broker that cannot start (Redis down) is tried again each tick, and a receiver
        that stopped on a lost connection is started again; ticks go on meanwhile."""
        started = False
        receiver: asyncio.Task[Any] | None = None
        stop = stop or asyncio.Event()
        try:
            while not stop.is_set():
                if not started:
                    started = await self._start_broker()
                if started and receive and (receiver is None or receiver.done()):
                    if receiver is not None and not receiver.cancelled():
                        log.warning(
                            "broker receiver stopped; starting it again",
                            error=repr(receiver.exception()),
                        )
                    receiver = asyncio.create_task(
                        run_receiver_task(self.broker, run_startup=False)
                    )
                try:
                    await self.tick()
                except Exception as exc:  # the tick must survive a bad moment of the database
                    log.error("worker tick failed", error=repr(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.send_poll_seconds)
        finally:
            if receiver is not None:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError, *BROKER_DOWN):
                    await receiver
            if started:
                with contextlib.suppress(*BROKER_DOWN):
                    await self.broker.shutdown()

    async def _start_broker(self) -> bool:
        try:
            await asyncio.wait_for(self.broker.startup(), KICK_TIMEOUT_SECONDS * 2)
        except BROKER_DOWN as exc:
            log.warning("broker unreachable; ticking without it for now", error=repr(exc))
            return False
        return True
