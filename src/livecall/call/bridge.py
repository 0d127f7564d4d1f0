"""One phone call: the caller's stream and a Gemini Live session, pumped both ways at once.

Two tasks per call. The caller pump reads carrier frames, turns μ-law 8 kHz into 16 kHz PCM
and hands it to Gemini (buffered, in order, until the session is open: the caller's first
words are never dropped). The agent pump reads Gemini's events and sends agent audio to the
carrier the moment it exists, each chunk followed by a mark, letting the carrier queue it; a
model `interrupted` sends `clear` before anything else happens. Whichever side ends first ends
the call: the other side is closed, every task cancelled, and one summary line logged.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import structlog

from livecall.agent import live_protocol as lp
from livecall.agent.gemini import GeminiClosed, GeminiConnectError, GeminiLink
from livecall.audio.g711 import ulaw_decode
from livecall.audio.recording import StereoRecorder
from livecall.audio.transcode import InboundTranscoder, OutboundTranscoder
from livecall.call.playout import PlayoutTracker
from livecall.call.turns import TurnTracker
from livecall.records import (
    CallEventRecord,
    CallInfo,
    CallObserver,
    CallSummary,
    NullObserver,
)
from livecall.telephony import twilio as tw

__all__ = ["CallBridge", "CallOptions", "CarrierClosed", "CarrierSocket"]

log = structlog.get_logger("livecall.call")

VOICE_PEAK = 700  # int16 peak above which a caller frame counts as speech (~ -33 dBFS)


class CarrierClosed(Exception):
    """The carrier's socket is gone."""


class CarrierSocket(Protocol):
    """The caller's side of the call as the bridge sees it: text frames in and out."""

    async def receive(self) -> str | bytes | None:
        """The next frame, or None once the socket has closed."""
        ...

    async def send_text(self, data: str) -> None: ...

    async def close(self, code: int = 1000) -> None: ...


