"""Bulk-load a realistic funnel log into `funnel_events` for the metrics bench.

The rows are made inside PostgreSQL (`INSERT … SELECT … FROM generate_series`, one
statement per chunk), so 10M rows take minutes, not an hour of Python. The shape:
- orgs of skewed size (the first few hold most events), each with `EVENTS_PER_ORG`
  events, `DROPS_PER_EVENT` drops per event, `PARTNERS_PER_ORG` partners and
  `LANES_PER_EVENT` pickup lanes; ids are tags, not rows (the log has no foreign keys);
- kinds in funnel proportions (sends ≫ clicks ≫ RSVPs ≫ visits ≫ purchases);
- messages and chat within hours of their drop's send (most in the first minutes),
  visits, sales and samples during the event, Day+1 survey answers the next day;
- channels, A/B variants, hot/warm/cold segments, bounce / payment-failure / NPS labels,
  money values in EUR cents, NPS scores 0-10, repeat persons (`c:<id>`, some keyed).
Random draws come from PostgreSQL's `random()` after `setseed`, so a run is repeatable.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

EVENTS_PER_ORG = 6
DROPS_PER_EVENT = 3
PARTNERS_PER_ORG = 5
LANES_PER_EVENT = 3
DAYS = 60

# (kind, weight): the share of the log each kind holds.
KIND_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("message_sent", 30.0),
    ("message_delivered", 27.5),
    ("message_bounced", 1.2),
    ("message_complained", 0.05),
    ("message_clicked", 8.0),
    ("chat_started", 5.0),
    ("card_viewed", 6.0),
    ("rsvp", 4.0),
    ("hold", 2.0),
    ("checkout_started", 2.0),
    ("visit", 3.0),
    ("order_paid", 1.5),
    ("order_refunded", 0.1),
    ("order_picked_up", 1.2),
    ("payment_failed", 0.25),
    ("pos_sale", 2.5),
    ("pos_refund", 0.05),
    ("sample_given", 1.0),
    ("survey_sent", 1.5),
    ("survey_answered", 0.6),
)
MESSAGE_KINDS = ("message_sent", "message_delivered", "message_bounced", "message_complained",
                 "message_clicked")  # fmt: skip
CHAT_KINDS = ("chat_started", "card_viewed", "rsvp", "hold", "checkout_started")
MONEY_KINDS = ("order_paid", "order_refunded", "pos_sale", "pos_refund", "sample_given")


@dataclass(frozen=True)
class Plan:
    """Where the generated events live: ids and times the queries sample scopes from."""

    org_ids: list[int]
    start: datetime  # the first day of the log (UTC midnight)
    events: list[tuple[int, int, datetime]]  # (org_id, event_id, starts_at)
    drops: list[tuple[int, int, int, datetime]]  # (org_id, event_id, drop_id, sent_at)
    partners: list[tuple[int, int]]  # (org_id, partner_id)


def plan(org_ids: list[int], now: datetime) -> Plan:
    start = (now - timedelta(days=DAYS)).replace(hour=0, minute=0, second=0, microsecond=0)
    events: list[tuple[int, int, datetime]] = []
    drops: list[tuple[int, int, int, datetime]] = []
    partners: list[tuple[int, int]] = []
    for org_n, org_id in enumerate(org_ids):
        partners += [(org_id, org_n * PARTNERS_PER_ORG + p + 1) for p in range(PARTNERS_PER_ORG)]
        for ev_n in range(EVENTS_PER_ORG):
            event_id = org_n * EVENTS_PER_ORG + ev_n + 1
            # Events on days 8..57, at 17:00 UTC; drops 6, 4 and 2 days before, mornings.
            day = 8 + (event_id * 7919) % (DAYS - 10)
            starts_at = start + timedelta(days=day, hours=17)
            events.append((org_id, event_id, starts_at))
            for drop_n in range(DROPS_PER_EVENT):
                drop_id = (event_id - 1) * DROPS_PER_EVENT + drop_n + 1
                sent_at = starts_at - timedelta(days=2 * (DROPS_PER_EVENT - drop_n), hours=7)
                sent_at += timedelta(minutes=(drop_id * 37) % 120)
                drops.append((org_id, event_id, drop_id, sent_at))
    return Plan(org_ids, start, events, drops, partners)


def _pick(column: str, weighted: tuple[tuple[str, float], ...]) -> str:
    """A CASE choosing a value by cumulative weight from a uniform `column` in [0, 1)."""
    total = sum(w for _, w in weighted)
    parts, acc = [], 0.0
    for value, weight in weighted[:-1]:
        acc += weight / total
        parts.append(f"WHEN {column} < {acc:.6f} THEN '{value}'")
    return f"CASE {' '.join(parts)} ELSE '{weighted[-1][0]}' END"


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


# One chunk: ids $1..$2; $3 the log's end (times are clamped before it).
# `g` draws the randoms, `k` picks org, event, drop and kind, `t` joins the plan.
CHUNK_SQL = f"""
INSERT INTO funnel_events (org_id, at, kind, channel, event_id, drop_id, variant, segment,
    partner_id, lane_id, label, person, subject, value, currency, rolled)
