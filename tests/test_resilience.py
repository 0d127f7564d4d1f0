"""Calls that never drop: goAway rotation, 1011 recovery, refused handles, stalls, give-up.

Everything runs through the real server, the real SDK against the simulated Gemini Live, and
a simulated Twilio caller; faults are scripted in the fake's `Scenario`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from livecall.sim.clips import load_clip
from livecall.sim.gemini import CloseFault, GoAwayFault, Scenario, StallFault
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import HangUp, Pause, Say, WaitForAgentSilence

pytestmark = pytest.mark.timeout(90)


# Short answers keep each simulated call to a few seconds of real-time playout.
SHORT_REPLIES = {
    "book": "one_moment",
    "time": "goodbye",
    "hours": "hours_reply",
    "yes": "goodbye",
    "UNKNOWN": "sorry",
}


def _scenario(**kw: Any) -> Scenario:
    return Scenario(replies=SHORT_REPLIES, **kw)


def _overrides(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path}/calls.db",
        "recordings_dir": tmp_path / "rec",
        "spool_dir": tmp_path / "spool",
        "vad_silence_duration_ms": 300,
    }
    values.update(extra)
    return values


def _utterance(name: str) -> list[Any]:
    pcm, rate = load_clip(name)
    return [Say(pcm, rate=rate, label=name), WaitForAgentSilence(silence_ms=800, timeout=25)]


def _frames_received(stack: LocalStack) -> int:
    assert stack.gemini is not None
    return sum(s.audio_bytes_received for s in stack.gemini.sessions) // 640


async def test_go_away_rotates_sessions_without_losing_caller_audio(tmp_path: Path) -> None:
    scenario = _scenario(seed=1, go_aways=[GoAwayFault(after=2.5, time_left=3.0)])
    async with LocalStack(scenario=scenario, settings_overrides=_overrides(tmp_path)) as stack:
        script = [
            Pause(300),
            *_utterance("book"),
            Pause(1500),
            *_utterance("time"),
            Pause(2500),
            *_utterance("hours"),
            HangUp(),
        ]
        result = await stack.caller(script, seed=1).run()
        sessions = stack.gemini.sessions
        assert len(sessions) >= 3, [s.close_code for s in sessions]
        assert any(s.resumed for s in sessions[1:])
        # Every caller frame reached Gemini (replayed frames may arrive twice, never zero times).
        assert _frames_received(stack) >= result.frames_sent - 5
        assert len(result.response_latencies_ms) == 3  # every utterance was answered
        assert not result.protocol_errors


async def test_1011_mid_reply_is_recovered_and_the_call_goes_on(tmp_path: Path) -> None:
    scenario = _scenario(seed=2, closes=[CloseFault(code=1011, during_reply=1, after_audio=0.6)])
    async with LocalStack(scenario=scenario, settings_overrides=_overrides(tmp_path)) as stack:
        script = [Pause(300), *_utterance("book"), Pause(800), *_utterance("time"), HangUp()]
        result = await stack.caller(script, seed=2).run()
        sessions = stack.gemini.sessions
        assert sessions[0].close_code == 1011
        assert len(sessions) >= 2 and sessions[1].resumed
        assert result.ended_by == "caller"
        # the second utterance was answered by the resumed session
        assert any(t.caller_clip == "time" for s in sessions[1:] for t in s.turns)
        call = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
        assert call is None or call.status != "failed"


async def test_refused_handle_starts_a_fresh_session_seeded_with_the_transcript(
    tmp_path: Path,
) -> None:
    scenario = _scenario(
        seed=3,
        refuse_resume=True,
        closes=[CloseFault(code=1011, at=None, during_reply=2, after_audio=0.4)],
    )
    async with LocalStack(scenario=scenario, settings_overrides=_overrides(tmp_path)) as stack:
        script = [
            Pause(300),
            *_utterance("book"),
            Pause(500),
            *_utterance("hours"),
            Pause(800),
            *_utterance("time"),
            HangUp(),
        ]
        result = await stack.caller(script, seed=3).run()
        sessions = stack.gemini.sessions
        fresh = [s for s in sessions[1:] if s.setup_completed and not s.resumed]
        assert fresh, [(s.resumed, s.close_code) for s in sessions]
        seeded = fresh[0].client_contents
        assert seeded and "table for four" in str(seeded).lower()
        assert result.ended_by == "caller"


async def test_stalled_model_is_nudged_then_recovered(tmp_path: Path) -> None:
    scenario = _scenario(seed=4, stalls=[StallFault(reply=1)])
    overrides = _overrides(tmp_path, gemini_stall_timeout_s=1.5)
    async with LocalStack(scenario=scenario, settings_overrides=overrides) as stack:
        script = [Pause(300), *_utterance("book"), HangUp()]
        caller = stack.caller(script, seed=4)
        result = await caller.run()
        texts = [t for s in stack.gemini.sessions for t in s.texts]
        assert any("waiting" in t for t in texts)  # the nudge
        assert len(result.response_latencies_ms) == 1  # and the caller got an answer


async def test_when_gemini_cannot_be_had_the_caller_hears_an_apology(tmp_path: Path) -> None:
    scenario = _scenario(seed=5, closes=[CloseFault(code=1011, at=0.3, max_fires=None)])
    async with LocalStack(scenario=scenario, settings_overrides=_overrides(tmp_path)) as stack:
        script = [Pause(300), *_utterance("book"), Pause(20000)]
        result = await stack.caller(script, seed=5, timeout=60).run()
        assert result.ended_by == "server"
        assert result.heard_ms > 3000  # the recorded apology, played to the end
        assert stack.registry.active == {}
