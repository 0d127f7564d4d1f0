"""Exotel's Voicebot stream: the wire (every event, every rejection, the exact frames), the
stream-URL answer, the URL secret and per-call stream tokens, the v1 Calls API client, and the
simulated Exotel edge talking over real loopback sockets to a minimal app built on
`ExotelStream` (so the simulator and the adapter agree on the wire)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx
import numpy as np
import orjson
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from hypothesis import given, settings
from hypothesis import strategies as st

from livecall.audio.g711 import ulaw_decode
from livecall.audio.transcode import InboundTranscoder, OutboundTranscoder
from livecall.carriers.base import (
    CallerAudio,
    CallStarted,
    CallStopped,
    CarrierProtocolError,
    Dtmf,
    Ignored,
    MediaFormat,
    PlayedUpTo,
)
from livecall.carriers.exotel import (
    ExotelCarrier,
    ExotelClient,
    ExotelError,
    ExotelStream,
    ExotelUrlAuth,
    stream_url_answer,
)
from livecall.carriers.exotel.answer import stream_url_for, voicebot_stream_url
from livecall.carriers.exotel.wire import (
    CAPABILITIES,
    StreamState,
    clear_frame,
    mark_frame,
    media_frame,
)
from livecall.server.carrier_route import stream_tokens_for
from livecall.sim.exotel import ExotelCallResult, SimulatedExotelCaller, serve_fake_exotel_rest
from livecall.sim.script import HangUp, Pause, PressDigit, Probe, Say

SECRET = "flow-url-secret-0123456789"
TOKENS = stream_tokens_for(b"stream-token-secret-0123456789", "exotel")
SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
CALL = "b6cfaf5f5cef3ca0fc937749ef960e25"


def start_msg(**over: Any) -> dict[str, Any]:
    start = {
        "stream_sid": SID,
        "call_sid": CALL,
        "account_sid": "acme1",
        "from": "+919876543210",
        "to": "+918047491899",
        "custom_parameters": {"token": "t0k", "profile": "front-desk"},
        "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"},
    }
    start.update(over)
    return {"event": "start", "sequence_number": "1", "stream_sid": SID, "start": start}


def dumps(msg: dict[str, Any]) -> str:
    return orjson.dumps(msg).decode()


def media_msg(chunk: Any = "1", payload: bytes = bytes(3200), **over: Any) -> str:
    media = {"chunk": chunk, "timestamp": "100", "payload": base64.b64encode(payload).decode()}
    msg = {"event": "media", "sequence_number": "2", "stream_sid": SID, "media": media}
    msg.update(over)
    return dumps(msg)


def started_stream(**over: Any) -> ExotelStream:
    stream = ExotelStream(max_frame_bytes=64 * 1024)
    stream.receive('{"event":"connected"}')
    stream.receive(dumps(start_msg(**over)))
    return stream


# --------------------------------------------------------------------------- wire: inbound


def test_every_event_in_order() -> None:
    stream = ExotelStream()
    assert stream.receive('{"event":"connected"}') == Ignored("connected")
    started = stream.receive(dumps(start_msg()))
    assert started == CallStarted(
        call_id=CALL,
        stream_id=SID,
        media_format=MediaFormat("l16", 8000),
        custom_parameters={"token": "t0k", "profile": "front-desk"},
        account_id="acme1",
        from_number="+919876543210",
        to_number="+918047491899",
    )
    assert stream.started == started and stream.state is StreamState.STREAMING
    pcm = np.arange(1600, dtype="<i2").tobytes()
    assert stream.receive(media_msg("1", pcm)) == CallerAudio(pcm, 1, 100)
    dtmf = {"event": "dtmf", "sequence_number": "7", "stream_sid": SID}
    assert stream.receive(dumps({**dtmf, "dtmf": {"digit": "5", "duration": "100"}})) == Dtmf("5")
    mark = {"event": "mark", "sequence_number": "8", "stream_sid": SID, "mark": {"name": "m1"}}
    assert stream.receive(dumps(mark)) == PlayedUpTo("m1")
    stop = {"call_sid": CALL, "account_sid": "acme1", "reason": "callended"}
    event = stream.receive(dumps({"event": "stop", "stream_sid": SID, "stop": stop}))
    assert event == CallStopped("callended")
    assert stream.state is StreamState.STOPPED and stream.stop_reason == "callended"
    assert stream.protocol_errors == 0


def test_the_other_documented_shape_numbers_raw_and_128() -> None:
    """One page of Exotel's docs sends counters as numbers, `encoding: raw`, bit_rate 128."""
    msg = start_msg(media_format={"encoding": "raw", "sample_rate": "16000", "bit_rate": "128"})
    msg["sequence_number"] = 1
    stream = ExotelStream()
    started = stream.receive(dumps(msg))  # no `connected` first: also fine
    assert isinstance(started, CallStarted) and started.media_format == MediaFormat("l16", 16000)
    event = stream.receive(media_msg(2, bytes(640), sequence_number=3))
    assert event == CallerAudio(bytes(640), 2, 100)
    assert stream.frames_missing == 1  # chunk 1 never came
    dtmf = {"event": "dtmf", "sequence_number": 1, "dtmf": {"duration": "200", "digit": "b"}}
    assert stream.receive(dumps(dtmf)) == Dtmf("B")


