"""What every JSON media stream checks, whatever the carrier: one state machine base, sans I/O.

Telnyx, Plivo and Exotel (and Twilio, whose older parser lives in `telephony.twilio`) speak the
same shape of protocol: JSON text frames, each an object with a string `event`, bounded in
size; an optional `connected` hello first, `start` exactly once, media and the rest only while
streaming and only with this stream's id, nothing after `stop`; media chunks numbered forward
only, base64 payloads. `JsonCarrierStream` makes those checks once. A carrier's stream
subclasses it, names its words (`SID_KEY`, `NOUN`, `HAS_CONNECTED`, …) and handles its own
events in `_on_event`; the helpers (`whole_number`, `text`, `decode_base64`, `_obj`,
`_check_streaming`, `_next_chunk`, `_track_seq`) give every carrier the same rule texts.

A frame that breaks a rule raises `CarrierProtocolError` naming the rule and changes nothing
but the counters (`protocol_errors`, `frames_late`): every check runs before any state moves.
"""

from __future__ import annotations

import binascii
import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

from livecall.carriers.base import (
    CallStarted,
    CallStopped,
    CarrierEvent,
    CarrierProtocolError,
    Frame,
    Ignored,
)

__all__ = [
    "MAX_COUNTER",
    "JsonCarrierStream",
    "StreamState",
    "custom_parameters",
    "decode_base64",
    "short",
    "text",
    "whole_number",
]

MAX_COUNTER = 2**31 - 1  # counters (sequence numbers, chunks, timestamps) beyond this are lies


class StreamState(enum.Enum):
    """Where a stream is: connected? -> start -> media... -> stop."""

    AWAITING_CONNECTED = "awaiting-connected"
    AWAITING_START = "awaiting-start"
    STREAMING = "streaming"
    STOPPED = "stopped"


def short(value: object) -> str:
    """A value for an error message, cut short so a hostile frame can't flood the logs."""
    rep = repr(value)
    return rep if len(rep) <= 40 else rep[:37] + "..."


def whole_number(
    value: object, field: str, *, max_value: int = MAX_COUNTER, floats: bool = False
) -> int | None:
    """A counter sent as a number or a digit string ("4"); None when absent. `floats` also
    takes whole floats (4.0), as some carriers' JSON encoders send them."""
    if value is None:
        return None
    if type(value) is int:
        number = value
    elif (type(value) is str and value.isascii() and value.isdigit()) or (
        floats and type(value) is float and value.is_integer()
    ):
        number = int(value)
    else:
        raise CarrierProtocolError(f"{field} must be a whole number, got {short(value)}")
    if number < 0 or number > max_value:
        raise CarrierProtocolError(f"{field} {number} is out of range")
    return number


def text(
    container: Mapping[str, Any], key: str, field: str, *, required: bool = False
) -> str | None:
    """A string field (None when absent); `required`: present and non-empty."""
    value = container.get(key)
    if value is None:
        if required:
            raise CarrierProtocolError(f"{field} is required")
        return None
    if type(value) is not str:
        kind = "a non-empty string" if required else "a string"
        raise CarrierProtocolError(f"{field} must be {kind}, got {short(value)}")
    if required and not value:
        raise CarrierProtocolError(f"{field} must be a non-empty string, got {short(value)}")
    return value


def custom_parameters(raw: object, field: str, *, null: str = "") -> dict[str, str]:
    """A `start`'s custom parameters object: string values kept, JSON null as `null`, other
    values as their JSON text; None when absent is {}."""
    if raw is None:
        return {}
    if type(raw) is not dict:
        raise CarrierProtocolError(f"{field} must be an object, got {short(raw)}")
    return {
        str(k): (null if v is None else v if type(v) is str else orjson.dumps(v).decode())
        for k, v in raw.items()
    }


def decode_base64(payload: str, field: str = "media.payload") -> bytes:
    """A payload's bytes; strict base64 (no stray characters, right padding)."""
    try:
        return binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        raise CarrierProtocolError(f"{field} is not valid base64") from None


