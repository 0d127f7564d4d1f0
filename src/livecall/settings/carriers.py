"""The carriers: Twilio's credentials and outbound calls, each other carrier's keys and REST."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from livecall.settings.section import Section


class CarrierSettings(Section):
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
    outbound_carrier: Literal["twilio", "telnyx", "plivo", "vonage", "exotel"] = Field(
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
        "enables GET|POST /vonage/answer, GET|POST /vonage/event and /ws/vonage",
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
    exotel_sample_rate: int = Field(
        16000,
        validation_alias="EXOTEL_SAMPLE_RATE",
        description="the 16-bit PCM rate livecall asks Exotel to stream at (the stream URL's "
        "sample-rate: 8000, 16000 or 24000; 16000 is the model's input rate)",
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
    vonage_application_id: str | None = Field(
        None,
        validation_alias="VONAGE_APPLICATION_ID",
        description="the Vonage application's id: with VONAGE_PRIVATE_KEY, end_call hangs up "
        "and transfer_call transfers Vonage calls over REST (application JWTs)",
    )
    vonage_private_key: SecretStr | None = Field(
        None,
        validation_alias="VONAGE_PRIVATE_KEY",
        description="the Vonage application's private key (PEM, newlines may be written \\n), "
        "or the path of a file holding it",
    )
    vonage_api_base: str | None = Field(
        None,
        validation_alias="VONAGE_API_BASE",
        description="override of https://api.nexmo.com (the REST simulator in tests); a call's "
        "own region_url is used when it names a Vonage host or this base's origin",
    )
    exotel_account_sid: str | None = Field(
        None,
        validation_alias="EXOTEL_ACCOUNT_SID",
        description="the Exotel account SID: with EXOTEL_API_KEY, EXOTEL_API_TOKEN and "
        "EXOTEL_URL_SECRET, enables outbound Exotel calls (Connect Voice AI)",
    )
    exotel_api_key: str | None = Field(
        None,
        validation_alias="EXOTEL_API_KEY",
        description="the Exotel API key (the user of the v1 Calls API's HTTP Basic auth)",
    )
    exotel_api_token: SecretStr | None = Field(
        None,
        validation_alias="EXOTEL_API_TOKEN",
        description="the Exotel API token (the password of the v1 Calls API's HTTP Basic auth)",
    )
    exotel_api_base: str | None = Field(
        None,
        validation_alias="EXOTEL_API_BASE",
        description="override of https://api.in.exotel.com (Mumbai; https://api.exotel.com is "
        "Singapore; the REST simulator in tests)",
    )

    @field_validator("outbound_allowed_destinations", mode="before")
    @classmethod
    def _split_destinations(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("vonage_sample_rate")
    @classmethod
    def _vonage_rate(cls, value: int) -> int:
        if value not in (8000, 16000, 24000):
            raise ValueError("VONAGE_SAMPLE_RATE must be 8000, 16000 or 24000")
        return value

    @field_validator("exotel_sample_rate")
    @classmethod
    def _exotel_rate(cls, value: int) -> int:
        if value not in (8000, 16000, 24000):
            raise ValueError("EXOTEL_SAMPLE_RATE must be 8000, 16000 or 24000")
        return value

    @field_validator("exotel_url_secret")
    @classmethod
    def _exotel_secret_is_long(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and 0 < len(value.get_secret_value()) < 16:
            raise ValueError("EXOTEL_URL_SECRET must be at least 16 characters (a bearer secret)")
        return value
