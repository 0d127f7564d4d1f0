"""What one call carries besides its knobs: the agent's profile, its actions, its log policy.

It used to travel as an untyped dict (`CallOptions.extra`), read by key in four modules, so a
misspelt key was a silent `None`. One typed object now: set once when the call is set up
(`AppState.call_setup`, the stream route), read by the bridge and the tools. The call's
actions (hang-up, transfer…) drive the bridge, so they hang on the server's `ActiveCall`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: profiles import the bridge, not the other way
    from livecall.agent.profiles import AgentProfile

__all__ = ["CallContext"]


@dataclass(slots=True)
class CallContext:
    """One call's wiring, typed."""

    agent_profile: AgentProfile | None = None  # the profile that answers; its tools use it
    # an outbound call with answering-machine detection: the greeting waits for a person
    deferred_greeting: str | None = None
    log_dtmf: bool = False  # keypad digits in logs and events (else masked)
    log_transcripts: bool = False  # transcript text in log lines (else lengths only)

    def profile(self) -> AgentProfile:
        """The call's profile; set up before any tool or route needs it."""
        if self.agent_profile is None:
            raise RuntimeError("the call has no agent profile: call_setup did not run")
        return self.agent_profile
