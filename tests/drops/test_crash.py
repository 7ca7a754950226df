"""Crash-safe sends (issue 5 acceptance): a real `popdrop worker` on Redis sends a 5,000
recipient drop to an aiosmtpd peer, is SIGKILLed mid-way, and a second worker finishes it.

Every recipient must get the message; a second copy is allowed only for messages that were
in flight at the kill — at most one per open SMTP connection, since the pipeline runs at
most `max(pool size, 4)` sends at once and commits each outcome right after its provider
call, inside that bound — and every copy carries the same Message-ID.

PostgreSQL + Redis only (the multi-process deployment): skipped without
POPDROP_TEST_DATABASE_URL / POPDROP_TEST_REDIS_URL, which CI always sets. It uses its own
database (`popdrop_crash`, next to the test database) and its own Redis DB number, so it
never touches the shared test schema or another test's keys.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import func, insert, select
from sqlalchemy.engine import make_url

from popdrop.accounts import service as accounts
from popdrop.accounts.service import ROLES, Principal
from popdrop.audience.models import Contact
from popdrop.core.db import Database
from popdrop.core.identity import identity_hash
from popdrop.core.migrate import upgrade
from popdrop.core.signing import Signer
from popdrop.drops import service as drops
from popdrop.drops.models import SendRow
from tests.conftest import postgres_url, redis_url, reset_postgres
from tests.drops.helpers import drop_spec
from tests.server import POPDROP, free_port

RECIPIENTS = 5_000
POOL_SIZE = 4  # POPDROP_SMTP_POOL_SIZE; the worker runs max(pool, 4) sends at once
LEASE_SECONDS = 3.0
CRASH_DB = "popdrop_crash"
QUEUE = "popdrop"  # worker.make_broker's stream name
SECRET_KEY = "crash-test-secret-" + "c" * 40
FINISH_TIMEOUT = 120.0

pytestmark = pytest.mark.skipif(
    postgres_url() is None or redis_url() is None,
    reason="crash test needs PostgreSQL + Redis: set POPDROP_TEST_DATABASE_URL and "
    "POPDROP_TEST_REDIS_URL (CI does)",
)

_MESSAGE_ID = re.compile(rb"^Message-ID: *(.+?)\r?$", re.MULTILINE | re.IGNORECASE)


@dataclass
class Peer:
    """An SMTP receiver that records, per recipient, the Message-ID of every copy."""

    copies: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    received: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content: bytes = envelope.content
        header_end = content.find(b"\r\n\r\n")
        found = _MESSAGE_ID.search(content, 0, header_end if header_end >= 0 else len(content))
        message_id = found.group(1).decode() if found else ""
        # The controller's thread writes, the test's loop reads: keep both under one lock.
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.copies[rcpt].append(message_id)
            self.received += 1
        return "250 OK"

    def snapshot(self) -> tuple[int, dict[str, list[str]]]:
        with self.lock:
            return self.received, {k: list(v) for k, v in self.copies.items()}

    def recipients(self) -> int:
        with self.lock:
            return len(self.copies)


@pytest.fixture
def peer() -> Iterator[tuple[Peer, int]]:
    handler = Peer()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


async def _crash_database() -> str:
    """`popdrop_crash` next to the test database: created if missing, schema reset."""
    base = postgres_url()
    assert base is not None
    url = make_url(base).set(database=CRASH_DB)
    admin = await asyncpg.connect(
        make_url(base).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", CRASH_DB):
            await admin.execute(f'CREATE DATABASE "{CRASH_DB}"')
    finally:
        await admin.close()
    rendered = url.render_as_string(hide_password=False)
    await reset_postgres(rendered)
    await upgrade(rendered)
    return rendered


def _crash_redis() -> str:
    """A Redis DB number of our own (15, or 14 if the tests already use 15)."""
    base = redis_url()
    assert base is not None
    parsed = make_url(base)
    shared = int(parsed.database or 0)
    return parsed.set(database=str(15 if shared != 15 else 14)).render_as_string(
        hide_password=False
    )


async def _forget_queue(url: str) -> None:
    """Delete only the keys the worker's broker owns in our DB (its stream and lock)."""
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        await client.delete(QUEUE, f"autoclaim:taskiq:{QUEUE}")
    finally:
        await client.aclose()


