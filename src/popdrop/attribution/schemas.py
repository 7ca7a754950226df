"""Inputs and outputs of the attribution domain.

- `LinkTarget`: where a short link leads. `kind="url"` with `url` (a plain public
  http(s) URL, stored as is); `kind="event"` with `id` (the event's public page);
  `kind="ticket"` / `kind="checkout"` with `id` (a ticket, a hold): bearer targets, whose
  signed link is rebuilt at redirect time and never stored.
- `LinkTags`: what a click on the link is attributed to (event, partner, drop, A/B
  variant, segment, channel, chat conversation, promo code) and the UTM parameters added
  to the target. Every field is optional.
- `ShortLinkCreate`: a target, its tags, and the link's own limits: `valid_from`,
  `valid_until`, `max_clicks` and the `fallback_url` used outside them.
- `PromoCodeCreate`: a label and tags; the vault issues one multi-use code
  (`max_uses`, `valid_from`/`valid_until`, optional `prefix`, discount fields as a voucher
  batch has them), or, with `batch_id`, an existing batch is tagged instead (each of its
  codes attributes to these tags) and no code is issued.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from popdrop.attribution.models import Channel, DeviceClass, TargetKind
from popdrop.core.schemas import StrictInput

IdField = Field(default=None, ge=1, le=2**62)
UtmField = Field(default=None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._~:/+ -]+$")
UrlField = Field(default=None, min_length=8, max_length=2000, pattern=r"^https?://[^\s]+$")
MAX_CLICKS = 1_000_000_000


def _aware(value: datetime | None, name: str) -> None:
    if value is None:
        return
    if value.tzinfo is None:
        raise ValueError(f"{name} needs a time zone offset (e.g. Z)")
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{name} is out of range (years 1 to 9999 in UTC)") from None


class LinkTarget(StrictInput):
    kind: TargetKind
    url: str | None = UrlField
    id: int | None = IdField

    @model_validator(mode="after")
    def _one(self) -> LinkTarget:
        if self.kind == TargetKind.URL:
            if self.url is None or self.id is not None:
                raise ValueError("a url target takes `url` (and no `id`)")
        elif self.id is None or self.url is not None:
            raise ValueError(f"a {self.kind} target takes the row's `id` (and no `url`)")
        return self


class LinkTags(StrictInput):
    event_id: int | None = IdField
    partner_id: int | None = IdField
    drop_id: int | None = IdField
    variant: str | None = Field(default=None, min_length=1, max_length=32)
    segment_id: int | None = IdField
    channel: Channel | None = None
    conversation_id: int | None = IdField
    promo_code_id: int | None = IdField
    utm_source: str | None = UtmField
    utm_medium: str | None = UtmField
    utm_campaign: str | None = UtmField
    utm_content: str | None = UtmField


class ShortLinkCreate(StrictInput):
    target: LinkTarget
    tags: LinkTags = Field(default_factory=LinkTags)
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    max_clicks: int | None = Field(default=None, ge=1, le=MAX_CLICKS)
    fallback_url: str | None = UrlField

    @model_validator(mode="after")
    def _coherent(self) -> ShortLinkCreate:
        _aware(self.valid_from, "valid_from")
        _aware(self.valid_until, "valid_until")
        if self.valid_from and self.valid_until and self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be after valid_from")
        return self


class PromoCodeCreate(StrictInput):
    label: str = Field(min_length=1, max_length=200)
    event_id: int | None = IdField
    partner_id: int | None = IdField
    channel: Channel | None = None
    drop_id: int | None = IdField
    variant: str | None = Field(default=None, min_length=1, max_length=32)
    segment_id: int | None = IdField
    batch_id: int | None = IdField  # tag this existing vault batch instead of issuing a code
    prefix: str | None = Field(default=None, max_length=6)
    max_uses: int = Field(default=1_000_000, ge=1, le=1_000_000_000)
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")
    # What the code gives at checkout and at the till. A code must give something: the
    # checkout refuses a code worth nothing, so 10 % off unless told.
    discount_kind: Literal["percent", "fixed", "free_item"] = "percent"
    discount_value: int = Field(default=10, ge=0, le=10**12)

    @model_validator(mode="after")
    def _coherent(self) -> PromoCodeCreate:
        _aware(self.valid_from, "valid_from")
        _aware(self.valid_until, "valid_until")
        if self.valid_from and self.valid_until and self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be after valid_from")
        if self.discount_kind == "percent" and not 1 <= self.discount_value <= 100:
            raise ValueError("a percent discount is 1 to 100")
        if self.discount_kind == "fixed" and self.discount_value < 1:
            raise ValueError("a fixed discount is at least 1 (in minor units, e.g. cents)")
        return self


# ---------------------------------------------------------------- outputs


class ShortLinkOut(BaseModel):
    id: int
    slug: str
    short_url: str
    target_kind: TargetKind
    target_url: str | None  # only for kind url: bearer targets are never shown stored
    target_id: int | None
    valid_from: datetime | None
    valid_until: datetime | None
    max_clicks: int | None
    fallback_url: str | None
    clicks: int
    bot_hits: int
    event_id: int | None
    partner_id: int | None
    drop_id: int | None
    variant: str | None
    segment_id: int | None
    channel: Channel | None
    conversation_id: int | None
    promo_code_id: int | None
    utm_source: str | None
    utm_medium: str | None
    utm_campaign: str | None
    utm_content: str | None
    created_at: datetime


class Bucket(BaseModel):
    key: str
    clicks: int


class LinkAnalytics(BaseModel):
    link_id: int
    clicks: int  # counted clicks (flushed)
    bot_hits: int  # filtered requests: bots, link previews, prefetches
    by_day: list[Bucket]  # YYYY-MM-DD (UTC)
    by_hour: list[Bucket]  # YYYY-MM-DDTHH (UTC)
    by_channel: list[Bucket]
    by_device_class: list[Bucket]
    by_referrer_host: list[Bucket]


class ShortLinkDetail(ShortLinkOut):
    analytics: LinkAnalytics


class PromoCodeOut(BaseModel):
    id: int
    label: str
    code: str | None
    batch_id: int
    voucher_id: int | None
    event_id: int | None
    partner_id: int | None
    channel: Channel | None
    drop_id: int | None
    variant: str | None
    segment_id: int | None
    created_at: datetime


class SaleTouchOut(BaseModel):
    sale_kind: str
    sale_id: int
    touch: str
    via: str
    touched_at: datetime
    promo_code_id: int | None
    link_id: int | None
    click_id: str | None
    event_id: int | None
    partner_id: int | None
    drop_id: int | None
    variant: str | None
    segment_id: int | None
    conversation_id: int | None
    channel: str | None
    amount_minor: int
    currency: str
    occurred_at: datetime
    reversed_minor: int


__all__ = [
    "Bucket",
    "DeviceClass",
    "LinkAnalytics",
    "LinkTags",
    "LinkTarget",
    "PromoCodeCreate",
    "PromoCodeOut",
    "SaleTouchOut",
    "ShortLinkCreate",
    "ShortLinkDetail",
    "ShortLinkOut",
]
