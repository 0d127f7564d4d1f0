"""Vonage: the stream's wire rules, the NCCO, signed webhooks, REST control, and the
simulated Vonage edge against a tiny in-test app (FastAPI + uvicorn on loopback) that uses
`VonageStream` to echo the caller back with notify marks and clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import numpy as np
import orjson
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.websockets import WebSocketDisconnect

from livecall.carriers.base import (
    CallerAudio,
    CallStarted,
    CallStopped,
    Carrier,
    CarrierProtocolError,
    CarrierStream,
    Dtmf,
    Ignored,
    MediaFormat,
    PlayedUpTo,
)
from livecall.carriers.vonage import (
    AnswerRequest,
    VonageApiError,
    VonageCallControl,
    VonageCarrier,
    VonageSignature,
    VonageStream,
    busy_ncco,
    connect_websocket_ncco,
    parse_answer_request,
    stream_url_for,
)
from livecall.carriers.vonage.answer import VonageEvent, parse_event
from livecall.carriers.vonage.signatures import SignatureRejected, payload_hash
from livecall.carriers.vonage.wire import StreamState
from livecall.sim.twilio import (
    HangUp,
    Pause,
    PressDigit,
    Probe,
    Say,
    SendRaw,
    WaitForAgentAudio,
)
from livecall.sim.vonage import SimulatedVonageCaller, VonageCallResult

SECRET = "vonage-signature-secret-0123456789abcdef"
PARAMS = {"token": "per-call-token-abc", "profile": "front-desk"}
WS_AUTH = "Bearer ws-upgrade-token-xyz"
VONAGE_AUTH = {"type": "vonage"}
FORGED = VonageSignature("not-the-signature-secret-0123456789")


def connected(rate: int = 16000, **headers: Any) -> str:
    return orjson.dumps(
        {"event": "websocket:connected", "content-type": f"audio/l16;rate={rate}", **headers}
    ).decode()


def started_stream(rate: int = 16000, **headers: Any) -> VonageStream:
    stream = VonageStream()
    stream.receive(connected(rate, **headers))
    return stream


# --------------------------------------------------------------------------- wire: inbound


def test_connected_starts_the_stream_with_headers_as_parameters() -> None:
    stream = VonageStream()
    assert stream.state is StreamState.AWAITING_CONNECTED
    event = stream.receive(
        connected(
            16000,
            token="t1",
            profile="p",
            call_uuid="aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
            conversation_uuid="CON-1",
            **{"from": "447700900000", "to": "447700900001"},
            nested={"a": [1, 2]},
            age=40,
        )
    )
    assert isinstance(event, CallStarted)
    assert event.call_id == "aaaaaaaa-bbbb-cccc-dddd-0123456789ab"
    assert event.stream_id is None
    assert event.media_format == MediaFormat("l16", 16000)
    assert event.from_number == "447700900000" and event.to_number == "447700900001"
    assert dict(event.custom_parameters) == {
        "token": "t1",
        "profile": "p",
        "nested": '{"a":[1,2]}',
        "age": "40",
    }
    assert stream.state is StreamState.STREAMING and stream.started is event
    assert stream.media_format.bytes_per_20ms == 640


@pytest.mark.parametrize(("rate", "size"), [(8000, 320), (16000, 640), (24000, 960)])
def test_each_documented_rate_takes_exact_20ms_frames(rate: int, size: int) -> None:
    stream = started_stream(rate)
    first = stream.receive(bytes(size))
    second = stream.receive(b"\x01\x00" * (size // 2))
    assert first == CallerAudio(bytes(size), sequence=1, timestamp_ms=0)
    assert isinstance(second, CallerAudio) and (second.sequence, second.timestamp_ms) == (2, 20)
    with pytest.raises(CarrierProtocolError, match=f"one 20 ms frame \\({size} bytes"):
        stream.receive(bytes(size - 2))
    with pytest.raises(CarrierProtocolError, match="one 20 ms frame"):
        stream.receive(bytes(size * 2))
    assert stream.frames_received == 2 and stream.protocol_errors == 2


def test_connected_without_call_uuid_gets_a_local_id() -> None:
    event = VonageStream().receive(connected())
    assert isinstance(event, CallStarted)
    assert event.call_id.startswith("vonage-ws-") and event.custom_parameters == {}


@pytest.mark.parametrize(
    ("frame", "rule"),
    [
        (b"\x00" * 640, "binary audio before websocket:connected"),
        ('{"event":"websocket:dtmf","digit":"1"}', "before websocket:connected"),
        ('{"event":"websocket:connected"}', "string content-type"),
        ('{"event":"websocket:connected","content-type":"audio/pcmu"}', "audio/l16;rate="),
        ('{"event":"websocket:connected","content-type":"audio/l16;rate=44100"}', "44100"),
        ("not json", "valid JSON"),
        ("[1,2]", "JSON object"),
        ('{"no":"event"}', "string 'event'"),
        ('{"event":""}', "string 'event'"),
    ],
)
def test_rejections_before_start_name_the_rule(frame: str | bytes, rule: str) -> None:
    stream = VonageStream()
    with pytest.raises(CarrierProtocolError, match=rule):
        stream.receive(frame)
    assert stream.state is StreamState.AWAITING_CONNECTED and stream.protocol_errors == 1
    assert isinstance(stream.receive(connected()), CallStarted)  # still usable


def test_connected_twice_is_refused_and_the_stream_goes_on() -> None:
    stream = started_stream(8000)
    with pytest.raises(CarrierProtocolError, match="received twice"):
        stream.receive(connected(16000))
    assert stream.media_format.sample_rate == 8000
    assert isinstance(stream.receive(bytes(320)), CallerAudio)


def test_dtmf_events() -> None:
    stream = started_stream()
    assert stream.receive('{"event":"websocket:dtmf","digit":"5","duration":260}') == Dtmf("5")
    assert stream.receive('{"event":"websocket:dtmf","digit":"#"}') == Dtmf("#")
    for bad in ('"55"', '"x"', "5", '""', "null"):
        with pytest.raises(CarrierProtocolError, match="one digit"):
            stream.receive(f'{{"event":"websocket:dtmf","digit":{bad}}}')
    with pytest.raises(CarrierProtocolError, match="duration"):
        stream.receive('{"event":"websocket:dtmf","digit":"1","duration":-3}')


def test_unknown_events_are_tolerated_and_oversized_text_refused() -> None:
    stream = VonageStream(max_frame_bytes=200)
    stream.receive(connected())
    assert stream.receive('{"event":"websocket:something-new","x":1}') == Ignored(
        "websocket:something-new"
    )
    with pytest.raises(CarrierProtocolError, match="exceeds the 200-byte limit"):
        stream.receive('{"event":"websocket:dtmf","pad":"' + "x" * 300 + '"}')


def test_close_ends_the_stream_and_nothing_is_accepted_after() -> None:
    stream = started_stream()
    assert stream.closed(1000) == CallStopped(reason="closed (1000)")
    with pytest.raises(CarrierProtocolError, match="after the stream closed"):
        stream.receive(bytes(640))
    with pytest.raises(CarrierProtocolError, match="after the stream closed"):
        stream.receive('{"event":"websocket:dtmf","digit":"1"}')


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["audio/l16;rate=16000", "5", "#", "m"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_events = st.sampled_from(
    ["websocket:connected", "websocket:dtmf", "websocket:notify", "websocket:cleared", "x"]
)
_messages = st.one_of(
    st.binary(max_size=700),
    st.binary(min_size=640, max_size=640),
    st.text(max_size=60),
    st.builds(
        lambda event, extra: orjson.dumps({"event": event, **extra}).decode(),
        _events,
        st.dictionaries(
            st.sampled_from(["content-type", "digit", "duration", "payload", "call_uuid"]),
            _json_values,
            max_size=3,
        ),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_messages, max_size=12))
def test_any_frame_sequence_yields_events_or_named_errors_and_errors_change_nothing(
    frames: list[str | bytes],
) -> None:
    stream = VonageStream()
    stream.mark("m")  # so a notify can match
    for frame in frames:
        before = (stream.state, stream.started, stream.frames_received, stream.pending_marks)
        try:
            event = stream.receive(frame)
        except CarrierProtocolError as exc:
            assert str(exc)
            assert before == (
                stream.state,
                stream.started,
                stream.frames_received,
                stream.pending_marks,
            )
            continue
        assert isinstance(event, CallStarted | CallerAudio | Dtmf | PlayedUpTo | Ignored)


# --------------------------------------------------------------------------- wire: marks/clear


def notify(name: Any) -> str:
    return orjson.dumps({"event": "websocket:notify", "payload": {"name": name}}).decode()


def test_notify_echo_settles_its_mark_and_every_earlier_one() -> None:
    stream = started_stream()
    stream.mark("m1")
    stream.mark("m2")
    stream.mark("m3")
    assert stream.receive(notify("m2")) == PlayedUpTo("m2")
    assert stream.pending_marks == ("m3",)
    assert stream.receive(notify("m3")) == PlayedUpTo("m3")
    with pytest.raises(CarrierProtocolError, match="never sent"):
        stream.receive(notify("zz"))
    assert stream.receive(notify("m1")) == Ignored(
        "websocket:notify for a mark already settled by websocket:cleared"
    )


@pytest.mark.parametrize(
    ("frame", "rule"),
    [
        ('{"event":"websocket:notify"}', "'payload' object"),
        ('{"event":"websocket:notify","payload":"m1"}', "'payload' object"),
        ('{"event":"websocket:notify","payload":{"name":7}}', "payload.name must be a string"),
    ],
)
def test_malformed_notify_is_refused(frame: str, rule: str) -> None:
    stream = started_stream()
    stream.mark("m1")
    with pytest.raises(CarrierProtocolError, match=rule):
        stream.receive(frame)
    assert stream.pending_marks == ("m1",)


def test_cleared_settles_pending_marks_and_a_late_notify_is_ignored() -> None:
    stream = started_stream()
    assert stream.receive('{"event":"websocket:cleared"}') == Ignored("websocket:cleared")
    stream.mark("a")
    stream.mark("b")
    assert stream.receive('{"event":"websocket:cleared"}') == PlayedUpTo("b")
    assert stream.pending_marks == ()
    assert isinstance(stream.receive(notify("a")), Ignored)  # Vonage may still echo them


# --------------------------------------------------------------------------- wire: outbound


def test_play_sends_exact_20ms_binary_frames_and_holds_the_tail() -> None:
    stream = started_stream(16000)
    audio = bytes(range(256)) * 6  # 1536 bytes = 2 frames + 256
    frames = stream.play(audio)
    assert frames == [audio[:640], audio[640:1280]]
    assert all(isinstance(f, bytes) for f in frames)
    more = stream.play(audio[:384])  # 256 held + 384 = one whole frame
    assert more == [audio[1280:] + audio[:384]]
    assert stream.play(b"\x01\x02") == []
    assert stream.flush() == [b"\x01\x02" + bytes(638)]
    assert stream.flush() == []
    assert stream.frames_sent == 4


def test_mark_pads_the_tail_then_sends_notify() -> None:
    stream = started_stream(8000)
    assert stream.play(b"\x05\x00" * 100) == []
    frames = stream.mark("turn-1")
    assert frames == [
        b"\x05\x00" * 100 + bytes(120),
        '{"action":"notify","payload":{"name":"turn-1"}}',
    ]
    assert stream.mark("turn-2") == ['{"action":"notify","payload":{"name":"turn-2"}}']
    with pytest.raises(ValueError, match="already used"):
        stream.mark("turn-1")
    with pytest.raises(ValueError, match="non-empty"):
        stream.mark("")


def test_clear_drops_the_tail_and_other_builders_send_nothing() -> None:
    stream = started_stream()
    stream.play(bytes(100))
    assert stream.clear() == ['{"action":"clear"}']
    assert stream.flush() == []
    assert stream.send_dtmf("123") == []
    assert stream.hangup() == []
    caps = stream.capabilities
    assert (caps.marks, caps.clear, caps.dtmf_in) == (True, True, True)
    assert (caps.send_dtmf_on_stream, caps.hangup_on_stream) == (False, True)


def test_vonage_satisfies_the_carrier_protocols() -> None:
    carrier: Carrier = VonageCarrier(VonageSignature(SECRET))
    stream: CarrierStream = carrier.new_stream(max_frame_bytes=4096)
    assert stream.media_format == MediaFormat("l16", 16000)
    assert carrier.name == "vonage" and carrier.capabilities is stream.capabilities


# --------------------------------------------------------------------------- NCCO


def test_connect_ncco_exact_shape() -> None:
    call = AnswerRequest("uuid-1", "CON-1", "447700900000", "447700900001")
    ncco = connect_websocket_ncco(
        "wss://lc.example/ws/vonage",
        PARAMS,
        sample_rate=16000,
        call=call,
        event_url="https://lc.example/vonage/event",
        synchronous_events=True,
    )
    assert ncco == [
        {
            "action": "connect",
            "endpoint": [
                {
                    "type": "websocket",
                    "uri": "wss://lc.example/ws/vonage",
                    "content-type": "audio/l16;rate=16000",
                    "headers": {
                        "token": "per-call-token-abc",
                        "profile": "front-desk",
                        "call_uuid": "uuid-1",
                        "conversation_uuid": "CON-1",
                        "from": "447700900000",
                        "to": "447700900001",
                    },
                }
            ],
            "eventUrl": ["https://lc.example/vonage/event"],
            "eventType": "synchronous",
        }
    ]
    body, ctype = VonageCarrier(None, sample_rate=8000).answer_document(
        "wss://lc.example/ws/vonage", {"token": "t"}
    )
    assert ctype == "application/json"
    assert orjson.loads(body) == [
        {
            "action": "connect",
            "endpoint": [
                {
                    "type": "websocket",
                    "uri": "wss://lc.example/ws/vonage",
                    "content-type": "audio/l16;rate=8000",
                    "headers": {"token": "t"},
                }
            ],
        }
    ]


def test_connect_ncco_refuses_what_vonage_would_not_take() -> None:
    with pytest.raises(ValueError, match="absolute ws"):
        connect_websocket_ncco("https://lc.example/ws", {})
    with pytest.raises(ValueError, match="reserved"):
        connect_websocket_ncco("wss://lc.example/ws", {"call_uuid": "x"})
    with pytest.raises(ValueError, match="allows 512"):
        connect_websocket_ncco("wss://lc.example/ws", {"token": "x" * 600})
    with pytest.raises(ValueError, match="single-line"):
        connect_websocket_ncco("wss://lc.example/ws", {}, ws_authorization="a\r\nX-Evil: 1")
    (action,) = connect_websocket_ncco("wss://lc.example/ws", {}, ws_authorization="Bearer t")
    assert action["endpoint"][0]["authorization"] == {"type": "custom", "value": "Bearer t"}
    (action,) = connect_websocket_ncco("wss://lc.example/ws", {}, vonage_authorization=True)
    assert action["endpoint"][0]["authorization"] == {"type": "vonage"}
    with pytest.raises(ValueError, match="not both"):
        connect_websocket_ncco(
            "wss://lc.example/ws", {}, ws_authorization="t", vonage_authorization=True
        )
    with pytest.raises(ValueError, match="L16 at"):
        connect_websocket_ncco("wss://lc.example/ws", {}, sample_rate=44100)
    assert busy_ncco("We are busy.") == [{"action": "talk", "text": "We are busy."}]
    assert busy_ncco(None) == []
    assert stream_url_for("https://lc.example/base/") == "wss://lc.example/base/ws/vonage"


def test_answer_request_from_get_and_post() -> None:
    url = "https://lc.example/vonage/answer?to=447700900001&from=447700900000&uuid=u1&conversation_uuid=CON-9&region_url=https%3A%2F%2Fapi-eu-1.vonage.com"
    req = parse_answer_request("GET", url)
    assert req == AnswerRequest(
        "u1", "CON-9", "447700900000", "447700900001", "https://api-eu-1.vonage.com"
    )
    body = orjson.dumps({"uuid": "u2", "to": "1", "from": "2"})
    assert parse_answer_request("POST", "https://x/a", body) == AnswerRequest("u2", "", "2", "1")
    with pytest.raises(ValueError, match="lacks 'uuid'"):
        parse_answer_request("GET", "https://x/a?to=1")
    with pytest.raises(ValueError, match="not JSON"):
        parse_answer_request("POST", "https://x/a", b"{oops")


# --------------------------------------------------------------------------- signatures


def test_event_webhook_bodies() -> None:
    body = orjson.dumps(
        {"uuid": "u-1", "conversation_uuid": "CON-1", "status": "answered", "direction": "inbound"}
    )
    assert parse_event(body) == VonageEvent("u-1", "answered", "CON-1", "inbound")
    # events without a status (transfer, input…) are read, not refused
    assert parse_event(b'{"uuid":"u-2","type":"transfer"}') == VonageEvent("u-2", "")
    for bad, rule in (
        (b"", "must be a JSON object"),
        (b"{oops", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"status":"answered"}', "lacks 'uuid'"),
        (b'{"uuid":7}', "lacks 'uuid'"),
    ):
        with pytest.raises(ValueError, match=rule):
            parse_event(bad)


class Clock:
    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def docs_token(claims: dict[str, Any], secret: str = SECRET) -> dict[str, str]:
    """A header made straight from the documented scheme (not via VonageSignature.sign)."""
    return {"Authorization": "Bearer " + jwt.encode(claims, secret, algorithm="HS256")}


def test_signed_get_and_post_verify() -> None:
    clock = Clock()
    signer = VonageSignature(SECRET, clock=clock)
    url = "https://lc.example/vonage/answer?to=1&from=2&uuid=u"
    header = signer.sign(method="GET", url=url)
    assert signer.verify({"Authorization": header}, method="GET", url=url)
    body = b'{"status":"answered","uuid":"u"}'
    header = signer.sign(method="POST", url="https://lc.example/e", body=body)
    assert signer.verify({"authorization": header}, method="POST", url="https://x/e", body=body)
    assert SECRET not in repr(signer) and "redacted" in repr(signer)


def test_documented_payload_hash_for_get_is_compact_json_of_the_query() -> None:
    clock = Clock()
    url = "https://lc.example/a?to=447700900001&from=447700900000&uuid=u1"
    expected = hashlib.sha256(b'{"to":"447700900001","from":"447700900000","uuid":"u1"}')
    assert payload_hash("GET", url, b"") == expected.hexdigest()
    claims = {
        "iat": int(clock.now),
        "jti": "j-1",
        "iss": "Vonage",
        "payload_hash": expected.hexdigest(),
        "api_key": "k",
        "application_id": "app",
    }
    signer = VonageSignature(SECRET, api_key="k", application_id="app", clock=clock)
    assert signer.verify(docs_token(claims), method="GET", url=url)
    # POST bodies sent with whitespace still match the compact JSON Vonage hashes
    body = b'{"a": 1, "b": "x"}'
    claims2 = {
        **claims,
        "jti": "j-2",
        "payload_hash": hashlib.sha256(b'{"a":1,"b":"x"}').hexdigest(),
    }
    assert signer.verify(docs_token(claims2), method="POST", url="https://x", body=body)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (
            lambda c, h: (
                {
                    **h,
                    "Authorization": docs_token(c, "wrong-secret-of-32-bytes-or-more-xxxxx")[
                        "Authorization"
                    ],
                },
                c,
            ),
            "signature",
        ),
        (lambda c, h: ({}, c), "no Authorization"),
        (lambda c, h: ({"Authorization": "Basic abc"}, c), "not a Bearer"),
        (lambda c, h: (docs_token({**c, "iat": c["iat"] - 301}), c), "replay window"),
        (lambda c, h: (docs_token({**c, "iat": c["iat"] + 120}), c), "future|Immature"),
        (
            lambda c, h: (docs_token({**c, "payload_hash": "00" * 32}), c),
            "payload_hash does not match",
        ),
        (
            lambda c, h: (docs_token({k: v for k, v in c.items() if k != "payload_hash"}), c),
            "no payload_hash",
        ),
        (lambda c, h: (docs_token({**c, "api_key": "other"}), c), "api_key"),
        (lambda c, h: (docs_token({k: v for k, v in c.items() if k != "iat"}), c), "iat"),
        (lambda c, h: (docs_token({**c, "exp": c["iat"] - 100}), c), "Expired"),
    ],
)
def test_signature_rejections(mutate: Any, reason: str) -> None:
    clock = Clock()
    url = "https://lc.example/a?uuid=u1"
    claims = {
        "iat": int(clock.now),
        "jti": "j",
        "iss": "Vonage",
        "payload_hash": payload_hash("GET", url, b""),
        "api_key": "k",
    }
    signer = VonageSignature(SECRET, api_key="k", clock=clock)
    headers, _ = mutate(claims, docs_token(claims))
    with pytest.raises(SignatureRejected, match=reason):
        signer.check(headers, method="GET", url=url)
    assert not signer.verify(headers, method="GET", url=url)


def test_tampered_query_or_body_and_alg_none_are_refused() -> None:
    clock = Clock()
    signer = VonageSignature(SECRET, clock=clock)
    url = "https://lc.example/a?uuid=u1&to=1"
    header = {"Authorization": signer.sign(method="GET", url=url)}
    assert not signer.verify(header, method="GET", url=url.replace("to=1", "to=2"))
    body = b'{"uuid":"u1"}'
    header = {"Authorization": signer.sign(method="POST", url=url, body=body)}
    assert not signer.verify(header, method="POST", url=url, body=b'{"uuid":"u2"}')
    unsigned = jwt.encode(
        {"iat": int(clock.now), "payload_hash": payload_hash("POST", url, body)},
        None,
        algorithm="none",
    )
    assert not signer.verify(
        {"Authorization": f"Bearer {unsigned}"}, method="POST", url=url, body=body
    )


def test_a_replayed_request_is_refused_and_the_window_is_bounded() -> None:
    clock = Clock()
    signer = VonageSignature(SECRET, clock=clock)
    url = "https://lc.example/a?uuid=u1"
    header = {"Authorization": signer.sign(method="GET", url=url, jti="same")}
    assert signer.verify(header, method="GET", url=url)
    with pytest.raises(SignatureRejected, match="already used"):
        signer.check(header, method="GET", url=url)
    clock.now += 400  # too old now anyway; the jti is forgotten, the age rule refuses it
    with pytest.raises(SignatureRejected, match="replay window"):
        signer.check(header, method="GET", url=url)
    assert len(signer._seen) <= 1


def test_the_handshake_jwt_is_checked_like_a_webhooks_without_a_payload() -> None:
    """`authorization: {"type": "vonage"}`: the upgrade carries the signed webhooks' JWT."""
    clock = Clock()
    signer = VonageSignature(SECRET, api_key="k", clock=clock)
    url = "wss://lc.example/ws/vonage"
    good = {"Authorization": signer.sign(method="GET", url=url)}
    assert signer.check_handshake(good)["iss"] == "Vonage"
    with pytest.raises(SignatureRejected, match="already used"):
        signer.check_handshake(good)  # one handshake per JWT
    # the payload hash is not relied on: Vonage does not document what it covers here
    other_hash = {"Authorization": signer.sign(method="POST", url=url, body=b"{}")}
    assert signer.check_handshake(other_hash)["api_key"] == "k"
    base = {"iat": int(clock.now), "iss": "Vonage", "api_key": "k"}
    for headers, reason in (
        ({}, "no Authorization"),
        ({"Authorization": "Basic a2V5OnNlY3JldA=="}, "not a Bearer"),
        ({"Authorization": FORGED.sign(method="GET", url=url)}, "does not verify"),
        ({"Authorization": signer.sign(method="GET", url=url, iat=clock.now - 301)}, "older"),
        ({"Authorization": signer.sign(method="GET", url=url, iat=clock.now + 60)}, "future"),
        ({"Authorization": signer.sign(method="GET", url=url, api_key="x")}, "api_key"),
        ({"Authorization": "Bearer " + jwt.encode(base, SECRET, algorithm="HS256")}, "no jti"),
    ):
        with pytest.raises(SignatureRejected, match=reason):
            signer.check_handshake(headers)
    carrier = VonageCarrier(signer)
    assert carrier.verify_upgrade({"Authorization": signer.sign(method="GET", url=url)}) == int(
        clock.now
    )
    with pytest.raises(SignatureRejected, match="no signature secret"):
        VonageCarrier(None).verify_upgrade(good)


