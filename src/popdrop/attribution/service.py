"""Attribution: short links, promo codes, and which code or click brought each sale.

Rules this module keeps:
- A short link stores no secret. A `url` target keeps the plain public URL; a bearer
  target (`ticket`, `checkout`) keeps its kind and the row id, and `redirects` rebuilds
  the signed link at redirect time. Every tag id (event, partner, segment, promo code,
  target row) is checked to be this organization's; a foreign id is `not_found`.
- Slugs are random (`secrets`), URL-safe, 11 characters (64 bits): a slug of a ticket's
  link is a bearer credential too, so it is as hard to guess as a voucher code, and
  guessing is rate-limited at the redirect.
- Promo codes come from the vault (`vouchers.service.issue_batch`): one multi-use code
  per promo code. The vault keeps its keyed hash; the promo code row keeps the printed
  code because a promo code is public (posters, partner tills).
- Attribution (`attribute_sale`) is idempotent per (sale kind, sale id): the ledger has
  one `first` and one `last` row per sale (unique), written with ON CONFLICT DO NOTHING,
  and a sale already attributed is answered from the ledger.
  Touches: each click id of this organization clicked within `CLICK_WINDOW` before the
  sale, and each promo code of this organization named at the sale (its own code, or any
  code of a vault batch a promo code tags — the latter needs the signer). A click
  touches at its click time, a code at the sale's time; first touch = the earliest, last
  touch = the latest (a code at the till is the last touch: on a tie a code wins over a
  click). A sale can be attributed by a code alone. Unknown codes and clicks are ignored.
- `reverse_sale` adds a refund to `reversed_minor` of the sale's touches, never past the
  sale's amount; the caller makes it idempotent (it knows its refund ids).
- Partners (role `partner`) read only links, codes and touches whose `partner_id` is one
  of `events.service.partners_of(principal)`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Select, case, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.service import Principal
from popdrop.attribution.models import (
    BEARER_KINDS,
    Channel,
    PromoCode,
    SaleTouch,
    ShortLink,
    ShortLinkClick,
    TargetKind,
    Touch,
    Via,
)
from popdrop.attribution.schemas import (
    Bucket,
    LinkAnalytics,
    LinkTags,
    LinkTarget,
    PromoCodeCreate,
    PromoCodeOut,
    SaleTouchOut,
    ShortLinkCreate,
    ShortLinkOut,
)
from popdrop.audience.models import Segment
from popdrop.checkin.models import Ticket
from popdrop.core import links
from popdrop.core.db import dialect_insert, table_of
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.signing import Signer
from popdrop.core.tenancy import owned
from popdrop.events.models import Event, Partner
from popdrop.events.service import partners_of
from popdrop.inventory.models import Hold
from popdrop.vouchers import codes as voucher_codes
from popdrop.vouchers import service as vault
from popdrop.vouchers.models import Voucher, VoucherBatch
from popdrop.vouchers.schemas import BatchCreate

SaleKind = Literal["order", "pos_sale"]
SLUG_BYTES = 8  # 64 bits → 11 URL-safe characters
CLICK_WINDOW = timedelta(days=30)  # a click older than this before the sale does not count
MAX_TOUCH_INPUTS = 50  # codes or click ids looked at per sale
WRITE_SCOPE = "drops:write"
READ_SCOPE = "drops:read"
SALES_SCOPE = "orders:read"
PROMO_BATCH_TAG = "promo"
_touches = table_of(SaleTouch)


def new_slug() -> str:
    return secrets.token_urlsafe(SLUG_BYTES)


def short_url(base_url: str, slug: str) -> str:
    return links.absolute(base_url, f"/s/{slug}")


def _is_partner(principal: Principal) -> bool:
    return principal.role == "partner"


def _can_read(principal: Principal, scope: str = READ_SCOPE) -> None:
    if not _is_partner(principal):
        principal.require(scope)


# ---------------------------------------------------------------- tags and targets


@dataclass
class _Tags:
    event_id: int | None
    partner_id: int | None


async def _check_tags(
    session: AsyncSession,
    org_id: int,
    *,
    event_id: int | None,
    partner_id: int | None,
    segment_id: int | None,
    promo_code_id: int | None = None,
) -> _Tags:
    """Every tag id is this organization's; a partner fills in its event."""
    if event_id is not None:
        await owned(session, Event, event_id, org_id)
    if partner_id is not None:
        partner = await owned(session, Partner, partner_id, org_id)
        if event_id is None:
            event_id = partner.event_id
        elif partner.event_id != event_id:
            raise PopdropError("invalid_request", "partner_id: this partner is of another event")
    if segment_id is not None:
        await owned(session, Segment, segment_id, org_id)
    if promo_code_id is not None:
        await owned(session, PromoCode, promo_code_id, org_id, what="promo code")
    return _Tags(event_id, partner_id)


