"""StreamResampler: exact streaming, turn ends and barge-in, quality, and a flat per-frame path.

No timing assertions here: speed is measured by `python -m livecall.bench.audio`.
"""

from __future__ import annotations

import tracemalloc
from math import gcd

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livecall.audio.resample import PolyphaseResampler, StreamResampler
from livecall.bench.audio import (
    alias_rejection_db,
    held_back_ms,
    in_band_snr_db,
    reference,
    speech_like,
    stream,
)

DIRECTIONS = [
    (8000, 16000),
    (16000, 8000),
    (8000, 24000),
    (24000, 8000),
    (16000, 24000),
    (24000, 16000),
]


def one_shot_reference(x: np.ndarray, r: PolyphaseResampler, clip: bool = True) -> np.ndarray:
    """The resampler's filter over the whole signal, in exact integer arithmetic.

    Zero-stuff by `up`, convolve with the Q20 taps, keep every `down`-th sample from the group
    delay on (delay compensated), round half up, saturate; round(len * up / down) samples.
    """
    if len(x) == 0:
        return np.zeros(0, dtype=np.int16 if clip else np.int64)
    g = gcd(r.in_rate, r.out_rate)
    up, down = r.out_rate // g, r.in_rate // g
    h = r.taps.astype(np.int64)
    delay = (len(h) - 1) // 2
    u = np.zeros(len(x) * up, dtype=np.int64)
    u[::up] = x
    v = np.convolve(u, h)
    total = (2 * len(x) * up + down) // (2 * down)
    y = (v[np.arange(total) * down + delay] + (1 << 19)) >> 20
    return np.clip(y, -32768, 32767).astype(np.int16) if clip else y


