"""The same whole-call suite for each carrier, through the same call core.

Each test rings the real app (uvicorn on loopback, the carrier's webhook signatures enforced)
from that carrier's simulated edge (`livecall.sim.<carrier>`), and the app talks to the fake
Gemini Live over TLS through the real SDK. All five carriers run here: Twilio, Telnyx, Plivo,
Vonage and Exotel (at each of its rates: 16 kHz, livecall's default, 8 and 24 kHz).
"""

from __future__ import annotations

import wave
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from livecall.audio.dtmf import detect_dtmf
from livecall.sim.exotel import SimulatedExotelCaller
from livecall.sim.gemini import GoAwayFault, Scenario, ToolCallFault
from livecall.sim.plivo import PlivoSimulatedCaller
from livecall.sim.stack import LocalStack
from livecall.sim.telnyx import TelnyxSimulatedCaller, generate_keypair
from livecall.sim.twilio import (
    HangUp,
    Pause,
    PressDigit,
    SimulatedCaller,
    WaitForAgentAudio,
    WaitForAgentSilence,
)
from livecall.sim.vonage import SimulatedVonageCaller
from support import assert_clean, say

FAST = {"vad_silence_duration_ms": 300}
PLIVO_TOKEN = "plivo-test-auth-token-0123456789"
VONAGE_SECRET = "vonage-test-signature-secret-0123456789"
EXOTEL_SECRET = "exotel-test-url-secret-0123456789"
_TELNYX_SEED, TELNYX_PUBLIC = generate_keypair()
_FORGED_SEED, _ = generate_keypair()


@dataclass(frozen=True)
class Edge:
    """One carrier's simulated edge and the settings that switch it on in the app."""

    name: str
    settings: dict[str, Any]
    make: Callable[..., SimulatedCaller]  # (stack, script, forged=False, **kw) -> caller


def _twilio(stack: LocalStack, script: list[Any], forged: bool = False, **kw: Any) -> Any:
    if forged:
        kw["auth_token"] = "not-the-auth-token"
    return stack.caller(script, **kw)


def _telnyx(stack: LocalStack, script: list[Any], forged: bool = False, **kw: Any) -> Any:
    key = _FORGED_SEED if forged else _TELNYX_SEED
    return TelnyxSimulatedCaller(
        stack.base_url, private_key=key, webhook_path="/telnyx/texml", script=script, **kw
    )


def _plivo(stack: LocalStack, script: list[Any], forged: bool = False, **kw: Any) -> Any:
    token = "not-the-auth-token" if forged else PLIVO_TOKEN
    return PlivoSimulatedCaller(stack.base_url, auth_token=token, script=script, **kw)


def _vonage(stack: LocalStack, script: list[Any], forged: bool = False, **kw: Any) -> Any:
    secret = "not-the-signature-secret-0123456789" if forged else VONAGE_SECRET
    return SimulatedVonageCaller(stack.base_url, signature_secret=secret, script=script, **kw)


def _exotel(stack: LocalStack, script: list[Any], forged: bool = False, **kw: Any) -> Any:
    secret = "not-the-exotel-url-secret" if forged else EXOTEL_SECRET
    return SimulatedExotelCaller(stack.base_url, url_secret=secret, script=script, **kw)


EDGES = [
    Edge("twilio", {}, _twilio),
    Edge("telnyx", {"telnyx_public_key": TELNYX_PUBLIC}, _telnyx),
    Edge("plivo", {"plivo_auth_token": PLIVO_TOKEN}, _plivo),
    Edge("vonage", {"vonage_signature_secret": VONAGE_SECRET}, _vonage),
    Edge("exotel", {"exotel_url_secret": EXOTEL_SECRET}, _exotel),  # 16 kHz, the default
    # Exotel streams at the rate its stream URL asks for: the narrowband and HD rates too
    Edge("exotel-8k", {"exotel_url_secret": EXOTEL_SECRET, "exotel_sample_rate": 8000}, _exotel),
    Edge("exotel-24k", {"exotel_url_secret": EXOTEL_SECRET, "exotel_sample_rate": 24000}, _exotel),
]


