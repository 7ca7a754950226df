"""Drop I/O models.

Rules: what ends up in a mail header (`from_email`, `from_name`) or a provider's `From`
(`sms_from`) holds no control characters (a CR/LF would inject headers), and `from_email`
is one bare address; template texts are bounded here, their rendered output in `render`.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator

from popdrop.core.schemas import StrictInput

Channel = Literal["email", "sms"]
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
# One address, nothing a header parser would read as a second one or a display name.
_BARE_ADDRESS = re.compile(r"[^\s@<>,;:\"()\[\]\\]+@[^\s@<>,;:\"()\[\]\\]+")


def _header_safe(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("line breaks and control characters are not allowed")
    return value


def _bare_address(value: str) -> str:
    _header_safe(value)
    if value and not _BARE_ADDRESS.fullmatch(value):
        raise ValueError("one plain address such as drops@example.com")
    return value


HeaderText = Annotated[str, AfterValidator(_header_safe)]
TemplateText = Annotated[str, Field(max_length=100_000)]


class EmailContent(StrictInput):
    subject: str = Field(min_length=1, max_length=300)
    text: TemplateText
    html: TemplateText | None = None


class SmsContent(StrictInput):
    body: str = Field(min_length=1, max_length=1600)


class ChannelContent(StrictInput):
    """Per recency bucket (`hot`, `warm`, `cold`, `never`) or `default` for the rest."""

    email: dict[Literal["default", "hot", "warm", "cold", "never"], EmailContent] = Field(
        default_factory=dict
    )
    sms: dict[Literal["default", "hot", "warm", "cold", "never"], SmsContent] = Field(
        default_factory=dict
    )


class VariantIn(StrictInput):
    name: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")
    split_percent: int = Field(default=100, ge=1, le=100)
    content: ChannelContent


class VoucherSpec(StrictInput):
    """A per-recipient single-use voucher issued at send time."""

    discount_kind: Literal["percent", "fixed", "free_item"] = "percent"
    discount_value: int = Field(default=10, ge=0, le=10**9)
    discount_description: str = Field(default="", max_length=500)
    ttl_seconds: int = Field(default=8 * 3600, ge=60, le=366 * 86400)
    prefix: str | None = Field(default=None, max_length=8)


class DropCreate(StrictInput):
    name: str = Field(min_length=1, max_length=200)
    event_id: int | None = Field(default=None, ge=1, le=2**62)
    segment_id: int | None = Field(default=None, ge=1, le=2**62)
    channels: list[Channel] = Field(min_length=1)
    from_email: Annotated[str, AfterValidator(_bare_address)] = Field(default="", max_length=254)
    from_name: HeaderText = Field(default="", max_length=200)
    sms_from: HeaderText = Field(default="", max_length=32)
    variants: list[VariantIn] = Field(min_length=1, max_length=5)
    voucher: VoucherSpec | None = None
    seed_list: list[Annotated[HeaderText, Field(min_length=3, max_length=254)]] = Field(
        default_factory=list, max_length=50
    )
    ab_metric: Literal["click", "rsvp"] = "click"
    ab_test_fraction: float = Field(default=0.2, gt=0, le=1)
    ab_decide_after_seconds: int = Field(default=3600, ge=0, le=7 * 86400)
    ab_min_sample: int = Field(default=200, ge=1, le=10**7)
    ab_fallback: Literal["control", "none"] = "control"
    frequency_cap: int = Field(default=3, ge=1, le=100)
    frequency_window_hours: int = Field(default=24, ge=1, le=24 * 30)
    quiet_start_hour: int = Field(default=21, ge=0, le=23)
    quiet_end_hour: int = Field(default=8, ge=0, le=23)
    bounce_threshold: float = Field(default=0.05, gt=0, le=1)
    complaint_threshold: float = Field(default=0.003, gt=0, le=1)
    scheduled_at: datetime | None = None

    @model_validator(mode="after")
    def _splits(self) -> DropCreate:
        if len(self.variants) > 1 and sum(v.split_percent for v in self.variants) != 100:
            raise ValueError("variants: split_percent must add up to 100")
        if len({v.name for v in self.variants}) != len(self.variants):
            raise ValueError("variants: names must differ")
        for channel in self.channels:
            for variant in self.variants:
                if not getattr(variant.content, channel):
                    raise ValueError(f"variant {variant.name}: no {channel} content")
        return self


class DropOut(BaseModel):
    id: int
    name: str
    status: str
    channels: list[str]
    segment_id: int | None
    event_id: int | None
    seed_status: str
    seed_report: list[dict[str, object]]
    ab_winner: str | None
    ab_result: dict[str, object] | None
    paused_reason: str | None
    scheduled_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    counts: dict[str, int]


class SeedOverride(StrictInput):
    reason: str = Field(min_length=3, max_length=200)


class MinuteStats(BaseModel):
    minute: datetime
    sent: int
    delivered: int
    bounced: int
    failed: int
    clicked: int


class WarRoom(BaseModel):
    drop_id: int
    started_at: datetime | None
    minutes: list[MinuteStats]
    totals: dict[str, int]
