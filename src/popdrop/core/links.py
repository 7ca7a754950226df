"""Every bearer link and every signer purpose, in one file for a security review.

Whoever holds one of these tokens can act without logging in, so each is listed here
with what it grants, how long it lives and what it carries:

purpose           shape        lives                      carries / URL
session           timed JSON   session_max_age (checked)  user, version / cookie
csrf              timed JSON   bound to the session       nonce, binding / form + cookie
voucher-link      timed JSON   its own expiry `e`         code / /v/{token}
rsvp-cancel       timed JSON   forever                    rsvp, org / API answer
waitlist-offer    timed JSON   the offer's deadline (DB)  event, code / /w/{token}
ical-feed         timed JSON   forever                    org / /ical/{token}.ics
provider-webhook  timed JSON   forever                    org / /api/v1/feedback|sms/…
chat-checkout     timed JSON   forever (hold expires)     hold, org / /checkout/{token}
order-view        timed JSON   forever                    order, org / /orders/view/{token}
chat-visitor      text         forever                    org, visitor / widget storage
consent-confirm   timed JSON   7 days                     org, contact, channel / /c/{token}
preferences       text (+JSON) forever                    org, contact / /u/{t}, /p/{t}
drop-click        text (+JSON) forever                    drop, send row, URL / /r/{token}
drop-recipient    MAC suffix   forever                    send row / /s/{slug}/{recipient}
survey            timed JSON   forever (answered once)    invitation, org / /q/{token}
partner-report    timed JSON   its own expiry `e`         org, event, partner / /reports/{token}

("+JSON": tokens of the older JSON shape, in mail already sent, are still read.)

Two purposes are MAC keys, not tokens: `csrf-binding` (what a CSRF token is bound to)
and `voucher-derived` (per-recipient codes). QR ticket secrets (`/t/{secret}`) are not
made with this signer: each event has its own Ed25519 key (`checkin.tickets`), so a
scanner can check them offline; only their URL is built here.

Rules: a purpose's string is part of every token ever sent (it salts the signature), so
it never changes. Readers raise `PopdropError("link_invalid", …)` for a bad or foreign
token (`link_expired` for an expired timed one), except the cookie/form readers, which
answer None. Every absolute URL starts from `root(base_url)`.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote

from popdrop.core.errors import PopdropError
from popdrop.core.signing import Signer


class Purpose(StrEnum):
    """Every purpose the signer is used for. The values salt live tokens: never change one."""

    SESSION = "session"
    CSRF = "csrf"
    CSRF_BINDING = "csrf-binding"  # MAC key
    VOUCHER_LINK = "voucher-link"
    VOUCHER_DERIVED = "voucher-derived"  # MAC key
    RSVP_CANCEL = "rsvp-cancel"
    WAITLIST_OFFER = "waitlist-offer"
    ICAL_FEED = "ical-feed"
    PROVIDER_WEBHOOK = "provider-webhook"
    CHAT_CHECKOUT = "chat-checkout"
    ORDER_VIEW = "order-view"
    CHAT_VISITOR = "chat-visitor"
    CONSENT_CONFIRM = "consent-confirm"
    PREFERENCES = "preferences"
    DROP_CLICK = "drop-click"
    DROP_RECIPIENT = "drop-recipient"  # MAC key
    SURVEY = "survey"
    PARTNER_REPORT = "partner-report"


CONSENT_CONFIRM_MAX_AGE = 7 * 24 * 3600  # a double opt-in confirmation link lives a week


def _invalid(message: str = "this link is not valid") -> PopdropError:
    return PopdropError("link_invalid", message)


def _id_and(payload: Any, id_key: str, other_key: str, other_type: type) -> tuple[int, Any]:
    """(payload[id_key], payload[other_key]) of a JSON token: an int id and a value of
    `other_type`; anything else (an older or foreign shape) is `link_invalid`."""
    if not isinstance(payload, dict):
        raise _invalid()
    first, second = payload.get(id_key), payload.get(other_key)
    if not isinstance(first, int) or not isinstance(second, other_type):
        raise _invalid()
    return first, second


# ---------------------------------------------------------------- URLs


def root(base_url: str) -> str:
    """The public base URL without a trailing slash: every absolute URL starts here."""
    return base_url.rstrip("/")


def absolute(base_url: str, path: str) -> str:
    """`path` (starting with "/") on the public base URL."""
    return root(base_url) + path


def login_url(base_url: str) -> str:
    return absolute(base_url, "/login")


def event_url(base_url: str, event_id: int, *, code: str | None = None) -> str:
    """An event's public page; `code` pre-fills a voucher code there."""
    url = absolute(base_url, f"/e/{event_id}")
    return f"{url}?code={quote(code, safe='')}" if code is not None else url


