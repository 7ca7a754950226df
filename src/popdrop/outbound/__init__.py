"""Outbound transports shared by drops, chat and notifications: SMTP, SMS (Twilio format),
the development mailbox, throttling, and provider delivery feedback."""