class JsonCarrierStream(ABC):
    """One call's JSON media stream: the checks all carriers share (see the module docstring).

    Subclasses set the class words and implement `_on_event(event, msg)`, which runs for a
    well-formed frame of a stream not yet stopped; they call `_connected`, `_check_start_once`,
    `_check_streaming` and `_commit_streaming` where their protocol has those steps.
    """

    # what the carrier calls a frame in its docs ("frame", "message"), for the rule texts
    NOUN: ClassVar[str] = "frame"
    # the refusal of a binary frame, in the carrier's words
    BINARY_REFUSED: ClassVar[str] = "binary frames are not part of this stream's protocol"
    # the key of the stream id on a frame
    SID_KEY: ClassVar[str] = "stream_id"
    # whether the carrier says `connected` before `start`
    HAS_CONNECTED: ClassVar[bool] = True
    # chunks further ahead than this are a lie, not a loss
    MAX_CHUNK_JUMP: ClassVar[int] = 3000
    # whether chunks are numbered from 1 (a first chunk above 1 means frames were lost before it)
    CHUNKS_FROM_ONE: ClassVar[bool] = True
    # why a chunk that is not after the last one is refused
    LATE_WHY: ClassVar[str] = "duplicate or out of order"
    # whether the size limit is checked before the frame type (a huge binary frame names the size)
    SIZE_FIRST: ClassVar[bool] = False

    def __init__(self, *, max_frame_bytes: int) -> None:
        if max_frame_bytes <= 0:
            raise ValueError("max_frame_bytes must be positive")
        self.max_frame_bytes = max_frame_bytes
        self.state = (
            StreamState.AWAITING_CONNECTED if self.HAS_CONNECTED else StreamState.AWAITING_START
        )
        self.started: CallStarted | None = None
        self.stream_id: str | None = None
        self.last_chunk: int | None = None
        self.frames_received = 0
        self.frames_missing = 0  # chunks skipped in the numbering (lost upstream)
        self.frames_late = 0  # duplicate or out-of-order chunks (refused)
        self.sequence_gaps = 0  # sequence numbers skipped (where `_track_seq` is fed)
        self.protocol_errors = 0
        self._last_seq: int | None = None

    # ------------------------------------------------------------------ inbound

    def receive(self, frame: Frame) -> CarrierEvent:
        """Check and parse one frame; CarrierProtocolError (state unchanged) if it breaks a rule.

        The shared checks run here, inline (the media hot path): text, size, JSON object,
        string event, not after stop; then the carrier's `_on_event`.
        """
        try:
            binary = not isinstance(frame, str)
            if binary and not self.SIZE_FIRST:
                raise CarrierProtocolError(self.BINARY_REFUSED)
            limit = self.max_frame_bytes
            size = len(frame)
            if isinstance(frame, str) and size * 4 > limit and size <= limit:
                size = len(frame.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise CarrierProtocolError(f"frame of {size} bytes exceeds the {limit}-byte limit")
            if binary:
                raise CarrierProtocolError(self.BINARY_REFUSED)
            try:
                msg = orjson.loads(frame)
            except orjson.JSONDecodeError:
                raise CarrierProtocolError("invalid JSON") from None
            if type(msg) is not dict:
                raise CarrierProtocolError(
                    f"a {self.NOUN} must be a JSON object, got {type(msg).__name__}"
                )
            event = msg.get("event")
            if type(event) is not str or not event:
                raise CarrierProtocolError(
                    f"a {self.NOUN} needs a string 'event', got {short(event)}"
                )
            if self.state is StreamState.STOPPED:
                raise CarrierProtocolError(f"{event} {self.NOUN} after stop")
            return self._on_event(event, msg)
        except CarrierProtocolError:
            self.protocol_errors += 1
            raise

    @abstractmethod
    def _on_event(self, event: str, msg: dict[str, Any]) -> CarrierEvent:
        """One well-formed frame of a live stream: the carrier's own rules and events."""

    def _obj(self, msg: Mapping[str, Any], key: str, event: str) -> dict[str, Any]:
        """The object under `key` (the event's body), or the rule it breaks."""
        value = msg.get(key)
        if type(value) is not dict:
            raise CarrierProtocolError(
                f"{event} {self.NOUN} needs a {key!r} object, got {short(value)}"
            )
        return value

    def _connected(self) -> Ignored:
        """The `connected` hello: first or not at all."""
        if self.state is not StreamState.AWAITING_CONNECTED:
            raise CarrierProtocolError(f"connected must be the first {self.NOUN} of the stream")
        self.state = StreamState.AWAITING_START
        return Ignored("connected")

    def _check_start_once(self) -> None:
        if self.state is StreamState.STREAMING:
            raise CarrierProtocolError("start received twice (start is sent exactly once)")

    def _commit_streaming(self, stream_id: str) -> None:
        """`start` passed every check: the stream is live under `stream_id`."""
        self.state = StreamState.STREAMING
        self.stream_id = stream_id

    def _check_streaming(self, msg: Mapping[str, Any], event: str) -> None:
        """Frames other than connected/start/stop: only while streaming, with this stream's id."""
        if self.state is not StreamState.STREAMING:
            raise CarrierProtocolError(f"{event} {self.NOUN} before start")
        self._check_id(msg, event)

    def _check_id(self, msg: Mapping[str, Any], event: str) -> None:
        """A stream id on the frame, if any, must be this stream's."""
        sid = msg.get(self.SID_KEY)
        if sid is not None and self.stream_id is not None and sid != self.stream_id:
            raise CarrierProtocolError(
                f"{event} {self.SID_KEY} {short(sid)} does not match this stream's {self.stream_id}"
            )

    def _stopped(self, reason: str | None) -> CallStopped:
        self.state = StreamState.STOPPED
        return CallStopped(reason)

    def _next_chunk(self, chunk: int | None) -> None:
        """Check a media chunk number moves forward (not too far), then count what it skipped.
        Call it last, once every other check of the frame has passed."""
        if chunk is None:
            return
        last = self.last_chunk
        if last is not None and chunk <= last:
            self.frames_late += 1
            raise CarrierProtocolError(
                f"media chunk {chunk} is not after chunk {last} ({self.LATE_WHY})"
            )
        if chunk - (last or 0) > self.MAX_CHUNK_JUMP:
            raise CarrierProtocolError(
                f"media chunk {chunk} jumps more than {self.MAX_CHUNK_JUMP} frames past {last or 0}"
            )
        if last is not None or self.CHUNKS_FROM_ONE:
            self.frames_missing += max(0, chunk - (last or 0) - 1)
        self.last_chunk = chunk

    def _track_seq(self, seq: int | None) -> None:
        """Count sequence numbers skipped; one at or below the last is tolerated (not counted)."""
        if seq is None:
            return
        last = self._last_seq
        if last is None or seq > last:
            if last is not None:
                self.sequence_gaps += seq - last - 1
            self._last_seq = seq

    # ------------------------------------------------------------------ outbound

    def closed(self, code: int | None = None) -> CallStopped:
        """The socket closed: the stream is over even if its `stop` never came."""
        return self._stopped("closed" if code is None else f"closed ({code})")
