"""Async engine and sessions for SQLite (WAL, embedded default) and PostgreSQL (asyncpg).

SQLite: every transaction starts with BEGIN IMMEDIATE, so concurrent writers queue on the
database lock (busy_timeout) instead of failing on a read-to-write upgrade.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import BigInteger, DateTime, Integer, MetaData, Table, TypeDecorator, event
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase

from popdrop.core.clock import ensure_utc
from popdrop.core.logging import log

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


# 64-bit ids on PostgreSQL; SQLite only autoincrements a plain INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are stored and returned UTC-aware on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = ensure_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw SQLite text
            value = datetime.fromisoformat(value)
        return ensure_utc(value)


READONLY_OPTION = "popdrop_readonly"
# PostgreSQL aborted the transaction and a retry may well succeed: deadlock_detected,
# serialization_failure.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
T = TypeVar("T")


def is_retryable(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def create_engine(url: str, *, pool_size: int = 20, max_overflow: int = 20) -> AsyncEngine:
    if is_sqlite(url):
        engine = create_async_engine(
            url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=120
        )
        _configure_sqlite(engine)
        return engine
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=120,
        pool_pre_ping=False,
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN IMMEDIATE below is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Any) -> None:
        # Readers take a deferred transaction (no write lock); everyone else IMMEDIATE.
        readonly = connection.get_execution_options().get(READONLY_OPTION, False)
        connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


# ---------------------------------------------------------------- late writes
#
# A hot row (a time slot's `taken`, an audit chain head) stays locked from its UPDATE to
# the commit, so every statement a transaction runs after it makes the next writer of
# that row wait. A transaction that opts in with `defer_hot_writes` queues such writes
# with `defer_write`; they run just before the commit, in key order (so two
# transactions lock the same rows in the same order), and the lock is held for one round
# trip instead of the whole transaction. A queued write that finds its condition gone
# (the slot filled up meanwhile) raises `LateWriteLost`: the transaction rolls back and
# the caller runs it again without deferring, down the ordinary path.

_LATE_WRITES = "popdrop.late_writes"
# Keys' first part: capacity takes run before audit chain heads.
CAPACITY_WRITE_ORDER = 0
AUDIT_WRITE_ORDER = 1
LateWrite = Callable[[], Awaitable[None]]


class LateWriteLost(Exception):
    """A write deferred to the commit no longer holds (e.g. the places were taken)."""


def defer_hot_writes(session: AsyncSession) -> None:
    """From now on, this transaction's hot-row writes run just before its commit."""
    session.info[_LATE_WRITES] = []


def defer_write(session: AsyncSession, key: tuple[int, int], write: LateWrite) -> bool:
    """Queue `write` for the commit when the session defers hot writes; False (nothing
    queued) when it does not, and then the caller writes now."""
    queue: list[tuple[tuple[int, int], int, LateWrite]] | None = session.info.get(_LATE_WRITES)
    if queue is None:
        return False
    queue.append((key, len(queue), write))
    return True


async def run_late_writes(session: AsyncSession) -> None:
    """Run the queued writes (by key, then in the order they were queued)."""
    queue = session.info.pop(_LATE_WRITES, None)
    for _key, _order, write in sorted(queue or [], key=lambda item: item[:2]):
        await write()


# ---------------------------------------------------------------- after-commit hooks
#
# Work that must only happen once a transaction's rows are visible (kick the worker to
# send a drop, drain the notification outbox) is registered on the session and run by
# `Database.transaction` after a successful commit, outside the SQLite write lock; a
# rolled-back transaction runs none. Hooks only wake background work up (the database
# stays the truth and the worker tick re-finds whatever a lost hook would have done), so
# a failing hook is logged, never raised: the caller's transaction already committed.
#
# `after_commit` takes a callable (the caller knows what to run); `signal_after_commit`
# takes a topic, for layers that cannot know who listens (the outbox, below the worker):
# the process subscribes to a topic once (`Database.on_commit_signal`).

_AFTER_COMMIT = "popdrop.after_commit"
AfterCommit = Callable[[], Awaitable[Any]]


