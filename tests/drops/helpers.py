"""Drops for pipeline tests: contacts through the audience API, a recording transport."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from popdrop.accounts.service import ROLES, Principal
from popdrop.drops import service as drops
from popdrop.drops.pipeline import Sender
from popdrop.drops.schemas import DropCreate
from popdrop.outbound.transports import OutboundEmail, OutboundSms, SendResult
from popdrop.web.context import AppContext
from tests.conftest import Tenant


@dataclass
class Recorder:
    """A transport that keeps what it was given (an in-memory provider)."""

    sent: list[OutboundEmail | OutboundSms] = field(default_factory=list)

    async def send(self, message: OutboundEmail | OutboundSms) -> SendResult:
        self.sent.append(message)
        return SendResult(ok=True, provider_id=f"rec-{len(self.sent)}")

    async def close(self) -> None:
        return None

    def to(self) -> list[str]:
        return [m.to for m in self.sent]


def owner(tenant: Tenant) -> Principal:
    return Principal(tenant.org_id, "test:owner", "owner", ROLES["owner"])


def drop_spec(**overrides: Any) -> DropCreate:
    body: dict[str, Any] = {
        "name": "Saturday drop",
        "channels": ["email"],
        "from_email": "drops@popdrop.test",
        "from_name": "Tram Depot",
        "sms_from": "+15005550006",
        "variants": [
            {
                "name": "A",
                "content": {
                    "email": {
                        "default": {
                            "subject": "Hi {{ first_name }}, the drop is on",
                            "text": "Your code {{ voucher_code }} https://shop.example/drop",
                        }
                    },
                    "sms": {"default": {"body": "Drop on! Code {{ voucher_code }}"}},
                },
            }
        ],
        "voucher": {"discount_kind": "percent", "discount_value": 15},
        "quiet_start_hour": 0,
        "quiet_end_hour": 0,
    }
    body.update(overrides)
    return DropCreate.model_validate(body)


async def started_drop(ctx: AppContext, tenant: Tenant, spec: DropCreate) -> int:
    now = ctx.clock.now()
    async with ctx.db.transaction() as session:
        drop = await drops.create_drop(session, ctx.signer, owner(tenant), spec, now=now)
        await drops.override_seed(session, owner(tenant), drop.id, reason="test", now=now)
        await drops.start_drop(session, owner(tenant), drop.id, now=now)
        return drop.id


def sender(ctx: AppContext, email: Recorder, sms: Recorder | None = None, *, org: Tenant) -> Sender:
    """A sender for one tenant's drops: other tests' drops share the database."""
    return Sender(
        ctx.db,
        ctx.signer,
        ctx.clock,
        "https://pop.example",
        email=email,
        sms=sms,
        org_id=org.org_id,
    )