def chat_url(base_url: str, org_slug: str) -> str:
    """The public web chat of an organization."""
    return absolute(base_url, f"/chat/{org_slug}")


def ticket_url(base_url: str, secret: str) -> str:
    """A QR ticket's page. The secret is made by `checkin.tickets` (per-event key)."""
    return absolute(base_url, f"/t/{secret}")


# ---------------------------------------------------------------- session and CSRF


def session_token(signer: Signer, user_id: int, session_version: int) -> str:
    # "s" tells apart two sessions of one user started in the same second (the signature's
    # timestamp has one-second resolution), so each has its own CSRF binding.
    claims = {"u": user_id, "v": session_version, "s": secrets.token_urlsafe(12)}
    return signer.sign(Purpose.SESSION, claims)


def read_session(signer: Signer, token: str, max_age: int) -> tuple[int, int] | None:
    """(user id, session version) of a validly signed, unexpired session cookie, else None."""
    try:
        data = signer.unsign(Purpose.SESSION, token, max_age=max_age)
        # Cookies from before session versions count as version 0 (the column's default).
        return int(data["u"]), int(data.get("v", 0))
    except (PopdropError, KeyError, TypeError, ValueError):
        return None


def session_binding(signer: Signer, session_cookie: str) -> str:
    """What a CSRF token is bound to: the session cookie as sent (or "anonymous")."""
    if not session_cookie:
        return "anonymous"
    return signer.mac(Purpose.CSRF_BINDING, session_cookie).hex()[:32]


def csrf_token(signer: Signer, binding: str) -> str:
    return signer.sign(Purpose.CSRF, {"n": secrets.token_urlsafe(16), "s": binding})


def read_csrf_binding(signer: Signer, token: str) -> str | None:
    """The binding a CSRF token was made for, else None. Tokens from before the binding
    were plain strings: never bound, never accepted."""
    try:
        data = signer.unsign(Purpose.CSRF, token)
    except PopdropError:
        return None
    if isinstance(data, dict) and isinstance(data.get("s"), str):
        return str(data["s"])
    return None


# ---------------------------------------------------------------- vouchers


@dataclass(frozen=True)
class VoucherLink:
    code: str  # as signed (normalized by the maker); normalize again before use
    expires_at: datetime


def voucher_link_token(signer: Signer, code: str, expires_at: datetime) -> str:
    """A claim link token for a normalized code; the expiry is carried inside it."""
    return signer.sign(Purpose.VOUCHER_LINK, {"c": code, "e": int(expires_at.timestamp())})


def read_voucher_link(signer: Signer, token: str) -> VoucherLink:
    """The code and expiry of a claim link token (expiry not checked here), or `link_invalid`."""
    payload = signer.unsign(Purpose.VOUCHER_LINK, token)
    if not isinstance(payload, dict) or not isinstance(payload.get("c"), str):
        raise _invalid()
    return VoucherLink(payload["c"], datetime.fromtimestamp(int(payload.get("e", 0)), UTC))


def voucher_link_url(base_url: str, token: str) -> str:
    return absolute(base_url, f"/v/{token}")


def derived_code_mac(signer: Signer, batch_id: int, subject: str) -> bytes:
    """The MAC a per-recipient code is derived from (same batch and subject, same code)."""
    return signer.mac(Purpose.VOUCHER_DERIVED, f"{batch_id}:{subject}")


