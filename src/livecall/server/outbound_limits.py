"""How many outbound calls, how fast: rate caps (per minute, per hour) and a cap on calls
ringing or in progress at once. Pure logic, the clock passed in; one per server process.

A call counts from the moment it is admitted (before Twilio is even asked, so two requests at
once cannot both take the last slot) until its stream has come and gone, or, for a call whose
stream never came (nobody answered), until `ring_s` after it was placed. Every admitted
attempt counts against the rates, whether Twilio accepts it or not.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Container
from dataclasses import dataclass

__all__ = ["OutboundLimits", "Refusal"]

# Twilio rings an unanswered call for 60 s by default; a margin for the stream to connect.
RING_S = 90.0


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    retry_after_s: int


class OutboundLimits:
    """`admit(now, live)` reserves a slot or says why not; then `placed(sid)` or `release()`."""

    def __init__(
        self, per_minute: int, per_hour: int, concurrent: int, *, ring_s: float = RING_S
    ) -> None:
        self.per_minute = per_minute
        self.per_hour = per_hour
        self.concurrent = concurrent
        self.ring_s = ring_s
        self._attempts: deque[float] = deque()
        self._reserved = 0
        self._calls: dict[str, tuple[float, bool]] = {}  # sid -> (placed at, seen live)
        self._refs: dict[str, str] = {}  # outbound token ref -> the id the call was placed as

    def in_progress(self, now: float, live: Container[str]) -> int:
        """Calls admitted and not over; `live` holds the SIDs of the calls streaming now."""
        for sid, (placed_at, seen) in list(self._calls.items()):
            if sid in live:
                self._calls[sid] = (placed_at, True)
            elif seen or now - placed_at > self.ring_s:
                del self._calls[sid]
        return self._reserved + len(self._calls)

    def admit(self, now: float, live: Container[str]) -> Refusal | None:
        attempts = self._attempts
        while attempts and now - attempts[0] >= 3600.0:
            attempts.popleft()
        if self.in_progress(now, live) >= self.concurrent:
            return Refusal(f"{self.concurrent} outbound calls already in progress", 5)
        last_minute = sum(1 for t in attempts if now - t < 60.0)
        if last_minute >= self.per_minute:
            oldest = attempts[len(attempts) - last_minute]
            return Refusal(
                f"at most {self.per_minute} outbound calls a minute",
                max(1, math.ceil(oldest + 60.0 - now)),
            )
        if len(attempts) >= self.per_hour:
            return Refusal(
                f"at most {self.per_hour} outbound calls an hour",
                max(1, math.ceil(attempts[0] + 3600.0 - now)),
            )
        attempts.append(now)
        self._reserved += 1
        return None

    def placed(self, call_sid: str, now: float, *, ref: str | None = None) -> None:
        """The admitted call exists (the carrier gave it an id). `ref`: its outbound stream
        token's reference, for a carrier whose id for the request is not the call's."""
        self._reserved = max(0, self._reserved - 1)
        self._calls[call_sid] = (now, False)
        if ref is not None:
            self._refs[ref] = call_sid
            while len(self._refs) > max(self.concurrent * 4, 64):  # never answered
                self._refs.pop(next(iter(self._refs)))

    def answered(self, ref: str, call_id: str) -> None:
        """The call placed with `ref` was answered as `call_id` (Plivo answers with a CallUUID
        other than the request's id): it counts under that id from now on."""
        placed_as = self._refs.pop(ref, None)
        if placed_as is None or placed_as == call_id:
            return
        entry = self._calls.pop(placed_as, None)
        if entry is not None:
            self._calls[call_id] = entry

    def release(self) -> None:
        """The admitted call was never created."""
        self._reserved = max(0, self._reserved - 1)
