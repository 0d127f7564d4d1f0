"""Per-call knobs, from settings and the agent profile: what `CallBridge` and its parts read."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from livecall.agent import live_protocol as lp
from livecall.audio.recording import StereoRecorder
from livecall.call.context import CallContext

__all__ = ["CallOptions"]


@dataclass(slots=True)
class CallOptions:
    """Per-call knobs, from settings and the agent profile."""

    greeting: str | None = None
    max_duration_s: float = 3600.0
    caller_buffer_s: float = 15.0  # caller audio held while no Gemini session is usable
    connect_timeout_s: float = 10.0
    direction: str = "inbound"
    profile: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    tool_handler: Callable[[lp.FunctionCall], Awaitable[dict[str, Any]]] | None = None
    # where the stereo recording goes when the call ends (None: not recorded)
    recording_sink: Callable[[str, StereoRecorder, float], Awaitable[str | None]] | None = None
    # resilience
    reconnect_attempts: int = 5
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 4.0
    rotation_overlap: bool = True  # open the next session before closing the old one
    rotation_margin_s: float = 5.0  # switch at the latest this long before goAway's deadline
    stall_timeout_s: float = 10.0
    apology_ulaw: bytes | None = None  # what the caller hears when Gemini cannot be had
    # what the caller hears when the model failed to answer twice in a row (the call goes on)
    recovery_ulaw: bytes | None = None
    # instead of the apology: hand the caller to a person (the profile's on_failure target)
    failure_transfer: Callable[[], Awaitable[bool]] | None = None
    # awaited (bounded) after the caller is let go and before the call's summary: the carrier
    # REST request that ended the call (hang-up, transfer) records its outcome first, so the
    # record, the end-of-call webhook and the analysis see it
    settle_actions: Callable[[], Awaitable[None]] | None = None
    replay_limit_s: float = 30.0  # caller audio kept since the last resumable snapshot
    metrics: Any = None  # livecall.metrics.Metrics: per-frame timings, sampled
    non_blocking_tools: bool = False  # tools declared NON_BLOCKING: responses say when to speak
    max_duration_line: str = (
        "I'm sorry, we have reached the time limit for this call. Thank you for calling, goodbye!"
    )
    context: CallContext = field(default_factory=CallContext)  # profile, actions, log policy
