"""Which events a person works at: the list a volunteer's or a partner's home page shows.

Rules:
- A volunteer (any user) works at the events they are on the staff of
  (`staff_assignments`, one row per event with its gate).
- A partner user works at the events whose partner row names their login email as its
  contact (`partners.contact_email`, compared without case). That is the link between a
  partner's login and the partner of an event: no extra table, and the host sets it where
  they add the partner. A partner put on the staff sees that event too.
- Only the caller's organization: every query carries `org_id`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.models import User
from popdrop.accounts.service import Principal
from popdrop.events.models import Event, Partner, StaffAssignment


@dataclass
class WorkedEvent:
    event: Event
    gates: list[str] = field(default_factory=list)  # where they are on the staff
    partner_names: list[str] = field(default_factory=list)  # as which partner
    partner_ids: list[int] = field(default_factory=list)  # the same partners' ids


async def events_of_user(
    session: AsyncSession, principal: Principal, user_id: int
) -> list[WorkedEvent]:
    """The events `user_id` staffs or partners, by start time (the user must be of the
    caller's organization, else nothing)."""
    user = await session.scalar(
        select(User).where(User.id == user_id, User.org_id == principal.org_id)
    )
    if user is None:
        return []
    found: dict[int, WorkedEvent] = {}
    staffed = await session.execute(
        select(Event, StaffAssignment.gate)
        .join(StaffAssignment, StaffAssignment.event_id == Event.id)
        .where(StaffAssignment.user_id == user.id, StaffAssignment.org_id == principal.org_id)
    )
    for event, gate in staffed.tuples():
        found.setdefault(event.id, WorkedEvent(event)).gates.append(gate)
    partnered = await session.execute(
        select(Event, Partner.name, Partner.id)
        .join(Partner, Partner.event_id == Event.id)
        .where(
            Partner.org_id == principal.org_id,
            func.lower(Partner.contact_email) == user.email.lower(),
        )
    )
    for event, name, partner_id in partnered.tuples():
        worked = found.setdefault(event.id, WorkedEvent(event))
        worked.partner_names.append(name)
        worked.partner_ids.append(partner_id)
    return sorted(found.values(), key=lambda w: (w.event.starts_at, w.event.id))
