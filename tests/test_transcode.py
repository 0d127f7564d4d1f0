"""Transcoders: the fused codec path equals g711 + StreamResampler by hand, and behaves on a call.

No timing assertions here: speed is measured by `python -m livecall.bench.audio`.
"""

from __future__ import annotations

import base64
import tracemalloc

import numpy as np
import pytest

from livecall.audio import g711
from livecall.audio.resample import StreamResampler
from livecall.audio.transcode import (
    ENCODINGS,
    InboundTranscoder,
    OutboundTranscoder,
    encoding_of,
    from_ulaw,
    pcm_of,
)
from livecall.bench.audio import speech_like, tone

LAWS = {
    "audio/x-mulaw": (g711.ulaw_encode, g711.ulaw_decode),
    "audio/x-alaw": (g711.alaw_encode, g711.alaw_decode),
}


def frames(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def tone_snr_db(x: np.ndarray, rate: int, freq: float) -> float:
    """SNR of `x` as a tone at `freq`: least-squares fit of the sine, the rest is noise."""
    t = np.arange(len(x)) / rate
    basis = np.column_stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)])
    coef, *_ = np.linalg.lstsq(basis, x.astype(np.float64), rcond=None)
    fit = basis @ coef
    return float(10 * np.log10(np.sum(fit**2) / np.sum((x - fit) ** 2)))


# -- equal to the composed path ----------------------------------------------------------------


@pytest.mark.parametrize("encoding", list(LAWS))
@pytest.mark.parametrize("out_rate", [16000, 24000, 8000])
def test_inbound_equals_g711_then_resampler(encoding: str, out_rate: int) -> None:
    encode, decode = LAWS[encoding]
    caller = speech_like(8000, 1.0, seed=1)
    wire = encode(caller).tobytes()
    t = InboundTranscoder(out_rate, encoding)
    got = b"".join(t.decode_payload(base64.b64encode(f)) for f in frames(wire, 160))
    expected = StreamResampler(8000, out_rate).process(decode(wire)).tobytes()
    assert got == expected


def test_inbound_l16() -> None:
    caller = speech_like(8000, 0.5, seed=2)
    t = InboundTranscoder(16000, "audio/x-l16")
    got = b"".join(t.decode(f) for f in frames(caller.astype("<i2").tobytes(), 320))
    assert got == StreamResampler(8000, 16000).process(caller).tobytes()
    with pytest.raises(ValueError, match="even number of bytes"):
        t.decode(b"\x00\x01\x02")


@pytest.mark.parametrize("encoding", list(LAWS))
def test_outbound_equals_resampler_then_g711(encoding: str) -> None:
    encode, _ = LAWS[encoding]
    agent = speech_like(24000, 1.0, seed=3)
    t = OutboundTranscoder(24000, encoding)
    got = b"".join(t.encode(f) for f in frames(agent.astype("<i2").tobytes(), 960))
    got += t.flush()
    r = StreamResampler(24000, 8000)
    expected = encode(np.concatenate([r.process(agent), r.flush()])).tobytes()
    assert got == expected
    assert len(got) == 8000


def test_outbound_l16() -> None:
    agent = speech_like(24000, 0.5, seed=4)
    t = OutboundTranscoder(24000, "audio/x-l16")
    got = t.encode(agent.astype("<i2").tobytes()) + t.flush()
    r = StreamResampler(24000, 8000)
    assert got == np.concatenate([r.process(agent), r.flush()]).astype("<i2").tobytes()


def test_large_chunks_take_the_same_path() -> None:
    agent = speech_like(24000, 3.0, seed=5).astype("<i2").tobytes()
    a, b = OutboundTranscoder(), OutboundTranscoder()
    assert a.encode(agent) + a.flush() == b"".join(b.encode(f) for f in frames(agent, 960)) + (
        b.flush()
    )
    wire = g711.ulaw_encode(speech_like(8000, 3.0, seed=6)).tobytes()
    c, d = InboundTranscoder(), InboundTranscoder()
    assert c.decode(wire) == b"".join(d.decode(f) for f in frames(wire, 160))


