"""The record pages: the calls list (and search), one call with its transcript and
recording, its webhook deliveries, and the statistics."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from livecall.server.api import CallDetail, CallOut, EventOut, StatsOut, TurnOut, _columns
from livecall.server.dashboard.core import (
    _QUIET_EVENTS,
    _SID_RE,
    STATIC_DIR,
    Ctx,
    _database,
    _day,
    _json,
    _midnight,
    _Unavailable,
    _unheard,
    _webhook_deliveries,
    log,
)
from livecall.store.repository import InvalidCursor

MAX_STATS_DAYS = 92
HISTOGRAM_CALLS = 2000  # the duration histogram looks at this many most recent calls at most
_CALL_SID = re.compile(r"^CA[0-9a-fA-F]{32}$")
_NUMBER_JUNK = re.compile(r"[\s().-]")


async def calls_page(
    dash: Ctx,
    request: Request,
    since: str | None = None,
    until: str | None = None,
    q: str | None = None,
    status: str | None = None,
    cursor: str | None = None,
) -> Response:
    session = dash.current(request)
    if session is None:
        return dash.login_redirect(request)
    query = (q or "").strip()[:64]
    if _CALL_SID.match(query):  # a pasted call SID: straight to its page
        return RedirectResponse(f"/calls/{query}", status_code=303)
    number = _NUMBER_JUNK.sub("", query) or None
    start, end = _day(since), _day(until)
    status = status if status in ("in_progress", "completed", "failed") else None
    error = None
    try:
        with _database():
            page = await dash.repo.list_calls(
                since=_midnight(start) if start else None,
                until=_midnight(end + timedelta(days=1)) if end else None,
                number=number,
                status=status,
                limit=50,
                cursor=cursor or None,
            )
    except InvalidCursor:
        error = "That page link is no longer valid; showing the newest calls."
        with _database():
            page = await dash.repo.list_calls(number=number, status=status, limit=50)
    except _Unavailable:
        return dash.unavailable(request, session)
    filters = {
        "since": start.isoformat() if start else "",
        "until": end.isoformat() if end else "",
        "q": query,
        "status": status or "",
    }
    return dash.render(
        request,
        "calls.html",
        session,
        nav="calls",
        calls=[CallOut.of(c) for c in page.items],
        total=page.total,
        next_cursor=page.next_cursor,
        paged=bool(cursor),
        filters=filters,
        filter_query={k: v for k, v in filters.items() if v},
        error=error,
    )


async def call_page(dash: Ctx, request: Request, sid: str) -> Response:
    session = dash.current(request)
    if session is None:
        return dash.login_redirect(request)
    if not _SID_RE.match(sid):
        return dash.not_found(request, session, "No such call.")
    try:
        with _database():
            call = await dash.repo.get_call(sid)
    except _Unavailable:
        return dash.unavailable(request, session)
    if call is None:
        return dash.not_found(request, session, f"No call {sid} in the records.")
    detail = CallDetail.model_validate(
        {
            **_columns(call),
            "has_recording": call.recording_key is not None,
            "custom_parameters": call.custom_parameters or {},
            "turns": [TurnOut.model_validate(t) for t in call.turns],
            "events": [EventOut.model_validate(e) for e in call.events],
        }
    )
    timeline: list[dict[str, Any]] = []
    for turn in detail.turns:
        heard, cut = _unheard(turn)
        timeline.append(
            {"kind": "turn", "at": turn.start_ms, "turn": turn, "heard": heard, "cut": cut}
        )
    for event in detail.events:
        if event.kind not in _QUIET_EVENTS:
            timeline.append({"kind": "event", "at": event.at_ms, "event": event})
    timeline.sort(key=lambda item: (item["at"], item["kind"] == "event"))
    latencies = [
        t.first_audio_latency_ms for t in detail.turns if t.first_audio_latency_ms is not None
    ]
    deliveries = await _webhook_deliveries(dash.state, sid)
    data = {
        "call_sid": detail.call_sid,
        "has_recording": detail.has_recording,
        "duration_s": detail.duration_s,
        "turns": [t.model_dump() for t in detail.turns],
        "events": [e.model_dump() for e in detail.events],
    }
    return dash.render(
        request,
        "call.html",
        session,
        nav="calls",
        call=detail,
        timeline=timeline,
        live=sid in dash.state.registry.active,
        latency_summary={
            "count": len(latencies),
            "mean": sum(latencies) / len(latencies) if latencies else None,
            "max": max(latencies) if latencies else None,
        },
        call_data=data,
        deliveries=deliveries,
        webhooks_on=getattr(dash.state, "webhooks", None) is not None,
    )


async def retry_webhook(dash: Ctx, request: Request, sid: str) -> Response:
    """Send a call's end-of-call webhook again now (same delivery id)."""
    session = dash.require(request)
    form = await dash.read_form(request)
    dash.check_post(request, session, form)
    webhooks = getattr(dash.state, "webhooks", None)
    if webhooks is None or not _SID_RE.match(sid):
        raise HTTPException(404, "no such call")
    try:
        outcome = await webhooks.retry(sid)
    except (SQLAlchemyError, OSError, TimeoutError) as error:
        raise HTTPException(503, "call records database unavailable") from error
    if outcome.problem is not None:
        raise HTTPException(outcome.status_code, outcome.problem)
    log.info("dashboard.webhook_retry", call_sid=sid, deliveries=outcome.queued)
    if "application/json" in request.headers.get("accept", ""):
        return Response(
            _json({"call_sid": sid, "queued": outcome.queued}),
            202,
            media_type="application/json",
        )
    return RedirectResponse(f"/calls/{sid}#webhooks", status_code=303)


