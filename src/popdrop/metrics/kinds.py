"""What the funnel log records: its kinds, channels and segments, named once."""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    # Messages (drops, receipts, surveys): `channel` email / sms / chat / telegram.
    MESSAGE_SENT = "message_sent"
    MESSAGE_DELIVERED = "message_delivered"
    MESSAGE_BOUNCED = "message_bounced"  # label: hard / soft / undelivered / failed
    MESSAGE_COMPLAINED = "message_complained"
    MESSAGE_CLICKED = "message_clicked"
    # Chat.
    CHAT_STARTED = "chat_started"
    CARD_VIEWED = "card_viewed"
    # The path to a visit and a sale.
    RSVP = "rsvp"
    HOLD = "hold"
    CHECKOUT_STARTED = "checkout_started"
    VISIT = "visit"  # a check-in
    ORDER_PAID = "order_paid"  # value: the amount paid
    ORDER_REFUNDED = "order_refunded"  # value: the amount refunded
    ORDER_PICKED_UP = "order_picked_up"
    PAYMENT_FAILED = "payment_failed"  # label: the provider's code
    POS_SALE = "pos_sale"  # value: the sale's net amount
    POS_REFUND = "pos_refund"  # value: the amount refunded
    SAMPLE_GIVEN = "sample_given"  # value: the sample's unit cost
    SURVEY_SENT = "survey_sent"
    SURVEY_ANSWERED = "survey_answered"  # value: the score 0-10; label: its NPS class


class Segment(StrEnum):
    """A contact's recency when the event happened (the audience's hot / warm / cold)."""

    HOT = "hot"
    WARM = "warm"
    COLD = "cold"


PURCHASE_KINDS = frozenset({Kind.ORDER_PAID, Kind.POS_SALE})
REFUND_KINDS = frozenset({Kind.ORDER_REFUNDED, Kind.POS_REFUND})


def nps_class(score: int) -> str:
    """Promoters answer 9-10, passives 7-8, detractors 0-6."""
    if score >= 9:
        return "promoter"
    if score >= 7:
        return "passive"
    return "detractor"
