"""A small pop-up, written to the funnel log event by event, whose every KPI is known.

Twelve contacts (c:1 … c:12) get a drop's message on 2026-12-05 (UTC; the event's zone is
Europe/Berlin, UTC+1 then):
- variant A: 1-6, B: 7-12; segment hot: 1-4, warm: 5-8, cold: 9-12;
  channel email: 1-7, sms: 8-12. Sent 09:00 + i-1 minutes.
- clicks (09:30+): 1, 2, 3, 4, 7, 8 (same tags as their message).
- chat starts (10:05+, channel chat): 3, 9, 10, 11.
- RSVPs (11:00+): by link 1, 2, 4, 7, 8 (their channel, variant, segment); from chat 3, 9
  (label chat, channel chat).
- visits: 1 14:10, 2 14:15, 4 14:35 (lane 1); 3 15:00, 9 15:05, 12 15:40 (lane 2).
- paid orders: 1 14:20 25.00 EUR, 2 14:40 40.00 EUR, 4 14:50 50.00 USD (lane 1),
  3 15:10 15.00 EUR (lane 2); POS sale: 9 15:20 18.00 EUR (lane 2, the partner's till).
- refunds: order 5.00 EUR (2) 16:00, POS 3.00 EUR (9) 16:05.
- samples (14:0x): 1, 2, 3 at 1.00 EUR, 4, 9 at 1.50 EUR, 12 at 2.00 EUR (the partner's).
- NPS answers (next day 10:00+): 10, 9, 9, 8, 7, 3, 6, 10.
- under another event (`event2`): 1 buys again two days later (30.00 EUR); 3 chats three
  days later and buys an hour after (20.00 EUR); 2 buys again ten days later (12.00 EUR).
A second organization logs the same event id, which no figure of the first may include.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.metrics import log
from popdrop.metrics.kinds import Kind, nps_class

DAY = datetime(2026, 12, 5, tzinfo=UTC)
NPS_SCORES = (10, 9, 9, 8, 7, 3, 6, 10)


def at(hour: int, minute: int, days: int = 0) -> datetime:
    return DAY + timedelta(days=days, hours=hour, minutes=minute)


@dataclass(frozen=True)
class Ids:
    event: int
    event2: int
    drop: int
    partner: int
    lane1: int
    lane2: int


def variant(i: int) -> str:
    return "A" if i <= 6 else "B"


def segment(i: int) -> str:
    return "hot" if i <= 4 else "warm" if i <= 8 else "cold"


def channel(i: int) -> str:
    return "email" if i <= 7 else "sms"


def entries(org_id: int, ids: Ids) -> list[log.Entry]:
    out: list[log.Entry] = []

    def add(kind: Kind, when: datetime, person: int | None, **kw: object) -> None:
        value = int(kw.pop("value", 0))  # type: ignore[call-overload]
        currency = str(kw.pop("currency", ""))
        out.append(
            log.Entry(
                org_id,
                kind,
                when,
                tags=log.Tags(**kw),  # type: ignore[arg-type]
                person=log.contact_person(person) if person is not None else None,
                value=value,
                currency=currency,
            )
        )

    def message_tags(i: int) -> dict[str, object]:
        return {
            "event_id": ids.event,
            "drop_id": ids.drop,
            "channel": channel(i),
            "variant": variant(i),
            "segment": segment(i),
        }

    for i in range(1, 13):
        add(Kind.MESSAGE_SENT, at(9, i - 1), i, **message_tags(i))
    for n, i in enumerate((1, 2, 3, 4, 7, 8)):
        add(Kind.MESSAGE_CLICKED, at(9, 30 + n), i, **message_tags(i))
    for n, i in enumerate((3, 9, 10, 11)):
        add(Kind.CHAT_STARTED, at(10, 5 + n), i, event_id=ids.event, channel="chat")
    for i, minute in ((1, 0), (2, 1), (4, 3), (7, 4), (8, 5)):
        add(Kind.RSVP, at(11, minute), i, **message_tags(i))
    for i, minute in ((3, 2), (9, 6)):
        add(Kind.RSVP, at(11, minute), i, event_id=ids.event, channel="chat", label="chat")
    visits = [(1, 14, 10, ids.lane1), (2, 14, 15, ids.lane1), (4, 14, 35, ids.lane1)]
    visits += [(3, 15, 0, ids.lane2), (9, 15, 5, ids.lane2), (12, 15, 40, ids.lane2)]
    for i, hour, minute, lane in visits:
        add(Kind.VISIT, at(hour, minute), i, event_id=ids.event, lane_id=lane)
    orders = (
        (1, 14, 20, 2500, "EUR", ids.lane1),
        (2, 14, 40, 4000, "EUR", ids.lane1),
        (4, 14, 50, 5000, "USD", ids.lane1),
        (3, 15, 10, 1500, "EUR", ids.lane2),
    )
    for i, hour, minute, value, currency, lane in orders:
        add(
            Kind.ORDER_PAID,
            at(hour, minute),
            i,
            event_id=ids.event,
            lane_id=lane,
            value=value,
            currency=currency,
        )
    till = {"event_id": ids.event, "partner_id": ids.partner}
    add(Kind.POS_SALE, at(15, 20), 9, lane_id=ids.lane2, value=1800, currency="EUR", **till)
    add(Kind.ORDER_REFUNDED, at(16, 0), 2, event_id=ids.event, value=500, currency="EUR")
    add(Kind.POS_REFUND, at(16, 5), 9, value=300, currency="EUR", **till)
    samples = ((1, 100), (2, 100), (3, 100), (4, 150), (9, 150))
    for n, (i, cost) in enumerate(samples):
        add(Kind.SAMPLE_GIVEN, at(14, n), i, event_id=ids.event, value=cost, currency="EUR")
    add(Kind.SAMPLE_GIVEN, at(14, 5), 12, value=200, currency="EUR", **till)
    for n, score in enumerate(NPS_SCORES):
        add(
            Kind.SURVEY_ANSWERED,
            at(10, n, days=1),
            n + 1,
            event_id=ids.event,
            channel="email",
            label=nps_class(score),
            value=score,
        )
    # Later, under another event: the repeat purchases.
    other = {"event_id": ids.event2}
    add(Kind.ORDER_PAID, at(12, 0, days=2), 1, value=3000, currency="EUR", **other)
    add(Kind.CHAT_STARTED, at(9, 0, days=3), 3, channel="chat", **other)
    add(Kind.ORDER_PAID, at(10, 0, days=3), 3, value=2000, currency="EUR", **other)
    add(Kind.ORDER_PAID, at(12, 0, days=10), 2, value=1200, currency="EUR", **other)
    return out


def foreign_entries(org_id: int, ids: Ids) -> list[log.Entry]:
    """Another organization's log under the same event id: never in the first's figures."""
    tags = log.Tags(event_id=ids.event, drop_id=ids.drop, channel="email", variant="A")
    rows = [
        log.Entry(org_id, Kind.MESSAGE_SENT, at(9, i), tags, person=log.contact_person(i))
        for i in range(1, 6)
    ]
    rows.append(
        log.Entry(
            org_id,
            Kind.ORDER_PAID,
            at(14, 30),
            log.Tags(event_id=ids.event),
            person=log.contact_person(1),
            value=99_00,
            currency="EUR",
        )
    )
    return rows


async def seed(session: AsyncSession, org_id: int, ids: Ids, foreign_org: int | None) -> None:
    # One event at a time through `log.record`, as the domains write them.
    for entry in entries(org_id, ids):
        await log.record(
            session,
            entry.org_id,
            entry.kind,
            at=entry.at,
            tags=entry.tags,
            person=entry.person,
            subject=entry.subject,
            value=entry.value,
            currency=entry.currency,
        )
    if foreign_org is not None:
        await log.record_many(session, foreign_entries(foreign_org, ids))
