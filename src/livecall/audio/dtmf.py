"""DTMF: make keypad tones to play into a call, and hear which keys were played.

The agent navigates phone menus on outbound calls by playing tones into the media stream
(`generate_dtmf`); the simulator checks what reached the far end with `detect_dtmf`, so
the two are written to be each other's test. Frequencies are the ITU-T Q.23 pairs.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "COL_FREQS",
    "DTMF_CHARS",
    "KEYPAD",
    "ROW_FREQS",
    "detect_dtmf",
    "generate_dtmf",
]

ROW_FREQS: tuple[float, ...] = (697.0, 770.0, 852.0, 941.0)
COL_FREQS: tuple[float, ...] = (1209.0, 1336.0, 1477.0, 1633.0)
KEYPAD: tuple[str, ...] = ("123A", "456B", "789C", "*0#D")
DTMF_CHARS = "0123456789*#ABCD"
PAUSE_MS = {"w": 500, "W": 1000}

_DIGIT_FREQS: dict[str, tuple[float, float]] = {
    key: (ROW_FREQS[r], COL_FREQS[c]) for r, row in enumerate(KEYPAD) for c, key in enumerate(row)
}


def generate_dtmf(
    digits: str,
    rate: int = 8000,
    *,
    tone_ms: int = 100,
    gap_ms: int = 60,
    level_dbfs: float = -9.0,
    ramp_ms: float = 3.0,
) -> npt.NDArray[np.int16]:
    """int16 samples playing `digits` (0-9 * # A-D; `w` pauses 500 ms, `W` 1 s).

    Each tone is the row + column sine pair, each at `level_dbfs` (so the sum stays clear of
    clipping, also after μ-law), with short raised-cosine edges so the keys do not click, and
    followed by `gap_ms` of silence so a repeated key is heard twice.
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    bad = sorted({ch for ch in digits if ch not in _DIGIT_FREQS and ch not in PAUSE_MS})
    if bad:
        raise ValueError(f"not DTMF digits: {''.join(bad)!r} (allowed: 0-9 * # A-D w W)")
    n_tone = round(rate * tone_ms / 1000)
    n_gap = round(rate * gap_ms / 1000)
    amplitude = 32767.0 * 10 ** (level_dbfs / 20)
    t = np.arange(n_tone) / rate
    envelope = np.ones(n_tone)
    n_ramp = min(round(rate * ramp_ms / 1000), n_tone // 2)
    if n_ramp > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n_ramp) / n_ramp)
        envelope[:n_ramp] = ramp
        envelope[n_tone - n_ramp :] = ramp[::-1]

    pieces: list[npt.NDArray[np.float64]] = []
    for ch in digits:
        if ch in PAUSE_MS:
            pieces.append(np.zeros(round(rate * PAUSE_MS[ch] / 1000)))
            continue
        low, high = _DIGIT_FREQS[ch]
        tone = amplitude * envelope * (np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t))
        pieces.append(tone)
        pieces.append(np.zeros(n_gap))
    if not pieces:
        return np.zeros(0, dtype=np.int16)
    return np.clip(np.rint(np.concatenate(pieces)), -32768, 32767).astype(np.int16)


def _block_powers(x: npt.NDArray[np.float64], rate: int, n: int) -> npt.NDArray[np.float64]:
    """Goertzel power at the 8 DTMF frequencies for every `n`-sample block, all at once.

    Goertzel's recursion computes one DFT bin at an arbitrary frequency; the same value is a
    dot product with a complex exponential, so every block and frequency is one matrix product.
    """
    blocks = x[: (len(x) // n) * n].reshape(-1, n)
    freqs = np.array(ROW_FREQS + COL_FREQS)
    phase = 2 * np.pi * np.outer(np.arange(n), freqs) / rate  # (n, 8)
    re = blocks @ np.cos(phase)
    im = blocks @ np.sin(phase)
    return re * re + im * im  # (blocks, 8)


def detect_dtmf(
    pcm: npt.NDArray[np.int16] | bytes | bytearray | memoryview,
    rate: int = 8000,
    *,
    min_level_dbfs: float = -36.0,
    max_twist_db: float = 8.0,
    min_blocks: int = 2,
) -> str:
    """The keys played in `pcm` (int16 samples or PCM16LE bytes), in order.

    Works on ~25.6 ms blocks (205 samples at 8 kHz, the classic choice). A block holds a key
    when one row and one column frequency carry most of its energy, each clearly above the
    other frequencies of its group, within `max_twist_db` of each other and loud enough. A key
    counts once it lasts `min_blocks` blocks; it must stop before the same key counts again.
    """
    if isinstance(pcm, bytes | bytearray | memoryview):
        pcm = np.frombuffer(pcm, dtype=np.int16)
    n = max(round(rate * 0.0256), 16)
    x = pcm.astype(np.float64)
    if len(x) < n:
        return ""
    power = _block_powers(x, rate, n)
    blocks = x[: len(power) * n].reshape(-1, n)
    energy = np.einsum("ij,ij->i", blocks, blocks)  # sum of squares per block

    rows, cols = power[:, :4], power[:, 4:]
    r_idx, c_idx = rows.argmax(axis=1), cols.argmax(axis=1)
    r_pow = rows.max(axis=1)
    c_pow = cols.max(axis=1)
    r_second = np.sort(rows, axis=1)[:, -2]
    c_second = np.sort(cols, axis=1)[:, -2]
    # A sine of amplitude A over n samples gives power (A*n/2)^2 and energy A^2*n/2,
    # so power * 2/n is the energy that frequency explains.
    explained = (r_pow + c_pow) * 2.0 / n
    level = 10 * np.log10(np.maximum(energy / n, 1e-12) / 32768.0**2)
    twist = 10 * np.log10(np.maximum(r_pow, 1e-12) / np.maximum(c_pow, 1e-12))
    ok = (
        (level > min_level_dbfs)
        & (explained > 0.7 * energy)
        & (r_pow > 6.0 * r_second)
        & (c_pow > 6.0 * c_second)
        & (np.abs(twist) < max_twist_db)
    )
    keys = np.array([KEYPAD[r][c] for r in range(4) for c in range(4)])
    block_keys = np.where(ok, keys[r_idx * 4 + c_idx], "")

    out: list[str] = []
    current, run, emitted = "", 0, False
    for key in block_keys:
        if key == current:
            run += 1
        else:
            current, run, emitted = str(key), 1, False
        if current and not emitted and run >= min_blocks:
            out.append(current)
            emitted = True
    return "".join(out)
