"""Exotel AgentStream (Voicebot applet), sans I/O: check what Exotel sends, build what we send.

Exotel opens the WebSocket the Voicebot applet names and sends JSON text frames, snake case,
the stream id both at the top level and inside `start`:

    connected -> start -> media (every ~100 ms)... (dtmf, mark interleaved) -> stop

Audio is 16-bit linear PCM, little-endian, mono ("raw/slin"), 8 kHz unless the stream URL
asked for `?sample-rate=16000|24000`, base64 in `media.payload`. The stream is told the rate
its URL asked for; `start.media_format.sample_rate` says the rate Exotel actually sends, and
that wins (the audio is coded so): `rate_mismatch` keeps both when they differ, for the shell
to report, and a start without a rate is taken to be at the rate asked for. Counters arrive
as strings ("3") in one page of the docs and as numbers in another: both are taken.

Back (Voicebot only) the app sends `media`, `mark` (echoed once what came before it has
played) and `clear` (drop what is queued). Exotel's rules for played-back audio: a chunk is a
multiple of 320 bytes (a shorter last packet leaves a 20 ms gap), at least "3.2k [100ms
data]" (smaller ones risk jitter; 3200 bytes are 200 ms at 8 kHz, so both readings are
kept: 3200 bytes at 8 and 16 kHz, 4800 at 24 kHz) and at most 100 kB. `ExotelStream.play`
therefore buffers and sends chunks of that minimum; `mark` first sends what is buffered
in whole 320-byte units (the sub-320-byte rest rides with the next audio, so a mark may
be confirmed up to 20 ms early rather than padding silence into the middle of a word);
`flush` pads the rest to 320 bytes (end of a turn). There is no message to send DTMF or
to hang up: closing the WebSocket ends the Voicebot applet and the flow goes on to its
next applet (Hangup, Connect...).

`ExotelStream` is the per-call state machine (h11 style): `connected` optional and first,
`start` once, media/dtmf/mark only after start, nothing after stop, every `stream_sid` the
start's, frames bounded, media chunks only forward. A rejected frame raises
`CarrierProtocolError` naming the rule and changes nothing but counters.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any

import orjson

from livecall.carriers.base import (
    CallerAudio,
    CallStarted,
    Capabilities,
    CarrierEvent,
    CarrierProtocolError,
    Dtmf,
    Frame,
    Ignored,
    MediaFormat,
    PlayedUpTo,
)
from livecall.carriers.stream_base import (
    JsonCarrierStream,
    StreamState,
    custom_parameters,
    decode_base64,
    short,
    text,
    whole_number,
)

__all__ = [
    "CAPABILITIES",
    "CHUNK_UNIT_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "DTMF_DIGITS",
    "MAX_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "MIN_CHUNK_MS",
    "SAMPLE_RATES",
    "ExotelStream",
    "StreamState",
    "clear_frame",
    "mark_frame",
    "media_frame",
]

# Voicebot streams carry marks, clear and DTMF in; no DTMF out, hang-up is closing the socket.
CAPABILITIES = Capabilities(
    marks=True,
    clear=True,
    dtmf_in=True,
    send_dtmf_on_stream=False,
    hangup_on_stream=True,
    frame_ms=20,  # 320-byte units; `play` packs them into its minimum chunk
)
SAMPLE_RATES = (8000, 16000, 24000)  # the rates `?sample-rate=` may ask for
CHUNK_UNIT_BYTES = 320  # every chunk played back is a multiple of this
MIN_CHUNK_BYTES = 3200  # "minimum chunk size: 3.2k [100ms data]"
MIN_CHUNK_MS = 100
MAX_CHUNK_BYTES = 100_000 // CHUNK_UNIT_BYTES * CHUNK_UNIT_BYTES  # "maximum 100k"
DEFAULT_MAX_FRAME_BYTES = 256 * 1024  # a 100 ms frame at 24 kHz is ~6.4 kB of base64
DTMF_DIGITS = frozenset("0123456789*#ABCD")
MAX_CHUNK_JUMP = 600  # 60 s of 100 ms frames
_L16_NAMES = frozenset(("audio/x-raw", "raw", "slin", "audio/l16", "l16", "linear16", "pcm"))


# ----------------------------------------------------------------------------- outbound


def media_frame(stream_sid: str, pcm: bytes) -> str:
    """`media` to Exotel: base64 little-endian 16-bit PCM at the stream's rate."""
    payload = binascii.b2a_base64(pcm, newline=False).decode("ascii")
    sid = orjson.dumps(stream_sid).decode()
    return f'{{"event":"media","stream_sid":{sid},"media":{{"payload":"{payload}"}}}}'


def mark_frame(stream_sid: str, name: str) -> str:
    """`mark` to Exotel: echoed back once everything sent before it has been played."""
    return orjson.dumps(
        {"event": "mark", "stream_sid": stream_sid, "mark": {"name": name}}
    ).decode()


