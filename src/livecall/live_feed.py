"""Live calls as a stream of small dicts, for whoever watches (the dashboard's live page).

Each call's observer is a `FanOut` of the store's writer and this feed. Subscribers get
bounded queues: a slow browser loses updates (and is told so), it never slows a call.

Words arrive as Gemini transcribes them, not when a turn completes: the bridge calls
`live_partial` on every transcription, and the feed publishes a `partial` line (same turn
index as the final one, which replaces it in place). With a cluster, every message also goes
out through `relay` (Redis) and other instances' messages come in through `receive`, so any
instance's live page shows every instance's calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from livecall.records import CallEventRecord, CallInfo, CallObserver, CallSummary, TurnRecord

__all__ = ["FanOut", "LiveFeed", "OpenTurns", "forward_partial", "live_partial"]

MAX_REMOTE_CALLS = 500  # another instance's calls kept for the snapshot, at most
# another instance's call not heard of for this long is forgotten (that instance died mid-call)
REMOTE_STALE_S = 2 * 3600.0


def _plain(value: Any) -> dict[str, Any]:
    out = dataclasses.asdict(value)
    for key, item in out.items():
        if isinstance(item, datetime):
            out[key] = item.isoformat()
    return out


def forward_partial(observer: Any, lines: list[TurnRecord]) -> None:
    """Hands partial lines to `observer` if it takes them (wrappers pass them on)."""
    partial = getattr(observer, "partial", None)
    if partial is not None:
        partial(lines)


class OpenTurns(Protocol):
    """What the feed reads of a call's turns (`call.turns.TurnTracker`; the call imports the
    feed, so the feed names only what it needs)."""

    def open_lines(self) -> list[TurnRecord]: ...


def live_partial(observer: Any, turns: OpenTurns) -> None:
    """The bridge's hook after each transcription: the open turns' words so far, to watchers."""
    if getattr(observer, "partial", None) is not None:
        forward_partial(observer, turns.open_lines())


class LiveFeed:
    def __init__(self, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.calls: dict[str, dict[str, Any]] = {}  # call_sid -> info + turns so far
        # other instances get this process's messages through here (the cluster sets it)
        self.relay: Callable[[dict[str, Any]], None] | None = None

    def apply(self, message: dict[str, Any]) -> None:
        """Keeps `calls` (what a new watcher's snapshot shows) up to date with a message."""
        kind, sid = message.get("type"), message.get("call_sid")
        if not isinstance(sid, str):
            return
        if kind == "call_started":
            self.calls[sid] = {
                "info": message.get("info") or {},
                "turns": [],
                "partials": {},
                "remote": bool(message.get("remote")),
            }
            return
        state = self.calls.get(sid)
        if state is None:
            return
        if kind == "turn":
            turn = message.get("turn") or {}
            state["turns"].append(turn)
            state["partials"].pop(turn.get("index"), None)
        elif kind == "partial":
            turn = message.get("turn") or {}
            state["partials"][turn.get("index")] = turn
        elif kind == "call_ended":
            self.calls.pop(sid, None)

    def receive(self, message: dict[str, Any]) -> None:
        """A message from another instance: kept for snapshots and passed to watchers here."""
        if not isinstance(message, dict) or message.get("type") not in (
            "call_started",
            "turn",
            "partial",
            "event",
            "call_ended",
        ):
            return
        message = {**message, "remote": True}
        now = time.monotonic()
        remote = [sid for sid, c in self.calls.items() if c.get("remote")]
        for sid in remote:
            if now - self.calls[sid].get("seen", now) > REMOTE_STALE_S:
                self.calls.pop(sid, None)
        remote = [sid for sid in remote if sid in self.calls]
        if message["type"] == "call_started" and len(remote) >= MAX_REMOTE_CALLS:
            self.calls.pop(remote[0], None)  # the oldest: its instance most likely died
        self.apply(message)
        call_sid = message.get("call_sid")
        state = self.calls.get(call_sid) if isinstance(call_sid, str) else None
        if state is not None:
            state["seen"] = now
        self.publish(message, relay=False)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self.queue_size)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)

    def publish(self, message: dict[str, Any], *, relay: bool = True) -> None:
        if relay and self.relay is not None:
            try:
                self.relay(message)
            except Exception:  # the cluster's trouble must not reach the call
                import structlog

                structlog.get_logger("livecall.live").exception("live.relay_failed")
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                with_gap = {"type": "gap", "call_sid": message.get("call_sid")}
                try:
                    queue.get_nowait()
                    queue.put_nowait(with_gap)
                except (asyncio.QueueEmpty, asyncio.QueueFull):
                    pass

    def observer(self, call_sid: str) -> CallObserver:
        return _FeedObserver(self, call_sid)


class _FeedObserver:
    def __init__(self, feed: LiveFeed, call_sid: str) -> None:
        self.feed = feed
        self.call_sid = call_sid
        self._shown: dict[int, str] = {}  # turn index -> partial text last published

    def _send(self, message: dict[str, Any]) -> None:
        self.feed.apply(message)
        self.feed.publish(message)

    def call_started(self, info: CallInfo) -> None:
        self._send({"type": "call_started", "call_sid": self.call_sid, "info": _plain(info)})

    def partial(self, lines: list[TurnRecord]) -> None:
        """Open turns' words so far; only lines whose text changed are published."""
        for line in lines:
            if not line.text or self._shown.get(line.index) == line.text:
                continue
            self._shown[line.index] = line.text
            data = _plain(line)
            data["partial"] = True
            self._send({"type": "partial", "call_sid": self.call_sid, "turn": data})

    def turn(self, turn: TurnRecord) -> None:
        self._shown.pop(turn.index, None)
        self._send({"type": "turn", "call_sid": self.call_sid, "turn": _plain(turn)})

    def event(self, event: CallEventRecord) -> None:
        self.feed.publish({"type": "event", "call_sid": self.call_sid, "event": _plain(event)})

    def call_ended(self, summary: CallSummary) -> None:
        self._shown.clear()
        self._send({"type": "call_ended", "call_sid": self.call_sid, "summary": _plain(summary)})


class FanOut:
    """One observer that hands every record to several; one failing never stops the others."""

    def __init__(self, *observers: CallObserver) -> None:
        self.observers = observers

    def _each(self, method: str, value: Any) -> None:
        for observer in self.observers:
            self._each_one(observer, method, value)

    def call_started(self, info: CallInfo) -> None:
        self._each("call_started", info)

    def turn(self, turn: TurnRecord) -> None:
        self._each("turn", turn)

    def event(self, event: CallEventRecord) -> None:
        self._each("event", event)

    def call_ended(self, summary: CallSummary) -> None:
        self._each("call_ended", summary)

    def partial(self, lines: list[TurnRecord]) -> None:
        for observer in self.observers:
            if getattr(observer, "partial", None) is not None:
                self._each_one(observer, "partial", lines)

    def _each_one(self, observer: Any, method: str, value: Any) -> None:
        try:
            getattr(observer, method)(value)
        except Exception:  # an observer's bug must not reach the call
            import structlog

            structlog.get_logger("livecall.records").exception(
                "observer.failed", observer=type(observer).__name__, method=method
            )
