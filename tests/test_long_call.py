"""A one-hour phone call, simulated in compressed time: many Gemini session rotations, no loss.

What an hour means for the bridge is not the hour itself but what happens in it: Gemini Live
ends every connection after about 10 minutes (a `goAway` arrives about a minute before the
close), so an hour-long call moves through 6-7 sessions, resuming each time with the latest
handle and replaying the caller audio the handle does not hold yet. Audio-only sessions also
need context window compression to last past 15 minutes.

Compression of time: the fake model sends `goAway` 3.5 s into every session with 2.5 s left
(a ~10-minute connection with a 1-minute warning becomes ~6 s with a 2.5 s warning: x100 for
the lifetime, x24 for the warning). The caller talks for ~45 s in short exchanges with pauses,
so the call carries at least as many rotations as a real hour (≥ 6), each a full
goAway -> new session (resumed) -> replay -> old session closed cycle, at turn boundaries or at
the deadline when no boundary comes. What is not compressed is the audio itself: 20 ms frames
on a real-time clock, replies played out at real time, so the rotations meet a live call.
"""

from __future__ import annotations

from typing import Any

import pytest

from livecall.sim.clips import load_clip
from livecall.sim.gemini import GoAwayFault, Scenario
from livecall.sim.twilio import HangUp, Pause, Say, WaitForAgentSilence

PCM16K_FRAME_BYTES = 640  # one 20 ms caller frame as Gemini gets it (PCM16LE 16 kHz)

# The caller's side of the hour: short questions, each answered briefly, pauses between them.
UTTERANCES = ["yes", "hours", "yes", "yes", "hours", "yes", "yes", "hours", "yes", "yes"]
REPLIES = {"yes": "one_moment", "hours": "goodbye"}

SESSION_LIFETIME_S = 3.5  # goAway this long into each session (a real one: ~9 minutes)
GO_AWAY_LEFT_S = 2.5  # time left in the goAway (a real one: ~60 s)


def _script() -> list[Any]:
    script: list[Any] = [Pause(300)]
    for i, name in enumerate(UTTERANCES):
        pcm, rate = load_clip(name)
        script += [
            Say(pcm, rate=rate, label=f"{i}:{name}"),
            WaitForAgentSilence(silence_ms=500, timeout=20),
            Pause(300 + 150 * (i % 4)),  # pauses of varied length: some rotations fall in them
        ]
    return [*script, HangUp()]


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_an_hour_long_call_in_compressed_time_loses_nothing(
    make_stack, call_over, leftover_tasks
) -> None:
    """≥ 6 rotations; 0 caller frames lost; every utterance answered; compression on.

    Frames lost is checked at both hops. Twilio -> livecall: the bridge counted every frame
    the caller sent (`frames_in`). livecall -> Gemini: the sessions together received at
    least as much caller audio as the caller sent. It can be *more*, never less: at each
    switch the bridge replays to the new session the audio the old one took after its last
    resumable snapshot (the handle does not hold it), so those frames reach two sessions.
    And the fake model understood every utterance, in order, which it could not with a
    frame missing from the middle of one.
    """
    scenario = Scenario(
        seed=60,
        greeting=None,
        replies=REPLIES,
        pause_prob=0.0,
        first_audio_delay=0.2,
        go_aways=[GoAwayFault(after=SESSION_LIFETIME_S, time_left=GO_AWAY_LEFT_S)],
    )
    stack = await make_stack(scenario, vad_silence_duration_ms=300, recording_enabled=False)
    result = await stack.caller(_script(), seed=60, timeout=75).run()
    await call_over(stack, timeout=20)

    assert result.protocol_errors == [] and result.script_errors == [], (
        result.protocol_errors,
        result.script_errors,
    )
    assert result.ended_by == "caller"
    sessions = stack.gemini.sessions

    # ≥ 6 rotations, each a resumption of the same conversation, made by livecall in time:
    # every old session was closed by the client, none ran into Gemini's deadline
    rotations = len(sessions) - 1
    assert rotations >= 6, [(round(s.opened_at, 1), s.close_code) for s in sessions]
    assert all(s.resumed for s in sessions[1:]), [s.resumed for s in sessions]
    assert len({s.chain for s in sessions}) == 1
    assert [s.closed_by for s in sessions] == ["client"] * len(sessions), [
        (s.closed_by, s.close_code) for s in sessions
    ]

    # context window compression asked for in every session, or an audio session ends at 15 min
    assert all(s.context_window_compression for s in sessions), [
        s.context_window_compression for s in sessions
    ]

    # 0 caller frames lost
    call = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
    assert call is not None
    assert call.frames_in == result.frames_sent, (call.frames_in, result.frames_sent)
    received = sum(s.audio_bytes_received for s in sessions) // PCM16K_FRAME_BYTES
    assert received >= result.frames_sent, (received, result.frames_sent)

    # every utterance answered: the caller heard an answer after each one, and the model
    # understood each one exactly once, in order, whichever session it fell in
    latencies = [u.response_latency_ms for u in result.utterances]
    assert len(latencies) == len(UTTERANCES) and None not in latencies, latencies
    understood = [
        t.caller_clip
        for s in sessions
        for t in sorted(s.turns, key=lambda t: t.number)
        if t.trigger == "speech" and t.completed
    ]
    assert understood == UTTERANCES, understood
    assert (call.status, call.end_reason) == ("completed", "caller_stop")
    assert call.gemini_sessions == len(sessions)
    assert stack.registry.active == {}
    assert leftover_tasks(result.call_sid) == []