# ---------------------------------------------------------------- RSVP


def rsvp_cancel_token(signer: Signer, rsvp_id: int, org_id: int) -> str:
    return signer.sign(Purpose.RSVP_CANCEL, {"r": rsvp_id, "o": org_id})


def read_rsvp_cancel(signer: Signer, token: str) -> tuple[int, int]:
    """(rsvp id, org id) of a cancel token, or `link_invalid`. Needs no database."""
    return _id_and(signer.unsign(Purpose.RSVP_CANCEL, token), "r", "o", int)


def waitlist_offer_url(signer: Signer, base_url: str, event_id: int, code: str) -> str:
    """A waiting-list offer's claim link. It carries the voucher code (the link is the
    code, as a claim link is) and does not expire by itself: the offer's own deadline,
    kept in the database, decides, so message, page and API never disagree."""
    token = signer.sign(Purpose.WAITLIST_OFFER, {"e": event_id, "c": code})
    return absolute(base_url, f"/w/{token}")


def read_waitlist_offer(signer: Signer, token: str) -> tuple[int, str]:
    """(event id, voucher code) of an offer link, or `link_invalid`. Needs no database."""
    return _id_and(signer.unsign(Purpose.WAITLIST_OFFER, token), "e", "c", str)


# ---------------------------------------------------------------- calendar feed


def ical_url(signer: Signer, base_url: str, org_id: int) -> str:
    """A secret calendar URL for an organization's events (calendar apps send no tokens)."""
    return absolute(base_url, f"/ical/{signer.sign(Purpose.ICAL_FEED, org_id)}.ics")


def read_ical(signer: Signer, token: str) -> int:
    """The organization of a calendar feed token, or `link_invalid`."""
    org_id = signer.unsign(Purpose.ICAL_FEED, token)
    if not isinstance(org_id, int):
        raise _invalid("this calendar link is not valid")
    return org_id


# ---------------------------------------------------------------- provider webhooks


def webhook_token(signer: Signer, org_id: int) -> str:
    return signer.sign(Purpose.PROVIDER_WEBHOOK, {"o": org_id})


def read_webhook(signer: Signer, token: str) -> int:
    """The organization a provider webhook URL belongs to, or `link_invalid`."""
    payload: Any = signer.unsign(Purpose.PROVIDER_WEBHOOK, token)
    if not isinstance(payload, dict) or not isinstance(payload.get("o"), int):
        raise _invalid("this webhook URL is not valid")
    return int(payload["o"])


def webhook_urls(
    signer: Signer, base_url: str, org_id: int, feedback_providers: tuple[str, ...]
) -> dict[str, str]:
    """Where each provider posts delivery feedback, and Twilio its inbound SMS and status."""
    token = webhook_token(signer, org_id)
    urls = {p: absolute(base_url, f"/api/v1/feedback/{p}/{token}") for p in feedback_providers}
    urls["twilio_inbound"] = absolute(base_url, f"/api/v1/sms/{token}/inbound")
    urls["twilio_status"] = absolute(base_url, f"/api/v1/sms/{token}/status")
    return urls


# ---------------------------------------------------------------- chat


def checkout_url(signer: Signer, base_url: str, hold_id: int, org_id: int) -> str:
    """The checkout link a chat hands out for a hold (the hold's own expiry still rules)."""
    token = signer.sign(Purpose.CHAT_CHECKOUT, {"h": hold_id, "o": org_id})
    return absolute(base_url, f"/checkout/{token}")


def read_checkout(signer: Signer, token: str) -> tuple[int, int]:
    """(hold id, org id) of a checkout token, or `link_invalid`."""
    return _id_and(signer.unsign(Purpose.CHAT_CHECKOUT, token), "h", "o", int)


def order_view_url(signer: Signer, base_url: str, order_id: int, org_id: int) -> str:
    """An order's confirmation page (lines, pickup QR, lane and window), sent with the
    receipt. It shows the order as it is now, so it never needs to expire."""
    token = signer.sign(Purpose.ORDER_VIEW, {"r": order_id, "o": org_id})
    return absolute(base_url, f"/orders/view/{token}")


