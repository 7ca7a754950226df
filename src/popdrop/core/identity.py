"""Contact points: one way to normalise an email or a phone number and to key-hash it.

Every domain that takes an email or a phone uses these, so a contact is recognised the
same way by RSVPs, imports, opt-outs and the suppression list.
"""

from __future__ import annotations

import phonenumbers
from email_validator import EmailNotValidError, validate_email

from popdrop.core.errors import PopdropError
from popdrop.core.signing import Signer


def normalize_email(raw: str) -> str:
    """The address as stored and compared: validated, domain lower-cased, local part lower-
    cased too (mailbox providers treat it case-insensitively in practice)."""
    try:
        return validate_email(raw.strip(), check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise PopdropError("invalid_request", f"email: {exc}", detail={"field": "email"}) from exc


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


def identity_hash(signer: Signer, kind: str, normalized: str) -> bytes:
    """Keyed hash of a normalised email (`kind="email"`) or phone (`"phone"`): what dedupe
    and the suppression list compare, so an erased identifier is still recognised."""
    return signer.keyed_hash(f"contact-{kind}:{normalized}")
