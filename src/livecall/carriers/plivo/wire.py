"""Plivo Audio Streaming, sans I/O: check what Plivo sends, build what livecall sends back.

Plivo opens the WebSocket named by `<Stream bidirectional="true">` and speaks JSON text
frames (https://www.plivo.com/docs/voice/audio-streaming/audio-streaming):

- in: `start` (once: `start.callId`, `start.streamId`, `start.accountId`,
  `start.mediaFormat{encoding, sampleRate}`, top-level `extra_headers`), `media`
  (`streamId`, `media{track, timestamp, chunk, payload}`), `dtmf` (`dtmf{digit}`),
  `playedStream` (a checkpoint has played), `clearedAudio` (the queue was dropped), and
  `stop` (not in the current reference, but sent by Plivo's own stacks: accepted; the socket
  closing is the authoritative end either way).
- out: `playAudio` (`media{contentType, sampleRate, payload}`, no streamId), `checkpoint`
  (`streamId`, `name`), `clearAudio` (`streamId`), `sendDTMF` (`dtmf`: the digits).

Plivo acknowledges a checkpoint only if the audio before it really played: checkpoints
dropped by `clearAudio` never come back. `PlivoStream` therefore answers `clearedAudio` with
a `PlayedUpTo` for the newest checkpoint still pending, so the core's marks always settle.
"""

from __future__ import annotations

import binascii
from collections import deque
from typing import Any

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
    decode_base64,
    short,
    text,
    whole_number,
)

__all__ = [
    "CAPABILITIES",
    "DEFAULT_MAX_FRAME_BYTES",
    "MAX_PLAY_MS",
    "PlivoStream",
    "StreamState",
    "content_type_for",
    "format_from_content_type",
    "parse_extra_headers",
]

DEFAULT_MAX_FRAME_BYTES = 64 * 1024
MAX_PLAY_MS = 1000  # audio per playAudio frame: bounded frames, fine-grained clears
MAX_CHUNK_JUMP = 3000  # 60 s of 20 ms frames: a larger jump is a lie, not a loss
MAX_COUNTER = 2**53  # JSON integers beyond this are not exact anywhere
DTMF_IN = frozenset("0123456789*#ABCD")
DTMF_OUT = frozenset("0123456789*#")

CAPABILITIES = Capabilities(
    marks=True,  # checkpoint -> playedStream
    clear=True,  # clearAudio -> clearedAudio
    dtmf_in=True,  # dtmf events
    send_dtmf_on_stream=True,  # sendDTMF
    hangup_on_stream=True,  # closing the socket ends <Stream keepCallAlive>, the last element
)

_ENCODINGS: dict[str, Encoding] = {"audio/x-mulaw": "mulaw", "audio/x-l16": "l16"}
_RATES = {"mulaw": (8000,), "l16": (8000, 16000)}


def format_from_content_type(encoding: str, sample_rate: int) -> MediaFormat:
    """Plivo's (`audio/x-mulaw`, 8000) etc. -> MediaFormat; ValueError for what Plivo lacks."""
    base = encoding.split(";", 1)[0].strip().lower()
    name = _ENCODINGS.get(base)
    if name is None:
        raise ValueError(f"Plivo streams audio/x-mulaw or audio/x-l16, not {encoding!r}")
    if sample_rate not in _RATES[name]:
        raise ValueError(f"{base} is streamed at {_RATES[name]} Hz, not {sample_rate}")
    return MediaFormat(name, sample_rate)


def content_type_for(fmt: MediaFormat) -> tuple[str, int]:
    """MediaFormat -> (contentType, sampleRate) as `playAudio` and `<Stream>` name them."""
    if (
        fmt.channels != 1
        or fmt.encoding not in _RATES
        or fmt.sample_rate not in _RATES[fmt.encoding]
    ):
        raise ValueError(f"Plivo cannot play {fmt}")
    return ("audio/x-mulaw" if fmt.encoding == "mulaw" else "audio/x-l16"), fmt.sample_rate