def noise_with_peaks(n: int, seed: int) -> np.ndarray:
    """Loud noise with full-scale runs, so saturation is exercised too."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 9000, n)
    if n > 40:
        start = int(rng.integers(0, n - 40))
        x[start : start + 20] = 32767
        x[start + 20 : start + 40] = -32768
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def chunked(r: PolyphaseResampler, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, pos, i = [], 0, 0
    while pos < len(x):
        n = sizes[i % len(sizes)]
        out.append(r.process(x[pos : pos + n]))
        pos += n
        i += 1
    out.append(r.flush())
    return np.concatenate(out)


# -- exact streaming ---------------------------------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    direction=st.sampled_from(DIRECTIONS),
    seconds=st.floats(0.0, 1.0),
    max_chunk_s=st.sampled_from([1 / 8000, 0.001, 0.02, 0.1, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_stream_equals_one_shot_for_any_chunking(direction, seconds, max_chunk_s, seed) -> None:
    in_rate, out_rate = direction
    x = noise_with_peaks(round(seconds * in_rate), seed)
    max_chunk = max(1, round(max_chunk_s * in_rate))
    sizes = np.random.default_rng(seed).integers(1, max_chunk + 1, size=64).tolist()

    r = StreamResampler(in_rate, out_rate)
    got = chunked(r, x, sizes)
    expected = one_shot_reference(x, r)
    np.testing.assert_array_equal(got, expected)
    fresh = StreamResampler(in_rate, out_rate)
    whole = np.concatenate([fresh.process(x), fresh.flush()])
    np.testing.assert_array_equal(whole, expected)


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_one_sample_at_a_time(in_rate: int, out_rate: int) -> None:
    x = noise_with_peaks(in_rate // 20, seed=7)  # 50 ms
    r = StreamResampler(in_rate, out_rate)
    got = np.concatenate([r.process(x[i : i + 1]) for i in range(len(x))] + [r.flush()])
    np.testing.assert_array_equal(got, one_shot_reference(x, r))


def test_process_bytes_equals_process() -> None:
    x = noise_with_peaks(2400, seed=3)
    a, b = StreamResampler(24000, 8000), StreamResampler(24000, 8000)
    pcm = x.astype("<i2").tobytes()
    got = a.process_bytes(pcm[:960]) + a.process_bytes(bytearray(pcm[960:2000]))
    got += a.process_bytes(memoryview(pcm)[2000:])
    assert got == b.process(x).tobytes()
    assert isinstance(got, bytes)


# -- turn end (flush) and barge-in (reset) -----------------------------------------------------


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 159, 160, 161, 479, 480, 481, 4801])
def test_flush_completes_the_stream_to_round_length(in_rate: int, out_rate: int, n: int) -> None:
    r = StreamResampler(in_rate, out_rate)
    x = noise_with_peaks(n, seed=n)
    before = len(r.process(x))
    tail = r.flush()
    expected_total = (2 * n * out_rate + in_rate) // (2 * in_rate)  # round(n*out/in), ties up
    assert before + len(tail) == expected_total
    if n >= in_rate // 50:  # after a whole frame the filter holds its group delay back
        assert len(tail) >= int(r.delay_ms * out_rate / 1000) - 1
    assert tail.dtype == np.int16


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_flush_returns_to_the_initial_state(in_rate: int, out_rate: int) -> None:
    r = StreamResampler(in_rate, out_rate)
    r.process(noise_with_peaks(in_rate // 10, seed=1))
    r.flush()
    x = noise_with_peaks(in_rate // 10, seed=2)
    fresh = StreamResampler(in_rate, out_rate)
    np.testing.assert_array_equal(r.process(x), fresh.process(x))
    np.testing.assert_array_equal(r.flush(), fresh.flush())
    assert len(r.flush()) == 0  # nothing more held


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_reset_drops_everything(in_rate: int, out_rate: int) -> None:
    r = StreamResampler(in_rate, out_rate)
    r.process(noise_with_peaks(in_rate // 7, seed=1))  # stop mid-frame, state held
    assert r.reset() is None
    assert len(r.flush()) == 0  # nothing was left to emit
    r.process(noise_with_peaks(333, seed=4))
    r.reset()
    x = noise_with_peaks(in_rate // 10, seed=2)
    fresh = StreamResampler(in_rate, out_rate)
    np.testing.assert_array_equal(r.process(x), fresh.process(x))
    np.testing.assert_array_equal(r.flush(), fresh.flush())


# -- edge cases and input checks ---------------------------------------------------------------


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_silence_in_gives_exact_silence_out(in_rate: int, out_rate: int) -> None:
    r = StreamResampler(in_rate, out_rate)
    x = np.zeros(in_rate // 2, dtype=np.int16)
    out = chunked(r, x, [1, 7, 160, 480, 3])
    assert len(out) == out_rate // 2
    assert not out.any()


def test_empty_and_single_sample_inputs() -> None:
    r = StreamResampler(8000, 16000)
    empty = r.process(np.zeros(0, dtype=np.int16))
    assert empty.dtype == np.int16 and empty.shape == (0,)
    assert r.process_bytes(b"") == b""
    one = r.process(np.array([1000], dtype=np.int16))
    assert one.dtype == np.int16


def test_saturates_instead_of_wrapping() -> None:
    # A full-scale square wave overshoots (Gibbs): the exact result leaves the int16 range.
    x = np.tile(np.r_[np.full(12, 32767), np.full(12, -32768)], 100).astype(np.int16)
    for in_rate, out_rate in [(24000, 8000), (8000, 16000)]:
        r = StreamResampler(in_rate, out_rate)
        out = np.concatenate([r.process(x), r.flush()])
        exact = one_shot_reference(x, r, clip=False)
        assert exact.max() > 32767 and exact.min() < -32768  # so saturation is exercised
        np.testing.assert_array_equal(out, np.clip(exact, -32768, 32767))


def test_odd_length_bytes_is_a_clear_value_error() -> None:
    r = StreamResampler(8000, 16000)
    with pytest.raises(ValueError, match=r"even number of bytes.*got 3"):
        r.process_bytes(b"\x01\x02\x03")


def test_wrong_input_types() -> None:
    r = StreamResampler(8000, 16000)
    with pytest.raises(TypeError, match="int16"):
        r.process(np.zeros(10, dtype=np.float32))
    with pytest.raises(TypeError, match="int16"):
        r.process([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        r.process(np.zeros((2, 10), dtype=np.int16))


@pytest.mark.parametrize(("in_rate", "out_rate"), [(44100, 8000), (0, 8000), (8000, -1)])
def test_unsupported_rates(in_rate: int, out_rate: int) -> None:
    with pytest.raises(ValueError):
        StreamResampler(in_rate, out_rate)


def test_same_rate_is_a_passthrough() -> None:
    r = StreamResampler(8000, 8000)
    x = noise_with_peaks(1000, seed=5)
    assert r.delay_ms == 0
    np.testing.assert_array_equal(r.process(x), x)
    assert len(r.flush()) == 0


def test_api_attributes() -> None:
    r = StreamResampler(24000, 8000)
    assert (r.in_rate, r.out_rate) == (24000, 8000)
    assert isinstance(r.delay_ms, float)


# -- quality of the default (the properties the choice was made on) -----------------------------


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_holds_back_at_most_5_ms(in_rate: int, out_rate: int) -> None:
    r = StreamResampler(in_rate, out_rate)
    assert 0 < r.delay_ms <= 5.0
    x = speech_like(in_rate, 0.5, seed=1)
    mean, worst = held_back_ms(r, x, in_rate, out_rate)
    assert worst <= r.delay_ms + 1e-9
    assert mean <= worst


@pytest.mark.parametrize(("in_rate", "out_rate"), [(24000, 8000), (16000, 8000), (24000, 16000)])
def test_downsampler_rejects_aliases_by_60_db(in_rate: int, out_rate: int) -> None:
    worst, at = alias_rejection_db(StreamResampler, in_rate, out_rate, step=250.0)
    assert worst >= 60.0, f"only {worst:.1f} dB at {at:.0f} Hz"


@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 16000), (8000, 24000)])
def test_upsampler_rejects_images_by_60_db(in_rate: int, out_rate: int) -> None:
    worst, at = alias_rejection_db(StreamResampler, in_rate, out_rate, step=250.0)
    assert worst >= 60.0, f"only {worst:.1f} dB at {at:.0f} Hz"


@pytest.mark.parametrize(("in_rate", "out_rate"), DIRECTIONS)
def test_in_band_snr_against_whole_signal_reference(in_rate: int, out_rate: int) -> None:
    x = speech_like(in_rate, 2.0, seed=3)
    y = stream(StreamResampler(in_rate, out_rate), x, in_rate // 50)
    band = (300.0, 3400.0) if min(in_rate, out_rate) == 8000 else (300.0, 6800.0)
    assert in_band_snr_db(y, reference(x, in_rate, out_rate), out_rate, band) >= 40.0


# -- no allocation-heavy per-frame path --------------------------------------------------------


@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 16000), (24000, 8000)])
def test_per_frame_path_does_not_grow_memory(in_rate: int, out_rate: int) -> None:
    r = StreamResampler(in_rate, out_rate)
    x = speech_like(in_rate, 10.0, seed=4)
    frame = in_rate // 50
    frames = [x[i : i + frame] for i in range(0, len(x), frame)][:500]
    for f in frames[:20]:  # warm-up
        r.process(f)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for f in frames:
            r.process(f)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 4096, f"grew by {after - before} bytes over 500 frames"
    assert peak - before < 16384, f"peak {peak - before} bytes above the start"