SELECT org_id, at, kind, channel, event_id, drop_id_tag, variant, segment, partner_id, lane_id,
    CASE kind
        WHEN 'message_bounced' THEN
            CASE WHEN r5 < 0.5 THEN 'hard' WHEN r5 < 0.8 THEN 'soft'
                 WHEN r5 < 0.95 THEN 'undelivered' ELSE 'failed' END
        WHEN 'payment_failed' THEN
            CASE WHEN r5 < 0.6 THEN 'card_declined' WHEN r5 < 0.85 THEN 'insufficient_funds'
                 ELSE 'expired_card' END
        WHEN 'survey_answered' THEN
            CASE WHEN value >= 9 THEN 'promoter' WHEN value >= 7 THEN 'passive'
                 ELSE 'detractor' END
        ELSE '' END,
    person, subject, value,
    CASE WHEN {_in("kind", MONEY_KINDS)} THEN 'EUR' ELSE '' END,
    true
FROM (
    SELECT t.*,
        LEAST($3::timestamptz - interval '1 second', CASE
            WHEN kind = 'message_sent' THEN sent_at + r1 * interval '20 minutes'
            WHEN kind IN ('message_delivered', 'message_bounced') THEN
                sent_at + r1 * interval '20 minutes' - ln(1 - r2) * interval '1 minute'
            WHEN kind = 'message_complained' THEN sent_at - ln(1 - r2) * interval '3 hours'
            WHEN kind = 'message_clicked' THEN sent_at - ln(1 - r2) * interval '90 minutes'
            WHEN {_in("kind", CHAT_KINDS)} THEN sent_at - ln(1 - r2) * interval '8 hours'
            WHEN kind IN ('order_paid', 'payment_failed') AND r9 < 0.5 THEN
                sent_at - ln(1 - r2) * interval '12 hours'
            WHEN kind = 'survey_sent' THEN
                starts_at + interval '20 hours' + r1 * interval '30 minutes'
            WHEN kind = 'survey_answered' THEN
                starts_at + interval '20 hours' - ln(1 - r2) * interval '2 hours'
            WHEN kind = 'order_refunded' THEN starts_at + r1 * interval '3 days'
            ELSE starts_at + r1 * interval '5 hours'
        END) AS at,
        CASE
            WHEN {_in("kind", MESSAGE_KINDS)} THEN
                CASE WHEN r3 < 0.6 THEN 'email' WHEN r3 < 0.9 THEN 'sms'
                     WHEN r3 < 0.97 THEN 'chat' ELSE 'telegram' END
            WHEN {_in("kind", CHAT_KINDS)} THEN CASE WHEN r3 < 0.8 THEN 'chat' ELSE 'telegram' END
            WHEN kind IN ('survey_sent', 'survey_answered') THEN
                CASE WHEN r3 < 0.5 THEN 'email' WHEN r3 < 0.8 THEN 'chat' ELSE 'sms' END
            ELSE '' END AS channel,
        CASE WHEN {_in("kind", MESSAGE_KINDS + CHAT_KINDS)}
                  OR (kind IN ('order_paid', 'payment_failed') AND r9 < 0.5)
             THEN drop_id END AS drop_id_tag,
        CASE WHEN {_in("kind", MESSAGE_KINDS + CHAT_KINDS)}
             THEN CASE WHEN r4 < 0.5 THEN 'A' ELSE 'B' END ELSE '' END AS variant,
        CASE WHEN kind IN ('pos_sale', 'pos_refund', 'sample_given') THEN ''
             WHEN r5 < 0.2 THEN 'hot' WHEN r5 < 0.55 THEN 'warm' ELSE 'cold' END AS segment,
        CASE WHEN (kind = 'visit' AND r6 < 0.3)
                  OR (kind IN ('pos_sale', 'pos_refund') AND r6 < 0.6)
                  OR (kind = 'sample_given' AND r6 < 0.9)
                  OR (kind = 'order_paid' AND r6 < 0.2)
             THEN first_partner + floor(r7 * {PARTNERS_PER_ORG})::bigint END AS partner_id,
        CASE WHEN kind IN ('order_paid', 'order_refunded', 'order_picked_up')
             THEN (event_id - 1) * {LANES_PER_EVENT} + 1 + floor(r7 * {LANES_PER_EVENT})::bigint
             END AS lane_id,
        CASE WHEN kind IN ('pos_sale', 'pos_refund') AND r8 < 0.5 THEN NULL
             WHEN kind IN ('pos_sale', 'pos_refund') THEN 'k:' || left(md5(person_n::text), 20)
             ELSE 'c:' || person_n END AS person,
        CASE WHEN {_in("kind", MESSAGE_KINDS)} THEN 'send:' || i
             WHEN kind LIKE 'order%' THEN 'order:' || i END AS subject,
        CASE kind
            WHEN 'order_paid' THEN 800 + floor(r8 * r8 * 15000)::bigint
            WHEN 'order_refunded' THEN 800 + floor(r8 * 5000)::bigint
            WHEN 'pos_sale' THEN 300 + floor(r8 * 6000)::bigint
            WHEN 'pos_refund' THEN 300 + floor(r8 * 2000)::bigint
            WHEN 'sample_given' THEN 50 + floor(r8 * 250)::bigint
            WHEN 'survey_answered' THEN LEAST(10, floor(11 * power(r8, 0.45)))::bigint
            ELSE 0 END AS value
    FROM (
        SELECT g.*, p.org_id, p.event_id, p.drop_id, p.starts_at, p.sent_at, p.first_partner,
            {_pick("r_kind", KIND_WEIGHTS)} AS kind,
            -- persons repeat: a few regulars, a long tail of one-timers
            p.org_n * 1000000 + floor(power(r0, 2.0) * 40000)::bigint AS person_n
        FROM (
            SELECT i, floor(power(random(), 1.8) * $4::int)::int AS org_n,
                floor(random() * {EVENTS_PER_ORG})::int AS ev_n,
                floor(random() * {DROPS_PER_EVENT})::int AS drop_n,
                random() AS r_kind, random() AS r0, random() AS r1, random() AS r2,
                random() AS r3, random() AS r4, random() AS r5, random() AS r6,
                random() AS r7, random() AS r8, random() AS r9
            FROM generate_series($1::bigint, $2::bigint) AS i
        ) AS g
        JOIN bench_plan AS p USING (org_n, ev_n, drop_n)
    ) AS t
) AS e
"""


async def create_plan_table(conn: asyncpg.Connection, p: Plan) -> None:
    await conn.execute(
        "CREATE TEMP TABLE bench_plan (org_n int, ev_n int, drop_n int, org_id bigint, "
        "event_id bigint, drop_id bigint, starts_at timestamptz, sent_at timestamptz, "
        "first_partner bigint, PRIMARY KEY (org_n, ev_n, drop_n))"
    )
    starts = {event_id: starts_at for _, event_id, starts_at in p.events}
    index = {org_id: n for n, org_id in enumerate(p.org_ids)}
    rows = []
    for org_id, event_id, drop_id, sent_at in p.drops:
        org_n = index[org_id]
        ev_n = (event_id - 1) % EVENTS_PER_ORG
        drop_n = (drop_id - 1) % DROPS_PER_EVENT
        first_partner = org_n * PARTNERS_PER_ORG + 1
        rows.append(
            (org_n, ev_n, drop_n, org_id, event_id, drop_id, starts[event_id], sent_at,
             first_partner)
        )  # fmt: skip
    await conn.copy_records_to_table("bench_plan", records=rows)