def clear_frame(stream_sid: str) -> str:
    """`clear` to Exotel: drop the audio queued and not yet playing (barge-in)."""
    return orjson.dumps({"event": "clear", "stream_sid": stream_sid}).decode()


# ----------------------------------------------------------------------------- parsing


# Exotel's counters are digit strings in one page of its docs and numbers in another.
_counter = whole_number


def _media_format(fmt: Mapping[str, Any], asked: int) -> MediaFormat:
    encoding = text(fmt, "encoding", "start.media_format.encoding")
    if encoding is not None and encoding.lower() not in _L16_NAMES:
        raise CarrierProtocolError(
            f"start.media_format.encoding {short(encoding)} is not Exotel's raw 16-bit PCM"
        )
    rate = _counter(fmt.get("sample_rate"), "start.media_format.sample_rate")
    if rate is None:
        rate = asked  # not said: the rate the stream URL asked for
    if rate not in SAMPLE_RATES:
        raise CarrierProtocolError(
            f"start.media_format.sample_rate {rate} is not one of Exotel's {SAMPLE_RATES}"
        )
    _counter(fmt.get("bit_rate"), "start.media_format.bit_rate")  # "16" or "128": unused
    return MediaFormat("l16", rate)


class ExotelStream(JsonCarrierStream):
    """One Voicebot stream: frames in, typed events out; commands in, frames out.

    `max_frame_bytes` bounds an inbound frame; `sample_rate` is the rate the stream URL asked
    Exotel for (its `sample-rate`; 8000, Exotel's default, when it names none). The media
    format is that until `start` says what Exotel sends, which wins: a start at another rate
    is followed (the caller's audio is coded at it, and Exotel plays back at it) and kept in
    `rate_mismatch` as (asked, got). Before `start`, `play` refuses to build frames (there is
    no stream_sid to address them to).
    """

    capabilities = CAPABILITIES
    NOUN = "message"
    BINARY_REFUSED = "binary frames are not part of Exotel's stream protocol"
    SID_KEY = "stream_sid"
    MAX_CHUNK_JUMP = MAX_CHUNK_JUMP
    SIZE_FIRST = True  # a huge binary frame is refused for its size

    def __init__(
        self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, sample_rate: int = 8000
    ) -> None:
        if sample_rate not in SAMPLE_RATES:
            raise ValueError(f"Exotel streams at {SAMPLE_RATES} Hz, not {sample_rate}")
        super().__init__(max_frame_bytes=max_frame_bytes)
        self.asked_rate = sample_rate
        self.media_format = MediaFormat("l16", sample_rate)
        self.rate_mismatch: tuple[int, int] | None = None  # (asked, what start said)
        self.stop_reason: str | None = None
        self._pending = bytearray()  # outbound PCM not yet a whole chunk
        self._chunk_bytes = self._min_chunk(sample_rate)

    def __repr__(self) -> str:
        return (
            f"<ExotelStream {self.state.value} sid={self.stream_sid} "
            f"frames={self.frames_received} missing={self.frames_missing}>"
        )

    @property
    def stream_sid(self) -> str | None:
        """The stream's id, in Exotel's name for it."""
        return self.stream_id

    @staticmethod
    def _min_chunk(rate: int) -> int:
        """Exotel's minimum, read both ways: 3.2 kB and 100 ms (3200 B is 200 ms at 8 kHz)."""
        return max(MIN_CHUNK_BYTES, rate * 2 * MIN_CHUNK_MS // 1000)

    # ------------------------------------------------------------------ inbound

    def _on_event(self, event: str, msg: dict[str, Any]) -> CarrierEvent:
        state = self.state
        if event == "media":
            self._check_streaming(msg, event)
            return self._media(msg)
        if event == "connected":
            return self._connected()
        if event == "start":
            self._check_start_once()
            return self._start(msg)
        if event == "stop":
            if state is StreamState.STREAMING:
                self._check_id(msg, event)
            stop = msg.get("stop")
            stop = stop if type(stop) is dict else {}
            reason = text(stop, "reason", "stop.reason")
            self.stop_reason = reason
            return self._stopped(reason)
        if event == "dtmf":
            self._check_streaming(msg, event)
            body = self._obj(msg, "dtmf", event)
            digit = body.get("digit")
            if type(digit) is not str or digit.upper() not in DTMF_DIGITS:
                raise CarrierProtocolError(
                    f"dtmf.digit must be one of 0-9*#A-D, got {short(digit)}"
                )
            _counter(body.get("duration"), "dtmf.duration")
            return Dtmf(digit.upper())
        if event == "mark":
            self._check_streaming(msg, event)
            name = self._obj(msg, "mark", event).get("name")
            if type(name) is not str or not name:
                raise CarrierProtocolError(
                    f"mark.name must be a non-empty string, got {short(name)}"
                )
            return PlayedUpTo(name)
        return Ignored(event[:40])  # Exotel adds events over time (e.g. "silence" in beta)

    def _start(self, msg: dict[str, Any]) -> CallStarted:
        start = self._obj(msg, "start", "start")
        outer = text(msg, "stream_sid", "stream_sid")
        sid = text(start, "stream_sid", "start.stream_sid") or outer
        if not sid:
            raise CarrierProtocolError("start needs a non-empty stream_sid")
        if outer and outer != sid:
            raise CarrierProtocolError(
                f"start.stream_sid {short(sid)} does not match the message's {short(outer)}"
            )
        call_sid = text(start, "call_sid", "start.call_sid")
        if not call_sid:
            raise CarrierProtocolError("start needs a non-empty start.call_sid")
        fmt_raw = start.get("media_format")
        if fmt_raw is not None and type(fmt_raw) is not dict:
            raise CarrierProtocolError(
                f"start.media_format must be an object, got {short(fmt_raw)}"
            )
        fmt = _media_format(fmt_raw or {}, self.asked_rate)
        params = custom_parameters(
            start.get("custom_parameters"), "start.custom_parameters", null="null"
        )
        _counter(msg.get("sequence_number"), "sequence_number")
        started = CallStarted(
            call_id=call_sid,
            stream_id=sid,
            media_format=fmt,
            custom_parameters=params,
            account_id=text(start, "account_sid", "start.account_sid"),
            from_number=text(start, "from", "start.from"),
            to_number=text(start, "to", "start.to"),
            direction=text(start, "direction", "start.direction"),
        )
        self._commit_streaming(sid)
        self.started = started
        self.media_format = fmt
        self._chunk_bytes = self._min_chunk(fmt.sample_rate)
        if fmt.sample_rate != self.asked_rate:
            self.rate_mismatch = (self.asked_rate, fmt.sample_rate)
        return started

    def _media(self, msg: dict[str, Any]) -> CallerAudio:
        body = self._obj(msg, "media", "media")
        payload = body.get("payload")
        if type(payload) is not str:
            raise CarrierProtocolError(f"media.payload must be a string, got {short(payload)}")
        chunk = _counter(body.get("chunk"), "media.chunk")
        stamp = _counter(body.get("timestamp"), "media.timestamp")
        seq = _counter(msg.get("sequence_number"), "sequence_number")
        audio = decode_base64(payload)
        if len(audio) & 1:
            raise CarrierProtocolError(
                f"media.payload holds {len(audio)} bytes: not whole 16-bit samples"
            )
        self._next_chunk(chunk)
        self.frames_received += 1
        return CallerAudio(audio, seq if chunk is None else chunk, stamp)

    # ------------------------------------------------------------------ outbound

    def _sid(self) -> str:
        if self.stream_id is None:
            raise RuntimeError("no stream_sid yet: Exotel's start has not arrived")
        return self.stream_id

    def play(self, audio: bytes) -> list[Frame]:
        """Little-endian PCM at the stream's rate -> `media` frames of the minimum chunk."""
        sid = self._sid()
        pending = self._pending
        pending += audio
        size = self._chunk_bytes
        if len(pending) < size:
            return []
        frames: list[Frame] = []
        cut = len(pending) - len(pending) % size
        view = memoryview(pending)
        for lo in range(0, cut, size):
            frames.append(media_frame(sid, bytes(view[lo : lo + size])))
        view.release()
        del pending[:cut]
        return frames

    def _send_units(self, *, pad: bool) -> list[Frame]:
        pending = self._pending
        n = len(pending)
        if pad and n % CHUNK_UNIT_BYTES:
            pending += bytes(CHUNK_UNIT_BYTES - n % CHUNK_UNIT_BYTES)  # silence to 20 ms
            n = len(pending)
        cut = n - n % CHUNK_UNIT_BYTES
        if not cut:
            return []
        frames: list[Frame] = [media_frame(self._sid(), bytes(pending[:cut]))]
        del pending[:cut]
        return frames

    def mark(self, name: str) -> list[Frame]:
        """Buffered audio in whole 320-byte units, then the mark (a <20 ms rest waits)."""
        if not isinstance(name, str) or not name:
            raise ValueError("a mark needs a non-empty name")
        frames = self._send_units(pad=False)
        frames.append(mark_frame(self._sid(), name))
        return frames

    def flush(self) -> list[Frame]:
        """End of a turn: everything buffered, padded with silence to a whole 320 bytes."""
        return self._send_units(pad=True)

    def clear(self) -> list[Frame]:
        """Barge-in: drop what is buffered here and ask Exotel to drop its queue."""
        self._pending.clear()
        return [clear_frame(self._sid())]

    def send_dtmf(self, digits: str) -> list[Frame]:
        """Exotel has no DTMF command on the stream: none (the core plays tones in-band)."""
        return []

    def hangup(self) -> list[Frame]:
        """No hang-up message: the core closes the WebSocket, which ends the Voicebot applet."""
        self._pending.clear()
        return []

    @property
    def buffered_bytes(self) -> int:
        """Outbound PCM held until it makes a whole chunk (or a mark/flush sends it)."""
        return len(self._pending)