# -- call behaviour ----------------------------------------------------------------------------


def test_round_trip_keeps_a_tone_clean() -> None:
    """Model 24k -> caller μ-law 8k -> back to 16k: a 1 kHz tone stays a clean tone."""
    x = tone(24000, 1000.0, 1.0, amplitude=12000)
    out = OutboundTranscoder()
    wire = b"".join(out.encode(f) for f in frames(x.astype("<i2").tobytes(), 960)) + out.flush()
    inb = InboundTranscoder(16000)
    back = np.frombuffer(b"".join(inb.decode(f) for f in frames(wire, 160)), dtype="<i2")
    assert len(back) == 16000 - round(16000 * StreamResampler(8000, 16000).delay_ms / 1000)
    steady = back[800:-800]
    assert tone_snr_db(steady, 16000, 1000.0) > 35.0  # μ-law itself allows ~38 dB


def test_odd_byte_is_carried_to_the_next_call() -> None:
    pcm = speech_like(24000, 0.5, seed=7).astype("<i2").tobytes()
    whole = OutboundTranscoder()
    expected = whole.encode(pcm) + whole.flush()
    split = OutboundTranscoder()
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, len(pcm)), size=60, replace=False))
    pieces = [pcm[a:b] for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(pcm)], strict=True)]
    assert any(len(p) % 2 for p in pieces)
    got = b"".join(split.encode(p) for p in pieces) + split.flush()
    assert got == expected


def test_carry_across_a_single_byte_and_memoryview() -> None:
    pcm = np.arange(-480, 480, dtype="<i2").tobytes()
    t, ref = OutboundTranscoder(), OutboundTranscoder()
    got = t.encode(pcm[:1]) + t.encode(memoryview(pcm)[1:3]) + t.encode(bytearray(pcm[3:]))
    assert got == ref.encode(pcm)


def test_reset_drops_carry_and_history() -> None:
    pcm = speech_like(24000, 0.2, seed=8).astype("<i2").tobytes()
    t = OutboundTranscoder()
    t.encode(pcm[:961])  # odd: one byte carried
    t.reset()
    fresh = OutboundTranscoder()
    assert t.encode(pcm) == fresh.encode(pcm)
    assert t.flush() == fresh.flush()


def test_flush_emits_the_tail_then_starts_fresh() -> None:
    pcm = speech_like(24000, 0.2, seed=9).astype("<i2").tobytes()
    t = OutboundTranscoder()
    body = t.encode(pcm)
    tail = t.flush()
    assert len(body) + len(tail) == 0.2 * 8000
    assert len(tail) == round(t._rs.delay_ms * 8)
    assert t.flush() == b""
    assert t.encode(pcm) == OutboundTranscoder().encode(pcm)


def test_inbound_reset() -> None:
    wire = g711.ulaw_encode(speech_like(8000, 0.2, seed=10)).tobytes()
    t = InboundTranscoder()
    t.decode(wire[:100])
    t.reset()
    assert t.decode(wire) == InboundTranscoder().decode(wire)


def test_encode_payload_is_base64_of_encode() -> None:
    pcm = speech_like(24000, 0.02, seed=11).astype("<i2").tobytes()
    a, b = OutboundTranscoder(), OutboundTranscoder()
    payload = a.encode_payload(pcm)
    assert isinstance(payload, str)
    assert base64.b64decode(payload) == b.encode(pcm)
    assert len(base64.b64decode(payload)) == 160 - round(a._rs.delay_ms * 8)


@pytest.mark.parametrize("payload", ["not base64!", "AAA", "AA=A", "ÿÿÿÿ", b"\x00\x01"])
def test_invalid_base64_is_a_value_error(payload: str | bytes) -> None:
    with pytest.raises(ValueError, match="base64"):
        InboundTranscoder().decode_payload(payload)


def test_empty_payload() -> None:
    assert InboundTranscoder().decode_payload("") == b""
    assert OutboundTranscoder().encode(b"") == b""


