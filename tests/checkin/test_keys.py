"""Check-in private keys sealed at rest: never readable in a dump of the database, opened
with the secret key (or a previous one), resealed by rotation, and sealed by migration
0014 for keys stored raw before it (which also backfills the short codes)."""

from __future__ import annotations

import asyncio
import base64
import secrets
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from popdrop.accounts import service as accounts
from popdrop.accounts.service import ROLES, Principal
from popdrop.checkin import keys, service, tickets
from popdrop.checkin.models import EventKey
from popdrop.checkin.schemas import TicketCreate
from popdrop.core import sealing
from popdrop.core.db import Database, create_engine
from popdrop.core.migrate import upgrade
from popdrop.web.context import AppContext
from tests.checkin.helpers import issue, live_event, make_event
from tests.conftest import Tenant, postgres_url, side_postgres
from tests.server import POPDROP, server_env

KEY_A = b"door-test-secret-a-" + b"a" * 32
KEY_B = b"door-test-secret-b-" + b"b" * 32


def _spellings(raw: bytes) -> list[bytes]:
    """Every way a dump could show the raw key: bytes, hex, base64 (both alphabets)."""
    forms = [raw, raw.hex().encode(), raw.hex().upper().encode()]
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        text = encode(raw)
        forms += [text, text.rstrip(b"=")]
    return forms


def _plain(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _key_row(db_url: str, event_id: int) -> tuple[bytes, bytes]:
    engine = create_engine(db_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(EventKey.private_key, EventKey.public_key).where(
                        EventKey.event_id == event_id
                    )
                )
            ).one()
    finally:
        await engine.dispose()
    return bytes(row[0]), bytes(row[1])


