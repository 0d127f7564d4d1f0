"""Exotel at each rate its Voicebot applet streams (8, 16 and 24 kHz), through the real server.

`EXOTEL_SAMPLE_RATE` picks the `sample-rate` of the stream URL livecall answers the applet
with; the simulated Exotel edge streams at what that URL asks, as Exotel documents, and says so
in its `start`. A whole call runs at each rate: the caller is understood, the agent heard, every
chunk played back within Exotel's rules. An account that streams at another rate than the one
asked for (its `start` says which) is followed, and said in the log.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from structlog.testing import capture_logs

from livecall.sim.exotel import ExotelCallResult, SimulatedExotelCaller
from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import HangUp, WaitForAgentSilence
from support import assert_clean, say

SECRET = "exotel-rate-test-url-secret-0123456789"
FAST = {"vad_silence_duration_ms": 300}


def model(seed: int) -> Scenario:
    return Scenario(seed=seed, greeting=None, pause_prob=0.0, first_audio_delay=0.2)


async def ring(stack: LocalStack, seed: int, **kw: Any) -> ExotelCallResult:
    script = [say("hours"), WaitForAgentSilence(silence_ms=500, timeout=15), HangUp()]
    caller = SimulatedExotelCaller(
        stack.base_url, url_secret=SECRET, script=script, seed=seed, **kw
    )
    return await caller.run()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rate", [8000, 16000, 24000])
async def test_a_whole_call_at_each_rate(
    rate: int, make_stack: Any, call_over: Any, audio: Any
) -> None:
    stack = await make_stack(model(21), **FAST, exotel_url_secret=SECRET, exotel_sample_rate=rate)
    with capture_logs() as logged:
        result = await ring(stack, 21)
        await call_over(stack)

    assert_clean(result)  # every chunk a multiple of 320 bytes, none over 100 kB
    assert parse_qs(urlsplit(result.stream_url or "").query)["sample-rate"] == [str(rate)]
    assert result.sample_rate == rate and result.ended_by == "caller"
    [session] = stack.gemini.sessions
    assert session.input_transcripts == ["What time do you open on Sundays?"]  # 16 kHz in
    assert audio.heard_share(result.heard_pcm(), "hours_reply") >= 0.9
    assert result.marks_received and result.marks_echoed
    assert not [e for e in logged if e["event"] == "exotel.sample_rate_mismatch"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("asked", "streams"), [(16000, 8000), (8000, 24000)])
async def test_an_account_streaming_at_another_rate_is_followed_and_said(
    asked: int, streams: int, make_stack: Any, call_over: Any, audio: Any
) -> None:
    stack = await make_stack(model(22), **FAST, exotel_url_secret=SECRET, exotel_sample_rate=asked)
    with capture_logs() as logged:
        result = await ring(stack, 22, account_rate=streams)
        await call_over(stack)

    assert_clean(result)
    assert parse_qs(urlsplit(result.stream_url or "").query)["sample-rate"] == [str(asked)]
    assert result.sample_rate == streams
    [session] = stack.gemini.sessions
    assert session.input_transcripts == ["What time do you open on Sundays?"]
    assert audio.heard_share(result.heard_pcm(), "hours_reply") >= 0.9
    [warned] = [e for e in logged if e["event"] == "exotel.sample_rate_mismatch"]
    assert (warned["asked"], warned["got"], warned["call_sid"]) == (
        asked,
        streams,
        result.call_sid,
    )


def test_the_setting_takes_exotels_rates_only() -> None:
    from pydantic import ValidationError

    from livecall.settings import Settings

    assert Settings(_env_file=None).exotel_sample_rate == 16000  # type: ignore[call-arg]
    for rate in (8000, 24000):
        settings = Settings(_env_file=None, EXOTEL_SAMPLE_RATE=rate)  # type: ignore[call-arg]
        assert settings.exotel_sample_rate == rate
    with pytest.raises(ValidationError, match="EXOTEL_SAMPLE_RATE"):
        Settings(_env_file=None, EXOTEL_SAMPLE_RATE=44100)  # type: ignore[call-arg]