@pytest.fixture(params=EDGES, ids=[e.name for e in EDGES])
def edge(request: pytest.FixtureRequest) -> Edge:
    return request.param


def model(seed: int, **kw: Any) -> Scenario:
    kw.setdefault("first_audio_delay", 0.2)
    return Scenario(seed=seed, greeting=None, pause_prob=0.0, **kw)


async def _record(stack: LocalStack, call_sid: str) -> Any:
    return await stack.app.state.livecall.store.repo.get_call(call_sid)


@pytest.mark.timeout(60)
async def test_whole_call_answered_recorded_and_kept(
    edge: Edge, make_stack, call_over, leftover_tasks, audio, tmp_path
) -> None:
    stack = await make_stack(
        model(7), **FAST, **edge.settings, recording_enabled=True, recording_format="wav"
    )
    script = [say("hours"), WaitForAgentSilence(silence_ms=500, timeout=15), HangUp()]
    result = await edge.make(stack, script, seed=7).run()
    await call_over(stack)

    assert_clean(result)
    assert result.ended_by == "caller"
    assert audio.heard_share(result.heard_pcm(), "hours_reply") >= 0.9
    assert result.marks_received
    [session] = stack.gemini.sessions
    assert session.input_transcripts == ["What time do you open on Sundays?"]
    call = await _record(stack, result.call_sid)
    assert call is not None and call.status == "completed", call
    assert [t.speaker for t in call.turns] == ["caller", "agent"]
    assert call.recording_key, "no recording kept"
    with wave.open(call.recording_key) as recording:  # stereo 8 kHz: caller and agent
        assert (recording.getnchannels(), recording.getframerate()) == (2, 8000)
        assert recording.getnframes() > 8000
    assert stack.registry.active == {}
    assert leftover_tasks(result.call_sid) == []


@pytest.mark.timeout(60)
async def test_barge_in_clears_what_the_caller_hears(
    edge: Edge, make_stack, call_over, audio
) -> None:
    scenario = model(3, replies={"yes": "book_reply", "hours": "hours_reply"}, rate=2.0)
    stack = await make_stack(scenario, **FAST, **edge.settings)
    script = [
        Pause(200),
        say("yes"),
        WaitForAgentAudio(min_heard_ms=1000, timeout=10),
        say("hours"),
        WaitForAgentSilence(silence_ms=500, timeout=15),
        HangUp(),
    ]
    result = await edge.make(stack, script, seed=3).run()
    await call_over(stack)

    assert_clean(result)
    assert len(result.clears) == 1
    [session] = stack.gemini.sessions
    assert [(t.reply_clip, t.interrupted) for t in session.turns] == [
        ("book_reply", True),
        ("hours_reply", False),
    ]
    heard = result.heard_pcm()
    after = heard[audio.at(result, result.clears[0]) + 480 :]
    assert audio.heard_share(after, "hours_reply") > 0.9
    call = await _record(stack, result.call_sid)
    assert call is not None and any(t.interrupted for t in call.turns)


@pytest.mark.timeout(60)
async def test_dtmf_reaches_the_model(edge: Edge, make_stack, call_over) -> None:
    stack = await make_stack(model(5), **FAST, **edge.settings)
    script = [Pause(300), PressDigit("7"), Pause(600), HangUp()]
    result = await edge.make(stack, script, seed=5).run()
    await call_over(stack)

    assert_clean(result)
    [session] = stack.gemini.sessions
    assert len(session.texts) == 1 and "pressed 7" in session.texts[0], session.texts
    call = await _record(stack, result.call_sid)
    assert call is not None and [e.kind for e in call.events].count("dtmf") == 1