def test_defaults_unknown_events_and_stop_before_start() -> None:
    stream = ExotelStream()
    minimal = {"event": "start", "start": {"stream_sid": SID, "call_sid": CALL}}
    started = stream.receive(dumps(minimal))
    assert isinstance(started, CallStarted)
    assert started.media_format == MediaFormat("l16", 8000) and started.custom_parameters == {}
    assert stream.receive('{"event":"silence","stream_sid":"' + SID + '"}') == Ignored("silence")
    early = ExotelStream()
    early.receive('{"event":"connected"}')
    assert early.receive('{"event":"stop"}') == CallStopped(None)
    assert early.state is StreamState.STOPPED


def test_non_string_parameters_are_kept_as_json() -> None:
    stream = ExotelStream()
    started = stream.receive(dumps(start_msg(custom_parameters={"n": 3, "ok": True})))
    assert isinstance(started, CallStarted)
    assert started.custom_parameters == {"n": "3", "ok": "true"}


REJECTIONS = [
    (b'{"event":"media"}', "binary frames"),
    ("{not json", "invalid JSON"),
    ("[1,2]", "JSON object"),
    ('{"event":""}', "string 'event'"),
    ('{"event":"connected"}', "connected must be the first"),
    (dumps(start_msg()), "start received twice"),
    (media_msg("1", stream_sid="MZother"), "does not match this stream's"),
    (media_msg("1", b"\x00" * 3), "whole 16-bit samples"),
    (media_msg("x"), "media.chunk must be a whole number"),
    (media_msg(-1), "media.chunk -1 is out of range"),
    (media_msg(1.5), "media.chunk must be a whole number"),
    (media_msg("9999"), "jumps more than"),
    ('{"event":"media","stream_sid":"' + SID + '","media":{"payload":"@@@"}}', "valid base64"),
    ('{"event":"media","media":{"payload":7}}', "media.payload must be a string"),
    ('{"event":"media"}', "needs a 'media' object"),
    ('{"event":"dtmf","dtmf":{"digit":"x"}}', "dtmf.digit must be one of"),
    ('{"event":"dtmf","dtmf":{"digit":"1","duration":"long"}}', "dtmf.duration"),
    ('{"event":"mark","mark":{"name":""}}', "mark.name must be a non-empty"),
    ('{"event":"stop","stream_sid":"MZother"}', "does not match"),
]


@pytest.mark.parametrize(("frame", "rule"), REJECTIONS)
def test_rejections_name_the_rule_and_change_nothing(frame: str | bytes, rule: str) -> None:
    stream = started_stream()
    stream.receive(media_msg("1"))
    with pytest.raises(CarrierProtocolError, match=rule):
        stream.receive(frame)
    assert stream.protocol_errors == 1 and stream.state is StreamState.STREAMING
    assert isinstance(stream.receive(media_msg("2")), CallerAudio)  # the call goes on
    assert stream.last_chunk == 2


START_REJECTIONS = [
    (start_msg(stream_sid="MZinner"), "does not match the message's"),
    (start_msg(call_sid=""), "start.call_sid"),
    (start_msg(media_format={"encoding": "audio/x-mulaw"}), "raw 16-bit PCM"),
    (start_msg(media_format={"sample_rate": "44100"}), "is not one of Exotel's"),
    (start_msg(media_format="8000"), "media_format must be an object"),
    (start_msg(custom_parameters=["a"]), "custom_parameters must be an object"),
    ({"event": "start", "start": {"call_sid": CALL}}, "non-empty stream_sid"),
    ({"event": "start", "start": "x"}, "needs a 'start' object"),
]


@pytest.mark.parametrize(("msg", "rule"), START_REJECTIONS)
def test_start_rejections(msg: dict[str, Any], rule: str) -> None:
    stream = ExotelStream()
    with pytest.raises(CarrierProtocolError, match=rule):
        stream.receive(dumps(msg))
    assert stream.state is StreamState.AWAITING_CONNECTED and stream.started is None
    assert isinstance(stream.receive(dumps(start_msg())), CallStarted)


@pytest.mark.parametrize(
    "frame",
    [
        media_msg("1"),
        '{"event":"dtmf","dtmf":{"digit":"1"}}',
        '{"event":"mark","mark":{"name":"a"}}',
    ],
)
def test_nothing_but_start_or_stop_before_start(frame: str) -> None:
    stream = ExotelStream()
    with pytest.raises(CarrierProtocolError, match="before start"):
        stream.receive(frame)