def read_order_view(signer: Signer, token: str) -> tuple[int, int]:
    """(order id, org id) of a confirmation page token, or `link_invalid`."""
    return _id_and(signer.unsign(Purpose.ORDER_VIEW, token), "r", "o", int)


def visitor_token(signer: Signer, org_id: int, visitor: str) -> str:
    """The web chat's proof that a browser is `visitor` of this organization."""
    return signer.sign_text(Purpose.CHAT_VISITOR, f"{org_id}:{visitor}")


def read_visitor(signer: Signer, org_id: int, token: str) -> str | None:
    """The visitor id of a genuine token of this organization, else None."""
    if not token or len(token) > 300:
        return None
    try:
        text = signer.unsign_text(Purpose.CHAT_VISITOR, token)
    except PopdropError:
        return None
    owner, _, visitor = text.partition(":")
    if owner != str(org_id) or not visitor:
        return None
    return visitor


# ---------------------------------------------------------------- audience


@dataclass(frozen=True)
class ContactRef:
    """Which contact a link names; the org is checked against the row by the reader's caller."""

    org_id: Any  # an int in every token we make; compared in SQL, never trusted alone
    contact_id: int


def consent_confirm_url(
    signer: Signer, base_url: str, org_id: int, contact_id: int, channel: str
) -> str:
    """A double opt-in confirmation link (lives `CONSENT_CONFIRM_MAX_AGE`)."""
    token = signer.sign(Purpose.CONSENT_CONFIRM, {"o": org_id, "c": contact_id, "ch": channel})
    return absolute(base_url, f"/c/{token}")


def read_consent_confirm(signer: Signer, token: str) -> tuple[ContactRef, Any]:
    """(contact, channel as signed) of a confirmation link; `link_expired` after a week."""
    payload: Any = signer.unsign(Purpose.CONSENT_CONFIRM, token, max_age=CONSENT_CONFIRM_MAX_AGE)
    return _contact_ref(payload), payload.get("ch")


def preferences_token(signer: Signer, org_id: int, contact_id: int) -> str:
    """A non-expiring token naming one contact: the one-click unsubscribe URL and the
    preferences page both take it (an unsubscribe link must work months later)."""
    return signer.sign_text(Purpose.PREFERENCES, f"{org_id}:{contact_id}")


def unsubscribe_url(signer: Signer, base_url: str, org_id: int, contact_id: int) -> str:
    return absolute(base_url, f"/u/{preferences_token(signer, org_id, contact_id)}")


def read_preferences(signer: Signer, token: str) -> ContactRef:
    """The contact a preferences/unsubscribe token names, or `link_invalid`."""
    payload: Any
    try:
        org, _sep, contact = signer.unsign_text(Purpose.PREFERENCES, token).partition(":")
        payload = {"o": int(org), "c": int(contact)}
    except (PopdropError, ValueError):
        # Links in mail sent before the short token still work.
        payload = signer.unsign(Purpose.PREFERENCES, token)
    return _contact_ref(payload)


def _contact_ref(payload: Any) -> ContactRef:
    if not isinstance(payload, dict) or not isinstance(payload.get("c"), int):
        raise _invalid()
    return ContactRef(payload.get("o"), payload["c"])


# ---------------------------------------------------------------- drop click tracking


# The query parameter a short-link redirect hands the landing page its click id in.
CLICK_PARAM = "pd_click"


def click_prefix(base_url: str) -> str:
    """Tracked links are this prefix plus a `click_token`."""
    return absolute(base_url, "/r/")


def click_token(signer: Signer, drop_id: int, send_row_id: int | None, destination: str) -> str:
    row = "" if send_row_id is None else send_row_id
    return signer.sign_text(Purpose.DROP_CLICK, f"{drop_id}:{row}:{destination}")


