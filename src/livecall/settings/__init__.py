"""Settings from the environment and `.env`, one object the whole process shares.

Secrets are `SecretStr` so that no log line, repr or error message can print them by accident.
`Settings` is composed of one class per section (a module each); every field keeps its
environment variable and default, whichever section holds it.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from livecall.settings.calls import CallSettings
from livecall.settings.carriers import CarrierSettings
from livecall.settings.cluster import ClusterSettings
from livecall.settings.gemini import DEFAULT_SYSTEM_PROMPT, GeminiSettings
from livecall.settings.outcomes import OutcomeSettings
from livecall.settings.records import RecordSettings
from livecall.settings.server import ServerSettings

__all__ = ["DEFAULT_SYSTEM_PROMPT", "Settings", "get_settings", "url_password"]


# Bases in reverse: pydantic collects fields from the last base first, so the fields keep the
# order of the sections as read top to bottom (server first), as before the split.
class Settings(
    OutcomeSettings,
    RecordSettings,
    ClusterSettings,
    CallSettings,
    CarrierSettings,
    GeminiSettings,
    ServerSettings,
):
    """Everything livecall reads from its environment."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    def secret_values(self) -> list[str]:
        """Every credential this configuration holds, for log redaction: each `SecretStr`
        setting (and any `*_token`/`*_key`/`*_secret`/`*_password` one), and the password
        inside DATABASE_URL and REDIS_URL, as written and percent-decoded."""
        values: list[str] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                raw = value.get_secret_value()
            elif isinstance(value, str) and name.endswith(_SECRET_SUFFIXES):
                raw = value
            else:
                continue
            if raw:
                values.append(raw)
                values.extend(url_password(raw))
        return values


_SECRET_SUFFIXES = ("_token", "_key", "_secret", "_password")


def url_password(url: str) -> list[str]:
    """The password in a URL (`scheme://user:password@host/…`), raw and decoded; [] if none."""
    try:
        password = urlsplit(url).password if "://" in url else None
    except ValueError:
        return []
    if not password:
        return []
    return list(dict.fromkeys((password, unquote(password))))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
