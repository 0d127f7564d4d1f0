"""The carriers: Twilio's credentials and outbound calls, and each other carrier's key."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode


class CarrierSettings(BaseSettings):
    """Twilio (signatures, REST call control, outbound calls) and the other carriers' keys."""

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

    @field_validator("outbound_allowed_destinations", mode="before")
    @classmethod
    def _split_destinations(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
