"""Telnyx Media Streaming over WebSocket, sans I/O: check what Telnyx sends, build what we send.

Telnyx opens the WebSocket named in the answer document and sends JSON text frames, snake
case, with the stream id at the top level (`stream_id`) and the call's id inside `start`
(`start.call_control_id`):

    connected -> start -> media... (dtmf, mark, error interleaved) -> stop

Back, in bidirectional RTP mode, the app sends `media` (base64 RTP payload, no header, 20 ms
to 30 s per frame), `mark` (echoed once what came before it has played, at once if nothing
is queued) and `clear` (drop queued audio; queued marks come back). None of these need the
stream id. Keypad presses arrive on the stream as `dtmf`; there is no message to send DTMF
or hang up (REST does that: `control.py`; closing the socket ends a TeXML `<Connect>`).

`TelnyxStream` is the per-call state machine (h11 style): `connected` optional and first,
`start` once, media/dtmf/mark only after start, nothing after stop, every `stream_id` the
start's, frames bounded, media chunks only forward (Telnyx says order is not guaranteed: a
late chunk can no longer play in place, so it is rejected and counted). A rejected frame
raises `CarrierProtocolError` naming the rule and changes nothing but counters.

L16 is big-endian on the wire (RTP, RFC 3551); livecall's core takes little-endian PCM, so
this module swaps bytes both ways.
"""

from __future__ import annotations

import binascii
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from livecall.carriers.base import (
    ULAW_8K,
    CallerAudio,
    CallStarted,
    Capabilities,
    CarrierEvent,
    CarrierProtocolError,
    Dtmf,
    Encoding,
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
    "DEFAULT_MAX_FRAME_BYTES",
    "DTMF_DIGITS",
    "MAX_CHUNK_MS",
    "MIN_CHUNK_MS",
    "StreamState",
    "TelnyxStream",
    "clear_frame",
    "format_for",
    "mark_frame",
    "media_frame",
    "wire_encoding",
]

DEFAULT_MAX_FRAME_BYTES = 64 * 1024
MIN_CHUNK_MS = 20  # Telnyx plays RTP media chunks of 20 ms to 30 s
MAX_CHUNK_MS = 30_000
DEFAULT_CHUNK_MS = 1000  # what `play` packs into one frame (fewer frames, well inside the limits)
DTMF_DIGITS = frozenset("0123456789*#ABCD")
MAX_CHUNK_JUMP = 3000  # 60 s of 20 ms frames
MAX_MARK_NAME = 256

# The stream's own capabilities: marks, clear and DTMF in ride the socket; DTMF out does not
# (REST `send_dtmf`); closing the socket ends a TeXML <Connect> call (the document has no verb
# after it), so hanging up needs no REST on the inbound path.
CAPABILITIES = Capabilities(
    marks=True,
    clear=True,
    dtmf_in=True,
    send_dtmf_on_stream=False,
    hangup_on_stream=True,
    frame_ms=20,
)

_ENCODINGS: dict[str, Encoding] = {"PCMU": "mulaw", "PCMA": "alaw", "L16": "l16"}
_WIRE_NAMES = {v: k for k, v in _ENCODINGS.items()}
_RATES = {"mulaw": (8000,), "alaw": (8000,), "l16": (8000, 16000)}
_SILENCE = {"mulaw": b"\xff", "alaw": b"\xd5", "l16": b"\x00"}
_SWAP = sys.byteorder == "little"


def format_for(encoding: str, sample_rate: int = 8000) -> MediaFormat:
    """The MediaFormat for a Telnyx codec name (PCMU, PCMA, L16); ValueError if unsupported."""
    kind = _ENCODINGS.get(encoding.upper())
    if kind is None:
        raise ValueError(f"livecall does not carry Telnyx codec {encoding!r} (PCMU, PCMA, L16)")
    if sample_rate not in _RATES[kind]:
        raise ValueError(f"Telnyx {encoding} at {sample_rate} Hz is not supported")
    return MediaFormat(kind, sample_rate)


def wire_encoding(fmt: MediaFormat) -> str:
    """The Telnyx codec name for a MediaFormat (PCMU, PCMA, L16)."""
    return _WIRE_NAMES[fmt.encoding]


def _swap16(data: bytes) -> bytes:
    """Big-endian <-> little-endian 16-bit samples (a no-op on a big-endian host)."""
    if not _SWAP:
        return data
    return np.frombuffer(data, dtype=np.uint16).byteswap().tobytes()


# --------------------------------------------------------------------------- outbound frames


def media_frame(payload: bytes) -> str:
    """`media` to Telnyx: the base64 RTP payload (wire byte order), no stream id needed."""
    b64 = binascii.b2a_base64(payload, newline=False).decode("ascii")
    return f'{{"event":"media","media":{{"payload":"{b64}"}}}}'


def mark_frame(name: str) -> str:
    """`mark` to Telnyx: echoed back when the media sent before it has played."""
    return orjson.dumps({"event": "mark", "mark": {"name": name}}).decode()


def clear_frame() -> str:
    """`clear` to Telnyx: stop playback, drop queued media; queued marks come back."""
    return '{"event":"clear"}'


