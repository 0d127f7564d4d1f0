"""The simulated Twilio edge against a tiny in-test bridge (FastAPI + uvicorn on loopback).

The bridge checks both signatures, reads frames with the real `TwilioStream`, and behaves
per test (`mode`): echo the caller, play a clip, clear mid-clip, act like an agent that
stops when interrupted, or send frames Twilio would reject.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import orjson
import pytest
import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from starlette.websockets import WebSocketDisconnect

from livecall.audio.g711 import ulaw_decode, ulaw_encode
from livecall.sim.twilio import (
    CallResult,
    HangUp,
    Pause,
    PressDigit,
    Probe,
    Say,
    SimulatedCaller,
    WaitForAgentAudio,
    WaitForAgentSilence,
)
from livecall.telephony.twilio import (
    Dtmf,
    Media,
    ProtocolError,
    Start,
    Stop,
    StreamState,
    TwilioSignature,
    TwilioStream,
    busy_twiml,
    clear_message,
    connect_stream_twiml,
    encode_payload,
    hangup_twiml,
    mark_message,
    media_message,
)

TOKEN = "test-auth-token-0123456789abcdef"
PARAMS = {"profile": "front-desk", "lang": "en-US"}


def tone(ms: int, hz: float = 440.0, amp: int = 8000, rate: int = 8000) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def tone_ulaw(ms: int, hz: float = 440.0) -> bytes:
    return ulaw_encode(tone(ms, hz)).tobytes()


def loud_frames(ulaw: bytes) -> int:
    """Frames (20 ms) in a μ-law timeline whose peak is clearly audible."""
    pcm = ulaw_decode(ulaw)
    usable = pcm[: pcm.size // 160 * 160].reshape(-1, 160)
    return int((np.abs(usable.astype(np.int32)).max(axis=1) > 1000).sum())


@dataclass
class Bridge:
    """What the in-test app does and what it saw."""

    mode: str = "echo"
    answer: str = "stream"  # stream | busy-say | busy-reject | query-url
    action: bool = False
    ws_url: str = ""
    base_url: str = ""
    webhook_sig_ok: list[bool] = field(default_factory=list)
    ws_sig_ok: list[bool] = field(default_factory=list)
    action_posts: int = 0
    frames: list[tuple[float, str]] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stream: TwilioStream | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def form_of(request: Request) -> dict[str, str]:
    return dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))


def make_app(bridge: Bridge) -> FastAPI:
    app = FastAPI()
    signer = TwilioSignature(TOKEN)

    @app.post("/twiml")
    async def twiml(request: Request) -> Response:
        form = await form_of(request)
        ok = signer.validate_webhook(
            str(request.url), form, request.headers.get("x-twilio-signature")
        )
        bridge.webhook_sig_ok.append(ok)
        if not ok:
            return Response("bad signature", status_code=403)
        if bridge.answer == "busy-say":
            body = busy_twiml("All lines are busy.")
        elif bridge.answer == "busy-reject":
            body = busy_twiml(None, reject=True)
        elif bridge.answer == "query-url":
            body = (
                '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
                f'<Stream url="{bridge.ws_url}?token=secret"/></Connect></Response>'
            )
        else:
            params = {**PARAMS, "from": form["From"]}
            body = connect_stream_twiml(
                bridge.ws_url, params, action_url="/after" if bridge.action else None
            )
        return Response(body, media_type="application/xml")

    @app.post("/after")
    async def after(request: Request) -> Response:
        form = await form_of(request)
        if signer.validate_webhook(
            str(request.url), form, request.headers.get("x-twilio-signature")
        ):
            bridge.action_posts += 1
        return Response(hangup_twiml("Goodbye."), media_type="application/xml")

    @app.websocket("/ws/twilio")
    async def media_stream(ws: WebSocket) -> None:
        ok = signer.validate_websocket(bridge.ws_url, ws.headers.get("x-twilio-signature"))
        bridge.ws_sig_ok.append(ok)
        if not ok:
            await ws.close(code=1008)
            return
        await ws.accept()
        try:
            await serve_stream(bridge, ws)
        except WebSocketDisconnect:
            pass
        finally:
            bridge.done.set()

    return app


async def serve_stream(bridge: Bridge, ws: WebSocket) -> None:
    loop = asyncio.get_running_loop()
    stream = bridge.stream = TwilioStream()
    sid = ""
    media_seen = 0
    agent_until = 0.0  # agent mode: when the audio we queued will have played out
    caller_loud_at: float | None = None
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        text = msg.get("text")
        data = text if text is not None else msg.get("bytes", b"")
        now = loop.time()
        bridge.frames.append((now, data if isinstance(data, str) else repr(data)))
        try:
            event = stream.receive(data, binary=text is None)
        except ProtocolError as exc:
            bridge.errors.append(str(exc))
            continue
        bridge.events.append(event)
        if isinstance(event, Start):
            sid = event.stream_sid
            await on_start(bridge, ws, sid)
            if bridge.mode == "agent":
                agent_until = now + 1.0
        elif isinstance(event, Media):
            media_seen += 1
            if bridge.mode == "echo":
                await ws.send_text(media_message(sid, event.payload))
                await ws.send_text(mark_message(sid, f"m{event.chunk}"))
            elif bridge.mode == "clear" and media_seen == 25:
                await ws.send_text(clear_message(sid))
            elif bridge.mode == "agent":
                peak = int(np.abs(ulaw_decode(bytes(event_audio(event))).astype(np.int32)).max())
                if peak > 1000:
                    if now < agent_until:  # barge-in: stop talking at once
                        await ws.send_text(clear_message(sid))
                        agent_until = now
                    caller_loud_at = now
                elif caller_loud_at is not None and now - caller_loud_at > 0.2:
                    caller_loud_at = None  # caller finished: answer
                    await ws.send_text(media_message(sid, encode_payload(tone_ulaw(400, 660))))
                    agent_until = now + 0.4
        elif isinstance(event, Dtmf) and event.digit == "0":
            await ws.close(code=1000)
            return
        elif isinstance(event, Stop):
            return


def event_audio(event: Media) -> bytes:
    import base64

    return base64.b64decode(event.payload)


async def on_start(bridge: Bridge, ws: WebSocket, sid: str) -> None:
    if bridge.mode in ("playback", "clear", "agent"):
        ms = {"playback": 1000, "clear": 2000, "agent": 1000}[bridge.mode]
        clip = tone_ulaw(ms)
        for i in range(0, len(clip), 160):  # many small chunks, as a bridge would send
            await ws.send_text(media_message(sid, encode_payload(clip[i : i + 160])))
        await ws.send_text(mark_message(sid, "end"))
    elif bridge.mode == "malformed":
        good = encode_payload(tone_ulaw(20))
        await ws.send_bytes(b"\xff" * 160)
        await ws.send_text("{not json")
        await ws.send_text(orjson.dumps({"event": "play", "streamSid": sid}).decode())
        await ws.send_text(media_message("MZ" + "0" * 32, good))
        await ws.send_text(media_message(sid, "@@not-base64@@"))
        await ws.send_text(
            orjson.dumps(
                {"event": "media", "streamSid": sid, "media": {"payload": good, "track": "x"}}
            ).decode()
        )
        await ws.send_text(orjson.dumps({"event": "mark", "streamSid": sid}).decode())
        await ws.send_text(media_message(sid, good))  # this one is fine and must play


@contextlib.asynccontextmanager
async def serve(bridge: Bridge) -> AsyncIterator[Bridge]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    bridge.base_url = f"http://127.0.0.1:{port}"
    bridge.ws_url = f"ws://127.0.0.1:{port}/ws/twilio"
    config = uvicorn.Config(
        make_app(bridge), log_level="warning", ws="websockets-sansio", lifespan="off"
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    # The socket already listens, so early connections wait in the backlog: no start-up poll.
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield bridge
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 5)


async def call(bridge: Bridge, script: list[Any], **kwargs: Any) -> CallResult:
    kwargs.setdefault("auth_token", TOKEN)
    kwargs.setdefault("timeout", 15)
    caller = SimulatedCaller(base_url=bridge.base_url, script=script, **kwargs)
    result = await caller.run()
    if bridge.ws_sig_ok:
        await asyncio.wait_for(bridge.done.wait(), 5)
    return result


def parsed(bridge: Bridge) -> list[dict[str, Any]]:
    return [orjson.loads(text) for _, text in bridge.frames if text.startswith("{")]


# --------------------------------------------------------------------------- tests


async def test_call_paces_numbers_and_hangs_up_like_twilio() -> None:
    async with serve(Bridge(mode="echo")) as bridge:
        script = [
            Say(tone(400), label="hello"),
            Pause(300),
            PressDigit("5"),
            Pause(200),
            HangUp(),
        ]
        result = await call(bridge, script)

    assert bridge.webhook_sig_ok == [True] and bridge.ws_sig_ok == [True]
    assert result.protocol_errors == [] and result.script_errors == []
    assert result.ended_by == "caller" and result.close_code == 1000
    assert result.parameters == {**PARAMS, "from": "+15550001111"}

    msgs = parsed(bridge)
    assert [m["event"] for m in msgs[:2]] == ["connected", "start"]
    assert msgs[-1]["event"] == "stop"
    assert msgs[-1]["stop"] == {"accountSid": result.account_sid, "callSid": result.call_sid}
    start = bridge.events[1]
    assert isinstance(start, Start)
    assert start.custom_parameters == result.parameters
    assert (start.encoding, start.sample_rate, start.channels) == ("audio/x-mulaw", 8000, 1)
    assert start.tracks == ("inbound",) and start.call_sid == result.call_sid

    # every counter is a string and moves by exactly one (sequenceNumber from start on)
    seqs = [m["sequenceNumber"] for m in msgs[1:]]
    assert all(isinstance(s, str) for s in seqs)
    assert [int(s) for s in seqs] == list(range(1, len(seqs) + 1))
    media = [m["media"] for m in msgs if m["event"] == "media"]
    assert [int(m["chunk"]) for m in media] == list(range(1, len(media) + 1))
    assert [int(m["timestamp"]) for m in media] == [20 * i for i in range(len(media))]
    assert all(isinstance(m["chunk"], str) and isinstance(m["timestamp"], str) for m in media)

    # 400 ms + 300 ms + 200 ms = 45 frames, paced at 20 ms on the server's clock
    assert result.frames_sent == len(media) == 45
    times = [
        t
        for (t, text), m in zip(bridge.frames, parsed(bridge), strict=True)
        if m["event"] == "media"
    ]
    span = times[-1] - times[0]
    assert 0.80 <= span <= 0.98, span
    assert bridge.stream is not None and bridge.stream.state is StreamState.STOPPED
    assert bridge.stream.frames_missing == 0 and bridge.errors == []

    dtmf = [e for e in bridge.events if isinstance(e, Dtmf)]
    assert [(d.digit, d.track) for d in dtmf] == [("5", "inbound_track")]
    assert [d.name for d in result.digits_sent] == ["5"]

    # the echoed clip was heard, and marks came back in order, only for audio played
    assert loud_frames(result.heard) >= 15
    echoed = [m.name for m in result.marks_echoed]
    received = [m.name for m in result.marks_received]
    assert echoed == received[: len(echoed)] and len(echoed) >= 40
    assert len(result.utterances) == 1 and result.utterances[0].end is not None


async def test_marks_come_back_only_after_their_audio_played() -> None:
    async with serve(Bridge(mode="playback")) as bridge:
        result = await call(bridge, [Pause(1300), HangUp()])

    assert result.received_media_bytes == 8000
    (got,) = result.marks_received
    (echoed,) = result.marks_echoed
    assert got.name == echoed.name == "end"
    assert 0.97 <= echoed.t - got.t <= 1.10, echoed.t - got.t
    assert 48 <= loud_frames(result.heard) <= 51
    back = [m for m in parsed(bridge) if m["event"] == "mark"]
    assert back == [
        {
            "event": "mark",
            "sequenceNumber": back[0]["sequenceNumber"],
            "streamSid": result.stream_sid,
            "mark": {"name": "end"},
        }
    ]


async def test_clear_drops_queued_audio_and_echoes_pending_marks_at_once() -> None:
    async with serve(Bridge(mode="clear")) as bridge:
        result = await call(bridge, [Pause(900), HangUp()])

    (cleared_at,) = result.clears
    assert [m.name for m in result.marks_echoed] == ["end"]
    assert result.marks_echoed[0].t - cleared_at < 0.005
    # about 0.5 s of the 2 s clip played before the clear, then silence
    assert 20 <= loud_frames(result.heard) <= 30, loud_frames(result.heard)
    assert result.protocol_errors == []


async def test_barge_in_stop_and_response_latency_are_measured() -> None:
    async with serve(Bridge(mode="agent")) as bridge:
        script = [
            WaitForAgentAudio(min_heard_ms=200, timeout=5),
            Say(tone(400, 300), label="interrupt"),
            WaitForAgentSilence(silence_ms=300, timeout=5),
            HangUp(),
        ]
        result = await call(bridge, script)

    assert result.script_errors == [] and result.protocol_errors == []
    (utt,) = result.utterances
    assert utt.barged_in
    assert utt.barge_in_stop_ms is not None and utt.barge_in_stop_ms <= 100, utt.barge_in_stop_ms
    assert result.barge_in_stop_ms == [utt.barge_in_stop_ms]
    # the bridge answers 200 ms after the caller goes quiet (plus a frame or two)
    (latency,) = result.response_latencies_ms
    assert 190 <= latency <= 320, latency
    assert len(result.clears) == 1
    assert len(result.agent_stretches) >= 2


async def test_probes_measure_echo_round_trips_in_order() -> None:
    async with serve(Bridge(mode="echo")) as bridge:
        script = [Pause(100)]
        for _ in range(4):
            script += [Probe(), Pause(140)]
        result = await call(bridge, [*script, Pause(100), HangUp()])

    assert result.probes_sent == 4 and result.probes_lost == 0
    assert len(result.probe_rtts_ms) == 4
    assert all(0 < rtt < 60 for rtt in result.probe_rtts_ms), result.probe_rtts_ms


async def test_frames_twilio_would_reject_are_recorded_not_fatal() -> None:
    async with serve(Bridge(mode="malformed")) as bridge:
        result = await call(bridge, [Pause(300), HangUp()])

    errors = result.protocol_errors
    assert len(errors) == 7, errors
    assert errors[0].startswith("31950")
    assert all(e.startswith("31951") for e in errors[1:])
    for fragment in (
        "not valid JSON",
        "unsupported event",
        "does not match",
        "not valid base64",
        "unexpected fields",
        "mark.name",
    ):
        assert any(fragment in e for e in errors), fragment
    assert result.received_media_bytes == 160  # the one good frame still played
    assert result.ended_by == "caller" and bridge.events[-1].__class__ is Stop


async def test_drops_and_jitter_keep_numbering_honest() -> None:
    async with serve(Bridge(mode="echo")) as bridge:
        result = await call(
            bridge, [Pause(600), HangUp()], drop_frames={5, 6, 20}, jitter_ms=35, seed=7
        )

    assert result.frames_dropped == 3 and result.frames_sent == 27
    assert bridge.stream is not None and bridge.stream.frames_missing == 3
    media = [m for m in parsed(bridge) if m["event"] == "media"]
    chunks = [int(m["media"]["chunk"]) for m in media]
    assert chunks == [c for c in range(1, 31) if c not in {5, 6, 20}]
    seqs = [int(m["sequenceNumber"]) for m in parsed(bridge)[1:]]
    assert seqs == list(range(1, len(seqs) + 1))
    assert bridge.errors == []


@pytest.mark.parametrize(
    ("answer", "rejected", "said"),
    [
        ("busy-say", False, ["All lines are busy."]),
        ("busy-reject", True, []),
    ],
)
async def test_busy_answers_end_the_call(answer: str, rejected: bool, said: list[str]) -> None:
    async with serve(Bridge(answer=answer)) as bridge:
        result = await call(bridge, [Pause(100)])

    assert result.rejected is rejected and result.said == said
    assert result.reject_reason == ("busy" if rejected else None)
    assert result.stream_url is None and result.stream_sid is None
    assert result.ended_by == "server" and bridge.ws_sig_ok == []
    assert result.frames_sent == 0


async def test_bad_or_missing_signature_is_refused_by_the_bridge() -> None:
    async with serve(Bridge()) as bridge:
        wrong = await call(bridge, [Pause(100)], auth_token="not-the-token")
        unsigned = await call(bridge, [Pause(100)], sign=False)

    assert bridge.webhook_sig_ok == [False, False]
    for result in (wrong, unsigned):
        assert result.webhook_status == 403
        assert result.protocol_errors == ["11200 HTTP retrieval failure: status 403"]
        assert result.ended_by == "server"


async def test_query_string_in_stream_url_is_refused() -> None:
    async with serve(Bridge(answer="query-url")) as bridge:
        result = await call(bridge, [Pause(100)])

    assert result.protocol_errors[0].startswith("31920")
    assert bridge.ws_sig_ok == [] and result.frames_sent == 0


async def test_server_closing_ends_the_call_and_twilio_follows_the_action() -> None:
    async with serve(Bridge(mode="echo", action=True)) as bridge:
        result = await call(bridge, [Pause(100), PressDigit("0"), Pause(2000)])

    assert result.ended_by == "server" and result.close_code == 1000
    assert result.duration_s < 1.5
    assert bridge.action_posts == 1
    assert result.action_twiml is not None and "<Hangup" in result.action_twiml


async def test_hang_up_without_stop_just_closes() -> None:
    async with serve(Bridge(mode="echo")) as bridge:
        result = await call(bridge, [Pause(100), HangUp(send_stop=False)])

    assert result.ended_by == "caller"
    assert not any(isinstance(e, Stop) for e in bridge.events)
    assert bridge.stream is not None and bridge.stream.state is StreamState.STREAMING
