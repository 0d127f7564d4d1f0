"""When a call moves to a new Gemini session after a `goAway`: at a turn boundary, or at the
deadline whatever is happening.

Switching while someone speaks would cut the agent off or split the caller's words across two
sessions; waiting past the deadline would lose the session under the call. Pure, unit tested.
"""

from __future__ import annotations

__all__ = ["CALLER_QUIET_MS", "rotation_ready"]

CALLER_QUIET_MS = 300.0  # this long since the caller's last voiced frame: they paused


def rotation_ready(
    now_ms: float,
    deadline_ms: float | None,
    *,
    last_voice_ms: float | None,
    agent_turn_open: bool,
    playout_busy_until_ms: float,
    tools_running: bool,
) -> bool:
    """True when a rotation is due (`deadline_ms` set) and either the deadline has come or
    nobody is speaking: the caller quiet, no agent turn open, no agent audio left to play at
    the carrier, no tool call in flight."""
    if deadline_ms is None:
        return False
    if now_ms >= deadline_ms:
        return True
    caller_quiet = last_voice_ms is None or now_ms - last_voice_ms > CALLER_QUIET_MS
    return (
        caller_quiet
        and not agent_turn_open
        and playout_busy_until_ms <= now_ms
        and not tools_running
    )
