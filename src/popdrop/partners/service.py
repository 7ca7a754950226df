"""POS connections, ingest of `pos.sale.v1` sales and refunds, and what a partner sees.

Ingest rules (one transaction per delivery; nothing half-written):
- A delivery is applied once per connection and provider event id (`pos_events` claims it
  first with an INSERT … ON CONFLICT DO NOTHING; a replay answers `duplicate`).
- A sale is upserted by its external id: a `payment.updated` before its
  `payment.created`, or an `orders/paid` after `orders/create`, records the sale once.
- A refund is recorded by its own external id; if its sale is not there yet it waits and
  is applied when the sale arrives. Applying adds to `refunded_minor`; the status follows
  `lifecycle.status_after_refund`, and attribution is told with `reverse_sale`.
- Every sale is handed to attribution (`attribute_sale`, kind `pos_sale`, with the codes
  seen at the till) in the same transaction.
- On PostgreSQL, deliveries about one sale (the sale, its refunds, their replays) queue on
  an advisory lock keyed by (connection, sale external id), so a refund racing its sale
  never misses it and concurrent duplicates make one sale.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.attribution.service import attribute_sale, reverse_sale
from popdrop.core import sealing
from popdrop.core.db import dialect_insert, table_of
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.logging import log
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned
from popdrop.events.models import Partner
from popdrop.events.service import partners_of
from popdrop.metrics import log as funnel
from popdrop.metrics.kinds import Kind
from popdrop.partners.adapters import Ignored, Parsed
from popdrop.partners.contract import PosSaleV1
from popdrop.partners.lifecycle import (
    POS_SALE_LIFECYCLE,
    PosProvider,
    PosSaleStatus,
    status_after_refund,
)
from popdrop.partners.models import PosConnection, PosEvent, PosRefund, PosSale, PosSaleLine
from popdrop.partners.signatures import new_standard_secret, standard_key

SECRETS_PURPOSE = "POS webhook secrets"
MAX_SECRETS = 2  # the new one and the one it replaces, while the till moves over
_events = table_of(PosEvent)
_sales = table_of(PosSale)
_lines = table_of(PosSaleLine)
_refunds = table_of(PosRefund)
_SALE_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


# ---------------------------------------------------------------- connections


def seal_secrets(values: Sequence[str]) -> bytes:
    return sealing.sealer(SECRETS_PURPOSE).seal(json.dumps(list(values)).encode())


def open_secrets(connection: PosConnection) -> list[str]:
    values: list[str] = json.loads(
        sealing.sealer(SECRETS_PURPOSE).open(bytes(connection.secrets_sealed))
    )
    return values


@dataclass(frozen=True)
class NewConnection:
    connection: PosConnection
    secret: str | None  # generated here (Standard Webhooks): shown this once


def _check_secret(provider: str, secret: str | None) -> str | None:
    if provider == PosProvider.STANDARD:
        if secret is None:
            return None
        try:
            standard_key(secret)
        except ValueError as exc:
            raise PopdropError("invalid_request", str(exc)) from None
        return secret
    if not secret:
        raise PopdropError(
            "invalid_request", f"a {provider} connection needs the secret the provider shows"
        )
    return secret


async def create_connection(
    session: AsyncSession,
    principal: Principal,
    *,
    partner_id: int,
    provider: PosProvider,
    account_id: str | None,
    location_id: str | None,
    notification_url: str | None,
    secret: str | None,
    base_url: str,
    now: datetime,
) -> NewConnection:
    principal.require("pos:write")
    partner = await owned(session, Partner, partner_id, principal.org_id, what="partner")
    given = _check_secret(provider, secret)
    value = given or new_standard_secret()
    connection = PosConnection(
        org_id=principal.org_id,
        partner_id=partner.id,
        event_id=partner.event_id,
        provider=provider,
        account_id=account_id,
        location_id=location_id,
        secrets_sealed=seal_secrets([value]),
        notification_url=notification_url,
        created_at=now,
    )
    session.add(connection)
    await session.flush()
    if provider == PosProvider.SQUARE and not notification_url:
        connection.notification_url = delivery_url(base_url, connection)
    return NewConnection(connection, None if given else value)


def delivery_url(base_url: str, connection: PosConnection) -> str:
    """Where the till posts: `/pos/square/{id}`, `/pos/shopify/{id}`, `/pos/webhooks/{id}`."""
    path = "webhooks" if connection.provider == PosProvider.STANDARD else connection.provider
    return f"{base_url.rstrip('/')}/pos/{path}/{connection.id}"


async def rotate_secret(
    session: AsyncSession, principal: Principal, connection_id: int, *, secret: str | None
) -> tuple[PosConnection, str | None]:
    """Put a new secret first; the previous one keeps verifying until the next rotation.
    Returns the generated secret (Standard Webhooks, none given) to show once."""
    principal.require("pos:write")
    connection = await owned(
        session, PosConnection, connection_id, principal.org_id, what="connection", lock=True
    )
    given = _check_secret(connection.provider, secret)
    value = given or new_standard_secret()
    kept = [value, *open_secrets(connection)][:MAX_SECRETS]
    connection.secrets_sealed = seal_secrets(kept)
    return connection, None if given else value


async def disable_connection(
    session: AsyncSession, principal: Principal, connection_id: int, *, now: datetime
) -> PosConnection:
    principal.require("pos:write")
    connection = await owned(
        session, PosConnection, connection_id, principal.org_id, what="connection", lock=True
    )
    if connection.disabled_at is None:
        connection.disabled_at = now
    return connection


async def list_connections(session: AsyncSession, principal: Principal) -> list[PosConnection]:
    principal.require("pos:read")
    query = select(PosConnection).where(PosConnection.org_id == principal.org_id)
    if principal.role == "partner":
        query = query.where(PosConnection.partner_id.in_(partners_of(principal)))
    return list((await session.scalars(query.order_by(PosConnection.id))).all())


async def connection_of(
    session: AsyncSession, principal: Principal, connection_id: int, *, scope: str = "pos:read"
) -> PosConnection:
    """A connection the caller may use for `scope` (a partner: only its own)."""
    principal.require(scope)
    where = (
        (PosConnection.partner_id.in_(partners_of(principal)),)
        if principal.role == "partner"
        else ()
    )
    return await owned(
        session, PosConnection, connection_id, principal.org_id, what="connection", where=where
    )


async def connection_for_delivery(
    session: AsyncSession, connection_id: int, provider: PosProvider
) -> tuple[PosConnection, list[str]]:
    """The enabled connection a public delivery names, and its secrets (not found
    otherwise: a disabled connection answers like an unknown one)."""
    connection = await session.get(PosConnection, connection_id)
    if connection is None or connection.provider != provider or connection.disabled_at:
        raise not_found("connection")
    try:
        return connection, open_secrets(connection)
    except sealing.SealError:
        # The server's secret key changed without POPDROP_PREVIOUS_SECRET_KEYS: nothing the
        # till can fix, so a 503 it retries later, and a log line for the host.
        log.error("pos: a till's webhook secret cannot be opened", connection=connection.id)
        raise PopdropError(
            "secret_unreadable",
            "this till's webhook secret cannot be read by the server now; retry later",
            status=503,
        ) from None


# ---------------------------------------------------------------- ingest


def customer_hash(signer: Signer, org_id: int, customer_ref: str) -> str:
    """The keyed hash a till's customer id is kept as (per organization)."""
    return signer.mac("pos customer", f"{org_id}:{customer_ref}").hex()


