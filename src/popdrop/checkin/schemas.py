from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from popdrop.checkin.lifecycle import TicketStatus
from popdrop.core.schemas import StrictInput

SubjectKind = Literal["rsvp", "hold", "manual"]
ScanResult = Literal[
    "ok", "invalid", "revoked", "wrong_event", "already_checked_in", "outside_window", "cancelled"
]
Id = Field(ge=1, le=2**62)
Gate = Field(default=None, min_length=1, max_length=64)
# Nonces are client-made (a UUID, or 16+ random bytes in base64url).
Nonce = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_\-:.]+$")
# A secret is 119 characters; a little room so a wrong one is `invalid`, not a 422.
Secret = Field(
    min_length=1,
    max_length=512,
    description="The QR payload, or the ticket's short code (`K7QM-4XT2-9`: any case, dashes "
    "and spaces optional; needs `event_id`). A short code whose check character is wrong "
    "is refused with `short_code_invalid`.",
)


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("needs a time zone offset (e.g. Z)")
    return value


class TicketCreate(StrictInput):
    event_id: int = Id
    subject_kind: SubjectKind = "manual"
    subject_id: int = Id
    holder_ref: str | None = Field(default=None, min_length=1, max_length=200)


class TicketOut(BaseModel):
    id: int
    event_id: int
    subject_kind: SubjectKind
    subject_id: int
    holder_ref: str | None
    status: TicketStatus
    reissues: int
    created_at: datetime
    changed_at: datetime
    checked_in_at: datetime | None
    checked_in_gate: str | None


class IssuedTicket(BaseModel):
    ticket: TicketOut
    secret: str = Field(description="The QR payload; verifiable with the event's public key")
    short_code: str = Field(
        description="What to type when no camera reads the QR (printed under it); changes "
        "with every re-issue, like the secret"
    )
    url: str = Field(description="The holder's ticket page")
    created: bool = Field(description="False when the subject already had this ticket")


class CheckinKey(BaseModel):
    event_id: int
    algorithm: Literal["Ed25519"] = "Ed25519"
    public_key: str = Field(description="Raw 32-byte public key, base64url without padding")
    revoked: list[int] = Field(description="Ids of revoked or cancelled tickets")
    generations: dict[str, int] = Field(
        description="Ticket id -> current generation, for re-issued tickets (others are 0)"
    )
    as_of: datetime


class ScanRequest(StrictInput):
    secret: str = Secret
    nonce: str = Nonce
    gate: str | None = Gate
    event_id: int | None = Field(default=None, ge=1, le=2**62)
    scanned_at: datetime | None = None
    offline: bool = False

    _aware_scanned_at = field_validator("scanned_at")(_aware)


class ScanBatch(StrictInput):
    scans: list[ScanRequest] = Field(min_length=1, max_length=500)


class ScanAnswer(BaseModel):
    """The answer to one scan; refusals carry `reason` and `message` as every error does."""

    result: ScanResult
    reason: str | None = None
    message: str
    scan_id: int | None = None
    nonce: str
    ticket_id: int | None = None
    event_id: int | None = None
    subject_kind: SubjectKind | None = None
    subject_id: int | None = None
    holder_ref: str | None = None
    checked_in_at: datetime | None = None
    gate: str | None = None
    first_checked_in_at: datetime | None = None
    first_gate: str | None = None
    scanned_at: datetime


class BatchItem(BaseModel):
    status: int = Field(description="The HTTP status this scan alone would have had")
    body: dict[str, Any] = Field(description="A ScanAnswer, or an error for a bad scan")


class BatchAnswer(BaseModel):
    results: list[BatchItem]


class Counts(BaseModel):
    event_id: int
    checked_in: int
    expected: int
