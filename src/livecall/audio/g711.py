"""G.711 μ-law and A-law on numpy arrays, without `audioop` (gone in Python 3.13).

Both directions are table lookups built once at import from the ITU-T G.711 segment rules
(as in the classic Sun reference `g711.c`, which `audioop` also follows): encoding indexes a
65,536-entry table by the int16 sample's bit pattern, decoding a 256-entry table by the code.
A lookup is a single `ndarray.take`, with an optional `out=` buffer so the per-frame path can
run without allocating. It is called as a method with mode="clip" (indices can never be out of
range here): the `np.take` function with the default mode="raise" costs ~1 µs more per
20 ms frame (2.2 vs 1.2 µs for 160 samples), because it dispatches through Python and buffers
`out=` internally.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "ALAW_DECODE_TABLE",
    "ALAW_ENCODE_TABLE",
    "ULAW_DECODE_TABLE",
    "ULAW_ENCODE_TABLE",
    "alaw_decode",
    "alaw_encode",
    "ulaw_decode",
    "ulaw_encode",
]

Int16Array = npt.NDArray[np.int16]
UInt8Array = npt.NDArray[np.uint8]

_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # in the 14-bit domain
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def _all_int16() -> npt.NDArray[np.int32]:
    """Every int16 value, ordered by its unsigned bit pattern (index = sample.view(uint16))."""
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int32)


def _build_ulaw_encode() -> UInt8Array:
    x = _all_int16() >> 2  # 16-bit linear -> 14-bit, arithmetic shift as in the reference
    mask = np.where(x < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(x), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_ULAW_SEG_END, mag, side="left")  # first seg with mag <= end
    shifted = mag >> np.minimum(seg + 1, 31)
    code = (np.minimum(seg, 7) << 4) | (shifted & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _build_ulaw_decode() -> Int16Array:
    u = (~np.arange(256, dtype=np.int32)) & 0xFF
    t = ((u & 0x0F) << 3) + _ULAW_BIAS
    t = t << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def _build_alaw_encode() -> UInt8Array:
    x = _all_int16() >> 3  # 16-bit linear -> 13-bit
    negative = x < 0
    mask = np.where(negative, 0x55, 0xD5)
    mag = np.where(negative, -x - 1, x)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left")
    quant = np.where(seg < 2, mag >> 1, mag >> np.minimum(seg, 31)) & 0x0F
    code = (np.minimum(seg, 7) << 4) | quant
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _build_alaw_decode() -> Int16Array:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


ULAW_ENCODE_TABLE: UInt8Array = _build_ulaw_encode()
ULAW_DECODE_TABLE: Int16Array = _build_ulaw_decode()
ALAW_ENCODE_TABLE: UInt8Array = _build_alaw_encode()
ALAW_DECODE_TABLE: Int16Array = _build_alaw_decode()
for _table in (ULAW_ENCODE_TABLE, ULAW_DECODE_TABLE, ALAW_ENCODE_TABLE, ALAW_DECODE_TABLE):
    _table.setflags(write=False)


_INT16 = np.dtype(np.int16)
_UINT8 = np.dtype(np.uint8)
_BYTES_LIKE = (bytes, bytearray, memoryview)


def _as_int16(pcm: Int16Array | bytes | bytearray | memoryview) -> Int16Array:
    if isinstance(pcm, np.ndarray):
        if pcm.dtype is not _INT16 and pcm.dtype != np.int16:
            raise TypeError(f"PCM samples must be int16, got {pcm.dtype}")
        return pcm
    if isinstance(pcm, _BYTES_LIKE):
        nbytes = pcm.nbytes if isinstance(pcm, memoryview) else len(pcm)
        if nbytes % 2:
            raise ValueError(f"PCM16 input must have an even number of bytes, got {nbytes}")
        return np.frombuffer(pcm, dtype=np.int16)
    raise TypeError(f"PCM samples must be an int16 array or bytes, got {type(pcm).__name__}")


def _as_codes(codes: UInt8Array | bytes | bytearray | memoryview) -> UInt8Array:
    if isinstance(codes, np.ndarray):
        if codes.dtype is not _UINT8 and codes.dtype != np.uint8:
            raise TypeError(f"G.711 codes must be uint8, got {codes.dtype}")
        return codes
    if isinstance(codes, _BYTES_LIKE):
        return np.frombuffer(codes, dtype=np.uint8)
    raise TypeError(f"G.711 codes must be a uint8 array or bytes, got {type(codes).__name__}")


def ulaw_encode(
    pcm: Int16Array | bytes | bytearray | memoryview, out: UInt8Array | None = None
) -> UInt8Array:
    """int16 samples (array or PCM16LE bytes) -> μ-law codes."""
    return ULAW_ENCODE_TABLE.take(_as_int16(pcm).view(np.uint16), out=out, mode="clip")


def ulaw_decode(
    codes: UInt8Array | bytes | bytearray | memoryview, out: Int16Array | None = None
) -> Int16Array:
    """μ-law codes (array or bytes) -> int16 samples."""
    return ULAW_DECODE_TABLE.take(_as_codes(codes), out=out, mode="clip")


def alaw_encode(
    pcm: Int16Array | bytes | bytearray | memoryview, out: UInt8Array | None = None
) -> UInt8Array:
    """int16 samples (array or PCM16LE bytes) -> A-law codes."""
    return ALAW_ENCODE_TABLE.take(_as_int16(pcm).view(np.uint16), out=out, mode="clip")


def alaw_decode(
    codes: UInt8Array | bytes | bytearray | memoryview, out: Int16Array | None = None
) -> Int16Array:
    """A-law codes (array or bytes) -> int16 samples."""
    return ALAW_DECODE_TABLE.take(_as_codes(codes), out=out, mode="clip")
