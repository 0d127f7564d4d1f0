"""Gemini: credentials (Developer API or Vertex AI), the model, voice, prompt and turn taking,
endpoints, and how sessions connect, reconnect and rotate."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr

from livecall.settings.section import Section

DEFAULT_SYSTEM_PROMPT = (
    "You are the friendly phone receptionist of a small business. Speak briefly and naturally, "
    "one or two sentences at a time, as people do on the phone. If the caller presses keypad "
    "digits you are told which ones."
)


class GeminiSettings(Section):
    """The Gemini Live connection and the default agent (profiles override it)."""

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

    def resolved_system_prompt(self) -> str:
        if self.system_prompt_file is not None:
            return self.system_prompt_file.read_text(encoding="utf-8").strip()
        return self.system_prompt

    def has_gemini_credentials(self) -> bool:
        if self.gemini_use_vertexai:  # a project, or an API key (Vertex AI express mode)
            key = self.gemini_api_key.get_secret_value() if self.gemini_api_key else ""
            return bool(self.gemini_project and self.gemini_location) or bool(key)
        return self.gemini_api_key is not None and bool(self.gemini_api_key.get_secret_value())
