"""`Settings` is composed of one class per section: every field is declared once, keeps its
environment variable, and each section's validators still run on the composed object."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from livecall.settings import Settings
from livecall.settings.calls import CallSettings
from livecall.settings.carriers import CarrierSettings
from livecall.settings.cluster import ClusterSettings
from livecall.settings.gemini import GeminiSettings
from livecall.settings.outcomes import OutcomeSettings
from livecall.settings.records import RecordSettings
from livecall.settings.server import ServerSettings

SECTIONS = (
    ServerSettings,
    GeminiSettings,
    CarrierSettings,
    CallSettings,
    ClusterSettings,
    RecordSettings,
    OutcomeSettings,
)


def _own_fields(section: type) -> set[str]:
    return set(section.__annotations__)


def test_every_field_is_declared_in_exactly_one_section_and_read_in_section_order() -> None:
    seen: list[str] = []
    for section in SECTIONS:
        own = [name for name in section.model_fields if name in _own_fields(section)]
        assert own, section.__name__
        seen.extend(own)
    assert len(seen) == len(set(seen))
    assert seen == list(Settings.model_fields)  # server first, as the README's table reads


def test_no_two_fields_read_the_same_environment_variable() -> None:
    names: list[str] = []
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        names.extend(str(a) for a in choices) if choices else names.append(str(alias))
    assert len(names) == len(set(names))


def test_each_sections_environment_and_validators_reach_the_composed_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {
        "SERVICE_URL": "https://calls.example.com/",  # server (an alias choice)
        "TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7",  # server (comma list)
        "GOOGLE_API_KEY": "g-key",  # gemini (an alias choice)
        "OUTBOUND_ALLOWED_DESTINATIONS": "US, GB",  # carriers (comma list)
        "MAX_CONCURRENT_CALLS": "7",  # calls
        "REDIS_URL": "redis://user:s%40cret@redis:6379/0",  # cluster (a secret URL)
        "BUSINESS_TIMEZONE": " Europe/Paris ",  # records (checked, trimmed)
        "CALL_WEBHOOK_URL": "https://hooks.example.com/end",  # outcomes
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.public_url == "https://calls.example.com"
    assert s.trusted_proxies == ["10.0.0.0/8", "192.0.2.7"]
    assert s.has_gemini_credentials()
    assert s.outbound_allowed_destinations == ["US", "GB"]
    assert s.max_concurrent_calls == 7
    assert {"s%40cret", "s@cret", "g-key"} <= set(s.secret_values())
    assert s.business_timezone == "Europe/Paris"
    assert s.call_webhook_url == "https://hooks.example.com/end"

    monkeypatch.setenv("BUSINESS_TIMEZONE", "Mars/Olympus")
    with pytest.raises(ValidationError, match="BUSINESS_TIMEZONE"):
        Settings(_env_file=None)  # type: ignore[call-arg]
