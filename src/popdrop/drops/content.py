"""A drop's stored content → compiled templates → one recipient's message.

Content is per variant, per channel and per recency bucket (`hot`, `warm`, `cold`,
`never`, with `default` for the rest). Click-tracking tokens (`core.links.click_token`)
name the drop, the send row and the destination, so `/r/{token}` records the click and
redirects without a database lookup for the URL.

An SMS link is shorter: `/s/{slug}/{recipient}` (`Links.shortener`), the drop's short
link of (variant, destination) and the send row under a MAC. A destination carrying one
of the recipient's secrets (their voucher code, `voucher_url`) is never put in a short
link: it stays a `/r/{token}` link, whose token carries it signed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import quote

from popdrop.audience.models import Contact
from popdrop.core.links import click_token, drop_recipient_url, event_url, unsubscribe_url
from popdrop.core.signing import Signer
from popdrop.drops import render
from popdrop.drops.models import Drop
from popdrop.drops.schemas import ChannelContent
from popdrop.events.models import Event


def _compile(content: ChannelContent) -> dict[str, dict[str, Any]]:
    compiled: dict[str, dict[str, Any]] = {"email": {}, "sms": {}}
    for bucket, email in content.email.items():
        compiled["email"][bucket] = render.compile_email(email.subject, email.text, email.html)
    for bucket, sms in content.sms.items():
        compiled["sms"][bucket] = render.compile_sms(sms.body)
    return compiled


def validate(content: ChannelContent) -> None:
    """Refuse a template that does not compile, naming the part and the line, or whose
    trial render passes the size or time cap."""
    for by_bucket in _compile(content).values():
        for compiled in by_bucket.values():
            render.check_render_limits(compiled)


# The preview counts SMS segments with a short link of the real shape: an 11-character
# slug and the recipient part of a 5-digit base-36 row id (the MAC is computed).
PREVIEW_SLUG = "PREVIEWlink"
MAX_SHORT_TARGET = 2000  # a short link's stored target is at most this long
PREVIEW_ROW_ID = 36**5 - 1


def preview_slug(destination: str) -> str:
    return PREVIEW_SLUG


def carries_secret(destination: str, secrets: tuple[str, ...]) -> bool:
    """Whether a destination holds one of the recipient's secrets (as is or URL-quoted,
    any letter case: a template may lower-case a code)."""
    upper = destination.upper()
    return any(s.upper() in upper or quote(s, safe="").upper() in upper for s in secrets if s)


@dataclass
class Links:
    """One recipient's tracked links, unsubscribe and preferences URLs."""

    signer: Signer
    base_url: str
    drop: Drop
    send_row_id: int | None
    contact: Contact | None
    # SMS short links of this variant: destination → its slug, None when it has none yet
    # (`slug_of` None: `/r/{token}` links only).
    slug_of: Callable[[str], str | None] | None = None
    # The recipient's secrets (voucher code and URL), filled in by `context_for`.
    secrets: tuple[str, ...] = ()
    # Destinations that had no short link yet (kept as `/r/{token}` in this render).
    missing: set[str] = field(default_factory=set)
    # Where `/s/` links are printed (`POPDROP_SHORT_BASE_URL`); None: on `base_url`.
    short_base_url: str | None = None

    def tracker(self, destination: str) -> str:
        return click_token(self.signer, self.drop.id, self.send_row_id, destination)

    def shortener(self, destination: str) -> str | None:
        if (
            self.slug_of is None
            or len(destination) > MAX_SHORT_TARGET
            or carries_secret(destination, self.secrets)
        ):
            return None
        slug = self.slug_of(destination)
        if slug is None:
            self.missing.add(destination)
            return None
        row_id = self.send_row_id if self.send_row_id is not None else PREVIEW_ROW_ID
        base = self.short_base_url or self.base_url
        return drop_recipient_url(self.signer, base, slug, row_id)

    @cached_property
    def unsubscribe_url(self) -> str | None:
        if self.contact is None:
            return None
        return unsubscribe_url(self.signer, self.base_url, self.contact.org_id, self.contact.id)


@dataclass(frozen=True)
class CompiledVariant:
    parts: dict[str, dict[str, Any]]

    def _pick(self, channel: str, bucket: str) -> Any:
        options = self.parts[channel]
        chosen = options.get(bucket) or options.get("default") or next(iter(options.values()))
        return chosen

    def render_email(
        self, bucket: str, values: dict[str, Any], links: Links
    ) -> render.RenderedEmail:
        return render.render_email(
            self._pick("email", bucket),
            values,
            tracker=links.tracker,
            base_url=links.base_url,
            campaign=links.drop.slug,
        )

    def render_sms(self, bucket: str, values: dict[str, Any], links: Links) -> render.RenderedSms:
        return render.render_sms(
            self._pick("sms", bucket),
            values,
            tracker=links.tracker,
            base_url=links.base_url,
            campaign=links.drop.slug,
            shortener=links.shortener,
        )


def compile_variant(stored: str) -> CompiledVariant:
    return CompiledVariant(_compile(ChannelContent.model_validate_json(stored)))


def context_for(
    drop: Drop,
    contact: Contact | None,
    event: Event | None,
    voucher: tuple[int, str] | None,
    links: Links,
    *,
    first_name: str | None = None,
) -> dict[str, Any]:
    unsubscribe = links.unsubscribe_url
    code = voucher[1] if voucher else None
    voucher_url = event_url(links.base_url, event.id, code=code) if code and event else None
    # A link carrying these is a bearer credential of this recipient: never a short link.
    links.secrets = tuple(s for s in (code, voucher_url) if s)
    return render.build_context(
        first_name=contact.first_name if contact else first_name,
        locale=(contact.locale if contact else None) or "en",
        voucher_code=code,
        voucher_url=voucher_url,
        event=(
            render.EventInfo(
                event.title, event.starts_at, event.timezone, event_url(links.base_url, event.id)
            )
            if event
            else None
        ),
        unsubscribe_url=unsubscribe,
        preferences_url=unsubscribe,
        organization=drop.from_name or None,
    )


def preview_sms(
    signer: Signer,
    base_url: str,
    short_base_url: str | None,
    drop: Drop,
    event: Event | None,
    body: str,
) -> render.RenderedSms:
    """An SMS template rendered as it would be sent (sample first name and code, the
    drop's short links in their real shape), for its segment count on the drop page.
    Raises `PopdropError` when the template does not render with sample values."""
    links = Links(
        signer, base_url, drop, None, None, slug_of=preview_slug, short_base_url=short_base_url
    )
    values = context_for(drop, None, event, (0, "PREVIEW-CODE"), links, first_name="Alex")
    return render.render_sms(
        render.compile_sms(body, custom_vars=None),
        values,
        tracker=links.tracker,
        base_url=base_url,
        campaign=drop.slug,
        shortener=links.shortener,
    )
