"""The one error type: a machine-readable `reason`, a human message, an HTTP status."""

from __future__ import annotations

from typing import Any

# Status for each reason the API can give; one table so routers never choose codes.
REASON_STATUS: dict[str, int] = {
    "invalid_request": 422,
    "invalid_flow": 422,
    "malformed": 422,
    "payload_too_large": 413,
    "unauthorized": 401,
    "forbidden": 403,
    "csrf_failed": 403,
    "not_found": 404,
    "unknown": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "invalid_transition": 409,  # a status move its lifecycle table does not allow
    "not_yet_valid": 409,
    "exhausted": 409,
    "contact_limit": 409,
    "budget_exhausted": 409,
    "already_rolled_back": 409,
    "idempotency_in_progress": 409,
    "idempotency_key_reused": 422,
    "idempotency_key_foreign": 403,
    "expired": 410,
    "revoked": 410,
    "link_invalid": 400,
    "link_expired": 410,
    "rate_limited": 429,
    "already_cancelled": 409,
    "sold_out": 409,
    "insufficient_stock": 409,
    "slot_full": 409,
    "event_closed": 409,
    "not_open_yet": 409,  # before the event's opens_at
    "already_rsvped": 409,  # one active RSVP per person and slot
    "limit_per_contact": 409,
    "renewals_exhausted": 409,
    "capacity_below_taken": 409,  # an edit would leave less capacity than is taken
    "in_use": 409,  # a removal of something that is still used
    "hold_expired": 410,
    "invalid": 422,
    "wrong_event": 409,
    "already_checked_in": 409,
    "outside_window": 409,
    "cancelled": 410,
    "unavailable": 503,
    "suppressed": 409,
    "seed_test_required": 409,
}


class PopdropError(Exception):
    """Raised by services for every refusal a user can act on."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status or REASON_STATUS.get(reason, 400)
        self.headers = headers or {}
        self.detail = detail or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"reason": self.reason, "message": self.message}
        body.update(self.detail)
        return body


def not_found(what: str) -> PopdropError:
    return PopdropError("not_found", f"{what} not found")
