"""The whole per-frame codec path between a carrier stream and the model, one object per direction.

Inbound (caller -> model): G.711 8 kHz (μ-law or A-law) or L16 at 8/16/24 kHz -> PCM16LE at the
model's input rate (16 kHz).
Outbound (model -> caller): PCM16LE at the model's output rate (24 kHz) -> G.711 8 kHz, or L16
(little-endian) at the carrier's rate. The carrier adapter does the wire's framing (base64, JSON,
byte order); this module only codes samples.

Every 20 ms frame of every call comes through here, so each direction is fused into as few numpy
calls as possible (~6 µs per frame, see docs/audio.md): G.711 codes are decoded by a table lookup
straight into the resampler's float history, and the resampler's output (which already carries
the rounding bias) is rounded, saturated and G.711-encoded by one lookup in a 65,536-entry table.
The result is identical, sample for sample, to composing `g711` and `StreamResampler` by hand
(the tests check this); it is only faster.
"""

from __future__ import annotations

import binascii

import numpy as np
import numpy.typing as npt

from livecall.audio import g711
from livecall.audio.resample import SATURATE_INT16, StreamResampler

__all__ = [
    "ENCODINGS",
    "InboundTranscoder",
    "OutboundTranscoder",
    "encoding_of",
    "from_ulaw",
    "pcm_of",
]

CARRIER_RATE = 8000

ENCODINGS = ("audio/x-mulaw", "audio/x-alaw", "audio/x-l16")
"""Carrier-side encodings: G.711 μ-law (Twilio), G.711 A-law, and PCM16 little-endian."""
L16_RATES = (8000, 16000, 24000)
_BY_NAME = {"mulaw": "audio/x-mulaw", "alaw": "audio/x-alaw", "l16": "audio/x-l16"}


def encoding_of(name: str) -> str:
    """A `MediaFormat.encoding` ("mulaw", "alaw", "l16") as this module's encoding name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unsupported carrier encoding {name!r}") from None


# Code -> float64 sample, so decoding writes straight into the resampler's history buffer.
_DECODE: dict[str, npt.NDArray[np.float64]] = {
    "audio/x-mulaw": g711.ULAW_DECODE_TABLE.astype(np.float64),
    "audio/x-alaw": g711.ALAW_DECODE_TABLE.astype(np.float64),
}
# Biased index (int16 sample + 32768) -> code; see resample.BIAS. Index v is the int16 whose bit
# pattern is v ^ 0x8000, which is the encode table rotated by half its length.
_ENCODE: dict[str, npt.NDArray[np.uint8] | npt.NDArray[np.int16]] = {
    "audio/x-mulaw": np.roll(g711.ULAW_ENCODE_TABLE, 32768),
    "audio/x-alaw": np.roll(g711.ALAW_ENCODE_TABLE, 32768),
    "audio/x-l16": SATURATE_INT16,
}
for _decode in _DECODE.values():
    _decode.setflags(write=False)
for _encode in _ENCODE.values():
    _encode.setflags(write=False)


def _check_encoding(encoding: str, rate: int = CARRIER_RATE) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unsupported carrier encoding {encoding!r}; use one of {ENCODINGS}")
    if rate not in (L16_RATES if encoding == "audio/x-l16" else (CARRIER_RATE,)):
        raise ValueError(f"{encoding} at {rate} Hz is not supported")


class InboundTranscoder:
    """Caller audio (8 kHz G.711, or L16 at `in_rate`, as the carrier sends it) -> model PCM16LE
    at `out_rate`."""

    def __init__(
        self, out_rate: int = 16000, encoding: str = "audio/x-mulaw", in_rate: int = CARRIER_RATE
    ) -> None:
        _check_encoding(encoding, in_rate)
        self.encoding = encoding
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._rs = StreamResampler(in_rate, out_rate)
        self._table: npt.NDArray[np.float64] | None = _DECODE.get(encoding)
        self._step = self._rs._step_in

    def decode_payload(self, payload_b64: str | bytes) -> bytes:
        """A media message's base64 `payload` -> PCM16LE at `out_rate`."""
        try:
            raw = binascii.a2b_base64(payload_b64, strict_mode=True)
        except (binascii.Error, ValueError, TypeError) as exc:
            raise ValueError(f"media payload is not valid base64: {exc}") from None
        return self.decode(raw)

    def decode(self, ulaw: bytes | bytearray | memoryview) -> bytes:
        """Raw carrier bytes (μ-law by default, see `encoding`) -> PCM16LE at `out_rate`."""
        rs = self._rs
        table = self._table
        if table is None:  # L16: whole little-endian samples
            nbytes = ulaw.nbytes if isinstance(ulaw, memoryview) else len(ulaw)
            if nbytes % 2:
                raise ValueError(
                    f"audio/x-l16 payload must have an even number of bytes (whole 16-bit "
                    f"samples), got {nbytes}"
                )
            return rs.process(np.frombuffer(ulaw, dtype="<i2")).tobytes()
        codes = np.frombuffer(ulaw, dtype=np.uint8)
        n = len(codes)
        if n > self._step:  # longer than one internal step: rare, take the composed path
            return rs.process(table.take(codes).astype(np.int16)).tobytes()
        table.take(codes, out=rs._reserve(n), mode="clip")
        return SATURATE_INT16.take(rs._advance(n), mode="clip").tobytes()

    def reset(self) -> None:
        """Drop the resampler's history (e.g. the stream restarted)."""
        self._rs.reset()