async def _check_target(session: AsyncSession, org_id: int, target: LinkTarget) -> None:
    if target.kind == TargetKind.URL:
        return
    assert target.id is not None
    model: Any = {TargetKind.EVENT: Event, TargetKind.TICKET: Ticket, TargetKind.CHECKOUT: Hold}
    await owned(session, model[target.kind], target.id, org_id, what=str(target.kind))


def link_out(link: ShortLink, base_url: str) -> ShortLinkOut:
    return ShortLinkOut(
        id=link.id,
        slug=link.slug,
        short_url=short_url(base_url, link.slug),
        target_kind=TargetKind(link.target_kind),
        target_url=link.target_url,
        target_id=link.target_id,
        valid_from=link.valid_from,
        valid_until=link.valid_until,
        max_clicks=link.max_clicks,
        fallback_url=link.fallback_url,
        clicks=link.clicks,
        bot_hits=link.bot_hits,
        event_id=link.event_id,
        partner_id=link.partner_id,
        drop_id=link.drop_id,
        variant=link.variant,
        segment_id=link.segment_id,
        channel=Channel(link.channel) if link.channel else None,
        conversation_id=link.conversation_id,
        promo_code_id=link.promo_code_id,
        utm_source=link.utm_source,
        utm_medium=link.utm_medium,
        utm_campaign=link.utm_campaign,
        utm_content=link.utm_content,
        created_at=link.created_at,
    )


async def _new_link(
    session: AsyncSession,
    org_id: int,
    spec: ShortLinkCreate,
    *,
    actor: str,
    now: datetime,
    reuse_key: str | None = None,
) -> ShortLink:
    if spec.valid_until is not None and spec.valid_until <= now:
        raise PopdropError("invalid_request", "valid_until is already in the past")
    tags = spec.tags
    await _check_target(session, org_id, spec.target)
    checked = await _check_tags(
        session,
        org_id,
        event_id=tags.event_id,
        partner_id=tags.partner_id,
        segment_id=tags.segment_id,
        promo_code_id=tags.promo_code_id,
    )
    event_id = checked.event_id
    if event_id is None and spec.target.kind == TargetKind.EVENT:
        event_id = spec.target.id
    link = ShortLink(
        org_id=org_id,
        slug=new_slug(),
        target_kind=spec.target.kind,
        # Bearer targets: only the row id, never a URL (it would carry the secret).
        target_url=spec.target.url if spec.target.kind == TargetKind.URL else None,
        target_id=spec.target.id if spec.target.kind != TargetKind.URL else None,
        utm_source=tags.utm_source,
        utm_medium=tags.utm_medium,
        utm_campaign=tags.utm_campaign,
        utm_content=tags.utm_content,
        valid_from=spec.valid_from,
        valid_until=spec.valid_until,
        max_clicks=spec.max_clicks,
        fallback_url=spec.fallback_url,
        clicks=0,
        bot_hits=0,
        event_id=event_id,
        partner_id=checked.partner_id,
        drop_id=tags.drop_id,
        variant=tags.variant,
        segment_id=tags.segment_id,
        channel=tags.channel,
        conversation_id=tags.conversation_id,
        promo_code_id=tags.promo_code_id,
        reuse_key=reuse_key,
        created_at=now,
        created_by=actor,
    )
    session.add(link)
    await session.flush()
    return link


