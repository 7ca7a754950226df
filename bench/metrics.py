"""The funnel's dashboard queries over 10M events on PostgreSQL, beside the same answers
computed from the raw log in the same run, and what writing the log costs a hot path.

1. Seed: a fresh database (migrated), 50 organizations, then `funnel_events` bulk-loaded
   inside PostgreSQL (`bench/_funnel_load.py`: skewed org sizes, 6 events and 3 drops
   per org event plan, kinds in funnel proportions, channels, A/B variants, segments,
   partners, lanes, labels, values, repeat persons, 60 days); the log's indexes are
   built after the load. Then `rollups.rebuild(db, org_id)` for every org, timed.
2. Dashboard queries for random scopes (an event, a drop, a partner, an org-wide day, a
   drop's war-room series): each answered from the rollups (the dashboard's way) and
   from the raw log (GROUP BY over `funnel_events`) in the same run. The two answers
   must be equal: that is the correctness check. p50 / p95 of each, both ways.
3. Hot path: check-in (`checkin.service.checkin`, which writes a `visit` into the log in
   the scan's transaction: on PostgreSQL a CTE of its one fused statement) from C
   concurrent in-process tasks against PostgreSQL with real signed tickets, in legs
   A B B A A B B A: A as is, B without the log (`metrics.log.record` a no-op and the
   fused statement without its log INSERT). overhead = rate without / rate with - 1.
   The log must hold one visit per successful scan of the A legs and none of the B legs.
   Then `rollups.fold_pending` (run before every war-room snapshot and on each worker
   tick) is timed with those visits pending and with nothing pending.

Goals (DESIGN.md, issue 18): dashboard p95 < 200 ms over 10M events; the log costs the
hot path ≤ 10 %. Exits non-zero only on a correctness failure (a rollup answer that is
not the raw answer, a visit lost or logged twice), never on a missed speed target.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import random
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from types import ModuleType
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import insert
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.schema import CreateIndex

import _common as common
import _funnel_load as load
from popdrop.accounts import service as accounts
from popdrop.accounts.service import ROLES, Principal
from popdrop.checkin import service as checkin
from popdrop.checkin import tickets
from popdrop.checkin.models import Ticket
from popdrop.checkin.schemas import ScanRequest
from popdrop.core.db import Database, table_of
from popdrop.core.migrate import upgrade
from popdrop.drops.models import Drop
from popdrop.events.models import Event
from popdrop.metrics import kpis, rollups
from popdrop.metrics import log as funnel_log
from popdrop.metrics.models import FunnelEvent
from redeem import checkpoint

war_room: ModuleType | None
try:  # the war room's series, where that module exists
    from popdrop.usecases import war_room
except ImportError:
    war_room = None

P95_GOAL_MS = 200.0
OVERHEAD_GOAL = 0.10
CHUNK = 1_000_000


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# ---- 1. seed


async def seed_rows(db: Database, orgs: int) -> load.Plan:
    """Organizations, and the events and drops the log's tags name (the war room reads
    the drop's row); the plan's ids are the rows' ids."""
    now = common.now()
    async with db.transaction() as session:
        org_ids = []
        for n in range(orgs):
            org = await accounts.create_organization(
                session, slug=f"bench-metrics-{n}", name=f"Metrics {n}", now=now
            )
            org_ids.append(org.id)
    plan = load.plan(org_ids, now)
    async with db.transaction() as session:
        events = [
            Event(org_id=org_id, slug=f"e{event_id}", title=f"Event {event_id}", timezone="UTC",
                  starts_at=starts_at, ends_at=starts_at + timedelta(hours=5), status="closed",
                  created_at=now)
            for org_id, event_id, starts_at in plan.events
        ]  # fmt: skip
        session.add_all(events)
        await session.flush()
        drops = [
            Drop(org_id=org_id, event_id=event_id, name=f"Drop {drop_id}", slug=f"d{drop_id}",
                 status="done", channels="email sms", started_at=sent_at,
                 finished_at=sent_at + timedelta(minutes=20), created_at=now, updated_at=now)
            for org_id, event_id, drop_id, sent_at in plan.drops
        ]  # fmt: skip
        session.add_all(drops)
        await session.flush()
        if [e.id for e in events] != [e[1] for e in plan.events] or [d.id for d in drops] != [
            d[2] for d in plan.drops
        ]:
            raise SystemExit("the bench needs a fresh database (event and drop ids from 1)")
    return plan