def read_click(signer: Signer, token: str) -> tuple[int, int | None, str]:
    """(drop id, send row id, destination) of a tracking token, or `link_invalid`."""
    payload: Any
    try:
        drop, row_id, url = signer.unsign_text(Purpose.DROP_CLICK, token).split(":", 2)
        payload = {"d": int(drop), "r": int(row_id) if row_id else None, "u": url}
    except (PopdropError, ValueError):
        payload = signer.unsign(Purpose.DROP_CLICK, token)  # a link sent before the short token
    if (
        not isinstance(payload, dict)
        or not isinstance(payload.get("d"), int)
        or not isinstance(payload.get("u"), str)
        or not payload["u"].startswith(("http://", "https://"))
    ):
        raise _invalid()
    row = payload.get("r")
    return payload["d"], row if isinstance(row, int) else None, payload["u"]


# ---------------------------------------------------------------- drop SMS short links

RECIPIENT_MAC_CHARS = 6  # 36 bits: a forged recipient only counts a click for another row


def _recipient_mac(signer: Signer, slug: str, send_row_id: int) -> str:
    digest = signer.mac(Purpose.DROP_RECIPIENT, f"{slug}:{send_row_id}")
    return base64.urlsafe_b64encode(digest).decode("ascii")[:RECIPIENT_MAC_CHARS]


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if number == 0:
            return out


def drop_recipient(signer: Signer, slug: str, send_row_id: int) -> str:
    """The recipient part of a drop SMS short link: the send row id in base 36 and a short
    MAC bound to the slug, so no per-recipient row is stored and the link stays short."""
    return _base36(send_row_id) + _recipient_mac(signer, slug, send_row_id)


def drop_recipient_url(signer: Signer, base_url: str, slug: str, send_row_id: int) -> str:
    return absolute(base_url, f"/s/{slug}/{drop_recipient(signer, slug, send_row_id)}")


def read_drop_recipient(signer: Signer, slug: str, recipient: str) -> int | None:
    """The send row id of a genuine recipient part for this slug, else None."""
    row_part, mac = recipient[:-RECIPIENT_MAC_CHARS], recipient[-RECIPIENT_MAC_CHARS:]
    if not 1 <= len(row_part) <= 13 or not row_part.isalnum() or not row_part.isascii():
        return None
    row_id = int(row_part, 36)
    if not hmac.compare_digest(mac, _recipient_mac(signer, slug, row_id)):
        return None
    return row_id


# ---------------------------------------------------------------- reports and surveys


def survey_url(signer: Signer, base_url: str, invitation_id: int, org_id: int) -> str:
    """A Day+1 survey's answer page for one invitation (answered once; the row says so)."""
    token = signer.sign(Purpose.SURVEY, {"i": invitation_id, "o": org_id})
    return absolute(base_url, f"/q/{token}")


def read_survey(signer: Signer, token: str) -> tuple[int, int]:
    """(invitation id, org id) of a survey token, or `link_invalid`."""
    return _id_and(signer.unsign(Purpose.SURVEY, token), "i", "o", int)


@dataclass(frozen=True)
class PartnerReportLink:
    org_id: int
    event_id: int
    partner_id: int
    expires_at: datetime


def partner_report_url(signer: Signer, base_url: str, link: PartnerReportLink) -> str:
    """A partner's ROI report for one event, readable without a login until it expires."""
    token = signer.sign(
        Purpose.PARTNER_REPORT,
        {
            "o": link.org_id,
            "v": link.event_id,
            "p": link.partner_id,
            "e": int(link.expires_at.timestamp()),
        },
    )
    return absolute(base_url, f"/reports/{token}")


def read_partner_report(signer: Signer, token: str, *, now: datetime) -> PartnerReportLink:
    """What a partner report link opens, or `link_invalid` / `link_expired`."""
    payload = signer.unsign(Purpose.PARTNER_REPORT, token)
    if not isinstance(payload, dict) or not all(
        isinstance(payload.get(key), int) for key in ("o", "v", "p", "e")
    ):
        raise _invalid()
    link = PartnerReportLink(
        payload["o"], payload["v"], payload["p"], datetime.fromtimestamp(payload["e"], UTC)
    )
    if link.expires_at <= now:
        raise PopdropError("link_expired", "this report link has expired")
    return link
