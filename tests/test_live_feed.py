"""The live feed's partial lines: words reach watchers as Gemini transcribes them, the
finished turn replaces the partial line, and other instances get both through Redis."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from livecall.call.turns import TurnTracker
from livecall.cluster import ClusterRegistry
from livecall.live_feed import REMOTE_STALE_S, FanOut, LiveFeed, live_partial
from livecall.metrics import Metrics
from livecall.records import CallInfo, CallSummary
from livecall.server.dashboard import live_snapshot
from livecall.server.registry import CallRegistry
from support import eventually, redis_reachable, service_missing

SID = "CA" + "1" * 32
REDIS_URL = os.environ.get("LIVECALL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def info(sid: str = SID) -> CallInfo:
    return CallInfo(call_sid=sid, stream_sid="MZ" + "2" * 32, started_at=datetime.now(UTC))


def drain(queue: asyncio.Queue[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


def test_open_lines_follow_the_words_as_they_come() -> None:
    turns = TurnTracker(SID)
    assert turns.open_lines() == []
    turns.caller_frame(100, voiced=True)
    turns.caller_transcript(400, "I'd like")
    (line,) = turns.open_lines()
    assert (line.speaker, line.text, line.index, line.start_ms) == ("caller", "I'd like", 0, 100)
    turns.caller_transcript(600, " a table")
    assert turns.open_lines()[0].text == "I'd like a table"
    turns.agent_audio(900, 800)
    turns.agent_transcript(900, "Of course")
    caller, agent = turns.open_lines()  # the caller's turn stays open until the reply is done
    assert (caller.index, agent.index, agent.speaker, agent.text) == (0, 1, "agent", "Of course")
    turns.turn_complete(1500)
    assert turns.open_lines() == []
    assert [(t.index, t.text) for t in turns.drain()] == [(0, "I'd like a table"), (1, "Of course")]


async def test_partials_are_published_once_per_change_and_replaced_by_the_turn() -> None:
    feed = LiveFeed()
    queue = feed.subscribe()
    # the chain the app builds: metrics wrapping a fan-out that holds the feed
    observer = Metrics().observer(FanOut(feed.observer(SID)))
    turns = TurnTracker(SID)
    observer.call_started(info())
    turns.caller_transcript(200, "Do you open")
    live_partial(observer, turns)
    live_partial(observer, turns)  # nothing new: nothing sent
    turns.caller_transcript(400, " on Sundays?")
    live_partial(observer, turns)
    messages = drain(queue)
    partials = [m["turn"]["text"] for m in messages if m["type"] == "partial"]
    assert partials == ["Do you open", "Do you open on Sundays?"]
    assert all(m["turn"]["partial"] for m in messages if m["type"] == "partial")
    registry = CallRegistry(10)
    (call,) = live_snapshot(feed, registry)  # a new watcher sees the words so far
    assert [t["text"] for t in call["turns"]] == ["Do you open on Sundays?"]

    turns.agent_audio(800, 400)
    turns.turn_complete(1200)
    for turn in turns.drain():
        observer.turn(turn)
    (call,) = live_snapshot(feed, registry)
    assert [(t["speaker"], t["text"], t.get("partial")) for t in call["turns"]] == [
        ("caller", "Do you open on Sundays?", None),
        ("agent", "", None),
    ]
    observer.call_ended(CallSummary(SID, datetime.now(UTC), 1.2, "caller_stop"))
    assert live_snapshot(feed, registry) == []


def test_a_remote_instance_s_messages_are_shown_and_forgotten_at_the_end() -> None:
    feed = LiveFeed()
    queue = feed.subscribe()
    sent: list[dict[str, Any]] = []
    feed.relay = sent.append
    started = (datetime.now(UTC) - timedelta(seconds=42)).isoformat()
    info = {"from_number": "+1555", "started_at": started}
    feed.receive({"type": "call_started", "call_sid": SID, "info": info})
    feed.receive({"type": "partial", "call_sid": SID, "turn": {"index": 0, "text": "Hi"}})
    feed.receive({"type": "bogus", "call_sid": SID})
    assert sent == []  # never echoed back to the cluster
    assert [m["type"] for m in drain(queue)] == ["call_started", "partial"]
    (call,) = live_snapshot(feed, CallRegistry(10))
    assert call["info"]["from_number"] == "+1555" and call["turns"][0]["text"] == "Hi"
    assert 41 <= call["elapsed_s"] < 60  # the timer of a call held elsewhere starts right
    feed.receive({"type": "call_ended", "call_sid": SID, "summary": {}})
    assert live_snapshot(feed, CallRegistry(10)) == []
    # an instance that died mid-call never says the call ended: it is forgotten in time
    feed.receive({"type": "call_started", "call_sid": SID, "info": info})
    feed.calls[SID]["seen"] -= REMOTE_STALE_S + 1
    other = "CA" + "3" * 32
    feed.receive({"type": "call_started", "call_sid": other, "info": info})
    assert [c["call_sid"] for c in live_snapshot(feed, CallRegistry(10))] == [other]


@pytest.mark.redis
async def test_partials_cross_instances_through_redis() -> None:
    if not await redis_reachable(REDIS_URL):
        service_missing(f"Redis is not reachable at {REDIS_URL}")
    prefix = f"lctest-{uuid.uuid4().hex[:10]}"
    a = ClusterRegistry(REDIS_URL, f"{prefix}-a", prefix=prefix, ttl_s=3.0, heartbeat_s=0.5)
    b = ClusterRegistry(REDIS_URL, f"{prefix}-b", prefix=prefix, ttl_s=3.0, heartbeat_s=0.5)
    feed_a, feed_b = LiveFeed(), LiveFeed()
    for reg, feed in ((a, feed_a), (b, feed_b)):
        feed.relay = reg.publish_live
        reg.on_live = feed.receive
        await reg.start()
    try:
        watcher = feed_b.subscribe()
        observer = feed_a.observer(SID)
        turns = TurnTracker(SID)
        observer.call_started(info())
        turns.caller_transcript(100, "Table for two")
        sent = time.monotonic()
        live_partial(observer, turns)

        async def arrived() -> dict[str, Any] | None:
            while not watcher.empty():
                message = watcher.get_nowait()
                if message["type"] == "partial":
                    return message
            return None

        message = await eventually(arrived, within=5)
        assert time.monotonic() - sent < 1.0
        assert message["turn"]["text"] == "Table for two" and message["remote"]
        assert SID in feed_b.calls and not feed_a.calls[SID].get("remote")
    finally:
        await a.stop()
        await b.stop()
