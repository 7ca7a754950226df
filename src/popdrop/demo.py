"""The demo: one organization running a weekend pop-up. Re-running it keeps the data and
sets a fresh owner password (it is only ever stored hashed, so it cannot be re-printed)."""

from __future__ import annotations

import csv
import random
import secrets
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts import service as accounts
from popdrop.accounts.models import Organization, User
from popdrop.accounts.service import ROLES, Principal
from popdrop.attribution import service as attribution
from popdrop.attribution.models import Channel, PromoCode, ShortLink, TargetKind
from popdrop.attribution.schemas import LinkTags, LinkTarget, PromoCodeCreate, ShortLinkCreate
from popdrop.audience import segments
from popdrop.audience import settings as audience_settings
from popdrop.audience.models import (
    ConsentEvent,
    Contact,
    ContactActivity,
    ContactLabel,
    Segment,
    Suppression,
)
from popdrop.audience.schemas import AudienceSettingsIn, SegmentIn, SegmentRules
from popdrop.chat import flow_store
from popdrop.commerce import catalog, orders, samples, settlement
from popdrop.commerce.catalog_schemas import (
    BundleCreate,
    CheckoutPolicyIn,
    ComponentIn,
    PriceRuleCreate,
)
from popdrop.commerce.lifecycle import OrderSource, PaymentMethod
from popdrop.commerce.pricing import RuleKind
from popdrop.commerce.schemas import OrderCreate, OrderOut
from popdrop.core import audit, links
from popdrop.core.clock import SystemClock
from popdrop.core.config import Settings
from popdrop.core.db import Database, table_of
from popdrop.core.identity import identity_hash
from popdrop.core.signing import Signer
from popdrop.drops import service as drops
from popdrop.drops.models import Drop, SendRow
from popdrop.drops.schemas import DropCreate
from popdrop.events import service as events
from popdrop.events.models import Event, Partner
from popdrop.events.schemas import (
    EventCreate,
    LaneCreate,
    PartnerCreate,
    PickupWindowCreate,
    SlotCreate,
)
from popdrop.inventory import service as inventory
from popdrop.inventory.schemas import HoldCreate, ProductCreate, StockSet
from popdrop.metrics import log as funnel_log
from popdrop.metrics.kinds import Kind, nps_class
from popdrop.metrics.survey_models import SurveyInvitation
from popdrop.partners import service as partners
from popdrop.partners.contract import PosLine, PosSaleV1, PosSource, PosTotals
from popdrop.partners.lifecycle import PosProvider
from popdrop.rsvp import service as rsvps
from popdrop.rsvp.schemas import RsvpCreate
from popdrop.vouchers import service as vouchers
from popdrop.vouchers.schemas import BatchCreate

DEMO_ORG = "demo"
DEMO_EMAIL = "owner@demo.popdrop.test"


