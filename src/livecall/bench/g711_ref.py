"""Reference G.711 (μ-law and A-law, Sun `g711.c` rules) for the quality benchmark.

Written apart from `livecall.audio.g711` on purpose: the benchmark's *ideal* goes through
these, so a bug in the product's codec tables shows up as a Δ instead of cancelling out.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["alaw_decode_ref", "alaw_encode_ref", "ulaw_decode_ref", "ulaw_encode_ref"]

_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def ulaw_encode_ref(pcm: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """int16 -> G.711 μ-law, Sun `g711.c` `linear2ulaw` (14-bit magnitude, bias 33, clip 8159)."""
    x = np.asarray(pcm, dtype=np.int32) >> 2
    negative = x < 0
    mag = np.minimum(np.where(negative, -x, x), 8159) + 33
    seg = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 5, 0, 8)
    code = np.where(seg > 7, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0x0F))  # 8: past the top
    return np.where(negative, code ^ 0x7F, code ^ 0xFF).astype(np.uint8)


def ulaw_decode_ref(codes: npt.ArrayLike) -> npt.NDArray[np.int16]:
    """G.711 μ-law -> int16, Sun `g711.c` `ulaw2linear`."""
    u = ~np.asarray(codes, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def alaw_encode_ref(pcm: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """int16 -> G.711 A-law, Sun `g711.c` `linear2alaw` (13-bit, even bits inverted)."""
    x = np.asarray(pcm, dtype=np.int32) >> 3
    positive = x >= 0
    mag = np.where(positive, x, -x - 1)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left").astype(np.int32)  # 8: past the top
    quant = np.where(seg < 2, mag >> 1, mag >> np.maximum(seg, 1)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | quant)
    return (code ^ np.where(positive, 0xD5, 0x55)).astype(np.uint8)


def alaw_decode_ref(codes: npt.ArrayLike) -> npt.NDArray[np.int16]:
    """G.711 A-law -> int16, Sun `g711.c` `alaw2linear`."""
    a = np.asarray(codes, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = ((a & 0x0F) << 4) + np.where(seg == 0, 8, 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)
