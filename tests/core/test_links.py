"""`core.links`: every bearer link round-trips, and no token passes for another purpose."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from popdrop.core import links
from popdrop.core.errors import PopdropError
from popdrop.core.links import Purpose
from popdrop.core.signing import Signer

SIGNER = Signer(b"links-test-secret-" + b"k" * 32)
BASE = "https://pop.example/"


def _token(url: str) -> str:
    return url.rsplit("/", 1)[1]


def test_purpose_strings_never_change() -> None:
    # They salt every token already sent: a change would break live links and sessions.
    assert {p.name: p.value for p in Purpose} == {
        "SESSION": "session",
        "CSRF": "csrf",
        "CSRF_BINDING": "csrf-binding",
        "VOUCHER_LINK": "voucher-link",
        "VOUCHER_DERIVED": "voucher-derived",
        "RSVP_CANCEL": "rsvp-cancel",
        "WAITLIST_OFFER": "waitlist-offer",
        "ICAL_FEED": "ical-feed",
        "PROVIDER_WEBHOOK": "provider-webhook",
        "CHAT_CHECKOUT": "chat-checkout",
        "CHAT_VISITOR": "chat-visitor",
        "CONSENT_CONFIRM": "consent-confirm",
        "PREFERENCES": "preferences",
        "DROP_CLICK": "drop-click",
        "ORDER_VIEW": "order-view",
        "DROP_RECIPIENT": "drop-recipient",
        "SURVEY": "survey",
        "PARTNER_REPORT": "partner-report",
    }


def test_a_token_signed_with_the_plain_string_reads_back() -> None:
    # Tokens minted before the enum (with the bare string) are the same tokens.
    token = SIGNER.sign("rsvp-cancel", {"r": 3, "o": 9})
    assert links.read_rsvp_cancel(SIGNER, token) == (3, 9)


def test_urls_start_from_the_base_without_a_double_slash() -> None:
    assert links.root(BASE) == "https://pop.example"
    assert links.login_url(BASE) == "https://pop.example/login"
    assert links.event_url(BASE, 7) == "https://pop.example/e/7"
    assert links.event_url(BASE, 7, code="ABCD-EFGH") == "https://pop.example/e/7?code=ABCD-EFGH"
    assert links.chat_url(BASE, "shop") == "https://pop.example/chat/shop"
    assert links.ticket_url(BASE, "s3cret") == "https://pop.example/t/s3cret"
    assert links.click_prefix(BASE) == "https://pop.example/r/"


def test_session_and_csrf_round_trip() -> None:
    session = links.session_token(SIGNER, 5, 2)
    assert links.read_session(SIGNER, session, max_age=60) == (5, 2)
    assert links.read_session(SIGNER, session + "x", max_age=60) is None
    binding = links.session_binding(SIGNER, session)
    assert links.session_binding(SIGNER, "") == "anonymous"
    assert links.read_csrf_binding(SIGNER, links.csrf_token(SIGNER, binding)) == binding
    assert links.read_csrf_binding(SIGNER, SIGNER.sign(Purpose.CSRF, "plain")) is None


def test_voucher_link_round_trip() -> None:
    expires = datetime(2026, 12, 5, 18, 0, tzinfo=UTC)
    url = links.voucher_link_url(BASE, links.voucher_link_token(SIGNER, "ABCDEFGH", expires))
    assert url.startswith("https://pop.example/v/")
    assert links.read_voucher_link(SIGNER, _token(url)) == links.VoucherLink("ABCDEFGH", expires)
    mac = links.derived_code_mac(SIGNER, 1, "contact:2")
    assert mac == links.derived_code_mac(SIGNER, 1, "contact:2")
    assert mac != links.derived_code_mac(SIGNER, 1, "contact:3")


def test_rsvp_ical_webhook_and_checkout_round_trip() -> None:
    assert links.read_rsvp_cancel(SIGNER, links.rsvp_cancel_token(SIGNER, 11, 4)) == (11, 4)

    offer = links.waitlist_offer_url(SIGNER, BASE, 7, "ABCD-EFGH")
    assert offer.startswith("https://pop.example/w/")
    assert links.read_waitlist_offer(SIGNER, _token(offer)) == (7, "ABCD-EFGH")

    ical = links.ical_url(SIGNER, BASE, 4)
    assert ical.startswith("https://pop.example/ical/") and ical.endswith(".ics")
    assert links.read_ical(SIGNER, _token(ical).removesuffix(".ics")) == 4

    urls = links.webhook_urls(SIGNER, BASE, 4, ("ses", "generic"))
    assert set(urls) == {"ses", "generic", "twilio_inbound", "twilio_status"}
    assert urls["ses"].startswith("https://pop.example/api/v1/feedback/ses/")
    assert urls["twilio_inbound"].endswith("/inbound")
    assert links.read_webhook(SIGNER, _token(urls["ses"])) == 4
    assert links.read_webhook(SIGNER, links.webhook_token(SIGNER, 4)) == 4

    checkout = links.checkout_url(SIGNER, BASE, 21, 4)
    assert checkout.startswith("https://pop.example/checkout/")
    assert links.read_checkout(SIGNER, _token(checkout)) == (21, 4)


def test_chat_visitor_round_trip_only_for_its_organization() -> None:
    token = links.visitor_token(SIGNER, 4, "abc")
    assert links.read_visitor(SIGNER, 4, token) == "abc"
    assert links.read_visitor(SIGNER, 5, token) is None
    assert links.read_visitor(SIGNER, 4, "") is None


def test_audience_links_round_trip() -> None:
    confirm = links.consent_confirm_url(SIGNER, BASE, 4, 8, "email")
    assert confirm.startswith("https://pop.example/c/")
    assert links.read_consent_confirm(SIGNER, _token(confirm)) == (links.ContactRef(4, 8), "email")

    unsubscribe = links.unsubscribe_url(SIGNER, BASE, 4, 8)
    assert unsubscribe.startswith("https://pop.example/u/")
    assert links.read_preferences(SIGNER, _token(unsubscribe)) == links.ContactRef(4, 8)
    assert links.preferences_token(SIGNER, 4, 8) == _token(unsubscribe)
    legacy = SIGNER.sign(Purpose.PREFERENCES, {"o": 4, "c": 8})  # mail sent before short tokens
    assert links.read_preferences(SIGNER, legacy) == links.ContactRef(4, 8)


def test_click_round_trip_old_and_new_shapes() -> None:
    token = links.click_token(SIGNER, 3, 17, "https://shop.example/x?y=1")
    assert links.read_click(SIGNER, token) == (3, 17, "https://shop.example/x?y=1")
    seed = links.click_token(SIGNER, 3, None, "https://shop.example/")
    assert links.read_click(SIGNER, seed) == (3, None, "https://shop.example/")
    legacy = SIGNER.sign(Purpose.DROP_CLICK, {"d": 3, "r": None, "u": "https://shop.example/"})
    assert links.read_click(SIGNER, legacy) == (3, None, "https://shop.example/")
    not_web = links.click_token(SIGNER, 3, None, "javascript:alert(1)")
    with pytest.raises(PopdropError) as refused:
        links.read_click(SIGNER, not_web)
    assert refused.value.reason == "link_invalid"


@pytest.mark.parametrize(
    ("read", "token"),
    [
        (links.read_rsvp_cancel, links.webhook_token(SIGNER, 4)),
        (links.read_webhook, links.rsvp_cancel_token(SIGNER, 1, 4)),
        (links.read_ical, links.rsvp_cancel_token(SIGNER, 1, 4)),
        (links.read_checkout, links.rsvp_cancel_token(SIGNER, 1, 4)),
        (links.read_voucher_link, links.webhook_token(SIGNER, 4)),
        (links.read_preferences, links.click_token(SIGNER, 1, None, "https://x.example/")),
        (links.read_click, links.preferences_token(SIGNER, 4, 8)),
        (links.read_consent_confirm, links.rsvp_cancel_token(SIGNER, 1, 4)),
        (links.read_waitlist_offer, links.rsvp_cancel_token(SIGNER, 1, 4)),
        (links.read_survey, links.rsvp_cancel_token(SIGNER, 1, 4)),
    ],
    ids=lambda value: getattr(value, "__name__", "token"),
)
def test_no_token_passes_for_another_purpose(read: object, token: str) -> None:
    with pytest.raises(PopdropError) as refused:
        read(SIGNER, token)  # type: ignore[operator]
    assert refused.value.reason == "link_invalid"


def test_a_consent_confirmation_expires_after_a_week(monkeypatch: pytest.MonkeyPatch) -> None:
    token = _token(links.consent_confirm_url(SIGNER, BASE, 4, 8, "email"))
    later = datetime.now(UTC) + timedelta(seconds=links.CONSENT_CONFIRM_MAX_AGE + 60)
    monkeypatch.setattr("itsdangerous.timed.time.time", lambda: later.timestamp())
    with pytest.raises(PopdropError) as refused:
        links.read_consent_confirm(SIGNER, token)
    assert refused.value.reason == "link_expired"


def test_survey_and_partner_report_links_round_trip_and_expire() -> None:
    assert links.read_survey(SIGNER, _token(links.survey_url(SIGNER, BASE, 12, 4))) == (12, 4)
    now = datetime.now(UTC)
    link = links.PartnerReportLink(4, 7, 9, (now + timedelta(days=3)).replace(microsecond=0))
    token = _token(links.partner_report_url(SIGNER, BASE, link))
    assert links.read_partner_report(SIGNER, token, now=now) == link
    with pytest.raises(PopdropError) as expired:
        links.read_partner_report(SIGNER, token, now=now + timedelta(days=4))
    assert expired.value.reason == "link_expired"
    with pytest.raises(PopdropError) as foreign:
        links.read_partner_report(SIGNER, links.rsvp_cancel_token(SIGNER, 1, 4), now=now)
    assert foreign.value.reason == "link_invalid"
