"""Drop clicks as attribution clicks: every drop link leads through a short link of the
attribution domain tagged with the drop, the A/B variant, the drop's segment and event,
and the channel, so an order or a POS sale after the click names them.

Link shapes:
- SMS: `{base}/s/{slug}/{recipient}`. `slug` is the short link of (drop, variant,
  destination), made (`drop_link`) and committed before the first message carrying it is
  sent; `recipient` is the send row id under a MAC (`core.links.drop_recipient`), so no
  row per recipient is stored. `follow_sms` records the attribution click and the drop's
  own click outcome, and sends the browser to the destination with `pd_click`.
- Email, and SMS links carrying a recipient's secret: `{base}/r/{token}` (the signed
  destination). `follow_tracked` records the outcome, then the attribution click on the
  drop's short link of (drop, variant, destination), made on the first click.
- A short link never stores a recipient's secret: for a destination that carries the
  recipient's voucher code, the link's stored target is the destination without its
  query and fragment (the public page); the browser still goes to the signed destination.

Bots (link scanners, prefetchers) still count as a drop click outcome, as `/r/` always
did, but get no attribution click and no `pd_click`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.attribution import redirects
from popdrop.attribution import service as attribution
from popdrop.attribution.clicks import ClickRecorder
from popdrop.attribution.models import Channel, ShortLink, TargetKind
from popdrop.attribution.schemas import LinkTags, LinkTarget
from popdrop.core import links
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.logging import log
from popdrop.core.signing import Signer
from popdrop.drops import content, outcomes
from popdrop.drops.models import Drop, DropVariant, SendRow
from popdrop.vouchers import codes
from popdrop.vouchers.models import VoucherBatch


def link_tags(drop: Drop, variant: str | None, channel: str) -> LinkTags:
    return LinkTags(
        drop_id=drop.id,
        variant=variant,
        segment_id=drop.segment_id,
        event_id=drop.event_id,
        channel=Channel(channel),
    )


def public_target(destination: str, secrets: tuple[str, ...]) -> str:
    """What a short link may store of a destination: all of it, or, when it carries one
    of the recipient's secrets, only its scheme, host and path."""
    if not content.carries_secret(destination, secrets):
        return destination
    parts = urlsplit(destination)
    return urlunsplit(parts._replace(query="", fragment=""))


async def drop_link(
    session: AsyncSession,
    drop: Drop,
    *,
    variant: str | None,
    channel: str,
    destination: str,
    now: datetime,
) -> ShortLink:
    """The drop's short link of (variant, channel, destination), made once."""
    return await attribution.short_link_for(
        session,
        org_id=drop.org_id,
        target=LinkTarget(kind=TargetKind.URL, url=destination),
        tags=link_tags(drop, variant, channel),
        now=now,
    )


async def _variant_of(session: AsyncSession, drop_id: int, row: SendRow) -> str | None:
    if row.variant:
        return row.variant
    # A row sent before its variant was set went out with the first variant.
    return await session.scalar(
        select(DropVariant.name).where(DropVariant.drop_id == drop_id).order_by(DropVariant.id)
    )


async def _secrets_of(
    session: AsyncSession, signer: Signer, drop: Drop, row: SendRow
) -> tuple[str, ...]:
    """The recipient's voucher code (derived again: the vault keeps only its hash)."""
    if row.voucher_id is None or drop.voucher_batch_id is None:
        return ()
    batch = await session.get(VoucherBatch, drop.voucher_batch_id)
    if batch is None:
        return ()
    mac = links.derived_code_mac(signer, batch.id, f"drop:{drop.id}:{row.contact_id}")
    return (codes.format_code(codes.derived_code(batch.prefix, mac)),)


async def follow_tracked(
    session: AsyncSession,
    signer: Signer,
    recorder: ClickRecorder,
    *,
    drop_id: int,
    send_row_id: int | None,
    url: str,
    now: datetime,
    method: str,
    headers: Mapping[str, str],
) -> str:
    """A click on `/r/{token}`: the drop's outcome, then (for a recipient's link) the
    attribution click; where to send the browser (`pd_click` added for a counted click)."""
    await outcomes.record_click(
        session, signer, drop_id=drop_id, send_row_id=send_row_id, url=url, now=now
    )
    if send_row_id is None:  # a preview or seed message: no recipient, no attribution
        return url
    row = await session.get(SendRow, send_row_id)
    drop = await session.get(Drop, drop_id)
    if row is None or drop is None or row.drop_id != drop_id:
        return url
    try:
        link = await drop_link(
            session,
            drop,
            variant=await _variant_of(session, drop_id, row),
            channel=row.channel,
            destination=public_target(url, await _secrets_of(session, signer, drop, row)),
            now=now,
        )
    except (PopdropError, ValueError) as error:  # a tag gone since the send, a huge URL
        # The person still gets where the message promised; only attribution is lost.
        log.warning("drops: click not attributable", drop=drop_id, error=repr(error))
        return url
    click_id = redirects.record_visit(
        recorder,
        org_id=drop.org_id,
        link_id=link.id,
        channel=link.channel,
        method=method,
        headers=headers,
        now=now,
    )
    return redirects.add_click(url, click_id) if click_id else url


async def follow_sms(
    session: AsyncSession,
    signer: Signer,
    recorder: ClickRecorder,
    view: redirects.LinkView,
    *,
    send_row_id: int,
    now: datetime,
    method: str,
    headers: Mapping[str, str],
) -> str:
    """A click on `/s/{slug}/{recipient}` whose recipient part was genuine: the
    attribution click and the drop's outcome; where to send the browser."""
    decision = redirects.decide(view, recorder, now)
    if decision.refusal is not None:
        raise decision.refusal
    location = decision.location
    if location is None:  # drop links are `url` links; anything else is not one of ours
        raise not_found("short link")
    if not decision.counted:  # outside the link's window: its fallback, no click
        return location
    row = await session.get(SendRow, send_row_id)
    if row is not None and row.drop_id == view.drop_id and row.org_id == view.org_id:
        await outcomes.record_click(
            session, signer, drop_id=row.drop_id, send_row_id=row.id, url=location, now=now
        )
    click_id = redirects.record_visit(
        recorder,
        org_id=view.org_id,
        link_id=view.id,
        channel=view.channel,
        method=method,
        headers=headers,
        now=now,
    )
    return redirects.add_click(location, click_id) if click_id else location