async def load_log(url: str, plan: load.Plan, events: int) -> tuple[int, float, float]:
    """(events counted, load seconds, index seconds)."""
    conn = await common.pg_connect(url)
    try:
        await conn.execute("SET synchronous_commit = off")
        await load.create_plan_table(conn, plan)
        # Indexes are built once after the load (the table's own definitions), not row by row.
        indexes = list(FunnelEvent.__table__.indexes)  # type: ignore[attr-defined]
        for index in indexes:
            await conn.execute(f"DROP INDEX {index.name}")
        await conn.execute("SELECT setseed(0.18)")
        started = time.monotonic()
        end = plan.start + timedelta(days=load.DAYS)
        for low in range(1, events + 1, CHUNK):
            high = min(events, low + CHUNK - 1)
            await conn.execute(load.CHUNK_SQL, low, high, end, len(plan.org_ids))
            print(f"  {high:,} events loaded ({time.monotonic() - started:.0f} s)", flush=True)
        load_s = time.monotonic() - started
        started = time.monotonic()
        await conn.execute("SET maintenance_work_mem = '256MB'")
        for index in indexes:
            await conn.execute(str(_create_index_sql(index)))
        await conn.execute("VACUUM ANALYZE funnel_events")
        index_s = time.monotonic() - started
        counted = await conn.fetchval("SELECT count(*) FROM funnel_events")
    finally:
        await conn.close()
    return int(counted), load_s, index_s


async def rebuild_all(
    url: str, db: Database, org_ids: list[int]
) -> tuple[dict[int, float], dict[int, int]]:
    """Seconds of `rollups.rebuild` per org, and rollup rows per grain."""
    seconds: dict[int, float] = {}
    for org_id in org_ids:
        started = time.monotonic()
        await rollups.rebuild(db, org_id)
        seconds[org_id] = time.monotonic() - started
    conn = await common.pg_connect(url)
    try:
        await conn.execute("VACUUM ANALYZE funnel_rollups")
        rows = await conn.fetch("SELECT grain, count(*) AS n FROM funnel_rollups GROUP BY grain")
    finally:
        await conn.close()
    return seconds, {int(r["grain"]): int(r["n"]) for r in rows}


def _create_index_sql(index: Any) -> Any:
    return CreateIndex(index).compile(dialect=postgresql.dialect())  # type: ignore[no-untyped-call]


# ---- 2. the dashboard's queries, from the rollups and from the raw log

# The rollups' rows recomputed from the log on every read: the same grouping as
# `rollups.rebuild`, per grain. A read of the raw log runs the very functions the
# dashboard runs, with `funnel_rollups` renamed to this view in the SQL they send, so both
# answers come from one code path and only the data source differs. `*_raw` are the
# log's own id columns: a filter on a real id is moved onto them (by `_to_raw`), so
# PostgreSQL uses the log's indexes as a hand-written GROUP BY over the log would.
_RAW_BRANCH = """
SELECT org_id, {grain} AS grain, date_trunc('{unit}', at, 'UTC') AS bucket, kind, channel,
    coalesce(event_id, 0) AS event_id, coalesce(drop_id, 0) AS drop_id, variant, segment,
    coalesce(partner_id, 0) AS partner_id, coalesce(lane_id, 0) AS lane_id, label, currency,
    count(*)::bigint AS n, coalesce(sum(value), 0)::bigint AS value,
    event_id AS event_id_raw, drop_id AS drop_id_raw, partner_id AS partner_id_raw
FROM funnel_events
GROUP BY org_id, date_trunc('{unit}', at, 'UTC'), kind, channel, event_id, drop_id, variant,
    segment, partner_id, lane_id, label, currency
"""
RAW_VIEW = (
    "CREATE VIEW bench_raw_rollups AS "
    + _RAW_BRANCH.format(grain=1, unit="minute")
    + " UNION ALL "
    + _RAW_BRANCH.format(grain=60, unit="hour")
)
_ID_FILTER = re.compile(r"funnel_rollups\.(event_id|drop_id|partner_id) = ")


RAW_READS = [0]  # statements sent to the raw view: a run that sent none compared nothing


def _to_raw(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
) -> tuple[str, Any]:
    if "funnel_rollups" in statement:
        RAW_READS[0] += 1
    statement = _ID_FILTER.sub(r"bench_raw_rollups.\1_raw = ", statement)
    return statement.replace("funnel_rollups", "bench_raw_rollups"), parameters


