from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from popdrop.core.schemas import StrictInput

DiscountKind = Literal["percent", "fixed", "free_item"]
Ref = Field(default=None, min_length=1, max_length=200)

# One batch, however it is issued (service, CLI, demo, bench).
MAX_QUANTITY = 1_000_000
# One API request (or form): up to JOB_THRESHOLD codes its answer carries them; above,
# a background job issues them and they come as one CSV download. 100,000 codes is the
# bulk-issue target of 10 s (docs/benchmarks.md); bigger batches go through
# `popdrop vouchers issue`, which writes them to a CSV file.
API_MAX_QUANTITY = 100_000
# A batch above this many codes is issued in the background (`vouchers.issue_jobs`): the
# request answers 202 with the job, and the codes come as a CSV download when it is done.
JOB_THRESHOLD = 5_000


class Strict(StrictInput):
    pass


class BatchCreate(Strict):
    name: str = Field(min_length=1, max_length=200)
    quantity: int = Field(ge=1, le=MAX_QUANTITY)
    max_uses: int = Field(default=1, ge=1, le=1_000_000_000)
    prefix: str | None = Field(default=None, max_length=6)
    tag: str | None = Field(default=None, min_length=1, max_length=64)
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    ttl_seconds: int | None = Field(default=None, ge=60, le=366 * 86400)
    per_contact_limit: int | None = Field(default=None, ge=1, le=1_000_000)
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")
    budget_minor: int | None = Field(default=None, ge=0, le=10**15)
    cost_per_use_minor: int = Field(default=0, ge=0, le=10**12)
    discount_kind: DiscountKind = "fixed"
    discount_value: int = Field(default=0, ge=0, le=10**12)
    discount_description: str = Field(default="", max_length=500)
    event_ref: str | None = Ref
    offer_ref: str | None = Ref

    @model_validator(mode="after")
    def _coherent(self) -> BatchCreate:
        if self.valid_from and self.valid_until and self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be after valid_from")
        for name in ("valid_from", "valid_until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} needs a time zone offset (e.g. Z)")
            if value is not None:
                try:
                    value.astimezone(UTC)  # how it is stored
                except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is in year 0 in UTC
                    raise ValueError(f"{name} is out of range (years 1 to 9999 in UTC)") from None
        if self.discount_kind == "percent" and not 1 <= self.discount_value <= 100:
            raise ValueError("a percent discount is 1 to 100")
        free_uses = self.cost_per_use_minor == 0 and (
            self.discount_kind != "fixed" or self.discount_value == 0
        )
        if self.budget_minor is not None and free_uses:
            raise ValueError("a budget needs cost_per_use_minor (what one use costs)")
        return self

    @property
    def effective_cost_minor(self) -> int:
        if self.cost_per_use_minor:
            return self.cost_per_use_minor
        return self.discount_value if self.discount_kind == "fixed" else 0


class BatchIssueRequest(BatchCreate):
    """The body of `POST /api/v1/voucher-batches`: a batch of at most API_MAX_QUANTITY codes."""

    quantity: int = Field(
        ge=1,
        json_schema_extra={"maximum": API_MAX_QUANTITY},  # enforced below, with a pointer
        description=(
            f"How many codes, at most {API_MAX_QUANTITY:,} per request "
            "(`popdrop vouchers issue` issues bigger batches). "
            f"Above {JOB_THRESHOLD:,} the answer is 202 with a background job; "
            "its codes come as one CSV download."
        ),
    )

    @field_validator("quantity")
    @classmethod
    def _api_quantity(cls, value: int) -> int:
        if value > API_MAX_QUANTITY:
            raise PydanticCustomError(
                "too_many_codes",
                "at most {limit} codes per API request; "
                "issue bigger batches with `popdrop vouchers issue`",
                {"limit": f"{API_MAX_QUANTITY:,}"},
            )
        return value


class Discount(BaseModel):
    kind: DiscountKind
    value: int
    currency: str
    description: str


class BatchOut(BaseModel):
    id: int
    name: str
    tag: str | None
    prefix: str
    quantity: int
    max_uses: int
    valid_from: datetime | None
    valid_until: datetime | None
    ttl_seconds: int | None
    per_contact_limit: int | None
    currency: str
    budget_minor: int | None
    budget_spent_minor: int
    cost_per_use_minor: int
    discount: Discount
    event_ref: str | None
    offer_ref: str | None
    created_at: datetime
    revoked_at: datetime | None


class BatchStats(BaseModel):
    issued: int
    uses: int
    fully_used: int
    revoked: int
    redemptions: int
    rolled_back: int


class BatchDetail(BatchOut):
    stats: BatchStats


class IssuedBatch(BaseModel):
    batch: BatchOut
    codes: list[str] = Field(description="Plaintext codes: shown this once, never stored.")
    links: list[str] | None = None


class RedeemRequest(Strict):
    code: str = Field(min_length=1, max_length=64)
    contact_ref: str | None = Ref
    order_ref: str | None = Ref


class ValidateRequest(Strict):
    code: str = Field(min_length=1, max_length=64)
    contact_ref: str | None = Ref


class RedemptionOut(BaseModel):
    id: int
    voucher_id: int
    batch_id: int
    contact_ref: str | None
    order_ref: str | None
    cost_minor: int
    redeemed_at: datetime
    rolled_back_at: datetime | None = None
    rollback_reason: str | None = None


class RedeemResult(BaseModel):
    redemption: RedemptionOut
    uses: int
    max_uses: int
    remaining_uses: int
    discount: Discount


class VoucherOut(BaseModel):
    id: int
    batch_id: int
    batch_name: str
    status: Literal["valid", "not_yet_valid", "expired", "revoked", "exhausted"]
    uses: int
    max_uses: int
    valid_from: datetime | None
    valid_until: datetime | None
    issued_at: datetime
    revoked_at: datetime | None
    revoke_reason: str | None
    discount: Discount


class RollbackRequest(Strict):
    reason: str = Field(min_length=1, max_length=200)


class RevokeRequest(Strict):
    reason: str = Field(default="revoked by operator", min_length=1, max_length=200)


class RevokeCodeRequest(RevokeRequest):
    code: str = Field(min_length=1, max_length=64)


class RevokeTagRequest(RevokeRequest):
    tag: str = Field(min_length=1, max_length=64)


class RevokeResult(BaseModel):
    revoked: int


class LinkRequest(Strict):
    code: str = Field(min_length=1, max_length=64)
    ttl_seconds: int = Field(default=8 * 3600, ge=60, le=90 * 86400)


class LinkOut(BaseModel):
    url: str
    expires_at: datetime


class IssueJobOut(BaseModel):
    id: int
    batch_id: int
    status: Literal["queued", "running", "done", "failed"]
    total: int = Field(description="Codes the batch will have.")
    issued: int = Field(description="Codes issued so far (committed).")
    with_links: bool = Field(description="The CSV carries a signed claim link per code.")
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    downloaded_at: datetime | None
    codes_available: bool = Field(
        description="The CSV of plaintext codes can be downloaded (once, until download_until)."
    )
    download_until: datetime | None
    progress_url: str
    download_url: str


class IssueJobAccepted(BaseModel):
    batch: BatchOut
    job: IssueJobOut