def test_unknown_encoding() -> None:
    with pytest.raises(ValueError, match="audio/x-mulaw"):
        InboundTranscoder(16000, "audio/opus")
    with pytest.raises(ValueError, match="audio/x-mulaw"):
        OutboundTranscoder(24000, "audio/pcmu")


def test_per_frame_path_does_not_grow_memory() -> None:
    inb, out = InboundTranscoder(), OutboundTranscoder()
    wire = g711.ulaw_encode(speech_like(8000, 10.0, seed=12)).tobytes()
    payloads = [base64.b64encode(f).decode() for f in frames(wire, 160)][:500]
    pcm = frames(speech_like(24000, 10.0, seed=13).astype("<i2").tobytes(), 960)[:500]
    for p, c in zip(payloads[:20], pcm[:20], strict=True):  # warm-up
        inb.decode_payload(p)
        out.encode_payload(c)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for p, c in zip(payloads, pcm, strict=True):
            inb.decode_payload(p)
            out.encode_payload(c)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 4096, f"grew by {after - before} bytes over 500 frames"
    assert peak - before < 16384, f"peak {peak - before} bytes above the start"


# -- carrier rates: L16 at 16/24 kHz, A-law, and recorded μ-law lines in any playback format ---


@pytest.mark.parametrize("carrier_rate", [8000, 16000, 24000])
def test_l16_at_carrier_rates_equals_the_resampler(carrier_rate: int) -> None:
    pcm24 = speech_like(24000, 0.5)
    out = OutboundTranscoder(24000, "audio/x-l16", carrier_rate)
    got = b"".join(out.encode(f) for f in frames(pcm24.tobytes(), 960)) + out.flush()
    rs = StreamResampler(24000, carrier_rate)
    want = np.concatenate((rs.process(pcm24), rs.flush())).astype("<i2").tobytes()
    assert got == want and len(got) == carrier_rate  # half a second of 16-bit samples

    inbound = InboundTranscoder(16000, "audio/x-l16", carrier_rate)
    wire = speech_like(carrier_rate, 0.5).astype("<i2").tobytes()
    size = carrier_rate // 50 * 2
    got_in = b"".join(inbound.decode(f) for f in frames(wire, size))
    rs_in = StreamResampler(carrier_rate, 16000)
    assert got_in == rs_in.process(np.frombuffer(wire, "<i2")).tobytes()


def test_g711_only_at_8k_and_l16_only_at_its_rates() -> None:
    with pytest.raises(ValueError, match="16000 Hz"):
        OutboundTranscoder(24000, "audio/x-alaw", 16000)
    with pytest.raises(ValueError, match="11025 Hz"):
        InboundTranscoder(16000, "audio/x-l16", 11025)
    with pytest.raises(ValueError, match="unsupported"):
        encoding_of("opus")
    assert [encoding_of(e) for e in ("mulaw", "alaw", "l16")] == list(ENCODINGS)


def test_from_ulaw_codes_a_recorded_line_for_each_playback_format() -> None:
    pcm = tone(8000, 440.0, 0.2)
    ulaw = g711.ulaw_encode(pcm).tobytes()
    assert from_ulaw(ulaw, "audio/x-mulaw") is ulaw  # Twilio's hot path: no copy
    decoded = g711.ulaw_decode(ulaw)
    assert from_ulaw(ulaw, "audio/x-alaw") == g711.alaw_encode(decoded).tobytes()
    assert from_ulaw(ulaw, "audio/x-l16") == decoded.astype("<i2").tobytes()
    wide = np.frombuffer(from_ulaw(ulaw, "audio/x-l16", 16000), "<i2")
    assert len(wide) == 2 * len(ulaw) and tone_snr_db(wide[200:-200], 16000, 440.0) > 30
    assert np.array_equal(pcm_of(ulaw, "audio/x-mulaw"), decoded)
    alaw = g711.alaw_encode(decoded).tobytes()
    assert np.array_equal(pcm_of(alaw, "audio/x-alaw"), g711.alaw_decode(alaw))
    assert pcm_of(b"\x01\x00\xff\xff\x07", "audio/x-l16").tolist() == [1, -1]  # odd byte dropped
