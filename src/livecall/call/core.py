"""What a call's parts share and may ask of the call itself, as one typed surface.

The parts (`caller_pump`, `agent_pump`, `agent_output`, `gemini_sessions`, `tool_tasks`) each
hold the `CallBridge` that wired them, but they see it only as this `CallCore`: the call's
clock, turns, records and recording, its options, its stream and socket, the session
supervisor, and how to end it. So no part imports the bridge, and the bridge is the only
module that knows every part.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from livecall.agent import live_protocol as lp
from livecall.agent.gemini import GeminiLink
from livecall.audio.recording import StereoRecorder
from livecall.call.carrier_socket import CarrierSocket
from livecall.call.options import CallOptions
from livecall.call.supervisor import SessionSupervisor
from livecall.call.turns import TurnTracker
from livecall.carriers.base import CallStarted, CarrierStream
from livecall.records import CallObserver, TurnRecord

__all__ = ["CallCore"]


class CallCore(Protocol):
    call_sid: str
    start: CallStarted
    stream: CarrierStream
    socket: CarrierSocket
    options: CallOptions
    log: Any  # structlog's bound logger, with the call's ids
    turns: TurnTracker
    recorder: StereoRecorder | None
    observer: CallObserver
    supervisor: SessionSupervisor
    usage: lp.Usage
    transcript: deque[TurnRecord]
    link_factory: Callable[[str | None], GeminiLink]
    ended: asyncio.Event  # set once the call is over, whichever side ended it
    giving_up: bool  # the apology (or failure transfer) is under way

    def now_ms(self) -> float:
        """Milliseconds since the call's stream started (the records' clock)."""
        ...

    def event(self, kind: str, **data: Any) -> None:
        """Record one call event (barge-in, reconnect, tool…)."""
        ...

    def flush_turns(self) -> None:
        """Hand the finished turns to the records and the transcript."""
        ...

    def finish(self, reason: str, *, failed: bool = False) -> None:
        """End the call now for `reason` (the first reason given wins)."""
        ...

    async def give_up(self, reason: str) -> None:
        """Gemini cannot be had: the apology (or failure transfer), then the end."""
        ...

    async def play_line(self, ulaw: bytes) -> bool:
        """A recorded line of livecall's own, played and waited for until heard."""
        ...

    def tools_running(self) -> bool: ...