async def call_recording(dash: Ctx, request: Request, sid: str) -> Response:
    """The stereo recording for the page's player (cookie auth; Range requests work)."""
    dash.require(request)
    if not _SID_RE.match(sid):
        raise HTTPException(404, "no recording for this call")
    recording = await dash.recordings.open(sid)
    if recording is None:
        raise HTTPException(404, "no recording for this call")
    filename = f"{sid}.{recording.media_type.rsplit('/', 1)[-1]}"
    disposition = "attachment" if request.query_params.get("download") else "inline"
    if recording.path is not None:
        return FileResponse(
            recording.path,
            media_type=recording.media_type,
            filename=filename,
            content_disposition_type=disposition,
            headers={"Cache-Control": "private, max-age=3600"},
        )
    assert recording.stream is not None
    return StreamingResponse(
        iter(lambda: recording.stream.read(65536), b""),  # type: ignore[union-attr]
        media_type=recording.media_type,
        headers={"Content-Disposition": f'{disposition}; filename="{filename}"'},
    )


async def stats_page(
    dash: Ctx,
    request: Request,
    since: str | None = None,
    until: str | None = None,
) -> Response:
    session = dash.current(request)
    if session is None:
        return dash.login_redirect(request)
    today = datetime.now(UTC).date()
    end = _day(until) or today
    start = _day(since) or end - timedelta(days=13)
    if start > end:
        start, end = end, start
    start = max(start, end - timedelta(days=MAX_STATS_DAYS - 1))
    lo, hi = _midnight(start), _midnight(end + timedelta(days=1))
    try:
        with _database():
            overall = StatsOut.of(await dash.repo.stats(since=lo, until=hi))
            days = []
            day = start
            while day <= end:
                s = StatsOut.of(
                    await dash.repo.stats(since=_midnight(day), until=_midnight(day) + timedelta(1))
                )
                days.append({"day": day.isoformat(), **s.model_dump()})
                day += timedelta(days=1)
            recent = await dash.repo.list_calls(since=lo, until=hi, limit=HISTOGRAM_CALLS)
    except _Unavailable:
        return dash.unavailable(request, session)
    durations = [c.duration_s for c in recent.items if c.duration_s is not None]
    data = {
        "overall": overall.model_dump(),
        "days": days,
        "durations": durations,
        "durations_sampled": recent.total > len(recent.items),
    }
    return dash.render(
        request,
        "stats.html",
        session,
        nav="stats",
        stats=overall,
        since=start.isoformat(),
        until=end.isoformat(),
        stats_data=data,
        sampled=data["durations_sampled"],
        histogram_calls=HISTOGRAM_CALLS,
    )


STATIC_ROOT = STATIC_DIR.resolve()


async def static(path: str) -> Response:
    """The dashboard's own scripts, styles and vendored library (public, no secrets)."""
    target = (STATIC_ROOT / path).resolve()
    if not target.is_relative_to(STATIC_ROOT) or not target.is_file():
        raise HTTPException(404)
    media_type = "text/javascript" if target.suffix in (".js", ".mjs") else None
    return FileResponse(
        target,
        media_type=media_type,
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )
