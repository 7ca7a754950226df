"""Contact points: one way to normalise an email or a phone number and to key-hash it.

Every domain that takes an email or a phone uses these, so a contact is recognised the
same way by RSVPs, imports, opt-outs and the suppression list.
"""

from __future__ import annotations

import functools
import re

import phonenumbers
from email_validator import EmailNotValidError, validate_email

from popdrop.core.errors import PopdropError
from popdrop.core.signing import Signer

# RFC 5322 dot-atom: the local parts email-validator passes through unchanged.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")


def normalize_email(raw: str) -> str:
    """The address as stored and compared: validated, domain lower-cased, local part lower-
    cased too (mailbox providers treat it case-insensitively in practice)."""
    try:
        return validate_email(raw.strip(), check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise PopdropError("invalid_request", f"email: {exc}", detail={"field": "email"}) from exc


class EmailNormalizer:
    """`normalize_email`, fast for the common case.

    Most of email-validator's time goes to the domain, and a list holds few domains: for an
    ASCII dot-atom local part (which the validator returns unchanged) the domain is
    validated once through `normalize_email` and remembered. Anything else, and every
    error, goes through `normalize_email` itself, so results are the same."""

    def __init__(self, max_domains: int = 50_000) -> None:
        self._domains: dict[str, str | None] = {}
        self._max = max_domains

    def __call__(self, raw: str) -> str:
        text = raw.strip()
        local, _, domain = text.partition("@")
        if (
            domain
            and len(text) <= 254
            and len(local) <= 64
            and text.isascii()
            and "@" not in domain
            and _DOT_ATOM.match(local)
        ):
            clean = self._domain(domain)
            if clean is not None:
                address = f"{local.lower()}@{clean}"
                if len(address.encode()) <= 254:
                    return address
        return normalize_email(text)

    def _domain(self, domain: str) -> str | None:
        if domain in self._domains:
            return self._domains[domain]
        try:
            clean: str | None = normalize_email(f"x@{domain}").partition("@")[2]
        except PopdropError:
            clean = None
        if len(self._domains) < self._max:
            self._domains[domain] = clean
        return clean


def normalize_phone(raw: str, region: str | None = None) -> str:
    """E.164 (`+33612345678`). A number without a leading + needs `region` (ISO 3166)."""
    try:
        parsed = phonenumbers.parse(raw.strip(), region)
    except phonenumbers.NumberParseException as exc:
        raise PopdropError(
            "invalid_request",
            "phone: use the international format, e.g. +33612345678",
            detail={"field": "phone"},
        ) from exc
    if not phonenumbers.is_valid_number(parsed):
        raise PopdropError(
            "invalid_request", "phone: not a valid phone number", detail={"field": "phone"}
        )
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def phone_region(e164: str) -> str | None:
    """The ISO region of a valid E.164 number (`FR`), or None."""
    try:
        return phonenumbers.region_code_for_number(phonenumbers.parse(e164, None)) or None
    except phonenumbers.NumberParseException:
        return None


def phone_time_zone(e164: str) -> str | None:
    """The number's time zone when its region has exactly one (FR → Europe/Paris)."""
    from phonenumbers import timezone as phone_timezones

    try:
        zones = phone_timezones.time_zones_for_number(phonenumbers.parse(e164, None))
    except phonenumbers.NumberParseException:
        return None
    real = [zone for zone in zones if "/" in zone]
    return real[0] if len(real) == 1 else None


def phone_and_zone(raw: str, region: str | None, *, zone: bool = True) -> tuple[str, str | None]:
    """`normalize_phone` and `phone_time_zone` with one parse (the parse is
    most of their cost): the E.164 number and (if `zone`) its time zone when it has one."""
    try:
        parsed = phonenumbers.parse(raw.strip(), region)
    except phonenumbers.NumberParseException:
        return normalize_phone(raw, region), None  # raises with the one message
    if not phonenumbers.is_valid_number(parsed):
        return normalize_phone(raw, region), None  # raises with the one message
    e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if not zone:
        return e164, None
    known, single = _country_zone(parsed.country_code)
    if known:
        return e164, single
    from phonenumbers import timezone as phone_timezones  # lazy, as in `phone_time_zone`

    zones = [z for z in phone_timezones.time_zones_for_number(parsed) if "/" in z]
    return e164, zones[0] if len(zones) == 1 else None


@functools.cache
def _country_zone(country_code: int) -> tuple[bool, str | None]:
    """(True, zone) when every valid number of this country code has the same zones in
    phonenumbers' data (FR, DE ...): the lookup, which classifies the number again, is
    then not needed. (False, None) when the zone depends on the number (US ...)."""
    from phonenumbers.tzdata import TIMEZONE_DATA  # lazy: loaded once per country code

    code = str(country_code)
    related = {v for k, v in TIMEZONE_DATA.items() if k.startswith(code) or code.startswith(k)}
    if code not in TIMEZONE_DATA or len(related) != 1:
        return False, None
    zones = [z for z in related.pop() if "/" in z]
    return True, zones[0] if len(zones) == 1 else None


def identity_hash(signer: Signer, kind: str, normalized: str) -> bytes:
    """Keyed hash of a normalised email (`kind="email"`) or phone (`"phone"`): what dedupe
    and the suppression list compare, so an erased identifier is still recognised."""
    return signer.keyed_hash(f"contact-{kind}:{normalized}")
