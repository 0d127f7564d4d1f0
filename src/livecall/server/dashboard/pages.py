"""The record pages: the calls list (and search), one call with its transcript and
recording, its webhook deliveries, and the statistics."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from livecall.outcomes import memory
from livecall.outcomes.analysis import analyses_for, analysis_for
from livecall.server.api import CallDetail, CallOut, EventOut, StatsOut, TurnOut, call_columns
from livecall.server.dashboard.core import (
    QUIET_EVENTS,
    SID_RE,
    STATIC_DIR,
    Ctx,
    Unavailable,
    database_errors,
    json_bytes,
    log,
    parse_day,
    unheard,
    webhook_deliveries,
)
from livecall.server.dashboard.words import (
    dial_number,
    end_reason_words,
    fmt_day,
    local_midnight,
    local_today,
)
from livecall.store import owner, search
from livecall.store.repository import InvalidCursor

MAX_STATS_DAYS = 92
HISTOGRAM_CALLS = 2000  # the duration histogram looks at this many most recent calls at most
_CALL_SID = re.compile(r"^CA[0-9a-fA-F]{32}$")
SEARCH_LIMIT = 50


@dataclass(slots=True)
class Row:
    """One call as the list shows it: the record, its outcome and, for a search, the line."""

    call: CallOut
    outcome: str
    ended: str
    match_source: str | None = None
    match: list[tuple[str, bool]] | None = None
    matches: int = 0


async def calls_page(
    dash: Ctx,
    request: Request,
    since: str | None = None,
    until: str | None = None,
    q: str | None = None,
    status: str | None = None,
    cursor: str | None = None,
    outcome: str | None = None,
) -> Response:
    """The calls, newest first; dates are the business's days. With `q`: a call SID opens
    the call, a number finds calls from or to any number ending with it, words search
    everything said (and, with analysis, summaries and extracted fields)."""
    session = dash.current(request)
    if session is None:
        return dash.login_redirect(request)
    query = (q or "").strip()[:100]
    if _CALL_SID.match(query):  # a pasted call SID: straight to its page
        return RedirectResponse(f"/calls/{query}", status_code=303)
    zone = dash.zone
    start, end = parse_day(since), parse_day(until)
    lo = local_midnight(start, zone) if start else None
    hi = local_midnight(end + timedelta(days=1), zone) if end else None
    status = status if status in ("in_progress", "completed", "failed") else None
    outcome = outcome if outcome in owner.OUTCOMES else None
    error = None
    hits: list[search.SearchHit] | None = None
    next_cursor = None
    try:
        with database_errors():
            if query:
                hits = await dash.repo.search(
                    query, since=lo, until=hi, status=status, outcome=outcome, limit=SEARCH_LIMIT
                )
                calls = [h.call for h in hits]
                total = len(hits)
            else:
                try:
                    page = await dash.repo.list_calls(
                        since=lo,
                        until=hi,
                        status=status,
                        outcome=outcome,
                        limit=50,
                        cursor=cursor or None,
                    )
                except InvalidCursor:
                    error = "That page link is no longer valid; showing the newest calls."
                    page = await dash.repo.list_calls(status=status, outcome=outcome, limit=50)
                calls, total, next_cursor = page.items, page.total, page.next_cursor
            sids = [c.call_sid for c in calls]
            spoke = await owner.callers_who_spoke(dash.repo.sessions, sids)
            analyses = await analyses_for(dash.repo.sessions, sids)
    except Unavailable:
        return dash.unavailable(request, session)
    terms = search.search_terms(query) if query and not search.looks_like_number(query) else []
    rows = []
    for i, call in enumerate(calls):
        kind = owner.outcome_of(call.status, call.duration_s, call.call_sid in spoke)
        row = Row(CallOut.of(call), kind, end_reason_words(call.end_reason, kind))
        hit = hits[i] if hits is not None else None
        if hit is not None and hit.text:
            row.match_source = _source_words(hit.source)
            row.match = search.highlight(search.snippet(hit.text, terms), terms)
            row.matches = hit.matches
        rows.append(row)
    filters = {
        "since": start.isoformat() if start else "",
        "until": end.isoformat() if end else "",
        "q": query,
        "status": status or "",
        "outcome": outcome or "",
    }
    return dash.render(
        request,
        "calls.html",
        session,
        nav="calls",
        rows=rows,
        total=total,
        searching=bool(query),
        search_limit=SEARCH_LIMIT,
        next_cursor=next_cursor,
        paged=bool(cursor),
        filters=filters,
        filter_query={k: v for k, v in filters.items() if v},
        error=error,
        analyses=analyses,
    )


def _source_words(source: str | None) -> str:
    if source is None:
        return ""
    if source.startswith("field:"):
        return source.removeprefix("field:").replace("_", " ")
    return {"caller": "Caller", "agent": "Agent", "summary": "Summary"}.get(source, source)


async def call_page(dash: Ctx, request: Request, sid: str) -> Response:
    session = dash.current(request)
    if session is None:
        return dash.login_redirect(request)
    if not SID_RE.match(sid):
        return dash.not_found(request, session, "No such call.")
    try:
        with database_errors():
            call = await dash.repo.get_call(sid)
            analysis = await analysis_for(dash.repo.sessions, sid) if call is not None else None
            caller_number = (
                memory.normalize_number(
                    memory.remote_number(call.direction, call.from_number, call.to_number)
                )
                if call is not None
                else None
            )
            remembered = (
                await memory.count(dash.repo.sessions, caller_number) if caller_number else 0
            )
    except Unavailable:
        return dash.unavailable(request, session)
    if call is None:
        return dash.not_found(request, session, f"No call {sid} in the records.")
    detail = CallDetail.model_validate(
        {
            **call_columns(call),
            "has_recording": call.recording_key is not None,
            "custom_parameters": call.custom_parameters or {},
            "turns": [TurnOut.model_validate(t) for t in call.turns],
            "events": [EventOut.model_validate(e) for e in call.events],
            "analysis": analysis,
        }
    )
    forgotten = request.query_params.get("forgotten", "")[:6]  # after "Forget this caller"
    timeline: list[dict[str, Any]] = []
    for turn in detail.turns:
        heard, cut = unheard(turn)
        timeline.append(
            {"kind": "turn", "at": turn.start_ms, "turn": turn, "heard": heard, "cut": cut}
        )
    for event in detail.events:
        if event.kind not in QUIET_EVENTS:
            timeline.append({"kind": "event", "at": event.at_ms, "event": event})
    timeline.sort(key=lambda item: (item["at"], item["kind"] == "event"))
    latencies = [
        t.first_audio_latency_ms for t in detail.turns if t.first_audio_latency_ms is not None
    ]
    deliveries = await webhook_deliveries(dash.state, sid)
    remote = call.to_number if call.direction == "outbound" else call.from_number
    spoke = any(t.speaker == "caller" and t.text for t in detail.turns)
    outcome = owner.outcome_of(call.status, call.duration_s, spoke)
    params = call.custom_parameters or {}
    fields = (analysis or {}).get("fields") or {}
    known = params.get("caller_name") or params.get("CallerName")
    known = known or fields.get("caller_name") or fields.get("name")  # the analysis heard it
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
        caller_label=remote or "Unknown number",
        caller_name=str(known or "")[:80],
        outcome=outcome,
        ended_words=end_reason_words(call.end_reason, outcome),
        callback=owner.needs_callback(call),
        handled_at=call.callback_handled_at,
        dial=dial_number(remote),
        timeline=timeline,
        live=sid in dash.state.registry.active,
        latency_summary={
            "count": len(latencies),
            "mean": sum(latencies) / len(latencies) if latencies else None,
            "max": max(latencies) if latencies else None,
        },
        call_data=data,
        deliveries=deliveries,
        webhooks_on=dash.state.webhooks is not None,
        caller_number=caller_number if remembered else None,
        remembered=remembered,
        forgotten=forgotten if forgotten.isdigit() else None,
    )


async def forget_caller(dash: Ctx, request: Request, number: str) -> Response:
    """Erase what the agents remember of a number; back to the page it came from."""
    session = dash.require(request)
    form = await dash.read_form(request)
    dash.check_post(request, session, form)
    normalized = memory.normalize_number(number)
    if normalized is None:
        raise HTTPException(400, "not an E.164 phone number")
    try:
        with database_errors():
            erased = await memory.forget(dash.repo.sessions, normalized)
    except Unavailable:
        return dash.unavailable(request, session)
    log.info("dashboard.memory_deleted", calls=erased)
    back = form.get("call_sid", "")
    target = f"/calls/{back}?forgotten={erased}" if SID_RE.match(back) else "/"
    return RedirectResponse(target, status_code=303)


async def retry_webhook(dash: Ctx, request: Request, sid: str) -> Response:
    """Send a call's end-of-call webhook again now (same delivery id)."""
    session = dash.require(request)
    form = await dash.read_form(request)
    dash.check_post(request, session, form)
    webhooks = dash.state.webhooks
    if webhooks is None or not SID_RE.match(sid):
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
            json_bytes({"call_sid": sid, "queued": outcome.queued}),
            202,
            media_type="application/json",
        )
    return RedirectResponse(f"/calls/{sid}#webhooks", status_code=303)


