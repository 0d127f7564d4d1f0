"""DTMF tones: what the agent plays is what a keypad decoder hears, also after μ-law."""

from __future__ import annotations

import numpy as np
import pytest

from livecall.audio.dtmf import DTMF_CHARS, detect_dtmf, generate_dtmf
from livecall.audio.g711 import ulaw_decode, ulaw_encode


def through_ulaw(pcm: np.ndarray) -> np.ndarray:
    return ulaw_decode(ulaw_encode(pcm))


@pytest.mark.parametrize("digit", list(DTMF_CHARS))
def test_each_digit_survives_ulaw(digit: str) -> None:
    assert detect_dtmf(through_ulaw(generate_dtmf(digit))) == digit


def test_all_sixteen_in_one_sequence_with_repeats_and_pauses() -> None:
    digits = "0123456789*#ABCD" + "11w##W00"
    pcm = generate_dtmf(digits)
    assert pcm.dtype == np.int16
    assert detect_dtmf(through_ulaw(pcm)) == digits.replace("w", "").replace("W", "")
    assert detect_dtmf(through_ulaw(pcm).tobytes()) == "0123456789*#ABCD11##00"


def test_timing_tone_gap_and_pauses() -> None:
    assert len(generate_dtmf("1")) == 800 + 480  # 100 ms tone + 60 ms gap at 8 kHz
    assert len(generate_dtmf("w")) == 4000  # 500 ms
    assert len(generate_dtmf("W")) == 8000
    assert len(generate_dtmf("")) == 0
    assert len(generate_dtmf("5", 16000)) == 2 * (800 + 480)


@pytest.mark.parametrize("rate", [16000, 24000])
def test_other_rates(rate: int) -> None:
    assert detect_dtmf(generate_dtmf("159#", rate), rate) == "159#"


def test_quiet_tones_in_noise() -> None:
    rng = np.random.default_rng(1)
    pcm = generate_dtmf("2580", level_dbfs=-24).astype(np.int32)
    pcm += rng.normal(0, 60, len(pcm)).astype(np.int32)  # ~ -55 dBFS of hiss
    assert detect_dtmf(through_ulaw(pcm.astype(np.int16))) == "2580"


def test_speech_like_audio_and_silence_are_not_keys() -> None:
    rng = np.random.default_rng(2)
    t = np.arange(16000) / 8000
    voice = 6000 * np.sin(2 * np.pi * 220 * t) + 3000 * np.sin(2 * np.pi * 660 * t)
    assert detect_dtmf(voice.astype(np.int16)) == ""
    assert detect_dtmf((rng.normal(0, 4000, 16000)).astype(np.int16)) == ""
    assert detect_dtmf(np.zeros(8000, dtype=np.int16)) == ""
    assert detect_dtmf(np.zeros(10, dtype=np.int16)) == ""
    # a single row tone is not a key
    assert detect_dtmf((8000 * np.sin(2 * np.pi * 697 * t)).astype(np.int16)) == ""


def test_bad_digits_are_refused() -> None:
    with pytest.raises(ValueError, match="not DTMF"):
        generate_dtmf("12x")
