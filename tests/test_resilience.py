"""Calls that never drop: goAway rotation, 1011 recovery, refused handles, stalls, give-up.

Everything runs through the real server, the real SDK against the simulated Gemini Live, and
a simulated Twilio caller; faults are scripted in the fake's `Scenario`.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livecall.assets import apology_ulaw
from livecall.audio.g711 import ulaw_decode
from livecall.audio.transcode import InboundTranscoder
from livecall.call.bridge import STALL_NUDGE
from livecall.call.options import CallOptions
from livecall.sim.clips import load_clip
from livecall.sim.gemini import CloseFault, GoAwayFault, Scenario, SessionRecord, StallFault
from livecall.sim.stack import TEST_AUTH_TOKEN, LocalStack
from livecall.sim.twilio import HangUp, Pause, Say, SimulatedCaller, WaitForAgentSilence

pytestmark = pytest.mark.timeout(90)
CallOver = Callable[..., Awaitable[None]]


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


# μ-law codes of ±0 and ±8 (-72 dBFS): a line's noise floor, far below any VAD or voice peak
_LINE_NOISE_CODES = np.array([0xFF, 0x7F, 0xFE, 0x7E], dtype=np.uint8)


class RecordingCaller(SimulatedCaller):
    """A simulated caller that keeps every μ-law byte it sent, in order.

    Its pauses carry a faint seeded line noise instead of digital silence, as a real line
    does: every stretch of its audio is then unique, so where a session's input lies in it is
    never ambiguous (a session that heard only digital silence could sit anywhere in a pause,
    and the check below would have to guess).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent_ulaw = bytearray()
        self._noise = np.random.default_rng(kwargs.get("seed"))

    async def _script_step(self, now: float) -> tuple[bytes, int, Any] | None:
        step = await super()._script_step(now)
        if step is None:
            return None
        frame, flags, utt = step
        if not frame.strip(b"\xff"):  # a silent frame: the line's noise floor instead
            frame = self._noise.choice(_LINE_NOISE_CODES, size=len(frame)).tobytes()
        self.sent_ulaw += frame
        return frame, flags, utt


def _first_unreached(sent: bytes, sessions: list[SessionRecord]) -> str | None:
    """Where the caller's audio first failed to reach a Gemini session (None: all of it did).

    `sent` decoded by livecall's own inbound transcoder (its output does not depend on how the
    input is chunked) is the audio the sessions must have received between them, in order:
    each session's input is one unbroken stretch of it starting at or before where the previous
    session's ended (a replay repeats what the old session already had), and the last one
    reaches the end.
    """
    stream = InboundTranscoder().decode(sent)
    start = end = 0
    for session in sessions:
        got = bytes(session.received_audio)
        if not got:
            continue
        at = stream.rfind(got, start, end + len(got))
        if at < 0:
            return f"session {session.index}: audio missing at or after {end / 32000:.2f} s"
        start, end = at, at + len(got)
    if end < len(stream):
        return f"the last {(len(stream) - end) / 32000:.3f} s never reached Gemini"
    return None


async def test_go_away_rotates_sessions_without_losing_caller_audio(
    tmp_path: Path, call_over: CallOver
) -> None:
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
        caller = RecordingCaller(stack.base_url, auth_token=TEST_AUTH_TOKEN, script=script, seed=1)
        result = await caller.run()
        await call_over(stack)
        sessions = stack.gemini.sessions
        assert len(sessions) >= 3, [s.close_code for s in sessions]
        assert all(s.resumed for s in sessions[1:])
        assert all(s.close_code == 1000 and s.closed_by == "client" for s in sessions)
        # Every caller frame reached Gemini: not one 20 ms frame missing, at any rotation.
        assert len(caller.sent_ulaw) == result.frames_sent * 160
        missing = _first_unreached(bytes(caller.sent_ulaw), sessions)
        assert missing is None, missing
        call = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
        assert call is not None
        assert (call.frames_in, call.frames_missing) == (result.frames_sent, 0)
        assert len(result.response_latencies_ms) == 3  # every utterance was answered
        assert not result.protocol_errors


async def test_1011_mid_reply_is_recovered_and_the_call_goes_on(
    tmp_path: Path, call_over: CallOver, audio: Any
) -> None:
    scenario = _scenario(seed=2, closes=[CloseFault(code=1011, during_reply=1, after_audio=0.6)])
    async with LocalStack(scenario=scenario, settings_overrides=_overrides(tmp_path)) as stack:
        script = [Pause(300), *_utterance("book"), Pause(800), *_utterance("time"), HangUp()]
        result = await stack.caller(script, seed=2).run()
        await call_over(stack)
        sessions = stack.gemini.sessions
        assert sessions[0].close_code == 1011
        assert len(sessions) == 2 and sessions[1].resumed
        assert result.ended_by == "caller"
        # the second utterance was answered by the resumed session, and the caller heard it
        assert any(
            t.caller_clip == "time" and t.reply_clip == "goodbye" and t.completed
            for t in sessions[1].turns
        )
        assert len(result.response_latencies_ms) == 2, result.timeline
        assert audio.heard_share(result.heard_pcm(), "goodbye") > 0.9
        # the record tells the same story: one session lost to a 1011, resumed, call completed
        call = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
        assert call is not None, "no call record"
        assert (call.status, call.end_reason) == ("completed", "caller_stop")
        assert call.gemini_sessions == 2
        kinds = [(e.kind, e.data.get("code")) for e in call.events]
        assert ("reconnect", 1011) in kinds, kinds
        resumed = [e.data for e in call.events if e.kind == "session_resumed"]
        assert [(d["reason"], d["code"]) for d in resumed] == [("session_lost", 1011)]
        agent_turns = [t for t in call.turns if t.speaker == "agent"]
        assert len(agent_turns) >= 3, [(t.speaker, t.text) for t in call.turns]  # greeting + 2


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