async def seed(settings: Settings, db: Database, signer: Signer) -> dict[str, Any]:
    audit.configure(chains=settings.audit_chains)
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
        principal = accounts.system_principal(org.id, "demo:seed", role="owner")
        event_id: int | None = None
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
            )
            event_id = await _seed_event(session, signer, principal, settings, now)
            await _seed_commerce(session, signer, principal, event_id, codes[-1], now)
            # The web chat widget (/chat/demo) runs the shipped flow on this event.
            await flow_store.publish_default_flow(session, org.id, event_id, now=now)
            await _seed_audience(session, signer, principal, event_id, now)
            await _seed_history(session, signer, principal, now)
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            with codes_file.open("w", newline="") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(["code"])
                writer.writerows([c] for c in codes)
            codes_file.chmod(0o600)
    if fresh and event_id is not None:
        await _seed_drop(settings, db, signer, principal, event_id, plaintext)
    with codes_file.open() as handle:
        sample = list(csv.reader(handle))[1][0]
    link, _ = vouchers.make_link(
        signer, settings.base_url, sample, expires_at=now + timedelta(hours=8)
    )
    async with db.reader() as session:
        event = await session.scalar(
            select(Event).where(Event.org_id == org.id).order_by(Event.id).limit(1)
        )
    checkout = (
        await fresh_checkout_link(settings, db, signer, org.id, event.id, now) if event else ""
    )
    short_link = ""
    if event is not None:
        async with db.transaction() as session:
            short_link = await _seed_attribution(session, signer, principal, settings, event, now)
    async with db.reader() as session:
        audience_line = await _audience_summary(session, principal, now)
        drop_line = await _drop_summary(session, principal, settings.base_url)
        insights_line, report_url = await _insights_summary(
            session, signer, principal, settings.base_url, now
        )
    return {
        "audience": audience_line,
        "drop": drop_line,
        "insights": insights_line,
        "report_url": report_url,
        "event_url": links.event_url(settings.base_url, event.id) if event else "",
        "short_link": short_link,
        "links_url": f"{settings.base_url}/links",
        "pos_url": f"{settings.base_url}/partners/sales",
        "event_id": event.id if event else None,
        "chat_url": links.chat_url(settings.base_url, DEMO_ORG),
        "checkout_url": checkout,
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
            opens_at=now,  # open at once: the demo books, holds and chats right away
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
    # (title, highlights, price, sizes, units, unit cost, margin floor in basis points)
    catalogue = (
        ("Drop sneaker", "Numbered pair, pop-up only", 12_900, ["EU 40", "EU 42", "EU 44"], 12,
         7_000, 2_000),
        ("Canvas tote", "Printed on site", 1_500, ["one size"], 60, 600, 1_000),
        ("Cold brew", "Made by the corner café", 400, ["330 ml"], 120, 150, 0),
    )  # fmt: skip
    for title, highlights, price, sizes, units, cost, floor_bp in catalogue:
        product = await inventory.create_product(
            session,
            owner,
            event.id,
            ProductCreate(
                title=title,
                highlights=highlights,
                price_minor=price,
                variants=sizes,
                unit_cost_minor=cost,
                margin_floor_bp=floor_bp,
            ),
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
        )
    return event.id


# ---------------------------------------------------------------- commerce


async def _seed_commerce(
    session: AsyncSession,
    signer: Signer,
    owner: Principal,
    event_id: int,
    weekend_code: str,
    now: datetime,
) -> None:
    """Selling at the pop-up: a sneaker + tote bundle, "buy 2 cold brews, get 1 free", two
    codes per order, a cold-brew taster given out as a sample paid by the café partner,
    and three orders: the bundle with the 15 % weekend code paid at the lane, three cold
    brews waiting to be paid at pickup, a tote paid and handed out."""
    lanes = await events.list_lanes(session, owner, event_id)
    slots = await events.list_slots(session, owner, event_id)
    front = lanes[0]
    variants = {
        (product.title, variant.name): variant.id
        for product in await inventory.list_products(session, owner, event_id)
        for variant in product.variants
    }
    bundle = await catalog.create_bundle(
        session,
        owner,
        event_id,
        BundleCreate(
            title="Sneaker + tote",
            price_minor=13_900,
            components=[
                ComponentIn(variant_id=variants["Drop sneaker", "EU 42"]),
                ComponentIn(variant_id=variants["Canvas tote", "one size"]),
            ],
        ),
    )
    await catalog.create_rule(
        session,
        owner,
        event_id,
        PriceRuleCreate(
            name="Cold brew: buy 2, get 1 free",
            kind=RuleKind.BUY_X_GET_Y,
            params={"buy": 2, "get": 1},
            budget_minor=20_000,
        ),
    )
    await catalog.set_policy(session, owner, event_id, CheckoutPolicyIn(max_codes_per_order=2))
    partner = await events.add_partner(
        session,
        owner,
        event_id,
        PartnerCreate(name="Corner café", contact_email="cafe@partner.popdrop.test"),
    )
    taster = await inventory.create_product(
        session,
        owner,
        event_id,
        ProductCreate(
            title="Cold brew taster",
            highlights="A free 60 ml taster, on the café",
            price_minor=0,
            unit_cost_minor=80,
            is_sample=True,
            variants=["60 ml"],
        ),
    )
    await inventory.set_stock(
        session, owner, StockSet(variant_id=taster.variants[0].id, lane_id=front.id, total=40),
        now=now,
    )  # fmt: skip
    for email in ("ada@example.org", "grace@example.org"):
        await samples.give_sample(
            session, signer, owner, product_id=taster.id, campaign="opening-weekend",
            contact_ref=email, allocated_to=f"partner:{partner.id}", drop_id=None,
            segment="hot", conversation_id=None, lane_id=front.id, now=now,
        )  # fmt: skip

    async def order(
        holds: list[int], email: str, codes: list[str], source: OrderSource
    ) -> OrderOut:
        return await orders.place_order(
            session,
            signer,
            owner,
            OrderCreate(
                hold_ids=holds, codes=codes, source=source, contact_ref=email,
                receipt_email=email, payment_method=PaymentMethod.PAY_AT_PICKUP,
            ),
            now=now,
        )  # fmt: skip

    bundled = await catalog.take_bundle(
        session, owner, bundle_id=bundle.id, lane_id=front.id, slot_id=slots[0].id,
        contact_ref="ada@example.org", now=now,
    )  # fmt: skip
    paid = await order([h.id for h in bundled], "ada@example.org", [weekend_code], OrderSource.CHAT)
    await settlement.mark_paid_at_lane(session, owner, paid.id, tender="card", now=now)

    async def hold(variant: str, qty: int, email: str, slot: int) -> int:
        taken = await inventory.create_hold(
            session,
            owner,
            HoldCreate(
                variant_id=variants[variant, _only_size(variants, variant)], lane_id=front.id,
                qty=qty, slot_id=slots[slot].id, contact_ref=email,
            ),
            now=now,
        )  # fmt: skip
        return taken.id

    await order([await hold("Cold brew", 3, "grace@example.org", 1)], "grace@example.org", [],
                OrderSource.WEB)  # fmt: skip
    tote = await order(
        [await hold("Canvas tote", 1, "linus@example.org", 0)], "linus@example.org", [],
        OrderSource.LANE,
    )  # fmt: skip
    await settlement.mark_paid_at_lane(session, owner, tote.id, tender="cash", now=now)


DEMO_CAMPAIGN = "opening-weekend"


async def _seed_attribution(
    session: AsyncSession,
    signer: Signer,
    owner: Principal,
    settings: Settings,
    event: Event,
    now: datetime,
) -> str:
    """Attribution, once per demo organization: a promo code of the café partner, a
    poster short link to the event page, the café's till connected (Standard Webhooks)
    and two of its sales ingested through the real service — one with the promo code, so
    it is attributed to the café. Returns the poster link's short URL."""
    poster = await session.scalar(
        select(ShortLink).where(
            ShortLink.org_id == owner.org_id,
            ShortLink.event_id == event.id,
            ShortLink.utm_campaign == DEMO_CAMPAIGN,
        )
    )
    if poster is not None:  # seeded by an earlier run
        return attribution.short_url(settings.short_links_base, poster.slug)
    partner = await session.scalar(
        select(Partner).where(Partner.event_id == event.id).order_by(Partner.id).limit(1)
    )
    poster = await attribution.create_short_link(
        session,
        owner,
        ShortLinkCreate(
            target=LinkTarget(kind=TargetKind.EVENT, id=event.id),
            tags=LinkTags(channel=Channel.POSTER, utm_source="poster", utm_campaign=DEMO_CAMPAIGN),
        ),
        now=now,
    )
    if partner is None:
        return attribution.short_url(settings.short_links_base, poster.slug)
    promo: PromoCode = await attribution.create_promo_code(
        session,
        owner,
        PromoCodeCreate(
            label="Café counter", event_id=event.id, partner_id=partner.id,
            channel=Channel.PARTNER, prefix="CAFE", discount_kind="percent", discount_value=10,
        ),
        now=now,
        signer=signer,
    )  # fmt: skip
    till = await partners.create_connection(
        session, owner, partner_id=partner.id, provider=PosProvider.STANDARD,
        account_id="cafe-demo", location_id="counter", notification_url=None, secret=None,
        base_url=settings.base_url, now=now,
    )  # fmt: skip
    sales: list[tuple[str, list[PosLine], list[str]]] = [
        ("demo-sale-1", [PosLine(sku="COLD-BREW", quantity=2, unit_price_minor=400)], []),
        (
            "demo-sale-2",
            [PosLine(sku="TOTE", quantity=1, unit_price_minor=1500, discount_minor=150)],
            [promo.code] if promo.code else [],
        ),
    ]
    for number, (external_id, lines, codes) in enumerate(sales):
        subtotal = sum(line.quantity * line.unit_price_minor for line in lines)
        discount = sum(line.discount_minor for line in lines)
        sale = PosSaleV1(
            source=PosSource(provider="demo-till", account="cafe-demo", location="counter"),
            external_id=external_id,
            event_id=f"{external_id}-created",
            occurred_at=now - timedelta(minutes=30 - 10 * number),
            currency="EUR",
            lines=lines,
            totals=PosTotals(
                subtotal_minor=subtotal, discount_minor=discount, total_minor=subtotal - discount
            ),
            payment_methods=["card"],
            codes=codes,
        )
        await partners.ingest(session, signer, till.connection, sale, topic="pos.sale.v1", now=now)
    return attribution.short_url(settings.short_links_base, poster.slug)


def _only_size(variants: dict[tuple[str, str], int], title: str) -> str:
    return next(size for product, size in variants if product == title)


async def fresh_checkout_link(
    settings: Settings, db: Database, signer: Signer, org_id: int, event_id: int, now: datetime
) -> str:
    """A checkout link for a new 15-minute hold on one pair of sneakers (EU 44), made at
    every start of the demo: open it, apply a code, pay with the Stripe sandbox or choose
    pay at pickup."""
    owner = accounts.system_principal(org_id, "demo:checkout", role="owner")
    async with db.transaction() as session:
        lanes = await events.list_lanes(session, owner, event_id)
        slots = await events.list_slots(session, owner, event_id)
        sneaker = next(
            variant.id
            for product in await inventory.list_products(session, owner, event_id)
            for variant in product.variants
            if product.title == "Drop sneaker" and variant.name == "EU 44"
        )
        held = await inventory.create_hold(
            session,
            owner,
            HoldCreate(variant_id=sneaker, lane_id=lanes[0].id, slot_id=slots[1].id),
            now=now,
        )
    return links.checkout_url(signer, settings.base_url, held.id, org_id)


# ---------------------------------------------------------------- audience

DEMO_CONTACTS = 1_000
DEMO_VIPS = 100
EMAIL_WORDING = (
    "Yes, send me drop announcements, invitations and offers from Weekend Pop-up by email. "
    "I can unsubscribe at any time."
)
SMS_WORDING = "Yes, text me when a drop opens (max 4 a month). Reply STOP to opt out."
FIRST_NAMES = (
    "Ada", "Grace", "Linus", "Mia", "Noah", "Lena", "Emil", "Hanna", "Jonas", "Lea",
    "Paul", "Sofia", "Ben", "Emma", "Finn", "Ida", "Karim", "Aylin", "Mateo", "Zoe",
    "Yusuf", "Clara", "Luca", "Nora", "Omar", "Frida", "Theo", "Amira", "Milan", "Greta",
)  # fmt: skip
INTERESTS = ("sneakers", "streetwear", "coffee", "vinyl", "art-prints", "skate")
LOCALES = (("de-DE", 50), ("en-GB", 20), ("fr-FR", 10), ("tr-TR", 8), ("es-ES", 7), ("", 5))
VENUE = (52.52, 13.40)  # the demo event's venue


async def _seed_audience(
    session: AsyncSession, signer: Signer, owner: Principal, event_id: int, now: datetime
) -> None:
    """1,000 contacts with a realistic recency spread, consent with wording and proof, a
    100-person VIP tag, interests, locales, some coordinates near the venue, two saved
    segments and a HELP text. Core bulk inserts (well under a second on SQLite) and a
    seeded random, so every demo has the same audience relative to its own "now"."""
    rng = random.Random(20240607)
    org_id = owner.org_id
    locales = [code for code, weight in LOCALES for _ in range(weight)]
    rows: list[dict[str, Any]] = []
    # The RSVP'd guests of the demo event come first, hot and opted in.
    known = ["ada@example.org", "grace@example.org", "linus@example.org"]
    for i in range(DEMO_CONTACTS):
        first = FIRST_NAMES[i % len(FIRST_NAMES)]
        email: str | None = known[i] if i < len(known) else f"{first.lower()}.{i:04d}@example.net"
        phone: str | None = f"+4915{rng.randrange(10**8, 10**9)}" if rng.random() < 0.55 else None
        if phone and i >= len(known) and rng.random() < 0.08:
            email = None  # phone-only: met at the door, texted a voucher
        roll = rng.random()
        if i < len(known) or roll < 0.15:
            engaged: datetime | None = now - timedelta(seconds=rng.uniform(600, 7 * 86400))
        elif roll < 0.50:
            engaged = now - timedelta(seconds=rng.uniform(7 * 86400 + 60, 60 * 86400))
        elif roll < 0.85:
            engaged = now - timedelta(seconds=rng.uniform(60 * 86400 + 60, 540 * 86400))
        else:
            engaged = None  # imported, never engaged
        created = (engaged or now) - timedelta(days=rng.uniform(1, 300))
        near = rng.random() < 0.4
        consent_email = "none"
        if email is not None:
            consent_email = rng.choices(["granted", "revoked", "none"], [76, 5, 19])[0]
        consent_sms = "none"
        if phone is not None:
            consent_sms = rng.choices(["granted", "revoked", "none"], [72, 4, 24])[0]
        if i < len(known):
            consent_email = "granted"
        rows.append(
            {
                "org_id": org_id,
                "email": email,
                "phone": phone,
                "email_hash": identity_hash(signer, "email", email) if email else None,
                "phone_hash": identity_hash(signer, "phone", phone) if phone else None,
                "first_name": first,
                "locale": rng.choice(locales) or None,
                "time_zone": "Europe/Berlin",
                "source": rng.choice(("pop-up signup", "instagram", "import: 2023 list", "rsvp")),
                "lat": VENUE[0] + rng.gauss(0, 0.06) if near else None,
                "lon": VENUE[1] + rng.gauss(0, 0.09) if near else None,
                "consent_email": consent_email,
                "consent_sms": consent_sms,
                "consent_chat": "none",
                "frequency": rng.choices(["all", "weekly", "monthly"], [80, 15, 5])[0],
                "created_at": created,
                "updated_at": created,
                "last_engaged_at": engaged,
                "erased_at": None,
            }
        )
    contacts = table_of(Contact)
    ids = list(
        (
            await session.execute(
                insert(contacts).returning(contacts.c.id, sort_by_parameter_order=True), rows
            )
        ).scalars()
    )
    labels: list[dict[str, Any]] = []
    vips = set(rng.sample(range(DEMO_CONTACTS), DEMO_VIPS))
    for i, cid in enumerate(ids):
        tags = {"vip"} if i in vips else set()
        if rng.random() < 0.03:
            tags.add("press")
        if rng.random() < 0.05:
            tags.add("wholesale")
        labels += [{"contact_id": cid, "kind": "tag", "value": t, "org_id": org_id} for t in tags]
        for topic in rng.sample(INTERESTS, rng.choice((0, 1, 1, 2, 2, 3))):
            labels.append({"contact_id": cid, "kind": "interest", "value": topic, "org_id": org_id})
    consents: list[dict[str, Any]] = []
    suppressions: list[dict[str, Any]] = []
    activity: list[dict[str, Any]] = []
    kinds = ("click", "click", "chat", "rsvp", "visit", "purchase")
    for cid, row in zip(ids, rows, strict=True):
        for channel, wording, point in (
            ("email", EMAIL_WORDING, "email"),
            ("sms", SMS_WORDING, "phone"),
        ):
            state = row[f"consent_{channel}"]
            if state == "none":
                continue
            granted_at = row["created_at"] + timedelta(minutes=rng.randint(0, 30))
            proof = (
                f"signup form /e/{event_id} · {granted_at:%Y-%m-%d %H:%M} UTC · "
                f"ip 198.51.100.{rng.randint(1, 254)}"
            )
            consents.append(
                {
                    "org_id": org_id,
                    "contact_id": cid,
                    "channel": channel,
                    "action": "grant",
                    "source": "form",
                    "wording": wording,
                    "proof": proof,
                    "at": granted_at,
                }
            )
            if state == "revoked":  # opted out later: ledger, and the suppression list
                revoked_at = granted_at + timedelta(days=rng.uniform(1, 90))
                consents.append(
                    {
                        "org_id": org_id,
                        "contact_id": cid,
                        "channel": channel,
                        "action": "revoke",
                        "source": "unsubscribe" if channel == "email" else "sms_keyword",
                        "wording": "List-Unsubscribe one-click"
                        if channel == "email"
                        else "Replied STOP",
                        "proof": None,
                        "at": min(revoked_at, now),
                    }
                )
                suppressions.append(
                    {
                        "org_id": org_id,
                        "identifier_hash": row[f"{point}_hash"],
                        "channel": channel,
                        "kind": point,
                        "reason": "opt_out",
                        "created_at": min(revoked_at, now),
                    }
                )
        engaged = row["last_engaged_at"]
        if engaged is not None:
            for step in range(rng.randint(1, 3)):  # the last one is what makes them engaged
                kind = (
                    "rsvp"
                    if row["email"] in ("ada@example.org", "grace@example.org", "linus@example.org")
                    else rng.choice(kinds)
                )
                activity.append(
                    {
                        "org_id": org_id,
                        "contact_id": cid,
                        "kind": kind,
                        "event_id": event_id if kind == "rsvp" else None,
                        "ref": "demo",
                        "at": engaged - timedelta(days=step * rng.uniform(3, 40)),
                    }
                )
    await session.execute(insert(table_of(ContactLabel)), labels)
    await session.execute(insert(table_of(ConsentEvent)), consents)
    if suppressions:
        await session.execute(insert(table_of(Suppression)), suppressions)
    await session.execute(insert(table_of(ContactActivity)), activity)
    await audience_settings.update_settings(
        session,
        owner,
        AudienceSettingsIn(
            hot_days=7,
            warm_days=60,
            help_text=(
                "Weekend Pop-up: drops & offers from the Old Tram Depot, Berlin. "
                "Questions: hello@weekend-popup.example. Reply STOP to opt out."
            ),
            retention_months=24,
        ),
    )
    for name, rules in (
        ("VIP — hot and warm", SegmentRules(recency=["hot", "warm"], tags_any=["vip"])),
        (VIP_LIST, SegmentRules(tags_any=["vip"])),  # the demo drop's audience
        ("Cold — win-back", SegmentRules(channels=["email"], recency=["cold"])),
        (
            "Sneakerheads near the depot",
            SegmentRules(interests_any=["sneakers"], near={"event_id": event_id, "km": 10}),
        ),
    ):
        await segments.save_segment(session, owner, SegmentIn(name=name, rules=rules), now=now)


async def _audience_summary(session: AsyncSession, owner: Principal, now: datetime) -> str:
    """One line for the demo summary: how the audience splits by recency."""
    counted = await segments.count_segment(
        session, owner, SegmentRules(channels=["email", "sms"]), now=now
    )
    total = await session.scalar(
        select(func.count()).select_from(Contact).where(Contact.org_id == owner.org_id)
    )
    vips = await session.scalar(
        select(func.count())
        .select_from(ContactLabel)
        .where(
            ContactLabel.org_id == owner.org_id,
            ContactLabel.kind == "tag",
            ContactLabel.value == "vip",
        )
    )
    buckets = " / ".join(f"{n} {b}" for b, n in counted.by_bucket.items())
    return f"{total:,} contacts, {vips} VIP; sendable now: {counted.total:,} ({buckets})"


# ---------------------------------------------------------------- the VIP drop

VIP_LIST = "VIP list"
DROP_NAME = "Saturday VIP drop"
_CTA = "{{ voucher_url }}"
# Per recency bucket (hot: an invite and the personal code; warm: a micro-bundle; cold: a
# free sample; the rest: the plain offer): (headline, paragraph). The A/B test is on the
# subject only, so both variants carry the same bodies.
_BODIES = {
    "hot": (
        "You're on the VIP list",
        "Doors open an hour early for you on {{ event.date }} at {{ event.time }}. "
        "Your personal code {{ voucher_code }} takes 15% off anything in the depot.",
    ),
    "warm": (
        "Your VIP bundle is waiting",
        "Tote + cold brew, packed for you: pick it up on {{ event.date }} and your code "
        "{{ voucher_code }} takes 15% off the bundle and anything else.",
    ),
    "cold": (
        "It's been a while: a cold brew is on us",
        "Come by on {{ event.date }}, show your code {{ voucher_code }} for a free cold brew "
        "and 15% off anything at the pop-up.",
    ),
    "default": (
        "The Saturday drop is on",
        "Sneakers, totes and coffee on {{ event.date }} at {{ event.time }}. Your personal "
        "code {{ voucher_code }} takes 15% off anything at the pop-up.",
    ),
}
_SUBJECTS = {
    "A": "{{ first_name | fallback }}, your VIP code for Saturday",
    "B": "VIP early access: 15% off before anyone else, {{ first_name | fallback }}",
}


def _email(subject: str, headline: str, paragraph: str) -> dict[str, str]:
    return {
        "subject": subject,
        "text": (
            f"Hi {{{{ first_name | fallback }}}},\n\n{headline}. {paragraph}\n\n"
            f"Reserve with your code: {_CTA}\nWhat's dropping: {{{{ event.url }}}}\n"
        ),
        "html": (
            f'<p>Hi {{{{ first_name | fallback }}}},</p><h1 style="font-size:22px">'
            f"{headline}</h1><p>{paragraph}</p>"
            f'<p><a href="{_CTA}" style="display:inline-block;padding:12px 20px;'
            "background:#5b3df5;color:#ffffff;border-radius:6px;text-decoration:none;"
            'font-weight:600">Reserve with your code</a></p>'
            '<p><a href="{{ event.url }}">See what\'s dropping</a></p>'
        ),
    }


def demo_drop_spec(segment_id: int, event_id: int) -> DropCreate:
    """The demo's drop: the VIP list by email through the development mailbox, a code per
    recipient, an A/B subject test on half the list (winner by clicks after 10 minutes),
    content per recency bucket, the owner as the seed list."""
    return DropCreate.model_validate(
        {
            "name": DROP_NAME,
            "event_id": event_id,
            "segment_id": segment_id,
            "channels": ["email"],
            "from_email": "drops@weekend-popup.example",
            "from_name": "Weekend Pop-up",
            "variants": [
                {
                    "name": name,
                    "split_percent": 50,
                    "content": {
                        "email": {
                            bucket: _email(subject, *body) for bucket, body in _BODIES.items()
                        }
                    },
                }
                for name, subject in _SUBJECTS.items()
            ],
            "voucher": {
                "discount_kind": "percent",
                "discount_value": 15,
                "discount_description": "15% off anything at the pop-up (VIP)",
                "ttl_seconds": 4 * 86400,  # from each recipient's send, past the weekend
                "prefix": "SAT",
            },
            "seed_list": [DEMO_EMAIL],
            "ab_metric": "click",
            "ab_test_fraction": 0.5,
            "ab_decide_after_seconds": 600,
            "ab_min_sample": 10,
            "ab_fallback": "control",
            # No quiet hours: the demo sends whatever the hour (real drops keep 21:00 to 08:00).
            "quiet_start_hour": 0,
            "quiet_end_hour": 0,
        }
    )


async def _seed_drop(
    settings: Settings,
    db: Database,
    signer: Signer,
    owner: Principal,
    event_id: int,
    token: str,
) -> int:
    """Create the VIP drop, run its seed test through the API (in-process: the same
    transports and link checks as `POST /api/v1/drops/{id}/seed-test`), then start it:
    `popdrop serve` sends it through its in-process worker into the mailbox."""
    import httpx

    from popdrop.app import create_app
    from popdrop.core.ratelimit import GuessGuard, MemoryCounter
    from popdrop.web.context import AppContext

    clock = SystemClock()
    async with db.transaction() as session:
        segment_id = await session.scalar(
            select(Segment.id).where(Segment.org_id == owner.org_id, Segment.name == VIP_LIST)
        )
        assert segment_id is not None
        drop = await drops.create_drop(
            session,
            signer,
            owner,
            demo_drop_spec(segment_id, event_id),
            now=clock.now(),
        )
        drop_id = drop.id
    guard = GuessGuard(
        MemoryCounter(),
        per_address=settings.guess_limit_per_address,
        per_org=settings.guess_limit_per_org,
        window=settings.guess_window_seconds,
    )
    # Quiet: no request log lines in the middle of the demo's summary.
    quiet = settings.model_copy(update={"log_requests": False, "log_level": "WARNING"})
    app = create_app(ctx=AppContext(quiet, db, signer, clock, guard))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=settings.base_url, timeout=60
    ) as client:
        tested = await client.post(
            f"/api/v1/drops/{drop_id}/seed-test", headers={"Authorization": f"Bearer {token}"}
        )
    tested.raise_for_status()
    if tested.json()["seed_status"] == "passed":
        async with db.transaction() as session:
            await drops.start_drop(session, owner, drop_id, now=clock.now())
    return drop_id


