"""What a call leaves behind, as plain values the bridge hands to whoever keeps them.

The bridge never waits on storage: it calls a `CallObserver`'s methods, which must return at
once (queue the value and write it elsewhere). Offsets are milliseconds since the call's
stream started, so a transcript lines up with its recording.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

Speaker = Literal["caller", "agent"]
Direction = Literal["inbound", "outbound"]


@dataclass(slots=True)
class CallInfo:
    """Known when the stream starts."""

    call_sid: str
    stream_sid: str
    started_at: datetime  # UTC
    account_sid: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    direction: Direction = "inbound"
    profile: str | None = None
    model: str | None = None
    custom_parameters: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class TurnRecord:
    """One stretch of speech by one side.

    `text` is everything transcribed for the turn; for an agent turn cut short by the caller,
    `heard_text` is the part the caller actually heard before the audio was cleared.
    """

    call_sid: str
    index: int
    speaker: Speaker
    text: str
    start_ms: int
    end_ms: int | None = None
    interrupted: bool = False
    heard_text: str | None = None
    # `heard_text` cut where livecall's pacing model says playout was, not where the carrier
    # confirmed it (a carrier without marks): shown as "estimated"
    heard_estimated: bool = False
    # agent turns: end of the caller's speech -> first agent audio sent to the caller
    first_audio_latency_ms: float | None = None
    # agent turns cut short: the model's `interrupted` -> `clear` sent to the carrier
    barge_in_stop_ms: float | None = None


EventKind = Literal[
    "dtmf",
    "interrupted",
    "tool_call",
    "tool_result",
    "tool_cancelled",
    "go_away",
    "turn_failed",  # {"reason": turnCompleteReason, "action": "reprompt" | "recovery_line"}
    "session_resumed",
    "session_started",
    "reconnect",
    "error",
    "protocol_error",
    "transfer",
    "hangup",
]


@dataclass(slots=True)
class CallEventRecord:
    """Anything else worth seeing afterwards: keypad digits, tool calls, session changes, errors."""

    call_sid: str
    at_ms: int
    kind: str  # one of EventKind; plain str so new kinds do not need a schema change
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class CallSummary:
    """Known when the call ends; `end_reason` says who or what ended it."""

    call_sid: str
    ended_at: datetime  # UTC
    duration_s: float
    # caller_stop, caller_closed, agent_hangup, gemini_failed, max_duration, shutdown…
    end_reason: str
    status: Literal["completed", "failed"] = "completed"
    turns: int = 0
    interruptions: int = 0
    frames_in: int = 0
    frames_out: int = 0
    frames_missing: int = 0
    gemini_sessions: int = 1
    prompt_tokens: int = 0
    response_tokens: int = 0
    total_tokens: int = 0
    first_audio_latencies_ms: list[float] = field(default_factory=list)
    recording_path: str | None = None


class CallObserver(Protocol):
    """Receives a call's records as they happen. Every method must return without blocking."""

    def call_started(self, info: CallInfo) -> None: ...

    def turn(self, turn: TurnRecord) -> None: ...

    def event(self, event: CallEventRecord) -> None: ...

    def call_ended(self, summary: CallSummary) -> None: ...


class NullObserver:
    """Keeps nothing: the default when no store is configured."""

    def call_started(self, info: CallInfo) -> None:
        return None

    def turn(self, turn: TurnRecord) -> None:
        return None

    def event(self, event: CallEventRecord) -> None:
        return None

    def call_ended(self, summary: CallSummary) -> None:
        return None
