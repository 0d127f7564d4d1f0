"""One phone call: the caller's stream and a Gemini Live session, pumped both ways at once.

Two tasks per call. The caller pump reads carrier frames through the carrier's sans-I/O
`CarrierStream` (Twilio, Telnyx, Plivo, Vonage, Exotel: `livecall.carriers`), turns the
caller's audio (μ-law, A-law or L16) into 16 kHz PCM and hands it to Gemini (buffered, in
order, until the session is open: the caller's first words are never dropped). The agent pump
reads Gemini's events and sends agent audio, coded to the stream's playback format, to the
carrier the moment it exists, each chunk followed by a mark, letting the carrier queue it; a
model `interrupted` sends `clear` before anything else happens. Whichever side ends first ends
the call: the other side is closed, every task cancelled, and one summary line logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import structlog

from livecall.agent import live_protocol as lp
from livecall.agent.gemini import (
    PERMANENT_CLOSE_CODES,
    GeminiClosed,
    GeminiConnectError,
    GeminiLink,
)
from livecall.agent.tools import function_response
from livecall.audio.g711 import ALAW_DECODE_TABLE, ULAW_DECODE_TABLE
from livecall.audio.recording import StereoRecorder
from livecall.audio.resample import StreamResampler
from livecall.audio.transcode import (
    InboundTranscoder,
    OutboundTranscoder,
    encoding_of,
    from_ulaw,
    pcm_of,
)
from livecall.call.audio_queue import ByteBoundedQueue
from livecall.call.context import CallContext
from livecall.call.playout import PlayoutTracker
from livecall.call.supervisor import (
    CompleteSeed,
    DropStalled,
    GiveUp,
    Live,
    Nudge,
    Replay,
    Rotate,
    SessionAction,
    SessionSupervisor,
    Wait,
)
from livecall.call.turns import TurnTracker
from livecall.carriers.base import (
    CallerAudio,
    CallStarted,
    CallStopped,
    CarrierProtocolError,
    CarrierStream,
    Dtmf,
    Frame,
    MediaFormat,
    PlayedUpTo,
)
from livecall.live_feed import live_partial
from livecall.privacy import keypad, transcript_fields
from livecall.records import (
    CallEventRecord,
    CallInfo,
    CallObserver,
    CallSummary,
    NullObserver,
    TurnRecord,
)

__all__ = ["SPOKE_BEFORE_TOOL", "CallBridge", "CallOptions", "CarrierClosed", "CarrierSocket"]

log = structlog.get_logger("livecall.call")

STALL_NUDGE = "(The caller is waiting for your answer. Please respond now.)"
DTMF_KEYS = frozenset("0123456789*#ABCD")
VOICE_PEAK = 700  # int16 peak above which a caller frame counts as speech (~ -33 dBFS)
# b"\x01" for the G.711 codes louder than VOICE_PEAK, b"\x00" for the others: a frame's
# loudness without decoding it twice, as `bytes.translate` + a byte search (0.3 µs a frame,
# where numpy's take + any cost 2.2 µs in call overhead alone)
_LOUD_CODES = (np.abs(ULAW_DECODE_TABLE.astype(np.int32)) > VOICE_PEAK).astype(np.uint8).tobytes()
_LOUD_ALAW = (np.abs(ALAW_DECODE_TABLE.astype(np.int32)) > VOICE_PEAK).astype(np.uint8).tobytes()
PCM16K_BYTES_PER_S = 32000
MAX_MEDIA_MS = 1000  # one second of audio in one frame: no carrier sends frames that long
MARK_EVERY_SAMPLES = 800  # a mark per ~100 ms of agent audio (and at every turn's end)
# Playout and turns count agent audio in 8 kHz samples whatever the carrier's rate, so the
# transcript's "heard" cut and the recording (8 kHz) need no rate of their own.
GREETING_PROMPT = "The phone call has just been answered. Greet the caller now, saying: "
# In a tool handler: had the agent spoken in the turn in which it made the call? (An
# `end_call` before any word needs the model's goodbye, or a recorded one, before hanging up.)
SPOKE_BEFORE_TOOL: ContextVar[bool] = ContextVar("spoke_before_tool", default=True)


class CarrierClosed(Exception):
    """The carrier's socket is gone."""


class CarrierSocket(Protocol):
    """The caller's side of the call as the bridge sees it: text or binary frames in and out."""

    async def receive(self) -> str | bytes | None:
        """The next frame, or None once the socket has closed."""
        ...

    async def send(self, frame: Frame) -> None:
        """One frame as a text (str) or binary (bytes) message; raises `CarrierClosed`."""
        ...

    async def close(self, code: int = 1000) -> None: ...


@dataclass(slots=True)
class CallOptions:
    """Per-call knobs, from settings and the agent profile."""

    greeting: str | None = None
    max_duration_s: float = 3600.0
    caller_buffer_s: float = 15.0  # caller audio held while no Gemini session is usable
    connect_timeout_s: float = 10.0
    direction: str = "inbound"
    profile: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    tool_handler: Callable[[lp.FunctionCall], Awaitable[dict[str, Any]]] | None = None
    # where the stereo recording goes when the call ends (None: not recorded)
    recording_sink: Callable[[str, StereoRecorder, float], Awaitable[str | None]] | None = None
    # resilience
    reconnect_attempts: int = 5
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 4.0
    rotation_overlap: bool = True  # open the next session before closing the old one
    rotation_margin_s: float = 5.0  # switch at the latest this long before goAway's deadline
    stall_timeout_s: float = 10.0
    apology_ulaw: bytes | None = None  # what the caller hears when Gemini cannot be had
    # instead of the apology: hand the caller to a person (the profile's on_failure target)
    failure_transfer: Callable[[], Awaitable[bool]] | None = None
    replay_limit_s: float = 30.0  # caller audio kept since the last resumable snapshot
    metrics: Any = None  # livecall.metrics.Metrics: per-frame timings, sampled
    non_blocking_tools: bool = False  # tools declared NON_BLOCKING: responses say when to speak
    max_duration_line: str = (
        "I'm sorry, we have reached the time limit for this call. Thank you for calling, goodbye!"
    )
    context: CallContext = field(default_factory=CallContext)  # profile, actions, log policy


