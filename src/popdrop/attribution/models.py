"""Tables of the attribution domain: short links, their clicks, promo codes, and the
sale-attribution ledger.

Rules the schema keeps:
- A short link never stores a secret: a `url` link keeps a plain public URL, a bearer
  target (`ticket`, `checkout`) keeps only its kind and the id of the row it points to;
  the signed link is rebuilt at redirect time.
- A click keeps no raw IP address and no user agent: only its time, channel, device class
  and the referrer's host name.
- `drop_id`, `segment_id` and `conversation_id` name rows of domains on higher floors
  (drops, chat) or of the audience; they are tags, not foreign keys, so this floor does
  not depend on those tables.
- `sale_touches` holds at most one `first` and one `last` touch per sale (unique), so
  attributing a sale twice is a no-op.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from popdrop.core.db import Base, BigId, UTCDateTime
from popdrop.core.lifecycle import status_check


class TargetKind(StrEnum):
    URL = "url"  # a plain public URL, stored as is
    EVENT = "event"  # an event's public page (target_id: the event)
    TICKET = "ticket"  # a QR ticket's page (target_id: the ticket); bearer, rebuilt
    CHECKOUT = "checkout"  # a hold's checkout link (target_id: the hold); bearer, rebuilt


BEARER_KINDS = frozenset({TargetKind.TICKET, TargetKind.CHECKOUT})


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    CHAT = "chat"
    TELEGRAM = "telegram"
    WEB = "web"
    QR = "qr"
    POSTER = "poster"
    PARTNER = "partner"
    SOCIAL = "social"
    OTHER = "other"


class DeviceClass(StrEnum):
    MOBILE = "mobile"
    TABLET = "tablet"
    DESKTOP = "desktop"
    BOT = "bot"
    OTHER = "other"


class SaleKind(StrEnum):
    ORDER = "order"  # commerce.orders
    POS_SALE = "pos_sale"  # partners' POS sales


class Touch(StrEnum):
    FIRST = "first"
    LAST = "last"


class Via(StrEnum):
    CODE = "code"
    CLICK = "click"


class PromoCode(Base):
    """An attributable, multi-use code from the vault, printed on posters and handed to
    partners. `code` is public (it is printed); the vault keeps only its keyed hash."""

    __tablename__ = "promo_codes"
    __table_args__ = (
        UniqueConstraint("org_id", "code_key"),
        Index("ix_promo_codes_batch", "batch_id"),
        status_check(Channel, "channel"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    label: Mapped[str] = mapped_column(String(200))
    # The printed code and its normalized form (the lookup key); None when the promo code
    # tags an existing batch instead of issuing a code of its own.
    code: Mapped[str | None] = mapped_column(String(40), nullable=True)
    code_key: Mapped[str | None] = mapped_column(String(32), nullable=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("voucher_batches.id"))
    voucher_id: Mapped[int | None] = mapped_column(ForeignKey("vouchers.id"), nullable=True)
    event_id: Mapped[int | None] = mapped_column(ForeignKey("events.id"), nullable=True)
    partner_id: Mapped[int | None] = mapped_column(ForeignKey("partners.id"), nullable=True)
    channel: Mapped[str | None] = mapped_column(String(16), nullable=True)
    drop_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    variant: Mapped[str | None] = mapped_column(String(32), nullable=True)
    segment_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(200))


class ShortLink(Base):
    __tablename__ = "short_links"
    __table_args__ = (
        UniqueConstraint("org_id", "reuse_key"),
        Index("ix_short_links_org", "org_id", "id"),
        status_check(TargetKind, "target_kind"),
        status_check(Channel, "channel"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    slug: Mapped[str] = mapped_column(String(32), unique=True)
    target_kind: Mapped[str] = mapped_column(String(16))
    target_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)  # kind url
    target_id: Mapped[int | None] = mapped_column(BigId, nullable=True)  # other kinds
    utm_source: Mapped[str | None] = mapped_column(String(100), nullable=True)
    utm_medium: Mapped[str | None] = mapped_column(String(100), nullable=True)
    utm_campaign: Mapped[str | None] = mapped_column(String(100), nullable=True)
    utm_content: Mapped[str | None] = mapped_column(String(100), nullable=True)
    valid_from: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    valid_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    max_clicks: Mapped[int | None] = mapped_column(Integer, nullable=True)
    fallback_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    clicks: Mapped[int] = mapped_column(Integer, default=0)
    bot_hits: Mapped[int] = mapped_column(Integer, default=0)  # filtered, not clicks
    event_id: Mapped[int | None] = mapped_column(ForeignKey("events.id"), nullable=True)
    partner_id: Mapped[int | None] = mapped_column(ForeignKey("partners.id"), nullable=True)
    drop_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    variant: Mapped[str | None] = mapped_column(String(32), nullable=True)
    segment_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    channel: Mapped[str | None] = mapped_column(String(16), nullable=True)
    conversation_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    promo_code_id: Mapped[int | None] = mapped_column(ForeignKey("promo_codes.id"), nullable=True)
    # A digest of target + tags for links made by `short_link_for` (reused, not duplicated);
    # None for links made through the API (each is its own).
    reuse_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(200))


class ShortLinkClick(Base):
    """One counted click: no IP address, no user agent."""

    __tablename__ = "short_link_clicks"
    __table_args__ = (
        Index("ix_short_link_clicks_link_at", "link_id", "at"),
        status_check(Channel, "channel"),
        status_check(DeviceClass, "device_class"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    link_id: Mapped[int] = mapped_column(ForeignKey("short_links.id"))
    click_id: Mapped[str] = mapped_column(String(32), unique=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    channel: Mapped[str | None] = mapped_column(String(16), nullable=True)
    device_class: Mapped[str] = mapped_column(String(8))
    referrer_host: Mapped[str | None] = mapped_column(String(255), nullable=True)


class SaleTouch(Base):
    """The attribution ledger: what brought a sale, first touch and last touch."""

    __tablename__ = "sale_touches"
    __table_args__ = (
        UniqueConstraint("sale_kind", "sale_id", "touch"),
        Index("ix_sale_touches_org_event", "org_id", "event_id"),
        Index("ix_sale_touches_partner", "partner_id"),
        status_check(SaleKind, "sale_kind"),
        status_check(Touch, "touch"),
        status_check(Via, "via"),
        status_check(Channel, "channel"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    sale_kind: Mapped[str] = mapped_column(String(16))
    sale_id: Mapped[int] = mapped_column(BigId)
    touch: Mapped[str] = mapped_column(String(8))
    via: Mapped[str] = mapped_column(String(8))
    touched_at: Mapped[datetime] = mapped_column(UTCDateTime)  # the click's or the sale's time
    promo_code_id: Mapped[int | None] = mapped_column(ForeignKey("promo_codes.id"), nullable=True)
    link_id: Mapped[int | None] = mapped_column(ForeignKey("short_links.id"), nullable=True)
    click_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    event_id: Mapped[int | None] = mapped_column(ForeignKey("events.id"), nullable=True)
    partner_id: Mapped[int | None] = mapped_column(ForeignKey("partners.id"), nullable=True)
    drop_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    variant: Mapped[str | None] = mapped_column(String(32), nullable=True)
    segment_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    conversation_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    channel: Mapped[str | None] = mapped_column(String(16), nullable=True)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    reversed_minor: Mapped[int] = mapped_column(BigInteger, default=0)
