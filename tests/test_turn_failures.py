"""Turns the model ends without answering: the caller is never left in silence.

Through the real server, the real SDK against the simulated Gemini Live, and a simulated
Twilio caller: a turn ended with a failure `turnCompleteReason` and no audio is re-prompted at
once (not after the stall watchdog's 10 s); a second one in a row gets the recovery line and
the call goes on; NEED_MORE_INPUT / `waitingForInput` is no failure and waits for the watchdog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from livecall.assets import recovery_ulaw
from livecall.audio.g711 import ulaw_decode
from livecall.call.gemini_sessions import STALL_NUDGE
from livecall.sim.clips import CALLER_CLIPS
from livecall.sim.gemini import Scenario, SessionRecord, TurnEndFault
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import HangUp, Pause, WaitForAgentSilence
from support import assert_clean, say

pytestmark = pytest.mark.timeout(90)

# the nudge asks the model to answer the caller's last words: the fake answers the question
REPROMPT_ANSWER = {"waiting for your answer": "hours_reply"}
ANSWER_WITHIN_S = 2.0


def _overrides(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "database_url": f"sqlite+aiosqlite:///{tmp_path}/calls.db",
        "recordings_dir": tmp_path / "rec",
        "spool_dir": tmp_path / "spool",
        "vad_silence_duration_ms": 300,
        **extra,
    }


def _ask(name: str = "hours") -> list[Any]:
    return [say(name), WaitForAgentSilence(silence_ms=800, timeout=25)]


def _first_heard_after(stretches: list[tuple[float, float]], t: float) -> float | None:
    """When the caller first heard agent audio at or after `t` (monotonic seconds)."""
    return next((start for start, _ in stretches if start >= t), None)


def _failed_end(session: SessionRecord, number: int) -> float:
    turn = session.turns[number - 1]
    assert turn.reply_clip is None and turn.audio_bytes_sent == 0 and turn.ended_at is not None
    return turn.ended_at


async def _turn_failures(stack: LocalStack, call_sid: str) -> list[dict[str, Any]]:
    call = await stack.app.state.livecall.store.repo.get_call(call_sid)
    assert call is not None, "no call record"
    assert call.status == "completed", (call.status, call.end_reason)
    assert not [e for e in call.events if e.kind == "error" and e.data.get("where") == "gemini"]
    return [e.data for e in call.events if e.kind == "turn_failed"]


async def test_a_malformed_function_call_is_answered_at_once(
    tmp_path: Path, call_over: Any, audio: Any
) -> None:
    scenario = Scenario(
        seed=11, text_replies=REPROMPT_ANSWER, turn_ends=[TurnEndFault(reply=1)]
    )  # the default stall watchdog (10 s) would answer far too late to pass
    async with LocalStack(scenario=scenario, settings_overrides=_overrides(tmp_path)) as stack:
        script = [Pause(300), *_ask("hours"), HangUp()]
        result = await stack.caller(script, seed=11).run()
        await call_over(stack)
        assert_clean(result)
        (session,) = stack.gemini.sessions
        failed_at = _failed_end(session, 1)
        assert session.texts == [STALL_NUDGE]  # re-prompted once, at once
        heard_at = _first_heard_after(result.agent_stretches, failed_at)
        assert heard_at is not None and heard_at - failed_at < ANSWER_WITHIN_S, (
            failed_at,
            result.agent_stretches,
        )
        assert audio.heard_share(result.heard_pcm(), "hours_reply") > 0.9
        assert await _turn_failures(stack, result.call_sid) == [
            {"reason": "MALFORMED_FUNCTION_CALL", "action": "reprompt"}
        ]


async def test_a_second_failure_gets_the_recovery_line_and_the_call_goes_on(
    tmp_path: Path, call_over: Any, audio: Any
) -> None:
    scenario = Scenario(
        seed=12,
        text_replies=REPROMPT_ANSWER,
        replies={"hours": "hours_reply", "time": "time_reply"},
        turn_ends=[TurnEndFault(reply=1), TurnEndFault(reply=2, reason="RESPONSE_REJECTED")],
    )
    async with LocalStack(scenario=scenario, settings_overrides=_overrides(tmp_path)) as stack:
        script = [Pause(300), *_ask("hours"), Pause(300), *_ask("time"), HangUp()]
        result = await stack.caller(script, seed=12).run()
        await call_over(stack)
        assert_clean(result)
        (session,) = stack.gemini.sessions
        second_at = _failed_end(session, 2)
        assert session.texts == [STALL_NUDGE]  # one re-prompt, not a second
        # the recovery line, all of it, within ~2 s of the second failure
        heard_at = _first_heard_after(result.agent_stretches, second_at)
        assert heard_at is not None and heard_at - second_at < ANSWER_WITHIN_S
        line = ulaw_decode(recovery_ulaw())
        heard = result.heard_pcm()
        score, at = audio.match(heard, line)
        assert score > 0.95, score
        # the call went on: the caller's next question was answered after the line
        assert audio.heard_share(heard[at + len(line) :], "time_reply") > 0.9
        assert [(t.caller_clip, t.reply_clip, t.completed) for t in session.turns][-1] == (
            "time",
            "time_reply",
            True,
        )
        assert await _turn_failures(stack, result.call_sid) == [
            {"reason": "MALFORMED_FUNCTION_CALL", "action": "reprompt"},
            {"reason": "RESPONSE_REJECTED", "action": "recovery_line"},
        ]


async def test_need_more_input_waits_for_the_watchdog(tmp_path: Path, call_over: Any) -> None:
    stall_s = 3.0
    scenario = Scenario(
        seed=13,
        text_replies=REPROMPT_ANSWER,
        turn_ends=[TurnEndFault(reply=1, reason="NEED_MORE_INPUT", waiting_for_input=True)],
    )
    overrides = _overrides(tmp_path, gemini_stall_timeout_s=stall_s)
    async with LocalStack(scenario=scenario, settings_overrides=overrides) as stack:
        script = [Pause(300), *_ask("hours"), HangUp()]
        result = await stack.caller(script, seed=13).run()
        await call_over(stack)
        assert_clean(result)
        (session,) = stack.gemini.sessions
        waited_at = _failed_end(session, 1)
        # no nudge until the watchdog's time since the caller's last words, then the nudge
        assert session.texts == [STALL_NUDGE]
        (spoke_end,) = [e.t for e in session.events if e.kind == "speech_end"]
        (nudged,) = [e.t for e in session.events if e.kind == "text"]
        assert nudged - spoke_end >= stall_s - 0.5, (spoke_end, waited_at, nudged)
        assert nudged > waited_at + 1.0
        call = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
        assert call is not None
        assert not [e for e in call.events if e.kind == "turn_failed"]
        nudges = [e.data.get("error") for e in call.events if e.kind == "error"]
        assert nudges == ["model silent: nudged"], nudges


async def test_interim_caller_words_reach_the_live_page_not_the_record(
    tmp_path: Path, call_over: Any
) -> None:
    scenario = Scenario(seed=14, interim_transcripts=True, replies={"hours": "hours_reply"})
    async with LocalStack(scenario=scenario, settings_overrides=_overrides(tmp_path)) as stack:
        state = stack.app.state.livecall
        queue = state.feed.subscribe()
        result = await stack.caller([Pause(300), *_ask("hours"), HangUp()], seed=14).run()
        await call_over(stack)
        assert_clean(result)
        (session,) = stack.gemini.sessions
        assert session.events_of("speech_end")  # the fake sent its guesses, then the words
        words = CALLER_CLIPS["hours"].text
        partials: list[str] = []
        while not queue.empty():
            message = queue.get_nowait()
            if message["type"] == "partial" and message["turn"]["speaker"] == "caller":
                partials.append(message["turn"]["text"])
        # the fake's guesses (lower case, unpunctuated) were shown as they came, then replaced
        # by the words themselves
        guesses = [p for p in partials if p.islower()]
        assert guesses and guesses[-1] == "what time do you open on sundays", partials
        assert partials[-1] == words, partials
        call = await state.store.repo.get_call(result.call_sid)
        assert call is not None
        assert [(t.speaker, t.text) for t in call.turns if t.speaker == "caller"] == [
            ("caller", words)
        ]
