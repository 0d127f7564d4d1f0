"""Quality through each carrier adapter: PESQ within 0.1 of the ideal, on the real pipeline.

The figures are `livecall bench quality`'s (docs/benchmarks.md); here they are asserted on
fewer clips. Nothing is timed. Each adapter path runs the carrier's own wire frames through
its real adapter and the core's real transcoders (`livecall.bench.wire_paths`); the carriers
with routes are also called for real (server, simulated edge, fake Gemini), and the call
must measure exactly what the adapter path measures, which is what makes the adapter paths
of the carriers without routes stand for a call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from livecall.audio import g711
from livecall.bench.g711_ref import (
    alaw_decode_ref,
    alaw_encode_ref,
    ulaw_decode_ref,
    ulaw_encode_ref,
)
from livecall.bench.quality import TARGET_DELTA, ClipScore, score_call, score_path
from livecall.bench.wire_paths import PATHS, WirePath

SAID = ("book", "yes")  # on an 8 kHz caller wire
SAID_WIDEBAND = ("greeting", "sorry")  # 24 kHz sources on a 16/24 kHz caller wire
REPLIES = ("hours_reply", "goodbye")
# what each carrier's adapter must have put on the wire for the agent's audio and marks
WIRE_MESSAGES = {
    "twilio": {"media", "mark"},
    "telnyx": {"media", "mark"},
    "plivo": {"playAudio", "checkpoint"},
    "vonage": {"binary", "notify"},
    "exotel": {"media", "mark"},
}


def _within_target(scores: list[ClipScore]) -> None:
    for s in scores:
        assert s.delta is not None and s.delta <= TARGET_DELTA, s
        assert s.match > 0.98, s  # the clip is really in what came out, in one piece


def test_the_reference_g711_agrees_with_livecalls_on_every_value() -> None:
    """Two independent G.711s (the bench's own, Sun rules; livecall's tables) agree, so the
    ideal is a correct G.711 and a Δ is the bridge's, not a codec mismatch."""
    pcm = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    codes = np.arange(256, dtype=np.uint8)
    assert np.array_equal(g711.ulaw_encode(pcm), ulaw_encode_ref(pcm))
    assert np.array_equal(g711.alaw_encode(pcm), alaw_encode_ref(pcm))
    assert np.array_equal(g711.ulaw_decode(codes.tobytes()), ulaw_decode_ref(codes))
    assert np.array_equal(g711.alaw_decode(codes.tobytes()), alaw_decode_ref(codes))


@pytest.mark.parametrize("path", PATHS, ids=[f"{p.carrier}-{p.codec}" for p in PATHS])
def test_each_adapter_path_is_within_the_target(path: WirePath) -> None:
    said = SAID if path.inbound.sample_rate == 8000 else SAID_WIDEBAND
    scores, run = score_path(path, said=said, replies=REPLIES)

    assert [s.direction for s in scores] == ["caller->model"] * 2 + ["model->caller"] * 2
    _within_target(scores)
    # the real pipeline ran: the carrier's start set the format the core transcoded from, every
    # caller frame came through the adapter as audio, and the adapter spoke its own protocol
    assert run.stream_type == type(path.make()).__name__
    assert run.started.media_format == path.inbound
    assert len(run.model_received) == pytest.approx(run.frames_in * path.frame_ms * 16, abs=320)
    assert set(run.kinds) == WIRE_MESSAGES[path.carrier], run.kinds
    assert run.frames_out > 0 and run.marks >= len(REPLIES)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("carrier", ["twilio", "telnyx", "plivo"])
async def test_a_real_call_measures_what_its_adapter_path_measures(
    carrier: str, tmp_path: Path
) -> None:
    scores, info = await score_call(
        REPLIES, "unpaced", tmp_path, seed=1, carrier=carrier, said_clips=SAID
    )

    assert info["caller_protocol_errors"] == [] and info["caller_script_errors"] == []
    assert info["model_turns"] == [(name, False) for name in REPLIES]
    assert info["marks_echoed"] > 0
    _within_target(scores)
    [path] = [p for p in PATHS if p.carrier == carrier and p.codec == "mulaw 8k"]
    offline, _ = score_path(path, said=SAID, replies=REPLIES)
    # the codec path is exact streaming: a call's framing and timing change no sample
    assert [(s.clip, s.ref_vs_measured) for s in scores] == [
        (s.clip, s.ref_vs_measured) for s in offline
    ]
