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
    base_url: str = "http://127.0.0.1:8000"
    log_level: str = "INFO"
    log_requests: bool = True
    max_body_bytes: int = 1_048_576
    db_pool_size: int = 20
    db_max_overflow: int = 20
    # Guessing guard: failed (unknown/malformed) redemptions per minute.
    guess_limit_per_address: int = 30
    guess_limit_per_org: int = 300
    guess_window_seconds: int = 60
    audit_chains: int = Field(default=8, ge=1, le=64)
    token_cache_seconds: float = 2.0
    session_max_age_seconds: int = 12 * 3600
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
    # The number chat reminders, surveys and host messages are texted from (E.164); empty:
    # SMS conversations get no scheduled messages.
    chat_sms_from: str = ""

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
