"""What a real call leaves behind: the record, its transcript and events, the recording, and
the REST API serving them, checked against what the simulated caller actually heard.

One call through the whole stack (simulated Twilio -> livecall -> real SDK -> fake Gemini),
made once for the module: the caller presses a key, asks something, talks over the agent's
long answer, gets the next answer and hangs up. Each test looks at one thing it left.
"""

from __future__ import annotations

import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio

from livecall.sim.clips import AGENT_CLIPS, CALLER_CLIPS, load_clip
from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import (
    CallResult,
    HangUp,
    Pause,
    PressDigit,
    WaitForAgentAudio,
    WaitForAgentSilence,
)
from livecall.store.models import Call
from support import say

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

TOKEN = "records-e2e-token-7d1c"
RATE = 8000
FRAME = 160
FROM, TO = "+15551230001", "+15559870002"


@dataclass
class Recorded:
    """The finished call, as each end saw it."""

    stack: LocalStack
    result: CallResult
    call: Call
    heard: npt.NDArray[np.int16]  # the caller's ears, 8 kHz from stream start
    clear_s: float  # when the clear reached the caller (s since stream start)
    first_heard_at: int  # sample index in `heard` where the cut answer became audible
    clear_at: int  # sample index in `heard` of the clear

    def s(self, t: float | None) -> float:
        """Loop time `t` in seconds since the caller's stream started."""
        assert t is not None and self.result.stream_started is not None
        return t - self.result.stream_started

    @property
    def heard_of_cut_ms(self) -> float:
        return (self.clear_at - self.first_heard_at) / 8


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def recorded(tmp_path_factory, call_over, audio) -> AsyncIterator[Recorded]:
    home = tmp_path_factory.mktemp("records")
    scenario = Scenario(
        seed=21,
        greeting=None,
        replies={"yes": "book_reply", "hours": "hours_reply"},
        rate=2.0,  # the model runs ahead of playout: transcript words arrive before heard
        first_audio_delay=0.2,
        pause_prob=0.0,  # bursts, but no random hiccups: each answer is heard unbroken
    )
    settings: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{home / 'calls.db'}",
        "recordings_dir": home / "recordings",
        "spool_dir": home / "spool",
        "vad_silence_duration_ms": 300,
        "api_token": TOKEN,
    }
    stack = LocalStack(scenario=scenario, settings_overrides=settings)
    await stack.start()
    try:
        caller = stack.caller(
            [
                Pause(400),
                PressDigit("4"),
                say("yes"),
                WaitForAgentAudio(min_heard_ms=1200, timeout=10),
                say("hours"),  # talks over the long answer
                WaitForAgentSilence(silence_ms=500, timeout=15),
                HangUp(),
            ],
            seed=21,
            from_=FROM,
            to=TO,
        )
        result = await caller.run()
        await call_over(stack)
        assert result.protocol_errors == [] and result.script_errors == []
        assert len(result.clears) == 1 and len(result.utterances) == 2
        call = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
        assert call is not None
        heard = result.heard_pcm()
        clear_at = audio.at(result, result.clears[0])
        first_heard = int(np.flatnonzero(audio.loud_frames(heard[:clear_at]))[0]) * FRAME
        yield Recorded(
            stack, result, call, heard, result.clears[0] - result.stream_started, first_heard,
            clear_at,
        )  # fmt: skip
    finally:
        await stack.stop()


# --------------------------------------------------------------------------- the database


async def test_call_record(recorded: Recorded) -> None:
    call, result = recorded.call, recorded.result
    assert (call.from_number, call.to_number, call.direction) == (FROM, TO, "inbound")
    assert (call.status, call.end_reason) == ("completed", "caller_stop")
    assert call.answered_at is not None and call.ended_at is not None
    assert call.started_at <= call.answered_at <= call.ended_at
    hangup = next(e.t for e in result.timeline if e.kind == "hangup")
    assert call.duration_s == pytest.approx(recorded.s(hangup), abs=1.0)
    assert (call.turn_count, call.interruptions, call.gemini_sessions) == (4, 1, 1)
    assert call.frames_in == result.frames_sent and call.frames_missing == 0
    assert call.frames_out > 0 and call.total_tokens > 0


