"""A drop's stored content → compiled templates → one recipient's message.

Content is per variant, per channel and per recency bucket (`hot`, `warm`, `cold`,
`never`, with `default` for the rest). Click-tracking tokens (`core.links.click_token`)
name the drop, the send row and the destination, so `/r/{token}` records the click and
redirects without a database lookup for the URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from popdrop.audience.models import Contact
from popdrop.core.links import click_token, event_url, unsubscribe_url
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


@dataclass
class Links:
    """One recipient's tracked links, unsubscribe and preferences URLs."""

    signer: Signer
    base_url: str
    drop: Drop
    send_row_id: int | None
    contact: Contact | None

    def tracker(self, destination: str) -> str:
        return click_token(self.signer, self.drop.id, self.send_row_id, destination)

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
    return render.build_context(
        first_name=contact.first_name if contact else first_name,
        locale=(contact.locale if contact else None) or "en",
        voucher_code=voucher[1] if voucher else None,
        voucher_url=(
            event_url(links.base_url, event.id, code=voucher[1]) if voucher and event else None
        ),
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
