"""The demo: one organization running a weekend pop-up. Re-running it keeps the data and
sets a fresh owner password (it is only ever stored hashed, so it cannot be re-printed)."""

from __future__ import annotations

import csv
import secrets
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts import service as accounts
from popdrop.accounts.models import Organization, User
from popdrop.accounts.service import ROLES, Principal
from popdrop.core.clock import SystemClock
from popdrop.core.config import Settings
from popdrop.core.db import Database
from popdrop.core.signing import Signer
from popdrop.events import service as events
from popdrop.events.models import Event
from popdrop.events.schemas import EventCreate, LaneCreate, PickupWindowCreate, SlotCreate
from popdrop.inventory import service as inventory
from popdrop.inventory.schemas import ProductCreate, StockSet
from popdrop.rsvp import service as rsvps
from popdrop.rsvp.schemas import RsvpCreate
from popdrop.vouchers import service as vouchers
from popdrop.vouchers.schemas import BatchCreate

DEMO_ORG = "demo"
DEMO_EMAIL = "owner@demo.popdrop.test"


async def seed(settings: Settings, db: Database, signer: Signer) -> dict[str, Any]:
    now = SystemClock().now()
    password = secrets.token_urlsafe(12)
    codes_file = settings.data_dir / "demo-codes.csv"
    async with db.transaction() as session:
        org = await session.scalar(select(Organization).where(Organization.slug == DEMO_ORG))
        fresh = org is None
        if org is None:
            org = await accounts.create_organization(
                session, slug=DEMO_ORG, name="Weekend Pop-up (demo)", now=now
            )
            await accounts.create_user(
                session, org_id=org.id, email=DEMO_EMAIL, password=password, role="owner", now=now
            )
        else:
            await session.execute(
                update(User)
                .where(User.email == DEMO_EMAIL)
                .values(password_hash=PasswordHasher().hash(password))
            )
        _token, plaintext = await accounts.create_token(
            session,
            signer,
            org_id=org.id,
            name="demo",
            scopes=ROLES["owner"],
            created_by="demo",
            now=now,
        )
        principal = Principal(org.id, "demo:seed", "owner", ROLES["owner"])
        if fresh:
            weekend = now + timedelta(days=3)
            _batch, codes = await vouchers.issue_batch(
                session,
                signer,
                principal,
                BatchCreate(
                    name="Saturday drop: 15% off",
                    quantity=200,
                    prefix="WKND",
                    tag="weekend",
                    valid_until=weekend,
                    per_contact_limit=1,
                    discount_kind="percent",
                    discount_value=15,
                    cost_per_use_minor=450,
                    budget_minor=50_000,
                    currency="EUR",
                    discount_description="15% off anything at the pop-up",
                ),
                now=now,
                audit_chains=settings.audit_chains,
            )
            await vouchers.issue_batch(
                session,
                signer,
                principal,
                BatchCreate(
                    name="Friends & family tote",
                    quantity=20,
                    max_uses=5,
                    tag="weekend",
                    ttl_seconds=8 * 3600,
                    discount_kind="free_item",
                    cost_per_use_minor=300,
                    currency="EUR",
                    discount_description="a free tote bag with any purchase",
                ),
                now=now,
                audit_chains=settings.audit_chains,
            )
            await _seed_event(session, signer, principal, settings, now)
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            with codes_file.open("w", newline="") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(["code"])
                writer.writerows([c] for c in codes)
            codes_file.chmod(0o600)
    with codes_file.open() as handle:
        sample = list(csv.reader(handle))[1][0]
    link, _ = vouchers.make_link(
        signer, settings.base_url, sample, expires_at=now + timedelta(hours=8)
    )
    async with db.reader() as session:
        event = await session.scalar(
            select(Event).where(Event.org_id == org.id).order_by(Event.id).limit(1)
        )
    return {
        "event_url": f"{settings.base_url.rstrip('/')}/e/{event.id}" if event else "",
        "email": DEMO_EMAIL,
        "password": password,
        "token": plaintext,
        "codes_file": str(codes_file),
        "sample_code": sample,
        "sample_link": link,
    }


async def _seed_event(
    session: AsyncSession, signer: Signer, owner: Principal, settings: Settings, now: datetime
) -> int:
    """The weekend pop-up itself: slots, two pickup lanes, product cards, a few RSVPs."""
    day = (now + timedelta(days=2)).replace(hour=10, minute=0, second=0, microsecond=0)
    event = await events.create_event(
        session,
        owner,
        EventCreate(
            slug="weekend-pop-up",
            title="Weekend Pop-up at the Old Tram Depot",
            description="Limited sneakers, tote bags and coffee. Reserve, pick up, hang out.",
            venue_name="Old Tram Depot",
            venue_address="Depotstrasse 1, Berlin",
            latitude=52.52,
            longitude=13.40,
            timezone="Europe/Berlin",
            starts_at=day,
            ends_at=day + timedelta(hours=8),
            opens_at=now + timedelta(hours=1),
        ),
        now=now,
    )
    await events.set_status(session, owner, event.id, "published")
    slots = [
        await events.add_slot(
            session,
            owner,
            event.id,
            SlotCreate(
                label=f"{10 + 2 * i}:00-{12 + 2 * i}:00",
                starts_at=day + timedelta(hours=2 * i),
                ends_at=day + timedelta(hours=2 * i + 2),
                capacity=40,
            ),
        )
        for i in range(3)
    ]
    lanes = [
        await events.add_lane(session, owner, event.id, LaneCreate(name=name, pickup_point=where))
        for name, where in (("Front desk", "Main entrance"), ("Back door", "Courtyard gate"))
    ]
    for lane in lanes:
        for slot in slots:
            await events.add_pickup_window(
                session, owner, lane.id, PickupWindowCreate(slot_id=slot.id, capacity=25)
            )
    catalogue = (
        ("Drop sneaker", "Numbered pair, pop-up only", 12_900, ["EU 40", "EU 42", "EU 44"], 12),
        ("Canvas tote", "Printed on site", 1_500, ["one size"], 60),
        ("Cold brew", "Made by the corner café", 400, ["330 ml"], 120),
    )
    for title, highlights, price, sizes, units in catalogue:
        product = await inventory.create_product(
            session,
            owner,
            event.id,
            ProductCreate(title=title, highlights=highlights, price_minor=price, variants=sizes),
        )
        for variant in product.variants:
            for lane in lanes:
                await inventory.set_stock(
                    session,
                    owner,
                    StockSet(variant_id=variant.id, lane_id=lane.id, total=units // len(lanes)),
                    now=now,
                )
    for i, email in enumerate(("ada@example.org", "grace@example.org", "linus@example.org")):
        await rsvps.create_rsvp(
            session,
            signer,
            event_id=event.id,
            spec=RsvpCreate(
                slot_id=slots[i % len(slots)].id,
                email=email,
                places=1 + i % 2,
                consent=True,
                consent_text="Yes, send me my ticket and news about this pop-up.",
            ),
            now=now,
            audit_chains=settings.audit_chains,
        )
    return event.id