async def test_transcript_has_both_speakers_and_the_cut_answer_as_heard(
    recorded: Recorded, audio
) -> None:
    turns, result = recorded.call.turns, recorded.result
    assert [(t.idx, t.speaker) for t in turns] == [
        (0, "caller"),
        (1, "agent"),
        (2, "caller"),
        (3, "agent"),
    ]
    assert turns[0].text == CALLER_CLIPS["yes"].text
    assert turns[2].text == CALLER_CLIPS["hours"].text
    cut, answer = turns[1], turns[3]
    assert cut.interrupted and not answer.interrupted
    assert AGENT_CLIPS["book_reply"].text.startswith(cut.text)
    assert cut.heard_text and cut.text.startswith(cut.heard_text)
    assert len(cut.heard_text) < len(cut.text), (cut.heard_text, cut.text)
    # about as many words as the caller had time to hear
    words = len(AGENT_CLIPS["book_reply"].text.split())
    clip_ms = len(audio.phone_ref("book_reply")) / 8
    expected = words * recorded.heard_of_cut_ms / clip_ms
    assert abs(len(cut.heard_text.split()) - expected) <= 3, (cut.heard_text, expected)
    assert (answer.text, answer.heard_text) == (AGENT_CLIPS["hours_reply"].text,) * 2
    # per-turn timings
    for agent in (cut, answer):
        assert agent.first_audio_latency_ms is not None
        assert 0 < agent.first_audio_latency_ms < 5000
    assert cut.barge_in_stop_ms is not None and 0 <= cut.barge_in_stop_ms < 1000
    # on the stream's clock: where the caller actually spoke (± 300 ms)
    yes, hours = result.utterances
    assert turns[0].start_ms / 1000 == pytest.approx(recorded.s(yes.start), abs=0.3)
    assert turns[2].start_ms / 1000 == pytest.approx(recorded.s(hours.start), abs=0.3)


async def test_events_keypad_and_interruption(recorded: Recorded) -> None:
    events, result = recorded.call.events, recorded.result
    assert "session_started" in [e.kind for e in events]
    [dtmf] = [e for e in events if e.kind == "dtmf"]
    assert dtmf.data["digit"] == "•"  # a key was pressed; which one, only LOG_DTMF keeps
    assert dtmf.at_ms / 1000 == pytest.approx(recorded.s(result.digits_sent[0].t), abs=0.3)
    [interrupted] = [e for e in events if e.kind == "interrupted"]
    assert interrupted.at_ms / 1000 == pytest.approx(recorded.clear_s, abs=0.3)
    assert interrupted.data["heard_ms"] == pytest.approx(recorded.heard_of_cut_ms, abs=200)
    assert [e.seq for e in events] == list(range(len(events)))


# --------------------------------------------------------------------------- the recording


def read_stereo(path: Path) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.int16], int, int]:
    """(left, right, sample rate, channels) of a 16-bit WAV."""
    with wave.open(str(path), "rb") as w:
        rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert width == 2
    frames = data.reshape(-1, channels)
    return frames[:, 0], frames[:, -1], rate, channels


def recording_of(recorded: Recorded) -> Path:
    path = recorded.stack.app.state.livecall.recordings.path_for(recorded.result.call_sid, "wav")
    assert recorded.call.recording_key == str(path)
    assert path.is_file()
    return path


async def test_recording_is_stereo_8k_with_the_caller_where_they_spoke(
    recorded: Recorded, audio
) -> None:
    caller_ch, _, rate, channels = read_stereo(recording_of(recorded))
    assert (rate, channels) == (RATE, 2)
    assert len(caller_ch) / RATE == pytest.approx(recorded.call.duration_s, abs=1.0)
    for utterance in recorded.result.utterances:
        pcm, clip_rate = load_clip(utterance.label)
        assert clip_rate == RATE
        score, offset = audio.match(caller_ch, pcm)
        assert score > 0.9, (utterance.label, score)
        first_loud = np.flatnonzero(audio.loud_frames(pcm))[0] * FRAME
        said_at = recorded.s(utterance.start)
        assert (offset + first_loud) / RATE == pytest.approx(said_at, abs=0.1), utterance.label
    assert not audio.loud_frames(caller_ch[: int(0.3 * RATE)]).any()  # the opening pause


