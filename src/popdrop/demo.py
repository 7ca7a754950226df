"""The demo: one organization running a weekend pop-up. Re-running it keeps the data and
sets a fresh owner password (it is only ever stored hashed, so it cannot be re-printed)."""

from __future__ import annotations

import csv
import secrets
from datetime import timedelta
from typing import Any

from argon2 import PasswordHasher
from sqlalchemy import select, update

from popdrop.accounts import service as accounts
from popdrop.accounts.models import Organization, User
from popdrop.accounts.service import ROLES, Principal
from popdrop.core.clock import SystemClock
from popdrop.core.config import Settings
from popdrop.core.db import Database
from popdrop.core.signing import Signer
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
    return {
        "email": DEMO_EMAIL,
        "password": password,
        "token": plaintext,
        "codes_file": str(codes_file),
        "sample_code": sample,
        "sample_link": link,
    }