class OutboundTranscoder:
    """Model PCM16LE at `in_rate` -> caller audio at `out_rate` (G.711 μ-law 8 kHz by default;
    L16 little-endian at 8, 16 or 24 kHz)."""

    def __init__(
        self, in_rate: int = 24000, encoding: str = "audio/x-mulaw", out_rate: int = CARRIER_RATE
    ) -> None:
        _check_encoding(encoding, out_rate)
        self.encoding = encoding
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._rs = StreamResampler(in_rate, out_rate)
        self._table = _ENCODE[encoding]
        self._step = self._rs._step_in
        self._carry = b""

    def encode(self, pcm: bytes | bytearray | memoryview) -> bytes:
        """PCM16LE at `in_rate`, any size -> carrier bytes at `out_rate`.

        Network chunks may split a sample: an odd trailing byte is kept for the next call.
        """
        if isinstance(pcm, memoryview) and pcm.format != "B":
            pcm = pcm.cast("B")
        if self._carry:
            pcm = self._carry + pcm
            self._carry = b""
        if len(pcm) & 1:
            self._carry = bytes(pcm[-1:])
            pcm = pcm[:-1]
        x = np.frombuffer(pcm, dtype="<i2")
        rs = self._rs
        n = len(x)
        if n > self._step:
            return b"".join(
                self._encode_step(x[lo : lo + self._step]) for lo in range(0, n, self._step)
            )
        rs._reserve(n)[...] = x
        return self._table.take(rs._advance(n), mode="clip").tobytes()

    def encode_payload(self, pcm: bytes | bytearray | memoryview) -> str:
        """`encode`, as the base64 text a Twilio `media` message carries."""
        return binascii.b2a_base64(self.encode(pcm), newline=False).decode("ascii")

    def flush(self) -> bytes:
        """End of the agent's turn: the last ~3 ms the resampler holds, then a fresh start.

        A carried half sample is dropped: the turn is over, no second half will come.
        """
        self._carry = b""
        tail = self._rs.flush()
        return self._table.take(tail.astype(np.intp) + 32768, mode="clip").tobytes()

    def reset(self) -> None:
        """Barge-in: drop everything held, including a carried byte; emit nothing."""
        self._rs.reset()
        self._carry = b""

    def _encode_step(self, x: npt.NDArray[np.int16]) -> bytes:
        rs = self._rs
        n = len(x)
        rs._reserve(n)[...] = x
        return self._table.take(rs._advance(n), mode="clip").tobytes()


def pcm_of(audio: bytes | bytearray | memoryview, encoding: str) -> npt.NDArray[np.int16]:
    """Carrier bytes in `encoding` -> int16 samples at the same rate (recordings, not per frame
    of the hot path)."""
    if encoding == "audio/x-mulaw":
        return g711.ulaw_decode(audio)
    if encoding == "audio/x-alaw":
        return g711.alaw_decode(audio)
    _check_encoding(encoding, L16_RATES[0])
    nbytes = len(audio) - len(audio) % 2
    return np.frombuffer(audio, dtype="<i2", count=nbytes // 2).astype(np.int16)


def from_ulaw(ulaw: bytes, encoding: str, rate: int = CARRIER_RATE) -> bytes:
    """μ-law 8 kHz (livecall's recorded lines and tones) -> carrier bytes in `encoding`."""
    _check_encoding(encoding, rate)
    if encoding == "audio/x-mulaw":
        return ulaw
    pcm = g711.ulaw_decode(ulaw)
    if encoding == "audio/x-alaw":
        return g711.alaw_encode(pcm).tobytes()
    if rate == CARRIER_RATE:
        return pcm.astype("<i2").tobytes()
    rs = StreamResampler(CARRIER_RATE, rate)
    out = np.concatenate((rs.process(pcm), rs.flush()))
    return out.astype("<i2").tobytes()
