from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import available_timezones

from pydantic import BaseModel, Field, field_validator, model_validator

from popdrop.core.schemas import StrictInput
from popdrop.events.lifecycle import EventStatus
from popdrop.events.models import DEFAULT_GATE

_ZONES = available_timezones()


def _aware(value: datetime | None, name: str) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"{name} needs a time zone offset (e.g. Z)")
    if value is not None:
        try:
            value.astimezone(UTC)  # how it is stored
        except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is in year 0 in UTC
            raise ValueError(f"{name} is out of range (years 1 to 9999 in UTC)") from None
    return value


# EventUpdate fields an event always has: leaving one out keeps it, null is refused.
_REQUIRED_ON_UPDATE = (
    "title",
    "description",
    "venue_name",
    "venue_address",
    "timezone",
    "starts_at",
    "ends_at",
    "max_hold_renewals",
)


class EventCreate(StrictInput):
    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")
    title: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=10_000)
    venue_name: str = Field(default="", max_length=200)
    venue_address: str = Field(default="", max_length=500)
    latitude: float | None = Field(default=None, ge=-90, le=90)
    longitude: float | None = Field(default=None, ge=-180, le=180)
    timezone: str = "UTC"
    starts_at: datetime
    ends_at: datetime
    opens_at: datetime | None = None
    hold_ttl_seconds: int = Field(default=900, ge=60, le=86_400)
    max_hold_renewals: int = Field(default=2, ge=0, le=20)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if value not in _ZONES:
            raise ValueError("timezone: an IANA name such as Europe/Berlin")
        return value

    @model_validator(mode="after")
    def _window(self) -> EventCreate:
        _aware(self.starts_at, "starts_at")
        _aware(self.ends_at, "ends_at")
        _aware(self.opens_at, "opens_at")
        if self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self


class EventUpdate(StrictInput):
    """Change an event's details; fields left out stay as they are (the slug never changes)."""

    title: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=10_000)
    venue_name: str | None = Field(default=None, max_length=200)
    venue_address: str | None = Field(default=None, max_length=500)
    latitude: float | None = Field(default=None, ge=-90, le=90)
    longitude: float | None = Field(default=None, ge=-180, le=180)
    timezone: str | None = None
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    opens_at: datetime | None = None
    max_hold_renewals: int | None = Field(default=None, ge=0, le=20)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None and value not in _ZONES:
            raise ValueError("timezone: an IANA name such as Europe/Berlin")
        return value

    @model_validator(mode="after")
    def _aware_times(self) -> EventUpdate:
        for name in _REQUIRED_ON_UPDATE:
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null (leave it out to keep it)")
        for name in ("starts_at", "ends_at", "opens_at"):
            _aware(getattr(self, name), name)
        return self


class EventOut(BaseModel):
    id: int
    slug: str
    title: str
    description: str
    venue_name: str
    venue_address: str
    latitude: float | None
    longitude: float | None
    timezone: str
    starts_at: datetime
    ends_at: datetime
    opens_at: datetime | None
    status: EventStatus
    hold_ttl_seconds: int
    max_hold_renewals: int


class StatusChange(StrictInput):
    status: EventStatus


class SlotCreate(StrictInput):
    label: str = Field(default="", max_length=200)
    starts_at: datetime
    ends_at: datetime
    capacity: int = Field(ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _window(self) -> SlotCreate:
        _aware(self.starts_at, "starts_at")
        _aware(self.ends_at, "ends_at")
        if self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self


class SlotOut(BaseModel):
    id: int
    event_id: int
    label: str
    starts_at: datetime
    ends_at: datetime
    capacity: int
    taken: int


class LaneCreate(StrictInput):
    name: str = Field(min_length=1, max_length=200)
    pickup_point: str = Field(default="", max_length=500)


class LaneOut(BaseModel):
    id: int
    event_id: int
    name: str
    pickup_point: str


class PickupWindowCreate(StrictInput):
    slot_id: int = Field(ge=1, le=2**62)
    capacity: int = Field(ge=0, le=1_000_000)


class PickupWindowOut(BaseModel):
    id: int
    lane_id: int
    slot_id: int
    capacity: int
    taken: int


class PartnerCreate(StrictInput):
    name: str = Field(min_length=1, max_length=200)
    contact_email: str = Field(default="", max_length=254)


class PartnerOut(BaseModel):
    id: int
    event_id: int
    name: str
    contact_email: str


class StaffCreate(StrictInput):
    user_id: int = Field(ge=1, le=2**62)
    gate: str = Field(default=DEFAULT_GATE, min_length=1, max_length=64)


class StaffOut(BaseModel):
    id: int
    event_id: int
    user_id: int
    gate: str
