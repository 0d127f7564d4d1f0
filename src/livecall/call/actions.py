"""What the agent's call-control tools do to a live call: hang up, transfer, press keys.

`BridgeActions` is the `CallActions` of one `CallBridge`, with the carrier's `CallControl`
(`telephony/call_control.py`) for what only its REST API can do (hang up for good, move the call to
a `<Dial>`). Every action first
lets the caller hear what the agent already said (mark echoes), because a goodbye cut
mid-word, or a transfer line the caller never heard, is worse than a second of waiting.
It also carries the answering-machine outcome of an outbound call (`answered_by`): leave
the profile's voicemail message after the beep, then hang up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal

import structlog

from livecall.agent.gemini import GeminiClosed
from livecall.agent.live_protocol import FunctionCall
from livecall.assets import goodbye_ulaw, handoff_ulaw
from livecall.audio.dtmf import generate_dtmf
from livecall.audio.g711 import ulaw_encode
from livecall.call.bridge import GREETING_PROMPT, SPOKE_BEFORE_TOOL
from livecall.records import CallEventRecord
from livecall.telephony.call_control import CallControlError, DtmfControl
from livecall.telephony.whisper import TransferPlan

if TYPE_CHECKING:
    from livecall.agent.profiles import AgentProfile
    from livecall.agent.tools import ToolRunner
    from livecall.call.bridge import CallBridge
    from livecall.telephony.call_control import CallControl
    from livecall.telephony.whisper import WarmTransfer

__all__ = [
    "CALL_CONTROL_TOOLS",
    "GREETING_PROMPT",
    "MACHINE_VERDICTS",
    "BridgeActions",
    "tool_handler",
    "voicemail_prompt",
]

log = structlog.get_logger("livecall.actions")

# Twilio's AnsweredBy values that mean "not a person" (DetectMessageEnd sends the *_end_* ones
# once the greeting is over and the beep has sounded; machine_start only without it).
MACHINE_VERDICTS = frozenset(
    {"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "fax"}
)
DTMF_CHUNK_BYTES = 800  # 100 ms of μ-law per media message: small frames, few marks
# Tools that wait for the caller to hear something: bounded by their own waits, not the
# lookup/webhook timeout.
CALL_CONTROL_TOOLS = frozenset({"end_call", "transfer_call", "send_dtmf"})
CALL_CONTROL_TIMEOUT_S = 60.0
# `end_call`/`transfer_call` before any word: how long the model gets to begin its goodbye or
# handoff line after the answer, and to finish it, before a recorded line plays instead.
LINE_START_S = 3.0
LINE_TOTAL_S = 6.0


def tool_handler(
    runner: ToolRunner, timeout_s: float
) -> Callable[[FunctionCall], Awaitable[dict[str, Any]]]:
    """The bridge's `tool_handler`: one function call through `runner`, bounded in time.

    The bridge runs each call as its own task (audio never waits), cancels it on
    `toolCallCancellation` and sends whatever dict comes back as the `toolResponse`.
    """

    async def handle(call: FunctionCall) -> dict[str, Any]:
        limit = CALL_CONTROL_TIMEOUT_S if call.name in CALL_CONTROL_TOOLS else timeout_s
        return await runner.run(call.name, call.args, limit)

    return handle


def voicemail_prompt(message: str) -> str:
    """The turn that makes the model read the voicemail message, and nothing else."""
    return (
        "(This call was answered by an answering machine and the beep has sounded: you are "
        "now recording a voicemail. Say exactly the following message, once, then stop "
        "talking; the call will be hung up for you.)\n" + message
    )


class BridgeActions:
    """Call control for one call: the agent's `end_call`, `transfer` and `send_dtmf`.

    `control` is the carrier's REST call control, None when none is configured: hanging up
    then only closes the stream (which ends a `<Connect><Stream>` call with nothing after it),
    and transfers are refused with an error the model can explain to the caller (as they are
    on a line whose control says `transfer_refusal`).
    """

    def __init__(
        self,
        bridge: CallBridge,
        control: CallControl | None,
        profile: AgentProfile,
        *,
        goodbye_timeout_s: float = 15.0,
        settle_s: float = 0.5,
        deferred_greeting: str | None = None,
    ) -> None:
        self.bridge = bridge
        self.control = control
        self.profile = profile
        self.goodbye_timeout_s = goodbye_timeout_s
        self.settle_s = settle_s
        # outbound calls with answering-machine detection greet only once a person answered
        self.deferred_greeting = deferred_greeting
        self.answered_by: str | None = None
        self._ending = False
        self._background: set[asyncio.Task[Any]] = set()
        self.log = log.bind(call_sid=bridge.call_sid)

    # ------------------------------------------------------------------ helpers
    def _record(self, kind: str, **data: Any) -> None:
        bridge = self.bridge
        with contextlib.suppress(Exception):  # records must never break the call
            bridge.observer.event(
                CallEventRecord(bridge.call_sid, round(bridge.now_ms()), kind, data)
            )

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `coro` outside the tool task: the bridge cancels tool tasks when the call ends,
        and a REST hang-up or a voicemail must outlive that."""
        task = asyncio.create_task(coro, name=f"{name}:{self.bridge.call_sid}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _let_agent_finish(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until what the agent is saying has been played to the caller.

        The model may still be in its turn when it calls a tool (a blocking call leaves the
        turn open until the answer comes), so the turn's end is only waited for briefly:
        once everything sent was heard and no more audio came for `settle_s`, it is done.
        """
        bridge = self.bridge
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await bridge.wait_heard(remaining):
                return False
            if await bridge.wait_agent_done(min(self.settle_s, remaining)):
                return True
            if not bridge.playout.has_pending() and not bridge.supervisor.in_progress:
                return True  # the model is quiet and waits on us: all it said was heard

    async def _rest_hangup(self) -> None:
        if self.control is None:
            return
        try:
            await self.control.hangup(self.bridge.call_sid)
        except CallControlError as exc:
            self.log.warning("call.hangup_failed", error=str(exc))

    def _hang_up(self, reason: str) -> None:
        """End the stream now and the phone call with it (REST, when configured)."""
        self.bridge.end(reason)
        if self.control is not None:
            self.spawn(self._rest_hangup(), "hangup")

    async def _model_line(self, timeout: float, before: int) -> bool:  # noqa: ASYNC109
        """After a call-control answer: the model's own line (an agent turn begun since the
        count was `before`), begun and heard in time?"""
        deadline = time.monotonic() + timeout
        if not await self._wait_new_agent_turn(before, min(LINE_START_S, timeout)):
            return False
        return await self._let_agent_finish(max(0.5, deadline - time.monotonic()))

    async def _recorded_line(self, ulaw: bytes) -> bool:
        """A recorded line of livecall's own, played and heard to the end."""
        return await self.bridge.play_line(ulaw)

    async def _say_goodbye(self, before: int) -> tuple[bool, str]:
        """The goodbye the model did not say before `end_call`: (heard, by whom)."""
        if await self._model_line(LINE_TOTAL_S, before):
            return True, "agent"
        line = self.profile.goodbye_line
        before = self.bridge.turns.agent_turns_started
        asked = bool(line) and await self._send_turn(f"(Say this to the caller now: {line})", 1.0)
        if asked and await self._model_line(LINE_TOTAL_S, before):
            return True, "agent"
        return await self._recorded_line(goodbye_ulaw()), "recorded"

    async def _goodbye_then_hang_up(self, reason: str, spoke: bool, before: int) -> None:
        if spoke:  # the goodbye came first: let it play out
            heard, by = await self._let_agent_finish(self.goodbye_timeout_s), "agent"
        else:
            heard, by = await self._say_goodbye(before)
        self.log.info("call.agent_hangup", reason=reason, goodbye_heard=heard, goodbye_by=by)
        self._record("hangup", by="agent", reason=reason, goodbye_heard=heard, goodbye_by=by)
        self._hang_up("agent_hangup")

    # ------------------------------------------------------------------ CallActions
    async def end_call(self, reason: str) -> dict[str, Any]:
        """Answers at once (the model needs the answer to speak), hangs up once heard.

        When the agent spoke before calling, the goodbye already sent is played out and the
        answer is SILENT. When it called first, the answer lets it speak (WHEN_IDLE); its
        goodbye is waited for (bounded), else asked for or played from a recording.
        """
        spoke = SPOKE_BEFORE_TOOL.get()
        if not self._ending:
            self._ending = True
            before = self.bridge.turns.agent_turns_started  # before the answer goes out
            self.spawn(self._goodbye_then_hang_up(reason, spoke, before), "goodbye")
        if spoke:
            return {"result": "ok", "detail": "the call is ending"}
        return {
            "result": "ok",
            "detail": "say a short goodbye to the caller now; the call ends when you finish",
        }

    # set by the Twilio route when the profile transfers warm (the callee is briefed first)
    warm: WarmTransfer | None = None

    async def transfer(
        self, target_name: str, number: str, summary: str | None = None
    ) -> dict[str, Any]:
        """Moves the caller to `number` once the handoff line was heard (either order).

        Warm (`self.warm`): the person answering first hears `summary`, or a fallback.
        """
        if self.control is None:
            return {
                "error": "transfers are not available on this line (no call control "
                "credentials); offer to take a message instead"
            }
        if self.control.transfer_refusal:
            return {"error": f"{self.control.transfer_refusal}; offer to take a message instead"}
        if not SPOKE_BEFORE_TOOL.get():  # decide, call, then speak: answer so it may speak
            before = self.bridge.turns.agent_turns_started
            handoff = self._handoff_then_transfer(target_name, number, before, summary)
            self.spawn(handoff, "handoff")
            return {
                "result": "transferring",
                "target": target_name,
                "detail": "tell the caller in one short sentence that you are putting them "
                "through now; the transfer follows",
            }
        heard = await self._let_agent_finish(self.goodbye_timeout_s)
        return await self._transfer_now(target_name, number, heard, summary)

    async def _handoff_then_transfer(
        self, target_name: str, number: str, before: int, summary: str | None = None
    ) -> None:
        heard = await self._model_line(LINE_TOTAL_S, before)
        if not heard:
            heard = await self._recorded_line(handoff_ulaw())
        # the REST transfer must outlive the call's end (which it causes): its own task
        done = self.spawn(self._transfer_now(target_name, number, heard, summary), "hangup")
        result = await asyncio.shield(done)
        if "error" in result and self.bridge.end_reason is None:
            await self._send_turn(f"(The transfer did not work: {result['error']}.)", 1.0)

    async def _transfer_now(
        self, target_name: str, number: str, heard: bool, summary: str | None = None
    ) -> dict[str, Any]:
        """The REST transfer, once the caller heard the line (`heard`)."""
        assert self.control is not None
        bridge = self.bridge
        warm = self.warm if self.warm is not None and self.control.briefs(number) else None
        plan = await warm.plan(target_name, summary) if warm is not None else TransferPlan()
        # Twilio ends the stream as soon as it takes the new TwiML; its `stop` may reach the
        # bridge before this coroutine runs again, so the reason is claimed first.
        claimed = bridge.end_reason is None
        if claimed:
            bridge.end_reason = "transferred"
        # the REST request and its record in their own task: the carrier may end the stream
        # (and the bridge cancel this tool task) before its answer arrives
        rest = self.spawn(self._rest_transfer(target_name, number, heard, plan), "hangup")
        outcome = await asyncio.shield(rest)
        if outcome == "ended":
            return {"error": "the call has already ended"}
        if outcome == "failed":
            if claimed and bridge.end_reason == "transferred":
                bridge.end_reason = None
            return {"error": f"the transfer to {target_name} failed; apologise and offer help"}
        bridge.end("transferred")
        return {"result": "transferred", "target": target_name}

    async def _rest_transfer(
        self, target_name: str, number: str, heard: bool, plan: TransferPlan
    ) -> Literal["done", "ended", "failed"]:
        """The carrier's transfer, recorded whatever happens to the tool that asked for it."""
        assert self.control is not None
        try:
            done = await self.control.transfer(
                self.bridge.call_sid,
                number,
                plan.say,
                whisper_url=plan.whisper_url,
                dial_action=plan.dial_action,
            )
        except CallControlError as exc:
            self.log.warning("call.transfer_failed", target=target_name, error=str(exc))
            self._record("transfer", target=target_name, ok=False, error=str(exc))
            return "failed"
        if not done:
            return "ended"
        warm = {"warm": True} if plan.whisper_url else {}
        self.log.info("call.transferred", target=target_name, line_heard=heard, **warm)
        self._record(
            "transfer", target=target_name, number=number, ok=True, line_heard=heard, **warm
        )
        return "done"

    async def send_dtmf(self, digits: str) -> dict[str, Any]:
        on_stream = await self.bridge.send_dtmf(digits)  # the carrier's own message, if any
        if on_stream is not None:
            self._record("dtmf_sent", digits=digits, on_stream=True)
            if not on_stream:
                return {"error": "the call has ended"}
            return {"result": "ok", "pressed": digits}
        if isinstance(self.control, DtmfControl):  # the carrier's REST (Vonage): no tones
            try:
                sent = await self.control.send_dtmf(self.bridge.call_sid, digits)
            except CallControlError as exc:  # keys it cannot send, an outage: tones instead
                self.log.warning("call.dtmf_rest_failed", error=str(exc))
            else:
                self._record("dtmf_sent", digits=digits, over_rest=True)
                if not sent:
                    return {"error": "the call has ended"}
                return {"result": "ok", "pressed": digits}
        ulaw = ulaw_encode(generate_dtmf(digits)).tobytes()
        for i in range(0, len(ulaw), DTMF_CHUNK_BYTES):
            if await self.bridge.play_ulaw(ulaw[i : i + DTMF_CHUNK_BYTES]) is None:
                return {"error": "the call has ended"}
        heard = await self.bridge.wait_heard(len(ulaw) / 8000 + 10.0)
        self._record("dtmf_sent", digits=digits, heard=heard)
        if not heard:
            return {"error": f"the keys {digits} were sent but not confirmed as played"}
        return {"result": "ok", "pressed": digits}

    # ------------------------------------------------------------------ answering machines
    def on_answered_by(self, answered_by: str) -> None:
        """Twilio's AMD verdict for this call: voicemail for a machine, greeting for a person."""
        if self.answered_by is not None:
            return  # one verdict per call
        self.answered_by = answered_by
        self._record("answered_by", answered_by=answered_by)
        self.log.info("call.answered_by", answered_by=answered_by)
        if answered_by in MACHINE_VERDICTS:
            self.spawn(self.leave_voicemail(), "voicemail")
        elif self.deferred_greeting and self.bridge.frames_out == 0:
            self.spawn(self._send_turn(GREETING_PROMPT + self.deferred_greeting), "greeting")

    async def _send_turn(self, text: str, timeout: float = 15.0) -> bool:  # noqa: ASYNC109
        """A text turn to the model, once a session is open (a verdict can beat the setup)."""
        deadline = time.monotonic() + timeout
        while self.bridge.sessions == 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        try:
            await self.bridge.link.send_client_turn(text)
        except GeminiClosed:
            return False
        return True

    async def _wait_new_agent_turn(self, before: int, timeout: float) -> bool:  # noqa: ASYNC109
        """Has an agent turn begun since `turns.agent_turns_started` was `before`?

        Counted, not looked at: a short line can open and close between two looks.
        """
        turns = self.bridge.turns
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if turns.agent_turns_started > before:
                return True
            await asyncio.sleep(0.05)
        return False

    async def leave_voicemail(self) -> None:
        """Have the agent say the profile's voicemail message, let it play out, hang up."""
        message = self.profile.voicemail_message
        if not message:
            self.log.info("call.voicemail_skipped", reason="no voicemail_message in the profile")
            self._record("voicemail", left=False)
            self._hang_up("answering_machine")
            return
        before = self.bridge.turns.agent_turns_started
        spoke = await self._send_turn(voicemail_prompt(message))
        spoke = spoke and await self._wait_new_agent_turn(before, 10.0)
        heard = spoke and await self._let_agent_finish(max(30.0, len(message) / 8))
        self.log.info("call.voicemail", spoke=spoke, heard=heard)
        self._record("voicemail", left=heard)
        self._hang_up("voicemail")

    async def rest_settled(self) -> None:
        """Waits for the REST hang-ups and transfers in flight (the bridge bounds the wait)."""
        rest = [t for t in self._background if t.get_name().startswith("hangup:")]
        if rest:
            await asyncio.wait(rest)

    async def aclose(self) -> None:
        """Wait for a REST hang-up still in flight (a voicemail or greeting is cancelled)."""
        for task in list(self._background):
            if not task.get_name().startswith("hangup:"):
                task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
