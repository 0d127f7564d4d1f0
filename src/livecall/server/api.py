"""The call-records REST API: list, read, download, erase calls, and statistics.

`build_api_router()` returns a router the app factory mounts. Every route needs
`Authorization: Bearer <LIVECALL_API_TOKEN>` (compared in constant time; 401 with
`WWW-Authenticate: Bearer` otherwise). Without a token the API is not served at all
(`ApiDisabled`), unless `LIVECALL_API_LOCAL_ONLY` says it may answer loopback clients only.

The checks themselves live in `livecall.server.auth` (`bearer_auth`; placing calls has a
token of its own there, `calls_auth`).
"""

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import SQLAlchemyError

from livecall.call_ids import CALL_ID_PATTERN
from livecall.outcomes import memory
from livecall.outcomes.analysis import analysis_for
from livecall.server.auth import bearer_auth
from livecall.settings import Settings
from livecall.store.models import Call
from livecall.store.recordings import RecordingStore
from livecall.store.repository import Distribution, InvalidCursor, Stats
from livecall.store.writer import CallStore

__all__ = ["build_api_router", "call_columns"]

log = structlog.get_logger("livecall.api")

SID_PATTERN = CALL_ID_PATTERN  # every carrier's call ids
CallStatus = Literal["in_progress", "completed", "failed"]

Sid = Annotated[str, Path(pattern=SID_PATTERN, description="the carrier's call id")]
Since = Annotated[
    datetime | None, Query(description="calls started at or after (ISO 8601; UTC if naive)")
]
Until = Annotated[datetime | None, Query(description="calls started before")]
Number = Annotated[str | None, Query(max_length=64, description="caller or called number")]
Status = Annotated[CallStatus | None, Query()]


# --- response models ------------------------------------------------------------------------


class CallOut(BaseModel):
    """One call, as listed."""

    model_config = ConfigDict(from_attributes=True)

    call_sid: str
    stream_sid: str | None
    account_sid: str | None
    from_number: str | None
    to_number: str | None
    direction: str
    profile: str | None
    model: str | None
    status: str = Field(description="in_progress, completed or failed")
    started_at: datetime
    answered_at: datetime | None = Field(description="when the caller first heard the agent")
    ended_at: datetime | None
    duration_s: float | None
    end_reason: str | None
    gemini_sessions: int
    prompt_tokens: int
    response_tokens: int
    total_tokens: int
    turn_count: int
    interruptions: int
    frames_in: int
    frames_out: int
    frames_missing: int
    has_recording: bool

    @classmethod
    def of(cls, call: Call) -> "CallOut":
        return cls.model_validate(
            {**call_columns(call), "has_recording": call.recording_key is not None}
        )


class TurnOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int = Field(validation_alias="idx")
    speaker: str = Field(description="caller or agent")
    text: str = Field(description="everything transcribed for the turn")
    heard_text: str | None = Field(description="for a cut agent turn: what the caller heard")
    start_ms: int = Field(description="milliseconds since the stream started")
    end_ms: int | None
    interrupted: bool
    heard_estimated: bool = Field(
        False, description="heard_text estimated from pacing: the carrier confirms no playout"
    )
    first_audio_latency_ms: float | None = Field(
        description="end of the caller's speech -> first agent audio"
    )
    barge_in_stop_ms: float | None = Field(description="model's interruption -> clear sent")


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    at_ms: int
    kind: str
    name: str | None
    duration_ms: float | None
    data: dict[str, Any]


class AnalysisOut(BaseModel):
    """The post-call analysis (profiles with `analysis.enabled`)."""

    status: str = Field(description="pending, done, failed (attempts used up) or skipped")
    summary: str | None
    fields: dict[str, Any] | None = Field(description="the profile's structured fields")
    success: bool | None = Field(description="whether the profile's goal was reached")
    success_reason: str | None
    model: str | None
    attempts: int
    error: str | None = Field(description="why the last attempt failed (no transcript text)")
    completed_at: datetime | None