def raw_database(url: str) -> Database:
    db = Database(url, pool_size=2, max_overflow=0)
    sa_event.listen(db.engine.sync_engine, "before_cursor_execute", _to_raw, retval=True)
    return db


Answer = Callable[[AsyncSession], Awaitable[Any]]


@dataclass
class Query:
    name: str
    make: Callable[[random.Random], Answer]  # a random scope's query
    rollup_ms: list[float] = field(default_factory=list)
    raw_ms: list[float] = field(default_factory=list)
    mismatches: int = 0


def _owner(org_id: int) -> Principal:
    return Principal(org_id, "bench:metrics", "owner", ROLES["owner"])


def queries(plan: load.Plan) -> list[Query]:
    def event_kpis(rng: random.Random) -> Answer:
        org_id, event_id, _ = rng.choice(plan.events)
        return lambda s: kpis.kpis(s, kpis.Scope(org_id, event_id=event_id))

    def drop_kpis(rng: random.Random) -> Answer:
        org_id, _, drop_id, _ = rng.choice(plan.drops)
        return lambda s: kpis.kpis(s, kpis.Scope(org_id, drop_id=drop_id))

    def partner_kpis(rng: random.Random) -> Answer:
        org_id, partner_id = rng.choice(plan.partners)
        return lambda s: kpis.kpis(s, kpis.Scope(org_id, partner_id=partner_id))

    def org_day(rng: random.Random) -> Answer:
        org_id = rng.choice(plan.org_ids)
        day = plan.start + timedelta(days=rng.randrange(load.DAYS))
        scope = kpis.Scope(org_id, since=day, until=day + timedelta(days=1))
        return lambda s: kpis.kpis(s, scope)

    def event_by_hour(rng: random.Random) -> Answer:
        org_id, event_id, _ = rng.choice(plan.events)
        scope = kpis.Scope(org_id, event_id=event_id)
        return lambda s: kpis.breakdown(s, scope, "hour", tz="Europe/Paris")

    def drop_by_variant(rng: random.Random) -> Answer:
        org_id, _, drop_id, _ = rng.choice(plan.drops)
        return lambda s: kpis.breakdown(s, kpis.Scope(org_id, drop_id=drop_id), "variant")

    def event_by_tag(rng: random.Random) -> Answer:
        org_id, event_id, _ = rng.choice(plan.events)
        by = rng.choice(("channel", "segment", "lane"))
        return lambda s: kpis.breakdown(s, kpis.Scope(org_id, event_id=event_id), by)  # type: ignore[arg-type]

    made = [
        Query("event KPIs", event_kpis),
        Query("drop KPIs", drop_kpis),
        Query("partner KPIs", partner_kpis),
        Query("org-wide day KPIs", org_day),
        Query("event by hour of day", event_by_hour),
        Query("drop by A/B variant", drop_by_variant),
        Query("event by channel/segment/lane", event_by_tag),
    ]
    if war_room is not None:
        room = war_room

        def drop_room(rng: random.Random) -> Answer:
            # Two hours into the send: the window the war room watches.
            org_id, _, drop_id, sent_at = rng.choice(plan.drops)
            at = sent_at + timedelta(minutes=rng.randrange(20, 120))
            return lambda s: room.drop_war_room(s, _owner(org_id), drop_id, now=at)

        def event_room(rng: random.Random) -> Answer:
            org_id, event_id, starts_at = rng.choice(plan.events)
            at = starts_at + timedelta(minutes=rng.randrange(30, 300))
            return lambda s: room.event_war_room(s, _owner(org_id), event_id, now=at)

        made += [Query("drop war room", drop_room), Query("event war room", event_room)]
    return made


async def _timed(db: Database, answer: Answer) -> tuple[Any, float]:
    started = time.perf_counter()
    async with db.reader() as session:
        result = await answer(session)
    return result, (time.perf_counter() - started) * 1000


async def run_queries(
    db: Database, raw: Database, made: list[Query], samples: int, seed: int
) -> None:
    rng = random.Random(seed)
    for query in made:  # warm-up: plans, pools, caches
        answer = query.make(rng)
        await _timed(db, answer)
        await _timed(raw, answer)
    for _ in range(samples):
        for query in made:
            answer = query.make(rng)
            rolled, rolled_ms = await _timed(db, answer)
            from_log, raw_ms = await _timed(raw, answer)
            query.rollup_ms.append(rolled_ms)
            query.raw_ms.append(raw_ms)
            if rolled != from_log:
                query.mismatches += 1
                if query.mismatches <= 2:
                    print(f"  MISMATCH {query.name}:\n    rollups {rolled!r}")
                    print(f"    raw     {from_log!r}")


