"""The calls this process is carrying, and whether it may take another.

A webhook that says yes reserves a place for the stream that will follow, so a burst of
rings cannot overshoot the limit between the TwiML answer and the stream's `start`.
Reservations expire if the stream never arrives.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from livecall.agent.gemini import SessionCounter
from livecall.call.actions import BridgeActions
from livecall.call.bridge import CallBridge

__all__ = ["ActiveCall", "CallRegistry"]


@dataclass(slots=True)
class ActiveCall:
    """A call this process carries (or has reserved a place for)."""

    call_sid: str
    stream_sid: str
    started: float
    bridge: CallBridge | None = None  # None while the call is only reserved
    task: asyncio.Task[Any] | None = None
    # hang-up, transfer, DTMF, AMD verdicts: what the APIs and the dashboard do to the call
    actions: BridgeActions | None = None


class CallRegistry:
    def __init__(
        self,
        max_calls: int,
        reservation_ttl_s: float = 30.0,
        gemini_sessions: SessionCounter | None = None,
    ) -> None:
        self.max_calls = max_calls
        self.gemini_sessions = gemini_sessions or SessionCounter()
        self.reservation_ttl_s = reservation_ttl_s
        self.active: dict[str, ActiveCall] = {}
        self._reserved: dict[str, float] = {}
        self.draining = False
        self.refused = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _expire(self) -> None:
        now = time.monotonic()
        for sid, at in list(self._reserved.items()):
            if now - at > self.reservation_ttl_s:
                del self._reserved[sid]

    @property
    def load(self) -> int:
        self._expire()
        return len(self.active) + len(self._reserved)

    def reserve(self, call_sid: str) -> bool:
        """A webhook asks to take `call_sid`: False when full or draining."""
        if self.draining:
            self.refused += 1
            return False
        if call_sid in self._reserved or call_sid in self.active:
            return True
        if self.load >= self.max_calls or self._sessions_full():
            self.refused += 1
            return False
        self._reserved[call_sid] = time.monotonic()
        return True

    def _sessions_full(self) -> bool:
        """Every Gemini session the quota allows is taken, counting calls about to connect."""
        sessions = self.gemini_sessions
        return (
            sessions.limit is not None and sessions.active + len(self._reserved) >= sessions.limit
        )

    def admit(self, call: ActiveCall) -> bool:
        """A stream started: it takes its reservation, or a free place when it had none."""
        if self.draining:
            return False
        reserved = self._reserved.pop(call.call_sid, None) is not None
        if not reserved and self.load >= self.max_calls:
            self.refused += 1
            return False
        self.active[call.call_sid] = call
        self._idle.clear()
        return True

    def release(self, call_sid: str, call: ActiveCall | None = None) -> None:
        current = self.active.get(call_sid)
        if current is not None and (call is None or current is call):
            del self.active[call_sid]
        if not self.active:
            self._idle.set()

    async def wait_idle(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
