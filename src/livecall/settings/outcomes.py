"""After the call: analysis and caller memory (livecall.outcomes), webhooks, HTTP tools' signing."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from livecall.settings.section import Section


class OutcomeSettings(Section):
    """After the call: post-call analysis, caller memory, end-of-call webhooks, signed tool
    requests."""

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

    # end-of-call webhooks (livecall.outcomes) and signed tool requests
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

    @field_validator("call_webhook_url")
    @classmethod
    def _webhook_url_is_absolute(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("CALL_WEBHOOK_URL must be an absolute http(s) URL")
        return value