@dataclass(slots=True)
class CallOptions:
    """Per-call knobs, from settings and the agent profile."""

    greeting: str | None = None
    max_duration_s: float = 3600.0
    caller_buffer_frames: int = 750  # 15 s of 20 ms frames held while Gemini connects
    connect_timeout_s: float = 10.0
    direction: str = "inbound"
    profile: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    tool_handler: Callable[[lp.FunctionCall], Awaitable[dict[str, Any]]] | None = None
    # where the stereo recording goes when the call ends (None: not recorded)
    recording_sink: Callable[[str, StereoRecorder, float], Awaitable[str | None]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class CallBridge:
    """Runs one call from the carrier's `start` until either side ends it."""

    def __init__(
        self,
        socket: CarrierSocket,
        stream: tw.TwilioStream,
        start: tw.Start,
        link: GeminiLink,
        *,
        options: CallOptions | None = None,
        observer: CallObserver | None = None,
        on_end: Callable[[CallSummary], None] | None = None,
    ) -> None:
        self.socket = socket
        self.stream = stream
        self.start = start
        self.link = link
        self.options = options or CallOptions()
        self.observer: CallObserver = observer or NullObserver()
        self.on_end = on_end
        self.call_sid = start.call_sid
        self.stream_sid = start.stream_sid
        self.log = log.bind(call_sid=self.call_sid, stream_sid=self.stream_sid)

        self.inbound = InboundTranscoder(out_rate=16000, encoding=start.encoding or "audio/x-mulaw")
        self._agent_rate = 24000
        self.outbound = OutboundTranscoder(in_rate=24000, encoding="audio/x-mulaw")
        self.playout = PlayoutTracker(rate=8000)
        self.turns = TurnTracker(self.call_sid)
        self.recorder = StereoRecorder() if self.options.recording_sink is not None else None
        self._stream_t0_ms: float | None = None  # call clock when Twilio's timestamp 0 was

        self._t0 = time.monotonic()
        self._gemini_ready = asyncio.Event()
        self._pending_input: deque[tuple[str, Any]] = deque()
        self._discarding_turn = False  # after `interrupted`, until the turn completes
        self._ended = asyncio.Event()
        self.end_reason: str | None = None
        self.failed = False
        self.resumption_handle: str | None = None
        self.usage = lp.Usage()
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0
        self.protocol_errors = 0
        self._tool_tasks: dict[str, asyncio.Task[None]] = {}
        self._seq = 0

    # ------------------------------------------------------------------ clock & records
    def now_ms(self) -> float:
        return (time.monotonic() - self._t0) * 1000.0

    def _event(self, kind: str, **data: Any) -> None:
        self.observer.event(CallEventRecord(self.call_sid, round(self.now_ms()), kind, data))

    def _flush_turns(self) -> None:
        for turn in self.turns.drain():
            self.observer.turn(turn)
            self.log.info(
                "call.turn",
                speaker=turn.speaker,
                text=turn.heard_text if turn.interrupted else turn.text,
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

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> CallSummary:
        started = datetime.now(UTC)
        structlog.contextvars.bind_contextvars(call_sid=self.call_sid)
        self.observer.call_started(
            CallInfo(
                call_sid=self.call_sid,
                stream_sid=self.stream_sid,
                started_at=started,
                account_sid=self.start.account_sid,
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
            asyncio.create_task(self._caller_pump(), name=f"caller:{self.call_sid}"),
            asyncio.create_task(self._agent_pump(), name=f"agent:{self.call_sid}"),
        ]
        try:
            async with asyncio.timeout(self.options.max_duration_s):
                await self._ended.wait()
        except TimeoutError:
            self._end("max_duration")
        finally:
            for task in [*tasks, *self._tool_tasks.values()]:
                task.cancel()
            await asyncio.gather(*tasks, *self._tool_tasks.values(), return_exceptions=True)
            await self.link.close()
            with contextlib.suppress(Exception):
                await self.socket.close(1000)
            recording = await self._finish_recording()
            summary = self._summarize(started)
            summary.recording_path = recording
            with contextlib.suppress(Exception):
                self.observer.call_ended(summary)
            if self.on_end is not None:
                self.on_end(summary)
            structlog.contextvars.unbind_contextvars("call_sid")
        return summary

    async def _finish_recording(self) -> str | None:
        if self.recorder is None or self.options.recording_sink is None:
            return None
        try:
            return await self.options.recording_sink(self.call_sid, self.recorder, self.now_ms())
        except Exception:  # the call's records must still be written
            self.log.exception("recording.failed")
            return None

    def _summarize(self, started: datetime) -> CallSummary:
        now = self.now_ms()
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
            frames_missing=self.stream.frames_missing,
            gemini_sessions=1,
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
            tokens=summary.total_tokens,
        )
        return summary

    # ------------------------------------------------------------------ caller -> Gemini
    async def _caller_pump(self) -> None:
        try:
            while True:
                data = await self.socket.receive()
                if data is None:
                    self._end("caller_closed")
                    return
                try:
                    event = self.stream.receive(data)
                except tw.ProtocolError as exc:
                    self.protocol_errors += 1
                    if self.protocol_errors <= 20 or self.protocol_errors % 1000 == 0:
                        self.log.warning(
                            "twilio.bad_frame", error=str(exc), count=self.protocol_errors
                        )
                    continue
                if isinstance(event, tw.Media):
                    await self._caller_audio(event)
                elif isinstance(event, tw.Mark):
                    self.playout.mark_echoed(self.now_ms(), event.name)
                elif isinstance(event, tw.Dtmf):
                    self.log.info("call.dtmf", digit=event.digit)
                    self._event("dtmf", digit=event.digit)
                    await self._to_gemini(
                        "text", f"The caller pressed {event.digit} on the keypad."
                    )
                elif isinstance(event, tw.Stop):
                    self._end("caller_stop")
                    return
        except CarrierClosed:
            self._end("caller_closed")

    async def _caller_audio(self, media: tw.Media) -> None:
        if media.track not in (None, "inbound", "inbound_track"):
            return
        try:
            pcm = self.inbound.decode_payload(media.payload)
        except ValueError as exc:
            self.protocol_errors += 1
            self.log.warning("twilio.bad_audio", error=str(exc))
            return
        self.frames_in += 1
        if self.recorder is not None:
            self._record_caller(media)
        samples = np.frombuffer(pcm, dtype=np.int16)
        voiced = samples.size > 0 and max(int(samples.max()), -int(samples.min())) > VOICE_PEAK
        self.turns.caller_frame(self.now_ms(), voiced)
        await self._to_gemini("audio", pcm)

    def _record_caller(self, media: tw.Media) -> None:
        assert self.recorder is not None
        now = self.now_ms()
        if media.timestamp_ms is None:
            at = now
        else:
            if self._stream_t0_ms is None:
                self._stream_t0_ms = now - media.timestamp_ms
            at = self._stream_t0_ms + media.timestamp_ms  # gaps stay gaps
        try:
            ulaw = lp.decode_b64(media.payload)
        except lp.LiveProtocolError:
            return
        self.recorder.add_caller(at, ulaw_decode(ulaw))

    async def _to_gemini(self, kind: str, payload: Any) -> None:
        if not self._gemini_ready.is_set():
            if len(self._pending_input) >= self.options.caller_buffer_frames:
                self._pending_input.popleft()
                self.frames_dropped += 1
            self._pending_input.append((kind, payload))
            return
        try:
            if kind == "audio":
                await self.link.send_audio(payload)
            else:
                await self.link.send_text(payload)
        except GeminiClosed:
            pass  # the agent pump sees the same close and ends the call

    # ------------------------------------------------------------------ Gemini -> caller
    async def _agent_pump(self) -> None:
        try:
            async with asyncio.timeout(self.options.connect_timeout_s):
                await self.link.connect()
        except (GeminiConnectError, TimeoutError) as exc:
            code = getattr(exc, "code", None)
            self.log.error("gemini.connect_failed", error=str(exc) or "timeout", code=code)
            self._event("error", where="gemini_connect", code=code, error=str(exc) or "timeout")
            self._end("gemini_connect_failed", failed=True)
            return
        self._event("session_started", session_id=self.link.session_id)
        try:
            while self._pending_input:
                kind, payload = self._pending_input.popleft()
                if kind == "audio":
                    await self.link.send_audio(payload)
                else:
                    await self.link.send_text(payload)
            self._gemini_ready.set()
            if self.options.greeting:
                await self.link.send_client_turn(
                    "The phone call has just been answered. Greet the caller now, saying: "
                    + self.options.greeting
                )
            while True:
                for event in await self.link.receive():
                    await self._on_live_event(event)
        except GeminiClosed as exc:
            normal = exc.code in (1000, 1001)
            if not normal:
                self.log.error("gemini.closed", code=exc.code, reason=exc.reason)
                self._event("error", where="gemini", code=exc.code, error=exc.reason)
            self._end("gemini_closed" if normal else "gemini_failed", failed=not normal)
        except lp.LiveProtocolError as exc:
            self.log.error("gemini.bad_frame", error=str(exc))
            self._event("error", where="gemini", error=str(exc))
            self._end("gemini_failed", failed=True)

    async def _on_live_event(self, event: lp.LiveEvent) -> None:
        if isinstance(event, lp.AgentAudio):
            if not self._discarding_turn:
                await self._agent_audio(event)
        elif isinstance(event, lp.AgentTranscript):
            if not self._discarding_turn:
                self.turns.agent_transcript(self.now_ms(), event.text)
        elif isinstance(event, lp.CallerTranscript):
            self.turns.caller_transcript(self.now_ms(), event.text)
        elif isinstance(event, lp.Interrupted):
            await self._barge_in()
        elif isinstance(event, lp.GenerationComplete):
            if not self._discarding_turn:
                await self._send_agent_ulaw(self.outbound.flush())
        elif isinstance(event, lp.TurnComplete):
            if not self._discarding_turn:
                await self._send_agent_ulaw(self.outbound.flush())
            self._discarding_turn = False
            self._add_usage(event.usage)
            self.turns.turn_complete(self.now_ms())
            self._flush_turns()
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
            if event.resumable and event.handle:
                self.resumption_handle = event.handle
        elif isinstance(event, lp.GoAway):
            self.log.info("gemini.go_away", time_left_s=event.time_left_s)
            self._event("go_away", time_left_s=event.time_left_s)
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
            self.outbound = OutboundTranscoder(in_rate=audio.rate, encoding="audio/x-mulaw")
        await self._send_agent_ulaw(self.outbound.encode(audio.pcm))

    async def _send_agent_ulaw(self, ulaw: bytes) -> None:
        if not ulaw:
            return
        now = self.now_ms()
        samples = len(ulaw)
        turn = self.turns.agent_audio(now, samples)
        mark = self.playout.next_mark()
        chunk = self.playout.sent(now, turn, samples, self.turns.agent_samples, mark)
        if self.recorder is not None:
            self.recorder.add_agent(chunk.start_ms, ulaw_decode(ulaw))
        payload = binascii.b2a_base64(ulaw, newline=False).decode("ascii")
        try:
            await self.socket.send_text(tw.media_message(self.stream_sid, payload))
            await self.socket.send_text(tw.mark_message(self.stream_sid, mark))
        except CarrierClosed:
            self._end("caller_closed")
            return
        self.frames_out += 1

    async def _barge_in(self) -> None:
        """The caller spoke over the agent: silence it at the carrier before anything else."""
        try:
            await self.socket.send_text(tw.clear_message(self.stream_sid))
        except CarrierClosed:
            self._end("caller_closed")
            return
        now = self.now_ms()
        self.outbound.reset()
        turn = self.turns.agent_turn_index
        heard = self.playout.heard_in_turn(turn, now) if turn is not None else 0
        self.playout.clear(now)
        if self.recorder is not None:
            self.recorder.cut_agent(now)
        self.turns.interrupted(now, heard)
        self._discarding_turn = True
        self.log.info("call.barge_in", heard_ms=round(heard / 8.0))
        self._event("interrupted", heard_ms=round(heard / 8.0))

    # ------------------------------------------------------------------ tools
    def _start_tool(self, call: lp.FunctionCall) -> None:
        self._event("tool_call", id=call.id, name=call.name, args=call.args)
        self._tool_tasks[call.id] = asyncio.create_task(
            self._run_tool(call), name=f"tool:{call.name}:{self.call_sid}"
        )

    async def _run_tool(self, call: lp.FunctionCall) -> None:
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
                [{"id": call.id, "name": call.name, "response": result}]
            )
