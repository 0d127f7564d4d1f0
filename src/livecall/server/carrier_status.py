"""A carrier's call statuses (answered, completed…) kept as events of the call they are about.

A status webhook (Vonage's event URL) reports on calls this process answered. A status is
kept as a `carrier_status` event of its call: through the call's bridge while the call is
live (the store, the live feed, the webhooks see it like any other event); held while the call
is still being set up (a leg's `answered` can beat the stream's start) and written with the
next one; written to the call's stored record once its stream is over (Vonage's `completed`
follows the socket's close), for `ttl_s` after the answer. Offsets are from the stream's start,
as every event's. Statuses about calls not answered here, or beyond `max_events` for one call,
are not kept: a status webhook cannot grow the store without bound. Only the status word is
kept (no numbers, no carrier payload).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from livecall.records import CallEventRecord

if TYPE_CHECKING:
    from livecall.call.bridge import CallBridge
    from livecall.records import CallObserver
    from livecall.server.state import AppState

__all__ = ["STATUS_EVENT", "CarrierStatuses"]

STATUS_EVENT = "carrier_status"
_STATUS_RE = re.compile(r"^[a-z][a-z_-]{0,31}$")


@dataclass(slots=True)
class _Call:
    at: float  # monotonic: answered, then the stream's start
    phase: Literal["answered", "started", "ended"] = "answered"
    events: int = 0
    pending: list[tuple[float, str]] = field(default_factory=list)  # (arrived, status)


class CarrierStatuses:
    """One carrier's calls (answered, started, ended here) and their statuses as events."""

    def __init__(
        self,
        state: AppState,
        carrier: str,
        *,
        ttl_s: float,
        max_calls: int = 10_000,
        max_events: int = 32,
    ) -> None:
        self.state = state
        self.carrier = carrier
        self.ttl_s = ttl_s
        self.max_calls = max_calls
        self.max_events = max_events
        self._calls: OrderedDict[str, _Call] = OrderedDict()

    def answered(self, call_id: str) -> None:
        """The call's webhook was answered here: its statuses are kept from now on."""
        now = time.monotonic()
        self._expire(now)
        if call_id not in self._calls:
            self._calls[call_id] = _Call(now)
            while len(self._calls) > self.max_calls:
                self._calls.popitem(last=False)

    def started(self, call_id: str) -> None:
        """The call's stream started (offsets count from here)."""
        call = self._calls.get(call_id)
        if call is None:
            self.answered(call_id)
            call = self._calls[call_id]
        call.at, call.phase = time.monotonic(), "started"
        self._calls.move_to_end(call_id)

    def ended(self, call_id: str) -> None:
        """The call's stream is over: statuses held so far, and later ones, go to its record
        (unless a newer stream of the call is live: then they go through its bridge)."""
        call = self._calls.get(call_id)
        if call is not None:
            call.phase = "ended"
            if self._bridge(call_id) is None:
                self._flush(call_id, call, None)

    def record(self, call_id: str, status: str) -> bool:
        """Keep `status` as an event of `call_id`; False when it is not kept (a call not
        answered here, too many statuses, or not a status word)."""
        now = time.monotonic()
        self._expire(now)
        call = self._calls.get(call_id)
        status = status.lower()
        if call is None or call.events >= self.max_events or not _STATUS_RE.match(status):
            return False
        call.events += 1
        call.pending.append((now, status))
        bridge = self._bridge(call_id)
        if call.phase != "answered" and bridge is not None:
            self._flush(call_id, call, bridge)
        elif call.phase == "ended":
            self._flush(call_id, call, None)
        return True

    def _bridge(self, call_id: str) -> CallBridge | None:
        live = self.state.registry.active.get(call_id)
        return live.bridge if live is not None else None

    def _flush(self, call_id: str, call: _Call, bridge: CallBridge | None) -> None:
        if not call.pending:
            return
        # live: the call's own observer, in step with its events; over: its stored record
        # (a writer that numbers on from where the call's stopped)
        observer: CallObserver = (
            bridge.observer if bridge is not None else self.state.store.observer(call_id)
        )
        for arrived, status in call.pending:
            at_ms = max(0, round((arrived - call.at) * 1000.0))
            data = {"carrier": self.carrier, "status": status}
            observer.event(CallEventRecord(call_id, at_ms, STATUS_EVENT, data))
        call.pending.clear()

    def _expire(self, now: float) -> None:
        while self._calls:
            call_id, oldest = next(iter(self._calls.items()))
            if now - oldest.at <= self.ttl_s:
                return
            del self._calls[call_id]