@pytest.mark.timeout(60)
async def test_agent_hangs_up_after_its_goodbye(
    edge: Edge, make_stack, call_over, tmp_path
) -> None:
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(
        yaml.safe_dump(
            {
                "profiles": [
                    {
                        "name": "agent",
                        "default": True,
                        "system_prompt": "Answer.",
                        "tools": ["end_call"],
                    }
                ]
            }
        )
    )
    hang_up = ToolCallFault(
        after_caller_turn=1, name="end_call", args={"reason": "done"}, say_first="goodbye"
    )
    scenario = Scenario(seed=9, greeting=None, pause_prob=0.0, tool_calls=[hang_up])
    stack = await make_stack(scenario, **FAST, **edge.settings, profiles_file=profiles)
    result = await edge.make(stack, [say("hours")], seed=9, on_script_end="wait").run()
    await call_over(stack)

    assert result.ended_by == "server", result.timeline
    assert result.marks_received and result.marks_echoed[-1].t <= result.ended
    call = await _record(stack, result.call_sid)
    assert call is not None and call.end_reason == "agent_hangup", call


@pytest.mark.timeout(60)
async def test_caller_hangs_up_mid_answer(edge: Edge, make_stack, call_over) -> None:
    stack = await make_stack(model(4), **FAST, **edge.settings)
    script = [say("hours"), WaitForAgentAudio(min_heard_ms=300, timeout=10), HangUp()]
    result = await edge.make(stack, script, seed=4).run()
    await call_over(stack)

    assert result.ended_by == "caller"
    call = await _record(stack, result.call_sid)
    assert call is not None and call.end_reason in ("caller_stop", "caller_closed"), call
    assert stack.registry.active == {}


@pytest.mark.timeout(60)
async def test_forged_webhook_is_refused(edge: Edge, make_stack) -> None:
    stack = await make_stack(model(1), **edge.settings)
    result = await edge.make(stack, [HangUp()], forged=True, seed=1).run()
    assert result.webhook_status == 403
    assert stack.gemini.sessions == [] and stack.registry.active == {}


@pytest.mark.timeout(90)
async def test_resumes_across_a_gemini_go_away(edge: Edge, make_stack, call_over, audio) -> None:
    scenario = model(11, go_aways=[GoAwayFault(after=2.5, time_left=3.0)])
    stack = await make_stack(scenario, **FAST, **edge.settings)
    script = [
        say("hours"),
        WaitForAgentSilence(silence_ms=500, timeout=15),
        Pause(2500),
        say("hours"),
        WaitForAgentSilence(silence_ms=500, timeout=15),
        HangUp(),
    ]
    result = await edge.make(stack, script, seed=11).run()
    await call_over(stack)

    assert_clean(result)
    sessions = stack.gemini.sessions
    assert len(sessions) >= 2 and all(s.resumed for s in sessions[1:])
    assert audio.heard_share(result.heard_pcm(), "hours_reply") >= 0.9
    assert len(result.response_latencies_ms) == 2


@pytest.mark.timeout(60)
async def test_agent_sends_dtmf_on_the_stream_or_as_tones(
    edge: Edge, make_stack, call_over, tmp_path
) -> None:
    profiles = tmp_path / "profiles.yaml"
    profile = {"name": "agent", "default": True, "system_prompt": "A.", "tools": ["send_dtmf"]}
    profiles.write_text(yaml.safe_dump({"profiles": [profile]}))
    press = ToolCallFault(after_caller_turn=1, name="send_dtmf", args={"digits": "12#"})
    scenario = Scenario(seed=3, greeting=None, pause_prob=0.0, replies={}, tool_calls=[press])
    stack = await make_stack(scenario, **FAST, **edge.settings, profiles_file=profiles)
    script = [say("hours"), WaitForAgentSilence(silence_ms=500, timeout=10), HangUp()]
    caller = edge.make(stack, script, seed=3)
    result = await caller.run()
    await call_over(stack)

    [session] = stack.gemini.sessions
    assert {r.name: r.response for r in session.tool_responses}["send_dtmf"] == {
        "result": "ok",
        "pressed": "12#",
    }
    if edge.name == "plivo":  # Plivo plays keys itself: sendDTMF on the stream
        assert [d.name for d in caller.digits_received] == ["12#"]
    else:  # the others hear livecall's tones
        assert detect_dtmf(result.heard_pcm()) == "12#"
