"""The Telnyx adapter: wire rules, builders, TeXML, Ed25519 signatures, REST control, and the
simulated Telnyx edge talking to a small in-test app over real loopback sockets.

The in-test app uses the real `TelnyxStream` and `TelnyxCarrier` (no livecall code mocked):
it verifies the signed webhook, answers with the TeXML, and on the media socket echoes the
caller's audio back with marks, or plays a tone and clears it, or sends frames Telnyx would
refuse, so the simulator and the wire module are checked against each other.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import orjson
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
    CarrierProtocolError,
    Dtmf,
    Ignored,
    MediaFormat,
    PlayedUpTo,
)
from livecall.carriers.telnyx import TelnyxCarrier
from livecall.carriers.telnyx.answer import busy_texml, connect_stream_texml, hangup_texml
from livecall.carriers.telnyx.control import CallEnded, TelnyxControl, transfer_texml
from livecall.carriers.telnyx.signatures import TelnyxSignature, sign_webhook
from livecall.carriers.telnyx.wire import StreamState, TelnyxStream
from livecall.sim.telnyx import (
    CallResult,
    HangUp,
    Pause,
    PressDigit,
    Say,
    TelnyxSimulatedCaller,
    generate_keypair,
)

PRIVATE, PUBLIC = generate_keypair()
SID = "32DE0DEA-53CB-4B21-89A4-9E1819C043BC"
CALL = "v3:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ"


def frame(**msg: Any) -> str:
    return json.dumps(msg)


def start_frame(
    encoding: str = "PCMU", rate: int = 8000, params: dict[str, Any] | None = None, **kw: Any
) -> str:
    start = {
        "user_id": "3E6F995F-85F7-4705-9741-53B116D28237",
        "call_control_id": CALL,
        "call_session_id": "ff55a038-6f5d-11ef-9692-02420aeffb1f",
        "from": "+13122010094",
        "to": "+13122123456",
        "tags": ["TAG1"],
        "client_state": "aGF2ZSBhIG5pY2UgZGF5ID1d",
        "custom_parameters": {"token": "tok", "profile": "front-desk"}
        if params is None
        else params,
        "media_format": {"encoding": encoding, "sample_rate": rate, "channels": 1},
    }
    start.update(kw)
    return frame(event="start", sequence_number="1", stream_id=SID, start=start)


def media(payload: bytes, chunk: int | None = 1, track: str = "inbound", **kw: Any) -> str:
    body: dict[str, Any] = {"track": track, "payload": base64.b64encode(payload).decode()}
    if chunk is not None:
        body["chunk"] = str(chunk)
        body["timestamp"] = str((chunk - 1) * 20)
    msg = {"sequence_number": str(chunk or 2), "stream_id": SID, "media": body, **kw}
    return frame(event="media", **msg)


def streaming(**kw: Any) -> TelnyxStream:
    stream = TelnyxStream(**kw)
    assert stream.receive(frame(event="connected", version="1.0.0")) == Ignored("connected")
    assert isinstance(stream.receive(start_frame()), CallStarted)
    return stream


def rejects(stream: TelnyxStream, data: str | bytes, rule: str) -> None:
    before = (stream.state, stream.last_chunk, stream.frames_received, stream.pending_marks)
    errors = stream.protocol_errors
    with pytest.raises(CarrierProtocolError, match=rule):
        stream.receive(data)
    assert (stream.state, stream.last_chunk, stream.frames_received, stream.pending_marks) == before
    assert stream.protocol_errors == errors + 1


def tone(ms: int, hz: float = 440.0, amp: int = 8000, rate: int = 8000) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def tone_ulaw(ms: int, hz: float = 440.0) -> bytes:
    return ulaw_encode(tone(ms, hz)).tobytes()


# --------------------------------------------------------------------------- inbound events


def test_start_gives_ids_format_and_parameters() -> None:
    stream = TelnyxStream()
    assert stream.receive(frame(event="connected", version="1.0.0")) == Ignored("connected")
    started = stream.receive(start_frame(params={"token": "tok", "n": 3, "none": None}))
    assert started == CallStarted(
        call_id=CALL,
        stream_id=SID,
        media_format=ULAW_8K,
        custom_parameters={"token": "tok", "n": "3", "none": ""},
        account_id="3E6F995F-85F7-4705-9741-53B116D28237",
        from_number="+13122010094",
        to_number="+13122123456",
    )
    assert stream.state is StreamState.STREAMING and stream.started == started
    assert stream.media_format == ULAW_8K  # what play takes


def test_connected_is_optional_but_only_first() -> None:
    stream = TelnyxStream()
    assert isinstance(stream.receive(start_frame()), CallStarted)
    rejects(stream, frame(event="connected", version="1.0.0"), "connected must be the first")


def test_start_rules() -> None:
    stream = TelnyxStream()
    rejects(stream, frame(event="start", start={"call_control_id": CALL}), "non-empty stream_id")
    rejects(stream, frame(event="start", stream_id=SID), "'start' object")
    rejects(stream, frame(event="start", stream_id=SID, start={}), "call_control_id")
    rejects(stream, start_frame("G722", 16000), "codec 'G722'")
    rejects(stream, start_frame("PCMU", 16000), "PCMU at 16000 Hz")
    bad_channels = start_frame(
        media_format={"encoding": "PCMU", "sample_rate": 8000, "channels": 2}
    )
    rejects(stream, bad_channels, "channels must be 1")
    rejects(stream, start_frame(params=["x"]), "custom_parameters must be an object")
    zero = start_frame(media_format={"encoding": "PCMU", "sample_rate": 0, "channels": 1})
    rejects(stream, zero, "PCMU at 0 Hz")
    assert isinstance(stream.receive(start_frame()), CallStarted)
    rejects(stream, start_frame(), "start received twice")


def test_start_alaw_and_l16_formats() -> None:
    alaw = TelnyxStream().receive(start_frame("PCMA"))
    assert isinstance(alaw, CallStarted) and alaw.media_format == MediaFormat("alaw", 8000)
    l16 = TelnyxStream()
    started = l16.receive(start_frame("L16", 16000))
    assert isinstance(started, CallStarted) and started.media_format == MediaFormat("l16", 16000)
    # L16 is big-endian on the wire; the core gets little-endian samples
    pcm = np.array([1, -2, 300], dtype=np.int16)
    event = l16.receive(media(pcm.astype(">i2").tobytes()))
    assert isinstance(event, CallerAudio)
    assert np.array_equal(np.frombuffer(event.audio, dtype="<i2"), pcm)
    rejects(l16, media(b"\x00\x01\x02", chunk=2), "odd number of bytes")


def test_media_events_and_chunk_order() -> None:
    stream = streaming()
    audio = tone_ulaw(20)
    assert stream.receive(media(audio, chunk=1)) == CallerAudio(audio, 1, 0)
    assert stream.receive(media(audio, chunk=4)) == CallerAudio(audio, 4, 60)
    assert stream.frames_missing == 2 and stream.frames_received == 2
    rejects(stream, media(audio, chunk=3), "late or duplicate")
    rejects(stream, media(audio, chunk=4), "late or duplicate")
    assert stream.frames_late == 2
    rejects(stream, media(audio, chunk=9000), "jumps more than")
    rejects(stream, media(b"", chunk=5).replace('"payload": ""', '"payload": "@@"'), "base64")
    rejects(stream, media(b"", chunk=5), "media.payload is empty")
    rejects(stream, media(audio, chunk=5, stream_id="other"), "does not match")
    rejects(stream, frame(event="media", stream_id=SID, media={"chunk": "5"}), "media.payload")
    rejects(stream, media(audio, chunk=5).replace('"chunk": "5"', '"chunk": "-5"'), "whole number")
    # the outbound track (both_tracks) is not the caller: ignored, not fed to the agent
    assert stream.receive(media(audio, chunk=2, track="outbound")) == Ignored(
        "media on the outbound track"
    )
    assert stream.receive(media(audio, chunk=None)) == CallerAudio(audio, 2, None)


def test_media_before_start_and_everything_after_stop() -> None:
    stream = TelnyxStream()
    rejects(stream, media(b"\xff" * 160), "media frame before start")
    rejects(stream, frame(event="dtmf", stream_id=SID, dtmf={"digit": "1"}), "before start")
    stream = streaming()
    stop = frame(event="stop", sequence_number="9", stream_id=SID, stop={"call_control_id": CALL})
    assert stream.receive(stop) == CallStopped(None)
    assert stream.state is StreamState.STOPPED
    rejects(stream, media(b"\xff" * 160, chunk=2), "media frame after stop")
    rejects(stream, stop, "stop frame after stop")
    early = TelnyxStream()
    assert early.receive(stop) == CallStopped("stopped before start")


def test_dtmf_mark_error_and_unknown_events() -> None:
    stream = streaming()
    assert stream.receive(
        frame(event="dtmf", stream_id=SID, occurred_at="2024", dtmf={"digit": "#"})
    ) == Dtmf("#")
    rejects(stream, frame(event="dtmf", stream_id=SID, dtmf={"digit": "12"}), "dtmf.digit")
    rejects(stream, frame(event="dtmf", stream_id=SID, dtmf={"digit": "x"}), "dtmf.digit")
    # a mark echo must name a mark we sent (each echo once)
    rejects(stream, frame(event="mark", stream_id=SID, mark={"name": "m1"}), "never sent")
    stream.mark("m1")
    assert stream.pending_marks == 1
    assert stream.receive(frame(event="mark", stream_id=SID, mark={"name": "m1"})) == PlayedUpTo(
        "m1"
    )
    rejects(stream, frame(event="mark", stream_id=SID, mark={"name": "m1"}), "never sent")
    rejects(stream, frame(event="mark", stream_id=SID, mark={}), "mark.name")
    err = frame(
        event="error",
        stream_id=SID,
        payload={"code": 100003, "title": "malformed_frame", "detail": "bad"},
    )
    assert stream.receive(err) == Ignored("error 100003 malformed_frame: bad")
    assert stream.carrier_errors == ["error 100003 malformed_frame: bad"]
    assert stream.receive(frame(event="transcription", stream_id=SID)) == Ignored("transcription")


def test_frames_telnyx_never_sends_are_refused() -> None:
    stream = streaming(max_frame_bytes=2048)
    rejects(stream, b"\xff" * 160, "binary frames")
    rejects(stream, "{not json", "invalid JSON")
    rejects(stream, "[1, 2]", "JSON object")
    rejects(stream, frame(stream_id=SID), "string 'event'")
    rejects(stream, media(b"\xff" * 4000, chunk=2), "2048-byte limit")
    assert stream.state is StreamState.STREAMING


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_fields = st.fixed_dictionaries(
    {"event": st.sampled_from(["media", "start", "stop", "dtmf", "mark", "error", "connected"])},
    optional={
        "stream_id": st.sampled_from([SID, "other", 3]),
        "sequence_number": _json,
        "media": _json,
        "start": _json,
        "dtmf": _json,
        "mark": _json,
        "payload": _json,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_fields | _json | st.binary(max_size=8), min_size=1, max_size=6))
def test_hostile_frames_only_ever_raise_protocol_errors(frames: list[Any]) -> None:
    stream = TelnyxStream(max_frame_bytes=4096)
    stream.receive(start_frame())  # so media, dtmf and mark reach their own checks
    stream.mark("m")
    for item in frames:
        data = item if isinstance(item, bytes) else json.dumps(item)
        try:
            event = stream.receive(data)
        except CarrierProtocolError:
            continue
        assert isinstance(
            event, CallStarted | CallerAudio | Dtmf | PlayedUpTo | CallStopped | Ignored
        )


# --------------------------------------------------------------------------- outbound frames


def test_play_builds_media_frames_in_chunks_of_20ms_to_1s() -> None:
    stream = streaming()
    audio = tone_ulaw(2500)
    frames = stream.play(audio)
    msgs = [orjson.loads(f) for f in frames]
    assert [list(m) for m in msgs] == [["event", "media"]] * 3
    sizes = [len(base64.b64decode(m["media"]["payload"])) for m in msgs]
    assert sizes == [8000, 8000, 4000]
    assert b"".join(base64.b64decode(m["media"]["payload"]) for m in msgs) == audio
    assert frames[0] == (
        '{"event":"media","media":{"payload":"' + base64.b64encode(audio[:8000]).decode() + '"}}'
    )


def test_play_holds_back_less_than_20ms_and_mark_pads_it() -> None:
    stream = streaming()
    assert stream.play(b"\x01" * 100) == []  # 12.5 ms: Telnyx takes no chunk under 20 ms
    frames = stream.play(b"\x02" * 100)  # 200 bytes: one 20 ms frame, 40 held back
    assert [len(base64.b64decode(orjson.loads(f)["media"]["payload"])) for f in frames] == [160]
    out = stream.mark("end")
    assert orjson.loads(out[1]) == {"event": "mark", "mark": {"name": "end"}}
    padded = base64.b64decode(orjson.loads(out[0])["media"]["payload"])
    assert padded == b"\x02" * 40 + b"\xff" * 120  # μ-law silence
    assert stream.mark("again") == ['{"event":"mark","mark":{"name":"again"}}']
    assert stream.play(b"\x03" * 10) == []
    assert stream.clear() == ['{"event":"clear"}']
    assert stream.flush() == []  # clear dropped what was held back
    with pytest.raises(ValueError):
        stream.mark("")


def test_l16_and_alaw_playback() -> None:
    stream = TelnyxStream(playback_format=MediaFormat("l16", 8000), chunk_ms=20)
    pcm = np.arange(200, dtype=np.int16)
    frames = stream.play(pcm.tobytes())
    wire = base64.b64decode(orjson.loads(frames[0])["media"]["payload"])
    assert np.array_equal(np.frombuffer(wire, dtype=">i2"), pcm[:160])  # network byte order
    alaw = TelnyxStream(playback_format=MediaFormat("alaw", 8000))
    assert alaw.play(b"\x00" * 10) == []
    padded = base64.b64decode(orjson.loads(alaw.flush()[0])["media"]["payload"])
    assert padded == b"\x00" * 10 + b"\xd5" * 150  # A-law silence
    for bad in (
        MediaFormat("mulaw", 16000),
        MediaFormat("l16", 24000),
        MediaFormat("l16", 8000, 2),
    ):
        with pytest.raises(ValueError):
            TelnyxStream(playback_format=bad)
    with pytest.raises(ValueError):
        TelnyxStream(chunk_ms=10)


def test_no_dtmf_or_hangup_frames_and_honest_capabilities() -> None:
    stream = streaming()
    assert stream.send_dtmf("123") == [] and stream.hangup() == []
    caps = stream.capabilities
    assert (caps.marks, caps.clear, caps.dtmf_in) == (True, True, True)
    assert caps.send_dtmf_on_stream is False and caps.hangup_on_stream is True


# --------------------------------------------------------------------------- TeXML


def test_answer_document_exact() -> None:
    body = connect_stream_texml(
        "wss://calls.example.com/ws/telnyx", {"token": 't<&>"', "profile": "front-desk"}
    )
    assert body == (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
        '<Stream url="wss://calls.example.com/ws/telnyx" track="inbound_track" codec="PCMU"'
        ' bidirectionalMode="rtp" bidirectionalCodec="PCMU" bidirectionalSamplingRate="8000">'
        '<Parameter name="token" value="t&lt;&amp;&gt;&quot;" />'
        '<Parameter name="profile" value="front-desk" />'
        "</Stream></Connect></Response>"
    )
    carrier = TelnyxCarrier(PUBLIC)
    doc, ctype = carrier.answer_document("wss://h/ws/telnyx", {"token": "x"})
    assert ctype == "application/xml" and 'bidirectionalMode="rtp"' in doc
    for bad in ("https://h/ws", "wss://h/ws?token=1", "wss://h/ws#x", "/ws/telnyx"):
        with pytest.raises(ValueError):
            connect_stream_texml(bad, {})
    with pytest.raises(ValueError):
        connect_stream_texml("wss://h/ws", {"": "x"})


def test_busy_and_hangup_texml() -> None:
    head = '<?xml version="1.0" encoding="UTF-8"?>'
    assert busy_texml(None, reject=True) == head + '<Response><Reject reason="busy" /></Response>'
    assert busy_texml("All lines are busy.") == (
        head + "<Response><Say>All lines are busy.</Say><Hangup /></Response>"
    )
    assert hangup_texml() == head + "<Response><Hangup /></Response>"
    assert transfer_texml("+15550001111", caller_id="+15550002222") == (
        head + '<Response><Dial timeout="30" callerId="+15550002222">'
        "<Number>+15550001111</Number></Dial></Response>"
    )
    with pytest.raises(ValueError):
        transfer_texml("5550001111</Number><Hangup/>")


# --------------------------------------------------------------------------- signatures


def test_signature_accepts_the_real_thing_once() -> None:
    check = TelnyxSignature(PUBLIC)
    body = b"CallSid=v3%3Aabc&From=%2B15550001111"
    headers = sign_webhook(PRIVATE, body)
    assert check.verify(headers, body)
    assert not check.verify(headers, body)  # the same signed request again: a replay
    upper = {k.title(): v for k, v in sign_webhook(PRIVATE, body, int(time.time()) - 1).items()}
    assert check.verify(upper, body)  # header names are case-insensitive


def test_signature_rejections() -> None:
    check = TelnyxSignature(PUBLIC)
    body = b'{"data":{"event_type":"call.initiated"}}'
    now = int(time.time())
    _, other_public = generate_keypair()
    assert not TelnyxSignature(other_public).verify(sign_webhook(PRIVATE, body), body)
    assert not check.verify(sign_webhook(PRIVATE, body), body + b" ")  # tampered body
    assert not check.verify(sign_webhook(PRIVATE, body, now - 301), body)  # expired
    assert not check.verify(sign_webhook(PRIVATE, body, now + 301), body)  # from the future
    good = sign_webhook(PRIVATE, body, now - 2)
    sig, stamp = good["telnyx-signature-ed25519"], good["telnyx-timestamp"]
    assert not check.verify({"telnyx-timestamp": stamp}, body)
    assert not check.verify({"telnyx-signature-ed25519": sig}, body)
    assert not check.verify({**good, "telnyx-timestamp": f" {stamp}"}, body)
    assert not check.verify({**good, "telnyx-timestamp": str(now - 3)}, body)  # not what was signed
    assert not check.verify({**good, "telnyx-signature-ed25519": "@@" + sig[2:]}, body)
    assert not check.verify({**good, "telnyx-signature-ed25519": sig[:40]}, body)
    assert not check.verify(sign_webhook(PRIVATE, b"\xff\xfe"), b"\xff\xfe")  # not UTF-8
    assert check.verify(good, body)  # none of the above burned the real one
    late = TelnyxSignature(PUBLIC, clock=lambda: now + 400)
    assert not late.verify(sign_webhook(PRIVATE, body, now), body)
    for bad_key in ("", "not base64!", base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError):
            TelnyxSignature(bad_key)
    assert "redacted" in repr(check)


# --------------------------------------------------------------------------- REST control


async def test_control_uses_texml_and_call_control_endpoints() -> None:
    seen: list[tuple[str, str, dict[str, Any]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        seen.append((request.method, request.url.path, body))
        assert request.headers["authorization"] == "Bearer KEY-secret"
        if "gone" in request.url.path:
            return httpx.Response(422, json={"errors": [{"code": "90018", "title": "ended"}]})
        if request.url.path.endswith("/Calls"):
            return httpx.Response(200, json={"call_sid": "v3:new", "status": "queued"})
        return httpx.Response(200, json={"data": {"result": "ok"}})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    control = TelnyxControl(
        "KEY-secret", "acct-1", base_url="http://telnyx.test/v2", http_client=client
    )
    assert "KEY-secret" not in repr(control)
    await control.hangup("v3:abc")
    await control.transfer("v3:abc", "+15550001111")
    await control.send_dtmf("v3:abc", "12#")
    sid = await control.dial(
        to="+15550003333", from_="+15550004444", application_sid="app", url="https://h/texml"
    )
    assert sid == "v3:new"
    with pytest.raises(CallEnded):
        await control.hangup("v3:gone")
    with pytest.raises(ValueError):
        await control.send_dtmf("v3:abc", "12;")
    await control.aclose()
    await client.aclose()
    assert seen[0] == ("POST", "/v2/texml/Accounts/acct-1/Calls/v3:abc", {"Status": "completed"})
    assert seen[1][1] == "/v2/texml/Accounts/acct-1/Calls/v3:abc"
    assert "<Number>+15550001111</Number>" in seen[1][2]["Texml"]
    assert seen[2] == ("POST", "/v2/calls/v3:abc/actions/send_dtmf", {"digits": "12#"})
    assert seen[3][1] == "/v2/texml/Accounts/acct-1/Calls"
    assert seen[3][2] == {
        "ApplicationSid": "app",
        "To": "+15550003333",
        "From": "+15550004444",
        "Url": "https://h/texml",
    }


# --------------------------------------------------------------------------- simulator <-> app


@dataclass
class App:
    """What the in-test app does (`mode`) and what it saw."""

    mode: str = "echo"
    answer: str | None = None  # a TeXML document to answer with instead of the carrier's
    public_key: str = PUBLIC
    base_url: str = ""
    ws_url: str = ""
    webhook_ok: list[bool] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    raw: list[str | bytes] = field(default_factory=list)
    stream: TelnyxStream | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


def make_app(app_state: App) -> FastAPI:
    app = FastAPI()
    carrier = TelnyxCarrier(app_state.public_key)

    @app.post("/texml")
    async def texml(request: Request) -> Response:
        body = await request.body()
        ok = carrier.verify_webhook(str(request.url), dict(request.headers), body)
        app_state.webhook_ok.append(ok)
        if not ok:
            return Response("bad signature", status_code=403)
        doc, ctype = carrier.answer_document(
            app_state.ws_url, {"token": "per-call-token", "profile": "front-desk"}
        )
        if app_state.answer is not None:
            doc = app_state.answer.format(ws_url=app_state.ws_url)
        return Response(doc, media_type=ctype)

    @app.websocket("/ws/telnyx")
    async def media_stream(ws: WebSocket) -> None:
        await ws.accept()
        try:
            await serve_stream(app_state, ws, carrier.new_stream(max_frame_bytes=64 * 1024))
        except WebSocketDisconnect:
            pass
        finally:
            app_state.done.set()

    return app


async def serve_stream(app_state: App, ws: WebSocket, stream: TelnyxStream) -> None:
    app_state.stream = stream
    n = 0
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        data = msg["text"] if msg.get("text") is not None else msg.get("bytes", b"")
        app_state.raw.append(data)
        try:
            event = stream.receive(data)
        except CarrierProtocolError as exc:
            app_state.errors.append(str(exc))
            continue
        app_state.events.append(event)
        out: list[str | bytes] = []
        if isinstance(event, CallStarted):
            if app_state.mode == "clear":
                out += stream.play(tone_ulaw(2000))
                out += stream.mark("tone-end")
            elif app_state.mode == "malformed":
                out += [b"\xff" * 160, "{not json", '{"event":"play"}']
                ten_ms = base64.b64encode(b"\xff" * 80).decode()
                out.append('{"event":"media","media":{"payload":"' + ten_ms + '"}}')
                out.append('{"event":"media","stream_id":"other","media":{"payload":"AAAA"}}')
                out += stream.play(tone_ulaw(200))  # fine: must play
        elif isinstance(event, CallerAudio):
            n += 1
            if app_state.mode == "echo":
                out += stream.play(event.audio)
                if n % 10 == 0:
                    out += stream.mark(f"m{n}")
            elif app_state.mode == "clear" and n == 25:
                out += stream.clear()
        elif isinstance(event, Dtmf) and event.digit == "0":
            await ws.close(code=1000)
            return
        elif isinstance(event, CallStopped):
            return
        for item in out:
            if isinstance(item, bytes):
                await ws.send_bytes(item)
            else:
                await ws.send_text(item)


@contextlib.asynccontextmanager
async def serve(app_state: App) -> AsyncIterator[App]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    app_state.base_url = f"http://127.0.0.1:{port}"
    app_state.ws_url = f"ws://127.0.0.1:{port}/ws/telnyx"
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


async def call(app_state: App, script: list[Any], **kwargs: Any) -> CallResult:
    kwargs.setdefault("private_key", PRIVATE)
    kwargs.setdefault("timeout", 15)
    caller = TelnyxSimulatedCaller(app_state.base_url, script=script, **kwargs)
    result = await caller.run()
    if result.stream_sid:
        await asyncio.wait_for(app_state.done.wait(), 5)
    return result


def loud_ms(ulaw: bytes) -> int:
    pcm = ulaw_decode(ulaw)
    frames = pcm[: pcm.size // 160 * 160].reshape(-1, 160)
    return int((np.abs(frames.astype(np.int32)).max(axis=1) > 1000).sum()) * 20


async def test_echo_call_over_real_sockets() -> None:
    async with serve(App(mode="echo")) as app_state:
        script = [Say(tone(600), label="hello"), Pause(400), PressDigit("5"), Pause(200), HangUp()]
        result = await call(app_state, script)

    assert app_state.webhook_ok == [True]
    assert result.protocol_errors == [] and result.script_errors == []
    assert app_state.errors == []
    assert result.ended_by == "caller" and result.close_code == 1000
    assert result.parameters == {"token": "per-call-token", "profile": "front-desk"}
    started = app_state.events[1]
    assert isinstance(started, CallStarted)
    assert started.call_id == result.call_sid and started.stream_id == result.stream_sid
    assert started.custom_parameters == result.parameters
    assert started.account_id == result.account_sid and started.from_number == "+15550001111"
    assert Dtmf("5") in app_state.events
    assert isinstance(app_state.events[-1], CallStopped)
    # the caller heard its own tone back, and every mark came back once it had played
    assert 500 <= loud_ms(result.heard) <= 700
    sent = [m.name for m in result.marks_received]
    assert sent and [m.name for m in result.marks_echoed] == sent
    echoed = [e for e in app_state.events if isinstance(e, PlayedUpTo)]
    assert [e.name for e in echoed] == sent
    assert app_state.stream is not None and app_state.stream.frames_missing == 0


async def test_clear_empties_the_queue_and_returns_marks() -> None:
    async with serve(App(mode="clear")) as app_state:
        result = await call(app_state, [Pause(1200), HangUp()])

    assert result.protocol_errors == [] and app_state.errors == []
    assert len(result.clears) == 1
    assert [m.name for m in result.marks_echoed] == ["tone-end"]
    assert result.marks_echoed[0].t == pytest.approx(result.clears[0], abs=0.05)
    assert PlayedUpTo("tone-end") in app_state.events
    assert 300 <= loud_ms(result.heard) <= 700  # cleared after ~0.5 s of a 2 s tone


async def test_frames_telnyx_refuses_are_recorded_and_answered_with_errors() -> None:
    async with serve(App(mode="malformed")) as app_state:
        result = await call(app_state, [Pause(600), HangUp()])

    codes = [e.split(":")[0] for e in result.protocol_errors]
    assert codes == ["100003 malformed_frame"] * 3 + ["100004 invalid_media"] + [
        "100003 malformed_frame"
    ]
    assert "10 ms is outside 20 ms..30 s" in result.protocol_errors[3]
    assert 150 <= loud_ms(result.heard) <= 250  # the good frame still played
    # Telnyx's error frames reached the app's stream as ignorable events
    assert app_state.stream is not None and len(app_state.stream.carrier_errors) == 5
    assert app_state.errors == []


async def test_server_hangup_ends_the_call() -> None:
    async with serve(App(mode="echo")) as app_state:
        result = await call(app_state, [Pause(200), PressDigit("0"), Pause(3000)])
    assert result.ended_by == "server" and result.close_code == 1000


async def test_unsigned_forged_expired_and_replayed_webhooks_are_refused() -> None:
    _, other_public = generate_keypair()
    async with serve(App(public_key=other_public)) as app_state:
        forged = await call(app_state, [HangUp()])
    assert app_state.webhook_ok == [False] and forged.webhook_status == 403
    assert forged.stream_sid is None and forged.ended_by == "server"

    async with serve(App()) as app_state:
        unsigned = await call(app_state, [HangUp()], sign=False)
        expired = await call(app_state, [HangUp()], stamp_skew_s=-400)
    assert unsigned.webhook_status == 403 and expired.webhook_status == 403

    async with serve(App()) as app_state:
        caller = TelnyxSimulatedCaller(
            app_state.base_url, private_key=PRIVATE, script=[HangUp()], replay_webhook=True
        )
        replayed = await caller.run()
    assert caller.webhook_statuses == [200, 403] and replayed.webhook_status == 403
    assert app_state.webhook_ok == [True, False]


async def test_simulated_frames_are_telnyx_shaped_and_paced() -> None:
    async with serve(App(mode="echo")) as app_state:
        result = await call(app_state, [Pause(1000), PressDigit("7"), HangUp()], drop_frames={5, 6})

    msgs = [orjson.loads(m) for m in app_state.raw]
    assert msgs[0] == {"event": "connected", "version": "1.0.0"}
    start = msgs[1]
    assert set(start) == {"event", "sequence_number", "stream_id", "start"}
    assert start["sequence_number"] == "1" and start["stream_id"] == result.stream_sid
    assert start["start"]["media_format"] == {
        "encoding": "PCMU",
        "sample_rate": 8000,
        "channels": 1,
    }
    assert start["start"]["call_control_id"] == result.call_sid
    media_msgs = [m for m in msgs if m["event"] == "media"]
    chunks = [int(m["media"]["chunk"]) for m in media_msgs]
    assert chunks == [c for c in range(1, chunks[-1] + 1) if c not in (5, 6)]
    assert all(
        int(m["media"]["timestamp"]) == (int(m["media"]["chunk"]) - 1) * 20 for m in media_msgs
    )
    assert all(len(base64.b64decode(m["media"]["payload"])) == 160 for m in media_msgs)
    seqs = [int(m["sequence_number"]) for m in msgs[1:]]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    dtmf = next(m for m in msgs if m["event"] == "dtmf")
    assert dtmf["dtmf"] == {"digit": "7"} and dtmf["stream_id"] == result.stream_sid
    assert msgs[-1]["event"] == "stop"
    assert msgs[-1]["stop"] == {"user_id": result.account_sid, "call_control_id": result.call_sid}
    assert app_state.stream is not None and app_state.stream.frames_missing == 2
    assert result.frames_dropped == 2 and app_state.errors == []
    # 20 ms pacing on an absolute clock: ~50 frames in the 1 s pause
    assert 45 <= len(media_msgs) + 2 <= 56


async def test_a_stream_without_rtp_mode_plays_nothing_back() -> None:
    answer = (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
        '<Stream url="{ws_url}"><Parameter name="token" value="t"/></Stream>'
        "</Connect><Say>Goodbye.</Say></Response>"
    )
    async with serve(App(mode="echo", answer=answer)) as app_state:
        result = await call(app_state, [Say(tone(200)), Pause(300), PressDigit("0"), Pause(2000)])

    assert result.parameters == {"token": "t"}
    assert result.protocol_errors and all(
        e.startswith("100004 invalid_media: the stream is in mp3 mode")
        for e in result.protocol_errors
    )
    assert loud_ms(result.heard) == 0
    # the app closed the socket: TeXML goes on with the verbs after <Connect>, then hangs up
    assert result.ended_by == "server" and result.said == ["Goodbye."]


def test_carrier_refuses_a_playback_codec_texml_cannot_carry() -> None:
    assert TelnyxCarrier(PUBLIC, playback="PCMA").new_stream(max_frame_bytes=4096).media_format == (
        MediaFormat("alaw", 8000)
    )
    for bad in ("L16", "G722", "pcmu"):
        with pytest.raises(ValueError):
            TelnyxCarrier(PUBLIC, playback=bad)
