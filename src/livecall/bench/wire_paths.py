"""Every carrier adapter's codec path, driven sans I/O for the quality benchmark.

For one carrier and codec, `run_path` does what a call does to audio, with the product's own
objects and nothing in their place:

* caller -> model: the caller's audio is coded as the carrier codes it (reference G.711, or
  L16 in the wire's byte order), framed as the carrier frames it (JSON + base64, or binary),
  fed to the adapter's real `receive`, and its `CallerAudio` through the core's real
  `InboundTranscoder`, built from the `CallStarted` format exactly as the bridge builds it.
* model -> caller: the model's 24 kHz audio, cut into uneven network chunks (odd byte counts
  included), goes through the core's real `OutboundTranscoder` and the adapter's real
  `play` / `mark` / `flush`, in the order and alignment the bridge uses (whole carrier frames
  while a turn runs, a mark every ~100 ms, the transcoder's tail and a mark at the turn's end).
  The frames that come out are decoded as the carrier would decode them (JSON, base64, byte
  order, reference G.711) into what it plays.

Carriers with routes are also measured through real calls (`livecall.bench.quality`); this
module covers every codec each adapter carries, routes or not.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from livecall.audio.transcode import InboundTranscoder, OutboundTranscoder, encoding_of
from livecall.bench.g711_ref import (
    alaw_decode_ref,
    alaw_encode_ref,
    ulaw_decode_ref,
    ulaw_encode_ref,
)
from livecall.call.agent_output import MARK_EVERY_SAMPLES
from livecall.carriers.base import (
    CallerAudio,
    CallStarted,
    CarrierStream,
    Frame,
    MediaFormat,
)

__all__ = ["PATHS", "PathRun", "WirePath", "decode_wire", "encode_wire", "run_path"]

Int16 = npt.NDArray[np.int16]


def encode_wire(pcm: npt.ArrayLike, fmt: MediaFormat, *, big_endian: bool = False) -> bytes:
    """int16 samples as the carrier puts them on the wire (reference G.711, or L16)."""
    x = np.clip(np.round(np.asarray(pcm, dtype=np.float64)), -32768, 32767).astype(np.int16)
    if fmt.encoding == "mulaw":
        return ulaw_encode_ref(x).tobytes()
    if fmt.encoding == "alaw":
        return alaw_encode_ref(x).tobytes()
    return x.astype(">i2" if big_endian else "<i2").tobytes()


def decode_wire(data: bytes, fmt: MediaFormat, *, big_endian: bool = False) -> Int16:
    """Wire bytes -> int16 samples, as the carrier decodes what it plays."""
    if fmt.encoding == "mulaw":
        return ulaw_decode_ref(np.frombuffer(data, dtype=np.uint8))
    if fmt.encoding == "alaw":
        return alaw_decode_ref(np.frombuffer(data, dtype=np.uint8))
    return np.frombuffer(data, dtype=">i2" if big_endian else "<i2").astype(np.int16)


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _json(msg: dict[str, Any]) -> str:
    return orjson.dumps(msg).decode()


# ----------------------------------------------------------------------------- the carriers' side


def _twilio_start(fmt: MediaFormat) -> list[Frame]:
    start = {
        "accountSid": "AC" + "0" * 32,
        "streamSid": "MZ" + "1" * 32,
        "callSid": "CA" + "2" * 32,
        "tracks": ["inbound"],
        "customParameters": {},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    return [
        '{"event":"connected","protocol":"Call","version":"1.0.0"}',
        _json({"event": "start", "sequenceNumber": "1", "streamSid": start["streamSid"],
               "start": start}),
    ]  # fmt: skip


def _twilio_media(payload: bytes, n: int) -> Frame:
    media = {
        "track": "inbound",
        "chunk": str(n),
        "timestamp": str(20 * n),
        "payload": _b64(payload),
    }
    return _json({"event": "media", "sequenceNumber": str(n + 1), "streamSid": "MZ" + "1" * 32,
                  "media": media})  # fmt: skip


_TELNYX_CODEC = {"mulaw": "PCMU", "alaw": "PCMA", "l16": "L16"}


def _telnyx_start(fmt: MediaFormat) -> list[Frame]:
    start = {
        "user_id": "3e6f995f-85f7-4705-9741-53b116d28237",
        "call_control_id": "v3:quality-bench",
        "from": "+13122010094",
        "to": "+13122123456",
        "custom_parameters": {},
        "media_format": {"encoding": _TELNYX_CODEC[fmt.encoding],
                         "sample_rate": fmt.sample_rate, "channels": 1},
    }  # fmt: skip
    return [
        '{"event":"connected","version":"1.0.0"}',
        _json({"event": "start", "sequence_number": "1", "stream_id": "s-1", "start": start}),
    ]


def _telnyx_media(payload: bytes, n: int) -> Frame:
    media = {"track": "inbound", "chunk": str(n), "timestamp": str(20 * (n - 1)),
             "payload": _b64(payload)}  # fmt: skip
    return _json({"event": "media", "sequence_number": str(n + 1), "stream_id": "s-1",
                  "media": media})  # fmt: skip


def _plivo_start(fmt: MediaFormat) -> list[Frame]:
    ctype = "audio/x-mulaw" if fmt.encoding == "mulaw" else "audio/x-l16"
    start = {
        "callId": "quality-bench-call",
        "streamId": "quality-bench-stream",
        "accountId": "MA" + "X" * 18,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": ctype, "sampleRate": fmt.sample_rate},
    }
    return [_json({"event": "start", "sequenceNumber": 1, "start": start, "extra_headers": ""})]


def _plivo_media(payload: bytes, n: int) -> Frame:
    media = {"track": "inbound", "timestamp": str(1705312200000 + 20 * (n - 1)), "chunk": n,
             "payload": _b64(payload)}  # fmt: skip
    return _json({"event": "media", "sequenceNumber": n + 1, "streamId": "quality-bench-stream",
                  "media": media})  # fmt: skip


def _vonage_start(fmt: MediaFormat) -> list[Frame]:
    return [_json({"event": "websocket:connected",
                   "content-type": f"audio/l16;rate={fmt.sample_rate}"})]  # fmt: skip


def _vonage_media(payload: bytes, n: int) -> Frame:
    return payload  # one binary 20 ms frame, little-endian L16


def _exotel_start(fmt: MediaFormat) -> list[Frame]:
    start = {
        "stream_sid": "quality-bench-stream",
        "call_sid": "quality-bench-call",
        "account_sid": "acme1",
        "custom_parameters": {},
        "media_format": {"encoding": "audio/x-raw", "sample_rate": str(fmt.sample_rate),
                         "bit_rate": "16"},
    }  # fmt: skip
    return [
        '{"event":"connected"}',
        _json({"event": "start", "sequence_number": "1", "stream_sid": start["stream_sid"],
               "start": start}),
    ]  # fmt: skip


def _exotel_media(payload: bytes, n: int) -> Frame:
    media = {"chunk": str(n), "timestamp": str(100 * n), "payload": _b64(payload)}
    return _json({"event": "media", "sequence_number": str(n + 1),
                  "stream_sid": "quality-bench-stream", "media": media})  # fmt: skip


def _played_payload(frame: Frame) -> bytes | None:
    """The audio in one frame livecall sent (None for marks, clears and the like)."""
    if isinstance(frame, bytes):
        return frame  # Vonage: a binary frame is audio
    msg = orjson.loads(frame)
    if msg.get("event") in ("media", "playAudio"):
        return binascii.a2b_base64(msg["media"]["payload"], strict_mode=True)
    return None


@dataclass(frozen=True)
class WirePath:
    """One carrier and codec: how to make its adapter and speak its side of the wire."""

    carrier: str
    inbound: MediaFormat  # what the caller's audio is on the wire
    make: Callable[[], CarrierStream]
    start: Callable[[MediaFormat], list[Frame]]
    media: Callable[[bytes, int], Frame]
    frame_ms: int = 20  # how much caller audio one inbound frame carries
    big_endian: bool = False  # L16 byte order on this carrier's wire (RTP: network order)
    note: str = ""

    @property
    def codec(self) -> str:
        def name(f: MediaFormat) -> str:
            return f"{'L16' if f.encoding == 'l16' else f.encoding} {f.sample_rate // 1000}k"

        out = self.make().media_format
        inb = name(self.inbound)
        return inb if out == self.inbound else f"{inb} in / {name(out)} out"


def _paths() -> tuple[WirePath, ...]:
    from livecall.carriers.exotel import ExotelStream
    from livecall.carriers.plivo import PlivoStream
    from livecall.carriers.telnyx import TelnyxStream
    from livecall.carriers.telnyx.wire import format_for
    from livecall.carriers.twilio import TwilioCarrierStream
    from livecall.carriers.vonage import VonageStream

    ulaw, alaw = MediaFormat("mulaw", 8000), MediaFormat("alaw", 8000)
    l16 = {r: MediaFormat("l16", r) for r in (8000, 16000, 24000)}
    big = 64 * 1024
    out: list[WirePath] = [
        WirePath("twilio", ulaw, lambda: TwilioCarrierStream(max_frame_bytes=big),
                 _twilio_start, _twilio_media),
        WirePath("telnyx", ulaw, lambda: TelnyxStream(playback_format=format_for("PCMU")),
                 _telnyx_start, _telnyx_media),
        WirePath("telnyx", alaw, lambda: TelnyxStream(playback_format=format_for("PCMA")),
                 _telnyx_start, _telnyx_media),
        WirePath("telnyx", l16[16000], lambda: TelnyxStream(playback_format=format_for("PCMU")),
                 _telnyx_start, _telnyx_media, big_endian=True,
                 note="the call's own L16 arrives when Telnyx cannot transcode; plays PCMU"),
    ]  # fmt: skip
    for fmt in (ulaw, l16[8000], l16[16000]):
        out.append(
            WirePath("plivo", fmt, partial(PlivoStream, media_format=fmt),
                     _plivo_start, _plivo_media)
        )  # fmt: skip
    for rate in (16000, 8000, 24000):
        out.append(
            WirePath("vonage", l16[rate], partial(VonageStream, media_format=l16[rate]),
                     _vonage_start, _vonage_media)
        )  # fmt: skip
    for rate in (16000, 8000, 24000):  # EXOTEL_SAMPLE_RATE's default first
        out.append(
            WirePath("exotel", l16[rate], partial(ExotelStream, sample_rate=rate),
                     _exotel_start, _exotel_media, frame_ms=100)
        )  # fmt: skip
    return tuple(out)


PATHS: tuple[WirePath, ...] = _paths()
"""Every adapter path measured: Twilio μ-law; Telnyx μ-law, A-law, L16 16k in; Plivo μ-law,
L16 8k, 16k; Vonage L16 16k, 8k, 24k; Exotel L16 16k, 8k, 24k."""


# ----------------------------------------------------------------------------- driving


@dataclass
class PathRun:
    """What one path did: the audio the model got, what the carrier played, and proof of work."""

    path: WirePath
    started: CallStarted
    stream_type: str
    model_received: Int16  # 16 kHz, what Gemini would get
    played: Int16  # at the playback rate, what the carrier plays
    playback: MediaFormat
    frames_in: int = 0
    frames_out: int = 0
    marks: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


def _chunks(data: bytes, rng: np.random.Generator) -> list[bytes]:
    """Network-sized pieces of model audio: 10-120 ms, odd byte counts included."""
    out, i = [], 0
    while i < len(data):
        n = int(rng.integers(480, 5760))
        out.append(data[i : i + n])
        i += n
    return out


def run_path(
    path: WirePath,
    caller_pcm: Sequence[Int16],
    caller_rate: int,
    agent_pcm: Sequence[Int16],
    *,
    seed: int = 0,
    gap_ms: int = 400,
) -> PathRun:
    """Caller clips through the adapter to the model; model clips (24 kHz, one turn each)
    through the adapter to what the carrier plays. `caller_pcm` is at `caller_rate`; each is
    put on the wire at the carrier's rate (soxr VHQ when the rates differ) with silence after."""
    import soxr

    stream = path.make()
    started: CallStarted | None = None
    for frame in path.start(path.inbound):
        event = stream.receive(frame)
        if isinstance(event, CallStarted):
            started = event
    if started is None or started.media_format != path.inbound:
        raise AssertionError(f"{path.carrier}: no start for {path.inbound} ({started})")

    # caller -> model, exactly as the bridge builds its transcoder from the start
    fmt = started.media_format
    inbound = InboundTranscoder(16000, encoding_of(fmt.encoding), fmt.sample_rate)
    gap = np.zeros(fmt.sample_rate * gap_ms // 1000)
    signal = [gap]
    for pcm in caller_pcm:
        x = np.asarray(pcm, dtype=np.float64)
        if caller_rate != fmt.sample_rate:
            x = soxr.resample(x, caller_rate, fmt.sample_rate, quality="VHQ")
        signal += [x, gap]
    wire = encode_wire(np.concatenate(signal), fmt, big_endian=path.big_endian)
    step = fmt.bytes_per_20ms * path.frame_ms // 20
    received: list[bytes] = []
    frames_in = 0
    for n, i in enumerate(range(0, len(wire) - len(wire) % step, step), start=1):
        event = stream.receive(path.media(wire[i : i + step], n))
        if not isinstance(event, CallerAudio):
            raise AssertionError(f"{path.carrier}: media frame {n} gave {event!r}")
        received.append(inbound.decode(event.audio))
        frames_in += 1
    model_received = np.frombuffer(b"".join(received), dtype="<i2").astype(np.int16)

    # model -> caller, in the bridge's order: transcode, align to whole frames, play, mark
    playback = stream.media_format
    outbound = OutboundTranscoder(24000, encoding_of(playback.encoding), playback.sample_rate)
    align = playback.bytes_per_20ms * stream.capabilities.frame_ms // 20
    unit = (2 if playback.encoding == "l16" else 1) * playback.sample_rate // 8000
    sent: list[Frame] = []
    marks = 0
    rng = np.random.default_rng(seed)
    silence = encode_wire(np.zeros(playback.sample_rate * gap_ms // 1000), playback)
    for turn, pcm in enumerate(agent_pcm):
        held, unmarked = b"", 0
        for piece in _chunks(np.asarray(pcm, dtype="<i2").tobytes(), rng):
            coded = outbound.encode(piece)
            if align:
                coded = held + coded
                cut = len(coded) - len(coded) % align
                coded, held = coded[:cut], coded[cut:]
            if coded:
                sent += stream.play(coded)
            unmarked += len(coded) // unit
            if unmarked >= MARK_EVERY_SAMPLES:
                marks += 1
                sent += stream.mark(f"t{turn}-m{marks}")
                unmarked = 0
        tail = held + outbound.flush()
        if tail:
            sent += stream.play(tail)
        marks += 1
        sent += stream.mark(f"t{turn}-end")
        sent += stream.flush()
        sent += stream.play(silence)  # the pause between turns, as the caller hears it
        sent += stream.flush()
    played_bytes = b"".join(p for p in map(_played_payload, sent) if p is not None)
    if playback.encoding == "l16" and path.big_endian:
        played = decode_wire(played_bytes, playback, big_endian=True)
    else:
        played = decode_wire(played_bytes, playback)
    kinds: dict[str, int] = {}
    for frame in sent:
        if isinstance(frame, bytes):
            kind = "binary"
        else:
            msg = orjson.loads(frame)
            kind = str(msg.get("event") or msg.get("action"))
        kinds[kind] = kinds.get(kind, 0) + 1
    return PathRun(
        path=path,
        started=started,
        stream_type=type(stream).__name__,
        model_received=model_received,
        played=played,
        playback=playback,
        frames_in=frames_in,
        frames_out=sum(1 for p in map(_played_payload, sent) if p is not None),
        marks=marks,
        kinds=kinds,
    )