# ---- 3. the hot path: check-in with and without the log


@dataclass
class Door:
    org_id: int
    principal: Principal
    secrets: list[str]


async def seed_door(db: Database, count: int) -> Door:
    now = common.now()
    async with db.transaction() as session:
        org = await accounts.create_organization(session, slug="bench-door", name="Door", now=now)
        event = Event(org_id=org.id, slug="door", title="Bench door", timezone="UTC",
                      starts_at=now - timedelta(hours=1), ends_at=now + timedelta(hours=6),
                      status="live", created_at=now)  # fmt: skip
        session.add(event)
        await session.flush()
        signer = await checkin.event_signer(session, event, now)
    table = table_of(Ticket)
    epoch = int(now.timestamp())
    plaintext: list[str] = []
    while len(plaintext) < count:
        rows = [
            {"org_id": org.id, "event_id": event.id, "subject_kind": "rsvp",
             "subject_id": len(plaintext) + i + 1, "holder_ref": None, "status": "valid",
             "generation": 0, "issued_epoch": epoch, "created_at": now, "changed_at": now}
            for i in range(min(5_000, count - len(plaintext)))
        ]  # fmt: skip
        async with db.transaction() as session:
            ids = (await session.execute(insert(table).returning(table.c.id), rows)).scalars()
            plaintext += [
                tickets.sign(signer.private, event_id=event.id, ticket_id=tid, generation=0,
                             issued_epoch=epoch)
                for tid in ids
            ]  # fmt: skip
    principal = Principal(org.id, "bench:door", "owner", frozenset({"checkin"}))
    return Door(org.id, principal, plaintext)


def _without_log(statement: Any) -> Any | None:
    """The fused check-in statement minus its INSERT into the funnel log (a CTE of its
    own), or None when the log is not written that way."""
    ctes = getattr(statement, "_independent_ctes", ())
    kept = tuple(
        c for c in ctes if getattr(c.element, "table", None) is not funnel_log.funnel_events
    )
    if len(kept) == len(ctes):
        return None
    stripped = copy.copy(statement)
    stripped._independent_ctes = kept
    return stripped


@contextmanager
def log_switched_off() -> Iterator[None]:
    """Check-in as it would be without the funnel log: `metrics.log.record` a no-op and,
    on PostgreSQL, the fused statement without its log INSERT."""

    async def no_record(*args: Any, **kwargs: Any) -> None:
        return None

    original_record, original_take = funnel_log.record, checkin._FUSED_TAKE
    stripped = _without_log(original_take)
    funnel_log.record = no_record
    if stripped is not None:
        checkin._FUSED_TAKE = stripped
    try:
        yield
    finally:
        funnel_log.record = original_record
        checkin._FUSED_TAKE = original_take


async def leg(db: Database, door: Door, tasks: int, seconds: float) -> tuple[int, float]:
    """Scans answered 200, and the seconds they took, from `tasks` concurrent scanners."""
    done = 0
    stop = time.monotonic() + seconds

    async def scanner() -> None:
        nonlocal done
        while time.monotonic() < stop and door.secrets:
            request = ScanRequest(
                secret=door.secrets.pop(), nonce=secrets.token_hex(12), gate="main"
            )
            status, _ = await checkin.checkin(db, door.principal, request, now=common.now())
            done += status == 200

    started = time.monotonic()
    await asyncio.gather(*(scanner() for _ in range(tasks)))
    return done, time.monotonic() - started


async def visits_logged(url: str, org_id: int) -> tuple[int, int]:
    """(visit events in the log, visit rows) of the door's org."""
    conn = await common.pg_connect(url)
    try:
        logged = await conn.fetchval(
            "SELECT count(*) FROM funnel_events WHERE org_id = $1 AND kind = 'visit'", org_id
        )
        visits = await conn.fetchval("SELECT count(*) FROM visits WHERE org_id = $1", org_id)
    finally:
        await conn.close()
    return int(logged), int(visits)


# ---- the run


def summary(values: list[float]) -> str:
    p50, p95 = percentile(values, 0.5), percentile(values, 0.95)
    return f"p50 {p50:7.1f}  p95 {p95:7.1f}  max {max(values, default=0):7.1f}"


