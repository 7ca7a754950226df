"""The redirect of `/s/{slug}`: what a slug leads to, decided without the database on the
hot path.

Rules this module keeps:
- A link's view (`LinkView`: its target, UTM pairs, limits, tags) is cached per process
  for `VIEW_TTL_SECONDS` (`core.cache.ProcessCache`); a cached slug costs no database
  read. Unknown slugs are not cached (each one is a guess the caller counts).
- A public target (`url`, `event`) is built once, UTM included, when the view is loaded;
  a bearer target (`ticket`, `checkout`) is rebuilt on every redirect from the row it
  names (the ticket's current secret, a fresh checkout token) and never cached or stored.
- `max_clicks` is enforced against the count stored when the view was loaded plus the
  clicks this process recorded since (`ClickRecorder.counted`). With several server
  processes a link may pass its maximum by the clicks the others took within one view
  lifetime; one process is exact.
- UTM parameters are added to the target unless the target already carries that
  parameter (the author's tagging wins); `pd_click=<click id>` is always added for a
  counted click, so the landing page can hand it back at checkout.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.attribution import agents
from popdrop.attribution.clicks import ClickRecorder, PendingClick
from popdrop.attribution.models import BEARER_KINDS, ShortLink, TargetKind
from popdrop.checkin import service as checkin
from popdrop.checkin.lifecycle import TicketStatus
from popdrop.checkin.models import Ticket
from popdrop.core import links
from popdrop.core.cache import ProcessCache
from popdrop.core.errors import PopdropError
from popdrop.core.links import CLICK_PARAM  # the landing pages read it back
from popdrop.core.signing import Signer

VIEW_TTL_SECONDS = 30.0
SLUG_RE = re.compile(r"^[A-Za-z0-9_-]{10,32}$")


@dataclass(frozen=True, slots=True)
class LinkView:
    id: int
    org_id: int
    kind: str
    target: str | None  # public targets: the absolute URL, UTM included
    target_id: int | None
    utm: tuple[tuple[str, str], ...]
    valid_from: datetime | None
    valid_until: datetime | None
    max_clicks: int | None
    fallback_url: str | None
    channel: str | None
    drop_id: int | None  # the drop a drop's link tags (its SMS links carry a recipient)
    stored_clicks: int
    counted_at_load: int  # the recorder's count for this link when the view was loaded


_VIEWS: ProcessCache[tuple[str, str], LinkView] = ProcessCache(maxsize=20_000)


def with_params(url: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """`url` with each (name, value) added unless the URL already has that parameter; the
    existing query string is kept byte for byte."""
    if not pairs:
        return url
    parts = urlsplit(url)
    present = {k.lower() for k, _ in parse_qsl(parts.query, keep_blank_values=True)}
    extra = [(k, v) for k, v in pairs if k.lower() not in present]
    if not extra:
        return url
    encoded = urlencode(extra)
    query = f"{parts.query}&{encoded}" if parts.query else encoded
    return urlunsplit(parts._replace(query=query))


def add_click(url: str, click_id: str) -> str:
    """The target with `pd_click` appended (click ids are URL-safe)."""
    if "#" not in url:  # the common case, without parsing: the query ends the URL
        return f"{url}{'&' if '?' in url else '?'}{CLICK_PARAM}={click_id}"
    parts = urlsplit(url)
    pair = f"{CLICK_PARAM}={click_id}"
    query = f"{parts.query}&{pair}" if parts.query else pair
    return urlunsplit(parts._replace(query=query))


def _utm(link: ShortLink) -> tuple[tuple[str, str], ...]:
    pairs = (
        ("utm_source", link.utm_source),
        ("utm_medium", link.utm_medium),
        ("utm_campaign", link.utm_campaign),
        ("utm_content", link.utm_content),
    )
    return tuple((k, v) for k, v in pairs if v)


def _public_target(link: ShortLink, base_url: str, utm: tuple[tuple[str, str], ...]) -> str | None:
    if link.target_kind == TargetKind.URL and link.target_url:
        return with_params(link.target_url, utm)
    if link.target_kind == TargetKind.EVENT and link.target_id is not None:
        return with_params(links.event_url(base_url, link.target_id), utm)
    return None


async def load_view(
    session: AsyncSession, slug: str, base_url: str, recorder: ClickRecorder, db_key: str
) -> LinkView | None:
    """The cached view of a slug, or read and cached; None for an unknown slug."""
    key = (db_key, slug)
    view = _VIEWS.get(key)
    if view is not None:
        return view
    link = await session.scalar(select(ShortLink).where(ShortLink.slug == slug))
    if link is None:
        return None
    utm = _utm(link)
    view = LinkView(
        id=link.id,
        org_id=link.org_id,
        kind=link.target_kind,
        target=_public_target(link, base_url, utm),
        target_id=link.target_id,
        utm=utm,
        valid_from=link.valid_from,
        valid_until=link.valid_until,
        max_clicks=link.max_clicks,
        fallback_url=link.fallback_url,
        channel=link.channel,
        drop_id=link.drop_id,
        stored_clicks=link.clicks,
        counted_at_load=recorder.counted(link.id),
    )
    _VIEWS.put(key, view, VIEW_TTL_SECONDS)
    return view


def cached_view(slug: str, db_key: str) -> LinkView | None:
    return _VIEWS.get((db_key, slug))


def forget(slug: str, db_key: str) -> None:
    _VIEWS.pop((db_key, slug))


@dataclass(frozen=True, slots=True)
class Decision:
    """Where to send the browser; `counted` when it goes to the target (a click)."""

    location: str | None
    counted: bool
    refusal: PopdropError | None = None


def decide(view: LinkView, recorder: ClickRecorder, now: datetime) -> Decision:
    """Inside the link's window and under its maximum: the target (None for a bearer
    target, which the caller rebuilds). Outside: the fallback URL, else the refusal."""
    refusal: PopdropError | None = None
    if view.valid_from is not None and now < view.valid_from:
        refusal = PopdropError("not_yet_valid", "this link is not active yet")
    elif view.valid_until is not None and now >= view.valid_until:
        refusal = PopdropError("expired", "this link has expired")
    elif view.max_clicks is not None:
        clicks = view.stored_clicks + recorder.counted(view.id) - view.counted_at_load
        if clicks >= view.max_clicks:
            refusal = PopdropError(
                "exhausted", "this link has reached its maximum number of visits", status=410
            )
    if refusal is None:
        return Decision(view.target, counted=True)
    if view.fallback_url:
        return Decision(view.fallback_url, counted=False)
    return Decision(None, counted=False, refusal=refusal)


async def bearer_target(
    session: AsyncSession, signer: Signer, view: LinkView, base_url: str, now: datetime
) -> str:
    """The signed link of a bearer target, rebuilt from its row now."""
    assert view.kind in BEARER_KINDS and view.target_id is not None
    if view.kind == TargetKind.TICKET:
        ticket = await session.scalar(
            select(Ticket).where(Ticket.id == view.target_id, Ticket.org_id == view.org_id)
        )
        if ticket is None or ticket.status != TicketStatus.VALID:
            raise PopdropError("revoked", "this ticket is no longer valid")
        secret = await checkin.ticket_secret(session, ticket, now)
        return with_params(links.ticket_url(base_url, secret), view.utm)
    url = links.checkout_url(signer, base_url, view.target_id, view.org_id)
    return with_params(url, view.utm)


def new_click_id() -> str:
    return secrets.token_urlsafe(12)  # 96 bits, 16 characters


def referrer_host(referer: str | None) -> str | None:
    if not referer:
        return None
    try:
        host = urlsplit(referer).hostname
    except ValueError:
        return None
    return host[:255].lower() if host else None


def click_of(
    view: LinkView, *, at: datetime, device_class: str, referer: str | None
) -> PendingClick:
    return PendingClick(
        org_id=view.org_id,
        link_id=view.id,
        click_id=new_click_id(),
        at=at,
        channel=view.channel,
        device_class=device_class,
        referrer_host=referrer_host(referer),
    )


def record_visit(
    recorder: ClickRecorder,
    *,
    org_id: int,
    link_id: int,
    channel: str | None,
    method: str,
    headers: Mapping[str, str],
    now: datetime,
) -> str | None:
    """A visit of a link by a browser (redirect routes outside this domain, e.g. a drop's
    tracked link): a click handed to the batch, its click id returned; a bot is counted
    as a bot hit and gets no click id."""
    user_agent = headers.get("user-agent", "")
    if agents.is_bot(method, user_agent, headers):
        recorder.bot_hit(link_id)
        return None
    click = PendingClick(
        org_id=org_id,
        link_id=link_id,
        click_id=new_click_id(),
        at=now,
        channel=channel,
        device_class=agents.device_class(user_agent),
        referrer_host=referrer_host(headers.get("referer")),
    )
    recorder.record(click)
    return click.click_id