class CallBridge:
    """Runs one call from the carrier's `start` until either side ends it."""

    def __init__(
        self,
        socket: CarrierSocket,
        stream: CarrierStream,
        start: CallStarted,
        link_factory: Callable[[str | None], GeminiLink],
        *,
        options: CallOptions | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        self.socket = socket
        self.stream = stream
        self.start = start
        self.link_factory = link_factory
        self.link = link_factory(None)
        self.options = options or CallOptions()
        self.observer: CallObserver = observer or NullObserver()
        self.call_sid = start.call_id
        self.stream_sid = start.stream_id or start.call_id
        self.log = log.bind(call_sid=self.call_sid, stream_sid=self.stream_sid)

        # the caller's audio (the start's format) and what we play (the stream's: may differ)
        inbound: MediaFormat = start.media_format
        self._in_encoding = encoding_of(inbound.encoding)
        self.inbound = InboundTranscoder(16000, self._in_encoding, inbound.sample_rate)
        self._max_media_bytes = inbound.bytes_per_20ms * (MAX_MEDIA_MS // 20)
        self._loud_table = {"mulaw": _LOUD_CODES, "alaw": _LOUD_ALAW}.get(inbound.encoding)
        self._caller_rec_rs = (  # a higher-rate caller, resampled for the 8 kHz recording
            StreamResampler(inbound.sample_rate, 8000) if inbound.sample_rate != 8000 else None
        )
        playback: MediaFormat = stream.media_format
        self.playback_format = playback
        self._out_encoding = encoding_of(playback.encoding)
        self._out_rate = playback.sample_rate
        # bytes per 8 kHz sample of agent audio (1 for G.711; 2, 4, 6 for L16 at 8/16/24 kHz)
        self._unit = (2 if playback.encoding == "l16" else 1) * playback.sample_rate // 8000
        # a carrier that plays whole frames only gets aligned audio (the rest waits in _held),
        # so a mark mid-turn never makes it pad a partial frame with silence
        self._align = playback.bytes_per_20ms * stream.capabilities.frame_ms // 20
        self._held = b""
        self._marks = stream.capabilities.marks
        self._can_clear = stream.capabilities.clear
        self._agent_rate = 24000
        self.outbound = OutboundTranscoder(24000, self._out_encoding, self._out_rate)
        self.playout = PlayoutTracker(rate=8000)
        self.turns = TurnTracker(self.call_sid)
        self.recorder = StereoRecorder() if self.options.recording_sink is not None else None
        self._stream_t0_ms: float | None = None  # call clock when Twilio's timestamp 0 was

        self._t0 = time.monotonic()
        self._gemini_ready = asyncio.Event()
        self._pending_input: ByteBoundedQueue[tuple[str, Any]] = ByteBoundedQueue(
            int(self.options.caller_buffer_s * PCM16K_BYTES_PER_S), lambda item: len(item[1])
        )
        self._discarding_turn = False  # after `interrupted`, until the turn completes
        self._ended = asyncio.Event()
        self.end_reason: str | None = None
        self.failed = False
        self.usage = lp.Usage()
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0
        self.protocol_errors = 0
        self._tool_tasks: dict[str, asyncio.Task[None]] = {}
        # sessions: the supervisor decides, the bridge carries it out
        self.supervisor = SessionSupervisor(
            attempts=self.options.reconnect_attempts,
            backoff_initial_s=self.options.backoff_initial_s,
            backoff_max_s=self.options.backoff_max_s,
            rotation_margin_s=self.options.rotation_margin_s,
            stall_timeout_s=self.options.stall_timeout_s,
            permanent_codes=PERMANENT_CLOSE_CODES,
        )
        self.reconnects = 0
        self.rotations = 0
        self._session_lock = asyncio.Lock()
        self._since_snapshot: ByteBoundedQueue[bytes] = ByteBoundedQueue(
            int(self.options.replay_limit_s * PCM16K_BYTES_PER_S), len
        )
        self._greeting_due = bool(self.options.greeting)  # until an agent turn is complete
        self._giving_up = False
        self._stalled_link: GeminiLink | None = None
        self._heard = asyncio.Condition()
        self._unmarked_samples = 0
        self._background: set[asyncio.Task[None]] = set()  # estimated mark echoes
        metrics = self.options.metrics
        self._meter_in = metrics.frame_meter("in") if metrics is not None else None
        self._meter_out = metrics.frame_meter("out") if metrics is not None else None
        self.transcript: deque[TurnRecord] = deque(maxlen=200)

    # ------------------------------------------------------------------ session state
    @property
    def sessions(self) -> int:
        """Gemini sessions the call has had."""
        return self.supervisor.sessions

    @property
    def resumption_handle(self) -> str | None:
        return self.supervisor.handle

    # The stall watchdog's state lives in the supervisor; these keep the pumps' writes short.
    @property
    def _expect_reply_at(self) -> float | None:
        return self.supervisor.expect_reply_at

    @_expect_reply_at.setter
    def _expect_reply_at(self, value: float | None) -> None:
        self.supervisor.expect_reply_at = value

    @property
    def _seed_open(self) -> bool:
        return self.supervisor.seed_open

    @_seed_open.setter
    def _seed_open(self, value: bool) -> None:
        self.supervisor.seed_open = value

    @property
    def _nudged(self) -> bool:
        return self.supervisor.nudged

    @_nudged.setter
    def _nudged(self, value: bool) -> None:
        self.supervisor.nudged = value

    # ------------------------------------------------------------------ clock & records
    def now_ms(self) -> float:
        return (time.monotonic() - self._t0) * 1000.0

    def _event(self, kind: str, **data: Any) -> None:
        self.observer.event(CallEventRecord(self.call_sid, round(self.now_ms()), kind, data))

    def _flush_turns(self) -> None:
        for turn in self.turns.drain():
            self.transcript.append(turn)
            self.observer.turn(turn)
            self.log.info(
                "call.turn",
                speaker=turn.speaker,
                **transcript_fields(
                    (turn.heard_text if turn.interrupted else turn.text) or "",
                    self.options.context.log_transcripts,
                ),
                interrupted=turn.interrupted,
                at_ms=turn.start_ms,
                first_audio_latency_ms=(
                    round(turn.first_audio_latency_ms, 1)
                    if turn.first_audio_latency_ms is not None
                    else None
                ),
            )

    def _end(self, reason: str, *, failed: bool = False) -> None:
        if self.end_reason is None:
            self.end_reason = reason
            self.failed = failed
        self._ended.set()

    def end(self, reason: str) -> None:
        """Ends the call from outside (an operator, a drain, a newer stream for the call)."""
        self._end(reason)

    def replace(self) -> None:
        self._end("replaced_by_new_stream")

    async def end_politely(self, reason: str, line: str, timeout: float = 8.0) -> None:  # noqa: ASYNC109
        """Has the agent say `line` (its own voice), waits until it is heard, then ends."""
        if self._ended.is_set():
            return
        if self._gemini_ready.is_set():
            with contextlib.suppress(GeminiClosed, TimeoutError):
                await self.link.send_client_turn(
                    "(Say this to the caller now, then stop talking: " + line + ")"
                )
                started = time.monotonic()
                async with asyncio.timeout(timeout):
                    async with self._heard:
                        await self._heard.wait_for(
                            lambda: self.turns.agent_turn_open or self._ended.is_set()
                        )
                await self.wait_agent_done(max(0.5, timeout - (time.monotonic() - started)))
        self._end(reason)

    # ------------------------------------------------------------------ lifecycle
    async def _guarded(self, name: str, work: Awaitable[None]) -> None:
        """Runs one of the call's tasks; if it fails, the call ends `failed`, never silent."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.error("call.task_failed", task=name, error=type(exc).__name__, exc_info=True)
            self._event("error", where=name, error=f"{type(exc).__name__}: ending the call")
            await self._give_up(f"{name}_failed")

    async def run(self) -> CallSummary:
        started = datetime.now(UTC)
        structlog.contextvars.bind_contextvars(call_sid=self.call_sid)
        self.observer.call_started(
            CallInfo(
                call_sid=self.call_sid,
                stream_sid=self.stream_sid,
                started_at=started,
                account_sid=self.start.account_id or "",
                from_number=self.options.from_number,
                to_number=self.options.to_number,
                direction="outbound" if self.options.direction == "outbound" else "inbound",
                profile=self.options.profile,
                model=self.link.options.model,
                custom_parameters=dict(self.start.custom_parameters),
            )
        )
        self.log.info("call.start", profile=self.options.profile, model=self.link.options.model)
        tasks = [
            asyncio.create_task(
                self._guarded("caller_pump", self._caller_pump()), name=f"caller:{self.call_sid}"
            ),
            asyncio.create_task(
                self._guarded("agent_pump", self._agent_pump()), name=f"agent:{self.call_sid}"
            ),
            asyncio.create_task(
                self._guarded("supervisor", self._supervise()), name=f"supervise:{self.call_sid}"
            ),
        ]
        try:
            async with asyncio.timeout(self.options.max_duration_s):
                await self._ended.wait()
        except TimeoutError:
            self.log.info("call.max_duration", max_duration_s=self.options.max_duration_s)
            await self.end_politely("max_duration", self.options.max_duration_line)
        finally:
            for meter in (self._meter_in, self._meter_out):
                if meter is not None:
                    meter.flush()
            for task in [*tasks, *self._tool_tasks.values()]:
                task.cancel()
            await asyncio.gather(*tasks, *self._tool_tasks.values(), return_exceptions=True)
            # The caller is let go first: nothing Gemini does may hold a phone line open.
            with contextlib.suppress(Exception):
                await self.socket.close(1000)
            await self.link.close()
            recording = await self._finish_recording()
            summary = self._summarize(started)
            summary.recording_path = recording
            with contextlib.suppress(Exception):
                self.observer.call_ended(summary)
            structlog.contextvars.unbind_contextvars("call_sid")
        return summary

    async def _finish_recording(self) -> str | None:
        if self.recorder is None or self.options.recording_sink is None:
            return None
        # audio still queued at the carrier when the call ended: heard up to the end only
        self._record_played(self.playout.pending(), until_ms=self.now_ms())
        try:
            return await self.options.recording_sink(self.call_sid, self.recorder, self.now_ms())
        except Exception:  # the call's records must still be written
            self.log.exception("recording.failed")
            return None

    def _summarize(self, started: datetime) -> CallSummary:
        now = self.now_ms()
        if self.frames_dropped:
            self.log.warning(
                "call.caller_audio_dropped",
                frames=self.frames_dropped,
                buffer_s=self.options.caller_buffer_s,
            )
        self.turns.finish(now)
        self._flush_turns()
        ended = datetime.now(UTC)
        summary = CallSummary(
            call_sid=self.call_sid,
            ended_at=ended,
            duration_s=round(now / 1000.0, 3),
            end_reason=self.end_reason or "unknown",
            status="failed" if self.failed else "completed",
            turns=self.turns.turns,
            interruptions=self.turns.interruptions,
            frames_in=self.frames_in,
            frames_out=self.frames_out,
            frames_missing=getattr(self.stream, "frames_missing", 0),
            gemini_sessions=self.sessions,
            prompt_tokens=self.usage.prompt_tokens,
            response_tokens=self.usage.response_tokens,
            total_tokens=self.usage.total_tokens,
            first_audio_latencies_ms=[round(x, 1) for x in self.turns.latencies_ms],
        )
        self.log.info(
            "call.summary",
            duration_s=summary.duration_s,
            end_reason=summary.end_reason,
            status=summary.status,
            turns=summary.turns,
            interruptions=summary.interruptions,
            first_audio_latency_ms=summary.first_audio_latencies_ms,
            frames_in=summary.frames_in,
            frames_out=summary.frames_out,
            frames_missing=summary.frames_missing,
            frames_dropped=self.frames_dropped,
            protocol_errors=self.protocol_errors,
            gemini_sessions=self.sessions,
            reconnects=self.reconnects,
            rotations=self.rotations,
            tokens=summary.total_tokens,
        )
        return summary

    # ------------------------------------------------------------------ caller -> Gemini
    async def _caller_pump(self) -> None:
        stream = self.stream
        try:
            while True:
                data = await self.socket.receive()
                if data is None:
                    stream.closed(None)
                    self._end("caller_closed")
                    return
                try:
                    event = stream.receive(data)
                except CarrierProtocolError as exc:
                    self.protocol_errors += 1
                    if self._should_log_error():
                        self.log.warning(
                            "carrier.bad_frame", error=str(exc), count=self.protocol_errors
                        )
                    continue
                if type(event) is CallerAudio:
                    await self._caller_audio(event)
                elif type(event) is PlayedUpTo:
                    if self.playout.mark_echoed(self.now_ms(), event.name) is not None:
                        self._record_played(self.playout.just_played)
                    await self._notify_heard()
                elif type(event) is Dtmf:
                    if event.digit not in DTMF_KEYS:  # only keys reach the model, never text
                        self.protocol_errors += 1
                        if self._should_log_error():
                            self.log.warning("carrier.bad_dtmf", digit=event.digit[:16])
                        continue
                    shown = keypad(event.digit, self.options.context.log_dtmf)
                    self.log.info("call.dtmf", digit=shown)
                    self._event("dtmf", digit=shown)
                    await self._to_gemini(
                        "text", f"The caller pressed {event.digit} on the keypad."
                    )
                elif type(event) is CallStopped:
                    self._end("caller_stop")
                    return
        except CarrierClosed:
            self._end("caller_closed")

    async def _caller_audio(self, media: CallerAudio) -> None:
        meter = self._meter_in
        t0 = meter.begin() if meter is not None else 0
        audio = media.audio
        try:
            if len(audio) > self._max_media_bytes:  # refused before it reaches the resampler
                raise ValueError(f"{len(audio)}-byte media frame")
            pcm = self.inbound.decode(audio)
        except ValueError as exc:
            self.protocol_errors += 1
            if self._should_log_error():
                self.log.warning("carrier.bad_audio", error=str(exc), count=self.protocol_errors)
            return
        self.frames_in += 1
        if self.recorder is not None:
            self._record_caller(media, audio)
        table = self._loud_table
        if table is not None:
            voiced = b"\x01" in audio.translate(table)
        else:  # L16: any sample past the peak either way
            samples = np.frombuffer(audio, dtype="<i2")
            voiced = (bool(samples.size) and int(samples.max()) > VOICE_PEAK) or (
                bool(samples.size) and int(samples.min()) < -VOICE_PEAK
            )
        self.turns.caller_frame(self.now_ms(), voiced)
        if meter is not None:
            meter.end(t0)
        await self._to_gemini("audio", pcm)

    def _should_log_error(self) -> bool:
        """The first 20 protocol errors of a call are logged, then one in a thousand."""
        return self.protocol_errors <= 20 or self.protocol_errors % 1000 == 0

    def _record_played(self, chunks: list[Any], until_ms: float | None = None) -> None:
        """Places agent audio in the recording where the caller heard it.

        Confirmed chunks sit where their mark echo says they played; with `until_ms` (a clear,
        or the end of the call) only the part modelled as played before that moment is kept.
        """
        if self.recorder is None:
            return
        for chunk in chunks:
            audio, chunk.audio = chunk.audio, None
            if not audio:
                continue
            if until_ms is not None and not chunk.played:
                if chunk.start_ms >= until_ms:
                    continue
                audio = audio[: int((until_ms - chunk.start_ms) * 8) * self._unit]
            if audio:
                self.recorder.add_agent(chunk.start_ms, self._agent_pcm8k(audio))

    def _agent_pcm8k(self, audio: bytes) -> Any:
        """Agent audio as sent (the playback format) -> 8 kHz int16 for the recording."""
        pcm = pcm_of(audio, self._out_encoding)
        if self._out_rate == 8000:
            return pcm
        rs = StreamResampler(self._out_rate, 8000)
        return np.concatenate((rs.process(pcm), rs.flush()))

    def _record_caller(self, media: CallerAudio, audio: bytes) -> None:
        assert self.recorder is not None
        now = self.now_ms()
        if media.timestamp_ms is None:
            at = now
        else:
            if self._stream_t0_ms is None:
                self._stream_t0_ms = now - media.timestamp_ms
            at = self._stream_t0_ms + media.timestamp_ms  # gaps stay gaps
            if at > now + 2000.0:  # a stamp the call's own clock cannot have reached
                at = now
        pcm = pcm_of(audio, self._in_encoding)
        if self._caller_rec_rs is not None:
            pcm = self._caller_rec_rs.process(pcm)
        self.recorder.add_caller(at, pcm)

    async def _notify_heard(self) -> None:
        async with self._heard:
            self._heard.notify_all()

    async def _to_gemini(self, kind: str, payload: Any) -> None:
        if not self._gemini_ready.is_set():
            before = self._pending_input.dropped
            self._pending_input.append((kind, payload))
            self.frames_dropped += self._pending_input.dropped - before
            return
        try:
            if kind == "audio":
                # kept until the next resumable snapshot, in case this session is lost
                self._since_snapshot.append(payload)
                await self.link.send_audio(payload)
            else:
                await self.link.send_text(payload)
        except GeminiClosed:
            pass  # the agent pump sees the same close and recovers

    # ------------------------------------------------------------------ Gemini sessions
    async def _flush_pending(self) -> None:
        """Caller input held while no session was usable, in order, to the current session."""
        while self._pending_input:
            kind, payload = self._pending_input.peek()
            if kind == "audio":
                await self.link.send_audio(payload)
                self._since_snapshot.append(payload)
            else:
                await self.link.send_text(payload)
            self._pending_input.popleft()

    async def _open_link(self, handle: str | None) -> GeminiLink:
        link = self.link_factory(handle)
        try:
            async with asyncio.timeout(self.options.connect_timeout_s):
                await link.connect()
        except TimeoutError:
            await link.close()
            raise GeminiConnectError("Gemini Live setup timed out") from None
        except BaseException:
            await link.close()
            raise
        return link

    def _seed_text(self) -> str:
        lines = [
            f"{t.speaker}: {t.heard_text if t.interrupted else t.text}"
            for t in self.transcript
            if t.text
        ]
        return (
            "(The phone call is already in progress; the connection to you was renewed. "
            "The conversation so far, for context — do not repeat it, carry on:)\n"
            + "\n".join(lines[-40:])
        )

    async def _switch_to(self, link: GeminiLink, replay: Replay) -> Live:
        """Makes `link` the session: replays what the old one may have lost, then the backlog.

        Raises GeminiClosed when `link` dies on the way; the old session is closed either way.
        """
        old, self.link = self.link, link
        self._discarding_turn = False
        self.outbound.reset()
        if self.turns.agent_turn_open:  # the old session's answer cannot continue in a new one
            self.turns.turn_complete(self.now_ms())
            self._flush_turns()
        try:
            if replay.seed and self.transcript:
                await link.send_client_turn(self._seed_text(), turn_complete=False)
                self.supervisor.seeded()
            # Audio the old session took after its last resumable snapshot is not in the handle.
            owed = list(self._since_snapshot)
            self._since_snapshot.clear()
            for i, pcm in enumerate(owed):
                try:
                    await link.send_audio(pcm)
                except GeminiClosed:
                    self._since_snapshot.extend(owed[i:])  # still owed to the next session
                    raise
                self._since_snapshot.append(pcm)
            await self._flush_pending()
            if self._greeting_due:  # never heard yet: the greeting cue again, in this session
                await link.send_client_turn(GREETING_PROMPT + (self.options.greeting or ""))
            return await self._go_live()
        finally:
            if old is not link:
                await old.close()  # caller audio meanwhile goes straight to the new session

    async def _go_live(self) -> Live:
        """Flushes the backlog and marks the session usable in the same step.

        Caller audio reaching `_to_gemini` while the session is not ready waits in the backlog;
        nothing flushes it but a switch. So no await may come between the backlog's last flush
        and `_gemini_ready.set()`: audio queued in that gap would wait for the next session and
        reach it out of order (a hole in what this session heard).
        """
        await self._flush_pending()  # loops until empty, including audio queued while it sent
        self._gemini_ready.set()
        return self.supervisor.live(self.now_ms())

    async def _connect_with_recovery(self, action: SessionAction, why: str) -> bool:
        """Carries out the supervisor's recovery (open, back off, switch); False: give up."""
        sup = self.supervisor
        while True:
            if isinstance(action, GiveUp):
                self.log.warning("gemini.recovery_failed", reason=why, why=action.why)
                return False
            if isinstance(action, Wait):
                await asyncio.sleep(action.seconds)
                action = sup.retry()
                continue
            try:
                link = await self._open_link(action.handle)
            except GeminiConnectError as exc:
                self.log.warning(
                    "gemini.connect_failed",
                    attempt=action.attempt,
                    code=exc.code,
                    error=str(exc),
                    resuming=action.handle is not None,
                )
                self._event("error", where="gemini_connect", code=exc.code, error=str(exc))
                action = sup.connect_failed(exc.code)
                continue
            try:
                live = await self._switch_to(link, sup.connected())
            except GeminiClosed as exc:  # lost while seeding, replaying or flushing: again
                self.log.warning(
                    "gemini.session_lost", code=exc.code, reason=exc.reason, during="switch"
                )
                self._event("reconnect", code=exc.code, reason=exc.reason, during="switch")
                await link.close()
                action = sup.switch_failed()
                continue
            if live.first:
                self._event("session_started", session_id=link.session_id)
                return True
            if why != "go_away":  # a planned rotation is counted in `rotations`
                self.reconnects += 1
            self._event(
                "session_resumed" if live.resumed else "session_started",
                reason=why,
                code=live.code,
                attempt=live.attempt,
                gap_ms=live.gap_ms,
            )
            self.log.info(
                "gemini.reconnected",
                reason=why,
                resumed=live.resumed,
                attempt=live.attempt,
                gap_ms=live.gap_ms,
            )
            return True

    async def _recover(self, why: str, code: int | None, lost: GeminiLink | None = None) -> bool:
        """Replaces the session `lost` (None: the first connect); False when none can be had."""
        if why != "start":  # the first connect is not a lost session
            failing = self.supervisor.lost(time.monotonic())
            if failing is not None:  # sessions that open and die at once, again and again
                self.log.error("gemini.failing_repeatedly", why=failing.why)
                return False
        async with self._session_lock:
            if lost is not None and self.link is not lost and self._gemini_ready.is_set():
                return True  # a rotation or another recovery already replaced it
            self._gemini_ready.clear()
            first = self.supervisor.begin(why, code, self.now_ms())
            return await self._connect_with_recovery(first, why)

    async def _rotate(self) -> None:
        """Moves the call to a fresh session before the current one is closed (goAway)."""
        async with self._session_lock:
            if self.supervisor.rotation_deadline_ms is None or self._ended.is_set():
                return
            self._gemini_ready.clear()
            first = self.supervisor.begin("go_away", None, self.now_ms())
            old = self.link
            if not self.options.rotation_overlap or old.counter.full:
                await old.close()  # the quota has no room for two sessions at once
            rotated = await self._connect_with_recovery(first, "go_away")
            if rotated:
                self.rotations += 1
        if not rotated:  # the apology (or the failure transfer), outside the session lock
            await self._give_up("gemini_failed")

    async def _supervise(self) -> None:
        """Every 100 ms: the supervisor's rotation at a turn boundary, the seed's release, and
        its stall watchdog, carried out."""
        sup = self.supervisor
        while True:
            await asyncio.sleep(0.1)
            if not self._gemini_ready.is_set():
                continue
            now = self.now_ms()
            due = sup.tick(
                now,
                last_voice_ms=self.turns.last_voice_ms,
                agent_turn_open=self.turns.agent_turn_open,
                playout_busy_until_ms=self.playout.busy_until_ms(),
                tools_running=bool(self._tool_tasks),
            )
            if isinstance(due, Rotate):
                await self._rotate()
                continue
            if isinstance(due, CompleteSeed):
                self.log.info("gemini.seed_completed")
                with contextlib.suppress(GeminiClosed):
                    await self.link.send_turn_complete()
                sup.awaiting_reply(self.now_ms())
                continue
            stall = sup.watchdog(now, self.turns.last_voice_ms)
            if isinstance(stall, Nudge):
                self.log.warning("gemini.stalled", action="nudge")
                self._event("error", where="gemini", error="model silent: nudged")
                with contextlib.suppress(GeminiClosed):
                    await self.link.send_text(STALL_NUDGE)
            elif isinstance(stall, DropStalled):
                self.log.warning("gemini.stalled", action="reconnect")
                self._event("error", where="gemini", error="model silent: reconnecting")
                self._stalled_link = self.link
                await self.link.close()

    async def _agent_pump(self) -> None:
        if not await self._recover("start", None):
            self.log.error("gemini.unavailable")
            await self._give_up("gemini_failed")
            return
        while not self._ended.is_set():
            link = self.link
            try:
                events = await link.receive()
            except (GeminiClosed, lp.LiveProtocolError) as exc:
                if link is not self.link or self._ended.is_set():
                    continue  # a session we already moved away from
                code = getattr(exc, "code", None)
                stalled = link is self._stalled_link
                reason = "stalled" if stalled else str(exc)
                self.log.warning("gemini.session_lost", code=code, reason=reason)
                self._event("reconnect", code=code, reason=reason)
                if not await self._recover("stalled" if stalled else "session_lost", code, link):
                    await self._give_up("gemini_failed")
                    return
                continue
            for event in events:
                if link is not self.link:
                    break
                await self._on_live_event(event)

    async def _give_up(self, reason: str) -> None:
        """The call cannot go on (Gemini cannot be had, a call task failed): the caller hears
        the apology or is handed to a person, never endless silence; the call is `failed`."""
        if self._giving_up or self._ended.is_set():
            self._end(reason, failed=True)
            return
        self._giving_up = True
        self._gemini_ready.clear()  # whatever the model still sends is not played over this
        transfer = self.options.failure_transfer
        if transfer is not None:
            try:
                if await transfer():
                    self._event("transfer", reason=reason)
                    self._end(f"{reason}_transferred", failed=True)
                    return
            except Exception:  # then the apology below, never silence
                self.log.exception("call.failure_transfer_failed")
        self.log.error("call.failed", reason=reason)
        self._event("error", where="call", error=f"{reason}: ending the call")
        apology = self.options.apology_ulaw
        if apology:  # μ-law 8 kHz: 8000 bytes a second
            with contextlib.suppress(Exception):  # after what was already sent, as sent
                await self.play_ulaw(apology)
                await self.wait_heard(timeout=len(apology) / 8000 + 3.0)
        self._end(reason, failed=True)

    # ------------------------------------------------------------------ public controls
    async def play_ulaw(self, ulaw: bytes) -> str | None:
        """Plays μ-law 8 kHz audio that is not the model's (tones, an apology, a recorded
        line), coded to the stream's playback format; returns its mark."""
        if self._out_encoding != "audio/x-mulaw" and ulaw:
            ulaw = from_ulaw(ulaw, self._out_encoding, self._out_rate)
        return await self._send_agent_audio(ulaw, in_turn=False, mark_now=True)

    async def send_dtmf(self, digits: str) -> bool | None:
        """Keys to the far end as the carrier's own DTMF message, where it has one (Plivo's
        `sendDTMF`): True once sent, False if the call has ended, None where the carrier
        cannot (the caller then plays the tones in-band with `play_ulaw`)."""
        if not self.stream.capabilities.send_dtmf_on_stream:
            return None
        try:
            frames = self.stream.send_dtmf(digits)
        except ValueError:
            return None  # keys the carrier's message cannot carry (A-D): tones instead
        return await self._send(frames)

    async def wait_heard(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Waits until everything sent so far has been played to the caller (mark echo)."""
        await self._send_mark()  # audio sent since the last mark needs one to be confirmed
        try:
            async with asyncio.timeout(timeout):
                async with self._heard:
                    await self._heard.wait_for(lambda: not self.playout.has_pending())
        except TimeoutError:
            return False
        return True

    async def wait_agent_done(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Waits for the agent's current turn to end and be heard (e.g. a goodbye)."""
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                async with self._heard:
                    await self._heard.wait_for(lambda: not self.turns.agent_turn_open)
        except TimeoutError:
            return False
        return await self.wait_heard(max(0.0, deadline - time.monotonic()))

    async def _on_live_event(self, event: lp.LiveEvent) -> None:
        if isinstance(event, lp.AgentAudio):
            if not self._discarding_turn:
                await self._agent_audio(event)
        elif isinstance(event, lp.AgentTranscript):
            if not self._discarding_turn:
                self.turns.agent_transcript(self.now_ms(), event.text)
                live_partial(self.observer, self.turns)  # words to the live page now
        elif isinstance(event, lp.CallerTranscript):
            self.turns.caller_transcript(self.now_ms(), event.text)
            live_partial(self.observer, self.turns)
            if not self.turns.agent_turn_open:
                self.supervisor.awaiting_reply(self.now_ms())
        elif isinstance(event, lp.Interrupted):
            await self._barge_in()
            self.supervisor.awaiting_reply(self.now_ms())
        elif isinstance(event, lp.GenerationComplete):
            if not self._discarding_turn:
                await self._send_agent_audio(self.outbound.flush(), mark_now=True)
        elif isinstance(event, lp.TurnComplete):
            session = self.supervisor.sessions  # the session may be replaced while this runs
            if not self._discarding_turn:
                await self._send_agent_audio(self.outbound.flush(), mark_now=True)
                if self.turns.agent_turn_open:
                    self.supervisor.answered(self.now_ms())
                    self._greeting_due = False  # the first complete turn is the greeting
            self._discarding_turn = False
            self.supervisor.turn_complete(session)
            self._add_usage(event.usage)
            self.turns.turn_complete(self.now_ms())
            self._flush_turns()
            await self._notify_heard()
        elif isinstance(event, lp.ToolCall):
            for call in event.calls:
                self._start_tool(call)
        elif isinstance(event, lp.ToolCallCancellation):
            for call_id in event.ids:
                task = self._tool_tasks.pop(call_id, None)
                if task is not None:
                    task.cancel()
                self._event("tool_cancelled", id=call_id)
        elif isinstance(event, lp.ResumptionUpdate):
            # only a handle after a turn of the session's own holds the audio replayed to it
            if event.resumable and event.handle and self.supervisor.resumable(event.handle):
                self._since_snapshot.clear()  # the snapshot holds everything up to here
        elif isinstance(event, lp.GoAway):
            self.log.info("gemini.go_away", time_left_s=event.time_left_s)
            self._event("go_away", time_left_s=event.time_left_s)
            self.supervisor.go_away(self.now_ms(), event.time_left_s)
        elif isinstance(event, lp.UsageOnly):
            self._add_usage(event.usage)

    def _add_usage(self, usage: lp.Usage | None) -> None:
        if usage is not None:
            self.usage.prompt_tokens += usage.prompt_tokens
            self.usage.response_tokens += usage.response_tokens
            self.usage.total_tokens += usage.total_tokens

    async def _agent_audio(self, audio: lp.AgentAudio) -> None:
        if audio.rate != self._agent_rate:  # the model changed its output rate: follow it
            self._agent_rate = audio.rate
            self.outbound = OutboundTranscoder(audio.rate, self._out_encoding, self._out_rate)
        meter = self._meter_out
        t0 = meter.begin() if meter is not None else 0
        coded = self.outbound.encode(audio.pcm)
        if meter is not None:
            meter.end(t0)
        await self._send_agent_audio(coded)

    async def _send(self, frames: list[Frame]) -> bool:
        """Sends a stream builder's frames in order; False (and the call ends) once closed."""
        try:
            for frame in frames:
                await self.socket.send(frame)
        except CarrierClosed:
            self._end("caller_closed")
            return False
        return True

    async def _send_agent_audio(
        self, audio: bytes, *, in_turn: bool = True, mark_now: bool = False
    ) -> str | None:
        """Sends agent audio (in the playback format) at once, the carrier queues it; a mark
        follows every ~100 ms. Returns the mark when one was sent after this chunk.
        """
        if not audio:
            if self._held and mark_now:  # the end of a turn: what was held back goes now
                held, self._held = self._held, b""
                if not await self._send(self.stream.play(held)):
                    return None
            return await self._send_mark() if mark_now else None
        now = self.now_ms()
        samples = len(audio) // self._unit  # in 8 kHz samples
        if in_turn:
            if self._giving_up:
                return None  # the apology is playing: the model is not heard over it
            self._expect_reply_at = None
            self._nudged = False
            self._seed_open = False  # the model speaks: it is not waiting for more content
            turn = self.turns.agent_audio(now, samples)
            turn_end = self.turns.agent_samples
        else:
            turn, turn_end = -1, samples
        self.playout.sent(
            now, turn, samples, turn_end, None, audio if self.recorder is not None else None
        )
        if self._align and not mark_now:  # whole frames now, the rest with the next chunk
            if self._held:
                audio = self._held + audio
            cut = len(audio) - len(audio) % self._align
            audio, self._held = audio[:cut], audio[cut:]
        elif self._held:  # a turn's end: everything, the carrier pads the last frame
            audio, self._held = self._held + audio, b""
        frames = self.stream.play(audio) if audio else None
        if frames and not await self._send(frames):
            return None
        self.frames_out += 1
        self._unmarked_samples += samples
        if mark_now or self._unmarked_samples >= MARK_EVERY_SAMPLES:
            return await self._send_mark()
        return None

    async def _send_mark(self) -> str | None:
        """Asks the carrier to tell us when everything sent so far has been played.

        A carrier without marks gets none: the mark settles itself when the modelled playout
        (pacing from what was sent) says it has played, and heard parts are "estimated".
        """
        mark = self.playout.next_mark()
        if not self.playout.attach_mark(mark):
            return None
        self._unmarked_samples = 0
        if not self._marks:
            if not await self._send(self.stream.flush()):
                return None
            delay_s = max(0.0, self.playout.busy_until_ms() - self.now_ms()) / 1000.0
            asyncio.get_running_loop().call_later(delay_s, self._estimated_echo, mark)
            return mark
        if not await self._send(self.stream.mark(mark)):
            return None
        return mark

    def _estimated_echo(self, mark: str) -> None:
        """A mark of a carrier without marks, settled by pacing (see `_send_mark`)."""
        if self._ended.is_set():
            return
        if self.playout.mark_echoed(self.now_ms(), mark) is not None:
            self._record_played(self.playout.just_played)
        task = asyncio.get_running_loop().create_task(self._notify_heard())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _barge_in(self) -> None:
        """The caller spoke over the agent: silence it at the carrier before anything else.

        Without `clear` nothing more is sent and what the carrier has queued runs out.
        """
        if self._can_clear and not await self._send(self.stream.clear()):
            return
        now = self.now_ms()
        self.outbound.reset()
        self._held = b""
        turn = self.turns.agent_turn_index
        heard = self.playout.heard_in_turn(turn, now) if turn is not None else 0
        if self._can_clear:
            self._record_played(self.playout.clear(now), until_ms=now)
        self._unmarked_samples = 0
        self.turns.interrupted(now, heard)
        self._discarding_turn = True
        await self._notify_heard()
        estimated = {} if self._marks else {"heard": "estimated"}
        self.log.info("call.barge_in", heard_ms=round(heard / 8.0), **estimated)
        self._event("interrupted", heard_ms=round(heard / 8.0), **estimated)

    # ------------------------------------------------------------------ tools
    def _start_tool(self, call: lp.FunctionCall) -> None:
        self._event("tool_call", id=call.id, name=call.name, args=call.args)
        spoke = self.turns.agent_turn_open  # agent audio already in this turn
        self._tool_tasks[call.id] = asyncio.create_task(
            self._run_tool(call, spoke), name=f"tool:{call.name}:{self.call_sid}"
        )

    async def _run_tool(self, call: lp.FunctionCall, spoke: bool = True) -> None:
        SPOKE_BEFORE_TOOL.set(spoke)  # this task's own context: seen by its handler only
        started = time.monotonic()
        handler = self.options.tool_handler
        try:
            if handler is None:
                result: dict[str, Any] = {"error": f"unknown tool {call.name!r}"}
            else:
                result = await handler(call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a tool must never take the call down
            self.log.exception("tool.failed", tool=call.name)
            result = {"error": f"{call.name} failed: {type(exc).__name__}"}
        finally:
            self._tool_tasks.pop(call.id, None)
        duration_ms = round((time.monotonic() - started) * 1000.0, 1)
        self._event(
            "tool_result", id=call.id, name=call.name, result=result, duration_ms=duration_ms
        )
        with contextlib.suppress(GeminiClosed):
            await self.link.send_tool_responses(
                [
                    function_response(
                        call.id,
                        call.name,
                        result,
                        non_blocking=self.options.non_blocking_tools,
                        spoke_first=spoke,
                    )
                ]
            )
            self._expect_reply_at = self.now_ms()