async def _drop_summary(session: AsyncSession, owner: Principal, base_url: str) -> str:
    """One line for the demo summary: where the drop and its messages are."""
    drop = await session.scalar(
        select(Drop).where(Drop.org_id == owner.org_id, Drop.name == DROP_NAME).limit(1)
    )
    if drop is None:
        return ""
    base = links.root(base_url)
    frozen = await session.scalar(
        select(func.count()).select_from(SendRow).where(SendRow.drop_id == drop.id)
    )
    return (
        f"{drop.name}: {drop.status}, seed test {drop.seed_status}, {frozen} recipients "
        f"(A/B subject test) → {base}/drops/{drop.id} · messages: {base}/mailbox"
    )


# ---------------------------------------------------------------- funnel history

PAST_EVENT_SLUG = "autumn-pop-up"
DEMO_COMMENTS: dict[str, tuple[str | None, ...]] = {
    "promoter": (
        None,
        None,
        "Loved the coffee corner.",
        "Pickup took two minutes. Perfect!",
        "Great sneakers, friendly people.",
    ),
    "passive": (None, "Nice, but the queue at the front desk was long.", "Good, a bit crowded."),
    "detractor": ("My size was gone by noon.", None, "Too loud inside."),
}


async def _seed_history(
    session: AsyncSession, signer: Signer, owner: Principal, now: datetime
) -> int:
    """Last month's pop-up, so the insights, the war room's history and the partner report
    have a finished event to show: the event and its partner are real rows, its funnel is
    a simulated log (a fixed seed, so every demo shows the same figures)."""
    rng = random.Random(1918)
    day = (now - timedelta(days=30)).replace(hour=10, minute=0, second=0, microsecond=0)
    event = await events.create_event(
        session,
        owner,
        EventCreate(
            slug=PAST_EVENT_SLUG,
            title="Autumn Pop-up (last month)",
            description="Last month's pop-up: its figures fill the insights and the reports.",
            venue_name="Old Tram Depot",
            timezone="Europe/Berlin",
            starts_at=day,
            ends_at=day + timedelta(hours=8),
            opens_at=day - timedelta(days=7),
        ),
        now=now,
    )
    await events.set_status(session, owner, event.id, "published")
    cafe = await events.add_partner(
        session,
        owner,
        event.id,
        PartnerCreate(name="Corner café", contact_email="cafe@partner.popdrop.test"),
    )
    lanes = [
        await events.add_lane(session, owner, event.id, LaneCreate(name=name, pickup_point=where))
        for name, where in (("Front desk", "Main entrance"), ("Back door", "Courtyard gate"))
    ]
    entries: list[funnel_log.Entry] = []
    answers: list[dict[str, Any]] = []

    def add(kind: Kind, at: datetime, person: str, **fields: Any) -> None:
        value = fields.pop("value", 0)
        currency = fields.pop("currency", "")
        entries.append(
            funnel_log.Entry(
                owner.org_id,
                kind,
                at,
                funnel_log.Tags(event_id=event.id, **fields),
                person=person,
                value=value,
                currency=currency,
            )
        )

    send = day - timedelta(days=2, hours=-8)  # the announcement went out two days before
    for n in range(600):
        person = f"k:demo-{n}"
        channel = "email" if n % 3 else "sms"
        variant = "A" if n % 2 else "B"
        segment = rng.choice(("hot", "hot", "warm", "warm", "warm", "cold"))
        tags: dict[str, Any] = {"channel": channel, "variant": variant, "segment": segment}
        at = send + timedelta(seconds=n * 6)
        add(Kind.MESSAGE_SENT, at, person, **tags)
        if rng.random() < 0.03:
            add(Kind.MESSAGE_BOUNCED, at + timedelta(seconds=20), person, label="hard", **tags)
            continue
        add(Kind.MESSAGE_DELIVERED, at + timedelta(seconds=5), person, **tags)
        click_rate = {"hot": 0.45, "warm": 0.25, "cold": 0.08}[segment] * (
            1.25 if variant == "B" else 1
        )
        if rng.random() > click_rate:
            continue
        clicked = at + timedelta(minutes=rng.uniform(1, 90))
        add(Kind.MESSAGE_CLICKED, clicked, person, **tags)
        chatted = rng.random() < 0.5
        if chatted:
            add(Kind.CHAT_STARTED, clicked + timedelta(minutes=1), person, channel="web")
        if rng.random() > 0.55:
            continue
        lane = rng.choice(lanes).id
        add(
            Kind.RSVP,
            clicked + timedelta(minutes=3),
            person,
            channel="chat" if chatted else channel,
            segment=segment,
            variant=variant,
            lane_id=lane,
        )
        if rng.random() > 0.7:
            continue
        visit = day + timedelta(minutes=rng.uniform(0, 470))
        add(Kind.VISIT, visit, person, lane_id=lane, segment=segment)
        if rng.random() < 0.3:
            add(
                Kind.SAMPLE_GIVEN,
                visit + timedelta(minutes=2),
                person,
                partner_id=cafe.id,
                value=150,
                currency="EUR",
            )
        if rng.random() < 0.6:
            amount = rng.choice((1_500, 1_500, 2_900, 12_900, 400, 800))
            add(
                Kind.ORDER_PAID,
                visit + timedelta(minutes=rng.uniform(3, 40)),
                person,
                channel=channel,
                lane_id=lane,
                segment=segment,
                variant=variant,
                value=amount,
                currency="EUR",
            )
        if rng.random() < 0.25:
            add(
                Kind.POS_SALE,
                visit + timedelta(minutes=rng.uniform(5, 60)),
                person,
                partner_id=cafe.id,
                label="square",
                value=rng.choice((350, 400, 750)),
                currency="EUR",
            )
        if rng.random() < 0.5:
            score = rng.choice((10, 10, 9, 9, 9, 8, 8, 7, 6, 4))
            answered = day + timedelta(days=1, hours=rng.uniform(0, 6))
            add(
                Kind.SURVEY_ANSWERED,
                answered,
                person,
                channel=channel,
                label=nps_class(score),
                value=score,
            )
            answers.append(
                {
                    "org_id": owner.org_id,
                    "event_id": event.id,
                    "person": person,
                    "channel": channel,
                    "status": "answered",
                    "created_at": day + timedelta(hours=9),
                    "due_at": day + timedelta(days=1, hours=-1),
                    "sent_at": day + timedelta(days=1, hours=-1),
                    "answered_at": answered,
                    "score": score,
                    "comment": rng.choice(DEMO_COMMENTS[nps_class(score)]),
                }
            )
    await funnel_log.record_many(session, entries)
    await session.execute(insert(table_of(SurveyInvitation)), answers)
    return event.id


async def _insights_summary(
    session: AsyncSession, signer: Signer, owner: Principal, base_url: str, now: datetime
) -> tuple[str, str]:
    """The insights and war-room links, and a 30-day share link of the café's report for
    last month's pop-up (the partner opens it without a login)."""
    base = links.root(base_url)
    past = await session.scalar(
        select(Event).where(Event.org_id == owner.org_id, Event.slug == PAST_EVENT_SLUG)
    )
    drop_id = await session.scalar(
        select(Drop.id).where(Drop.org_id == owner.org_id, Drop.name == DROP_NAME).limit(1)
    )
    if past is None:
        return "", ""
    cafe = await session.scalar(
        select(Partner.id).where(Partner.event_id == past.id).order_by(Partner.id).limit(1)
    )
    line = (
        f"{base}/insights/events/{past.id} (last month's pop-up; NPS: "
        f"{base}/insights/events/{past.id}/nps) · war room: {base}/war-room/drops/{drop_id}"
    )
    if cafe is None:
        return line, ""
    report = links.partner_report_url(
        signer,
        base_url,
        links.PartnerReportLink(owner.org_id, past.id, cafe, now + timedelta(days=30)),
    )
    return line, report