class CallDetail(CallOut):
    """A call with its transcript and events."""

    custom_parameters: dict[str, Any]
    turns: list[TurnOut]
    events: list[EventOut]
    analysis: AnalysisOut | None = None


class MemoryForgotten(BaseModel):
    number: str = Field(description="the normalized (E.164) number")
    calls: int = Field(description="remembered calls erased")


class CallPageOut(BaseModel):
    items: list[CallOut]
    total: int = Field(description="calls matching the filters, all pages")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class LatencyOut(BaseModel):
    count: int
    mean: float | None
    max: float | None
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, dist: Distribution) -> "LatencyOut":
        return cls(count=dist.count, mean=dist.mean, max=dist.max, **dist.percentiles)


class StatsOut(BaseModel):
    calls: int
    by_status: dict[str, int]
    by_end_reason: dict[str, int]
    total_duration_s: float
    mean_duration_s: float | None
    max_duration_s: float | None
    turns: int
    interrupted_turns: int
    total_tokens: int
    answer_ms: LatencyOut = Field(description="stream start -> the agent's first audio")
    first_audio_latency_ms: LatencyOut = Field(
        description="per agent turn: end of the caller's speech -> first agent audio"
    )
    barge_in_stop_ms: LatencyOut = Field(description="model's interruption -> clear sent")

    @classmethod
    def of(cls, stats: Stats) -> "StatsOut":
        return cls(
            calls=stats.calls,
            by_status=stats.by_status,
            by_end_reason=stats.by_end_reason,
            total_duration_s=stats.total_duration_s,
            mean_duration_s=stats.mean_duration_s,
            max_duration_s=stats.max_duration_s,
            turns=stats.turns,
            interrupted_turns=stats.interrupted_turns,
            total_tokens=stats.total_tokens,
            answer_ms=LatencyOut.of(stats.answer_ms),
            first_audio_latency_ms=LatencyOut.of(stats.first_audio_latency_ms),
            barge_in_stop_ms=LatencyOut.of(stats.barge_in_stop_ms),
        )


class ErrorOut(BaseModel):
    detail: str


def call_columns(call: Call) -> dict[str, Any]:
    """A call row as a dict of its columns (the API's and the dashboard's starting point)."""
    return {c.key: getattr(call, c.key) for c in Call.__table__.columns}


# --- helpers --------------------------------------------------------------------------------