async def create_short_link(
    session: AsyncSession, principal: Principal, spec: ShortLinkCreate, *, now: datetime
) -> ShortLink:
    """A new short link of the principal's organization (each call makes its own)."""
    principal.require(WRITE_SCOPE)
    return await _new_link(session, principal.org_id, spec, actor=principal.actor, now=now)


def _reuse_key(target: LinkTarget, tags: LinkTags) -> str:
    canonical = json.dumps(
        {"target": target.model_dump(mode="json"), "tags": tags.model_dump(mode="json")},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


async def short_link_for(
    session: AsyncSession,
    *,
    org_id: int,
    target: LinkTarget,
    tags: LinkTags,
    now: datetime,
) -> ShortLink:
    """The short link of `target` with `tags`, made once: the link made before for the
    same target and tags is reused, so sending again makes no duplicate, and a concurrent
    twin (the unique reuse key) is read back instead of failing."""
    key = _reuse_key(target, tags)
    query = select(ShortLink).where(ShortLink.org_id == org_id, ShortLink.reuse_key == key)
    link = await session.scalar(query)
    if link is not None:
        return link
    spec = ShortLinkCreate(target=target, tags=tags)
    try:
        async with session.begin_nested():
            return await _new_link(
                session, org_id, spec, actor="system:short-links", now=now, reuse_key=key
            )
    except IntegrityError:
        link = await session.scalar(query)
        if link is None:
            raise
        return link


async def short_url_for(
    session: AsyncSession,
    *,
    org_id: int,
    target: LinkTarget,
    tags: LinkTags,
    now: datetime,
    base_url: str,
) -> str:
    """The absolute short URL (`{base_url}/s/{slug}`) of `short_link_for`, for a message
    (drops, chat SMS). `base_url` is the public base URL or a short host that serves
    `/s/`."""
    link = await short_link_for(session, org_id=org_id, target=target, tags=tags, now=now)
    return short_url(base_url, link.slug)


def _visible_links(principal: Principal) -> Select[Any]:
    query = select(ShortLink).where(ShortLink.org_id == principal.org_id)
    if _is_partner(principal):
        query = query.where(ShortLink.partner_id.in_(partners_of(principal)))
    return query


async def list_links(
    session: AsyncSession,
    principal: Principal,
    *,
    event_id: int | None = None,
    drop_id: int | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[ShortLink]:
    """Newest first; a partner sees its own links only."""
    _can_read(principal)
    query = _visible_links(principal)
    if event_id is not None:
        query = query.where(ShortLink.event_id == event_id)
    if drop_id is not None:
        query = query.where(ShortLink.drop_id == drop_id)
    if before_id is not None:
        query = query.where(ShortLink.id < before_id)
    return list(await session.scalars(query.order_by(ShortLink.id.desc()).limit(limit)))


async def get_link(session: AsyncSession, principal: Principal, link_id: int) -> ShortLink:
    _can_read(principal)
    link: ShortLink | None = await session.scalar(
        _visible_links(principal).where(ShortLink.id == link_id)
    )
    if link is None:
        raise not_found("short link")
    return link


def _day_and_hour(dialect: str) -> tuple[Any, Any]:
    at = ShortLinkClick.at
    if dialect == "postgresql":
        utc = func.timezone("UTC", at)
        return func.to_char(utc, "YYYY-MM-DD"), func.to_char(utc, 'YYYY-MM-DD"T"HH24')
    return func.strftime("%Y-%m-%d", at), func.strftime("%Y-%m-%dT%H", at)


async def link_analytics(session: AsyncSession, link: ShortLink) -> LinkAnalytics:
    """Counted clicks of a link by day, hour (UTC), channel, device class, referrer host."""
    day, hour = _day_and_hour(session.get_bind().dialect.name)

    async def buckets(column: Any, *, by_key: bool = False, limit: int = 1000) -> list[Bucket]:
        count = func.count()
        query = (
            select(column, count)
            .where(ShortLinkClick.link_id == link.id)
            .group_by(column)
            .order_by(column if by_key else count.desc())
            .limit(limit)
        )
        rows = (await session.execute(query)).tuples()
        return [Bucket(key=str(key) if key is not None else "", clicks=n) for key, n in rows]

    return LinkAnalytics(
        link_id=link.id,
        clicks=link.clicks,
        bot_hits=link.bot_hits,
        by_day=await buckets(day, by_key=True),
        by_hour=await buckets(hour, by_key=True, limit=24 * 90),
        by_channel=await buckets(ShortLinkClick.channel),
        by_device_class=await buckets(ShortLinkClick.device_class),
        by_referrer_host=await buckets(ShortLinkClick.referrer_host, limit=50),
    )


# ---------------------------------------------------------------- promo codes


def promo_out(promo: PromoCode) -> PromoCodeOut:
    return PromoCodeOut(
        id=promo.id,
        label=promo.label,
        code=promo.code,
        batch_id=promo.batch_id,
        voucher_id=promo.voucher_id,
        event_id=promo.event_id,
        partner_id=promo.partner_id,
        channel=Channel(promo.channel) if promo.channel else None,
        drop_id=promo.drop_id,
        variant=promo.variant,
        segment_id=promo.segment_id,
        created_at=promo.created_at,
    )


async def create_promo_code(
    session: AsyncSession,
    principal: Principal,
    spec: PromoCodeCreate,
    *,
    now: datetime,
    signer: Signer | None = None,
) -> PromoCode:
    """An attributable promo code: a multi-use code issued from the vault (`signer`
    needed: the vault stores codes as keyed hashes), or, with `spec.batch_id`, a tag on an
    existing vault batch (no signer needed)."""
    principal.require(WRITE_SCOPE)
    checked = await _check_tags(
        session,
        principal.org_id,
        event_id=spec.event_id,
        partner_id=spec.partner_id,
        segment_id=spec.segment_id,
    )
    code: str | None = None
    code_key: str | None = None
    voucher_id: int | None = None
    if spec.batch_id is not None:
        batch = await owned(session, VoucherBatch, spec.batch_id, principal.org_id, what="batch")
        batch_id = batch.id
    else:
        if signer is None:
            raise ValueError("issuing a promo code needs the signer (the vault hashes codes)")
        batch_spec = BatchCreate(
            name=f"promo: {spec.label}"[:200],
            quantity=1,
            max_uses=spec.max_uses,
            prefix=spec.prefix,
            tag=PROMO_BATCH_TAG,
            valid_from=spec.valid_from,
            valid_until=spec.valid_until,
            currency=spec.currency,
            discount_kind=spec.discount_kind,
            discount_value=spec.discount_value,
            event_ref=str(checked.event_id) if checked.event_id is not None else None,
        )
        issued_batch, plaintext = await vault.issue_batch(
            session, signer, principal, batch_spec, now=now
        )
        batch_id = issued_batch.id
        code = plaintext[0]
        code_key = voucher_codes.normalize(code)
        voucher_id = await session.scalar(select(Voucher.id).where(Voucher.batch_id == batch_id))
    promo = PromoCode(
        org_id=principal.org_id,
        label=spec.label,
        code=code,
        code_key=code_key,
        batch_id=batch_id,
        voucher_id=voucher_id,
        event_id=checked.event_id,
        partner_id=checked.partner_id,
        channel=spec.channel,
        drop_id=spec.drop_id,
        variant=spec.variant,
        segment_id=spec.segment_id,
        created_at=now,
        created_by=principal.actor,
    )
    session.add(promo)
    await session.flush()
    return promo


async def list_promo_codes(
    session: AsyncSession,
    principal: Principal,
    *,
    event_id: int | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[PromoCode]:
    """Newest first; a partner sees its own codes only."""
    _can_read(principal)
    query = select(PromoCode).where(PromoCode.org_id == principal.org_id)
    if _is_partner(principal):
        query = query.where(PromoCode.partner_id.in_(partners_of(principal)))
    if event_id is not None:
        query = query.where(PromoCode.event_id == event_id)
    if before_id is not None:
        query = query.where(PromoCode.id < before_id)
    return list(await session.scalars(query.order_by(PromoCode.id.desc()).limit(limit)))


# ---------------------------------------------------------------- attribution


@dataclass(frozen=True)
class _Candidate:
    at: datetime
    rank: int  # on a tie, a code (1) is later than a click (0)
    order: int
    via: Via
    values: dict[str, Any]


def _normalized(raw: str) -> str | None:
    try:
        return voucher_codes.normalize(raw)
    except PopdropError:
        return None


async def _promos_named(
    session: AsyncSession, org_id: int, codes: Sequence[str], signer: Signer | None
) -> list[PromoCode]:
    keys = sorted({k for k in (_normalized(c) for c in codes[:MAX_TOUCH_INPUTS]) if k})
    if not keys:
        return []
    found = {
        p.id: p
        for p in await session.scalars(
            select(PromoCode).where(PromoCode.org_id == org_id, PromoCode.code_key.in_(keys))
        )
    }
    if signer is not None:  # any code of a batch a promo code tags
        hashes = [signer.keyed_hash(k) for k in keys]
        batches = select(Voucher.batch_id).where(
            Voucher.org_id == org_id, Voucher.code_hash.in_(hashes)
        )
        for promo in await session.scalars(
            select(PromoCode).where(PromoCode.org_id == org_id, PromoCode.batch_id.in_(batches))
        ):
            found.setdefault(promo.id, promo)
    return [found[i] for i in sorted(found)]


async def attribute_sale(
    session: AsyncSession,
    *,
    org_id: int,
    sale_kind: SaleKind,
    sale_id: int,
    event_id: int | None,
    amount_minor: int,
    currency: str,
    occurred_at: datetime,
    codes: Sequence[str] = (),
    click_ids: Sequence[str] = (),
    signer: Signer | None = None,
) -> list[SaleTouch]:
    """Record the first and last touch of a sale (see the module rules); the stored
    touches (none when no code or click matched). Idempotent per (sale_kind, sale_id).
    A sale with neither codes nor clicks has nothing to match: no query at all (most till
    sales), so an empty answer then says nothing about touches stored earlier."""
    if not codes and not click_ids:
        return []
    stored = await touches_for(session, org_id=org_id, sale_kind=sale_kind, sale_id=sale_id)
    if stored:
        return stored
    candidates: list[_Candidate] = []
    wanted = sorted({c for c in click_ids[:MAX_TOUCH_INPUTS] if isinstance(c, str) and c})
    if wanted:
        rows = await session.execute(
            select(ShortLinkClick, ShortLink)
            .join(ShortLink, ShortLink.id == ShortLinkClick.link_id)
            .where(
                ShortLinkClick.org_id == org_id,
                ShortLinkClick.click_id.in_(wanted),
                ShortLinkClick.at <= occurred_at,
                ShortLinkClick.at >= occurred_at - CLICK_WINDOW,
            )
        )
        for click, link in rows.tuples():
            candidates.append(
                _Candidate(
                    at=click.at,
                    rank=0,
                    order=click.id,
                    via=Via.CLICK,
                    values={
                        "link_id": link.id,
                        "click_id": click.click_id,
                        "promo_code_id": link.promo_code_id,
                        "event_id": link.event_id,
                        "partner_id": link.partner_id,
                        "drop_id": link.drop_id,
                        "variant": link.variant,
                        "segment_id": link.segment_id,
                        "conversation_id": link.conversation_id,
                        "channel": click.channel or link.channel,
                    },
                )
            )
    for promo in await _promos_named(session, org_id, list(codes), signer):
        candidates.append(
            _Candidate(
                at=occurred_at,
                rank=1,
                order=promo.id,
                via=Via.CODE,
                values={
                    "link_id": None,
                    "click_id": None,
                    "promo_code_id": promo.id,
                    "event_id": promo.event_id,
                    "partner_id": promo.partner_id,
                    "drop_id": promo.drop_id,
                    "variant": promo.variant,
                    "segment_id": promo.segment_id,
                    "conversation_id": None,
                    "channel": promo.channel,
                },
            )
        )
    if not candidates:
        return []
    candidates.sort(key=lambda c: (c.at, c.rank, c.order))
    rows_out = []
    for touch, chosen in ((Touch.FIRST, candidates[0]), (Touch.LAST, candidates[-1])):
        values = dict(chosen.values)
        if values["event_id"] is None:
            values["event_id"] = event_id
        rows_out.append(
            {
                "org_id": org_id,
                "sale_kind": sale_kind,
                "sale_id": sale_id,
                "touch": touch.value,
                "via": chosen.via.value,
                "touched_at": chosen.at,
                "amount_minor": amount_minor,
                "currency": currency,
                "occurred_at": occurred_at,
                "reversed_minor": 0,
                **values,
            }
        )
    dialect = session.get_bind().dialect.name
    await session.execute(
        dialect_insert(dialect, _touches).on_conflict_do_nothing(
            index_elements=["sale_kind", "sale_id", "touch"]
        ),
        rows_out,
    )
    return await touches_for(session, org_id=org_id, sale_kind=sale_kind, sale_id=sale_id)


async def reverse_sale(
    session: AsyncSession, *, org_id: int, sale_kind: SaleKind, sale_id: int, amount_minor: int
) -> None:
    """A refund of `amount_minor`: added to `reversed_minor` of the sale's touches, capped
    at the sale's amount. Not idempotent by itself: the caller knows its refund ids."""
    if amount_minor <= 0:
        return
    raised = SaleTouch.reversed_minor + amount_minor
    await session.execute(
        update(SaleTouch)
        .where(
            SaleTouch.org_id == org_id,
            SaleTouch.sale_kind == sale_kind,
            SaleTouch.sale_id == sale_id,
        )
        .values(
            reversed_minor=case(
                (raised > SaleTouch.amount_minor, SaleTouch.amount_minor), else_=raised
            )
        )
        .execution_options(synchronize_session=False)
    )  # `touches_for` re-reads (populate_existing), so loaded rows show the new value


async def touches_for(
    session: AsyncSession, *, org_id: int, sale_kind: SaleKind, sale_id: int
) -> list[SaleTouch]:
    """The stored touches of a sale: first, then last (none if it was not attributed)."""
    rows = await session.scalars(
        select(SaleTouch)
        .where(
            SaleTouch.org_id == org_id,
            SaleTouch.sale_kind == sale_kind,
            SaleTouch.sale_id == sale_id,
        )
        .order_by(case((SaleTouch.touch == Touch.FIRST.value, 0), else_=1))
        .execution_options(populate_existing=True)
    )
    return list(rows)


def touch_out(touch: SaleTouch) -> SaleTouchOut:
    return SaleTouchOut(
        sale_kind=touch.sale_kind,
        sale_id=touch.sale_id,
        touch=touch.touch,
        via=touch.via,
        touched_at=touch.touched_at,
        promo_code_id=touch.promo_code_id,
        link_id=touch.link_id,
        click_id=touch.click_id,
        event_id=touch.event_id,
        partner_id=touch.partner_id,
        drop_id=touch.drop_id,
        variant=touch.variant,
        segment_id=touch.segment_id,
        conversation_id=touch.conversation_id,
        channel=touch.channel,
        amount_minor=touch.amount_minor,
        currency=touch.currency,
        occurred_at=touch.occurred_at,
        reversed_minor=touch.reversed_minor,
    )


async def sale_touches(
    session: AsyncSession, principal: Principal, sale_kind: SaleKind, sale_id: int
) -> list[SaleTouch]:
    """The touches of a sale for a reader: hosts with `orders:read`; a partner only the
    touches attributed to it."""
    if not _is_partner(principal):
        principal.require(SALES_SCOPE)
    found = await touches_for(
        session, org_id=principal.org_id, sale_kind=sale_kind, sale_id=sale_id
    )
    if _is_partner(principal):
        mine = set(await session.scalars(partners_of(principal)))
        found = [t for t in found if t.partner_id in mine]
    return found


def bearer(kind: str) -> bool:
    return kind in BEARER_KINDS
