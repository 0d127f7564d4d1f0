"""Which numbers livecall may call: the toll-fraud guard of outbound calls (pure logic).

Whoever holds the calls token can make the account dial; a leaked token must not be able to
run up a bill on premium-rate or far-away numbers. A destination must be E.164 and either
start with one of the allowed E.164 prefixes or be a valid number (Google's libphonenumber
metadata, the `phonenumbers` package) of an allowed country. Unless the operator says
otherwise (`OUTBOUND_ALLOW_PREMIUM`), premium-rate, shared-cost and personal numbers are
refused whatever the list says. The default list is the countries of the configured caller
IDs (`TWILIO_CALLER_ID` and the profiles' numbers): a US number calls the US.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import phonenumbers
from phonenumbers import PhoneNumberType

__all__ = ["DestinationPolicy", "DestinationRefused", "country_of"]

E164 = re.compile(r"^\+[1-9]\d{1,14}\Z")
_PREFIX = re.compile(r"^\+\d{1,15}\Z")
_COUNTRY = re.compile(r"^[A-Za-z]{2}\Z")

# Numbers whose cost is set by whoever runs them, not by the carrier's price list.
COSTLY_TYPES = {
    PhoneNumberType.PREMIUM_RATE: "premium-rate",
    PhoneNumberType.SHARED_COST: "shared-cost",
    PhoneNumberType.PERSONAL_NUMBER: "personal",
}


class DestinationRefused(ValueError):
    """The number may not be called; the message says why (without the number)."""


def _parse(number: str) -> phonenumbers.PhoneNumber | None:
    try:
        return phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None


def country_of(number: str | None) -> str | None:
    """ISO country of a valid E.164 number, else None."""
    if not number or not E164.match(number):
        return None
    parsed = _parse(number)
    if parsed is None or not phonenumbers.is_valid_number(parsed):
        return None
    region = phonenumbers.region_code_for_number(parsed)
    return region if region and _COUNTRY.match(region) else None


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """Allowed countries and prefixes; `check(number)` raises `DestinationRefused`."""

    countries: frozenset[str]
    prefixes: tuple[str, ...]
    allow_costly: bool = False

    @classmethod
    def parse(
        cls,
        entries: Iterable[str],
        *,
        caller_ids: Iterable[str | None] = (),
        allow_costly: bool = False,
    ) -> DestinationPolicy:
        """From `OUTBOUND_ALLOWED_DESTINATIONS` entries; none: the caller IDs' countries.
        Raises ValueError naming an entry that is neither a country nor a prefix."""
        countries: set[str] = set()
        prefixes: list[str] = []
        for raw in entries:
            entry = raw.strip()
            if _COUNTRY.match(entry):
                countries.add(entry.upper())
            elif _PREFIX.match(entry):
                prefixes.append(entry)
            elif entry:
                raise ValueError(
                    f"OUTBOUND_ALLOWED_DESTINATIONS: {entry!r} is neither an ISO country "
                    "(US, GB) nor an E.164 prefix (+1415)"
                )
        if not countries and not prefixes:
            countries = {c for c in map(country_of, caller_ids) if c is not None}
        return cls(frozenset(countries), tuple(prefixes), allow_costly)

    def check(self, number: str) -> None:
        if not E164.match(number):
            raise DestinationRefused("not an E.164 number (like +15551234567)")
        if not self.countries and not self.prefixes:
            raise DestinationRefused(
                "no destinations are allowed: set OUTBOUND_ALLOWED_DESTINATIONS (countries or "
                "E.164 prefixes), or TWILIO_CALLER_ID to call its country"
            )
        parsed = _parse(number)
        valid = parsed is not None and phonenumbers.is_valid_number(parsed)
        if parsed is not None and not self.allow_costly:
            kind = COSTLY_TYPES.get(phonenumbers.number_type(parsed))
            if kind is not None:
                raise DestinationRefused(
                    f"{kind} numbers are not called (OUTBOUND_ALLOW_PREMIUM=true allows them)"
                )
        if any(number.startswith(prefix) for prefix in self.prefixes):
            return
        country = phonenumbers.region_code_for_number(parsed) if valid and parsed else None
        if country in self.countries:
            return
        allowed = ", ".join(sorted(self.countries) + list(self.prefixes))
        if not valid:
            raise DestinationRefused(
                f"not a valid phone number, and no allowed prefix matches it (allowed: {allowed})"
            )
        raise DestinationRefused(
            f"destination country {country} is not allowed (allowed: {allowed}; "
            "see OUTBOUND_ALLOWED_DESTINATIONS)"
        )
