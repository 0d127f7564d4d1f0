"""Records: the database, recordings, spool, retention, the API's tokens, the dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from livecall.settings.section import Section


class RecordSettings(Section):
    """Call records, recordings and their retention, and the dashboard's time zone."""

    database_url: SecretStr = Field(
        SecretStr("sqlite+aiosqlite:///./livecall.db"),
        validation_alias="DATABASE_URL",
        description="a secret: it may carry the database password",
    )
    recordings_dir: Path = Field(Path("recordings"), validation_alias="RECORDINGS_DIR")
    recording_format: Literal["wav", "flac"] = Field("wav", validation_alias="RECORDING_FORMAT")
    recording_enabled: bool = Field(True, validation_alias="RECORDING_ENABLED")
    retention_days: int | None = Field(None, validation_alias="RETENTION_DAYS")
    spool_dir: Path = Field(Path(".livecall-spool"), validation_alias="SPOOL_DIR")
    api_token: SecretStr | None = Field(None, validation_alias="LIVECALL_API_TOKEN")
    api_local_only: bool = Field(
        False,
        validation_alias="LIVECALL_API_LOCAL_ONLY",
        description="serve the REST API without a token, to loopback clients only",
    )
    calls_token: SecretStr | None = Field(
        None,
        validation_alias="LIVECALL_CALLS_TOKEN",
        description="bearer token that may place outbound calls (LIVECALL_API_TOKEN only reads)",
    )
    spool_max_bytes: int = Field(
        512 * 1024 * 1024,
        gt=0,
        validation_alias="SPOOL_MAX_BYTES",
        description="bytes of call records the spool may hold while the database is away",
    )
    auto_migrate: bool = Field(
        True,
        validation_alias="AUTO_MIGRATE",
        description="migrate the call records schema on start (else refuse an old schema)",
    )
    business_timezone: str = Field(
        "UTC",
        validation_alias="BUSINESS_TIMEZONE",
        description="IANA zone (e.g. America/New_York) for the dashboard's dates, days and charts",
    )

    @field_validator("business_timezone")
    @classmethod
    def _timezone_is_known(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value.strip())
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(
                f"BUSINESS_TIMEZONE must be an IANA zone name like Europe/Paris, not {value!r}"
            ) from error
        return value.strip()