async def call_recording(dash: Ctx, request: Request, sid: str) -> Response:
    """The stereo recording for the page's player (cookie auth; Range requests work)."""
    dash.require(request)
    if not SID_RE.match(sid):
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
    stream = recording.stream
    assert stream is not None
    return StreamingResponse(
        iter(lambda: stream.read(65536), b""),
        media_type=recording.media_type,
        headers={"Content-Disposition": f'{disposition}; filename="{filename}"'},
    )


async def stats_page(
    dash: Ctx,
    request: Request,
    since: str | None = None,
    until: str | None = None,
) -> Response:
    """The owner's statistics for a range of the business's days (at most `MAX_STATS_DAYS`,
    said on the page when a range is cut): calls by day, hour and weekday, answered against
    missed, outcomes, repeat callers and the busiest times; the engineer's figures below."""
    session = dash.current(request)
    if session is None:
        return dash.login_redirect(request)
    zone = dash.zone
    today = local_today(zone)
    end = parse_day(until) or today
    start = parse_day(since) or end - timedelta(days=13)
    if start > end:
        start, end = end, start
    asked = (end - start).days + 1
    cut = asked > MAX_STATS_DAYS
    if cut:
        start = end - timedelta(days=MAX_STATS_DAYS - 1)
    lo, hi = owner.local_range(start, end, zone)
    try:
        with database_errors():
            seen = await owner.activity(dash.repo.sessions, start, end, zone)
            repeats, repeat_top = await owner.repeat_callers(dash.repo.sessions, lo, hi)
            overall = StatsOut.of(await dash.repo.stats(since=lo, until=hi))
            recent = await dash.repo.list_calls(since=lo, until=hi, limit=HISTOGRAM_CALLS)
    except Unavailable:
        return dash.unavailable(request, session)
    durations = [c.duration_s for c in recent.items if c.duration_s is not None]
    days = [
        {
            "day": d.day.isoformat(),
            "label": fmt_day(d.day),
            "calls": d.calls,
            "answered": d.answered,
            "missed": d.missed,
            "mean_duration_s": d.duration_s / d.calls if d.calls else None,
            "mean_latency_ms": d.mean_latency_ms,
        }
        for d in seen.days.values()
    ]
    answered = seen.outcomes.get("answered", 0)
    missed = seen.outcomes.get("abandoned", 0) + seen.outcomes.get("failed", 0)
    busiest = [
        {"weekday": WEEKDAYS[wd], "hour": h, "label": _hour_label(h), "calls": n}
        for wd, h, n in seen.busiest(3)
    ]
    data = {
        "zone": dash.settings.business_timezone,
        "overall": overall.model_dump(),
        "days": days,
        "hours": seen.hours,
        "hour_labels": [_hour_label(h) for h in range(24)],
        "weekdays": seen.weekdays,
        "weekday_labels": list(WEEKDAYS),
        "outcomes": seen.outcomes,
        "durations": durations,
        "durations_sampled": recent.total > len(recent.items),
    }
    return dash.render(
        request,
        "stats.html",
        session,
        nav="stats",
        stats=overall,
        calls=seen.calls,
        answered=answered,
        missed=missed,
        outcomes=seen.outcomes,
        repeats=repeats,
        repeat_top=repeat_top,
        busiest=busiest,
        days=days,
        hours=seen.hours,
        weekdays=list(zip(WEEKDAYS, seen.weekdays, strict=True)),
        since=start.isoformat(),
        until=end.isoformat(),
        since_label=fmt_day(start),
        until_label=fmt_day(end),
        cut=cut,
        asked_days=asked,
        max_days=MAX_STATS_DAYS,
        stats_data=data,
        sampled=data["durations_sampled"],
        histogram_calls=HISTOGRAM_CALLS,
    )


WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _hour_label(hour: int) -> str:
    return f"{hour:02d}:00"


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
