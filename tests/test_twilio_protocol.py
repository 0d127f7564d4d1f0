"""Twilio Media Streams, sans I/O: parsing, state machine, builders, TwiML, signatures."""

from __future__ import annotations

import base64
import contextlib
import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twilio.request_validator import HMAC_SHA256, RequestValidator

from livecall.telephony.twilio import (
    Connected,
    Dtmf,
    Mark,
    Media,
    ProtocolError,
    Start,
    Stop,
    StreamState,
    TwilioSignature,
    TwilioStream,
    UnknownEvent,
    busy_twiml,
    clear_message,
    connect_stream_twiml,
    decode_payload,
    encode_payload,
    hangup_twiml,
    mark_message,
    media_message,
    parse_message,
    stream_url_for,
)

SID = "MZ" + "a" * 32
CALL = "CA" + "b" * 32
ACCOUNT = "AC" + "c" * 32
PAYLOAD = base64.b64encode(b"\xff" * 160).decode()

CONNECTED = '{"event":"connected","protocol":"Call","version":"1.0.0"}'


def start_msg(seq: Any = "1", sid: str = SID, **start: Any) -> str:
    body = {
        "accountSid": ACCOUNT,
        "streamSid": sid,
        "callSid": CALL,
        "tracks": ["inbound"],
        "customParameters": {"profile": "front-desk"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    body.update(start)
    return json.dumps({"event": "start", "sequenceNumber": seq, "streamSid": sid, "start": body})


def media_msg(chunk: Any = "1", ts: Any = "0", seq: Any = "2", sid: str = SID, **extra: Any) -> str:
    media = {"track": "inbound", "chunk": chunk, "timestamp": ts, "payload": PAYLOAD}
    msg = {"event": "media", "sequenceNumber": seq, "streamSid": sid, "media": media}
    msg.update(extra)
    return json.dumps(msg, ensure_ascii=False)


def dtmf_msg(digit: str = "1", seq: Any = "5", sid: str = SID) -> str:
    return json.dumps(
        {
            "event": "dtmf",
            "sequenceNumber": seq,
            "streamSid": sid,
            "dtmf": {"track": "inbound_track", "digit": digit},
        }
    )


def mark_msg(name: str = "a7", seq: Any = "6", sid: str = SID) -> str:
    return json.dumps(
        {"event": "mark", "sequenceNumber": seq, "streamSid": sid, "mark": {"name": name}}
    )


def stop_msg(seq: Any = "7", sid: str = SID) -> str:
    return json.dumps(
        {
            "event": "stop",
            "sequenceNumber": seq,
            "streamSid": sid,
            "stop": {"accountSid": ACCOUNT, "callSid": CALL},
        }
    )


def streaming() -> TwilioStream:
    stream = TwilioStream()
    stream.receive(CONNECTED)
    stream.receive(start_msg())
    return stream


# --------------------------------------------------------------------------- parsing


def test_parse_every_documented_shape() -> None:
    assert parse_message(CONNECTED) == Connected("Call", "1.0.0")
    start = parse_message(start_msg())
    assert start == Start(
        SID, CALL, ACCOUNT, ("inbound",), {"profile": "front-desk"}, "audio/x-mulaw", 8000, 1, 1
    )
    assert parse_message(media_msg("2", "40", "4")) == Media(SID, "inbound", 2, 40, PAYLOAD, 4)
    assert parse_message(dtmf_msg()) == Dtmf(SID, "1", "inbound_track", 5)
    assert parse_message(mark_msg()) == Mark(SID, "a7", 6)
    assert parse_message(stop_msg()) == Stop(SID, CALL, ACCOUNT, 7)


def test_counters_may_be_strings_or_ints_and_bytes_are_utf8_text() -> None:
    assert parse_message(media_msg(2, 40, 4)) == Media(SID, "inbound", 2, 40, PAYLOAD, 4)
    assert parse_message(media_msg(2.0, "40", 4)).chunk == 2
    assert parse_message(media_msg().encode()) == parse_message(media_msg())
    start = parse_message(start_msg(seq=1, mediaFormat={"sampleRate": "8000"}))
    assert isinstance(start, Start)
    assert (start.sequence_number, start.sample_rate, start.encoding, start.channels) == (
        1,
        8000,
        "audio/x-mulaw",
        1,
    )


def test_optional_fields_may_be_missing_and_extras_are_ignored() -> None:
    bare = parse_message(json.dumps({"event": "media", "media": {"payload": PAYLOAD}, "x": 1}))
    assert bare == Media("", "inbound", None, None, PAYLOAD, None)
    assert parse_message('{"event":"connected"}') == Connected("", "")
    start = parse_message('{"event":"start","start":{"streamSid":"MZ1"}}')
    assert start == Start("MZ1", "", "", (), {}, "audio/x-mulaw", 8000, 1, None)
    assert parse_message('{"event":"stop","streamSid":"MZ1"}') == Stop("MZ1", "", "", None)
    dtmf = parse_message('{"event":"dtmf","dtmf":{"digit":"#"},"extra":[1,2]}')
    assert dtmf == Dtmf("", "#", "inbound_track", None)
    odd = parse_message(start_msg(customParameters={"n": 3, "empty": None, "s": "x"}))
    assert isinstance(odd, Start) and odd.custom_parameters == {"n": "3", "empty": "", "s": "x"}


def test_unknown_events_are_tolerated() -> None:
    event = parse_message('{"event":"transcription","streamSid":"MZ1","text":"hi"}')
    assert isinstance(event, UnknownEvent) and event.name == "transcription"
    assert event.raw["text"] == "hi"


@pytest.mark.parametrize(
    ("frame", "rule"),
    [
        ("{not json", "invalid JSON"),
        ("", "invalid JSON"),
        (b"\xff\xfe", "invalid JSON"),
        ("[1,2]", "must be a JSON object"),
        ('{"streamSid":"MZ1"}', "'event' field"),
        ('{"event":3}', "'event' field"),
        ('{"event":"media","streamSid":"MZ1"}', "'media' object"),
        ('{"event":"media","media":{"payload":7}}', "media.payload"),
        ('{"event":"media","media":{"payload":"","chunk":"two"}}', "media.chunk"),
        ('{"event":"media","media":{"payload":"","timestamp":[1]}}', "media.timestamp"),
        ('{"event":"media","sequenceNumber":"-1","media":{"payload":""}}', "must not be negative"),
        ('{"event":"media","streamSid":5,"media":{"payload":""}}', "streamSid must be a string"),
        ('{"event":"start"}', "'start' object"),
        ('{"event":"start","start":{}}', "non-empty streamSid"),
        ('{"event":"start","streamSid":"MZ2","start":{"streamSid":"MZ1"}}', "does not match"),
        ('{"event":"start","start":{"streamSid":"MZ1","tracks":"inbound"}}', "start.tracks"),
        ('{"event":"dtmf","dtmf":{}}', "dtmf.digit"),
        ('{"event":"mark","mark":{"name":1}}', "mark.name"),
        ('{"event":"stop","stop":{"callSid":1}}', "stop.callSid"),
    ],
)
def test_protocol_errors_name_the_rule(frame: str | bytes, rule: str) -> None:
    with pytest.raises(ProtocolError, match=rule.replace("[", r"\[").replace(".", r"\.")):
        parse_message(frame)


def test_binary_frames_are_refused() -> None:
    with pytest.raises(ProtocolError, match="binary frames are not part of the Twilio protocol"):
        parse_message(b'{"event":"connected"}', binary=True)


def test_payload_helpers() -> None:
    assert decode_payload(encode_payload(b"\x00\x7f\xff")) == b"\x00\x7f\xff"
    with pytest.raises(ProtocolError, match="not valid base64"):
        decode_payload("@@@")
    with pytest.raises(ProtocolError, match="not valid base64"):
        decode_payload("AAA")  # bad padding


# --------------------------------------------------------------------------- state machine


def test_stream_lifecycle_and_counters() -> None:
    stream = TwilioStream()
    assert stream.state is StreamState.AWAITING_CONNECTED
    assert isinstance(stream.receive(CONNECTED), Connected)
    assert stream.state is StreamState.AWAITING_START
    assert isinstance(stream.receive(start_msg()), Start)
    assert stream.state is StreamState.STREAMING and stream.stream_sid == SID
    assert stream.start is not None and stream.start.call_sid == CALL
    for i in range(1, 4):
        stream.receive(media_msg(str(i), str(20 * (i - 1)), str(i + 1)))
    stream.receive(dtmf_msg(seq="5"))
    stream.receive(mark_msg(seq="6"))
    assert isinstance(stream.receive(stop_msg(seq="7")), Stop)
    assert stream.state is StreamState.STOPPED
    assert (stream.frames_received, stream.frames_missing, stream.last_timestamp_ms) == (3, 0, 40)
    assert (stream.sequence_gaps, stream.protocol_errors) == (0, 0)


def test_connected_is_optional_but_only_first() -> None:
    stream = TwilioStream()
    stream.receive(start_msg())  # no connected: fine
    with pytest.raises(ProtocolError, match="connected must be the first message"):
        stream.receive(CONNECTED)
    twice = TwilioStream()
    twice.receive(CONNECTED)
    with pytest.raises(ProtocolError, match="connected must be the first message"):
        twice.receive(CONNECTED)


@pytest.mark.parametrize(
    ("frame", "rule"),
    [
        (media_msg(), "media frame before start"),
        (dtmf_msg(), "dtmf frame before start"),
        (mark_msg(), "mark frame before start"),
    ],
)
def test_nothing_but_start_opens_the_stream(frame: str, rule: str) -> None:
    stream = TwilioStream()
    stream.receive(CONNECTED)
    with pytest.raises(ProtocolError, match=rule):
        stream.receive(frame)
    assert stream.state is StreamState.AWAITING_START
    stream.receive(start_msg())  # still usable
    assert stream.receive(media_msg()).chunk == 1  # type: ignore[union-attr]


def test_start_exactly_once_and_nothing_after_stop() -> None:
    stream = streaming()
    with pytest.raises(ProtocolError, match="start received twice"):
        stream.receive(start_msg(sid="MZ" + "9" * 32))
    assert stream.stream_sid == SID
    stream.receive(stop_msg())
    for frame in (media_msg("9"), dtmf_msg(), stop_msg(), '{"event":"new"}'):
        with pytest.raises(ProtocolError, match="after stop"):
            stream.receive(frame)
    assert stream.protocol_errors == 5


def test_stop_before_start_ends_the_stream() -> None:
    stream = TwilioStream()
    stream.receive(CONNECTED)
    assert isinstance(stream.receive(stop_msg()), Stop)
    assert stream.state is StreamState.STOPPED


def test_stream_sid_must_match_the_start() -> None:
    stream = streaming()
    other = "MZ" + "f" * 32
    with pytest.raises(
        ProtocolError, match=f"streamSid '{other}' does not match this stream's {SID}"
    ):
        stream.receive(media_msg(sid=other))
    for frame in (dtmf_msg(sid=other), mark_msg(sid=other), stop_msg(sid=other)):
        with pytest.raises(ProtocolError, match="does not match"):
            stream.receive(frame)
    assert stream.state is StreamState.STREAMING and stream.frames_received == 0
    stream.receive(media_msg())
    assert stream.frames_received == 1


def test_frame_size_limit() -> None:
    stream = streaming()
    big = media_msg(pad="x" * (70000 - len(media_msg(pad=""))))
    assert len(big) == 70000
    with pytest.raises(ProtocolError, match="frame of 70000 bytes exceeds the 65536-byte limit"):
        stream.receive(big)
    with pytest.raises(ProtocolError, match="exceeds the 65536-byte limit"):
        stream.receive(big.encode())
    # multi-byte characters count as bytes, not characters
    wide = media_msg(pad="é" * 33000)
    assert len(wide) < 65536 < len(wide.encode())
    with pytest.raises(ProtocolError, match="exceeds"):
        stream.receive(wide)
    small = TwilioStream(max_message_bytes=100)
    with pytest.raises(ProtocolError, match="exceeds the 100-byte limit"):
        small.receive(start_msg())
    assert stream.receive(media_msg()).payload == PAYLOAD  # type: ignore[union-attr]


def test_chunk_gaps_duplicates_and_sequence_numbers_are_tracked() -> None:
    stream = streaming()
    stream.receive(media_msg("1", "0", "2"))
    stream.receive(media_msg("2", "20", "3"))
    stream.receive(media_msg("5", "80", "4"))  # chunks 3 and 4 lost upstream
    assert (stream.frames_received, stream.frames_missing, stream.last_chunk) == (3, 2, 5)
    assert stream.last_timestamp_ms == 80
    with pytest.raises(ProtocolError, match="media chunk 5 is not after chunk 5"):
        stream.receive(media_msg("5", "80", "5"))
    with pytest.raises(ProtocolError, match="media chunk 3 is not after chunk 5"):
        stream.receive(media_msg("3", "40", "6"))
    assert stream.frames_late == 2 and stream.frames_received == 3
    stream.receive(mark_msg(seq="9"))  # 7 and 8 never came
    stream.receive(mark_msg(seq="9"))
    stream.receive(dtmf_msg(seq="8"))
    assert stream.sequence_gaps == 2
    assert stream.duplicate_sequence_numbers == 1 and stream.out_of_order_sequence_numbers == 1


def test_first_chunk_after_one_counts_the_missing() -> None:
    stream = streaming()
    stream.receive(media_msg("4"))
    assert stream.frames_missing == 3


# --------------------------------------------------------------------------- builders


def test_outbound_builders_produce_the_documented_json() -> None:
    assert json.loads(media_message(SID, PAYLOAD)) == {
        "event": "media",
        "streamSid": SID,
        "media": {"payload": PAYLOAD},
    }
    assert json.loads(mark_message(SID, "a7")) == {
        "event": "mark",
        "streamSid": SID,
        "mark": {"name": "a7"},
    }
    assert json.loads(clear_message(SID)) == {"event": "clear", "streamSid": SID}


def test_builders_escape_what_needs_escaping() -> None:
    odd = 'MZ"\\\n\u2028'
    assert json.loads(media_message(odd, PAYLOAD))["streamSid"] == odd
    assert json.loads(clear_message(odd))["streamSid"] == odd
    assert json.loads(mark_message(SID, 'turn "3" – é'))["mark"]["name"] == 'turn "3" – é'


def test_builders_round_trip_through_the_parser() -> None:
    media = parse_message(media_message(SID, PAYLOAD))
    assert isinstance(media, Media) and media.payload == PAYLOAD and media.stream_sid == SID
    assert parse_message(mark_message(SID, "x")) == Mark(SID, "x", None)


# --------------------------------------------------------------------------- TwiML


def test_connect_stream_twiml() -> None:
    xml = connect_stream_twiml(
        "wss://example.com/ws/twilio",
        {"profile": "front-desk", "note": 'a & "b" <c>'},
        status_callback="https://example.com/twilio/stream-status",
        action_url="https://example.com/twilio/after-stream",
        after="hangup",
    )
    root = ET.fromstring(xml)
    assert root.tag == "Response"
    connect, hangup = list(root)
    assert connect.tag == "Connect" and hangup.tag == "Hangup"
    assert connect.get("action") == "https://example.com/twilio/after-stream"
    (stream,) = list(connect)
    assert stream.get("url") == "wss://example.com/ws/twilio"
    assert stream.get("statusCallback") == "https://example.com/twilio/stream-status"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == {"profile": "front-desk", "note": 'a & "b" <c>'}


def test_connect_stream_twiml_minimal() -> None:
    root = ET.fromstring(connect_stream_twiml("ws://127.0.0.1:8080/ws/twilio"))
    (connect,) = list(root)
    assert connect.get("action") is None
    assert [el.tag for el in connect.iter()] == ["Connect", "Stream"]


@pytest.mark.parametrize(
    "url",
    [
        "wss://example.com/ws/twilio?token=abc",
        "wss://example.com/ws/twilio?",
        "https://example.com/ws/twilio",
        "example.com/ws/twilio",
        "wss:///ws/twilio",
    ],
)
def test_stream_url_must_be_ws_without_query(url: str) -> None:
    with pytest.raises(ValueError, match=r"query string|ws://"):
        connect_stream_twiml(url)


def test_query_string_error_mentions_31920() -> None:
    with pytest.raises(ValueError, match="31920"):
        connect_stream_twiml("wss://example.com/ws?x=1")


def test_busy_and_hangup_twiml() -> None:
    polite = ET.fromstring(busy_twiml("All lines are busy."))
    assert [(el.tag, el.text) for el in polite] == [
        ("Say", "All lines are busy."),
        ("Hangup", None),
    ]
    reject = ET.fromstring(busy_twiml("ignored", reject=True))
    assert [(el.tag, el.get("reason")) for el in reject] == [("Reject", "busy")]
    assert [el.tag for el in ET.fromstring(busy_twiml(None))] == ["Hangup"]
    assert [el.tag for el in ET.fromstring(hangup_twiml())] == ["Hangup"]
    assert [el.tag for el in ET.fromstring(hangup_twiml("Bye"))] == ["Say", "Hangup"]


@pytest.mark.parametrize(
    ("public", "expected"),
    [
        ("https://voice.example.com", "wss://voice.example.com/ws/twilio"),
        ("https://voice.example.com/", "wss://voice.example.com/ws/twilio"),
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/ws/twilio"),
        ("https://example.com:8443/livecall/", "wss://example.com:8443/livecall/ws/twilio"),
    ],
)
def test_stream_url_for(public: str, expected: str) -> None:
    assert stream_url_for(public) == expected


def test_stream_url_for_custom_path_and_bad_input() -> None:
    assert stream_url_for("https://h.example", "media/") == "wss://h.example/media"
    with pytest.raises(ValueError):
        stream_url_for("ftp://h.example")
    with pytest.raises(ValueError):
        stream_url_for("https://h.example/?a=1")


# --------------------------------------------------------------------------- signatures

TOKEN = "12345678901234567890123456789012"
URL = "https://voice.example.com/twiml"
FORM = {
    "CallSid": CALL,
    "AccountSid": ACCOUNT,
    "From": "+15550001111",
    "To": "+15550002222",
    "CallStatus": "ringing",
    "Direction": "inbound",
    "ApiVersion": "2010-04-01",
}


def test_signatures_round_trip_with_request_validator() -> None:
    sig = TwilioSignature(TOKEN)
    signature = sig.sign(URL, FORM)
    assert signature == RequestValidator(TOKEN).compute_signature(URL, FORM)
    assert RequestValidator(TOKEN).validate(URL, FORM, signature)
    assert sig.validate_webhook(URL, FORM, signature)
    assert not sig.validate_webhook(URL, {**FORM, "To": "+15559999999"}, signature)
    assert not sig.validate_webhook(URL + "x", FORM, signature)
    assert not sig.validate_webhook(URL, FORM, None)
    assert not sig.validate_webhook(URL, FORM, "")
    assert not TwilioSignature("another-token").validate_webhook(URL, FORM, signature)


def test_signature_port_variants() -> None:
    sig = TwilioSignature(TOKEN)
    with_port = sig.sign("https://voice.example.com:443/twiml", FORM)
    assert sig.validate_webhook(URL, FORM, with_port)
    without_port = sig.sign(URL, FORM)
    assert sig.validate_webhook("https://voice.example.com:443/twiml", FORM, without_port)
    # like RequestValidator, any port is also tried stripped, but a signature made over a
    # non-default port does not validate for the default one
    odd_port = sig.sign("https://voice.example.com:8443/twiml", FORM)
    assert sig.validate_webhook("https://voice.example.com:8443/twiml", FORM, odd_port)
    assert not sig.validate_webhook(URL, FORM, odd_port)


def test_websocket_upgrade_signature_is_over_the_bare_url() -> None:
    sig = TwilioSignature(TOKEN)
    url = "wss://voice.example.com/ws/twilio"
    signature = RequestValidator(TOKEN).compute_signature(url, {})
    assert sig.validate_websocket(url, signature)
    assert sig.sign(url) == signature
    assert not sig.validate_websocket("wss://voice.example.com/ws/other", signature)
    assert not sig.validate_websocket(url, None)


def test_webhook_rules_shared_key_signatures() -> None:
    header = "key=webhooks_sharedkey_01abc,algorithm=HMAC_SHA256"
    sig = TwilioSignature(TOKEN, shared_key="shared-secret")
    signature = TwilioSignature("shared-secret").sign(URL, FORM, algorithm=HMAC_SHA256)
    assert sig.validate_webhook(URL, FORM, signature, settings_header=header)
    assert not sig.validate_webhook(URL, FORM, signature)  # no header: the auth token, SHA1
    assert not sig.validate_webhook(
        URL, FORM, signature, settings_header="key=x,algorithm=HMAC_SHA1"
    )
    assert not sig.validate_webhook(URL, FORM, signature, settings_header="algorithm=HMAC_MD5")
    # signed with the auth token but claiming a rule: only the shared key is tried
    by_token = sig.sign(URL, FORM, algorithm=HMAC_SHA256)
    assert not sig.validate_webhook(URL, FORM, by_token, settings_header=header)
    # a rule's header and no shared key configured: refused, never checked with the token
    assert not TwilioSignature(TOKEN).validate_webhook(URL, FORM, by_token, settings_header=header)
    assert sig.validate_websocket(
        "wss://voice.example.com/ws/twilio",
        TwilioSignature("shared-secret").sign(
            "wss://voice.example.com/ws/twilio", algorithm=HMAC_SHA256
        ),
        settings_header=header,
    )


def test_the_token_never_shows() -> None:
    sig = TwilioSignature(TOKEN)
    assert TOKEN not in repr(sig) and TOKEN not in str(sig)
    assert not sig.validate_webhook(URL, {"x": object()}, "abc")  # type: ignore[dict-item]
    with pytest.raises(ValueError) as info:
        TwilioSignature("")
    assert "token" in str(info.value)


# --------------------------------------------------------------------------- fuzz

_events = st.sampled_from(["connected", "start", "media", "dtmf", "mark", "stop", "clear", "x"])
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from([SID, "1", "-3", "1e3", " 7", PAYLOAD]),
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "event",
        "streamSid",
        "sequenceNumber",
        "media",
        "start",
        "dtmf",
        "mark",
        "stop",
        "payload",
        "chunk",
        "timestamp",
        "name",
        "digit",
        "tracks",
        "customParameters",
        "mediaFormat",
        "streamSid",
    ]
)
_messages = st.fixed_dictionaries(
    {"event": _events},
    optional={
        "streamSid": st.sampled_from([SID, "MZother", ""]) | _scalars,
        "sequenceNumber": _scalars,
        "media": st.dictionaries(_keys, _json, max_size=5),
        "start": st.dictionaries(_keys, _json, max_size=6),
        "dtmf": st.dictionaries(_keys, _json, max_size=3),
        "mark": st.dictionaries(_keys, _json, max_size=3),
        "stop": _json,
    },
)
_frames = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    _json.map(lambda v: json.dumps(v)),
    _messages.map(lambda m: json.dumps(m)),
    _messages.map(lambda m: json.dumps(m).encode()),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(st.tuples(_frames, st.booleans()), max_size=25))
def test_fuzz_only_events_or_protocol_errors(frames: list[tuple[str | bytes, bool]]) -> None:
    stream = streaming()
    fresh = TwilioStream()
    for frame, binary in frames:
        for target in (stream, fresh):
            try:
                event = target.receive(frame, binary=binary and isinstance(frame, bytes))
            except ProtocolError as exc:
                assert str(exc)
            else:
                assert isinstance(
                    event, Connected | Start | Media | Dtmf | Mark | Stop | UnknownEvent
                )
        with contextlib.suppress(ProtocolError):
            parse_message(frame)
    # the state machine is still usable: a good next frame is accepted
    if stream.state is StreamState.STREAMING:
        assert stream.stream_sid is not None
        nxt = (stream.last_chunk or 0) + 1
        good = stream.receive(media_msg(str(nxt), sid=stream.stream_sid))
        assert isinstance(good, Media) and good.chunk == nxt