@dataclass(frozen=True)
class Ingested:
    outcome: str  # sale_recorded, refund_applied, refund_waiting, duplicate, ignored:<why>…
    sale_id: int | None = None


def _lock_key(connection_id: int, sale_ref: str) -> int:
    digest = hashlib.blake2b(f"pos-sale:{connection_id}:{sale_ref}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def _outside_connection(connection: PosConnection, sale: PosSaleV1) -> bool:
    """A delivery about another location or account than the connection's (a Square
    signature key covers every location of the app)."""
    if connection.location_id and sale.source.location not in (None, connection.location_id):
        return True
    return bool(connection.account_id and sale.source.account not in (None, connection.account_id))


async def ingest(
    session: AsyncSession,
    signer: Signer,
    connection: PosConnection,
    parsed: Parsed,
    *,
    topic: str,
    now: datetime,
) -> Ingested:
    """Apply one verified delivery (see the module's rules)."""
    conn = await session.connection()
    if conn.dialect.name == "postgresql":
        ref = (
            parsed.event_id
            if isinstance(parsed, Ignored)
            else (parsed.refunds or parsed.external_id)
        )
        await session.execute(_SALE_LOCK, {"key": _lock_key(connection.id, ref)})
    claimed = await session.scalar(
        dialect_insert(conn.dialect.name, _events)
        .values(
            org_id=connection.org_id,
            connection_id=connection.id,
            provider_event_id=parsed.event_id,
            topic=topic[:64],
            outcome="applying",
            received_at=now,
        )
        .on_conflict_do_nothing(index_elements=["connection_id", "provider_event_id"])
        .returning(_events.c.id)
    )
    if claimed is None:
        return Ingested("duplicate")
    if isinstance(parsed, Ignored):
        result = Ingested(f"ignored:{parsed.reason}")
    elif _outside_connection(connection, parsed):
        result = Ingested("ignored:other_location")
    elif parsed.kind == "sale":
        result = await _record_sale(session, signer, connection, parsed, now=now)
    else:
        result = await _record_refund(session, connection, parsed, now=now)
    await session.execute(
        update(_events).where(_events.c.id == claimed).values(outcome=result.outcome[:32])
    )
    return result


async def _record_sale(
    session: AsyncSession,
    signer: Signer,
    connection: PosConnection,
    sale: PosSaleV1,
    *,
    now: datetime,
) -> Ingested:
    conn = await session.connection()
    sale_id = await session.scalar(
        dialect_insert(conn.dialect.name, _sales)
        .values(
            org_id=connection.org_id,
            connection_id=connection.id,
            partner_id=connection.partner_id,
            event_id=connection.event_id,
            provider=sale.source.provider,
            external_id=sale.external_id,
            account=sale.source.account,
            location=sale.source.location,
            device=sale.source.device,
            occurred_at=sale.occurred_at,
            received_at=now,
            currency=sale.currency,
            subtotal_minor=sale.totals.subtotal_minor,
            discount_minor=sale.totals.discount_minor,
            tax_minor=sale.totals.tax_minor,
            total_minor=sale.totals.total_minor,
            refunded_minor=0,
            payment_methods=",".join(sorted({m.value for m in sale.payment_methods})),
            code_count=len(sale.codes),
            customer_hash=(
                customer_hash(signer, connection.org_id, sale.customer_ref)
                if sale.customer_ref
                else None
            ),
            status=PosSaleStatus.ACTIVE,
        )
        .on_conflict_do_nothing(index_elements=["connection_id", "external_id"])
        .returning(_sales.c.id)
    )
    if sale_id is None:  # an update after the create (or a create after the update)
        existing = await session.scalar(
            select(_sales.c.id).where(
                _sales.c.connection_id == connection.id, _sales.c.external_id == sale.external_id
            )
        )
        return Ingested("sale_already_recorded", existing)
    if sale.lines:
        await session.execute(
            _lines.insert(),
            [
                {
                    "sale_id": sale_id,
                    "sku": line.sku,
                    "quantity": line.quantity,
                    "unit_price_minor": line.unit_price_minor,
                    "discount_minor": line.discount_minor,
                }
                for line in sale.lines
            ],
        )
    await attribute_sale(
        session,
        org_id=connection.org_id,
        sale_kind="pos_sale",
        sale_id=sale_id,
        event_id=connection.event_id,
        amount_minor=sale.totals.total_minor,
        currency=sale.currency,
        occurred_at=sale.occurred_at,
        codes=sale.codes,
        signer=signer,
    )
    waiting = (
        await session.scalars(
            select(PosRefund)
            .where(
                PosRefund.connection_id == connection.id,
                PosRefund.refunds_external_id == sale.external_id,
                PosRefund.sale_id.is_(None),
            )
            .order_by(PosRefund.id)
        )
    ).all()
    await funnel.record(
        session,
        connection.org_id,
        Kind.POS_SALE,
        at=sale.occurred_at,
        tags=_tags(connection, sale.source.provider),
        person=(
            funnel.keyed_person(signer, f"pos-customer:{connection.org_id}:{sale.customer_ref}")
            if sale.customer_ref
            else None
        ),
        subject=f"pos_sale:{sale_id}",
        value=sale.totals.total_minor,
        currency=sale.currency,
    )
    for refund in waiting:
        await _apply_refund(session, connection, refund, sale_id, now=now)
    return Ingested("sale_recorded" + ("+refunds" if waiting else ""), sale_id)


def _tags(connection: PosConnection, provider: str) -> funnel.Tags:
    """A till's sale in the funnel (at the time the till says it happened): its partner and
    event; the label names the till's provider."""
    return funnel.Tags(
        event_id=connection.event_id,
        partner_id=connection.partner_id,
        label=provider[:24],
    )


async def _record_refund(
    session: AsyncSession, connection: PosConnection, refund: PosSaleV1, *, now: datetime
) -> Ingested:
    assert refund.refunds is not None  # the contract requires it for a refund
    conn = await session.connection()
    refund_id = await session.scalar(
        dialect_insert(conn.dialect.name, _refunds)
        .values(
            org_id=connection.org_id,
            connection_id=connection.id,
            external_id=refund.external_id,
            refunds_external_id=refund.refunds,
            amount_minor=refund.totals.total_minor,
            currency=refund.currency,
            occurred_at=refund.occurred_at,
            received_at=now,
        )
        .on_conflict_do_nothing(index_elements=["connection_id", "external_id"])
        .returning(_refunds.c.id)
    )
    if refund_id is None:  # refund.updated after refund.created: recorded already
        return Ingested("refund_already_recorded")
    sale_id = await session.scalar(
        select(_sales.c.id).where(
            _sales.c.connection_id == connection.id, _sales.c.external_id == refund.refunds
        )
    )
    if sale_id is None:
        return Ingested("refund_waiting")
    row = await session.get(PosRefund, refund_id)
    assert row is not None
    return await _apply_refund(session, connection, row, sale_id, now=now)


async def _apply_refund(
    session: AsyncSession,
    connection: PosConnection,
    refund: PosRefund,
    sale_id: int,
    *,
    now: datetime,
) -> Ingested:
    sale = await session.scalar(select(PosSale).where(PosSale.id == sale_id).with_for_update())
    assert sale is not None
    refund.sale_id = sale_id
    refund.applied_at = now
    if refund.currency != sale.currency:
        return Ingested("refund_currency_mismatch", sale_id)
    current = PosSaleStatus(sale.status)
    taken = min(refund.amount_minor, max(sale.total_minor - sale.refunded_minor, 0))
    if taken == 0:
        return Ingested("refund_nothing_left", sale_id)
    refunded = sale.refunded_minor + taken
    target = status_after_refund(sale.total_minor, refunded)
    if target != current:
        POS_SALE_LIFECYCLE.check(current, target, action="refund")
    sale.refunded_minor = refunded
    sale.status = target
    await funnel.record(
        session,
        connection.org_id,
        Kind.POS_REFUND,
        at=refund.occurred_at,
        tags=_tags(connection, sale.provider),
        subject=f"pos_sale:{sale_id}",
        value=taken,
        currency=sale.currency,
    )
    await reverse_sale(
        session,
        org_id=connection.org_id,
        sale_kind="pos_sale",
        sale_id=sale_id,
        amount_minor=taken,
    )
    await session.flush()
    return Ingested("refund_applied", sale_id)


# ---------------------------------------------------------------- reads


async def list_sales(
    session: AsyncSession,
    principal: Principal,
    *,
    event_id: int | None = None,
    connection_id: int | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[PosSale]:
    """Newest first; a partner sees only the sales of its own partner rows."""
    principal.require("pos:read")
    query = select(PosSale).where(PosSale.org_id == principal.org_id)
    if principal.role == "partner":
        query = query.where(PosSale.partner_id.in_(partners_of(principal)))
    if event_id is not None:
        query = query.where(PosSale.event_id == event_id)
    if connection_id is not None:
        query = query.where(PosSale.connection_id == connection_id)
    if before_id is not None:
        query = query.where(PosSale.id < before_id)
    return list((await session.scalars(query.order_by(PosSale.id.desc()).limit(limit))).all())


async def lines_of(session: AsyncSession, sale_ids: Sequence[int]) -> dict[int, list[PosSaleLine]]:
    if not sale_ids:
        return {}
    rows = await session.scalars(
        select(PosSaleLine).where(PosSaleLine.sale_id.in_(sale_ids)).order_by(PosSaleLine.id)
    )
    grouped: dict[int, list[PosSaleLine]] = {}
    for line in rows:
        grouped.setdefault(line.sale_id, []).append(line)
    return grouped


def till_order_ref(connection: PosConnection, order_ref: str | None) -> str:
    """The redemption's order reference: which till redeemed, and its own reference."""
    prefix = f"pos:{connection.id}"
    return (f"{prefix}:{order_ref}" if order_ref else prefix)[:200]


def describe(connection: PosConnection, base_url: str) -> dict[str, Any]:
    return {
        "id": connection.id,
        "partner_id": connection.partner_id,
        "event_id": connection.event_id,
        "provider": connection.provider,
        "account_id": connection.account_id,
        "location_id": connection.location_id,
        "delivery_url": delivery_url(base_url, connection),
        "notification_url": connection.notification_url,
        "secrets": len(open_secrets(connection)),
        "created_at": connection.created_at,
        "disabled_at": connection.disabled_at,
    }
