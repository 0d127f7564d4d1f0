"""The call's Gemini Live sessions: opened, switched, recovered and rotated, never dropped.

The sans-I/O `SessionSupervisor` decides (back off, resume or start afresh, rotate at a turn
boundary, nudge or drop a stalled model, give up); this carries its decisions out on real
`GeminiLink`s. Caller input meanwhile waits in order (`to_gemini`), and what the old session
took after its last resumable snapshot is replayed to the new one, so no word is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from livecall.agent.gemini import GeminiClosed, GeminiConnectError, GeminiLink
from livecall.call.audio_queue import ByteBoundedQueue
from livecall.call.supervisor import (
    Apologize,
    CompleteSeed,
    DropStalled,
    GiveUp,
    Live,
    Nudge,
    Replay,
    Reprompt,
    Rotate,
    SessionAction,
    Wait,
)

if TYPE_CHECKING:
    from livecall.call.agent_output import AgentOutput
    from livecall.call.core import CallCore

__all__ = ["GREETING_PROMPT", "PCM16K_BYTES_PER_S", "STALL_NUDGE", "GeminiSessions"]

STALL_NUDGE = "(The caller is waiting for your answer. Please respond now.)"
GREETING_PROMPT = "The phone call has just been answered. Greet the caller now, saying: "
PCM16K_BYTES_PER_S = 32000


class GeminiSessions:
    """The current `link`, and everything that replaces it: the supervisor's hands."""

    def __init__(self, bridge: CallCore, output: AgentOutput) -> None:
        self.bridge = bridge
        self.output = output
        # the call's shared parts, bound once
        self.options = options = bridge.options
        self.supervisor = bridge.supervisor
        self.turns = bridge.turns
        self.playout = output.playout
        self.transcript = bridge.transcript
        self.log = bridge.log
        self.now_ms = bridge.now_ms
        self._event = bridge.event
        self._flush_turns = bridge.flush_turns
        self._ended = bridge.ended

        self.link_factory = bridge.link_factory
        self.link = bridge.link_factory(None)
        self.ready = asyncio.Event()  # the session is usable: caller input goes straight to it
        self._pending_input: ByteBoundedQueue[tuple[str, Any]] = ByteBoundedQueue(
            int(options.caller_buffer_s * PCM16K_BYTES_PER_S), lambda item: len(item[1])
        )
        self.frames_dropped = 0
        self.reconnects = 0
        self.rotations = 0
        self._session_lock = asyncio.Lock()
        self.since_snapshot: ByteBoundedQueue[bytes] = ByteBoundedQueue(
            int(options.replay_limit_s * PCM16K_BYTES_PER_S), len
        )
        self.greeting_due = bool(options.greeting)  # until an agent turn is complete
        self.stalled_link: GeminiLink | None = None

    # ------------------------------------------------------------------ caller input

    async def to_gemini(self, kind: str, payload: Any) -> None:
        """Caller input to the session, or to the backlog while none is usable."""
        if not self.ready.is_set():
            before = self._pending_input.dropped
            self._pending_input.append((kind, payload))
            self.frames_dropped += self._pending_input.dropped - before
            return
        try:
            if kind == "audio":
                # kept until the next resumable snapshot, in case this session is lost
                self.since_snapshot.append(payload)
                await self.link.send_audio(payload)
            else:
                await self.link.send_text(payload)
        except GeminiClosed:
            pass  # the agent pump sees the same close and recovers

    # ------------------------------------------------------------------ switching sessions
    async def _flush_pending(self) -> None:
        """Caller input held while no session was usable, in order, to the current session."""
        while self._pending_input:
            kind, payload = self._pending_input.peek()
            if kind == "audio":
                await self.link.send_audio(payload)
                self.since_snapshot.append(payload)
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
        self.output.discarding_turn = False
        self.output.outbound.reset()
        if self.turns.agent_turn_open:  # the old session's answer cannot continue in a new one
            self.turns.turn_complete(self.now_ms())
            self._flush_turns()
        try:
            if replay.seed and self.transcript:
                await link.send_client_turn(self._seed_text(), turn_complete=False)
                self.supervisor.seeded()
            # Audio the old session took after its last resumable snapshot is not in the handle.
            owed = list(self.since_snapshot)
            self.since_snapshot.clear()
            for i, pcm in enumerate(owed):
                try:
                    await link.send_audio(pcm)
                except GeminiClosed:
                    self.since_snapshot.extend(owed[i:])  # still owed to the next session
                    raise
                self.since_snapshot.append(pcm)
            await self._flush_pending()
            if self.greeting_due:  # never heard yet: the greeting cue again, in this session
                await link.send_client_turn(GREETING_PROMPT + (self.options.greeting or ""))
            return await self._go_live()
        finally:
            if old is not link:
                await old.close()  # caller audio meanwhile goes straight to the new session

    async def _go_live(self) -> Live:
        """Flushes the backlog and marks the session usable in the same step.

        Caller audio reaching `to_gemini` while the session is not ready waits in the backlog;
        nothing flushes it but a switch. So no await may come between the backlog's last flush
        and `ready.set()`: audio queued in that gap would wait for the next session and
        reach it out of order (a hole in what this session heard).
        """
        await self._flush_pending()  # loops until empty, including audio queued while it sent
        self.ready.set()
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

    async def recover(self, why: str, code: int | None, lost: GeminiLink | None = None) -> bool:
        """Replaces the session `lost` (None: the first connect); False when none can be had."""
        if why != "start":  # the first connect is not a lost session
            failing = self.supervisor.lost(time.monotonic())
            if failing is not None:  # sessions that open and die at once, again and again
                self.log.error("gemini.failing_repeatedly", why=failing.why)
                return False
        async with self._session_lock:
            if lost is not None and self.link is not lost and self.ready.is_set():
                return True  # a rotation or another recovery already replaced it
            self.ready.clear()
            first = self.supervisor.begin(why, code, self.now_ms())
            return await self._connect_with_recovery(first, why)

    async def _rotate(self) -> None:
        """Moves the call to a fresh session before the current one is closed (goAway)."""
        async with self._session_lock:
            if self.supervisor.rotation_deadline_ms is None or self._ended.is_set():
                return
            self.ready.clear()
            first = self.supervisor.begin("go_away", None, self.now_ms())
            old = self.link
            if not self.options.rotation_overlap or old.counter.full:
                await old.close()  # the quota has no room for two sessions at once
            rotated = await self._connect_with_recovery(first, "go_away")
            if rotated:
                self.rotations += 1
        if not rotated:  # the apology (or the failure transfer), outside the session lock
            await self.bridge.give_up("gemini_failed")

    async def nudge(self) -> None:
        """Asks the model to answer the caller's last words (the stall nudge)."""
        with contextlib.suppress(GeminiClosed):
            await self.link.send_text(STALL_NUDGE)

    async def turn_failed(self, action: Reprompt | Apologize) -> None:
        """A turn ended unanswered for a failure reason: re-prompt the model at once, or (the
        second in a row) play the recovery line, after which it is the caller's turn. Only
        the reason's name is logged and recorded, never what was said."""
        if isinstance(action, Reprompt):
            self.log.warning("gemini.turn_failed", reason=action.reason, action="reprompt")
            self._event("turn_failed", reason=action.reason, action="reprompt")
            await self.nudge()
            return
        self.log.warning("gemini.turn_failed", reason=action.reason, action="recovery_line")
        self._event("turn_failed", reason=action.reason, action="recovery_line")
        line = self.options.recovery_ulaw
        if line and not self.bridge.giving_up:
            await self.output.play_ulaw(line)  # at once; the agent pump goes on meanwhile

    async def supervise(self) -> None:
        """Every 100 ms: the supervisor's rotation at a turn boundary, the seed's release, and
        its stall watchdog, carried out."""
        sup = self.supervisor
        while True:
            await asyncio.sleep(0.1)
            if not self.ready.is_set():
                continue
            now = self.now_ms()
            due = sup.tick(
                now,
                last_voice_ms=self.turns.last_voice_ms,
                agent_turn_open=self.turns.agent_turn_open,
                playout_busy_until_ms=self.playout.busy_until_ms(),
                tools_running=self.bridge.tools_running(),
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
                await self.nudge()
            elif isinstance(stall, DropStalled):
                self.log.warning("gemini.stalled", action="reconnect")
                self._event("error", where="gemini", error="model silent: reconnecting")
                self.stalled_link = self.link
                await self.link.close()
