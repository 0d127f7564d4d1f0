"""Plivo adapter: the stream wire, the XML answer, V3 signatures, REST control, and the
simulated Plivo edge against a tiny in-test app over real loopback sockets.

The app (FastAPI + uvicorn) verifies the webhook with `PlivoCarrier.verify_webhook`, answers
with `PlivoCarrier.answer_document`, reads every frame with the real `PlivoStream` and
answers with its builders: echo the caller with checkpoints, play a clip, clear mid-clip,
answer DTMF with sendDTMF, or send frames Plivo would not act on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import orjson
import plivo.utils
import pytest
import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.websockets import WebSocketDisconnect

from livecall.audio.g711 import ulaw_decode, ulaw_encode
from livecall.carriers.base import (
    ULAW_8K,
    CallerAudio,
    CallStarted,
    CallStopped,
    Carrier,
    CarrierEvent,
    CarrierProtocolError,
    CarrierStream,
    Dtmf,
    Ignored,
    MediaFormat,
    PlayedUpTo,
)
from livecall.carriers.plivo import (
    CallEnded,
    NonceLedger,
    PlivoCarrier,
    PlivoControl,
    PlivoRestError,
    PlivoSignature,
    PlivoStream,
    busy_xml,
    dial_xml,
    hangup_xml,
    stream_xml,
)
from livecall.carriers.plivo.signatures import form_params, new_nonce
from livecall.carriers.plivo.wire import StreamState, parse_extra_headers
from livecall.sim.plivo import (
    CallResult,
    HangUp,
    Pause,
    PlivoSimulatedCaller,
    PressDigit,
    Probe,
    Say,
    WaitForAgentAudio,
    WaitForAgentSilence,
)
from support import eventually

TOKEN = "MjQ5ZTJhYjQtNDU0Ni00ZWRiLWI5ZTYtMzQ0"
SID = "87654321-4321-4321-4321-cba987654321"
CALL = "12345678-1234-1234-1234-123456789abc"
PARAMS = {"token": "c0ffee1234", "profile": "frontdesk"}


def tone(ms: int, hz: float = 440.0, amp: int = 8000, rate: int = 8000) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def tone_ulaw(ms: int, hz: float = 440.0) -> bytes:
    return ulaw_encode(tone(ms, hz)).tobytes()


def loud_frames(ulaw: bytes) -> int:
    pcm = ulaw_decode(ulaw)
    usable = pcm[: pcm.size // 160 * 160].reshape(-1, 160)
    return int((np.abs(usable.astype(np.int32)).max(axis=1) > 1000).sum())


def j(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj).decode()


def start_frame(**over: Any) -> str:
    msg: dict[str, Any] = {
        "event": "start",
        "sequenceNumber": 1,
        "start": {
            "callId": CALL,
            "streamId": SID,
            "accountId": "MAXXXXXXXXXXXXXXXXXX",
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
        },
        "extra_headers": "token=c0ffee1234;profile=frontdesk",
    }
    msg.update(over)
    return j(msg)


def media_frame(chunk: int, audio: bytes = b"\xff" * 160, **over: Any) -> str:
    media = {
        "track": "inbound",
        "timestamp": str(1705312200000 + 20 * (chunk - 1)),
        "chunk": chunk,
        "payload": base64.b64encode(audio).decode(),
    }
    media.update(over.pop("media", {}))
    msg = {"event": "media", "sequenceNumber": chunk + 1, "streamId": SID, "media": media}
    msg.update(over)
    return j(msg)


def started(**kw: Any) -> PlivoStream:
    stream = PlivoStream(**kw)
    stream.receive(start_frame())
    return stream


# --------------------------------------------------------------------------- wire: inbound


def test_start_gives_ids_format_and_extra_headers() -> None:
    stream = PlivoStream()
    event = stream.receive(start_frame())
    assert event == CallStarted(
        call_id=CALL,
        stream_id=SID,
        media_format=ULAW_8K,
        custom_parameters=PARAMS,
        account_id="MAXXXXXXXXXXXXXXXXXX",
    )
    assert stream.started is event and stream.state is StreamState.STREAMING


@pytest.mark.parametrize(
    "raw",
    [
        "token=c0ffee1234;profile=frontdesk",
        "token=c0ffee1234,profile=frontdesk",
        '{"token":"c0ffee1234","profile":"frontdesk"}',
    ],
)
def test_extra_headers_in_every_form_plivo_uses(raw: str) -> None:
    assert parse_extra_headers(raw) == PARAMS


def test_extra_headers_that_are_not_key_value_are_refused() -> None:
    for raw in ("novalue", "=x", '{"a":', "[1]", 5):
        with pytest.raises(CarrierProtocolError):
            parse_extra_headers(raw)
    assert parse_extra_headers(None) == {} and parse_extra_headers("") == {}


def test_l16_16k_start_sets_the_stream_format() -> None:
    stream = PlivoStream()
    fmt = {"encoding": "audio/x-l16", "sampleRate": 16000}
    frame = orjson.loads(start_frame())
    frame["start"]["mediaFormat"] = fmt
    event = stream.receive(j(frame))
    assert isinstance(event, CallStarted) and event.media_format == MediaFormat("l16", 16000)
    assert stream.media_format == MediaFormat("l16", 16000)


def test_media_is_decoded_with_chunk_and_relative_timestamp() -> None:
    stream = started()
    first = stream.receive(media_frame(1, b"\x01\x02"))
    second = stream.receive(media_frame(3, b"\x03"))
    assert first == CallerAudio(b"\x01\x02", 1, 0)
    assert second == CallerAudio(b"\x03", 3, 40)
    assert stream.frames_received == 2 and stream.frames_missing == 1


def test_media_without_optional_counters_is_fine() -> None:
    stream = started()
    msg = {"event": "media", "media": {"payload": base64.b64encode(b"\xff").decode()}}
    assert stream.receive(j(msg)) == CallerAudio(b"\xff", None, None)


def test_dtmf_playedstream_clearedaudio_stop() -> None:
    stream = started()
    dtmf = {"track": "inbound", "digit": "5", "timestamp": "1705312200000"}
    assert stream.receive(j({"event": "dtmf", "streamId": SID, "dtmf": dtmf})) == Dtmf("5")
    stream.mark("a")
    stream.mark("b")
    stream.mark("c")
    played = {"event": "playedStream", "sequenceNumber": 5, "streamId": SID, "name": "b"}
    assert stream.receive(j(played)) == PlayedUpTo("b")
    assert list(stream.pending_checkpoints) == ["c"]  # "a" played before "b"
    stream.mark("d")
    cleared = {"sequenceNumber": 0, "event": "clearedAudio", "streamId": SID}
    # cleared checkpoints never come back from Plivo: the newest pending one settles them all
    assert stream.receive(j(cleared)) == PlayedUpTo("d")
    assert not stream.pending_checkpoints
    assert stream.receive(j(cleared)) == Ignored("clearedAudio")
    assert stream.receive(j({"event": "stop", "streamId": SID})) == CallStopped(None)
    assert stream.state is StreamState.STOPPED


def test_unknown_events_are_ignored_not_errors() -> None:
    stream = started()
    assert stream.receive(j({"event": "playFailed", "reason": "x"})) == Ignored("playFailed")
    assert stream.protocol_errors == 0


def test_stop_before_start_ends_the_stream() -> None:
    stream = PlivoStream()
    assert stream.receive(j({"event": "stop"})) == CallStopped(None)
    with pytest.raises(CarrierProtocolError, match="after stop"):
        stream.receive(start_frame())


@pytest.mark.parametrize(
    ("frame", "rule"),
    [
        (b'{"event":"start"}', "binary frames"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"event": 7}', "string 'event'"),
        (media_frame(1), "media frame before start"),
        (j({"event": "dtmf", "dtmf": {"digit": "1"}}), "dtmf frame before start"),
        (j({"event": "playedStream", "name": "x"}), "before start"),
        (start_frame(start={"streamId": SID}), "start.callId is required"),
        (start_frame(streamId="other"), "does not match start.streamId"),
        (start_frame(extra_headers="oops"), "not key=value"),
    ],
)
def test_rejections_before_start(frame: str | bytes, rule: str) -> None:
    stream = PlivoStream()
    with pytest.raises(CarrierProtocolError, match=rule):
        stream.receive(frame)
    assert stream.state is StreamState.AWAITING_START and stream.protocol_errors == 1


def test_bad_media_formats_are_refused() -> None:
    for fmt in (
        {"encoding": "audio/x-alaw", "sampleRate": 8000},
        {"encoding": "audio/x-mulaw", "sampleRate": 16000},
        {"encoding": "audio/x-l16", "sampleRate": 44100},
        {"encoding": "audio/x-l16"},
    ):
        frame = orjson.loads(start_frame())
        frame["start"]["mediaFormat"] = fmt
        with pytest.raises(CarrierProtocolError, match=r"start\.mediaFormat"):
            PlivoStream().receive(j(frame))


@pytest.mark.parametrize(
    ("frame", "rule"),
    [
        (start_frame(), "start received twice"),
        (media_frame(1, streamId="nope"), "does not match this stream"),
        (media_frame(1, media={"payload": "@@@"}), "not valid base64"),
        (media_frame(1, media={"payload": ""}), "non-empty string media.payload"),
        (media_frame(1, media={"track": "outbound"}), "carries only 'inbound'"),
        (media_frame(1, media={"chunk": "x1"}), "media.chunk must be a whole number"),
        (media_frame(1, media={"chunk": -1}), "out of range"),
        (media_frame(5000), "jumps more than"),
        (j({"event": "dtmf", "dtmf": {"digit": "55"}}), "dtmf.digit"),
        (j({"event": "dtmf", "dtmf": "5"}), "needs a 'dtmf' object"),
        (j({"event": "playedStream", "name": "never"}), "not pending"),
        (j({"event": "playedStream", "name": 3}), "string name"),
        (j({"event": "clearedAudio", "streamId": "other"}), "does not match"),
        ("x" * 70_000, "exceeds the 65536-byte limit"),
    ],
)
def test_rejections_while_streaming(frame: str, rule: str) -> None:
    stream = started()
    stream.receive(media_frame(1))
    with pytest.raises(CarrierProtocolError, match=rule):
        stream.receive(frame)
    # the stream goes on: a good next frame is accepted
    assert isinstance(stream.receive(media_frame(2)), CallerAudio)
    assert stream.protocol_errors == 1 and stream.frames_received == 2


def test_duplicate_and_late_chunks_are_refused() -> None:
    stream = started()
    stream.receive(media_frame(2))
    for chunk in (2, 1):
        with pytest.raises(CarrierProtocolError, match="duplicate or out of order"):
            stream.receive(media_frame(chunk))


def test_l16_payload_with_half_a_sample_is_refused() -> None:
    frame = orjson.loads(start_frame())
    frame["start"]["mediaFormat"] = {"encoding": "audio/x-l16", "sampleRate": 8000}
    stream = PlivoStream()
    stream.receive(j(frame))
    with pytest.raises(CarrierProtocolError, match="half a 16-bit sample"):
        stream.receive(media_frame(1, b"\x00\x01\x02"))


def test_nothing_after_stop() -> None:
    stream = started()
    stream.receive(j({"event": "stop"}))
    with pytest.raises(CarrierProtocolError, match="media frame after stop"):
        stream.receive(media_frame(1))


# --------------------------------------------------------------------------- wire: outbound


def test_builders_make_plivos_exact_frames() -> None:
    stream = started()
    assert stream.play(b"\x00\xff") == [
        '{"event":"playAudio","media":{"contentType":"audio/x-mulaw","sampleRate":8000,'
        '"payload":"AP8="}}'
    ]
    assert stream.mark('greet "1"') == [
        f'{{"event":"checkpoint","streamId":"{SID}","name":"greet \\"1\\""}}'
    ]
    assert stream.clear() == [f'{{"event":"clearAudio","streamId":"{SID}"}}']
    assert stream.send_dtmf("12#") == ['{"event":"sendDTMF","dtmf":"12#"}']
    assert stream.hangup() == []
    for frame in stream.play(b"\x01") + stream.mark("x") + stream.clear():
        orjson.loads(frame)  # valid JSON


def test_play_chunks_to_the_limit_and_respects_l16() -> None:
    stream = started(max_play_ms=100)
    frames = stream.play(bytes(2000))
    assert len(frames) == 3  # 800 + 800 + 400 bytes of μ-law
    sizes = [len(base64.b64decode(orjson.loads(f)["media"]["payload"])) for f in frames]
    assert sizes == [800, 800, 400]
    assert stream.play(b"") == []

    frame = orjson.loads(start_frame())
    frame["start"]["mediaFormat"] = {"encoding": "audio/x-l16", "sampleRate": 16000}
    l16 = PlivoStream()
    l16.receive(j(frame))
    media = orjson.loads(l16.play(bytes(640))[0])["media"]
    assert (media["contentType"], media["sampleRate"]) == ("audio/x-l16", 16000)
    with pytest.raises(ValueError, match="whole number of samples"):
        l16.play(b"\x00")


def test_builders_need_start_and_valid_input() -> None:
    stream = PlivoStream()
    for build in (lambda: stream.play(b"\x00"), lambda: stream.mark("a"), stream.clear):
        with pytest.raises(RuntimeError, match="wait for start"):
            build()
    live = started()
    with pytest.raises(ValueError):
        live.send_dtmf("12A")
    with pytest.raises(ValueError):
        live.send_dtmf("")
    with pytest.raises(ValueError):
        live.mark("")
    with pytest.raises(ValueError):
        PlivoStream(media_format=MediaFormat("alaw", 8000))
    with pytest.raises(ValueError):
        PlivoStream(max_play_ms=30)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_frames = st.fixed_dictionaries(
    {
        "event": st.sampled_from(
            ["start", "media", "dtmf", "playedStream", "clearedAudio", "stop", "x"]
        )
    },
    optional={
        "streamId": st.sampled_from([SID, "other", 3]),
        "sequenceNumber": st.one_of(st.integers(-2, 2**60), st.text(max_size=4)),
        "start": st.fixed_dictionaries(
            {},
            optional={
                "callId": st.sampled_from([CALL, "", 1]),
                "streamId": st.sampled_from([SID, "other"]),
                "mediaFormat": _json | st.just({"encoding": "audio/x-mulaw", "sampleRate": 8000}),
                "tracks": _json,
            },
        ),
        "media": st.fixed_dictionaries(
            {},
            optional={
                "payload": st.sampled_from(["AP8=", "", "@@", 5]),
                "chunk": _json,
                "timestamp": _json,
                "track": st.sampled_from(["inbound", "outbound", 1]),
            },
        ),
        "dtmf": _json | st.just({"digit": "5"}),
        "name": _json | st.just("a"),
        "extra_headers": _json | st.just("a=1;b=2"),
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_frames | _json | st.binary(max_size=8), min_size=1, max_size=6))
def test_hostile_frames_only_ever_raise_protocol_errors(frames: list[Any]) -> None:
    stream = PlivoStream()
    for frame in frames:
        data = frame if isinstance(frame, bytes) else json.dumps(frame)
        before = stream.state
        try:
            event = stream.receive(data)
        except CarrierProtocolError:
            assert stream.state is before  # a rejected frame changes nothing
            continue
        assert isinstance(
            event, CallerAudio | CallStarted | Dtmf | PlayedUpTo | CallStopped | Ignored
        )


def test_the_adapter_fits_the_carrier_interface() -> None:
    carrier: Carrier = PlivoCarrier(TOKEN)
    stream: CarrierStream = carrier.new_stream(max_frame_bytes=1024)
    event: CarrierEvent = stream.receive(start_frame())
    assert carrier.name == "plivo" and isinstance(event, CallStarted)
    assert stream.started is event and stream.media_format == ULAW_8K
    assert carrier.capabilities is stream.capabilities
    with pytest.raises(CarrierProtocolError, match="1024-byte limit"):
        stream.receive(media_frame(1, bytes(1000)))


def test_capabilities_are_honest() -> None:
    caps = PlivoStream.capabilities
    assert caps.marks and caps.clear and caps.dtmf_in
    assert caps.send_dtmf_on_stream and caps.hangup_on_stream


# --------------------------------------------------------------------------- answer XML


def test_answer_document_exact_shape() -> None:
    body, ctype = PlivoCarrier(TOKEN).answer_document("wss://example.com/ws/plivo", PARAMS)
    assert ctype == "application/xml"
    assert body == (
        '<Response><Stream bidirectional="true" audioTrack="inbound" '
        'contentType="audio/x-mulaw;rate=8000" '
        'extraHeaders="token=c0ffee1234,profile=frontdesk" keepCallAlive="true">'
        "wss://example.com/ws/plivo</Stream></Response>"
    )


def test_stream_xml_options_and_refusals() -> None:
    body = stream_xml(
        "wss://h/ws/plivo",
        {},
        media_format=MediaFormat("l16", 16000),
        status_callback_url="https://h/plivo/stream-status?a=1&b=2",
        stream_timeout_s=3600,
    )
    assert 'contentType="audio/x-l16;rate=16000"' in body and "extraHeaders" not in body
    assert 'statusCallbackUrl="https://h/plivo/stream-status?a=1&amp;b=2"' in body
    assert 'streamTimeout="3600"' in body
    for params in ({"token": "a-b"}, {"to ken": "x"}, {"t": ""}, {"t": "x" * 600}):
        with pytest.raises(ValueError):
            stream_xml("wss://h/ws", params)
    for url in ("https://h/ws", "/ws/plivo", "wss://h/ws#frag"):
        with pytest.raises(ValueError):
            stream_xml(url)


def test_busy_hangup_and_dial_documents() -> None:
    assert busy_xml(None, reject=True) == '<Response><Hangup reason="busy"/></Response>'
    assert busy_xml("Lines & queues are full.") == (
        "<Response><Speak>Lines &amp; queues are full.</Speak><Hangup/></Response>"
    )
    assert hangup_xml() == "<Response><Hangup/></Response>"
    assert dial_xml("+15551234567", caller_id="+15550000000") == (
        '<Response><Dial callerId="+15550000000"><Number>+15551234567</Number></Dial></Response>'
    )
    with pytest.raises(ValueError):
        dial_xml("call me")


# --------------------------------------------------------------------------- signatures

URL = "https://example.com/plivo/answer?x=1"
FORM = {"CallUUID": CALL, "From": "15550001111", "To": "15550002222", "Event": "StartApp"}


def signed(token: str = TOKEN, nonce: str | None = None, **over: str) -> dict[str, str]:
    nonce = nonce or new_nonce()
    sig = PlivoSignature(token).sign("POST", URL, FORM, nonce)
    headers = {"X-Plivo-Signature-V3": sig, "X-Plivo-Signature-V3-Nonce": nonce}
    headers.update(over)
    return headers


def test_signature_matches_the_official_sdk() -> None:
    nonce = new_nonce()
    sig = PlivoSignature(TOKEN).sign("POST", URL, FORM, nonce)
    assert plivo.utils.validate_v3_signature("POST", URL, nonce, TOKEN, sig, dict(FORM))
    get_url = URL + "&CallUUID=" + CALL
    sig = PlivoSignature(TOKEN).sign("GET", get_url, {}, nonce)
    assert plivo.utils.validate_v3_signature("GET", get_url, nonce, TOKEN, sig)


def test_signature_accepts_the_real_thing_and_refuses_forgeries() -> None:
    checker = PlivoSignature(TOKEN)
    assert checker.verify("POST", URL, FORM, signed())
    assert not checker.verify("POST", URL, FORM, signed(token="other-token"))
    assert not checker.verify("POST", URL, {**FORM, "From": "15559999999"}, signed())
    assert not checker.verify("POST", URL.replace("x=1", "x=2"), FORM, signed())
    assert not checker.verify("POST", URL, FORM, {"X-Plivo-Signature-V3-Nonce": "1"})
    headers = signed()
    del headers["X-Plivo-Signature-V3-Nonce"]
    assert not checker.verify("POST", URL, FORM, headers)
    assert not checker.verify("POST", "not a url", FORM, signed())


def test_signature_list_and_main_account_header() -> None:
    main = "main-account-token-1234567890"
    checker = PlivoSignature(TOKEN, main_account_token=main)
    nonce = new_nonce()
    ma = PlivoSignature(main).sign("POST", URL, FORM, nonce)
    assert checker.verify(
        "POST", URL, FORM, {"X-Plivo-Signature-Ma-V3": ma, "X-Plivo-Signature-V3-Nonce": nonce}
    )
    nonce = new_nonce()
    good = PlivoSignature(TOKEN).sign("POST", URL, FORM, nonce)
    listed = {"x-plivo-signature-v3": f"bogus=,{good}", "x-plivo-signature-v3-nonce": nonce}
    assert checker.verify("POST", URL, FORM, listed)
    # the main account's header is ignored unless a main account token is configured
    nonce = new_nonce()
    ma = PlivoSignature(main).sign("POST", URL, FORM, nonce)
    only_ma = {"X-Plivo-Signature-Ma-V3": ma, "X-Plivo-Signature-V3-Nonce": nonce}
    assert not PlivoSignature(TOKEN).verify("POST", URL, FORM, only_ma)


def test_replayed_nonce_is_refused_until_the_window_passes() -> None:
    now = [1000.0]
    checker = PlivoSignature(TOKEN, ledger=NonceLedger(60, clock=lambda: now[0]))
    headers = signed(nonce="05429567804466091622")
    assert checker.verify("POST", URL, FORM, headers)
    assert not checker.verify("POST", URL, FORM, headers)  # a replay
    now[0] += 59
    assert not checker.verify("POST", URL, FORM, headers)
    now[0] += 2  # past the window: Plivo's nonces carry no time, so it cannot be told apart
    assert checker.verify("POST", URL, FORM, headers)


def test_a_forged_request_does_not_burn_the_nonce() -> None:
    checker = PlivoSignature(TOKEN)
    nonce = new_nonce()
    assert not checker.verify("POST", URL, FORM, signed(token="wrong", nonce=nonce))
    assert checker.verify("POST", URL, FORM, signed(nonce=nonce))


def test_nonce_ledger_is_bounded() -> None:
    ledger = NonceLedger(3600, max_entries=3, clock=lambda: 0.0)
    for n in "abcd":
        assert ledger.first_use(n)
    assert len(ledger) == 3 and ledger.first_use("a")  # the oldest was let go


def test_verify_webhook_reads_the_form_body() -> None:
    carrier = PlivoCarrier(TOKEN)
    body = httpx.QueryParams(FORM).__str__().encode()
    headers = {**signed(), "Content-Type": "application/x-www-form-urlencoded"}
    assert carrier.verify_webhook(URL, headers, body)
    assert not carrier.verify_webhook(URL, {**signed(), "Content-Type": "x"}, body + b"&a=b")
    assert form_params(b'{"a": "1", "b": 2}', "application/json") == {"a": "1", "b": "2"}
    assert form_params(b"a=1&a=2&b=") == {"a": ["1", "2"], "b": ""}
    assert "redacted" in repr(PlivoSignature(TOKEN)) and TOKEN not in repr(PlivoSignature(TOKEN))


# --------------------------------------------------------------------------- REST control

AUTH_ID = "MAXXXXXXXXXXXXXXXXXX"


def control_with(handler: Any) -> PlivoControl:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return PlivoControl(AUTH_ID, TOKEN, base_url="https://fake.plivo.test", client=client)


async def test_rest_hangup_transfer_and_dial() -> None:
    seen: list[tuple[str, str, Any, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, body, request.headers["authorization"]))
        if request.method == "DELETE":
            return httpx.Response(404 if CALL[:8] not in request.url.path else 204)
        if request.url.path.endswith("/Call/"):
            return httpx.Response(201, json={"request_uuid": "req-1", "message": "call fired"})
        return httpx.Response(202, json={"message": "call transferred"})

    control = control_with(handler)
    assert await control.hangup(CALL) is True
    assert await control.hangup("00000000-0000-0000-0000-000000000000") is False
    await control.transfer(CALL, "https://h/plivo/transfer?to=15551234567")
    assert await control.dial("15551234567", "15550000000", "https://h/plivo/answer") == "req-1"
    base = f"/v1/Account/{AUTH_ID}/Call/"
    auth = "Basic " + base64.b64encode(f"{AUTH_ID}:{TOKEN}".encode()).decode()
    assert seen[0] == ("DELETE", f"{base}{CALL}/", None, auth)
    assert seen[2] == (
        "POST",
        f"{base}{CALL}/",
        {
            "legs": "aleg",
            "aleg_url": "https://h/plivo/transfer?to=15551234567",
            "aleg_method": "POST",
        },
        auth,
    )
    assert seen[3][:3] == (
        "POST",
        base,
        {
            "from": "15550000000",
            "to": "15551234567",
            "answer_url": "https://h/plivo/answer",
            "answer_method": "POST",
        },
    )
    assert TOKEN not in repr(control)


async def test_rest_errors_are_named_without_secrets() -> None:
    control = control_with(lambda _: httpx.Response(401, json={"error": "authentication failed"}))
    with pytest.raises(PlivoRestError, match="401 authentication failed") as info:
        await control.transfer(CALL, "https://h/x")
    assert TOKEN not in str(info.value)
    gone = control_with(lambda _: httpx.Response(404))
    with pytest.raises(CallEnded):
        await gone.transfer(CALL, "https://h/x")
    for bad in (lambda: control.hangup("../../etc"), lambda: control.transfer(CALL, "ftp://x")):
        with pytest.raises(ValueError):
            await bad()
    with pytest.raises(ValueError):
        PlivoControl("bad id", TOKEN)


# --------------------------------------------------------------------------- sim over sockets


@dataclass
class App:
    """What the in-test app does and what it saw."""

    mode: str = "echo"
    answer: str = "stream"  # stream | busy
    media_format: MediaFormat = ULAW_8K
    ws_url: str = ""
    base_url: str = ""
    webhook_ok: list[bool] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    stream: PlivoStream | None = None
    agent_until: float = 0.0
    status_events: list[tuple[bool, str]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


def make_app(app_state: App) -> FastAPI:
    app = FastAPI()
    carrier = PlivoCarrier(TOKEN, media_format=app_state.media_format)

    @app.post("/plivo/answer")
    async def answer(request: Request) -> Response:
        ok = carrier.verify_webhook(str(request.url), request.headers, await request.body())
        app_state.webhook_ok.append(ok)
        if not ok:
            return Response("bad signature", status_code=403)
        if app_state.answer == "busy":
            return Response(busy_xml(None, reject=True), media_type="application/xml")
        if app_state.answer.startswith("<"):  # a raw document, {ws} for the stream URL
            return Response(
                app_state.answer.replace("{ws}", app_state.ws_url), media_type="application/xml"
            )
        if app_state.answer == "status":
            body = stream_xml(
                app_state.ws_url, PARAMS, status_callback_url=app_state.base_url + "/status"
            )
            return Response(body, media_type="application/xml")
        body, ctype = carrier.answer_document(app_state.ws_url, PARAMS)
        return Response(body, media_type=ctype)

    @app.post("/status")
    async def status(request: Request) -> Response:
        ok = carrier.verify_webhook(str(request.url), request.headers, await request.body())
        form = dict(httpx.QueryParams((await request.body()).decode()))
        app_state.status_events.append((ok, form.get("Event", "")))
        return Response("", status_code=204)

    @app.websocket("/ws/plivo")
    async def media(ws: WebSocket) -> None:
        await ws.accept()
        try:
            await serve_stream(app_state, carrier, ws)
        except WebSocketDisconnect:
            pass
        finally:
            app_state.done.set()

    return app


async def serve_stream(state: App, carrier: PlivoCarrier, ws: WebSocket) -> None:
    stream = state.stream = carrier.new_stream(max_frame_bytes=64 * 1024)
    n_media = 0

    async def send(frames: list[str | bytes]) -> None:
        for frame in frames:
            assert isinstance(frame, str)
            state.sent.append(frame)
            await ws.send_text(frame)

    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        text = msg.get("text")
        data: str | bytes = text if text is not None else msg.get("bytes", b"")
        try:
            event = stream.receive(data)
        except CarrierProtocolError as exc:
            state.errors.append(str(exc))
            continue
        state.events.append(event)
        if isinstance(event, CallStarted):
            await on_start(state, stream, ws, send)
        elif isinstance(event, CallerAudio):
            n_media += 1
            if state.mode == "echo":
                await send(stream.play(event.audio) + stream.mark(f"m{event.sequence}"))
            elif state.mode == "clear" and n_media == 25:
                await send(stream.clear())
            elif state.mode == "agent":
                now = asyncio.get_running_loop().time()
                peak = int(np.abs(ulaw_decode(event.audio).astype(np.int32)).max())
                if peak > 1000 and now < state.agent_until:  # barge-in: stop at once
                    await send(stream.clear())
                    state.agent_until = now
        elif isinstance(event, Dtmf):
            if event.digit == "0":
                await ws.close(code=1000)
                return
            await send(stream.send_dtmf("42"))
        elif isinstance(event, CallStopped):
            return


async def on_start(state: App, stream: PlivoStream, ws: WebSocket, send: Any) -> None:
    if state.mode in ("playback", "clear", "agent"):
        clip = tone_ulaw({"playback": 1000, "clear": 2000, "agent": 3000}[state.mode])
        state.agent_until = asyncio.get_running_loop().time() + len(clip) / 8000
        for i in range(0, len(clip), 160):  # 20 ms per playAudio, as a bridge sends
            await send(stream.play(clip[i : i + 160]))
        await send(stream.mark("end"))
    elif state.mode == "oneway":
        await send(stream.play(tone_ulaw(100)))
    elif state.mode == "malformed":
        good = base64.b64encode(tone_ulaw(20)).decode()
        play = {"event": "playAudio", "media": {"contentType": "audio/x-mulaw"}}
        await ws.send_bytes(b"\xff" * 160)
        await ws.send_text("{not json")
        await ws.send_text(j({"event": "media", "media": {"payload": good}}))  # Twilio's verb
        await ws.send_text(j({"event": "checkpoint", "name": "x"}))  # no streamId
        await ws.send_text(j({"event": "clearAudio", "streamId": "other"}))
        for media in (
            {"contentType": "audio/x-alaw", "sampleRate": 8000, "payload": good},
            {"contentType": "audio/x-mulaw", "sampleRate": 16000, "payload": good},
            {"contentType": "audio/x-mulaw", "sampleRate": 8000, "payload": "@@"},
        ):
            await ws.send_text(j({**play, "media": media}))
        await ws.send_text(j({"event": "sendDTMF", "dtmf": "12x"}))
        await ws.send_text(j({"event": "clearAudio", "streamId": stream.stream_id, "x": 1}))
        await send(stream.play(tone_ulaw(200)))  # this one is fine and must play


@contextlib.asynccontextmanager
async def serve(state: App) -> AsyncIterator[App]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    state.base_url = f"http://127.0.0.1:{port}"
    state.ws_url = f"ws://127.0.0.1:{port}/ws/plivo"
    config = uvicorn.Config(
        make_app(state), log_level="warning", ws="websockets-sansio", lifespan="off"
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield state
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 5)


async def call(state: App, script: list[Any], **kwargs: Any) -> tuple[CallResult, Any]:
    kwargs.setdefault("auth_token", TOKEN)
    kwargs.setdefault("timeout", 15)
    caller = PlivoSimulatedCaller(state.base_url, script=script, **kwargs)
    result = await caller.run()
    if result.stream_sid is not None:
        await asyncio.wait_for(state.done.wait(), 5)
    return result, caller


async def test_echo_call_over_real_sockets() -> None:
    async with serve(App(mode="echo")) as state:
        script = [Say(tone(400), label="hello"), Pause(400), HangUp()]
        result, _ = await call(state, script)

    assert state.webhook_ok == [True]
    assert result.protocol_errors == [] and result.script_errors == [] and state.errors == []
    assert result.ended_by == "caller" and result.close_code == 1000
    assert result.parameters == PARAMS
    start = state.events[0]
    assert isinstance(start, CallStarted)
    assert start.call_id == result.call_sid and start.stream_id == result.stream_sid
    assert start.custom_parameters == PARAMS and start.media_format == ULAW_8K
    assert isinstance(state.events[-1], CallStopped)
    media = [e for e in state.events if isinstance(e, CallerAudio)]
    assert [m.sequence for m in media] == list(range(1, len(media) + 1)) == list(range(1, 41))
    assert [m.timestamp_ms for m in media] == [20 * i for i in range(40)]
    assert state.stream is not None and state.stream.frames_missing == 0
    # the echoed clip was heard; checkpoints came back in order, each once played
    assert loud_frames(result.heard) >= 15
    echoed = [m.name for m in result.marks_echoed]
    assert echoed == [m.name for m in result.marks_received][: len(echoed)]
    assert len(echoed) >= 30
    played = [e.name for e in state.events if isinstance(e, PlayedUpTo)]
    assert played == echoed


async def test_checkpoint_comes_back_when_the_clip_has_played() -> None:
    async with serve(App(mode="playback")) as state:
        result, _ = await call(state, [WaitForAgentSilence(silence_ms=300, timeout=5), HangUp()])

    assert result.protocol_errors == [] and result.script_errors == []
    assert 45 <= loud_frames(result.heard) <= 52  # one second of tone
    [received] = result.marks_received
    [echoed] = result.marks_echoed
    assert echoed.name == "end" and 0.95 <= echoed.t - received.t <= 1.3
    assert PlayedUpTo("end") in state.events


async def test_clear_drops_the_queue_and_its_checkpoint() -> None:
    async with serve(App(mode="clear")) as state:
        result, _ = await call(state, [Pause(1200), HangUp()])

    assert result.protocol_errors == [] and len(result.clears) == 1
    assert loud_frames(result.heard) <= 30  # far less than the 2 s queued
    assert result.marks_echoed == []  # Plivo never acknowledges a cleared checkpoint
    # the app learns from clearedAudio that "end" is settled
    assert PlayedUpTo("end") in state.events
    assert state.stream is not None and not state.stream.pending_checkpoints


async def test_dtmf_both_ways_and_hangup_by_the_app() -> None:
    async with serve(App(mode="dtmf")) as state:
        script = [Pause(100), PressDigit("5"), Pause(200), PressDigit("0"), Pause(2000)]
        result, caller = await call(state, script)

    assert [e for e in state.events if isinstance(e, Dtmf)] == [Dtmf("5"), Dtmf("0")]
    assert [d.name for d in caller.digits_received] == ["42"]
    assert result.ended_by == "server" and result.protocol_errors == []


async def test_hangup_without_stop_event_just_closes() -> None:
    async with serve(App(mode="echo")) as state:
        result, _ = await call(state, [Pause(200), HangUp()], stop_event=False)

    assert result.ended_by == "caller"
    assert not any(isinstance(e, CallStopped) for e in state.events)


async def test_forged_and_replayed_webhooks_are_refused() -> None:
    async with serve(App()) as state:
        forged, _ = await call(state, [HangUp()], auth_token="not-the-token")
        assert forged.webhook_status == 403 and forged.stream_sid is None
        replayed, caller = await call(state, [Pause(100), HangUp()], replay_webhook=True)

    assert state.webhook_ok == [False, True, False]
    assert caller.webhook_statuses == [200, 403]
    assert replayed.webhook_status == 403 and replayed.stream_sid is None


async def test_frames_plivo_would_not_act_on_are_recorded() -> None:
    async with serve(App(mode="malformed")) as state:
        result, _ = await call(state, [Pause(600), HangUp()])

    errors = result.protocol_errors
    assert len(errors) == 10, errors
    for needle in (
        "binary frame",
        "not valid JSON",
        "unsupported event 'media'",
        "checkpoint needs the streamId",
        "clearAudio streamId",
        "contentType 'audio/x-alaw'",
        "sampleRate 16000",
        "not valid base64",
        "sendDTMF needs digits",
        "unexpected fields ['x'] in clearAudio",
    ):
        assert any(needle in e for e in errors), needle
    assert loud_frames(result.heard) >= 8  # the good playAudio still played


async def test_l16_16k_stream_end_to_end() -> None:
    async with serve(App(mode="echo", media_format=MediaFormat("l16", 16000))) as state:
        result, caller = await call(state, [Say(tone(400)), Pause(400), HangUp()])

    assert caller.stream_attributes["contentType"] == "audio/x-l16;rate=16000"
    start = state.events[0]
    assert isinstance(start, CallStarted) and start.media_format == MediaFormat("l16", 16000)
    media = [e for e in state.events if isinstance(e, CallerAudio)]
    assert all(len(m.audio) == 640 for m in media)  # 20 ms of 16-bit 16 kHz
    assert result.protocol_errors == [] and loud_frames(result.heard) >= 15


async def test_busy_answer_rejects_the_call() -> None:
    async with serve(App(answer="busy")) as state:
        result, _ = await call(state, [HangUp()])

    assert result.rejected and result.reject_reason == "busy"
    assert result.stream_sid is None and state.webhook_ok == [True]


async def test_barge_in_clears_the_agent_mid_sentence() -> None:
    async with serve(App(mode="agent")) as state:
        script = [WaitForAgentAudio(min_heard_ms=400), Say(tone(400, hz=300)), Pause(300)]
        result, _ = await call(state, [*script, HangUp()])

    assert result.protocol_errors == [] and result.script_errors == []
    [utt] = result.utterances
    assert utt.barged_in and utt.barge_in_stop_ms is not None
    assert utt.barge_in_stop_ms < 400, utt.barge_in_stop_ms  # cleared, not played out
    assert loud_frames(result.heard) < 100  # far less than the 3 s clip
    assert len(result.clears) == 1 and result.marks_echoed == []
    assert PlayedUpTo("end") in state.events


async def test_lost_frames_show_as_gaps_in_the_chunk_numbers() -> None:
    async with serve(App(mode="echo")) as state:
        result, _ = await call(state, [Pause(300), HangUp()], drop_frames={4, 5, 9})

    assert result.frames_dropped == 3 and result.protocol_errors == []
    assert state.stream is not None
    assert state.stream.frames_missing == 3 and state.stream.frames_received == 12


async def test_probe_round_trip_through_the_echo() -> None:
    async with serve(App(mode="echo")) as state:
        result, _ = await call(state, [Pause(100), Probe(), Pause(500), HangUp()])

    assert result.probes_sent == 1 and result.probes_lost == 0
    [rtt] = result.probe_rtts_ms
    assert 0 <= rtt < 200


async def test_stream_status_callbacks_are_signed() -> None:
    async with serve(App(mode="echo", answer="status")) as state:
        await call(state, [Pause(200), HangUp()])

        async def both() -> bool:
            return len(state.status_events) >= 2

        await eventually(both, within=5)

    assert state.status_events == [(True, "StartStream"), (True, "StopStream")]


STREAM = '<Stream bidirectional="true" keepCallAlive="true" contentType="audio/x-mulaw;rate=8000"'


@pytest.mark.parametrize(
    ("xml", "error"),
    [
        (f"<Response>{STREAM}>https://h/ws</Stream></Response>", "not an absolute ws(s)://"),
        (
            '<Response><Stream bidirectional="true" keepCallAlive="true" '
            'contentType="audio/x-alaw;rate=8000">{ws}</Stream></Response>',
            "contentType 'audio/x-alaw;rate=8000'",
        ),
        (
            '<Response><Stream bidirectional="true" audioTrack="both" keepCallAlive="true">'
            "{ws}</Stream></Response>",
            "audioTrack must be inbound",
        ),
        (
            '<Response><Stream bidirectional="true">{ws}</Stream></Response>',
            "without keepCallAlive",
        ),
        (
            f'<Response>{STREAM} extraHeaders="token=a-b">{{ws}}</Stream></Response>',
            "letters and digits only",
        ),
        (
            f'<Response>{STREAM} extraHeaders="t={"x" * 520}">{{ws}}</Stream></Response>',
            "the limit is 512",
        ),
        (
            '<Response><Stream bidirectional="yes" keepCallAlive="true">{ws}</Stream></Response>',
            "must be true or false",
        ),
        ("<Reply/>", "not <Response>"),
        ("<Response><Stream", "invalid Plivo XML"),
    ],
)
async def test_stream_documents_plivo_would_refuse(xml: str, error: str) -> None:
    async with serve(App(answer=xml)) as state:
        result, _ = await call(state, [HangUp()])

    assert result.stream_sid is None and result.ended_by == "server"
    assert any(error in e for e in result.protocol_errors), result.protocol_errors


async def test_playaudio_on_a_one_way_stream_is_not_played() -> None:
    xml = (
        '<Response><Stream keepCallAlive="true" contentType="audio/x-mulaw;rate=8000">'
        "{ws}</Stream></Response>"
    )
    async with serve(App(mode="oneway", answer=xml)) as state:
        result, _ = await call(state, [Pause(300), HangUp()])

    assert result.stream_sid is not None
    assert any("one-way stream" in e for e in result.protocol_errors)
    assert loud_frames(result.heard) == 0


async def test_default_content_type_is_l16_8k() -> None:
    xml = '<Response><Stream bidirectional="true" keepCallAlive="true">{ws}</Stream></Response>'
    async with serve(App(mode="echo", answer=xml, media_format=MediaFormat("l16", 8000))) as state:
        result, _ = await call(state, [Say(tone(300)), Pause(300), HangUp()])

    start = state.events[0]
    assert isinstance(start, CallStarted) and start.media_format == MediaFormat("l16", 8000)
    assert start.custom_parameters == {}
    assert result.protocol_errors == [] and loud_frames(result.heard) >= 10