async def test_stalled_model_is_nudged_then_recovered(
    tmp_path: Path, call_over: CallOver, audio: Any
) -> None:
    scenario = _scenario(seed=4, stalls=[StallFault(reply=1)])
    overrides = _overrides(tmp_path, gemini_stall_timeout_s=1.5)
    async with LocalStack(scenario=scenario, settings_overrides=overrides) as stack:
        script = [Pause(300), *_utterance("book"), HangUp()]
        caller = stack.caller(script, seed=4)
        result = await caller.run()
        await call_over(stack)
        first, *rest = stack.gemini.sessions
        # the hung session got the nudge, stayed silent, and livecall closed it
        assert first.stalled and first.texts == [STALL_NUDGE]
        assert first.closed_by == "client" and not any(t.completed for t in first.turns)
        # a second session (resumed from the first's handle) answered the caller
        assert len(rest) == 1, [(s.resumed, s.close_code) for s in rest]
        second = rest[0]
        assert second.resumed and not second.stalled
        assert [(t.caller_clip, t.reply_clip, t.completed) for t in second.turns] == [
            ("book", "one_moment", True)
        ]
        assert len(result.response_latencies_ms) == 1
        assert audio.heard_share(result.heard_pcm(), "one_moment") > 0.9
        # and the record says so, in this order: nudge, reconnect, resumed session
        call = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
        assert call is not None, "no call record"
        assert (call.status, call.gemini_sessions) == ("completed", 2)
        story = [
            e.data.get("error") or e.data.get("reason")
            for e in call.events
            if e.kind in ("error", "reconnect", "session_resumed")
        ]
        assert story == [
            "model silent: nudged",
            "model silent: reconnecting",
            "stalled",
            "stalled",
        ], story


async def test_when_gemini_cannot_be_had_the_caller_hears_an_apology(
    tmp_path: Path, call_over: CallOver, audio: Any
) -> None:
    scenario = _scenario(seed=5, closes=[CloseFault(code=1011, at=0.3, max_fires=None)])
    async with LocalStack(scenario=scenario, settings_overrides=_overrides(tmp_path)) as stack:
        script = [Pause(300), *_utterance("book"), Pause(20000)]
        result = await stack.caller(script, seed=5, timeout=60).run()
        await call_over(stack)
        assert result.ended_by == "server"
        heard = result.heard_pcm()
        # what the caller heard is livecall's recorded apology, all of it, before the hang-up
        apology = ulaw_decode(apology_ulaw()).astype(np.float64)
        score, at = audio.match(heard, apology)
        assert score > 0.95, score
        assert at + len(apology) <= len(heard)
        assert audio.loud_ms(heard[at + len(apology) :]) == 0.0  # nothing after it
        call = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
        assert call is not None, "no call record"
        assert (call.status, call.end_reason) == ("failed", "gemini_failed")
        assert stack.registry.active == {}


async def test_unreachable_gemini_is_retried_with_jittered_backoff_then_apologized_for(
    tmp_path: Path, call_over: CallOver, audio: Any
) -> None:
    with socket.socket() as s:  # a port nothing listens on: every connect is refused
        s.bind(("127.0.0.1", 0))
        dead = f"https://127.0.0.1:{s.getsockname()[1]}"
    overrides = _overrides(tmp_path, gemini_base_url=dead)
    async with LocalStack(scenario=_scenario(seed=6), settings_overrides=overrides) as stack:
        script = [Pause(300), *_utterance("book"), Pause(20000)]
        result = await stack.caller(script, seed=6, timeout=60).run()
        await call_over(stack)
        call = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
    assert result.ended_by == "server"
    assert call is not None and (call.status, call.end_reason) == ("failed", "gemini_failed")
    attempts = [e.at_ms for e in call.events if e.data.get("where") == "gemini_connect"]
    options = CallOptions()  # the backoff's defaults; the attempts come from the settings
    assert len(attempts) == stack.settings.gemini_reconnect_attempts
    # between attempts, the bridge waited the base delay (doubling) times a factor in [0.5, 1.5)
    base = options.backoff_initial_s * 1000.0
    for gap in (b - a for a, b in itertools.pairwise(attempts)):
        assert 0.5 * base - 5 <= gap <= 1.5 * base + 250, (attempts, base)  # + a refused connect
        base = min(base * 2, options.backoff_max_s * 1000.0)
    heard = result.heard_pcm()
    apology = ulaw_decode(apology_ulaw()).astype(np.float64)
    assert audio.match(heard, apology)[0] > 0.95