def after_commit(session: AsyncSession, hook: AfterCommit, *, key: str | None = None) -> None:
    """Run `hook` once this session's transaction has committed (never after a rollback).
    Hooks registered under the same `key` run once."""
    hooks: dict[object, AfterCommit] = session.info.setdefault(_AFTER_COMMIT, {})
    hooks.setdefault(key if key is not None else object(), hook)


def signal_after_commit(session: AsyncSession, topic: str) -> None:
    """After this transaction commits, call every listener of `topic` (once per topic)."""
    topics: set[str] = session.info.setdefault(_AFTER_COMMIT + ".topics", set())
    topics.add(topic)


def _take_after_commit(session: AsyncSession) -> tuple[list[AfterCommit], set[str]]:
    hooks: dict[object, AfterCommit] = session.info.pop(_AFTER_COMMIT, {})
    topics: set[str] = session.info.pop(_AFTER_COMMIT + ".topics", set())
    return list(hooks.values()), topics


class Database:
    """Owns the engine and hands out sessions; one per process.

    On SQLite, write transactions of this process queue on an asyncio lock (fair, no
    busy-wait sleeps); other processes still meet SQLite's busy_timeout. Never open a
    write transaction while holding another one.
    """

    def __init__(self, url: str, *, pool_size: int = 20, max_overflow: int = 20) -> None:
        self.url = url
        self.engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if is_sqlite(url) else None
        self._commit_listeners: dict[str, list[AfterCommit]] = {}

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def on_commit_signal(self, topic: str, listener: AfterCommit) -> None:
        """Call `listener` after every committed transaction that signalled `topic`."""
        self._commit_listeners.setdefault(topic, []).append(listener)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error;
        after a commit (and outside the write lock) its after-commit hooks run."""
        if self._write_lock is None:
            async with self.sessions() as session:
                async with session.begin():
                    yield session
                    await run_late_writes(session)
                hooks, topics = _take_after_commit(session)
        else:
            async with self._write_lock, self.sessions() as session:
                async with session.begin():
                    yield session
                    await run_late_writes(session)
                hooks, topics = _take_after_commit(session)
        await self._run_after_commit(hooks, topics)

    async def _run_after_commit(self, hooks: list[AfterCommit], topics: set[str]) -> None:
        for topic in sorted(topics):
            hooks += self._commit_listeners.get(topic, [])
        for hook in hooks:
            try:
                await hook()
            except Exception as exc:  # committed already: a wake-up lost is re-found by the tick
                log.warning("after-commit hook failed", error=repr(exc))

    async def in_transaction(
        self, work: Callable[[AsyncSession], Awaitable[T]], *, attempts: int = 3
    ) -> T:
        """Run `work` in one transaction; run it again if PostgreSQL aborted it for a
        deadlock or a serialization failure (it rolled everything back, so that is safe).
        """
        for attempt in range(1, attempts + 1):
            try:
                async with self.transaction() as session:
                    return await work(session)
            except DBAPIError as exc:
                if attempt == attempts or not is_retryable(exc):
                    raise
                await asyncio.sleep(0.005 * attempt)
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only: on SQLite it takes no write lock."""
        async with self.engine.connect() as conn:
            await conn.execution_options(**{READONLY_OPTION: True})
            async with AsyncSession(bind=conn, expire_on_commit=False) as session:
                yield session

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def single_statements(self) -> AsyncIterator[AsyncConnection]:
        """A connection where each statement commits on its own.

        For hot rows: a lock taken by one statement is released when that statement ends
        inside the database, not a client round trip later. Only for work whose every
        statement is safe on its own. On SQLite (writers queue in-process anyway) it is a
        plain transaction.
        """
        if self._write_lock is not None:
            async with self._write_lock, self.engine.begin() as conn:
                yield conn
            return
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    async def dispose(self) -> None:
        await self.engine.dispose()


def dialect_insert(dialect_name: str, table: Any) -> Any:
    """An INSERT that knows ON CONFLICT on both backends."""
    if dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def table_of(model: type[Base]) -> Table:
    """The Core table of a mapped class, for hot paths that skip the ORM."""
    table = model.__table__
    assert isinstance(table, Table)
    return table
