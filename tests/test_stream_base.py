"""The checks every JSON carrier stream shares (`carriers.stream_base`), run on each carrier.

Telnyx, Plivo and Exotel differ in names (`stream_id`, `streamId`, `stream_sid`), in counters
(strings or numbers) and in payloads (μ-law or 16-bit PCM); the rules below are the same for
all three, made once in `JsonCarrierStream`: a refused frame raises `CarrierProtocolError`,
counts one protocol error and leaves the stream exactly as it was.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from livecall.carriers.base import CallerAudio, CallStarted, CallStopped, CarrierProtocolError
from livecall.carriers.exotel.wire import ExotelStream
from livecall.carriers.plivo.wire import PlivoStream
from livecall.carriers.stream_base import (
    JsonCarrierStream,
    StreamState,
    custom_parameters,
    text,
    whole_number,
)
from livecall.carriers.telnyx.wire import TelnyxStream

SID = "stream-1"


def j(msg: dict[str, Any]) -> str:
    return orjson.dumps(msg).decode()


@dataclass(frozen=True)
class Wire:
    """One carrier's spelling of the shared protocol."""

    name: str
    new: Callable[[], JsonCarrierStream]
    start: dict[str, Any]
    sid_key: str
    media: Callable[[int, str], dict[str, Any]]  # (chunk, stream id) -> media frame
    stop: dict[str, Any]


WIRES = [
    Wire(
        "telnyx",
        lambda: TelnyxStream(max_frame_bytes=4096),
        {
            "event": "start",
            "sequence_number": "1",
            "stream_id": SID,
            "start": {"call_control_id": "v3:call", "media_format": {"encoding": "PCMU"}},
        },
        "stream_id",
        lambda n, sid: {
            "event": "media",
            "stream_id": sid,
            "media": {"chunk": str(n), "payload": base64.b64encode(bytes(160)).decode()},
        },
        {"event": "stop", "stream_id": SID},
    ),
    Wire(
        "plivo",
        lambda: PlivoStream(max_frame_bytes=4096),
        {
            "event": "start",
            "sequenceNumber": 1,
            "start": {
                "callId": "call",
                "streamId": SID,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
            },
        },
        "streamId",
        lambda n, sid: {
            "event": "media",
            "streamId": sid,
            "media": {"chunk": n, "payload": base64.b64encode(bytes(160)).decode()},
        },
        {"event": "stop", "streamId": SID},
    ),
    Wire(
        "exotel",
        lambda: ExotelStream(max_frame_bytes=4096),
        {"event": "start", "stream_sid": SID, "start": {"stream_sid": SID, "call_sid": "call"}},
        "stream_sid",
        lambda n, sid: {
            "event": "media",
            "stream_sid": sid,
            "media": {"chunk": str(n), "payload": base64.b64encode(bytes(320)).decode()},
        },
        {"event": "stop", "stream_sid": SID},
    ),
]
IDS = [w.name for w in WIRES]


def streaming(wire: Wire) -> JsonCarrierStream:
    stream = wire.new()
    assert isinstance(stream.receive(j(wire.start)), CallStarted)
    assert isinstance(stream.receive(j(wire.media(1, SID))), CallerAudio)
    return stream


def snapshot(stream: JsonCarrierStream) -> tuple[Any, ...]:
    return (
        stream.state,
        stream.stream_id,
        stream.last_chunk,
        stream.frames_received,
        stream.frames_missing,
    )


def refuses(stream: JsonCarrierStream, frame: str | bytes, rule: str) -> None:
    before, errors = snapshot(stream), stream.protocol_errors
    with pytest.raises(CarrierProtocolError, match=rule):
        stream.receive(frame)
    assert snapshot(stream) == before and stream.protocol_errors == errors + 1


