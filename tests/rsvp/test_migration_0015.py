"""Migration 0015 on a database that already holds duplicate RSVPs (made before one RSVP
per person and slot): nothing is cancelled, later duplicates are marked `duplicate_of`
the earlier one, and from then on the database itself refuses a new duplicate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from popdrop.core.db import create_engine
from popdrop.core.migrate import upgrade
from tests.conftest import postgres_url, side_postgres

_orgs = sa.table(
    "organizations", sa.column("id"), sa.column("slug"), sa.column("name"), sa.column("created_at")
)
_events = sa.table(
    "events",
    *(sa.column(name) for name in (
        "id", "org_id", "slug", "title", "description", "venue_name", "venue_address",
        "timezone", "starts_at", "ends_at", "status", "hold_ttl_seconds", "max_hold_renewals",
        "created_at",
    )),
)  # fmt: skip
_slots = sa.table(
    "time_slots",
    *(sa.column(name) for name in (
        "id", "org_id", "event_id", "label", "starts_at", "ends_at", "capacity", "taken",
    )),
)  # fmt: skip
_rsvps = sa.table(
    "rsvps",
    *(sa.column(name) for name in (
        "id", "org_id", "event_id", "slot_id", "email", "phone", "places", "consent_text",
        "status", "created_at",
    )),
)  # fmt: skip

# id, slot, email, phone, status
BEFORE = [
    (1, 1, "ann@example.com", None, "confirmed"),
    (2, 1, "ann@example.com", None, "confirmed"),  # Ann again: a duplicate of 1
    (3, 1, "bob@example.com", "+33612345678", "waitlisted"),
    (4, 1, None, "+33612345678", "cancelled"),  # cancelled: never counts
    (5, 1, None, "+33612345678", "offered"),  # Bob's phone again: a duplicate of 3
    (6, 2, "ann@example.com", None, "confirmed"),  # another slot: not a duplicate
]


@pytest.fixture(params=["sqlite", "postgres"])
async def own_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of the test's own (it migrates step by step)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'guards.db'}"
        return
    if postgres_url() is None:
        pytest.skip("PostgreSQL run: set POPDROP_TEST_DATABASE_URL (CI does)")
    url = await side_postgres("guards")
    yield url


async def test_existing_duplicates_are_marked_and_new_ones_refused(own_db: str) -> None:
    await upgrade(own_db, "0014_door")
    now = datetime.now(UTC)
    engine = create_engine(own_db, pool_size=1, max_overflow=0)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.insert(_orgs).values(id=1, slug="o", name="O", created_at=now))
            await conn.execute(
                sa.insert(_events).values(
                    id=1, org_id=1, slug="e", title="E", description="", venue_name="",
                    venue_address="", timezone="UTC", starts_at=now,
                    ends_at=now + timedelta(hours=4), status="published",
                    hold_ttl_seconds=900, max_hold_renewals=2, created_at=now,
                )
            )  # fmt: skip
            await conn.execute(
                sa.insert(_slots),
                [
                    {"id": n, "org_id": 1, "event_id": 1, "label": "", "starts_at": now,
                     "ends_at": now + timedelta(hours=1), "capacity": 10, "taken": 0}
                    for n in (1, 2)
                ],
            )  # fmt: skip
            await conn.execute(
                sa.insert(_rsvps),
                [
                    {"id": id_, "org_id": 1, "event_id": 1, "slot_id": slot, "email": email,
                     "phone": phone, "places": 1, "consent_text": "yes", "status": status,
                     "created_at": now}
                    for id_, slot, email, phone, status in BEFORE
                ],
            )  # fmt: skip
        await upgrade(own_db)
        async with engine.connect() as conn:
            rows = await conn.execute(sa.text("SELECT id, status, duplicate_of FROM rsvps"))
            after = {id_: (status, duplicate_of) for id_, status, duplicate_of in rows}
        assert after == {
            1: ("confirmed", None),
            2: ("confirmed", 1),
            3: ("waitlisted", None),
            4: ("cancelled", None),
            5: ("offered", 3),
            6: ("confirmed", None),
        }
        for email, phone in (("ann@example.com", None), (None, "+33612345678")):
            with pytest.raises(IntegrityError):
                async with engine.begin() as conn:
                    await conn.execute(
                        sa.insert(_rsvps).values(
                            id=10, org_id=1, event_id=1, slot_id=1, email=email, phone=phone,
                            places=1, consent_text="yes", status="confirmed", created_at=now,
                        )
                    )  # fmt: skip
        async with engine.begin() as conn:  # a cancelled one is fine
            await conn.execute(
                sa.insert(_rsvps).values(
                    id=11, org_id=1, event_id=1, slot_id=1, email="ann@example.com",
                    places=1, consent_text="yes", status="cancelled", created_at=now,
                )
            )  # fmt: skip
    finally:
        await engine.dispose()