async def test_no_private_key_in_a_dump_of_the_database(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext, database_url: str, backend: str
) -> None:
    event_id = await make_event(ctx, tenant.org_id)
    ticket = await issue(app_client, tenant, event_id)
    sealed, public = await _key_row(database_url, event_id)
    raw = keys.open_private(sealed).private_bytes_raw()
    assert len(raw) == 32 and len(sealed) > 64
    # The key opened from the row is the one that signed the ticket.
    assert tickets.verify_offline(public, ticket["secret"])[0] == "ok"

    if backend == "postgresql":
        dump = await asyncio.create_subprocess_exec(
            "pg_dump", "--data-only", "--table=checkin_event_keys", _plain(database_url),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        dumped, _ = await dump.communicate()
        assert dump.returncode == 0
        assert public.hex().encode() in dumped  # the dump does show the table's bytes
    else:
        path = Path(make_url(database_url).database or "")
        dumped = b"".join(
            p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists()
        )
        assert public in dumped
    for spelling in _spellings(raw):
        assert spelling not in dumped


# ---------------------------------------------------------------- a database of its own


@pytest.fixture(params=["sqlite", "postgres"])
async def own_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database for tests that migrate or rotate every key in it."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'door.db'}"
        return
    if postgres_url() is None:
        pytest.skip("PostgreSQL run: set POPDROP_TEST_DATABASE_URL (CI does)")
    url = await side_postgres("door")
    yield url


def _use_keys(monkeypatch: pytest.MonkeyPatch, current: bytes, *previous: bytes) -> None:
    monkeypatch.setattr(sealing, "_keys", (current, previous))


async def _seed(url: str) -> tuple[int, str]:
    """An org, an event and one ticket (the event's key is made and sealed on the way)."""
    db = Database(url, pool_size=1, max_overflow=0)
    now = datetime.now(UTC)
    try:
        async with db.transaction() as session:
            org = await accounts.create_organization(
                session, slug=f"door-{secrets.token_hex(3)}", name="Door", now=now
            )
            event = live_event(org.id, now, timezone="UTC")
            session.add(event)
            await session.flush()
            owner = Principal(org.id, "test:seed", "owner", ROLES["owner"])
            spec = TicketCreate(event_id=event.id, subject_kind="manual", subject_id=1)
            _, secret, _ = await service.issue_ticket(session, owner, spec, now=now)
            return event.id, secret
    finally:
        await db.dispose()


async def test_rotation_reseals_every_key_under_the_new_secret_key(
    own_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await upgrade(own_db)
    _use_keys(monkeypatch, KEY_A)
    event_id, secret = await _seed(own_db)
    sealed_a, public = await _key_row(own_db, event_id)
    raw = keys.open_private(sealed_a).private_bytes_raw()

    _use_keys(monkeypatch, KEY_B)  # the new key alone cannot open what A sealed
    with pytest.raises(sealing.SealError):
        keys.open_private(sealed_a)

    _use_keys(monkeypatch, KEY_B, KEY_A)  # new key, old one as previous: rotate
    db = Database(own_db, pool_size=1, max_overflow=0)
    try:
        done = await keys.rotate_all(db)
        assert (done.resealed, done.sealed_raw, done.current) == (1, 0, 0)
        again = await keys.rotate_all(db)
        assert (again.resealed, again.current) == (0, 1)
    finally:
        await db.dispose()

    sealed_b, _ = await _key_row(own_db, event_id)
    _use_keys(monkeypatch, KEY_B)  # the previous key can go now
    assert keys.open_private(sealed_b).private_bytes_raw() == raw
    assert tickets.verify_offline(public, secret)[0] == "ok"
    _use_keys(monkeypatch, KEY_A)
    with pytest.raises(sealing.SealError):
        keys.open_private(sealed_b)


def test_rotate_keys_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`popdrop checkin rotate-keys`, run after the secret key changed."""
    env = server_env(tmp_path)
    old_key, new_key = env["POPDROP_SECRET_KEY"], "door-rotated-secret-" + "r" * 32

    def rotate(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*POPDROP, "checkin", "rotate-keys"],
            env={**env, "POPDROP_SECRET_KEY": new_key, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )

    asyncio.run(upgrade(env["POPDROP_DATABASE_URL"]))
    _use_keys(monkeypatch, old_key.encode())  # what the server sealed with until now
    asyncio.run(_seed(env["POPDROP_DATABASE_URL"]))

    blind = rotate()  # the old key is not given: nothing can be opened, nothing written
    assert blind.returncode == 2 and "key_unreadable" in blind.stderr, blind.stderr
    rotated = rotate(POPDROP_PREVIOUS_SECRET_KEYS=f"{old_key}, some-older-key")
    assert rotated.returncode == 0, rotated.stderr
    assert "1 resealed" in rotated.stdout
    again = rotate()  # the previous key is no longer needed
    assert again.returncode == 0 and "1 already current" in again.stdout, again.stdout


# ---------------------------------------------------------------- migration 0014

_orgs = sa.table(
    "organizations", sa.column("id"), sa.column("slug"), sa.column("name"), sa.column("created_at")
)
_events = sa.table(
    "events",
    *(
        sa.column(c)
        for c in (
            "id", "org_id", "slug", "title", "description", "venue_name", "venue_address",
            "timezone", "starts_at", "ends_at", "status", "hold_ttl_seconds",
            "max_hold_renewals", "created_at",
        )
    ),
)  # fmt: skip
_keys_t = sa.table(
    "checkin_event_keys",
    *(sa.column(c) for c in ("event_id", "org_id", "public_key", "private_key", "created_at")),
)
_tickets_t = sa.table(
    "tickets",
    *(
        sa.column(c)
        for c in (
            "id", "org_id", "event_id", "subject_kind", "subject_id", "status", "generation",
            "issued_epoch", "created_at", "changed_at",
        )
    ),
)  # fmt: skip


async def test_migration_0014_seals_raw_keys_and_backfills_short_codes(
    own_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await upgrade(own_db, "0013_rsvp_source")
    now = datetime.now(UTC)
    private, public = tickets.new_keypair()
    engine = create_engine(own_db, pool_size=1, max_overflow=0)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.insert(_orgs).values(id=1, slug="old", name="Old", created_at=now)
            )
            await conn.execute(
                sa.insert(_events).values(
                    id=1, org_id=1, slug="old", title="Old", description="", venue_name="",
                    venue_address="", timezone="UTC", starts_at=now,
                    ends_at=now + timedelta(hours=1), status="live", hold_ttl_seconds=900,
                    max_hold_renewals=2, created_at=now,
                )
            )  # fmt: skip
            await conn.execute(
                sa.insert(_keys_t).values(
                    event_id=1, org_id=1, public_key=public, private_key=private, created_at=now
                )
            )
            await conn.execute(
                sa.insert(_tickets_t),
                [
                    {
                        "id": n, "org_id": 1, "event_id": 1, "subject_kind": "manual",
                        "subject_id": n, "status": "valid", "generation": n % 2,
                        "issued_epoch": 1_700_000_000 + n, "created_at": now, "changed_at": now,
                    }
                    for n in (1, 2, 3)
                ],
            )  # fmt: skip
        _use_keys(monkeypatch, KEY_A)
        await upgrade(own_db, "0014_door")
        async with engine.connect() as conn:
            sealed = (
                await conn.execute(sa.text("SELECT private_key FROM checkin_event_keys"))
            ).scalar_one()
            codes = dict(
                (await conn.execute(sa.text("SELECT id, short_code FROM tickets"))).tuples().all()
            )
    finally:
        await engine.dispose()
    assert (
        bytes(sealed) != private and keys.open_private(bytes(sealed)).private_bytes_raw() == private
    )
    for n in (1, 2, 3):
        secret = tickets.sign(
            private, event_id=1, ticket_id=n, generation=n % 2, issued_epoch=1_700_000_000 + n
        )
        assert codes[n] == tickets.short_code(secret)


async def test_a_key_made_in_a_rolled_back_transaction_is_never_used(
    ctx: AppContext, tenant: Tenant
) -> None:
    """The first signer of an event is cached only once its key row commits: a rollback
    (a refused checkout that drew its order QR) must not leave this process signing with
    a key the database never kept, which no scanner could verify."""
    from popdrop.events.models import Event

    event_id = await make_event(ctx, tenant.org_id)
    with pytest.raises(RuntimeError):
        async with ctx.db.transaction() as session:
            event = await session.get(Event, event_id)
            assert event is not None
            lost = await service.event_signer(session, event, ctx.clock.now())
            raise RuntimeError("refused after the key was drawn")
    async with ctx.db.transaction() as session:
        event = await session.get(Event, event_id)
        assert event is not None
        kept = await service.event_signer(session, event, ctx.clock.now())
        stored = await session.scalar(
            sa.select(EventKey.public_key).where(EventKey.event_id == event_id)
        )
    assert kept.public_raw == stored != lost.public_raw
