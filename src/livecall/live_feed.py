"""Live calls as a stream of small dicts, for whoever watches (the dashboard's live page).

Each call's observer is a `FanOut` of the store's writer and this feed. Subscribers get
bounded queues: a slow browser loses updates (and is told so), it never slows a call.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime
from typing import Any

from livecall.records import CallEventRecord, CallInfo, CallObserver, CallSummary, TurnRecord

__all__ = ["FanOut", "LiveFeed"]


def _plain(value: Any) -> dict[str, Any]:
    out = dataclasses.asdict(value)
    for key, item in out.items():
        if isinstance(item, datetime):
            out[key] = item.isoformat()
    return out


class LiveFeed:
    def __init__(self, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.calls: dict[str, dict[str, Any]] = {}  # call_sid -> info + turns so far

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self.queue_size)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)

    def publish(self, message: dict[str, Any]) -> None:
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

    def call_started(self, info: CallInfo) -> None:
        state = {"info": _plain(info), "turns": []}
        self.feed.calls[self.call_sid] = state
        self.feed.publish(
            {"type": "call_started", "call_sid": self.call_sid, "info": state["info"]}
        )

    def turn(self, turn: TurnRecord) -> None:
        data = _plain(turn)
        state = self.feed.calls.get(self.call_sid)
        if state is not None:
            state["turns"].append(data)
        self.feed.publish({"type": "turn", "call_sid": self.call_sid, "turn": data})

    def event(self, event: CallEventRecord) -> None:
        self.feed.publish({"type": "event", "call_sid": self.call_sid, "event": _plain(event)})

    def call_ended(self, summary: CallSummary) -> None:
        self.feed.calls.pop(self.call_sid, None)
        self.feed.publish(
            {"type": "call_ended", "call_sid": self.call_sid, "summary": _plain(summary)}
        )


class FanOut:
    """One observer that hands every record to several; one failing never stops the others."""

    def __init__(self, *observers: CallObserver) -> None:
        self.observers = observers

    def _each(self, method: str, value: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(value)
            except Exception:  # an observer's bug must not reach the call
                import structlog

                structlog.get_logger("livecall.records").exception(
                    "observer.failed", observer=type(observer).__name__, method=method
                )

    def call_started(self, info: CallInfo) -> None:
        self._each("call_started", info)

    def turn(self, turn: TurnRecord) -> None:
        self._each("turn", turn)

    def event(self, event: CallEventRecord) -> None:
        self._each("event", event)

    def call_ended(self, summary: CallSummary) -> None:
        self._each("call_ended", summary)
