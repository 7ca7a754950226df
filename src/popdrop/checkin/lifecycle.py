"""The life of a QR ticket, as data.

    valid ──cancel──▶ cancelled
      └────revoke──▶ revoked

Rules:
- Only a `valid` ticket checks in; re-issuing one (a new secret, `generation` + 1) keeps
  it valid. `cancelled` (the holder gave it back) and `revoked` (the operator withdrew it)
  are final; a new ticket can be issued for the same subject.

Pure: no I/O; pages and tests import it.
"""

from __future__ import annotations

from enum import StrEnum

from popdrop.core.lifecycle import Lifecycle


class TicketStatus(StrEnum):
    VALID = "valid"
    CANCELLED = "cancelled"
    REVOKED = "revoked"


TICKET_LIFECYCLE: Lifecycle[TicketStatus] = Lifecycle(
    "ticket",
    TicketStatus,
    {
        TicketStatus.VALID: frozenset({TicketStatus.CANCELLED, TicketStatus.REVOKED}),
        TicketStatus.CANCELLED: frozenset(),
        TicketStatus.REVOKED: frozenset(),
    },
)