async def run(args: argparse.Namespace, url: str) -> int:
    started = time.monotonic()
    await common.reset_postgres(url)
    await upgrade(url)
    db = Database(url, pool_size=args.tasks + 2, max_overflow=0)
    raw = raw_database(url)
    try:
        plan = await seed_rows(db, args.orgs)
        print(f"{args.orgs} orgs, {len(plan.events)} events, {len(plan.drops)} drops, "
              f"{len(plan.partners)} partners over {load.DAYS} days")  # fmt: skip
        events, load_s, index_s = await load_log(url, plan, args.events)
        print(f"loaded {events:,} events in {load_s:.1f} s ({events / load_s:,.0f}/s), "
              f"indexes + analyze {index_s:.1f} s")  # fmt: skip
        rebuild_s, rollup_rows = await rebuild_all(url, db, plan.org_ids)
        total_rebuild = sum(rebuild_s.values())
        biggest = max(rebuild_s, key=lambda o: rebuild_s[o])
        conn = await common.pg_connect(url)
        try:
            await conn.execute(RAW_VIEW)
            per_org = dict(await conn.fetch(
                "SELECT org_id, count(*) FROM funnel_events GROUP BY org_id"))  # fmt: skip
        finally:
            await conn.close()
        print(
            f"rollups.rebuild, every org: {total_rebuild:.1f} s ({events / total_rebuild:,.0f} "
            f"events/s); slowest org {per_org[biggest]:,} events in {rebuild_s[biggest]:.1f} s"
        )
        print(f"rollup rows: {rollup_rows.get(1, 0):,} minute, {rollup_rows.get(60, 0):,} hour "
              f"(log {events:,})")  # fmt: skip
        print(f"load average before the queries: {load_average()} "
              "(other work on the machine skews figures)")  # fmt: skip

        await checkpoint(url)
        made = queries(plan)
        await run_queries(db, raw, made, args.samples, seed=18)
        print(f"{'query (ms, ' + str(args.samples) + ' random scopes)':34s} "
              f"{'from rollups':39s} {'from the raw log':39s} equal")  # fmt: skip
        for q in made:
            same = "yes" if q.mismatches == 0 else f"NO ({q.mismatches})"
            print(f"  {q.name:32s} {summary(q.rollup_ms)}   {summary(q.raw_ms)}   {same}")
        rollup_all = [ms for q in made for ms in q.rollup_ms]
        raw_all = [ms for q in made for ms in q.raw_ms]
        p95, raw_p95 = percentile(rollup_all, 0.95), percentile(raw_all, 0.95)
        mismatches = sum(q.mismatches for q in made)
        if RAW_READS[0] < len(made) * args.samples:
            print(f"FAILED: only {RAW_READS[0]} reads went to the raw log")
            mismatches += 1
        print(f"  {'all':32s} {summary(rollup_all)}   {summary(raw_all)}")
        print(f"p95 {p95:.1f} ms from rollups (goal < {P95_GOAL_MS:.0f} ms: "
              f"{'met' if p95 < P95_GOAL_MS else 'missed'}), {raw_p95:.1f} ms from the raw log "
              f"({raw_p95 / p95 if p95 else 0:.0f}x); answers equal: "
              f"{'all' if mismatches == 0 else f'{mismatches} differ'}")  # fmt: skip

        door = await seed_door(db, args.tickets)
        await checkpoint(url)
        print(f"load average before the hot path: {load_average()}")
        # Both legs take the one-scan fused statement: the grouped statement (issue 19)
        # carries the same log INSERT, but only the fused one can be stripped of it.
        grouped, checkin.GROUP_COMMIT = checkin.GROUP_COMMIT, False
        await leg(db, door, args.tasks, 1.0)  # warm-up (with the log)
        logged_before, _ = await visits_logged(url, door.org_id)
        with_log: list[tuple[int, float]] = []
        without_log: list[tuple[int, float]] = []
        for round_ in range(args.rounds):
            # A B, then B A: a machine that slows down or speeds up mid-run favours neither.
            for with_it in (True, False) if round_ % 2 == 0 else (False, True):
                if with_it:
                    with_log.append(await leg(db, door, args.tasks, args.leg_seconds))
                else:
                    with log_switched_off():
                        without_log.append(await leg(db, door, args.tasks, args.leg_seconds))
            a, b = with_log[-1], without_log[-1]
            print(f"  round {round_ + 1}: with the log {a[0] / a[1]:6.0f} scans/s, "
                  f"without {b[0] / b[1]:6.0f} scans/s")  # fmt: skip
        checkin.GROUP_COMMIT = grouped
        logged, visit_rows = await visits_logged(url, door.org_id)
        rate_with = sum(n for n, _ in with_log) / sum(s for _, s in with_log)
        rate_without = sum(n for n, _ in without_log) / sum(s for _, s in without_log)
        overhead = rate_without / rate_with - 1 if rate_with else 0.0
        logged_in_a = logged - logged_before
        ok_in_a = sum(n for n, _ in with_log)
        lost = logged_in_a != ok_in_a or logged != visit_rows - sum(n for n, _ in without_log)
        verdict = "met" if overhead <= OVERHEAD_GOAL else "missed"
        print(f"check-in, {args.tasks} concurrent tasks in-process: {rate_with:.0f} scans/s with "
              f"the log, {rate_without:.0f} without: overhead {overhead:+.1%} "
              f"(goal <= {OVERHEAD_GOAL:.0%}: {verdict})")  # fmt: skip
        print(f"visit events logged {logged_in_a} for {ok_in_a} check-ins with the log; "
              f"{visit_rows - logged} visits without an event for "
              f"{sum(n for n, _ in without_log)} check-ins without it")  # fmt: skip
        if not door.secrets:
            print("note: every ticket was scanned before the time was up; use more --tickets")
        # The fold runs before every war-room snapshot (`snapshot_of_drop`) and on every
        # worker tick: its cost with the A legs' visits pending, then with nothing pending.
        started_fold = time.perf_counter()
        folded = await rollups.fold_pending(db)
        fold_ms = (time.perf_counter() - started_fold) * 1000
        started_fold = time.perf_counter()
        await rollups.fold_pending(db)
        idle_fold_ms = (time.perf_counter() - started_fold) * 1000
        print(f"rollups.fold_pending over a log of {events:,}: {folded} new rows in "
              f"{fold_ms:.0f} ms; nothing pending {idle_fold_ms:.0f} ms")  # fmt: skip
    finally:
        await db.dispose()
        await raw.dispose()

    common.emit(
        {
            "bench": "metrics",
            "events": events,
            "p95_ms": round(p95, 2),
            "raw_p95_ms": round(raw_p95, 2),
            "p95_goal_ms": P95_GOAL_MS,
            "hot_path_overhead": round(overhead, 4),
            # The check-in path with its funnel INSERT against the same path without it.
            "rate_per_s": round(rate_with, 1),
            "limit_per_s": round(rate_without, 1),
            "ratio": round(rate_with / rate_without, 3) if rate_without else 0.0,
            "rate_with_log_per_s": round(rate_with, 1),
            "rate_without_log_per_s": round(rate_without, 1),
            "mismatches": mismatches,
            "visits_unlogged": int(lost),
            "queries": len(made) * args.samples,
            "rebuild_s": round(total_rebuild, 1),
            "fold_ms": round(fold_ms, 1),
            "idle_fold_ms": round(idle_fold_ms, 1),
            "load_s": round(load_s, 1),
            "rollup_rows": sum(rollup_rows.values()),
            "seconds": round(time.monotonic() - started, 1),
        }
    )
    return 1 if mismatches or lost else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about a minute (500k events)")
    parser.add_argument("--database-url", help=f"default: {common.DEFAULT_PG_URL}")
    parser.add_argument("--events", type=int, help="events in the log (10M; quick 500k)")
    parser.add_argument("--orgs", type=int, default=50)
    parser.add_argument("--samples", type=int, help="random scopes per query (30; quick 12)")
    parser.add_argument("--tasks", type=int, default=8, help="concurrent check-in tasks")
    parser.add_argument("--rounds", type=int, help="A/B rounds of the hot path (6; quick 4)")
    parser.add_argument("--leg-seconds", type=float, help="seconds a leg (3; quick 1.5)")
    parser.add_argument("--tickets", type=int, help="tickets for the hot path (40000; quick 15000)")
    args = parser.parse_args()
    args.events = args.events or (500_000 if args.quick else 10_000_000)
    args.samples = args.samples or (12 if args.quick else 30)
    args.leg_seconds = args.leg_seconds or (1.5 if args.quick else 3.0)
    args.rounds = args.rounds or (4 if args.quick else 6)
    args.tickets = args.tickets or (15_000 if args.quick else 40_000)
    return asyncio.run(run(args, common.pg_url(args.database_url)))


if __name__ == "__main__":
    sys.exit(main())