async def test_recording_agent_channel_has_what_the_caller_heard_and_nothing_after_the_clear(
    recorded: Recorded, audio
) -> None:
    _, agent_ch, _, _ = read_stereo(recording_of(recorded))
    [interrupted] = [e for e in recorded.call.events if e.kind == "interrupted"]
    cut_at = round(interrupted.at_ms * RATE / 1000)  # where livecall cut the agent channel
    # the cut answer: as much of it as the caller heard
    loud = np.flatnonzero(audio.loud_frames(agent_ch))
    before_cut = loud[loud * FRAME < cut_at + 2 * FRAME]
    recorded_ms = (before_cut[-1] - before_cut[0] + 1) * 20
    assert recorded_ms == pytest.approx(recorded.heard_of_cut_ms, abs=120)
    # then nothing until the next answer, which starts after the caller stopped talking
    after_cut = loud[loud * FRAME >= cut_at + 2 * FRAME]
    _, hours = recorded.result.utterances
    assert after_cut[0] * FRAME / RATE > recorded.s(hours.end), (
        "agent audio the caller never heard is in the recording",
        after_cut[0] * FRAME / RATE,
        recorded.s(hours.end),
    )
    answer_ms = (after_cut[-1] - after_cut[0] + 1) * 20
    assert answer_ms == pytest.approx(len(audio.phone_ref("hours_reply")) / 8, abs=150)


async def test_recording_agent_channel_lines_up_with_the_callers_ears(
    recorded: Recorded, audio
) -> None:
    """Every 100 ms the caller heard is in the recording at (nearly) the time it was heard,
    and a stretch heard without a break is recorded without one (a single lag per stretch,
    not one per chunk: no silence inserted, nothing overlapped)."""
    _, agent_ch, _, _ = read_stereo(recording_of(recorded))
    heard = recorded.heard
    answer_ref = audio.phone_ref("hours_reply")
    _, answer_heard_at = audio.match(heard, answer_ref)
    stretches = {
        "cut answer": (recorded.first_heard_at, recorded.clear_at),
        "next answer": (answer_heard_at, answer_heard_at + len(answer_ref)),
    }
    window, reach = RATE // 10, RATE // 4
    for name, (start, end) in stretches.items():
        found = []  # (second heard, score, lag in samples) of each audible 100 ms
        for w0 in range(start, end - window, window):
            piece = heard[w0 : w0 + window]
            if audio.loud_frames(piece).any():
                lo = max(0, w0 - reach)
                score, off = audio.match(agent_ch[lo : w0 + window + reach], piece)
                found.append((round(w0 / RATE, 2), round(score, 2), lo + off - w0))
        assert found, name
        lags = [lag for _, score, lag in found if score > 0.95]
        assert len(lags) == len(found) and max(lags) - min(lags) <= RATE // 100, (
            f"{name}: the recording is not what the caller heard, unbroken: 100 ms pieces "
            f"(heard at s, match, lag in samples): {found}"
        )
        assert max(abs(x) for x in lags) < reach, (name, found)


# --------------------------------------------------------------------------- the API


async def test_rest_api_serves_the_call_with_a_bearer_token_only(recorded: Recorded) -> None:
    base, sid = recorded.stack.base_url, recorded.result.call_sid
    url = f"{base}/api/calls/{sid}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        missing = await http.get(url)
        wrong = await http.get(url, headers={"Authorization": "Bearer not-the-token"})
        listing_without = await http.get(f"{base}/api/calls")
        recording_without = await http.get(url + "/recording")
        resp = await http.get(url, headers=auth)
        listed = await http.get(f"{base}/api/calls", headers=auth)
        recording = await http.get(url + "/recording", headers=auth)
    for refused in (missing, wrong, listing_without, recording_without):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
    assert resp.status_code == 200
    body = resp.json()
    assert body["call_sid"] == sid
    assert (body["status"], body["end_reason"], body["from_number"], body["to_number"]) == (
        "completed",
        "caller_stop",
        FROM,
        TO,
    )
    assert body["has_recording"] is True
    assert [(t["speaker"], t["interrupted"]) for t in body["turns"]] == [
        ("caller", False),
        ("agent", True),
        ("caller", False),
        ("agent", False),
    ]
    assert body["turns"][1]["heard_text"] == recorded.call.turns[1].heard_text
    assert {"dtmf", "interrupted"} <= {e["kind"] for e in body["events"]}
    assert listed.status_code == 200
    assert [c["call_sid"] for c in listed.json()["items"]] == [sid]
    assert recording.status_code == 200
    assert recording.content == recording_of(recorded).read_bytes()
