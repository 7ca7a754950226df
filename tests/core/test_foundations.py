from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path

import pytest

from popdrop.core.clock import FrozenClock
from popdrop.core.config import Settings, load_or_create_secret_key
from popdrop.core.errors import PopdropError
from popdrop.core.money import Money
from popdrop.core.signing import Signer


def test_secret_key_is_generated_once_private_and_stable(tmp_path: Path) -> None:
    first = load_or_create_secret_key(tmp_path)
    second = load_or_create_secret_key(tmp_path)
    assert first == second and len(first) >= 48
    mode = stat.S_IMODE((tmp_path / "secret_key").stat().st_mode)
    assert mode == 0o600
    other = load_or_create_secret_key(tmp_path / "elsewhere")
    assert other != first


def test_settings_read_popdrop_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POPDROP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("POPDROP_GUESS_LIMIT_PER_ADDRESS", "7")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.guess_limit_per_address == 7
    assert settings.resolved_database_url.endswith(f"{tmp_path}/popdrop.db")
    assert (tmp_path / "secret_key").exists() is False
    assert settings.resolved_secret_key == load_or_create_secret_key(tmp_path)


def test_money_is_exact_and_refuses_mixing() -> None:
    assert Money(1250, "EUR").format() == "12.50 EUR"
    assert Money(-5, "EUR").format() == "-0.05 EUR"
    assert Money(500, "JPY").format() == "500 JPY"
    assert (Money(1, "EUR") + Money(2, "EUR")).amount_minor == 3
    with pytest.raises(PopdropError):
        Money(1, "EUR") + Money(1, "USD")
    with pytest.raises(PopdropError):
        Money(1, "euro")
    with pytest.raises(PopdropError):
        Money(1.5, "EUR")  # type: ignore[arg-type]


def test_signed_values_resist_tampering_and_purpose_swaps() -> None:
    signer = Signer(b"k" * 48)
    token = signer.sign("voucher-link", {"c": "ABC"})
    assert signer.unsign("voucher-link", token) == {"c": "ABC"}
    with pytest.raises(PopdropError) as wrong_purpose:
        signer.unsign("session", token)
    assert wrong_purpose.value.reason == "link_invalid"
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(PopdropError):
        signer.unsign("voucher-link", tampered)
    with pytest.raises(PopdropError):
        Signer(b"z" * 48).unsign("voucher-link", token)


def test_keyed_hash_depends_on_the_key() -> None:
    assert Signer(b"a" * 48).keyed_hash("CODE") != Signer(b"b" * 48).keyed_hash("CODE")
    assert Signer(b"a" * 48).keyed_hash("CODE") == Signer(b"a" * 48).keyed_hash("CODE")


def test_frozen_clock_moves_only_when_told() -> None:
    clock = FrozenClock()
    start = clock.now()
    assert clock.now() == start and start.tzinfo is not None
    clock.advance(timedelta(hours=2))
    assert clock.now() - start == timedelta(hours=2)
