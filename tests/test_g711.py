"""G.711 μ-law / A-law: bit-exact against the standard's segment rules, for every input.

The reference codecs below are written from the ITU-T G.711 description (sign, 3-bit segment,
4-bit step; μ-law on 14-bit samples with bias 33 and all bits inverted, A-law on 13-bit samples
with the even bits inverted), one sample at a time with a loop over the segments. They share
nothing with the table-building code in `livecall.audio.g711`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from livecall.audio import g711

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = np.arange(256, dtype=np.uint8)


# -- independent scalar reference ---------------------------------------------------------------


def ref_ulaw_encode(sample: int) -> int:
    x = sample >> 2  # 16-bit linear -> 14-bit (floor, like an arithmetic shift)
    sign = 0x00 if x >= 0 else 0x80  # sign bit 1 = negative (before the inversion)
    magnitude = min(-x if x < 0 else x, 8159) + 33  # clip to the μ-law range, add the bias
    # segment s holds biased magnitudes [32 << s, 64 << s); the top value 8192 stays in 7
    for segment in range(8):
        if magnitude < 64 << segment:
            step = (magnitude >> (segment + 1)) & 0x0F
            break
    else:
        segment, step = 7, 0x0F
    return (sign | (segment << 4) | step) ^ 0xFF  # μ-law transmits every bit inverted


def ref_ulaw_decode(code: int) -> int:
    u = code ^ 0xFF
    segment, step = (u >> 4) & 0x07, u & 0x0F
    magnitude = ((2 * step + 33) << segment) - 33  # middle of the step, 14-bit units
    value = magnitude * 4  # back to 16-bit
    return -value if u & 0x80 else value


def ref_alaw_encode(sample: int) -> int:
    x = sample >> 3  # 16-bit linear -> 13-bit
    if x >= 0:
        sign, magnitude = 0x80, x
    else:
        sign, magnitude = 0x00, -x - 1  # negative values: one's-complement magnitude
    # segment 0 is [0, 32) with step 2; segment s >= 1 is [16 << s, 32 << s) with step 2**s
    for segment in range(8):
        if magnitude < 32 << segment:
            shift = 1 if segment == 0 else segment
            step = (magnitude >> shift) & 0x0F
            break
    else:
        segment, step = 7, 0x0F  # beyond the range: the largest code
    return (sign | (segment << 4) | step) ^ 0x55  # A-law inverts the even bits


def ref_alaw_decode(code: int) -> int:
    a = code ^ 0x55
    segment, step = (a >> 4) & 0x07, a & 0x0F
    # 13-bit units, middle of the step
    magnitude = 2 * step + 1 if segment == 0 else (2 * step + 33) << (segment - 1)
    value = magnitude * 8  # back to 16-bit
    return value if a & 0x80 else -value


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    samples = [int(s) for s in ALL_INT16]
    return {
        "ulaw_encode": np.array([ref_ulaw_encode(s) for s in samples], dtype=np.uint8),
        "alaw_encode": np.array([ref_alaw_encode(s) for s in samples], dtype=np.uint8),
        "ulaw_decode": np.array([ref_ulaw_decode(c) for c in range(256)], dtype=np.int16),
        "alaw_decode": np.array([ref_alaw_decode(c) for c in range(256)], dtype=np.int16),
    }


def test_reference_matches_standard_landmarks() -> None:
    # Values from the G.711 tables, to show the reference itself is the standard.
    assert ref_ulaw_encode(0) == 0xFF and ref_ulaw_encode(3) == 0xFF
    assert ref_ulaw_encode(-1) == 0x7E  # 14-bit sample -1: one step below zero
    assert ref_ulaw_encode(32767) == 0x80 and ref_ulaw_encode(-32768) == 0x00
    assert ref_ulaw_decode(0xFF) == 0 and ref_ulaw_decode(0x80) == 32124
    assert ref_alaw_encode(0) == 0xD5 and ref_alaw_encode(-1) == 0x55
    assert ref_alaw_decode(0xD5) == 8 and ref_alaw_decode(0xAA) == 32256


# -- the table codecs against the reference, every input ------------------------------------------


@pytest.mark.parametrize("name", ["ulaw_encode", "alaw_encode"])
def test_encode_all_int16_inputs(name: str, reference: dict[str, np.ndarray]) -> None:
    got = getattr(g711, name)(ALL_INT16)
    assert got.dtype == np.uint8
    bad = np.flatnonzero(got != reference[name])
    assert bad.size == 0, f"{name} differs for {bad.size} inputs, first {int(ALL_INT16[bad[0]])}"


@pytest.mark.parametrize("name", ["ulaw_decode", "alaw_decode"])
def test_decode_all_codes(name: str, reference: dict[str, np.ndarray]) -> None:
    got = getattr(g711, name)(ALL_CODES)
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, reference[name])


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_decode_then_encode_is_identity_on_codes(law: str) -> None:
    codes = getattr(g711, f"{law}_decode")(ALL_CODES)
    back = getattr(g711, f"{law}_encode")(codes)
    expected = ALL_CODES
    if law == "ulaw":  # 0x7F and 0xFF are both zero ("negative zero"); zero encodes as 0xFF
        expected = np.where(ALL_CODES == 0x7F, 0xFF, ALL_CODES)
    np.testing.assert_array_equal(back, expected)


def _audioop():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop
        except ImportError:
            pytest.skip("audioop is not available in this Python (removed in 3.13)")
    return audioop


def test_matches_audioop_all_inputs() -> None:
    audioop = _audioop()
    pcm = ALL_INT16.astype("<i2").tobytes()
    codes = ALL_CODES.tobytes()
    assert g711.ulaw_encode(pcm).tobytes() == audioop.lin2ulaw(pcm, 2)
    assert g711.alaw_encode(pcm).tobytes() == audioop.lin2alaw(pcm, 2)
    assert g711.ulaw_decode(codes).astype("<i2").tobytes() == audioop.ulaw2lin(codes, 2)
    assert g711.alaw_decode(codes).astype("<i2").tobytes() == audioop.alaw2lin(codes, 2)


# -- input handling ----------------------------------------------------------------------------


def test_bytes_input_equals_array_input() -> None:
    pcm = ALL_INT16.astype("<i2").tobytes()
    np.testing.assert_array_equal(g711.ulaw_encode(pcm), g711.ulaw_encode(ALL_INT16))
    np.testing.assert_array_equal(g711.alaw_encode(bytearray(pcm)), g711.alaw_encode(ALL_INT16))
    codes = ALL_CODES.tobytes()
    np.testing.assert_array_equal(g711.ulaw_decode(codes), g711.ulaw_decode(ALL_CODES))
    np.testing.assert_array_equal(g711.alaw_decode(memoryview(codes)), g711.alaw_decode(ALL_CODES))


@pytest.mark.parametrize("encode", [g711.ulaw_encode, g711.alaw_encode])
def test_odd_length_pcm_bytes_is_a_value_error(encode) -> None:
    with pytest.raises(ValueError, match="even number of bytes"):
        encode(b"\x00\x01\x02")


@pytest.mark.parametrize("encode", [g711.ulaw_encode, g711.alaw_encode])
def test_wrong_pcm_dtype_is_a_type_error(encode) -> None:
    with pytest.raises(TypeError, match="int16"):
        encode(np.zeros(4, dtype=np.int32))
    with pytest.raises(TypeError, match="int16"):
        encode(np.zeros(4, dtype=np.float32))


@pytest.mark.parametrize("decode", [g711.ulaw_decode, g711.alaw_decode])
def test_wrong_code_dtype_is_a_type_error(decode) -> None:
    with pytest.raises(TypeError, match="uint8"):
        decode(np.zeros(4, dtype=np.int16))


def test_out_buffers_are_filled_and_returned() -> None:
    codes = np.empty(len(ALL_INT16), dtype=np.uint8)
    got = g711.ulaw_encode(ALL_INT16, out=codes)
    assert got is codes
    np.testing.assert_array_equal(codes, g711.ulaw_encode(ALL_INT16))

    samples = np.empty(256, dtype=np.int16)
    got16 = g711.alaw_decode(ALL_CODES, out=samples)
    assert got16 is samples
    np.testing.assert_array_equal(samples, g711.alaw_decode(ALL_CODES))


def test_empty_input() -> None:
    assert g711.ulaw_encode(b"").size == 0
    assert g711.ulaw_decode(b"").size == 0
