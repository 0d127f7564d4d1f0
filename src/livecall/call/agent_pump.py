"""Gemini's side of the call: the current session's events, each to the part that acts on it.

Agent audio and `interrupted` go to the agent output (a barge-in is cleared at the carrier
before anything else), transcripts to the turn tracker and the live page, tool calls to their
tasks, resumption handles, goAway and turn ends to the session supervisor. A lost session is
replaced (`GeminiSessions.recover`); when none can be had the call gives up, never silent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from livecall.agent import live_protocol as lp
from livecall.agent.gemini import GeminiClosed
from livecall.live_feed import live_partial

if TYPE_CHECKING:
    from livecall.call.agent_output import AgentOutput
    from livecall.call.core import CallCore
    from livecall.call.gemini_sessions import GeminiSessions
    from livecall.call.tool_tasks import ToolTasks

__all__ = ["AgentPump"]


class AgentPump:
    """Reads the current Gemini session until the call ends and dispatches its events."""

    def __init__(
        self, bridge: CallCore, output: AgentOutput, gemini: GeminiSessions, tools: ToolTasks
    ) -> None:
        self.bridge = bridge
        self.output = output
        self.gemini = gemini
        self.tools = tools
        # the call's shared parts, bound once
        self.observer = bridge.observer
        self.supervisor = bridge.supervisor
        self.turns = bridge.turns
        self.usage = bridge.usage
        self.log = bridge.log
        self.now_ms = bridge.now_ms
        self._event = bridge.event
        self._flush_turns = bridge.flush_turns
        self._ended = bridge.ended

    async def run(self) -> None:
        """The first session, then its events until the call ends; lost sessions replaced."""
        if not await self.gemini.recover("start", None):
            self.log.error("gemini.unavailable")
            await self.bridge.give_up("gemini_failed")
            return
        while not self._ended.is_set():
            link = self.gemini.link
            try:
                events = await link.receive()
            except (GeminiClosed, lp.LiveProtocolError) as exc:
                if link is not self.gemini.link or self._ended.is_set():
                    continue  # a session we already moved away from
                code = getattr(exc, "code", None)
                stalled = link is self.gemini.stalled_link
                reason = "stalled" if stalled else str(exc)
                self.log.warning("gemini.session_lost", code=code, reason=reason)
                self._event("reconnect", code=code, reason=reason)
                if not await self.gemini.recover(
                    "stalled" if stalled else "session_lost", code, link
                ):
                    await self.bridge.give_up("gemini_failed")
                    return
                continue
            for event in events:
                if link is not self.gemini.link:
                    break
                await self._on_live_event(event)

    async def _on_live_event(self, event: lp.LiveEvent) -> None:
        if isinstance(event, lp.AgentAudio):
            if not self.output.discarding_turn:
                await self.output.agent_audio(event)
        elif isinstance(event, lp.AgentTranscript):
            if not self.output.discarding_turn:
                self.turns.agent_transcript(self.now_ms(), event.text)
                live_partial(self.observer, self.turns)  # words to the live page now
        elif isinstance(event, lp.CallerInterim):  # the live page only, never the record
            self.turns.caller_interim(self.now_ms(), event.text)
            live_partial(self.observer, self.turns)
        elif isinstance(event, lp.WaitingForInput):
            pass  # the model waits for the caller to go on: no failure, the watchdog's time
        elif isinstance(event, lp.CallerTranscript):
            self.turns.caller_transcript(self.now_ms(), event.text)
            live_partial(self.observer, self.turns)
            if not self.turns.agent_turn_open:
                self.supervisor.awaiting_reply(self.now_ms())
        elif isinstance(event, lp.Interrupted):
            await self.output.barge_in()
            self.supervisor.awaiting_reply(self.now_ms())
        elif isinstance(event, lp.GenerationComplete):
            if not self.output.discarding_turn:
                await self.output.send_agent_audio(self.output.outbound.flush(), mark_now=True)
        elif isinstance(event, lp.TurnComplete):
            session = self.supervisor.sessions  # the session may be replaced while this runs
            # an unanswered turn (no audio, nothing discarded after a barge-in) may have failed
            spoke = self.turns.agent_turn_open or self.output.discarding_turn
            failed = self.supervisor.turn_ended(
                self.now_ms(), spoke=spoke, reason=event.reason, in_progress=event.in_progress
            )
            if not self.output.discarding_turn:
                await self.output.send_agent_audio(self.output.outbound.flush(), mark_now=True)
                if self.turns.agent_turn_open:
                    self.supervisor.answered(self.now_ms())
                    self.gemini.greeting_due = False  # the first complete turn is the greeting
            self.output.discarding_turn = False
            self.supervisor.turn_complete(session)
            self._add_usage(event.usage)
            self.turns.turn_complete(self.now_ms())
            self._flush_turns()
            await self.output.notify_heard()
            if failed is not None:
                await self.gemini.turn_failed(failed)
        elif isinstance(event, lp.ToolCall):
            for call in event.calls:
                self.tools.start(call)
        elif isinstance(event, lp.ToolCallCancellation):
            for call_id in event.ids:
                task = self.tools.tasks.pop(call_id, None)
                if task is not None:
                    task.cancel()
                self._event("tool_cancelled", id=call_id)
        elif isinstance(event, lp.ResumptionUpdate):
            # only a handle after a turn of the session's own holds the audio replayed to it
            if event.resumable and event.handle and self.supervisor.resumable(event.handle):
                self.gemini.since_snapshot.clear()  # the snapshot holds everything up to here
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
