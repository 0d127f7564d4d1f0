"""One phone call: the caller's stream and a Gemini Live session, pumped both ways at once.

`CallBridge` wires the call's parts, one module per job, and runs them: the caller pump
(`caller_pump.py`: carrier frames in, caller audio to Gemini), the agent pump
(`agent_pump.py`: Gemini's events to the parts that act on them), the agent output
(`agent_output.py`: agent audio to carrier frames, marks, `clear`, what was heard), the
Gemini sessions (`gemini_sessions.py`: open, switch, recover and rotate, as the sans-I/O
`SessionSupervisor` decides) and the tool tasks (`tool_tasks.py`). Whichever side ends first
ends the call: the other side is closed, every task cancelled, and one summary line logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from livecall.agent import live_protocol as lp
from livecall.agent.gemini import PERMANENT_CLOSE_CODES, GeminiClosed, GeminiLink
from livecall.audio.recording import StereoRecorder
from livecall.call.agent_output import AgentOutput
from livecall.call.agent_pump import AgentPump
from livecall.call.caller_pump import CallerPump
from livecall.call.carrier_socket import CarrierClosed, CarrierSocket
from livecall.call.gemini_sessions import GREETING_PROMPT, STALL_NUDGE, GeminiSessions
from livecall.call.options import CallOptions
from livecall.call.supervisor import SessionSupervisor
from livecall.call.tool_tasks import SPOKE_BEFORE_TOOL, ToolTasks
from livecall.call.turns import TurnTracker
from livecall.carriers.base import CallStarted, CarrierStream
from livecall.privacy import transcript_fields
from livecall.records import (
    CallEventRecord,
    CallInfo,
    CallObserver,
    CallSummary,
    NullObserver,
    TurnRecord,
)

__all__ = [
    "GREETING_PROMPT",
    "SPOKE_BEFORE_TOOL",
    "STALL_NUDGE",
    "CallBridge",
    "CarrierClosed",
    "CarrierSocket",
]

log = structlog.get_logger("livecall.call")
# how long the summary waits for the REST request that ended the call (see CallOptions)
ACTIONS_SETTLE_S = 5.0


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
        self.options = options or CallOptions()
        self.observer: CallObserver = observer or NullObserver()
        self.call_sid = start.call_id
        self.stream_sid = start.stream_id or start.call_id
        self.log = log.bind(call_sid=self.call_sid, stream_sid=self.stream_sid)

        # what every part shares: the call's clock, turns, recording, records and its end
        self.turns = TurnTracker(self.call_sid)
        self.recorder = StereoRecorder() if self.options.recording_sink is not None else None
        self._t0 = time.monotonic()
        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self.failed = False
        self.giving_up = False  # the apology (or failure transfer) is under way
        self.usage = lp.Usage()
        self.transcript: deque[TurnRecord] = deque(maxlen=200)
        # sessions: the supervisor decides, `GeminiSessions` carries it out
        self.supervisor = SessionSupervisor(
            attempts=self.options.reconnect_attempts,
            backoff_initial_s=self.options.backoff_initial_s,
            backoff_max_s=self.options.backoff_max_s,
            rotation_margin_s=self.options.rotation_margin_s,
            stall_timeout_s=self.options.stall_timeout_s,
            permanent_codes=PERMANENT_CLOSE_CODES,
        )
        # the call's parts, one job each
        self.output = AgentOutput(self)
        self.playout = self.output.playout
        self.gemini = GeminiSessions(self, self.output)
        self.tools = ToolTasks(self, self.gemini)
        self.agent = AgentPump(self, self.output, self.gemini, self.tools)
        self.caller = CallerPump(self, self.output, self.gemini)

    # ------------------------------------------------------------------ state of the parts
    def tools_running(self) -> bool:
        return bool(self.tools.tasks)

    @property
    def link(self) -> GeminiLink:
        """The current Gemini session (replaced on recovery and rotation)."""
        return self.gemini.link

    @property
    def sessions(self) -> int:
        """Gemini sessions the call has had."""
        return self.supervisor.sessions

    @property
    def resumption_handle(self) -> str | None:
        return self.supervisor.handle

    @property
    def frames_in(self) -> int:
        return self.caller.frames_in

    @property
    def frames_out(self) -> int:
        return self.output.frames_out

    @property
    def frames_dropped(self) -> int:
        return self.gemini.frames_dropped

    @property
    def protocol_errors(self) -> int:
        return self.caller.protocol_errors

    @property
    def reconnects(self) -> int:
        return self.gemini.reconnects

    @property
    def rotations(self) -> int:
        return self.gemini.rotations

    # ------------------------------------------------------------------ clock & records
    def now_ms(self) -> float:
        return (time.monotonic() - self._t0) * 1000.0

    def event(self, kind: str, **data: Any) -> None:
        self.observer.event(CallEventRecord(self.call_sid, round(self.now_ms()), kind, data))

    def flush_turns(self) -> None:
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

    def finish(self, reason: str, *, failed: bool = False) -> None:
        if self.end_reason is None:
            self.end_reason = reason
            self.failed = failed
        self.ended.set()

    def end(self, reason: str) -> None:
        """Ends the call from outside (an operator, a drain, a newer stream for the call)."""
        self.finish(reason)

    def replace(self) -> None:
        self.finish("replaced_by_new_stream")

    async def end_politely(self, reason: str, line: str, timeout: float = 8.0) -> None:  # noqa: ASYNC109
        """Has the agent say `line` (its own voice), waits until it is heard, then ends."""
        if self.ended.is_set():
            return
        if self.gemini.ready.is_set():
            with contextlib.suppress(GeminiClosed, TimeoutError):
                await self.link.send_client_turn(
                    "(Say this to the caller now, then stop talking: " + line + ")"
                )
                started = time.monotonic()
                async with asyncio.timeout(timeout):
                    async with self.output.heard:
                        await self.output.heard.wait_for(
                            lambda: self.turns.agent_turn_open or self.ended.is_set()
                        )
                await self.wait_agent_done(max(0.5, timeout - (time.monotonic() - started)))
        self.finish(reason)

    # ------------------------------------------------------------------ lifecycle
    async def _guarded(self, name: str, work: Awaitable[None]) -> None:
        """Runs one of the call's tasks; if it fails, the call ends `failed`, never silent."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.error("call.task_failed", task=name, error=type(exc).__name__, exc_info=True)
            self.event("error", where=name, error=f"{type(exc).__name__}: ending the call")
            await self.give_up(f"{name}_failed")

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
                self._guarded("caller_pump", self.caller.run()), name=f"caller:{self.call_sid}"
            ),
            asyncio.create_task(
                self._guarded("agent_pump", self.agent.run()), name=f"agent:{self.call_sid}"
            ),
            asyncio.create_task(
                self._guarded("supervisor", self.gemini.supervise()),
                name=f"supervise:{self.call_sid}",
            ),
        ]
        try:
            async with asyncio.timeout(self.options.max_duration_s):
                await self.ended.wait()
        except TimeoutError:
            self.log.info("call.max_duration", max_duration_s=self.options.max_duration_s)
            await self.end_politely("max_duration", self.options.max_duration_line)
        finally:
            for meter in (self.caller._meter_in, self.output._meter_out):
                if meter is not None:
                    meter.flush()
            for task in [*tasks, *self.tools.tasks.values()]:
                task.cancel()
            await asyncio.gather(*tasks, *self.tools.tasks.values(), return_exceptions=True)
            # The caller is let go first: nothing Gemini does may hold a phone line open.
            with contextlib.suppress(Exception):
                await self.socket.close(1000)
            await self.link.close()
            if self.options.settle_actions is not None:
                with contextlib.suppress(Exception):  # past the bound, it is recorded late
                    async with asyncio.timeout(ACTIONS_SETTLE_S):
                        await self.options.settle_actions()
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
        self.output.record_played(self.playout.pending(), until_ms=self.now_ms())
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
        self.flush_turns()
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

    async def give_up(self, reason: str) -> None:
        """The call cannot go on (Gemini cannot be had, a call task failed): the caller hears
        the apology or is handed to a person, never endless silence; the call is `failed`."""
        if self.giving_up or self.ended.is_set():
            self.finish(reason, failed=True)
            return
        self.giving_up = True
        self.gemini.ready.clear()  # whatever the model still sends is not played over this
        transfer = self.options.failure_transfer
        if transfer is not None:
            try:
                if await transfer():
                    self.event("transfer", reason=reason)
                    self.finish(f"{reason}_transferred", failed=True)
                    return
            except Exception:  # then the apology below, never silence
                self.log.exception("call.failure_transfer_failed")
        self.log.error("call.failed", reason=reason)
        self.event("error", where="call", error=f"{reason}: ending the call")
        apology = self.options.apology_ulaw
        if apology:
            with contextlib.suppress(Exception):  # after what was already sent, as sent
                await self.play_line(apology)
        self.finish(reason, failed=True)

    # ------------------------------------------------------------------ public controls
    async def play_ulaw(self, ulaw: bytes) -> str | None:
        """Plays μ-law 8 kHz audio that is not the model's; returns its mark."""
        return await self.output.play_ulaw(ulaw)

    async def play_line(self, ulaw: bytes) -> bool:
        """A recorded line of livecall's own (μ-law 8 kHz: 8000 bytes a second), played after
        what was already sent and waited for until heard to the end; False: not heard."""
        if await self.play_ulaw(ulaw) is None and self.end_reason is not None:
            return False
        return await self.wait_heard(timeout=len(ulaw) / 8000 + 3.0)

    async def send_dtmf(self, digits: str) -> bool | None:
        """Keys as the carrier's own DTMF message (None where it has none)."""
        return await self.output.send_dtmf(digits)

    async def wait_heard(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Waits until everything sent so far has been played to the caller (mark echo)."""
        return await self.output.wait_heard(timeout)

    async def wait_agent_done(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Waits for the agent's current turn to end and be heard (e.g. a goodbye)."""
        return await self.output.wait_agent_done(timeout)
