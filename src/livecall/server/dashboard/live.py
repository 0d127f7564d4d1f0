"""The live page: every call in progress, its words as they are spoken (server-sent events
from the live feed), and ending a call from the page."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from livecall.live_feed import LiveFeed
from livecall.server.dashboard.core import (
    END_REASON,
    SID_RE,
    Ctx,
    json_bytes,
    log,
)
from livecall.server.dashboard.words import end_reason_words
from livecall.server.registry import CallRegistry


def _with_partials(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A call's finished turns and, after them, the lines still being spoken."""
    done = list(state.get("turns") or ())
    finished = {t.get("index") for t in done}
    partials = [p for i, p in (state.get("partials") or {}).items() if i not in finished]
    return sorted(done + partials, key=lambda t: t.get("index") or 0)


def _elapsed(started_at: Any) -> float | None:
    """Seconds since a call (held by another instance) started, from its info's start time."""
    try:
        started = datetime.fromisoformat(str(started_at))
    except ValueError:
        return None
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    return round(max(0.0, (datetime.now(UTC) - started).total_seconds()), 1)


def live_snapshot(feed: LiveFeed | None, registry: CallRegistry) -> list[dict[str, Any]]:
    """Every call in progress: the registry says which, the feed what was said so far."""
    now = time.monotonic()
    known = feed.calls if feed is not None else {}
    calls: list[dict[str, Any]] = []
    for sid, active in list(registry.active.items()):
        state = known.get(sid, {})
        calls.append(
            {
                "call_sid": sid,
                "stream_sid": active.stream_sid,
                "elapsed_s": round(now - active.started, 1),
                "info": state.get("info") or {},
                "turns": _with_partials(state),
            }
        )
    for sid, state in list(known.items()):
        if sid not in registry.active:
            calls.append(
                {
                    "call_sid": sid,
                    "stream_sid": (state.get("info") or {}).get("stream_sid"),
                    "elapsed_s": _elapsed((state.get("info") or {}).get("started_at")),
                    "info": state.get("info") or {},
                    "turns": _with_partials(state),
                }
            )
    return calls


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"


async def live_events(
    feed: LiveFeed | None,
    registry: CallRegistry,
    *,
    ping_s: float = 15.0,
    max_s: float = 600.0,
    tick_s: float = 1.0,
) -> AsyncIterator[bytes]:
    """The live page's event stream: a snapshot, then each feed message as it happens.

    Subscribes before the snapshot so nothing falls between them (the page ignores repeats);
    a `gap` (this browser was too slow) is answered with a fresh snapshot. The stream ends
    after `max_s` (the browser reconnects by itself) or when the server drains, so an open
    page never holds a shutdown.
    """
    loop = asyncio.get_running_loop()
    queue = feed.subscribe() if feed is not None else None
    try:
        yield b"retry: 2000\n\n"
        yield _sse("snapshot", {"calls": live_snapshot(feed, registry)})
        deadline = loop.time() + max_s
        last_sent = loop.time()
        while not registry.draining and loop.time() < deadline:
            message = None
            try:
                if queue is None:
                    await asyncio.sleep(tick_s)
                else:
                    message = await asyncio.wait_for(queue.get(), tick_s)
            except TimeoutError:
                pass
            if message is None:
                if loop.time() - last_sent >= ping_s:
                    last_sent = loop.time()
                    yield b": ping\n\n"
                continue
            last_sent = loop.time()
            if message.get("type") == "gap":
                yield _sse("snapshot", {"calls": live_snapshot(feed, registry)})
            else:
                if message.get("type") == "call_ended":  # why, in the owner's words
                    reason = (message.get("summary") or {}).get("end_reason")
                    message = {**message, "ended_words": end_reason_words(reason)}
                yield _sse(str(message.get("type", "message")), message)
    finally:
        if queue is not None and feed is not None:
            feed.unsubscribe(queue)


async def live_page(dash: Ctx, request: Request) -> Response:
    session = dash.current(request)
    if session is None:
        return dash.login_redirect(request)
    return dash.render(
        request,
        "live.html",
        session,
        nav="live",
        calls=live_snapshot(dash.feed, dash.state.registry),
    )


async def live_stream(dash: Ctx, request: Request) -> Response:
    dash.require(request)
    return StreamingResponse(
        live_events(dash.feed, dash.state.registry),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def end_call(dash: Ctx, request: Request, sid: str) -> Response:
    session = dash.require(request)
    form = await dash.read_form(request)
    dash.check_post(request, session, form)
    active = dash.state.registry.active.get(sid)
    if active is not None and active.bridge is not None:
        active.bridge.end(END_REASON)
    else:
        # held by another instance: asked through the cluster (Redis), as the API does
        if not SID_RE.match(sid) or not await dash.state.cluster.request(
            sid, "end", reason=END_REASON
        ):
            raise HTTPException(404, "no such call in progress")
    log.info("dashboard.end_call", call_sid=sid)
    if "application/json" in request.headers.get("accept", ""):
        return Response(
            json_bytes({"call_sid": sid, "ending": True}), 202, media_type="application/json"
        )
    return RedirectResponse("/live", status_code=303)