# --------------------------------------------------------------------------- parsing


# Telnyx sends counters as digit strings ("4"); ints are taken too. None when absent.
_counter = whole_number


class TelnyxStream(JsonCarrierStream):
    """One call's Telnyx media stream, sans I/O (a `CarrierStream`).

    `playback_format` is what the answer document asked Telnyx to play
    (`bidirectionalCodec`/`bidirectionalSamplingRate`): `play` takes raw audio in it. The
    caller's audio arrives in the start frame's `media_format`, which may differ (the
    call's codec when Telnyx cannot transcode); `CallStarted.media_format` says which.
    The checks every JSON stream makes are `JsonCarrierStream`'s.
    """

    capabilities = CAPABILITIES
    BINARY_REFUSED = "binary frames are not part of Telnyx media streaming"
    SID_KEY = "stream_id"
    MAX_CHUNK_JUMP = MAX_CHUNK_JUMP
    CHUNKS_FROM_ONE = False  # a first chunk above 1 is where Telnyx started counting
    LATE_WHY = (
        "late or duplicate: Telnyx does not guarantee order, and late audio cannot play in place"
    )

    def __init__(
        self,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        playback_format: MediaFormat = ULAW_8K,
        chunk_ms: int = DEFAULT_CHUNK_MS,
    ) -> None:
        if not MIN_CHUNK_MS <= chunk_ms <= MAX_CHUNK_MS or chunk_ms % MIN_CHUNK_MS:
            raise ValueError(f"chunk_ms must be a multiple of 20 within 20..30000, got {chunk_ms}")
        if playback_format.encoding not in _WIRE_NAMES or playback_format.channels != 1:
            raise ValueError(f"Telnyx cannot play {playback_format}")
        format_for(wire_encoding(playback_format), playback_format.sample_rate)
        super().__init__(max_frame_bytes=max_frame_bytes)
        self.media_format = playback_format
        self.inbound_format: MediaFormat | None = None
        self.carrier_errors: list[str] = []  # Telnyx `error` frames: "code title: detail"
        self._marks: Counter[str] = Counter()  # sent, not yet echoed
        self._min_bytes = playback_format.bytes_per_20ms
        self._max_bytes = playback_format.bytes_per_20ms * (chunk_ms // MIN_CHUNK_MS)
        self._carry = b""  # < 20 ms of audio held back until there is enough to send
        self._silence = _SILENCE[playback_format.encoding]
        self._l16_out = playback_format.encoding == "l16"

    def __repr__(self) -> str:
        return (
            f"<TelnyxStream {self.state.value} id={self.stream_id} frames={self.frames_received}>"
        )

    # ------------------------------------------------------------------ inbound

    def _on_event(self, event: str, msg: dict[str, Any]) -> CarrierEvent:
        state = self.state
        if event == "media":
            self._check_streaming(msg, event)
            return self._media(msg)
        if event == "connected":
            if state is StreamState.AWAITING_CONNECTED:
                text(msg, "version", "connected.version")
            return self._connected()
        if event == "start":
            self._check_start_once()
            return self._start(msg)
        if event == "stop":
            if state is StreamState.STREAMING:
                self._check_id(msg, event)
            _counter(msg.get("sequence_number"), "sequence_number")
            return self._stopped(None if state is StreamState.STREAMING else "stopped before start")
        if event == "dtmf":
            self._check_streaming(msg, event)
            digit = self._obj(msg, "dtmf", event).get("digit")
            if type(digit) is not str or digit not in DTMF_DIGITS:
                raise CarrierProtocolError(
                    f"dtmf.digit must be one of 0-9 * # A-D, got {short(digit)}"
                )
            return Dtmf(digit)
        if event == "mark":
            self._check_streaming(msg, event)
            name = self._obj(msg, "mark", event).get("name")
            if type(name) is not str:
                raise CarrierProtocolError(
                    f"mark frame needs a string mark.name, got {short(name)}"
                )
            if self._marks[name] <= 0:
                raise CarrierProtocolError(f"mark {short(name)} was never sent (or already echoed)")
            self._marks[name] -= 1
            if not self._marks[name]:
                del self._marks[name]
            return PlayedUpTo(name)
        if event == "error":
            self._check_id(msg, event)
            return Ignored(self._error(msg))
        return Ignored(event)  # Telnyx adds events over time: tolerated

    def _start(self, msg: dict[str, Any]) -> CallStarted:
        sid = msg.get("stream_id")
        if type(sid) is not str or not sid:
            raise CarrierProtocolError(f"start frame needs a non-empty stream_id, got {short(sid)}")
        start = self._obj(msg, "start", "start")
        call_id = start.get("call_control_id")
        if type(call_id) is not str or not call_id:
            raise CarrierProtocolError(
                f"start frame needs a non-empty start.call_control_id, got {short(call_id)}"
            )
        fmt_raw = start.get("media_format")
        if fmt_raw is None:
            fmt_raw = {}
        elif type(fmt_raw) is not dict:
            raise CarrierProtocolError(
                f"start.media_format must be an object, got {short(fmt_raw)}"
            )
        encoding = text(fmt_raw, "encoding", "start.media_format.encoding") or "PCMU"
        rate = _counter(fmt_raw.get("sample_rate"), "start.media_format.sample_rate")
        channels = _counter(fmt_raw.get("channels"), "start.media_format.channels")
        rate = 8000 if rate is None else rate
        channels = 1 if channels is None else channels
        if channels != 1:
            raise CarrierProtocolError(f"start.media_format.channels must be 1, got {channels}")
        try:
            fmt = format_for(encoding, rate)
        except ValueError as exc:
            raise CarrierProtocolError(f"start.media_format: {exc}") from None
        params = custom_parameters(start.get("custom_parameters"), "start.custom_parameters")
        _counter(msg.get("sequence_number"), "sequence_number")
        started = CallStarted(
            call_id=call_id,
            stream_id=sid,
            media_format=fmt,
            custom_parameters=params,
            account_id=text(start, "user_id", "start.user_id"),
            from_number=text(start, "from", "start.from"),
            to_number=text(start, "to", "start.to"),
            direction=None,
        )
        self._commit_streaming(sid)
        self.started = started
        self.inbound_format = fmt
        return started

    def _media(self, msg: dict[str, Any]) -> CarrierEvent:
        media = self._obj(msg, "media", "media")
        payload = media.get("payload")
        if type(payload) is not str:
            raise CarrierProtocolError(
                f"media frame needs a string media.payload, got {short(payload)}"
            )
        track = media.get("track", "inbound")
        if type(track) is not str:
            raise CarrierProtocolError(f"media.track must be a string, got {short(track)}")
        if track != "inbound":
            return Ignored(f"media on the {track[:20]} track")  # both_tracks: not the caller
        chunk = _counter(media.get("chunk"), "media.chunk")
        stamp = _counter(media.get("timestamp"), "media.timestamp")
        seq = _counter(msg.get("sequence_number"), "sequence_number")
        audio = decode_base64(payload)
        if not audio:
            raise CarrierProtocolError("media.payload is empty")
        fmt = self.inbound_format
        assert fmt is not None
        if fmt.encoding == "l16":
            if len(audio) % 2:
                raise CarrierProtocolError("L16 media.payload has an odd number of bytes")
            audio = _swap16(audio)
        self._next_chunk(chunk)
        self.frames_received += 1
        return CallerAudio(audio, sequence=seq if chunk is None else chunk, timestamp_ms=stamp)

    def _error(self, msg: Mapping[str, Any]) -> str:
        body: Any = msg.get("payload")
        if type(body) is not dict:
            body = msg.get("error")
            if type(body) is not dict:
                body = {}
        code = body.get("code")
        title = body.get("title")
        detail = body.get("detail")
        err = f"error {short(code)} {str(title)[:60]}: {str(detail)[:200]}"
        self.carrier_errors.append(err)
        return err

    # ------------------------------------------------------------------ outbound

    def play(self, audio: bytes) -> list[Frame]:
        """Frames that queue `audio` (raw, in `media_format`) for playout, 20 ms..chunk_ms each.

        Less than 20 ms is held back until more comes (or `mark` pads it with silence), since
        Telnyx does not take a shorter chunk.
        """
        data = self._carry + bytes(audio) if self._carry else bytes(audio)
        if self._l16_out and len(data) % 2:
            data, odd = data[:-1], data[-1:]
        else:
            odd = b""
        step = self._max_bytes
        frames: list[Frame] = []
        end = len(data) - len(data) % self._min_bytes
        for i in range(0, end, step):
            part = data[i : min(i + step, end)]
            frames.append(media_frame(_swap16(part) if self._l16_out else part))
        self._carry = data[end:] + odd
        return frames

    def flush(self) -> list[Frame]:
        """Send what `play` held back, padded with silence to 20 ms."""
        if not self._carry:
            return []
        data = self._carry
        self._carry = b""
        if self._l16_out and len(data) % 2:
            data = data[:-1]
        pad = self._min_bytes - len(data)
        data += self._silence * pad
        return [media_frame(_swap16(data) if self._l16_out else data)]

    def mark(self, name: str) -> list[Frame]:
        """A mark after everything played so far (held-back audio is flushed first)."""
        if not isinstance(name, str) or not name or len(name) > MAX_MARK_NAME:
            raise ValueError(f"a mark name must be a non-empty string of at most {MAX_MARK_NAME}")
        frames = self.flush()
        self._marks[name] += 1
        frames.append(mark_frame(name))
        return frames

    def clear(self) -> list[Frame]:
        """Drop what is queued (barge-in); Telnyx echoes the queued marks at once."""
        self._carry = b""
        return [clear_frame()]

    def send_dtmf(self, digits: str) -> list[Frame]:
        """Nothing: Telnyx plays DTMF through REST (`control.TelnyxControl.send_dtmf`)."""
        return []

    def hangup(self) -> list[Frame]:
        """Nothing to send: closing the socket ends a TeXML `<Connect>` (REST for the rest)."""
        return []

    @property
    def pending_marks(self) -> int:
        """Marks sent and not yet echoed."""
        return sum(self._marks.values())
