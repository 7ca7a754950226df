"""The transports a deployment is configured for: the development mailbox unless SMTP or a
Twilio-format SMS API is set, each wrapped in its provider's rate limit when one is set."""

from __future__ import annotations

from popdrop.core.clock import Clock
from popdrop.core.config import Settings
from popdrop.core.db import Database
from popdrop.outbound.mailbox import Mailbox
from popdrop.outbound.throttle import Throttled
from popdrop.outbound.transports import EmailTransport, SmsTransport


def make_transports(
    settings: Settings, db: Database, clock: Clock
) -> tuple[EmailTransport, SmsTransport]:
    mailbox = Mailbox(db, clock)
    email: EmailTransport = mailbox
    sms: SmsTransport = mailbox
    if settings.mail_transport == "smtp":
        from popdrop.outbound.smtp import SmtpPool

        email = SmtpPool(
            settings.smtp_host,
            settings.smtp_port,
            size=settings.smtp_pool_size,
            username=settings.smtp_username,
            password=settings.smtp_password,
            use_tls=settings.smtp_tls,
            start_tls=settings.smtp_starttls,
        )
    if settings.sms_base_url:
        from popdrop.outbound.twilio import TwilioSms

        sms = TwilioSms(settings.sms_base_url, settings.sms_account_sid, settings.sms_auth_token)
    if settings.smtp_rate_per_s:
        email = Throttled(email, settings.smtp_rate_per_s, settings.smtp_rate_burst)
    if settings.sms_rate_per_s:
        sms = Throttled(sms, settings.sms_rate_per_s, settings.sms_rate_burst)
    return email, sms