def test_nothing_after_stop_and_no_going_back() -> None:
    stream = started_stream()
    stream.receive('{"event":"stop"}')
    for frame in (media_msg("1"), dumps(start_msg()), '{"event":"stop"}'):
        with pytest.raises(CarrierProtocolError, match="after stop"):
            stream.receive(frame)


def test_late_or_duplicate_chunks_are_refused_and_counted() -> None:
    stream = started_stream()
    stream.receive(media_msg("3"))
    for late in ("3", "2"):
        with pytest.raises(CarrierProtocolError, match="not after chunk 3"):
            stream.receive(media_msg(late))
    assert stream.frames_late == 2 and stream.frames_missing == 2 and stream.frames_received == 1


def test_a_chunk_numbered_from_zero_is_not_a_negative_loss() -> None:
    stream = started_stream()
    stream.receive(media_msg("0"))
    stream.receive(media_msg("1"))
    assert stream.frames_missing == 0 and stream.frames_received == 2


def test_frames_are_bounded() -> None:
    stream = ExotelStream(max_frame_bytes=1000)
    with pytest.raises(CarrierProtocolError, match="exceeds the 1000-byte limit"):
        stream.receive(" " * 1001)
    with pytest.raises(CarrierProtocolError, match="frame of 1200 bytes"):
        stream.receive("€" * 400)  # 400 characters, 1200 bytes on the wire
    with pytest.raises(CarrierProtocolError, match="invalid JSON"):
        stream.receive("€" * 300)  # 900 bytes: within the limit, then parsed


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**12), st.text(max_size=8), st.floats()
)
_fields = st.dictionaries(
    st.sampled_from(["event", "stream_sid", "sequence_number", "media", "dtmf", "mark", "stop"]),
    st.one_of(
        _scalars,
        st.sampled_from(["media", "start", "stop", "dtmf", "mark", "connected", SID]),
        st.dictionaries(
            st.sampled_from(["payload", "chunk", "timestamp", "digit", "name", "reason"]),
            st.one_of(_scalars, st.sampled_from(["AAAA", "AAA=", "1", "5", "#"])),
        ),
    ),
)
_frames = st.one_of(
    _fields.map(dumps),
    st.binary(max_size=40),
    st.text(max_size=40),
    st.just(media_msg("7")),
    st.just(dumps(start_msg())),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_frames, max_size=12))
def test_any_frames_give_an_event_or_a_named_error_that_changes_nothing(frames: list[Any]) -> None:
    stream = ExotelStream(max_frame_bytes=4096)
    for frame in frames:
        before = (stream.state, stream.started, stream.last_chunk, stream.frames_received)
        try:
            event = stream.receive(frame)
        except CarrierProtocolError as exc:
            assert str(exc)
            after = (stream.state, stream.started, stream.last_chunk, stream.frames_received)
            assert after == before
            continue
        assert isinstance(
            event, CallStarted | CallerAudio | Dtmf | PlayedUpTo | CallStopped | Ignored
        )


# --------------------------------------------------------------------------- wire: outbound


def test_builders_exact_json() -> None:
    assert media_frame(SID, b"\x01\x00\xff\x7f") == (
        '{"event":"media","stream_sid":"' + SID + '","media":{"payload":"AQD/fw=="}}'
    )
    assert mark_frame(SID, "turn-3") == (
        '{"event":"mark","stream_sid":"' + SID + '","mark":{"name":"turn-3"}}'
    )
    assert clear_frame(SID) == '{"event":"clear","stream_sid":"' + SID + '"}'


def _payload_sizes(frames: list[Any]) -> list[int]:
    out = []
    for frame in frames:
        msg = orjson.loads(frame)
        if msg["event"] == "media":
            out.append(len(base64.b64decode(msg["media"]["payload"])))
    return out


def test_play_sends_minimum_chunks_and_mark_flushes_whole_units() -> None:
    stream = started_stream()
    frames = stream.play(bytes(7000))
    assert _payload_sizes(frames) == [3200, 3200] and stream.buffered_bytes == 600
    frames = stream.mark("m1")
    assert _payload_sizes(frames) == [320]  # whole 20 ms units; 280 bytes wait
    assert orjson.loads(frames[-1]) == {"event": "mark", "stream_sid": SID, "mark": {"name": "m1"}}
    assert stream.buffered_bytes == 280
    assert _payload_sizes(stream.play(bytes(2920))) == [3200]  # the rest leads the next chunk
    assert stream.mark("m2") == [mark_frame(SID, "m2")]  # nothing buffered: the mark alone
    stream.play(bytes(100))
    flushed = stream.flush()  # end of a turn: padded with silence to 320
    assert _payload_sizes(flushed) == [320] and stream.buffered_bytes == 0
    assert stream.flush() == []