def test_carrier_without_a_secret_trusts_nothing() -> None:
    carrier = VonageCarrier(None)
    assert not carrier.verify_webhook("https://x/a?uuid=1", {}, b"")
    clock = Clock(time.time())
    signed = VonageCarrier(VonageSignature(SECRET, clock=clock))
    url = "https://x/a?uuid=1"
    header = {"Authorization": VonageSignature(SECRET, clock=clock).sign(method="GET", url=url)}
    assert signed.verify_webhook(url, header, b"")


# --------------------------------------------------------------------------- REST control


@pytest.fixture(scope="module")
def rsa_key() -> tuple[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return pem, key.public_key()


async def test_rest_control_requests_are_the_documented_ones(rsa_key: tuple[str, Any]) -> None:
    pem, public = rsa_key
    seen: list[tuple[str, str, Any, dict[str, Any]]] = []

    def fake_vonage(request: httpx.Request) -> httpx.Response:
        token = request.headers["authorization"].removeprefix("Bearer ")
        claims = jwt.decode(token, public, algorithms=["RS256"])
        body = orjson.loads(request.content) if request.content else None
        seen.append((request.method, str(request.url), body, claims))
        if request.url.path == "/v1/calls" and request.method == "POST":
            return httpx.Response(201, json={"uuid": "new-call", "status": "started"})
        if "bad" in request.url.path:
            return httpx.Response(404, json={"title": "Not found"})
        return httpx.Response(204)

    http = httpx.AsyncClient(transport=httpx.MockTransport(fake_vonage))
    control = VonageCallControl("app-1", pem, base_url="http://fake-vonage", http_client=http)
    assert "PRIVATE" not in repr(control)
    await control.hangup("call-1")
    await control.transfer_to_number("call-1", "+447700900123", from_number="+447700900000")
    await control.send_dtmf("call-1", "12#", base_url="http://region-eu")
    uuid = await control.create_call(
        "+447700900123", "447700900000", answer_url="https://lc.example/vonage/answer"
    )
    with pytest.raises(VonageApiError, match="404"):
        await control.hangup("bad")
    with pytest.raises(ValueError):
        await control.hangup("../../etc")
    with pytest.raises(ValueError):
        await control.send_dtmf("call-1", "12;x")
    await http.aclose()

    assert uuid == "new-call"
    assert [(m, u, b) for m, u, b, _ in seen[:4]] == [
        ("PUT", "http://fake-vonage/v1/calls/call-1", {"action": "hangup"}),
        (
            "PUT",
            "http://fake-vonage/v1/calls/call-1",
            {
                "action": "transfer",
                "destination": {
                    "type": "ncco",
                    "ncco": [
                        {
                            "action": "connect",
                            "endpoint": [{"type": "phone", "number": "447700900123"}],
                            "from": "447700900000",
                        }
                    ],
                },
            },
        ),
        ("PUT", "http://region-eu/v1/calls/call-1/dtmf", {"digits": "12#"}),
        (
            "POST",
            "http://fake-vonage/v1/calls",
            {
                "to": [{"type": "phone", "number": "447700900123"}],
                "from": {"type": "phone", "number": "447700900000"},
                "answer_url": ["https://lc.example/vonage/answer"],
                "answer_method": "GET",
            },
        ),
    ]
    assert all(c["application_id"] == "app-1" and c["exp"] > c["iat"] for *_, c in seen)


# --------------------------------------------------------------------------- simulator


def tone(ms: int, hz: float = 440.0, amp: int = 8000, rate: int = 16000) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def loud_frames(result: VonageCallResult) -> int:
    """20 ms frames of what the caller heard (μ-law 8 kHz, as on a phone) that are loud."""
    pcm = result.heard_pcm()
    n = 160
    usable = pcm[: pcm.size // n * n].reshape(-1, n)
    return int((np.abs(usable.astype(np.int32)).max(axis=1) > 1000).sum())


@dataclass
class App:
    """What the in-test app does (`mode`) and what it saw."""

    mode: str = "echo"
    rate: int = 16000
    base_url: str = ""
    ws_url: str = ""
    webhook_ok: list[bool] = field(default_factory=list)
    ws_auth_ok: list[bool] = field(default_factory=list)
    expected_ws_auth: str = WS_AUTH
    # the endpoint's authorization: "custom" (WS_AUTH), VONAGE_AUTH, or any object as is
    authorization: Any = "custom"
    leg_events: list[tuple[str, bool]] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


def make_app(app_state: App) -> FastAPI:
    api = FastAPI()
    carrier = VonageCarrier(
        VonageSignature(SECRET),
        sample_rate=app_state.rate,
        event_url=app_state.base_url + "/vonage/event",
        synchronous_events=True,
    )

    @api.post("/vonage/event")
    async def event(request: Request) -> Response:
        body = await request.body()
        ok = carrier.verify_request("POST", str(request.url), request.headers, body)
        status = orjson.loads(body)["status"]
        app_state.leg_events.append((status, ok))
        if status == "disconnected":
            return Response(orjson.dumps([{"action": "talk", "text": "Goodbye."}]))
        return Response(status_code=204)

    async def answer(request: Request) -> Response:
        body = await request.body()
        ok = carrier.verify_request(request.method, str(request.url), request.headers, body)
        app_state.webhook_ok.append(ok)
        if not ok:
            return Response(status_code=403)
        call = parse_answer_request(request.method, str(request.url), body)
        auth = app_state.authorization
        text, ctype = carrier.answer_document_for_call(
            app_state.ws_url,
            PARAMS,
            call,
            ws_authorization=WS_AUTH if auth != VONAGE_AUTH else None,
            vonage_authorization=auth == VONAGE_AUTH,
        )
        if auth not in ("custom", VONAGE_AUTH):  # a malformed one, as the test wrote it
            ncco = orjson.loads(text)
            ncco[0]["endpoint"][0]["authorization"] = auth
            text = orjson.dumps(ncco).decode()
        return Response(text, media_type=ctype)

    api.add_api_route("/vonage/answer", answer, methods=["GET", "POST"])

    @api.websocket("/ws/vonage")
    async def media(ws: WebSocket) -> None:
        if app_state.authorization == VONAGE_AUTH:
            try:
                ok = carrier.verify_upgrade(ws.headers) > 0
            except SignatureRejected:
                ok = False
        else:
            ok = ws.headers.get("authorization") == app_state.expected_ws_auth
        app_state.ws_auth_ok.append(ok)
        if not ok:
            await ws.close(1008)
            return
        await ws.accept()
        stream = carrier.new_stream(max_frame_bytes=64 * 1024)
        try:
            await run_stream(app_state, ws, stream)
        except WebSocketDisconnect as exc:
            app_state.events.append(stream.closed(exc.code))
        finally:
            app_state.done.set()

    return api


async def send_all(ws: WebSocket, frames: list[str | bytes]) -> None:
    for frame in frames:
        if isinstance(frame, bytes):
            await ws.send_bytes(frame)
        else:
            await ws.send_text(frame)


async def run_stream(app_state: App, ws: WebSocket, stream: VonageStream) -> None:
    marks = 0
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            app_state.events.append(stream.closed(msg.get("code")))
            return
        data = msg.get("bytes") if msg.get("bytes") is not None else msg.get("text")
        try:
            event = stream.receive(data)
        except CarrierProtocolError as exc:
            app_state.errors.append(str(exc))
            continue
        app_state.events.append(event)
        if isinstance(event, CallStarted) and app_state.mode == "rude":
            await ws.send_bytes(bytes(100))  # not a 20 ms frame
            await ws.send_text('{"action":"play"}')
            await ws.send_text('{"action":"notify"}')
            await ws.send_text('{"action":"clear","extra":1}')
            await ws.send_text("{oops")
            await send_all(ws, stream.play(tone(200).astype("<i2").tobytes()))
        elif isinstance(event, CallerAudio) and app_state.mode == "echo":
            await send_all(ws, stream.play(event.audio))
            if event.sequence and event.sequence % 10 == 0:
                marks += 1
                await send_all(ws, stream.mark(f"m{marks}"))
        elif isinstance(event, CallStarted) and app_state.mode == "talker":
            audio = tone(3000, hz=300).astype("<i2").tobytes()
            await send_all(ws, stream.play(audio))
            await send_all(ws, stream.mark("reply-end"))
        elif isinstance(event, Dtmf) and event.digit == "#":
            await send_all(ws, stream.clear())
        elif isinstance(event, Dtmf) and event.digit == "9":
            stream.hangup()
            await ws.close(1000)
            app_state.events.append(stream.closed(1000))
            return


@contextlib.asynccontextmanager
async def serve(app_state: App) -> AsyncIterator[App]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    app_state.base_url = f"http://127.0.0.1:{port}"
    app_state.ws_url = f"ws://127.0.0.1:{port}/ws/vonage"
    config = uvicorn.Config(
        make_app(app_state), log_level="warning", ws="websockets-sansio", lifespan="off"
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield app_state
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 5)


async def call(app_state: App, script: list[Any], **kwargs: Any) -> VonageCallResult:
    kwargs.setdefault("signature_secret", SECRET)
    kwargs.setdefault("timeout", 15)
    caller = SimulatedVonageCaller(base_url=app_state.base_url, script=script, **kwargs)
    return await caller.run()


def of(app_state: App, kind: type) -> list[Any]:
    return [e for e in app_state.events if isinstance(e, kind)]


@pytest.mark.parametrize("rate", [16000, 24000])
async def test_sim_call_echoes_audio_and_notify_marks_over_real_sockets(rate: int) -> None:
    async with serve(App(mode="echo", rate=rate)) as app_state:
        script = [
            Say(tone(600, rate=8000), rate=8000, label="hi"),
            Pause(400),
            PressDigit("5"),
            Pause(300),
            Probe(),  # a tone out at 8 kHz, back through the stream's rate, timed
            Pause(300),
            HangUp(),
        ]
        result = await call(
            app_state,
            script,
            call_uuid="uuid-123",
            from_="447700900000",
            drop_frames=(5, 6),
            jitter_ms=8,
            seed=7,
        )
        await asyncio.wait_for(app_state.done.wait(), 5)

    assert app_state.webhook_ok == [True] and app_state.ws_auth_ok == [True]
    assert app_state.leg_events == [("answered", True), ("completed", True)]
    assert result.events_posted == ["answered", "completed"] and result.said == []
    assert app_state.errors == []
    assert result.protocol_errors == [] and result.script_errors == []
    assert result.ended_by == "caller" and result.close_code == 1000
    assert result.content_type == f"audio/l16;rate={rate}" and result.sample_rate == rate
    assert all(len(a.audio) == rate // 50 * 2 for a in of(app_state, CallerAudio))
    start = of(app_state, CallStarted)[0]
    assert start.call_id == "uuid-123" and start.from_number == "447700900000"
    assert dict(start.custom_parameters) == PARAMS
    audio = of(app_state, CallerAudio)
    assert len(audio) == result.frames_sent and [a.sequence for a in audio[:3]] == [1, 2, 3]
    assert result.frames_dropped == 2  # lost upstream: Vonage numbers nothing, so unseen
    assert of(app_state, Dtmf) == [Dtmf("5")]
    assert isinstance(app_state.events[-1], CallStopped)
    # the echo came back and was heard; notify marks went round and came back in order
    assert loud_frames(result) >= 20
    assert result.utterances[0].response_latency_ms is not None
    echoed = [m.name for m in result.marks_echoed]
    assert echoed and echoed == [m.name for m in result.marks_received][: len(echoed)]
    assert [p.name for p in of(app_state, PlayedUpTo)] == echoed
    assert result.probes_sent == 1 and len(result.probe_rtts_ms) == 1, result.probe_rtts_ms


async def test_sim_clear_empties_the_queue_and_settles_the_pending_mark() -> None:
    async with serve(App(mode="talker")) as app_state:
        script = [WaitForAgentAudio(min_heard_ms=300), PressDigit("#"), Pause(600), HangUp()]
        result = await call(app_state, script, answer_method="POST")
        await asyncio.wait_for(app_state.done.wait(), 5)

    assert app_state.webhook_ok == [True] and app_state.errors == []
    assert result.protocol_errors == [] and result.script_errors == []
    assert len(result.clears) == 1
    assert [m.name for m in result.marks_received] == ["reply-end"]
    assert result.marks_echoed == []  # dropped with the queue, as notify_after_clear="drop"
    assert of(app_state, PlayedUpTo) == [PlayedUpTo("reply-end")]  # from websocket:cleared
    heard_ms = loud_frames(result) * 20
    assert 300 <= heard_ms < 1500  # 3 s were queued; the clear cut it short


async def test_sim_refuses_frames_vonage_would_not_take_and_plays_the_good_ones() -> None:
    async with serve(App(mode="rude")) as app_state:
        result = await call(app_state, [Pause(600), HangUp()])
        await asyncio.wait_for(app_state.done.wait(), 5)

    errors = result.protocol_errors
    assert any("100 bytes dropped" in e for e in errors)
    assert any("unsupported action 'play'" in e for e in errors)
    assert any("notify needs a 'payload'" in e for e in errors)
    assert any("unexpected fields ['extra']" in e for e in errors)
    assert any("not valid JSON" in e for e in errors)
    assert result.clears == []
    assert loud_frames(result) >= 8  # the 200 ms of good audio played


async def test_sim_unsigned_or_bad_answer_webhook_gets_no_stream() -> None:
    async with serve(App()) as app_state:
        result = await call(app_state, [HangUp()], sign=False)
        forged = await call(
            app_state, [HangUp()], signature_secret="not-the-secret-but-long-enough-0000"
        )
    assert app_state.webhook_ok == [False, False]
    for r in (result, forged):
        assert r.webhook_status == 403 and r.stream_url is None and r.ended_by == "server"
        assert r.protocol_errors == ["answer webhook returned status 403"]


async def test_sim_websocket_handshake_refused_without_the_ncco_authorization() -> None:
    async with serve(App(expected_ws_auth="Bearer someone-else")) as app_state:
        result = await call(app_state, [HangUp()])
    assert app_state.webhook_ok == [True] and app_state.ws_auth_ok == [False]
    assert result.protocol_errors == ["websocket handshake refused: status 403"]
    assert result.ended_by == "server" and result.frames_sent == 0
    assert app_state.leg_events == [("failed", True)] and result.said == []


async def test_sim_server_hangup_and_raw_frames() -> None:
    async with serve(App(mode="echo", rate=8000)) as app_state:
        script = [
            Pause(100),
            SendRaw('{"event":"websocket:dtmf","digit":"xx"}'),
            SendRaw(bytes(100)),
            PressDigit("9"),
            Pause(2000),
        ]
        result = await call(app_state, script, on_script_end="wait")
        await asyncio.wait_for(app_state.done.wait(), 5)

    assert result.ended_by == "server" and result.close_code == 1000
    assert app_state.leg_events == [("answered", True), ("disconnected", True)]
    assert result.fallback_ncco == [{"action": "talk", "text": "Goodbye."}]
    assert result.said == ["Goodbye."]  # the synchronous event's NCCO ran
    assert result.sample_rate == 8000 and result.content_type == "audio/l16;rate=8000"
    assert len(app_state.errors) == 2
    assert "one digit" in app_state.errors[0] and "320 bytes" in app_state.errors[1]
    assert result.duration_s < 2.0


async def test_sim_echoes_notifies_after_clear_when_asked_and_the_stream_ignores_them() -> None:
    async with serve(App(mode="talker")) as app_state:
        script = [WaitForAgentAudio(min_heard_ms=200), PressDigit("#"), Pause(400), HangUp()]
        result = await call(app_state, script, notify_after_clear="send")
        await asyncio.wait_for(app_state.done.wait(), 5)
    assert result.protocol_errors == [] and app_state.errors == []
    assert [m.name for m in result.marks_echoed] == ["reply-end"]
    assert of(app_state, PlayedUpTo) == [PlayedUpTo("reply-end")]  # once, from the clear
    assert Ignored("websocket:notify for a mark already settled by websocket:cleared") in (
        app_state.events
    )


async def test_sim_refuses_audio_beyond_its_playout_buffer() -> None:
    async with serve(App(mode="talker")) as app_state:  # sends 150 frames at once
        result = await call(app_state, [Pause(300), HangUp()], max_buffered_frames=100)
        await asyncio.wait_for(app_state.done.wait(), 5)
    overflow = [e for e in result.protocol_errors if "more than 100 frames queued" in e]
    # 150 frames arrive in a burst; a frame or two may play out before the last ones land
    assert 40 <= len(overflow) <= 50
    assert result.received_media_bytes == (150 - len(overflow)) * 640


async def test_sim_signs_the_handshake_as_vonage_does_for_type_vonage() -> None:
    async with serve(App(authorization=VONAGE_AUTH)) as app_state:
        result = await call(app_state, [Pause(200), HangUp()])
        await asyncio.wait_for(app_state.done.wait(), 5)
    assert app_state.webhook_ok == [True] and app_state.ws_auth_ok == [True]
    assert result.protocol_errors == [] and result.ended_by == "caller"
    assert result.ws_authorization is not None
    scheme, _, token = result.ws_authorization.partition(" ")
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert scheme == "Bearer" and claims["iss"] == "Vonage" and claims["jti"]
    assert claims["api_key"] == "abcd1234" and claims["application_id"]
    assert claims["payload_hash"] == hashlib.sha256(b"{}").hexdigest()  # a GET, no query


@pytest.mark.parametrize(
    ("authorization", "problem"),
    [
        ("vonage", "must be a JSON object"),
        ({"value": "Bearer t"}, "type must be 'vonage' or 'custom'"),
        ({"type": "basic", "value": "x"}, "type must be 'vonage' or 'custom'"),
        ({"type": "custom"}, "needs a non-empty string value"),
        ({"type": "custom", "value": " "}, "needs a non-empty string value"),
        ({"type": "custom", "value": "a\r\nX-Evil: 1"}, "single header line"),
        ({"type": "vonage", "value": 7}, "value must be a string"),
        ({"type": "vonage", "scheme": "Bearer"}, "unexpected websocket authorization fields"),
    ],
)
async def test_sim_refuses_a_malformed_websocket_authorization(
    authorization: Any, problem: str
) -> None:
    async with serve(App(authorization=authorization)) as app_state:
        result = await call(app_state, [HangUp()])
    assert app_state.webhook_ok == [True] and app_state.ws_auth_ok == []  # never opened
    assert len(result.protocol_errors) == 1 and problem in result.protocol_errors[0]
    assert result.ended_by == "server" and result.frames_sent == 0
