"""Settings from `POPDROP_*` environment variables and `.env`.

The secret key is never hard-coded: unless `POPDROP_SECRET_KEY` is set, it is generated
with `secrets` into `<data_dir>/secret_key` on first run (mode 0600) and read back after.
"""

from __future__ import annotations

import os
import secrets
from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Parallel audit hash chains per organization (see core.audit); the ledger uses this
# count until the process configures its own at start-up.
DEFAULT_AUDIT_CHAINS = 8


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POPDROP_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path("var"), description="Where the SQLite file and key live.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy async URL; default: SQLite in data_dir."
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis for shared rate limits and web chat pushes between processes.",
    )
    secret_key: str | None = Field(default=None, description="Overrides the generated key.")
    previous_secret_keys: str = Field(
        default="",
        description="Comma-separated secret keys used before this one: data sealed under "
        "them (check-in keys) still opens; `popdrop checkin rotate-keys` reseals it.",
    )
    base_url: str = "http://127.0.0.1:8000"
    # Short links (`/s/{slug}`) are printed on this origin when set (a short domain that
    # reaches this server, e.g. https://pd.example); otherwise on `base_url`.
    short_base_url: str | None = None
    log_level: str = "INFO"
    log_requests: bool = True
    # The ASGI server `popdrop serve` runs (`--server` overrides it): both keep the same
    # lifespan, WebSockets, SSE, graceful stop and proxy-trust behaviour.
    server: str = Field(default="uvicorn", pattern="^(uvicorn|granian)$")
    max_body_bytes: int = 1_048_576
    db_pool_size: int = 20
    db_max_overflow: int = 20
    # Guessing guard: failed (unknown/malformed) attempts per window. An authenticated
    # caller is counted per token (or operator); a public one per address, and per public
    # route of the organization. The two are never counted together.
    guess_limit_per_token: int = 30
    guess_limit_per_address: int = 30
    guess_limit_per_org: int = 300
    guess_window_seconds: int = 60
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed: comma-separated
    # addresses or networks (CIDR). Empty (the default): none, the peer is the client.
    trusted_proxies: str = ""
    # Redis calls fail fast (seconds per connect/read) and, after a failure, the guard counts
    # in-process and tries Redis again after `redis_retry_seconds`.
    redis_timeout_seconds: float = Field(default=0.25, gt=0)
    redis_retry_seconds: float = Field(default=5.0, gt=0)
    audit_chains: int = Field(default=DEFAULT_AUDIT_CHAINS, ge=1, le=64)
    token_cache_seconds: float = 2.0
    session_max_age_seconds: int = 12 * 3600
    # Login throttle: failed password logins per account and per address in a fixed window;
    # past either limit, password login is refused (429 login_locked) until the window ends.
    login_limit_per_account: int = Field(default=10, ge=1)
    login_limit_per_address: int = Field(default=30, ge=1)
    login_window_seconds: int = Field(default=900, ge=1)
    # Background work: the in-process broker unless a Redis URL is given (`popdrop worker`).
    broker_url: str | None = Field(default=None, description="redis://… for worker fleets")
    # Outbound email: "mailbox" keeps messages in the database (readable on /mailbox).
    mail_transport: str = Field(default="mailbox", pattern="^(mailbox|smtp)$")
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_tls: bool = False  # implicit TLS (port 465)
    smtp_starttls: bool | None = None  # None: upgrade when the server offers it
    smtp_pool_size: int = Field(default=4, ge=1, le=64)
    # Provider rate limits (token bucket per worker process; unset: as fast as it takes).
    smtp_rate_per_s: float | None = Field(default=None, gt=0)
    smtp_rate_burst: int = Field(default=10, ge=1)
    sms_rate_per_s: float | None = Field(default=None, gt=0)
    sms_rate_burst: int = Field(default=1, ge=1)
    # Outbound SMS through a Twilio-format REST API; unset: SMS go to the mailbox too.
    sms_base_url: str | None = None
    sms_account_sid: str = ""
    sms_auth_token: str = ""
    send_batch_size: int = Field(default=200, ge=1, le=5000)
    send_lease_seconds: float = Field(default=60.0, gt=0)
    send_poll_seconds: float = Field(default=2.0, gt=0)
    # Telegram Bot API (chat channel): base URL (a local fake in tests), the bot's token,
    # and the secret Telegram echoes in X-Telegram-Bot-Api-Secret-Token on each webhook.
    telegram_api_url: str = "https://api.telegram.org"
    telegram_bot_token: str = ""
    telegram_webhook_secret: str = ""
    # Provider webhooks (Twilio inbound/status, SES/SendGrid/Postmark feedback, Telegram)
    # are refused unless they prove the configured secret (403 `bad_signature`); one whose
    # secret is not configured is refused too (403 `webhook_not_configured`) unless this is
    # on. Development only: with it, anyone who has a webhook URL can post to it.
    insecure_webhooks: bool = False
    # The shared secret of SendGrid/Postmark/generic (and SNS) feedback webhooks: as
    # `?token=`, an `X-Popdrop-Webhook-Token` header or the basic-auth password of the URL.
    feedback_webhook_secret: str = ""
    # SES through SNS: comma-separated topic ARNs whose signed messages are believed (the
    # SNS signature is checked against Amazon's certificate).
    feedback_sns_topic_arns: str = ""
    # The number chat reminders, surveys and host messages are texted from (E.164); empty:
    # SMS conversations get no scheduled messages.
    chat_sms_from: str = ""
    # Public live-stock streams (SSE): one publisher per event reads the stock every tick
    # (and at once after a change made here), however many streams listen. Caps are per
    # server process; a refused stream gets 429 (per address) or 503 (all), with Retry-After.
    stream_tick_seconds: float = Field(default=1.0, gt=0)
    stream_max_per_address: int = Field(default=50, ge=1)
    stream_max_total: int = Field(default=2000, ge=1)
    stream_idle_seconds: float = Field(default=300.0, gt=0)  # nothing new to send: end
    stream_max_seconds: float = Field(default=1800.0, gt=0)  # the browser reconnects
    stream_keepalive_seconds: float = Field(default=15.0, gt=0)
    # Web chat sockets: the same kind of caps per process; idle = no frame from the visitor.
    chat_max_per_address: int = Field(default=20, ge=1)
    chat_max_total: int = Field(default=2000, ge=1)
    chat_idle_seconds: float = Field(default=900.0, gt=0)
    # Online payments through Stripe (the official client). Unset secret key: checkout
    # offers pay at pickup only. The API base is configurable (a local fake in tests and in
    # the demo); webhook secrets are comma-separated so a rotation can verify both.
    stripe_secret_key: str = ""
    stripe_api_base: str = "https://api.stripe.com"
    stripe_webhook_secrets: str = ""
    stripe_webhook_tolerance_seconds: int = Field(default=300, ge=1)

    @property
    def short_links_base(self) -> str:
        return (self.short_base_url or self.base_url).rstrip("/")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite+aiosqlite:///{(self.data_dir / 'popdrop.db').resolve()}"

    @cached_property
    def resolved_secret_key(self) -> bytes:
        if self.secret_key:
            return self.secret_key.encode()
        return load_or_create_secret_key(self.data_dir)

    @property
    def resolved_previous_secret_keys(self) -> tuple[bytes, ...]:
        return tuple(k.strip().encode() for k in self.previous_secret_keys.split(",") if k.strip())


def load_or_create_secret_key(data_dir: Path) -> bytes:
    """Read the key file, or create it atomically (O_EXCL) so two starters agree on one key."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "secret_key"
    if not path.exists():
        key = secrets.token_urlsafe(48)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(key)
    value = path.read_text().strip()
    if len(value) < 32:
        raise RuntimeError(f"secret key in {path} is too short; delete it to regenerate")
    return value.encode()