def _utc(value: datetime | None) -> datetime | None:
    """Query times as UTC; naive means UTC; out-of-range offsets clamp instead of failing."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return (datetime.min if value.year < 2 else datetime.max).replace(tzinfo=UTC)


@contextmanager
def _database() -> Iterator[None]:
    """A database that is down is a 503, not a 500."""
    try:
        yield
    except (SQLAlchemyError, OSError) as error:
        raise HTTPException(503, "call records database unavailable") from error


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "missing or wrong bearer token"},
    403: {"model": ErrorOut, "description": "local-only API called from another host"},
    503: {"model": ErrorOut, "description": "database unavailable"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "no call"}}


def build_api_router(
    store: CallStore,
    recordings: RecordingStore,
    settings: Settings,
    *,
    is_live: Callable[[str], Awaitable[bool]] | None = None,
) -> APIRouter:
    """The `/api` routes over `store` and `recordings`; raises `ApiDisabled` (see module doc).

    `is_live(sid)` tells a call still in progress, which DELETE refuses (409).
    """
    authorize = bearer_auth(settings)
    router = APIRouter(
        prefix="/api", tags=["calls"], dependencies=[Depends(authorize)], responses=_ERRORS
    )
    repo = store.repo

    @router.get("/calls", response_model=CallPageOut, summary="List calls, newest first")
    async def list_calls(
        since: Since = None,
        until: Until = None,
        number: Number = None,
        status: Status = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[
            str | None, Query(max_length=512, description="`next_cursor` of the previous page")
        ] = None,
        offset: Annotated[
            int | None, Query(ge=0, le=1_000_000, description="rows to skip (instead of cursor)")
        ] = None,
    ) -> CallPageOut:
        with _database():
            try:
                page = await repo.list_calls(
                    since=_utc(since),
                    until=_utc(until),
                    number=number.replace("\x00", "") if number else None,
                    status=status,
                    limit=limit,
                    cursor=cursor,
                    offset=offset,
                )
            except InvalidCursor as error:
                raise HTTPException(400, str(error)) from error
        return CallPageOut(
            items=[CallOut.of(c) for c in page.items],
            total=page.total,
            next_cursor=page.next_cursor,
        )

    @router.get(
        "/calls/{sid}",
        response_model=CallDetail,
        responses=_NOT_FOUND,
        summary="A call with its transcript and events",
    )
    async def get_call(sid: Sid) -> CallDetail:
        with _database():
            call = await repo.get_call(sid)
            analysis = await analysis_for(repo.sessions, sid) if call is not None else None
        if call is None:
            raise HTTPException(404, "no such call")
        return CallDetail.model_validate(
            {
                **call_columns(call),
                "has_recording": call.recording_key is not None,
                "custom_parameters": call.custom_parameters or {},
                "turns": [TurnOut.model_validate(t) for t in call.turns],
                "events": [EventOut.model_validate(e) for e in call.events],
                "analysis": analysis,
            }
        )

    @router.get(
        "/calls/{sid}/recording",
        response_class=Response,
        responses={
            200: {
                "description": "stereo recording: caller left, agent right",
                "content": {"audio/wav": {}, "audio/flac": {}},
            },
            **_NOT_FOUND,
        },
        summary="Download a call's recording",
    )
    async def get_recording(sid: Sid) -> Response:
        recording = await recordings.open(sid)
        if recording is None:
            raise HTTPException(404, "no recording for this call")
        filename = f"{sid}.{recording.media_type.rsplit('/', 1)[-1]}"
        if recording.path is not None:
            return FileResponse(recording.path, media_type=recording.media_type, filename=filename)
        stream = recording.stream
        assert stream is not None
        return StreamingResponse(
            iter(lambda: stream.read(65536), b""),
            media_type=recording.media_type,
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    @router.delete(
        "/calls/{sid}",
        status_code=204,
        response_class=Response,
        responses={**_NOT_FOUND, 409: {"description": "the call is in progress: end it first"}},
        summary="Erase a call: record, transcript, events and recording",
    )
    async def delete_call(sid: Sid) -> Response:
        """Erases the call for good: records of it still on their way (a spool replayed after
        an outage) are dropped. A call in progress is refused: end it first."""
        if is_live is not None and await is_live(sid):
            raise HTTPException(409, "the call is in progress: end it first")
        with _database():
            existed = await repo.delete_call(sid)
        had_recording = await recordings.delete(sid)
        if not existed and not had_recording:
            raise HTTPException(404, "no such call")
        return Response(status_code=204)

    @router.delete(
        "/callers/{number}/memory",
        response_model=MemoryForgotten,
        responses={400: {"model": ErrorOut, "description": "not an E.164 number"}},
        summary="Erase what the agents remember of a caller (every profile)",
    )
    async def forget_caller(
        number: Annotated[str, Path(max_length=64, description="E.164, e.g. +15551234567")],
    ) -> MemoryForgotten:
        normalized = memory.normalize_number(number)
        if normalized is None:
            raise HTTPException(400, "not an E.164 phone number")
        with _database():
            erased = await memory.forget(repo.sessions, normalized)
        return MemoryForgotten(number=normalized, calls=erased)

    @router.get("/stats", response_model=StatsOut, summary="Counts, durations and latencies")
    async def stats(
        since: Since = None, until: Until = None, number: Number = None, status: Status = None
    ) -> StatsOut:
        with _database():
            result = await repo.stats(
                since=_utc(since),
                until=_utc(until),
                number=number.replace("\x00", "") if number else None,
                status=status,
            )
        return StatsOut.of(result)

    return router
