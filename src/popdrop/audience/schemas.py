"""Audience I/O models: contacts, consent, segments, inbound keywords, imports."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, Field, field_validator

from popdrop.core.schemas import StrictInput

Channel = Literal["email", "sms", "chat"]
Bucket = Literal["hot", "warm", "cold", "never"]
ActivityKind = Literal["click", "chat", "rsvp", "visit", "purchase"]
Label = Annotated[str, Field(min_length=1, max_length=64)]
Frequency = Literal["all", "weekly", "monthly"]
_LOCALE = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")


def _locale(value: str | None) -> str | None:
    """BCP 47-ish (`fr`, `de-DE`, `pt_BR`), stored with a dash."""
    if value is None:
        return None
    if not _LOCALE.match(value):
        raise ValueError("a language tag such as fr, de-DE or pt-BR")
    return value.replace("_", "-")


def _time_zone(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError("an IANA time zone such as Europe/Paris") from exc
    return value


Locale = Annotated[str, Field(min_length=2, max_length=16), AfterValidator(_locale)]
TimeZone = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_time_zone)]


def clean_labels(values: list[str]) -> list[str]:
    """Tags and interests compare case-insensitively, trimmed, without duplicates."""
    seen: dict[str, None] = {}
    for value in values:
        label = value.strip().lower()
        if label:
            seen.setdefault(label[:64], None)
    return list(seen)


class ConsentGrant(StrictInput):
    channel: Channel
    wording: str = Field(max_length=2000, description="The exact words the person agreed to")
    source: Literal["form", "import", "operator", "api", "chat_keyword", "sms_keyword"] = "api"
    proof: str | None = Field(default=None, max_length=2000)


class ContactIn(StrictInput):
    email: str | None = Field(default=None, max_length=254)
    phone: str | None = Field(default=None, max_length=40)
    phone_region: str | None = Field(
        default=None, min_length=2, max_length=2, description="ISO region for national numbers"
    )
    first_name: str | None = Field(default=None, max_length=100)
    locale: Locale | None = None
    time_zone: TimeZone | None = None
    source: str | None = Field(default=None, max_length=100)
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    tags: list[Label] = Field(default_factory=list, max_length=50)
    interests: list[Label] = Field(default_factory=list, max_length=50)
    consents: list[ConsentGrant] = Field(default_factory=list, max_length=3)

    @field_validator("tags", "interests")
    @classmethod
    def _labels(cls, value: list[str]) -> list[str]:
        return clean_labels(value)


class ContactPatch(StrictInput):
    first_name: str | None = Field(default=None, max_length=100)
    locale: Locale | None = None
    time_zone: TimeZone | None = None
    add_tags: list[Label] = Field(default_factory=list, max_length=50)
    remove_tags: list[Label] = Field(default_factory=list, max_length=50)

    @field_validator("add_tags", "remove_tags")
    @classmethod
    def _labels(cls, value: list[str]) -> list[str]:
        return clean_labels(value)


class ContactOut(BaseModel):
    id: int
    email: str | None
    phone: str | None
    first_name: str | None
    locale: str | None
    time_zone: str | None
    source: str | None
    lat: float | None
    lon: float | None
    tags: list[str]
    interests: list[str]
    consent: dict[str, str]
    frequency: str
    bucket: Bucket
    created_at: datetime
    last_engaged_at: datetime | None
    erased_at: datetime | None


class ContactCreated(BaseModel):
    contact: ContactOut
    created: bool


class ContactList(BaseModel):
    items: list[ContactOut]
    next_before: int | None


class ConsentChange(StrictInput):
    channel: Channel
    action: Literal["grant", "revoke", "request"]
    wording: str = Field(default="", max_length=2000)
    source: Literal["form", "operator", "api", "import", "chat_keyword", "sms_keyword"] = "api"
    proof: str | None = Field(default=None, max_length=2000)


class ConsentEventOut(BaseModel):
    id: int
    contact_id: int
    channel: str
    action: str
    source: str
    wording: str
    proof: str | None
    at: datetime


class ConsentChanged(BaseModel):
    contact: ContactOut
    event: ConsentEventOut | None
    confirm_url: str | None = None  # double opt-in (email): the link to send


class ActivityIn(StrictInput):
    kind: ActivityKind
    contact_id: int | None = Field(default=None, ge=1, le=2**62)
    email: str | None = Field(default=None, max_length=254)
    phone: str | None = Field(default=None, max_length=40)
    event_id: int | None = Field(default=None, ge=1, le=2**62)
    ref: str | None = Field(default=None, max_length=200)


class InboundMessage(StrictInput):
    channel: Literal["sms", "chat"]
    sender: str = Field(min_length=1, max_length=64, description="E.164 phone for SMS")
    text: str = Field(max_length=2000)


class InboundResult(BaseModel):
    keyword: str | None = Field(description="stop, stopall, start, help, yes, or null")
    action: str | None = Field(description="opted_out, opted_in, confirmed, help, or null")
    reply: str | None = Field(description="The one message to answer with, if any")
    contact_id: int | None


class NearRule(StrictInput):
    event_id: int = Field(ge=1, le=2**62)
    km: float = Field(gt=0, le=20000)


class AttendedRule(StrictInput):
    event_ids: list[Annotated[int, Field(ge=1, le=2**62)]] = Field(
        default_factory=list, max_length=100, description="Empty: any past event"
    )


def _default_channels() -> list[Channel]:
    return ["email", "sms"]


class SegmentRules(StrictInput):
    """Who is in: sendable on at least one of `channels`, and every other rule given."""

    channels: list[Channel] = Field(default_factory=_default_channels, min_length=1)
    recency: list[Bucket] = Field(default_factory=list, description="Empty: any")
    tags_any: list[Label] = Field(default_factory=list, max_length=50)
    tags_all: list[Label] = Field(default_factory=list, max_length=50)
    tags_none: list[Label] = Field(default_factory=list, max_length=50)
    interests_any: list[Label] = Field(default_factory=list, max_length=50)
    locales: list[Locale] = Field(default_factory=list, max_length=50)
    near: NearRule | None = None
    attended: AttendedRule | None = None

    @field_validator("tags_any", "tags_all", "tags_none", "interests_any")
    @classmethod
    def _labels(cls, value: list[str]) -> list[str]:
        return clean_labels(value)


class SegmentIn(StrictInput):
    name: str = Field(min_length=1, max_length=200)
    rules: SegmentRules


class SegmentOut(BaseModel):
    id: int
    name: str
    rules: SegmentRules
    created_at: datetime
    updated_at: datetime


class SegmentCount(BaseModel):
    total: int
    by_channel: dict[str, int]
    by_bucket: dict[str, int]


class AudienceSettingsIn(StrictInput):
    hot_days: int = Field(default=7, ge=1, le=3650)
    warm_days: int = Field(default=60, ge=2, le=3650)
    help_text: str = Field(default="", max_length=480)
    retention_months: int | None = Field(default=None, ge=1, le=240)


class AudienceSettingsOut(BaseModel):
    hot_days: int
    warm_days: int
    help_text: str
    retention_months: int | None


class PreferencesIn(StrictInput):
    email: bool
    sms: bool
    topics: list[Label] = Field(default_factory=list, max_length=50)
    frequency: Frequency = "all"


class ImportRowProblem(BaseModel):
    line: int
    reason: str
    field: str | None = None
    message: str


class ImportReport(BaseModel):
    total_rows: int
    created: int
    updated: int
    unchanged: int
    refused: int
    problems: list[ImportRowProblem]


class ImportJobOut(BaseModel):
    id: int
    filename: str
    status: str
    total_rows: int
    processed_rows: int
    created: int
    updated: int
    unchanged: int
    refused: int
    problems: list[ImportRowProblem]
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class EraseResult(BaseModel):
    contact_id: int
    scrubbed: dict[str, int]


class PurgeResult(BaseModel):
    erased: int
    cutoff: datetime
    # Funnel log events older than the cutoff, deleted (their rollups stay).
    funnel_events_deleted: int = 0
