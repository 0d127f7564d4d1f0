"""Calls: capacity and the busy answer, per-call limits and timeouts, the agent profiles
file, tool timeouts, the drain."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from livecall.settings.section import Section


class CallSettings(Section):
    """Limits and timings of each call and of the process's capacity."""

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