def parse_extra_headers(raw: object) -> dict[str, str]:
    """`extra_headers` as Plivo echoes it: "a=1;b=2" (its reference), "a=1,b=2" (the XML
    form) or a JSON object string (seen from its SDK). Anything else is a protocol error."""
    if raw is None or raw == "":
        return {}
    if type(raw) is dict:
        return {str(k): v if type(v) is str else orjson.dumps(v).decode() for k, v in raw.items()}
    if type(raw) is not str:
        raise CarrierProtocolError(f"extra_headers must be a string, got {short(raw)}")
    text = raw.strip()
    if text.startswith("{"):
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise CarrierProtocolError("extra_headers looks like JSON but is not valid") from None
        if type(obj) is not dict:
            raise CarrierProtocolError("extra_headers JSON must be an object")
        return parse_extra_headers(obj)
    out: dict[str, str] = {}
    for part in text.replace(",", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise CarrierProtocolError(f"extra_headers entry {short(part)} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _int(value: object, field: str) -> int | None:
    """Plivo sends counters as numbers (chunk, sequenceNumber) or strings (timestamp)."""
    return whole_number(value, field, max_value=MAX_COUNTER, floats=True)


class PlivoStream(JsonCarrierStream):
    """One Plivo audio stream (a `CarrierStream`): frames in, events out; commands, frames out.

    Rules: text frames only, each a JSON object with a string `event`, no larger than
    `max_frame_bytes`; `start` exactly once and first (a `stop` may come first: the stream
    never began); media, dtmf, playedStream and clearedAudio only while streaming, with the
    start's streamId when they carry one; media chunks only move forward; nothing after stop.
    Unknown events are `Ignored` (Plivo adds events). A rejected frame changes nothing but
    `protocol_errors`.
    """

    capabilities = CAPABILITIES
    BINARY_REFUSED = "binary frames are not part of Plivo's stream protocol"
    SID_KEY = "streamId"
    HAS_CONNECTED = False  # Plivo's first frame is `start`
    MAX_CHUNK_JUMP = MAX_CHUNK_JUMP

    def __init__(
        self,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        media_format: MediaFormat = ULAW_8K,
        max_play_ms: int = MAX_PLAY_MS,
    ) -> None:
        content_type_for(media_format)  # refuse what Plivo cannot carry, up front
        if max_play_ms < 20 or max_play_ms % 20:
            raise ValueError(f"max_play_ms must be a positive multiple of 20, got {max_play_ms}")
        super().__init__(max_frame_bytes=max_frame_bytes)
        self.media_format = media_format
        self.max_play_ms = max_play_ms
        self.pending_checkpoints: deque[str] = deque()
        self._first_timestamp: int | None = None
        self._sid_json = ""
        self._play_head = ""

    def __repr__(self) -> str:
        return f"<PlivoStream {self.state.value} id={self.stream_id} frames={self.frames_received}>"

    # ------------------------------------------------------------------ inbound

    def _on_event(self, event: str, msg: dict[str, Any]) -> CarrierEvent:
        if event == "media":
            return self._media(msg)
        if event == "start":
            return self._start(msg)
        if event == "stop":
            self._check_id_of(msg, "stop", streaming=False)
            seq = _int(msg.get("sequenceNumber"), "sequenceNumber")
            reason = msg.get("reason")
            self._track_seq(seq)
            return self._stopped(reason if type(reason) is str and reason else None)
        if event == "dtmf":
            return self._dtmf(msg)
        if event == "playedStream":
            return self._played(msg)
        if event == "clearedAudio":
            self._check_id_of(msg, "clearedAudio")
            self._track_seq(_int(msg.get("sequenceNumber"), "sequenceNumber"))
            if not self.pending_checkpoints:
                return Ignored("clearedAudio")
            last = self.pending_checkpoints[-1]
            self.pending_checkpoints.clear()
            return PlayedUpTo(last)
        return Ignored(event[:40])

    def _start(self, msg: dict[str, Any]) -> CallStarted:
        self._check_start_once()
        start = self._obj(msg, "start", "start")
        call_id = text(start, "callId", "start.callId", required=True)
        stream_id = text(start, "streamId", "start.streamId", required=True)
        outer = msg.get("streamId")
        if outer is not None and outer != stream_id:
            raise CarrierProtocolError(
                f"streamId {short(outer)} does not match start.streamId {short(stream_id)}"
            )
        account = text(start, "accountId", "start.accountId")
        fmt_raw = self._obj(start, "mediaFormat", "start")
        encoding = text(fmt_raw, "encoding", "start.mediaFormat.encoding", required=True)
        rate = _int(fmt_raw.get("sampleRate"), "start.mediaFormat.sampleRate")
        try:
            fmt = format_from_content_type(encoding or "", rate or 0)
        except ValueError as exc:
            raise CarrierProtocolError(f"start.mediaFormat: {exc}") from None
        tracks = start.get("tracks", ["inbound"])
        if type(tracks) is not list or not all(type(t) is str for t in tracks):
            raise CarrierProtocolError(
                f"start.tracks must be a list of strings, got {short(tracks)}"
            )
        params = parse_extra_headers(msg.get("extra_headers", start.get("extra_headers")))
        seq = _int(msg.get("sequenceNumber"), "sequenceNumber")
        # every check passed: commit
        assert call_id is not None and stream_id is not None
        self._commit_streaming(stream_id)
        self.media_format = fmt
        self._sid_json = orjson.dumps(stream_id).decode()
        ctype, srate = content_type_for(fmt)
        self._play_head = (
            f'{{"event":"playAudio","media":{{"contentType":"{ctype}","sampleRate":{srate},'
            '"payload":"'
        )
        self._track_seq(seq)
        self.started = CallStarted(
            call_id=call_id,
            stream_id=stream_id,
            media_format=fmt,
            custom_parameters=params,
            account_id=account,
            direction=None,
        )
        return self.started

    def _check_id_of(self, msg: dict[str, Any], event: str, *, streaming: bool = True) -> None:
        """This stream's streamId where the frame carries one (stop may come before start)."""
        if streaming:
            self._check_streaming(msg, event)
        else:
            self._check_id(msg, event)

    def _media(self, msg: dict[str, Any]) -> CallerAudio:
        self._check_streaming(msg, "media")
        media = self._obj(msg, "media", "media")
        payload = media.get("payload")
        if type(payload) is not str or not payload:
            raise CarrierProtocolError("media needs a non-empty string media.payload")
        track = media.get("track", "inbound")
        if track != "inbound":
            raise CarrierProtocolError(
                f"media.track {short(track)}: a bidirectional stream carries only 'inbound'"
            )
        chunk = _int(media.get("chunk"), "media.chunk")
        stamp = _int(media.get("timestamp"), "media.timestamp")
        seq = _int(msg.get("sequenceNumber"), "sequenceNumber")
        audio = decode_base64(payload)
        if self.media_format.encoding == "l16" and len(audio) % 2:
            raise CarrierProtocolError("media.payload holds half a 16-bit sample")
        self._next_chunk(chunk)
        rel: int | None = None
        if stamp is not None:
            # Plivo's reference says epoch ms, its SDK says ms since start: relative to the
            # first frame is right for both.
            if self._first_timestamp is None:
                self._first_timestamp = stamp
            rel = stamp - self._first_timestamp
            if rel < 0:
                rel = None
        self._track_seq(seq)
        self.frames_received += 1
        return CallerAudio(audio, chunk, rel)

    def _dtmf(self, msg: dict[str, Any]) -> Dtmf:
        self._check_id_of(msg, "dtmf")
        body = self._obj(msg, "dtmf", "dtmf")
        digit = body.get("digit")
        if type(digit) is not str or digit not in DTMF_IN:
            raise CarrierProtocolError(f"dtmf.digit must be one of 0-9*#A-D, got {short(digit)}")
        self._track_seq(_int(msg.get("sequenceNumber"), "sequenceNumber"))
        return Dtmf(digit)

    def _played(self, msg: dict[str, Any]) -> PlayedUpTo:
        self._check_id_of(msg, "playedStream")
        name = msg.get("name")
        if type(name) is not str:
            raise CarrierProtocolError(f"playedStream needs a string name, got {short(name)}")
        pending = self.pending_checkpoints
        if name not in pending:
            raise CarrierProtocolError(
                f"playedStream for checkpoint {short(name)} that is not pending"
            )
        seq = _int(msg.get("sequenceNumber"), "sequenceNumber")
        while pending.popleft() != name:  # checkpoints play in order
            pass
        self._track_seq(seq)
        return PlayedUpTo(name)

    # ------------------------------------------------------------------ outbound

    def _need_start(self, what: str) -> None:
        if self.stream_id is None:
            raise RuntimeError(f"{what} needs the stream's id: wait for start")

    def flush(self) -> list[Frame]:
        """Plivo takes any whole number of samples: `play` holds nothing back."""
        return []

    def play(self, audio: bytes) -> list[Frame]:
        """`playAudio` frames for raw audio in `media_format`, at most `max_play_ms` each."""
        if not audio:
            return []
        self._need_start("playAudio")
        fmt = self.media_format
        if fmt.encoding == "l16" and len(audio) % 2:
            raise ValueError("16-bit audio must be a whole number of samples")
        step = fmt.bytes_per_20ms * (self.max_play_ms // 20)
        head = self._play_head
        view = memoryview(audio)
        return [
            head + binascii.b2a_base64(view[i : i + step], newline=False).decode("ascii") + '"}}'
            for i in range(0, len(audio), step)
        ]

    def mark(self, name: str) -> list[Frame]:
        """A `checkpoint`: Plivo answers `playedStream` once everything before it has played."""
        self._need_start("checkpoint")
        if not isinstance(name, str) or not name:
            raise ValueError("a checkpoint needs a non-empty name")
        self.pending_checkpoints.append(name)
        return [
            f'{{"event":"checkpoint","streamId":{self._sid_json},"name":{orjson.dumps(name).decode()}}}'
        ]

    def clear(self) -> list[Frame]:
        """`clearAudio`: Plivo drops what is queued and answers `clearedAudio`."""
        self._need_start("clearAudio")
        return [f'{{"event":"clearAudio","streamId":{self._sid_json}}}']

    def send_dtmf(self, digits: str) -> list[Frame]:
        """`sendDTMF`: Plivo plays the digits (0-9, *, #) into the call."""
        if not digits or any(d not in DTMF_OUT for d in digits):
            raise ValueError(f"sendDTMF takes digits 0-9, * and #, got {digits!r}")
        return [orjson.dumps({"event": "sendDTMF", "dtmf": digits}).decode()]

    def hangup(self) -> list[Frame]:
        """No frame: closing the socket ends the `<Stream keepCallAlive>` that livecall's answer
        ends with, and with it the call. (REST `hangup` in control.py ends it from anywhere.)"""
        return []
