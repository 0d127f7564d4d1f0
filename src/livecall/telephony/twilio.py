"""Twilio Media Streams, sans I/O: parse and check what Twilio sends, build what we send back.

Nothing here touches a socket. `parse_message` turns one WebSocket text frame into a typed
event; `TwilioStream` is the per-call state machine (h11 style) that also checks ordering,
the stream id, frame size and chunk numbering. Its errors name the rule that was broken and
leave it usable, because a bad frame should be logged and skipped, not end the call.

Also here: the outbound `media`/`mark`/`clear` builders, the TwiML we answer the voice
webhook with, and `X-Twilio-Signature` checks (delegated to the `twilio` package).
"""

from __future__ import annotations

import binascii
import enum
import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import orjson
from twilio.request_validator import HMAC_SHA1, RequestValidator, get_signature_algorithm
from twilio.twiml.voice_response import Connect, VoiceResponse

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SIGNATURE_SETTINGS_HEADER",
    "Connected",
    "Dtmf",
    "Mark",
    "Media",
    "ProtocolError",
    "Start",
    "Stop",
    "StreamState",
    "TwilioEvent",
    "TwilioSignature",
    "TwilioStream",
    "UnknownEvent",
    "busy_twiml",
    "clear_message",
    "connect_stream_twiml",
    "decode_payload",
    "encode_payload",
    "hangup_twiml",
    "mark_message",
    "media_message",
    "parse_message",
    "stream_url_for",
]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024


class ProtocolError(ValueError):
    """A frame broke a rule of the Twilio Media Streams protocol; the message names the rule."""


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Connected:
    """First frame of a stream (optional in practice): the protocol Twilio will speak."""

    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class Start:
    """Stream metadata, sent once; `custom_parameters` are the TwiML `<Parameter>`s."""

    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str]
    encoding: str
    sample_rate: int
    channels: int
    sequence_number: int | None


@dataclass(frozen=True, slots=True)
class Media:
    """One chunk of caller audio; `payload` is base64 exactly as received (decode later)."""

    stream_sid: str
    track: str
    chunk: int | None
    timestamp_ms: int | None
    payload: str
    sequence_number: int | None


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A key the caller pressed."""

    stream_sid: str
    digit: str
    track: str
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Mark:
    """Twilio has played everything we sent before the mark with this name (or cleared it)."""

    stream_sid: str
    name: str
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """The stream is over (the caller hung up or the call moved on)."""

    stream_sid: str
    call_sid: str
    account_sid: str
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event this code does not know; tolerated because Twilio adds events over time."""

    name: str
    raw: dict[str, Any]


TwilioEvent = Connected | Start | Media | Dtmf | Mark | Stop | UnknownEvent


# --------------------------------------------------------------------------- parsing

_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