@pytest.mark.parametrize("wire", WIRES, ids=IDS)
@pytest.mark.parametrize(
    ("frame", "rule"),
    [
        (b'{"event":"media"}', "binary frames are not part of"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object, got list"),
        ('{"event": ""}', "string 'event'"),
        ('{"event": 7}', "string 'event'"),
        (" " * 4097, "frame of 4097 bytes exceeds the 4096-byte limit"),
        ("€" * 1500, "frame of 4500 bytes exceeds"),  # counted in UTF-8 bytes, not characters
    ],
)
def test_every_json_stream_refuses_what_is_not_a_json_event(
    wire: Wire, frame: str | bytes, rule: str
) -> None:
    refuses(streaming(wire), frame, rule)


@pytest.mark.parametrize("wire", WIRES, ids=IDS)
def test_media_before_start_is_refused(wire: Wire) -> None:
    stream = wire.new()
    refuses(stream, j(wire.media(1, SID)), "media (frame|message) before start")
    assert stream.started is None


@pytest.mark.parametrize("wire", WIRES, ids=IDS)
def test_start_comes_once_and_frames_carry_this_streams_id(wire: Wire) -> None:
    stream = streaming(wire)
    refuses(stream, j(wire.start), "start received twice")
    refuses(stream, j(wire.media(2, "another")), f"{wire.sid_key} 'another' does not match")
    assert isinstance(stream.receive(j(wire.media(2, SID))), CallerAudio)  # the call goes on


@pytest.mark.parametrize("wire", WIRES, ids=IDS)
def test_chunks_only_move_forward_and_losses_are_counted(wire: Wire) -> None:
    stream = streaming(wire)
    stream.receive(j(wire.media(4, SID)))
    assert (stream.last_chunk, stream.frames_missing) == (4, 2)
    for late in (4, 3):
        refuses(stream, j(wire.media(late, SID)), "media chunk .* is not after chunk 4")
    assert stream.frames_late == 2
    refuses(stream, j(wire.media(4 + stream.MAX_CHUNK_JUMP + 1, SID)), "jumps more than")
    bad = wire.media(5, SID)
    bad["media"]["payload"] = "@@@"
    refuses(stream, j(bad), "media.payload is not valid base64")
    assert isinstance(stream.receive(j(wire.media(5, SID))), CallerAudio)


@pytest.mark.parametrize("wire", WIRES, ids=IDS)
def test_nothing_after_stop_or_close(wire: Wire) -> None:
    stream = streaming(wire)
    assert isinstance(stream.receive(j(wire.stop)), CallStopped)
    assert stream.state is StreamState.STOPPED
    refuses(stream, j(wire.media(2, SID)), "media (frame|message) after stop")
    refuses(stream, j(wire.start), "start (frame|message) after stop")
    closed = streaming(wire)
    assert closed.closed(1006) == CallStopped("closed (1006)")
    refuses(closed, j(wire.media(2, SID)), "after stop")


def test_the_shared_field_readers_name_the_rule() -> None:
    assert whole_number("42", "n") == 42 and whole_number(7, "n") == 7
    assert whole_number(None, "n") is None
    assert whole_number(3.0, "n", floats=True) == 3
    for bad in (3.0, "4a", "٣", True, [1]):  # floats only when asked; ASCII digits only
        with pytest.raises(CarrierProtocolError, match="n must be a whole number"):
            whole_number(bad, "n")
    with pytest.raises(CarrierProtocolError, match="n 2147483648 is out of range"):
        whole_number(2**31, "n")
    assert text({"a": "x"}, "a", "field") == "x" and text({}, "a", "field") is None
    with pytest.raises(CarrierProtocolError, match="field must be a string"):
        text({"a": 1}, "a", "field")
    with pytest.raises(CarrierProtocolError, match="field is required"):
        text({}, "a", "field", required=True)
    with pytest.raises(CarrierProtocolError, match="field must be a non-empty string"):
        text({"a": ""}, "a", "field", required=True)
    raw = {"s": "v", "n": 3, "none": None}
    assert custom_parameters(raw, "p") == {"s": "v", "n": "3", "none": ""}
    assert custom_parameters(raw, "p", null="null")["none"] == "null"
    assert custom_parameters(None, "p") == {}
    with pytest.raises(CarrierProtocolError, match="p must be an object"):
        custom_parameters(["a"], "p")
