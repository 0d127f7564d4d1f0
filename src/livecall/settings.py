"""Settings from the environment and `.env`, one object the whole process shares.

Secrets are `SecretStr` so that no log line, repr or error message can print them by accident.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

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
    metrics_token: SecretStr | None = Field(
        None,
        validation_alias="METRICS_TOKEN",
        description="when set, GET /metrics needs `Authorization: Bearer <METRICS_TOKEN>`",
    )
    docs_public: bool = Field(
        False,
        validation_alias="DOCS_PUBLIC",
        description="serve /docs, /redoc and /openapi.json to anyone; off: only /openapi.json, "
        "to holders of the API token",
    )
    log_dtmf: bool = Field(
        False,
        validation_alias="LOG_DTMF",
        description="keep keypad digits in logs, call events and traces (off: each is '•')",
    )
    log_transcripts: bool = Field(
        False,
        validation_alias="LOG_TRANSCRIPTS",
        description="put transcript text in log lines (off: its length only; the call records "
        "keep the transcript either way)",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias="ALLOWED_HOSTS",
        description="comma-separated Host names served besides PUBLIC_URL's ('*.example.com' "
        "for subdomains, '*' for any); a request for another Host gets 400",
    )
    max_body_bytes: int = Field(
        1 << 20,
        gt=0,
        validation_alias="MAX_BODY_BYTES",
        description="largest request body (Twilio's webhooks: 64 KiB); larger ones get 413 "
        "before they are read",
    )
    request_timeout_s: float = Field(
        10.0,
        gt=0,
        validation_alias="REQUEST_TIMEOUT",
        description="a request's headers and body must arrive within this (else 408 / closed)",
    )
    ws_max_size: int = Field(
        1 << 20,
        gt=0,
        validation_alias="WS_MAX_SIZE",
        description="largest WebSocket message; a larger one closes the socket (1009)",
    )
    max_pending_per_client: int = Field(
        64,
        gt=0,
        validation_alias="MAX_PENDING_PER_CLIENT",
        description="concurrent unauthenticated connections per client address (HTTP requests "
        "not yet answered, streams before their `start`); more get 429",
    )
    admin_token: SecretStr | None = Field(
        None,
        validation_alias="ADMIN_TOKEN",
        description="bearer token for /admin/drain (unset: only over ADMIN_SOCKET)",
    )
    admin_socket: Path | None = Field(
        None,
        validation_alias="ADMIN_SOCKET",
        description="a Unix socket `livecall serve` also serves the app on; /admin/drain "
        "needs no token there (file mode 0600)",
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
    outbound_allowed_destinations: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias="OUTBOUND_ALLOWED_DESTINATIONS",
        description="comma-separated ISO countries (US, GB) and E.164 prefixes (+1415) outbound "
        "calls may go to; default: the countries of the configured caller IDs",
    )
    outbound_allow_premium: bool = Field(
        False,
        validation_alias="OUTBOUND_ALLOW_PREMIUM",
        description="also call premium-rate, shared-cost and personal numbers",
    )
    outbound_max_per_minute: int = Field(10, ge=1, validation_alias="OUTBOUND_MAX_PER_MINUTE")
    outbound_max_per_hour: int = Field(100, ge=1, validation_alias="OUTBOUND_MAX_PER_HOUR")
    outbound_max_concurrent: int = Field(
        10,
        ge=1,
        validation_alias="OUTBOUND_MAX_CONCURRENT",
        description="outbound calls ringing or in progress at once (per instance)",
    )
    outbound_carrier: Literal["twilio", "telnyx", "plivo"] = Field(
        "twilio",
        validation_alias="OUTBOUND_CARRIER",
        description="the carrier POST /api/calls/outbound and `livecall call` use when the "
        "request names none",
    )
    stream_token_secret: SecretStr | None = Field(
        None,
        validation_alias="STREAM_TOKEN_SECRET",
        description="key material for the per-call stream tokens (default: derived from "
        "TWILIO_AUTH_TOKEN); set it on every instance so any one can check another's tokens",
    )
    twilio_webhook_shared_key: SecretStr | None = Field(
        None,
        validation_alias="TWILIO_WEBHOOK_SHARED_KEY",
        description="the SharedKey secret of a Twilio Webhook Rule: requests carrying "
        "X-Twilio-Webhooks-Signature-Settings are checked with it and the named algorithm",
    )
    insecure_dev: bool = Field(
        False,
        validation_alias="LIVECALL_INSECURE_DEV",
        description="development only: without TWILIO_AUTH_TOKEN accept unsigned Twilio "
        "requests (serve binds loopback only and warns on every call)",
    )
    # other carriers (livecall.server.carrier_routes): each is enabled only when its key is set
    telnyx_public_key: SecretStr | None = Field(
        None,
        validation_alias="TELNYX_PUBLIC_KEY",
        description="the Telnyx account's Ed25519 webhook public key (base64): enables "
        "POST /telnyx/texml and /ws/telnyx",
    )
    plivo_auth_token: SecretStr | None = Field(
        None,
        validation_alias="PLIVO_AUTH_TOKEN",
        description="the Plivo auth token (V3 webhook signatures): enables POST /plivo/answer "
        "and /ws/plivo",
    )
    vonage_signature_secret: SecretStr | None = Field(
        None,
        validation_alias="VONAGE_SIGNATURE_SECRET",
        description="the Vonage account's signature secret (signed webhooks, HS256 JWTs): "
        "enables GET|POST /vonage/answer, POST /vonage/event and /ws/vonage",
    )
    vonage_sample_rate: int = Field(
        16000,
        validation_alias="VONAGE_SAMPLE_RATE",
        description="the L16 rate Vonage streams at (the NCCO's content-type)",
    )
    exotel_url_secret: SecretStr | None = Field(
        None,
        validation_alias="EXOTEL_URL_SECRET",
        description="the secret (16+ characters) the Exotel Voicebot applet's URL carries, as "
        "Basic credentials (exotel:<secret>@) or ?key=: enables GET /exotel/voicebot and "
        "/ws/exotel",
    )
    # their REST call control (hang up, transfer): off until the credentials are set
    telnyx_api_key: SecretStr | None = Field(
        None,
        validation_alias="TELNYX_API_KEY",
        description="a Telnyx API key (v2): with TELNYX_ACCOUNT_SID, end_call hangs up and "
        "transfer_call transfers Telnyx calls over REST",
    )
    telnyx_account_sid: str | None = Field(
        None,
        validation_alias="TELNYX_ACCOUNT_SID",
        description="the Telnyx account id TeXML calls belong to (their AccountSid)",
    )
    telnyx_application_sid: str | None = Field(
        None,
        validation_alias="TELNYX_APPLICATION_SID",
        description="the TeXML Application id outbound Telnyx calls are placed with "
        "(ApplicationSid): with TELNYX_API_KEY and TELNYX_ACCOUNT_SID, enables outbound calls",
    )
    telnyx_api_base: str | None = Field(
        None,
        validation_alias="TELNYX_API_BASE",
        description="override of https://api.telnyx.com/v2 (the REST simulator in tests)",
    )
    plivo_auth_id: str | None = Field(
        None,
        validation_alias="PLIVO_AUTH_ID",
        description="the Plivo Auth ID (MA…/SA…): with PLIVO_AUTH_TOKEN, end_call hangs up and "
        "transfer_call transfers Plivo calls over REST",
    )
    plivo_api_base: str | None = Field(
        None,
        validation_alias="PLIVO_API_BASE",
        description="override of https://api.plivo.com (the REST simulator in tests)",
    )

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
        description="on SIGTERM, when every call must have ended: calls go on until 8 s before "
        "it, then hear a goodbye (Cloud Run allows ~10 s; on Kubernetes match "
        "terminationGracePeriodSeconds)",
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

    # --- post-call analysis and caller memory (livecall.outcomes; switched on per profile)
    analysis_model: str = Field(
        "gemini-3.5-flash",
        validation_alias="ANALYSIS_MODEL",
        description="Gemini text model for post-call analysis (a profile's analysis.model wins)",
    )
    analysis_max_attempts: int = Field(
        5,
        ge=1,
        le=50,
        validation_alias="ANALYSIS_MAX_ATTEMPTS",
        description="tries per call before its analysis is marked failed",
    )
    analysis_retry_delay_s: float = Field(
        5.0,
        gt=0,
        validation_alias="ANALYSIS_RETRY_DELAY",
        description="wait before the first retry; doubles per attempt (with jitter, max 10 min)",
    )
    analysis_timeout_s: float = Field(
        60.0, gt=0, validation_alias="ANALYSIS_TIMEOUT", description="longest one attempt may take"
    )
    analysis_poll_interval_s: float = Field(
        10.0,
        gt=0,
        validation_alias="ANALYSIS_POLL_INTERVAL",
        description="how often the worker looks in the database for calls to analyse "
        "(calls ending here wake it at once)",
    )
    memory_timeout_s: float = Field(
        0.3,
        gt=0,
        validation_alias="MEMORY_TIMEOUT",
        description="longest a call's start waits for the caller's memory before going on without",
    )

    @field_validator("outbound_allowed_destinations", mode="before")
    @classmethod
    def _split_destinations(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    # --- end-of-call webhooks (livecall.outcomes) and signed tool requests
    call_webhook_url: str | None = Field(
        None,
        validation_alias="CALL_WEBHOOK_URL",
        description="where each call's end-of-call report is POSTed (a profile's webhook_url "
        "wins); unset: none",
    )
    call_webhook_secret: SecretStr | None = Field(
        None,
        validation_alias="CALL_WEBHOOK_SECRET",
        description="HMAC-SHA256 key of X-Livecall-Signature; webhooks are not sent without it",
    )
    webhook_timeout_s: float = Field(10.0, gt=0, validation_alias="WEBHOOK_TIMEOUT")
    webhook_backoff_base_s: float = Field(
        1.0, gt=0, validation_alias="WEBHOOK_BACKOFF_BASE", description="first retry delay"
    )
    webhook_backoff_max_s: float = Field(
        3600.0, gt=0, validation_alias="WEBHOOK_BACKOFF_MAX", description="longest retry delay"
    )
    webhook_give_up_s: float = Field(
        86400.0,
        gt=0,
        validation_alias="WEBHOOK_GIVE_UP",
        description="a delivery still failing this long after it became due is marked failed",
    )
    webhook_concurrency: int = Field(8, ge=1, validation_alias="WEBHOOK_CONCURRENCY")
    webhook_poll_interval_s: float = Field(
        2.0,
        gt=0,
        validation_alias="WEBHOOK_POLL_INTERVAL",
        description="how often the outbox is checked for due deliveries (other instances' too)",
    )
    webhook_lease_s: float = Field(
        60.0,
        gt=0,
        validation_alias="WEBHOOK_LEASE",
        description="a claimed delivery is this instance's for this long (above WEBHOOK_TIMEOUT)",
    )
    webhook_analysis_wait_s: float = Field(
        900.0,
        gt=0,
        validation_alias="WEBHOOK_ANALYSIS_WAIT",
        description="longest a webhook waits for its call's post-call analysis, then goes "
        "without it",
    )
    recording_link_secret: SecretStr | None = Field(
        None,
        validation_alias="RECORDING_LINK_SECRET",
        description="HMAC key of the expiring recording links in webhooks (default: derived "
        "from LIVECALL_API_TOKEN; neither set: no link)",
    )
    recording_link_ttl_s: float = Field(7 * 86400.0, gt=0, validation_alias="RECORDING_LINK_TTL")
    http_tools_secret: SecretStr | None = Field(
        None,
        validation_alias="HTTP_TOOLS_SECRET",
        description="HMAC key signing the call context headers of HTTP tools (a tool's own "
        "signing_secret wins)",
    )

    @field_validator("trusted_proxies", "allowed_hosts", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            ipaddress.ip_network(entry, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("call_webhook_url")
    @classmethod
    def _webhook_url_is_absolute(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("CALL_WEBHOOK_URL must be an absolute http(s) URL")
        return value

    @field_validator("vonage_sample_rate")
    @classmethod
    def _vonage_rate(cls, value: int) -> int:
        if value not in (8000, 16000, 24000):
            raise ValueError("VONAGE_SAMPLE_RATE must be 8000, 16000 or 24000")
        return value

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

    @field_validator("exotel_url_secret")
    @classmethod
    def _exotel_secret_is_long(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and 0 < len(value.get_secret_value()) < 16:
            raise ValueError("EXOTEL_URL_SECRET must be at least 16 characters (a bearer secret)")
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

    def resolved_system_prompt(self) -> str:
        if self.system_prompt_file is not None:
            return self.system_prompt_file.read_text(encoding="utf-8").strip()
        return self.system_prompt

    def has_gemini_credentials(self) -> bool:
        if self.gemini_use_vertexai:  # a project, or an API key (Vertex AI express mode)
            key = self.gemini_api_key.get_secret_value() if self.gemini_api_key else ""
            return bool(self.gemini_project and self.gemini_location) or bool(key)
        return self.gemini_api_key is not None and bool(self.gemini_api_key.get_secret_value())


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
