"""Settings from the environment and `.env`, one object the whole process shares.

Secrets are `SecretStr` so that no log line, repr or error message can print them by accident.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SYSTEM_PROMPT = (
    "You are the friendly phone receptionist of a small business. Speak briefly and naturally, "
    "one or two sentences at a time, as people do on the phone. If the caller presses keypad "
    "digits you are told which ones."
)


class Settings(BaseSettings):
    """Everything livecall reads from its environment."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    # --- server
    host: str = Field("0.0.0.0", validation_alias=AliasChoices("LIVECALL_HOST", "HOST"))
    port: int = Field(8080, validation_alias=AliasChoices("PORT", "LIVECALL_PORT"))
    public_url: str | None = Field(None, validation_alias=AliasChoices("PUBLIC_URL", "SERVICE_URL"))
    log_level: str = Field("info", validation_alias="LOG_LEVEL")
    log_format: Literal["console", "json"] = Field("console", validation_alias="LOG_FORMAT")
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias="TRUSTED_PROXIES",
        description="comma-separated IPs or CIDRs of the proxies in front of livecall whose "
        "X-Forwarded-* headers are believed (default: none, forwarded headers are ignored)",
    )

    # --- Gemini
    gemini_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("GEMINI_API_KEY", "GOOGLE_API_KEY")
    )
    gemini_use_vertexai: bool = Field(
        False, validation_alias=AliasChoices("GOOGLE_GENAI_USE_VERTEXAI", "GEMINI_USE_VERTEXAI")
    )
    gemini_project: str | None = Field(
        None, validation_alias=AliasChoices("GOOGLE_CLOUD_PROJECT", "GEMINI_PROJECT")
    )
    gemini_location: str | None = Field(
        None, validation_alias=AliasChoices("GOOGLE_CLOUD_LOCATION", "GEMINI_LOCATION")
    )
    gemini_model: str = Field("gemini-3.8-live", validation_alias="GEMINI_MODEL")
    gemini_base_url: str | None = Field(None, validation_alias="GEMINI_BASE_URL")
    gemini_api_version: str | None = Field(None, validation_alias="GEMINI_API_VERSION")
    gemini_ca_file: Path | None = Field(
        None,
        validation_alias="GEMINI_CA_FILE",
        description="extra CA trusted for the Gemini endpoint besides the system ones "
        "(a corporate proxy, the simulator's test CA); SSL_CERT_FILE replaces them instead",
    )
    voice: str = Field("Kore", validation_alias=AliasChoices("GEMINI_VOICE", "VOICE"))
    language: str = Field("en-US", validation_alias=AliasChoices("GEMINI_LANGUAGE", "LANGUAGE"))
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, validation_alias="SYSTEM_PROMPT")
    system_prompt_file: Path | None = Field(None, validation_alias="SYSTEM_PROMPT_FILE")
    greeting: str | None = Field(None, validation_alias="GREETING")
    vad_start_sensitivity: Literal["high", "low"] | None = Field(
        None, validation_alias="VAD_START_SENSITIVITY"
    )
    vad_end_sensitivity: Literal["high", "low"] | None = Field(
        None, validation_alias="VAD_END_SENSITIVITY"
    )
    vad_prefix_padding_ms: int | None = Field(None, validation_alias="VAD_PREFIX_PADDING_MS")
    vad_silence_duration_ms: int | None = Field(None, validation_alias="VAD_SILENCE_DURATION_MS")
    gemini_connect_timeout_s: float = Field(10.0, validation_alias="GEMINI_CONNECT_TIMEOUT")
    gemini_non_blocking_tools: bool | None = Field(
        None,
        validation_alias="GEMINI_NON_BLOCKING_TOOLS",
        description="declare tools NON_BLOCKING (the model keeps talking while one runs) and "
        "answer them with a `scheduling`; unset: on (Developer API and Vertex AI alike)",
    )
    gemini_reconnect_attempts: int = Field(5, validation_alias="GEMINI_RECONNECT_ATTEMPTS")
    gemini_stall_timeout_s: float = Field(
        10.0,
        validation_alias="GEMINI_STALL_TIMEOUT",
        description="model silent this long while the caller waits: nudge it, then reconnect",
    )
    gemini_rotation_overlap: bool = Field(
        True,
        validation_alias="GEMINI_ROTATION_OVERLAP",
        description="open the next session before closing the old one at a goAway; turn off "
        "when the quota refuses two sessions at once",
    )

    # --- Twilio
    twilio_auth_token: SecretStr | None = Field(None, validation_alias="TWILIO_AUTH_TOKEN")
    twilio_account_sid: str | None = Field(None, validation_alias="TWILIO_ACCOUNT_SID")
    twilio_api_base_url: str | None = Field(
        None,
        validation_alias="TWILIO_API_BASE_URL",
        description="override of https://api.twilio.com (the REST simulator in tests)",
    )
    twilio_caller_id: str | None = Field(None, validation_alias="TWILIO_CALLER_ID")

    # --- calls
    max_concurrent_calls: int = Field(500, validation_alias="MAX_CONCURRENT_CALLS")
    max_gemini_sessions: int | None = Field(
        None,
        validation_alias="MAX_GEMINI_SESSIONS",
        description="the project's concurrent Live session quota; calls beyond it get the busy "
        "answer, and a goAway rotation closes the old session before opening the next",
    )
    busy_answer: Literal["say", "reject"] = Field(
        "say",
        validation_alias="BUSY_ANSWER",
        description="over capacity: 'say' the busy message and hang up, or 'reject' (busy tone)",
    )
    busy_message: str = Field(
        "Sorry, all our lines are busy right now. Please call again in a few minutes.",
        validation_alias="BUSY_MESSAGE",
    )
    max_call_duration_s: float = Field(3600.0, validation_alias="MAX_CALL_DURATION")
    first_message_timeout_s: float = Field(10.0, validation_alias="FIRST_MESSAGE_TIMEOUT")
    max_message_bytes: int = Field(65536, validation_alias="MAX_MESSAGE_BYTES")
    profiles_file: Path | None = Field(None, validation_alias="PROFILES_FILE")
    drain_timeout_s: float = Field(
        8.0,
        validation_alias="DRAIN_TIMEOUT",
        description="on SIGTERM, how long calls may go on before they are ended with a goodbye "
        "(Cloud Run allows ~10 s; on Kubernetes match terminationGracePeriodSeconds)",
    )
    profiles_reload_interval_s: float = Field(
        1.0,
        gt=0,
        validation_alias="PROFILES_RELOAD_INTERVAL",
        description="how often the profiles file is checked for edits (seconds)",
    )
    tool_timeout_s: float = Field(
        10.0,
        gt=0,
        validation_alias="TOOL_TIMEOUT",
        description="longest a lookup or HTTP tool may take before the model gets an error",
    )

    # --- several instances (livecall.cluster)
    redis_url: SecretStr | None = Field(
        None,
        validation_alias="REDIS_URL",
        description="Redis for the live-call registry and call control across instances "
        "(unset: this process only); a secret because it may carry a password",
    )
    instance_id: str | None = Field(
        None,
        validation_alias="INSTANCE_ID",
        description="this process's name in the cluster (default: host, pid and a random tail)",
    )
    cluster_prefix: str = Field(
        "livecall",
        min_length=1,
        validation_alias="CLUSTER_PREFIX",
        description="Redis key prefix: deployments sharing one Redis need different ones",
    )
    cluster_ttl_s: float = Field(
        15.0,
        gt=0,
        validation_alias="CLUSTER_TTL",
        description="a dead instance's calls vanish from listings after this many seconds",
    )
    cluster_heartbeat_s: float = Field(
        5.0,
        gt=0,
        validation_alias="CLUSTER_HEARTBEAT",
        description="how often an instance refreshes its calls in Redis (below CLUSTER_TTL)",
    )

    # --- records
    database_url: str = Field("sqlite+aiosqlite:///./livecall.db", validation_alias="DATABASE_URL")
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

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            ipaddress.ip_network(entry, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url_is_absolute(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("PUBLIC_URL must be an absolute http(s) URL, e.g. https://example.com")
        return value.rstrip("/")

    def resolved_system_prompt(self) -> str:
        if self.system_prompt_file is not None:
            return self.system_prompt_file.read_text(encoding="utf-8").strip()
        return self.system_prompt

    def has_gemini_credentials(self) -> bool:
        if self.gemini_use_vertexai:  # a project, or an API key (Vertex AI express mode)
            key = self.gemini_api_key.get_secret_value() if self.gemini_api_key else ""
            return bool(self.gemini_project and self.gemini_location) or bool(key)
        return self.gemini_api_key is not None and bool(self.gemini_api_key.get_secret_value())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