@pytest.mark.parametrize(("rate", "chunk"), [(8000, 3200), (16000, 3200), (24000, 4800)])
def test_chunk_size_follows_the_rate(rate: int, chunk: int) -> None:
    fmt = {"encoding": "audio/x-raw", "sample_rate": str(rate), "bit_rate": "16"}
    stream = started_stream(media_format=fmt)
    sizes = _payload_sizes(stream.play(bytes(chunk * 3 + 10)))
    assert sizes == [chunk] * 3 and all(s % 320 == 0 for s in sizes)


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
def test_the_stream_expects_the_rate_its_url_asked_for(rate: int) -> None:
    stream = ExotelStream(sample_rate=rate)
    assert stream.media_format == MediaFormat("l16", rate)  # before start: the rate asked
    minimal = {"event": "start", "start": {"stream_sid": SID, "call_sid": CALL}}
    started = stream.receive(dumps(minimal))  # a start naming no rate: the one asked for
    assert isinstance(started, CallStarted) and started.media_format == MediaFormat("l16", rate)
    assert stream.rate_mismatch is None
    chunk = max(3200, rate // 5)  # 100 ms, and never under Exotel's 3.2 kB
    assert _payload_sizes(stream.play(bytes(chunk * 2))) == [chunk, chunk]


@pytest.mark.parametrize(("asked", "got"), [(16000, 8000), (8000, 24000), (24000, 16000)])
def test_a_start_at_another_rate_wins_and_is_kept_as_a_mismatch(asked: int, got: int) -> None:
    """The audio is coded at the start's rate, so the call follows it; the shell says so."""
    stream = ExotelStream(sample_rate=asked)
    fmt = {"encoding": "audio/x-raw", "sample_rate": str(got), "bit_rate": "16"}
    started = stream.receive(dumps(start_msg(media_format=fmt)))
    assert isinstance(started, CallStarted) and started.media_format == MediaFormat("l16", got)
    assert stream.media_format == MediaFormat("l16", got)
    assert stream.rate_mismatch == (asked, got)
    chunk = max(3200, got // 5)
    assert _payload_sizes(stream.play(bytes(chunk))) == [chunk]  # sized for what plays


def test_a_start_at_a_rate_exotel_has_not_is_refused_and_changes_nothing() -> None:
    stream = ExotelStream(sample_rate=16000)
    fmt = {"encoding": "audio/x-raw", "sample_rate": "44100", "bit_rate": "16"}
    with pytest.raises(CarrierProtocolError, match="sample_rate 44100"):
        stream.receive(dumps(start_msg(media_format=fmt)))
    assert stream.state is not StreamState.STREAMING and stream.rate_mismatch is None
    assert stream.media_format == MediaFormat("l16", 16000)


def test_the_carrier_asks_for_16k_by_default_and_its_streams_expect_it() -> None:
    carrier = ExotelCarrier(SECRET)
    assert carrier.sample_rate == 16000
    assert carrier.new_stream(max_frame_bytes=1024).asked_rate == 16000
    body, _ = carrier.answer_document("wss://h/ws/exotel", {"token": "t"})
    assert orjson.loads(body) == {"url": "wss://h/ws/exotel?sample-rate=16000&token=t"}
    for bad in (11025, 44100, 0):
        with pytest.raises(ValueError, match="Exotel streams at"):
            ExotelCarrier(SECRET, sample_rate=bad)
        with pytest.raises(ValueError, match="Exotel streams at"):
            ExotelStream(sample_rate=bad)


def test_the_codec_path_resamples_only_where_the_rates_differ() -> None:
    """16 kHz in is the model's input rate and 24 kHz out its output rate: bit-exact there."""
    pcm = np.random.default_rng(1).normal(0, 4000, 4800).astype("<i2")
    inbound = InboundTranscoder(16000, "audio/x-l16", 16000)
    assert inbound.decode(pcm.tobytes()) == pcm.tobytes()
    outbound = OutboundTranscoder(24000, "audio/x-l16", 24000)
    assert outbound.encode(pcm.tobytes()) == pcm.tobytes()
    for rate in (8000, 24000):  # other rates go through the resampler: 100 ms in, ~100 ms out
        got = InboundTranscoder(16000, "audio/x-l16", rate).decode(bytes(rate // 5))
        assert abs(len(got) - 3200) <= 2 * 16 * 4
    for rate in (8000, 16000):
        got = OutboundTranscoder(24000, "audio/x-l16", rate).encode(bytes(4800))
        assert abs(len(got) - rate // 5) <= 2 * rate // 1000 * 4


def test_clear_hangup_and_dtmf() -> None:
    stream = started_stream()
    stream.play(bytes(1000))
    assert stream.clear() == [clear_frame(SID)] and stream.buffered_bytes == 0
    stream.play(bytes(1000))
    assert stream.hangup() == [] and stream.buffered_bytes == 0  # closing the socket hangs up
    assert stream.send_dtmf("123") == []  # no such command: the core plays tones in-band
    assert CAPABILITIES.marks and CAPABILITIES.clear and CAPABILITIES.dtmf_in
    assert not CAPABILITIES.send_dtmf_on_stream and CAPABILITIES.hangup_on_stream


def test_builders_need_a_start_and_a_mark_name() -> None:
    with pytest.raises(RuntimeError, match="start has not arrived"):
        ExotelStream().play(bytes(3200))
    with pytest.raises(ValueError, match="non-empty name"):
        started_stream().mark("")


# --------------------------------------------------------------------------- answer


def test_answer_is_the_applets_json_with_parameters_in_the_query() -> None:
    body, ctype = stream_url_answer("wss://bot.example.in/ws/exotel", {"token": "a b", "p": "x"})
    assert ctype == "application/json"
    assert body == '{"url":"wss://bot.example.in/ws/exotel?sample-rate=8000&token=a+b&p=x"}'
    carrier = ExotelCarrier(SECRET, sample_rate=16000)
    body, _ = carrier.answer_document("wss://h/ws/exotel", {"token": "t"})
    assert orjson.loads(body) == {"url": "wss://h/ws/exotel?sample-rate=16000&token=t"}


@pytest.mark.parametrize(
    ("url", "params", "rate", "error"),
    [
        ("wss://h/ws", {"a": "1", "b": "2", "c": "3", "d": "4"}, 8000, "at most 3"),
        ("wss://h/ws", {"a": "x" * 300}, 8000, "Exotel allows 256"),
        ("wss://h/ws", {"sample-rate": "16000"}, 8000, "Exotel's own parameter"),
        ("wss://h/ws", {}, 44100, "Exotel streams at"),
        ("wss://h/ws?x=1", {}, 8000, "query or fragment"),
        ("https://h/ws", {}, 8000, "ws:// or wss://"),
        ("wss://h/" + "p" * 600, {}, 8000, "Exotel allows 600"),
    ],
)
def test_answer_refuses_what_exotel_would_cut(
    url: str, params: dict[str, str], rate: int, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        voicebot_stream_url(url, params, sample_rate=rate)


def test_stream_url_for() -> None:
    assert stream_url_for("https://bot.example.in/base/") == "wss://bot.example.in/base/ws/exotel"
    assert stream_url_for("http://127.0.0.1:8080") == "ws://127.0.0.1:8080/ws/exotel"
    with pytest.raises(ValueError):
        stream_url_for("ftp://x")


# --------------------------------------------------------------------------- URL secret, tokens


def basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": "Basic " + raw}


def test_url_secret_by_basic_auth_or_key() -> None:
    auth = ExotelUrlAuth(SECRET)
    url = "https://bot.example.in/exotel/voicebot?CallSid=x"
    assert auth.verify(url, basic("exotel", SECRET))
    assert auth.verify(url, {"authorization": auth.basic_header()})
    assert auth.verify(url + "&key=" + SECRET, {})
    carrier = ExotelCarrier(SECRET)
    assert carrier.verify_webhook(url, basic("exotel", SECRET), b"")


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("https://h/a", {}),
        ("https://h/a", basic("exotel", SECRET + "x")),
        ("https://h/a", basic("someone", SECRET)),
        ("https://h/a", {"Authorization": "Bearer " + SECRET}),
        ("https://h/a", {"Authorization": "Basic @@not-base64"}),
        ("https://h/a", {"Authorization": "Basic " + base64.b64encode(SECRET.encode()).decode()}),
        ("https://h/a?key=wrong", {}),
        (f"https://h/a?key={SECRET}&key=other", {}),
        (f"https://h/a?key={SECRET}", basic("exotel", "wrong")),  # a bad header is not rescued
    ],
)
def test_url_secret_refusals(url: str, headers: dict[str, str]) -> None:
    assert not ExotelUrlAuth(SECRET).verify(url, headers)


def test_url_secret_is_never_shown_and_must_be_long() -> None:
    assert SECRET not in repr(ExotelUrlAuth(SECRET))
    with pytest.raises(ValueError, match="at least 16"):
        ExotelUrlAuth("short")


# --------------------------------------------------------------------------- REST control


async def test_connect_stream_posts_the_documented_form() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        call = {"Sid": "c0ffee", "Status": "in-progress", "Direction": "outbound-api"}
        return httpx.Response(200, json={"Call": call})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = ExotelClient(
            "acme1", "key1", "tok1", base_url="https://fake.exotel.test", http_client=http
        )
        call = await client.connect_stream(
            "+919876543210",
            "08047491899",
            "wss://bot.example.in/ws/exotel?sample-rate=8000&token=t",
            time_limit_s=600,
            status_callback="https://bot.example.in/exotel/status",
            custom_field="order-7",
        )
        details = await client.call_details("c0ffee")
    assert call.sid == "c0ffee" and call.status == "in-progress" and details.sid == "c0ffee"
    post, get = seen
    assert post.method == "POST"
    assert str(post.url) == "https://fake.exotel.test/v1/Accounts/acme1/Calls/connect.json"
    assert post.headers["authorization"] == "Basic " + base64.b64encode(b"key1:tok1").decode()
    form = parse_qs(post.content.decode())
    assert form == {
        "From": ["+919876543210"],
        "CallerId": ["08047491899"],
        "StreamUrl": ["wss://bot.example.in/ws/exotel?sample-rate=8000&token=t"],
        "StreamType": ["bidirectional"],
        "Record": ["false"],
        "TimeLimit": ["600"],
        "StatusCallback": ["https://bot.example.in/exotel/status"],
        "StatusCallbackEvents[]": ["answered", "terminal"],
        "CustomField": ["order-7"],
    }
    assert get.method == "GET" and get.url.path == "/v1/Accounts/acme1/Calls/c0ffee.json"
    assert "tok1" not in repr(client)


async def test_api_errors_and_bad_arguments() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("connect.json"):
            return httpx.Response(401, json={"RestException": {"Message": "Not authorized"}})
        return httpx.Response(200, json={"Call": {}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = ExotelClient("acme1", "k", "t", base_url="https://fake", http_client=http)
        with pytest.raises(ExotelError, match="401: Not authorized") as info:
            await client.connect_flow(
                "+91", "080", "http://my.exotel.com/acme1/exoml/start_voice/1"
            )
        assert info.value.status == 401
        with pytest.raises(ExotelError, match="no Call with a Sid"):
            await client.call_details("abc")
        with pytest.raises(ValueError, match="StreamUrl"):
            await client.connect_stream("+91", "080", "https://not-a-socket")
        with pytest.raises(ValueError, match="TimeLimit"):
            await client.connect_stream("+91", "080", "wss://h/ws", time_limit_s=20000)


# --------------------------------------------------------------------------- simulator <-> app


@dataclass
class App:
    """What the in-test app does (`mode`) and what it saw."""

    mode: str = "echo"
    sample_rate: int = 8000
    refuse_upgrades: bool = False  # every stream handshake answered 403
    base_url: str = ""
    ws_url: str = ""
    answers: list[bool] = field(default_factory=list)
    upgrades: list[bool] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    bound: list[bool] = field(default_factory=list)
    stream: ExotelStream | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


def tone(ms: int, hz: float = 440.0, rate: int = 8000) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def make_app(state: App) -> FastAPI:
    app = FastAPI()
    carrier = ExotelCarrier(SECRET, sample_rate=state.sample_rate)

    @app.get("/exotel/voicebot")
    async def voicebot(request: Request) -> Response:
        ok = carrier.verify_webhook(str(request.url), dict(request.headers), b"")
        state.answers.append(ok)
        if not ok:
            return Response("forbidden", status_code=403)
        token = TOKENS.for_call(request.query_params["CallSid"], "", time.time())
        body, ctype = carrier.answer_document(state.ws_url, {"token": token, "profile": "desk"})
        return Response(body, media_type=ctype)

    @app.websocket("/ws/exotel")
    async def media_stream(ws: WebSocket) -> None:
        token = ws.query_params.get("token")
        ok = token is not None and not state.refuse_upgrades
        state.upgrades.append(ok)
        if not ok:
            await ws.close(code=1008)  # before accept: the handshake is refused (403)
            state.done.set()
            return
        await ws.accept()
        try:
            await serve_stream(state, ws, carrier.new_stream(max_frame_bytes=64 * 1024), token)
        except WebSocketDisconnect:
            pass
        finally:
            state.done.set()

    return app


async def serve_stream(state: App, ws: WebSocket, stream: ExotelStream, token: Any) -> None:
    state.stream = stream
    n = 0
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        data = msg["text"] if msg.get("text") is not None else msg.get("bytes", b"")
        try:
            event = stream.receive(data)
        except CarrierProtocolError as exc:
            state.errors.append(str(exc))
            continue
        state.events.append(event)
        out: list[str | bytes] = []
        if isinstance(event, CallStarted):
            state.bound.append(bool(TOKENS.check(token, event.call_id, "", time.time())))
            if state.mode == "clear":
                out += stream.play(tone(2000, rate=state.sample_rate).tobytes())
                out += stream.mark("tone-end")
            elif state.mode == "malformed":
                out += [b"\x00" * 320, "{not json", '{"event":"playAudio"}']
                out.append('{"event":"media","stream_sid":"other","media":{"payload":"AAAA"}}')
                odd = base64.b64encode(bytes(1000)).decode()  # not a multiple of 320
                sid = stream.stream_sid
                media = f'{{"payload":"{odd}"}}'
                out.append(f'{{"event":"media","stream_sid":"{sid}","media":{media}}}')
                out += stream.play(tone(300, rate=state.sample_rate).tobytes())
                out += stream.mark("after-junk")
        elif isinstance(event, CallerAudio):
            n += 1
            if state.mode == "echo":
                out += stream.play(event.audio)
                if n % 3 == 0:
                    out += stream.mark(f"m{n}")
            elif state.mode == "clear" and n == 6:
                out += stream.clear()
        elif isinstance(event, Dtmf) and event.digit == "0":
            out += stream.flush() + stream.hangup()
            for item in out:
                await ws.send_text(item)  # type: ignore[arg-type]
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
async def serve(state: App) -> AsyncIterator[App]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    state.base_url = f"http://127.0.0.1:{port}"
    state.ws_url = f"ws://127.0.0.1:{port}/ws/exotel"
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


async def call(state: App, script: list[Any], **kwargs: Any) -> ExotelCallResult:
    kwargs.setdefault("url_secret", SECRET)
    kwargs.setdefault("timeout", 15)
    caller = SimulatedExotelCaller(state.base_url, script=script, **kwargs)
    result = await caller.run()
    assert isinstance(result, ExotelCallResult)
    if result.stream_sid:
        await asyncio.wait_for(state.done.wait(), 5)
    return result


def loud_ms(ulaw: bytes) -> int:
    pcm = ulaw_decode(ulaw)
    frames = pcm[: pcm.size // 160 * 160].reshape(-1, 160)
    return int((np.abs(frames.astype(np.int32)).max(axis=1) > 1000).sum()) * 20


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
async def test_echo_call_over_real_sockets(rate: int) -> None:
    async with serve(App(mode="echo", sample_rate=rate)) as state:
        script = [Say(tone(600), label="hello"), Pause(600), PressDigit("5"), Pause(600), HangUp()]
        result = await call(state, script)

    assert state.answers == [True] and state.upgrades == [True] and state.bound == [True]
    assert result.protocol_errors == [] and result.script_errors == [] and state.errors == []
    assert result.ended_by == "caller" and result.close_code == 1000
    assert result.sample_rate == rate
    assert set(result.parameters) == {"token", "profile"} and result.parameters["profile"] == "desk"
    started = state.events[1]
    assert isinstance(started, CallStarted)
    assert started.call_id == result.call_sid and started.stream_id == result.stream_sid
    assert started.custom_parameters == result.parameters
    assert started.media_format == MediaFormat("l16", rate)
    assert started.from_number == "+919876543210"
    assert Dtmf("5") in state.events
    assert state.events[-1] == CallStopped("callended")
    audio = [e for e in state.events if isinstance(e, CallerAudio)]
    # ~100 ms per frame (a key press sends what was gathered at once; a resampler lags)
    assert sum(len(e.audio) == rate // 5 for e in audio) >= len(audio) - 4
    stamps = [e.timestamp_ms for e in audio]
    assert stamps[0] == 0 and stamps == sorted(set(stamps)), str(stamps)
    # the caller heard its own tone back, and every mark came back once it had played
    assert 500 <= loud_ms(result.heard) <= 700
    # every mark came back once it had played, in order (the last may still be queued when
    # the caller hangs up: its audio had not played)
    sent = [m.name for m in result.marks_received]
    echoed = [m.name for m in result.marks_echoed]
    assert len(sent) >= 4 and echoed == sent[: len(echoed)] and len(echoed) >= len(sent) // 2
    assert [e.name for e in state.events if isinstance(e, PlayedUpTo)] == echoed
    assert state.stream is not None and state.stream.frames_missing == 0


async def test_probe_round_trip_through_the_echo() -> None:
    async with serve(App(mode="echo")) as state:
        result = await call(state, [Pause(200), Probe(), Pause(1200), HangUp()])
    assert result.probes_sent == 1 and result.probes_lost == 0
    (rtt,) = result.probe_rtts_ms
    assert 0 < rtt < 2000  # sent in a 100 ms frame, heard in what the app sent back


async def test_jitter_and_lost_frames_keep_the_stream_in_order() -> None:
    async with serve(App(mode="echo")) as state:
        script = [Say(tone(600)), Pause(400), HangUp()]
        result = await call(state, script, jitter_ms=35, seed=7, drop_frames={5, 6, 7})
    assert result.protocol_errors == [] and state.errors == [] and result.frames_dropped == 3
    audio = [e for e in state.events if isinstance(e, CallerAudio)]
    assert [e.sequence for e in audio] == list(range(1, len(audio) + 1))  # chunks in order
    received = sum(len(e.audio) for e in audio) // 2
    assert received == (result.frames_sent) * 160  # every frame sent, none of the dropped
    assert 400 <= loud_ms(result.heard) <= 600  # 60 ms of the tone were lost upstream


async def test_numeric_counters_and_the_key_parameter() -> None:
    async with serve(App(mode="echo")) as state:
        result = await call(
            state, [Say(tone(300)), Pause(300), HangUp()], auth="key", numeric_counters=True
        )
    assert state.answers == [True] and result.protocol_errors == [] and state.errors == []
    assert 200 <= loud_ms(result.heard) <= 400


async def test_wrong_url_secret_is_refused_before_any_stream() -> None:
    async with serve(App()) as state:
        result = await call(state, [HangUp()], url_secret="not-the-flow-secret-xyz")
        no_secret = await call(state, [HangUp()], url_secret=None, auth=None)
    assert state.answers == [False, False] and state.upgrades == []
    assert result.protocol_errors == ["applet URL answered 403"] and result.stream_sid is None
    assert no_secret.protocol_errors == ["applet URL answered 403"]


async def test_a_refused_handshake_is_retried_once() -> None:
    async with serve(App(refuse_upgrades=True)) as state:
        result = await call(state, [HangUp()])
    assert state.answers == [True] and state.upgrades == [False, False]  # Exotel retries once
    assert result.protocol_errors == ["stream handshake refused: 403"] * 2
    assert result.ended_by == "server" and result.stream_sid is None


async def test_clear_drops_queued_audio_and_echoes_the_pending_mark() -> None:
    async with serve(App(mode="clear")) as state:
        result = await call(state, [Pause(1500), HangUp()])
    assert result.protocol_errors == [] and len(result.clears) == 1
    assert loud_ms(result.heard) < 1600  # 2 s were queued; the clear came after ~0.6 s
    assert [m.name for m in result.marks_echoed] == ["tone-end"]
    assert PlayedUpTo("tone-end") in state.events


async def test_clear_without_mark_echo_when_exotel_does_not() -> None:
    async with serve(App(mode="clear")) as state:
        result = await call(state, [Pause(1500), HangUp()], echo_marks_on_clear=False)
    assert len(result.clears) == 1 and result.marks_echoed == []
    assert PlayedUpTo("tone-end") not in state.events


async def test_what_exotel_would_reject_is_recorded_and_the_call_goes_on() -> None:
    async with serve(App(mode="malformed")) as state:
        result = await call(state, [Pause(800), HangUp()])
    errors = result.protocol_errors
    assert any("binary frames" in e for e in errors)
    assert any("not valid JSON" in e for e in errors)
    assert any("unsupported event 'playAudio'" in e for e in errors)
    assert any("does not match" in e for e in errors)
    assert any("1000 bytes is not a multiple of 320" in e for e in errors)
    assert len(errors) == 5
    assert any("under 3.2 kB" in w for w in result.chunk_warnings)
    assert 200 <= loud_ms(result.heard) <= 400  # the good audio after the junk played
    assert [m.name for m in result.marks_echoed] == ["after-junk"]


async def test_the_app_hangs_up_by_closing_the_stream() -> None:
    async with serve(App(mode="echo")) as state:
        result = await call(state, [Say(tone(200)), PressDigit("0"), Pause(2000)])
    assert result.ended_by == "server" and result.close_code == 1000
    assert any(e.kind == "next_applet" for e in result.timeline)
    assert result.protocol_errors == []


def test_sim_refuses_a_bad_setup() -> None:
    with pytest.raises(ValueError, match="multiple of 20"):
        SimulatedExotelCaller("http://127.0.0.1:1", url_secret=SECRET, media_every_ms=30)
    with pytest.raises(ValueError, match="needs the url_secret"):
        SimulatedExotelCaller("http://127.0.0.1:1", auth="basic")


async def test_outbound_connect_voice_ai_through_the_rest_fake() -> None:
    async with (
        serve(App(mode="echo")) as state,
        serve_fake_exotel_rest("acme1", "key1", "tok1") as (rest, base_url),
    ):
        rest.script = [Say(tone(400)), Pause(700), HangUp()]
        client = ExotelClient("acme1", "key1", "tok1", base_url=base_url)
        token = TOKENS.for_outbound("", time.time())  # no Exotel Sid yet
        url = voicebot_stream_url(state.ws_url, {"token": token, "profile": "desk"})
        call = await client.connect_stream("+919876543210", "08047491899", url)
        (result,) = await rest.results()
        details = await client.call_details(call.sid)
        with pytest.raises(ExotelError, match="404"):
            await client.call_details("nope")
        intruder = ExotelClient("acme1", "key1", "wrong", base_url=base_url)
        with pytest.raises(ExotelError, match="401"):
            await intruder.connect_stream("+91", "080", url)
        await client.aclose()
        await intruder.aclose()
        await asyncio.wait_for(state.done.wait(), 5)
    assert result.call_sid == call.sid and details.status == "completed"
    assert result.protocol_errors == [] and state.errors == [] and state.upgrades == [True]
    assert 300 <= loud_ms(result.heard) <= 500
    started = state.events[1]
    assert isinstance(started, CallStarted) and started.call_id == call.sid
    assert started.custom_parameters == {"token": token, "profile": "desk"}
    assert started.to_number == "+919876543210" and started.from_number == "08047491899"
    assert len(rest.calls) == 1  # the refused request placed no call
