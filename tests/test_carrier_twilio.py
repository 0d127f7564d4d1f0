"""The Twilio adapter: Media Streams as a `CarrierStream`, its wire unchanged byte for byte."""

from __future__ import annotations

import base64
import json

import pytest

from livecall.carriers.base import (
    ULAW_8K,
    CallerAudio,
    CallStarted,
    CallStopped,
    CarrierProtocolError,
    Dtmf,
    Ignored,
    MediaFormat,
    PlayedUpTo,
)
from livecall.carriers.twilio import CAPABILITIES, TwilioCarrierStream, call_started
from livecall.telephony import twilio as tw

SID = "MZ" + "a" * 32
CALL = "CA" + "b" * 32
ACCOUNT = "AC" + "c" * 32
AUDIO = bytes(range(160))


def frame(event: str, **body: object) -> str:
    return json.dumps({"event": event, "streamSid": SID, **body})


def start_frame(encoding: str = "audio/x-mulaw") -> str:
    start = {
        "accountSid": ACCOUNT,
        "streamSid": SID,
        "callSid": CALL,
        "tracks": ["inbound"],
        "customParameters": {"token": "t0k", "profile": "front-desk"},
        "mediaFormat": {"encoding": encoding, "sampleRate": 8000, "channels": 1},
    }
    return frame("start", start=start)


def media_frame(chunk: int, track: str = "inbound", payload: str | None = None) -> str:
    payload = base64.b64encode(AUDIO).decode() if payload is None else payload
    media = {"track": track, "chunk": str(chunk), "timestamp": str(20 * chunk), "payload": payload}
    return frame("media", media=media)


def started() -> TwilioCarrierStream:
    stream = TwilioCarrierStream()
    assert stream.receive('{"event":"connected","protocol":"Call","version":"1.0.0"}') == Ignored(
        "connected"
    )
    event = stream.receive(start_frame())
    assert event == CallStarted(
        CALL, SID, ULAW_8K, {"token": "t0k", "profile": "front-desk"}, account_id=ACCOUNT
    )
    assert stream.started == event
    return stream


def test_events_map_to_the_carrier_neutral_ones() -> None:
    stream = started()
    assert stream.receive(media_frame(1)) == CallerAudio(AUDIO, None, 20)
    assert stream.receive(media_frame(2, track="outbound")) == Ignored("media on track outbound")
    assert stream.receive(frame("dtmf", dtmf={"digit": "5", "track": "inbound_track"})) == Dtmf("5")
    assert stream.receive(frame("mark", mark={"name": "a1"})) == PlayedUpTo("a1")
    assert stream.receive(frame("brandnew")) == Ignored("brandnew")
    assert stream.receive(frame("stop", stop={"accountSid": ACCOUNT, "callSid": CALL})) == (
        CallStopped("stop")
    )
    assert stream.frames_missing == 0 and stream.last_chunk == 2  # counters read through


def test_protocol_errors_become_carrier_protocol_errors_and_change_nothing() -> None:
    stream = started()
    with pytest.raises(CarrierProtocolError, match="base64"):
        stream.receive(media_frame(1, payload="not base64!"))
    with pytest.raises(CarrierProtocolError):
        stream.receive(b"\x00binary")
    with pytest.raises(CarrierProtocolError, match="does not match"):
        stream.receive(json.dumps({"event": "mark", "streamSid": "MZother", "mark": {"name": "x"}}))
    assert stream.protocol_errors == 3
    assert isinstance(stream.receive(media_frame(2)), CallerAudio)  # the stream goes on


def test_commands_are_the_exact_frames_twilio_always_got() -> None:
    stream = started()
    payload = base64.b64encode(AUDIO).decode()
    assert stream.play(AUDIO) == [tw.media_message(SID, payload)]
    assert stream.play(AUDIO) == [
        f'{{"event":"media","streamSid":"{SID}","media":{{"payload":"{payload}"}}}}'
    ]
    assert stream.mark("a7") == [f'{{"event":"mark","streamSid":"{SID}","mark":{{"name":"a7"}}}}']
    assert stream.clear() == [f'{{"event":"clear","streamSid":"{SID}"}}']
    assert stream.flush() == [] and stream.send_dtmf("12") == [] and stream.hangup() == []
    assert stream.media_format == ULAW_8K and stream.capabilities is CAPABILITIES
    assert not CAPABILITIES.send_dtmf_on_stream  # the core plays DTMF tones in-band


def test_wrapping_a_stream_already_past_its_start() -> None:
    raw = tw.TwilioStream()
    start = raw.receive(start_frame("audio/x-alaw"))
    assert isinstance(start, tw.Start)
    stream = TwilioCarrierStream(raw)
    assert stream.started == call_started(start)
    assert stream.started.media_format == MediaFormat("alaw", 8000)
    assert stream.closed(1006) == CallStopped("closed (1006)")
    with pytest.raises(CarrierProtocolError, match="after stop"):
        stream.receive(media_frame(1))