@pytest.fixture
async def crash_env(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    database_url = await _crash_database()
    broker_url = _crash_redis()
    await _forget_queue(broker_url)
    try:
        yield database_url, broker_url
    finally:
        await _forget_queue(broker_url)


async def _seed(db: Database, signer: Signer) -> tuple[int, dict[str, str]]:
    """5,000 consenting contacts (one bulk insert) and a started drop; the drop id and the
    Message-ID each address must carry."""
    now = datetime.now(UTC)
    async with db.transaction() as session:
        org = await accounts.create_organization(session, slug="crash", name="Crash", now=now)
        principal = Principal(org.id, "test:owner", "owner", ROLES["owner"])
        emails = [f"buyer{i}@crash.example" for i in range(RECIPIENTS)]
        await session.execute(
            insert(Contact),
            [
                {
                    "org_id": org.id,
                    "email": email,
                    "email_hash": identity_hash(signer, "email", email),
                    "first_name": "Sam",
                    "consent_email": "granted",
                    "created_at": now,
                    "updated_at": now,
                }
                for email in emails
            ],
        )
        drop = await drops.create_drop(session, signer, principal, drop_spec(), now=now)
        await drops.override_seed(session, principal, drop.id, reason="crash test", now=now)
        await drops.start_drop(session, principal, drop.id, now=now)
        drop_id = drop.id
        ids = dict(
            (
                await session.execute(
                    select(Contact.email, Contact.id).where(Contact.org_id == org.id)
                )
            ).all()
        )
    expected = {
        email: f"<drop-{drop_id}.contact-{cid}.email@popdrop>"
        for email, cid in ids.items()
        if email is not None
    }
    return drop_id, expected


def _start_worker(
    tmp_path: Path, name: str, database_url: str, broker_url: str, smtp_port: int
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "POPDROP_DATA_DIR": str(tmp_path / name),
        "POPDROP_DATABASE_URL": database_url,
        "POPDROP_BROKER_URL": broker_url,
        "POPDROP_SECRET_KEY": SECRET_KEY,
        "POPDROP_MAIL_TRANSPORT": "smtp",
        "POPDROP_SMTP_HOST": "127.0.0.1",
        "POPDROP_SMTP_PORT": str(smtp_port),
        "POPDROP_SMTP_POOL_SIZE": str(POOL_SIZE),
        "POPDROP_SEND_LEASE_SECONDS": str(LEASE_SECONDS),
        "POPDROP_SEND_POLL_SECONDS": "0.5",
        "POPDROP_LOG_LEVEL": "WARNING",
    }
    (tmp_path / name).mkdir(exist_ok=True)
    log = (tmp_path / f"{name}.log").open("wb")
    # The interpreter itself, no shell in between: SIGKILL must hit the real worker.
    return subprocess.Popen([*POPDROP, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)


def _log_tail(tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


async def _wait_for(
    condition: Any, *, within: float, what: str, process: subprocess.Popen[bytes], log: Any
) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"worker exited with {process.returncode} waiting for {what}:\n{log()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:.0f} s waiting for {what}")
        await asyncio.sleep(0.005)  # fine-grained: the kill should land mid-send


async def test_killed_worker_loses_nothing_and_duplicates_only_in_flight(
    peer: tuple[Peer, int], crash_env: tuple[str, str], tmp_path: Path
) -> None:
    handler, smtp_port = peer
    database_url, broker_url = crash_env
    signer = Signer(SECRET_KEY.encode())
    db = Database(database_url, pool_size=2, max_overflow=0)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        drop_id, expected = await _seed(db, signer)
        started = time.monotonic()

        first = _start_worker(tmp_path, "first", database_url, broker_url, smtp_port)
        workers.append(first)
        await _wait_for(
            lambda: handler.recipients() > 0,
            within=60,
            what="the first message",
            process=first,
            log=lambda: _log_tail(tmp_path, "first"),
        )
        first_at = time.monotonic() - started
        low = int(RECIPIENTS * 0.3)
        await _wait_for(
            lambda: handler.recipients() >= low,
            within=60,
            what=f"{low} messages from the first worker",
            process=first,
            log=lambda: _log_tail(tmp_path, "first"),
        )
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        at_kill = handler.recipients()
        killed_at = time.monotonic() - started
        print(
            f"\nfirst message after {first_at:.1f} s; killed the first worker after "
            f"{killed_at:.1f} s at {at_kill}/{RECIPIENTS} recipients"
        )
        assert at_kill < RECIPIENTS, "the first worker finished before the kill"

        second = _start_worker(tmp_path, "second", database_url, broker_url, smtp_port)
        workers.append(second)
        await _wait_for(
            lambda: handler.recipients() > at_kill,
            within=60,
            what="the second worker's first message",
            process=second,
            log=lambda: _log_tail(tmp_path, "second"),
        )
        print(f"second worker resumed after {time.monotonic() - started - killed_at:.1f} s")

        async def sent_rows() -> int:
            async with db.reader() as session:
                return int(
                    await session.scalar(
                        select(func.count()).where(
                            SendRow.drop_id == drop_id, SendRow.status == "sent"
                        )
                    )
                    or 0
                )

        deadline = time.monotonic() + FINISH_TIMEOUT
        while handler.recipients() < RECIPIENTS or await sent_rows() < RECIPIENTS:
            if second.poll() is not None:
                pytest.fail(f"second worker exited:\n{_log_tail(tmp_path, 'second')}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"after {FINISH_TIMEOUT:.0f} s: {handler.recipients()} recipients reached, "
                    f"{await sent_rows()} rows sent\n{_log_tail(tmp_path, 'second')}"
                )
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
    except BaseException:
        await db.dispose()
        raise
    finally:
        for process in workers:  # never leave a worker behind, whatever happened
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)

    try:
        received, copies = handler.snapshot()
        async with db.reader() as session:
            # status -> (rows, rows with a Message-ID)
            rows = {
                status: (int(n), int(with_id))
                for status, n, with_id in await session.execute(
                    select(SendRow.status, func.count(), func.count(SendRow.message_id))
                    .where(SendRow.drop_id == drop_id)
                    .group_by(SendRow.status)
                )
            }
    finally:
        await db.dispose()

    duplicates = sum(1 for ids in copies.values() if len(ids) > 1)
    print(
        f"duplicates: {duplicates} (bound {POOL_SIZE}), {received} messages for "
        f"{len(copies)} recipients in {elapsed:.1f} s"
    )
    missing = set(expected) - set(copies)
    assert not missing, f"{len(missing)} recipients got nothing, e.g. {sorted(missing)[:5]}"
    assert set(copies) == set(expected), "messages went to addresses outside the drop"
    assert duplicates <= POOL_SIZE, f"{duplicates} recipients got a second copy"
    assert max(len(ids) for ids in copies.values()) <= 2  # one resend at most, after the kill
    wrong = {e: ids for e, ids in copies.items() if set(ids) != {expected[e]}}
    assert not wrong, f"copies with another Message-ID: {list(wrong.items())[:3]}"
    assert rows == {"sent": (RECIPIENTS, RECIPIENTS)}, rows