def _short(value: object) -> str:
    """A value for an error message, cut short so a hostile frame can't flood the logs."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


MAX_COUNTER = 2**31 - 1  # sequence numbers, chunks and timestamps of any real call fit
MAX_CHUNK_JUMP = 3000  # 60 s of 20 ms frames
MAX_TIMESTAMP_JUMP_MS = 60_000


def _opt_int(value: object, field: str) -> int | None:
    """Twilio sends counters as strings ("4"); simulators may send ints. Accept both."""
    if value is None:
        return None
    # Exact types (`type(...) is`), not isinstance: a bool is not a counter.
    if type(value) is str:
        try:
            number = int(value)
        except ValueError:
            raise ProtocolError(
                f"{field} must be a whole number (string or integer), got {_short(value)}"
            ) from None
    elif type(value) is int:
        number = value
    elif type(value) is float and value.is_integer():
        number = int(value)
    else:
        raise ProtocolError(
            f"{field} must be a whole number (string or integer), got {_short(value)}"
        )
    if number < 0:
        raise ProtocolError(f"{field} must not be negative, got {number}")
    if number > MAX_COUNTER:
        raise ProtocolError(f"{field} {_short(value)} is beyond any real call's length")
    return number


def _opt_str(container: dict[str, Any], key: str, field: str, default: str = "") -> str:
    value = container.get(key, default)
    if value is None:
        return default
    if type(value) is not str:
        raise ProtocolError(f"{field} must be a string, got {_short(value)}")
    return value


def _obj(msg: dict[str, Any], key: str, event: str, *, required: bool = True) -> dict[str, Any]:
    value = msg.get(key)
    if type(value) is dict:
        return value
    if value is None and not required:
        return {}
    raise ProtocolError(f"{event} message needs a {key!r} object, got {_short(value)}")


def _parse_media(msg: dict[str, Any]) -> Media:
    media = msg.get("media")
    if type(media) is not dict:
        raise ProtocolError(f"media message needs a 'media' object, got {_short(media)}")
    payload = media.get("payload")
    if type(payload) is not str:
        raise ProtocolError(f"media message needs a string media.payload, got {_short(payload)}")
    sid = msg.get("streamSid", "")
    if type(sid) is not str:
        raise ProtocolError(f"streamSid must be a string, got {_short(sid)}")
    track = media.get("track", "inbound")
    if type(track) is not str:
        raise ProtocolError(f"media.track must be a string, got {_short(track)}")
    # Inline the common case (all three counters are digit strings): the hot path.
    chunk = media.get("chunk")
    timestamp = media.get("timestamp")
    seq = msg.get("sequenceNumber")
    try:
        if type(chunk) is str and type(timestamp) is str and type(seq) is str:
            c, t, s = int(chunk), int(timestamp), int(seq)
            if c >= 0 and t >= 0 and s >= 0:
                return Media(sid, track, c, t, payload, s)
    except ValueError:
        pass  # fall through to the careful path, which names the bad field
    return Media(
        sid,
        track,
        _opt_int(chunk, "media.chunk"),
        _opt_int(timestamp, "media.timestamp"),
        payload,
        _opt_int(seq, "sequenceNumber"),
    )


def _parse_start(msg: dict[str, Any]) -> Start:
    start = _obj(msg, "start", "start")
    outer_sid = msg.get("streamSid")
    sid = start.get("streamSid", outer_sid)
    if type(sid) is not str or not sid:
        raise ProtocolError(f"start message needs a non-empty streamSid, got {_short(sid)}")
    if outer_sid is not None and outer_sid != sid:
        raise ProtocolError(
            f"start.streamSid {_short(sid)} does not match the message's streamSid "
            f"{_short(outer_sid)}"
        )
    tracks_raw = start.get("tracks", ())
    if type(tracks_raw) not in (list, tuple) or not all(type(t) is str for t in tracks_raw):
        raise ProtocolError(f"start.tracks must be a list of strings, got {_short(tracks_raw)}")
    params_raw = _obj(start, "customParameters", "start", required=False)
    params = {
        str(k): ("" if v is None else v if type(v) is str else orjson.dumps(v).decode())
        for k, v in params_raw.items()
    }
    fmt = _obj(start, "mediaFormat", "start", required=False)
    sample_rate = _opt_int(fmt.get("sampleRate"), "start.mediaFormat.sampleRate")
    channels = _opt_int(fmt.get("channels"), "start.mediaFormat.channels")
    return Start(
        stream_sid=sid,
        call_sid=_opt_str(start, "callSid", "start.callSid"),
        account_sid=_opt_str(start, "accountSid", "start.accountSid"),
        tracks=tuple(tracks_raw),
        custom_parameters=params,
        encoding=_opt_str(fmt, "encoding", "start.mediaFormat.encoding", "audio/x-mulaw"),
        sample_rate=8000 if sample_rate is None else sample_rate,
        channels=1 if channels is None else channels,
        sequence_number=_opt_int(msg.get("sequenceNumber"), "sequenceNumber"),
    )


def _parse_other(event: str, msg: dict[str, Any]) -> TwilioEvent:
    if event == "connected":
        return Connected(
            protocol=_opt_str(msg, "protocol", "connected.protocol"),
            version=_opt_str(msg, "version", "connected.version"),
        )
    if event == "start":
        return _parse_start(msg)
    sid = _opt_str(msg, "streamSid", "streamSid")
    if event == "dtmf":
        dtmf = _obj(msg, "dtmf", "dtmf")
        digit = dtmf.get("digit")
        if type(digit) is not str or not digit:
            raise ProtocolError(f"dtmf message needs a string dtmf.digit, got {_short(digit)}")
        return Dtmf(
            stream_sid=sid,
            digit=digit,
            track=_opt_str(dtmf, "track", "dtmf.track", "inbound_track"),
            sequence_number=_opt_int(msg.get("sequenceNumber"), "sequenceNumber"),
        )
    if event == "mark":
        mark = _obj(msg, "mark", "mark")
        name = mark.get("name")
        if type(name) is not str:
            raise ProtocolError(f"mark message needs a string mark.name, got {_short(name)}")
        return Mark(sid, name, _opt_int(msg.get("sequenceNumber"), "sequenceNumber"))
    if event == "stop":
        stop = _obj(msg, "stop", "stop", required=False)
        return Stop(
            stream_sid=sid,
            call_sid=_opt_str(stop, "callSid", "stop.callSid"),
            account_sid=_opt_str(stop, "accountSid", "stop.accountSid"),
            sequence_number=_opt_int(msg.get("sequenceNumber"), "sequenceNumber"),
        )
    return UnknownEvent(event, msg)


def parse_message(data: str | bytes, *, binary: bool = False) -> TwilioEvent:
    """Parse one WebSocket frame from Twilio; raise ProtocolError naming the broken rule.

    `data` is a text frame's content (bytes are accepted as its UTF-8, so a server may skip
    decoding). Pass `binary=True` for a binary frame: Twilio never sends those.
    Stateless: ordering and stream-id checks live in `TwilioStream`.
    """
    if binary:
        raise ProtocolError("binary frames are not part of the Twilio protocol")
    try:
        msg = _loads(data)
    except _JSONDecodeError:
        raise ProtocolError("invalid JSON") from None
    if type(msg) is not dict:
        raise ProtocolError(f"a message must be a JSON object, got {type(msg).__name__}")
    event = msg.get("event")
    if event == "media":
        return _parse_media(msg)
    if type(event) is not str or not event:
        raise ProtocolError(f"a message needs a string 'event' field, got {_short(event)}")
    return _parse_other(event, msg)


def decode_payload(payload: str) -> bytes:
    """Base64 media payload -> raw μ-law bytes; ProtocolError if it is not valid base64."""
    try:
        return binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("media.payload is not valid base64") from None


def encode_payload(ulaw: bytes | bytearray | memoryview) -> str:
    """Raw μ-law bytes -> the base64 text of a media payload."""
    return binascii.b2a_base64(ulaw, newline=False).decode("ascii")


# --------------------------------------------------------------------------- state machine


class StreamState(enum.Enum):
    """Where a stream is in its life: connected? -> start -> media... -> stop."""

    AWAITING_CONNECTED = "awaiting-connected"
    AWAITING_START = "awaiting-start"
    STREAMING = "streaming"
    STOPPED = "stopped"


class TwilioStream:
    """The inbound side of one Media Stream: feed it frames, get events or a ProtocolError.

    Rules: `connected` is optional but only first; `start` exactly once; media, dtmf and mark
    only after start; `stop` any time (before start it means the stream never began);
    nothing after stop; every streamSid matches the start's; no frame
    larger than `max_message_bytes`; media chunks only move forward (a duplicate or late
    chunk is rejected, since its audio can no longer be played in place). A rejected frame
    changes nothing but counters, so the call goes on.
    """

    __slots__ = (
        "duplicate_sequence_numbers",
        "frames_late",
        "frames_missing",
        "frames_received",
        "last_chunk",
        "last_sequence_number",
        "last_timestamp_ms",
        "max_message_bytes",
        "out_of_order_sequence_numbers",
        "protocol_errors",
        "sequence_gaps",
        "start",
        "state",
        "stream_sid",
    )

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self.state = StreamState.AWAITING_CONNECTED
        self.start: Start | None = None
        self.stream_sid: str | None = None
        self.frames_received = 0  # media frames accepted
        self.frames_missing = 0  # chunks skipped in the numbering (lost upstream)
        self.frames_late = 0  # duplicate or out-of-order chunks (rejected)
        self.last_chunk: int | None = None
        self.last_timestamp_ms: int | None = None
        self.last_sequence_number: int | None = None
        self.sequence_gaps = 0  # messages missing from the sequenceNumber count
        self.duplicate_sequence_numbers = 0
        self.out_of_order_sequence_numbers = 0
        self.protocol_errors = 0

    def __repr__(self) -> str:
        return (
            f"<TwilioStream {self.state.value} sid={self.stream_sid} "
            f"frames={self.frames_received} missing={self.frames_missing}>"
        )

    def receive(self, data: str | bytes, *, binary: bool = False) -> TwilioEvent:
        """Check and parse one frame; raise ProtocolError (state unchanged) if it breaks a rule."""
        try:
            return self._receive(data, binary)
        except ProtocolError:
            self.protocol_errors += 1
            raise

    def _size_check(self, data: str | bytes) -> None:
        limit = self.max_message_bytes
        size = len(data)
        if isinstance(data, str) and size * 4 > limit and size <= limit:
            size = len(data.encode("utf-8", "surrogatepass"))  # only when it could matter
        if size > limit:
            raise ProtocolError(f"frame of {size} bytes exceeds the {limit}-byte limit")

    def _receive(self, data: str | bytes, binary: bool) -> TwilioEvent:
        self._size_check(data)
        event = parse_message(data, binary=binary)
        state = self.state
        if state is StreamState.STOPPED:
            raise ProtocolError(f"{_event_name(event)} message after stop")
        if isinstance(event, Media):
            self._check_streaming(event)
            self._track_media(event)
        elif isinstance(event, Start):
            if state is StreamState.STREAMING:
                raise ProtocolError("start received twice (start is sent exactly once)")
            self.state = StreamState.STREAMING
            self.start = event
            self.stream_sid = event.stream_sid
            self._track_sequence(event.sequence_number)
        elif isinstance(event, Connected):
            if state is not StreamState.AWAITING_CONNECTED:
                raise ProtocolError("connected must be the first message of the stream")
            self.state = StreamState.AWAITING_START
        elif isinstance(event, UnknownEvent):
            pass
        elif isinstance(event, Stop) and state is not StreamState.STREAMING:
            self.state = StreamState.STOPPED  # the stream ended before it started
        else:  # Dtmf, Mark, Stop
            self._check_streaming(event)
            self._track_sequence(event.sequence_number)
            if isinstance(event, Stop):
                self.state = StreamState.STOPPED
        return event

    def _check_streaming(self, event: Media | Dtmf | Mark | Stop) -> None:
        if self.state is not StreamState.STREAMING:
            raise ProtocolError(f"{_event_name(event)} frame before start")
        sid = event.stream_sid
        if sid and sid != self.stream_sid:
            raise ProtocolError(
                f"streamSid {_short(sid)} does not match this stream's {self.stream_sid}"
            )

    def _track_media(self, event: Media) -> None:
        self._track_sequence(event.sequence_number)  # the message arrived, even if rejected
        chunk = event.chunk
        stamp = event.timestamp_ms
        # A frame comes every 20 ms: a jump of a minute or more is not a gap, it is a lie, and
        # believing it would make every real frame after it look late.
        if chunk is not None and chunk - (self.last_chunk or 0) > MAX_CHUNK_JUMP:
            raise ProtocolError(
                f"media chunk {chunk} jumps more than {MAX_CHUNK_JUMP} frames past "
                f"{self.last_chunk or 0}"
            )
        if stamp is not None and stamp - (self.last_timestamp_ms or 0) > MAX_TIMESTAMP_JUMP_MS:
            raise ProtocolError(
                f"media timestamp {stamp} ms jumps more than {MAX_TIMESTAMP_JUMP_MS} ms past "
                f"{self.last_timestamp_ms or 0} ms"
            )
        if chunk is not None:
            last = self.last_chunk
            if last is None:
                self.frames_missing += max(0, chunk - 1)  # Twilio numbers chunks from 1
            elif chunk <= last:
                self.frames_late += 1
                raise ProtocolError(
                    f"media chunk {chunk} is not after chunk {last} (duplicate or out of order)"
                )
            else:
                self.frames_missing += chunk - last - 1
            self.last_chunk = chunk
        if event.timestamp_ms is not None:
            self.last_timestamp_ms = event.timestamp_ms
        self.frames_received += 1

    def _track_sequence(self, seq: int | None) -> None:
        if seq is None:
            return
        last = self.last_sequence_number
        if last is None or seq > last:
            if last is not None:
                self.sequence_gaps += seq - last - 1
            self.last_sequence_number = seq
        elif seq == last:
            self.duplicate_sequence_numbers += 1
        else:
            self.out_of_order_sequence_numbers += 1


def _event_name(event: TwilioEvent) -> str:
    return event.name if isinstance(event, UnknownEvent) else type(event).__name__.lower()


# --------------------------------------------------------------------------- outbound


@functools.lru_cache(maxsize=4096)
def _json_str(value: str) -> str:
    """A JSON string literal; cached because a stream sends its streamSid thousands of times."""
    return orjson.dumps(value).decode()


def media_message(stream_sid: str, payload_b64: str) -> str:
    """`media` to Twilio: base64 raw μ-law 8 kHz (no header); Twilio queues and plays it."""
    sid = _json_str(stream_sid)
    return f'{{"event":"media","streamSid":{sid},"media":{{"payload":"{payload_b64}"}}}}'


def mark_message(stream_sid: str, name: str) -> str:
    """`mark` to Twilio: echoed back once everything sent before it has been played."""
    return orjson.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}).decode()


def clear_message(stream_sid: str) -> str:
    """`clear` to Twilio: drop queued audio now (barge-in); pending marks come back at once."""
    return f'{{"event":"clear","streamSid":{_json_str(stream_sid)}}}'


# --------------------------------------------------------------------------- TwiML

_NO_PARAMETERS: Mapping[str, str] = MappingProxyType({})


def _check_stream_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"<Stream> url must be an absolute ws:// or wss:// URL, got {url!r}")
    if "?" in url:
        raise ValueError(
            "<Stream> url must not carry a query string (Twilio error 31920); "
            "pass per-call values as <Parameter>s"
        )
    if parts.fragment:
        raise ValueError(f"<Stream> url must not carry a fragment, got {url!r}")


def connect_stream_twiml(
    stream_url: str,
    parameters: Mapping[str, str] = _NO_PARAMETERS,
    *,
    status_callback: str | None = None,
    action_url: str | None = None,
    after: Literal["hangup"] | None = None,
) -> str:
    """The voice-webhook answer: `<Connect><Stream>` with `<Parameter>`s for per-call values."""
    _check_stream_url(stream_url)
    response = VoiceResponse()
    connect = Connect(action=action_url) if action_url else Connect()
    stream = connect.stream(url=stream_url, status_callback=status_callback)
    for name, value in parameters.items():
        if not isinstance(name, str) or not name or not isinstance(value, str):
            raise ValueError(f"<Parameter> names and values must be strings, got {name!r}")
        stream.parameter(name=name, value=value)
    response.append(connect)
    if after == "hangup":
        response.hangup()
    elif after is not None:
        raise ValueError(f"after must be 'hangup' or None, got {after!r}")
    return str(response)


def busy_twiml(message: str | None, *, reject: bool = False) -> str:
    """Turn a call away: a polite `<Say>` then `<Hangup/>`, or `<Reject reason="busy"/>`.

    Reject answers before the call is picked up (caller hears busy, no billing); the polite
    form answers, speaks, and hangs up.
    """
    if reject:
        response = VoiceResponse()
        response.reject(reason="busy")
        return str(response)
    return hangup_twiml(message)


def hangup_twiml(say: str | None = None) -> str:
    """End the call, optionally saying something first."""
    response = VoiceResponse()
    if say:
        response.say(say)
    response.hangup()
    return str(response)


def stream_url_for(public_url: str, path: str = "/ws/twilio") -> str:
    """The `<Stream>` URL for a public base URL: https->wss, http->ws, same host:port."""
    parts = urlsplit(public_url)
    scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"public URL must be absolute http(s)://, got {public_url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"public URL must not carry a query or fragment, got {public_url!r}")
    full_path = parts.path.rstrip("/") + "/" + path.lstrip("/")
    return urlunsplit((scheme, parts.netloc, full_path.rstrip("/") or "/", "", ""))


# --------------------------------------------------------------------------- signatures


SIGNATURE_SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"

# Older twilio releases (< 9.13) take no `algorithm`: the TypeError would be caught below as an
# invalid signature and every genuine request refused. Fail at import instead, saying why.
if "algorithm" not in inspect.signature(RequestValidator.validate).parameters:  # pragma: no cover
    raise ImportError("livecall needs twilio >= 9.13 (RequestValidator.validate(..., algorithm))")


class TwilioSignature:
    """`X-Twilio-Signature` checks and signing, via `twilio.request_validator.RequestValidator`.

    By default Twilio signs with the account auth token and HMAC-SHA1. When a Webhook Rule
    matches the URL, Twilio signs with that rule's SharedKey secret and the algorithm named in
    the `X-Twilio-Webhooks-Signature-Settings` header (``key=<id>,algorithm=HMAC_SHA256``);
    pass that header as `settings_header`. A request with the header is only ever checked
    with the shared key (never the auth token), so a rule cannot be bypassed by dropping it
    from the checks. Needs twilio >= 9.13 (`validate(..., algorithm)`).

    No secret appears in a repr or an exception.
    """

    __slots__ = ("_shared", "_validator")

    def __init__(self, auth_token: str, shared_key: str | None = None) -> None:
        if not isinstance(auth_token, str) or not auth_token:
            raise ValueError("a Twilio auth token must be a non-empty string")
        self._validator = RequestValidator(auth_token)
        self._shared = RequestValidator(shared_key) if shared_key else None

    def __repr__(self) -> str:
        return "TwilioSignature(auth_token=<redacted>)"

    @property
    def has_shared_key(self) -> bool:
        return self._shared is not None

    def validate_webhook(
        self,
        url: str,
        params: Mapping[str, str],
        signature: str | None,
        *,
        settings_header: str | None = None,
    ) -> bool:
        """True if `signature` signs this exact URL + POST params (with or without the port)."""
        if not signature:
            return False
        if settings_header:
            if self._shared is None:
                return False  # a Webhook Rule signed it, and we do not hold its key
            validator = self._shared
            algorithm = get_signature_algorithm(settings_header)
        else:
            validator, algorithm = self._validator, HMAC_SHA1
        try:
            return bool(validator.validate(url, params, signature, algorithm))
        except (TypeError, ValueError):
            return False  # malformed input is simply not a valid signature

    def validate_websocket(
        self, url: str, signature: str | None, *, settings_header: str | None = None
    ) -> bool:
        """The stream upgrade's signature is over the ws(s):// URL alone, with no params."""
        return self.validate_webhook(url, {}, signature, settings_header=settings_header)

    def sign(
        self,
        url: str,
        params: Mapping[str, str] | None = None,
        *,
        algorithm: str | None = None,
    ) -> str:
        """The signature Twilio would send for this URL and params (used by the simulator)."""
        signature: str = self._validator.compute_signature(url, params or {}, algorithm)
        return signature
