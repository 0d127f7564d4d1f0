"""The fake Gemini Live server, driven by the real google-genai SDK over wss://.

If these pass, livecall's Gemini adapter can be tested against the fake with confidence that
what it sees is what the real service sends (docs/protocols.md section 2).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import numpy as np
import pytest
import soxr
from google import genai
from google.genai import errors, types
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from livecall.audio.g711 import ulaw_decode, ulaw_encode
from livecall.sim.clips import AGENT_CLIPS, CALLER_CLIPS, clip_duration, load_clip
from livecall.sim.gemini import (
    INAUDIBLE,
    ClipRecognizer,
    CloseFault,
    FakeGeminiServer,
    GoAwayFault,
    Scenario,
    SlowFault,
    StallFault,
    ToolCallFault,
    TurnEndFault,
)
from livecall.sim.tls import TestCA

MODEL = "gemini-3.8-live"
FRAME = 640  # 20 ms of 16 kHz PCM16
FAST = {"rate": None, "first_audio_delay": 0.0, "seed": 7}

CA = TestCA()


def phone_pcm16k(name: str) -> bytes:
    """A caller clip as the bridge delivers it: 8 kHz -> μ-law -> back -> 16 kHz PCM16LE."""
    samples, rate = load_clip(name)
    line = ulaw_decode(ulaw_encode(samples))
    return soxr.resample(line, rate, 16000).astype("<i2").tobytes()


def agent_bytes(name: str) -> int:
    samples, _ = load_clip(name)
    return len(samples) * 2


def utterance(name: str, lead_ms: int = 200, trail_ms: int = 400) -> bytes:
    return bytes(32 * lead_ms) + phone_pcm16k(name) + bytes(32 * trail_ms)


def client(server: FakeGeminiServer, *, api_version: str = "v1", key: str = "test-key"):
    return genai.Client(
        api_key=key,
        http_options=types.HttpOptions(
            base_url=server.base_url,
            api_version=api_version,
            async_client_args={"ssl": server.client_ssl_context()},
        ),
    )


def live_config(silence_ms: int = 200, **extra) -> types.LiveConnectConfig:
    return types.LiveConnectConfig(
        response_modalities=["AUDIO"],
        input_audio_transcription={},
        output_audio_transcription={},
        session_resumption=extra.pop("session_resumption", types.SessionResumptionConfig()),
        realtime_input_config=types.RealtimeInputConfig(
            automatic_activity_detection=types.AutomaticActivityDetection(
                silence_duration_ms=silence_ms, prefix_padding_ms=20
            )
        ),
        **extra,
    )


async def send_pcm(session, pcm: bytes) -> None:
    for i in range(0, len(pcm), FRAME):
        await session.send_realtime_input(
            audio=types.Blob(data=pcm[i : i + FRAME], mime_type="audio/pcm;rate=16000")
        )


async def one_turn(session, limit: float = 10.0) -> list[types.LiveServerMessage]:
    """Messages up to and including the next turnComplete."""
    out = []
    async with asyncio.timeout(limit):
        async for msg in session.receive():
            out.append(msg)
    return out


def audio_of(msgs) -> bytes:
    return b"".join(
        p.inline_data.data
        for m in msgs
        if m.server_content and m.server_content.model_turn
        for p in m.server_content.model_turn.parts or []
        if p.inline_data
    )


def text_of(msgs, field: str) -> str:
    return "".join(
        getattr(m.server_content, field).text
        for m in msgs
        if m.server_content and getattr(m.server_content, field)
    )


@pytest.fixture
async def server_factory() -> AsyncIterator:
    servers: list[FakeGeminiServer] = []

    async def make(**kwargs) -> FakeGeminiServer:
        kwargs.setdefault("scenario", Scenario(**FAST))
        server = await FakeGeminiServer(ca=CA, **kwargs).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        await s.stop()


# ---- fake ASR ---------------------------------------------------------------------------------


def test_recognizer_survives_the_phone_path() -> None:
    rec = ClipRecognizer()
    rng = np.random.default_rng(3)
    for name in CALLER_CLIPS:
        pcm = np.frombuffer(utterance(name, 300, 600), "<i2").astype(np.float64)
        noisy = np.clip(pcm * 0.5 + rng.normal(0, 60, len(pcm)), -32768, 32767).astype(np.int16)
        assert rec.recognize(noisy)[0] == name
        assert rec.recognize(noisy[1600:])[0] == name  # VAD clipped the first 100 ms
    noise = rng.normal(0, 3000, 48000).astype(np.int16)
    assert rec.recognize(noise)[0] is None
    agent, rate = load_clip("sorry")
    assert rec.recognize(soxr.resample(agent, rate, 16000))[0] is None


def test_clip_library() -> None:
    assert {"book", "time", "hours", "yes"} <= CALLER_CLIPS.keys()
    assert {"greeting", "book_reply", "time_reply", "goodbye", "sorry", "apology"} <= set(
        AGENT_CLIPS
    )
    assert all(c.rate == 8000 for c in CALLER_CLIPS.values())
    assert all(c.rate == 24000 for c in AGENT_CLIPS.values())
    assert clip_duration("book_reply") > 6.0
    total = sum(c.path.stat().st_size for c in [*CALLER_CLIPS.values(), *AGENT_CLIPS.values()])
    assert total < 2_000_000


# ---- a whole conversation turn ----------------------------------------------------------------


async def test_whole_turn(server_factory) -> None:
    server = await server_factory()
    async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
        first = await anext(session.receive())
        assert first.session_resumption_update.resumable
        handle0 = first.session_resumption_update.new_handle
        await send_pcm(session, utterance("book"))
        msgs = await one_turn(session)
        after = await anext(session.receive())

    sc = [m.server_content for m in msgs if m.server_content]
    assert text_of(msgs, "input_transcription") == CALLER_CLIPS["book"].text
    assert len(audio_of(msgs)) == agent_bytes("book_reply")
    assert text_of(msgs, "output_transcription") == AGENT_CLIPS["book_reply"].text
    assert any(m.model_turn.parts[0].inline_data.mime_type == "audio/pcm;rate=24000"
               for m in sc if m.model_turn)  # fmt: skip
    gen = next(i for i, c in enumerate(sc) if c.generation_complete)
    done = next(i for i, c in enumerate(sc) if c.turn_complete)
    assert gen < done == len(sc) - 1
    usage = msgs[-1].usage_metadata
    assert usage.total_token_count == usage.prompt_token_count + usage.response_token_count > 0
    # a non-resumable update while speaking, then a fresh handle once the turn is over
    assert any(m.session_resumption_update and not m.session_resumption_update.resumable
               for m in msgs)  # fmt: skip
    assert after.session_resumption_update.resumable
    assert after.session_resumption_update.new_handle not in ("", handle0)

    rec = server.sessions[0]
    await server.wait_for(lambda: rec.closed)
    assert rec.has_api_key and rec.auth == "x-goog-api-key" and rec.api_version == "v1"
    assert rec.model == MODEL and rec.setup["model"] == f"models/{MODEL}"
    assert rec.turns[0].caller_clip == "book" and rec.turns[0].completed
    assert rec.turns[0].audio_bytes_sent == agent_bytes("book_reply")
    assert rec.received_audio == utterance("book")
    kinds = rec.kinds()
    assert kinds.index("speech_start") < kinds.index("speech_end") < kinds.index("turn_start")
    assert "test-key" not in repr(rec)


@pytest.mark.parametrize("version", ["v1beta", "v1alpha"])
async def test_api_versions_and_greeting(server_factory, version: str) -> None:
    server = await server_factory()
    cli = client(server, api_version=version)
    async with cli.aio.live.connect(model=f"models/{MODEL}", config=live_config()) as session:
        await session.send_client_content(
            turns=types.Content(role="user", parts=[types.Part(text="Greet the caller.")]),
            turn_complete=True,
        )
        msgs = await one_turn(session)
    assert len(audio_of(msgs)) == agent_bytes("greeting")
    assert text_of(msgs, "output_transcription") == AGENT_CLIPS["greeting"].text
    assert server.sessions[0].api_version == version


async def test_bursty_paced_output(server_factory) -> None:
    """Default pacing: variable chunks, faster than real time on average, never all at once."""
    sc = Scenario(rate=4.0, first_audio_delay=0.05, seed=1, transcript_with_audio=True)
    server = await server_factory(scenario=sc)
    async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
        await session.send_realtime_input(text="hello")
        loop = asyncio.get_running_loop()
        start, stamps, sizes = loop.time(), [], []
        msgs = []
        async for msg in session.receive():
            msgs.append(msg)
            if data := audio_of([msg]):
                stamps.append(loop.time() - start)
                sizes.append(len(data))
    assert sum(sizes) == agent_bytes("greeting")
    assert min(sizes) < 48 * 40 and max(sizes) > 48 * 80  # 10-120 ms chunks
    duration = clip_duration("greeting")
    assert duration / 4 * 0.6 < stamps[-1] < duration / 2
    # with transcript_with_audio the text rides in audio messages
    assert any(m.server_content.output_transcription and m.server_content.model_turn
               for m in msgs if m.server_content)  # fmt: skip


# ---- setup failures ---------------------------------------------------------------------------


async def test_unknown_model_is_1008(server_factory) -> None:
    server = await server_factory()
    with pytest.raises(errors.APIError) as err:
        async with client(server).aio.live.connect(model="gemini-0.1-nope", config=live_config()):
            pass
    assert err.value.code == 1008
    assert server.sessions[0].close_code == 1008


async def test_native_audio_model_refuses_text(server_factory) -> None:
    server = await server_factory()
    cfg = types.LiveConnectConfig(response_modalities=["TEXT"])
    with pytest.raises(errors.APIError) as err:
        async with client(server).aio.live.connect(model=MODEL, config=cfg):
            pass
    assert err.value.code == 1007
    async with client(server).aio.live.connect(model="sim-text", config=cfg) as session:
        await session.send_realtime_input(text="hi")
        msgs = await one_turn(session)
    assert "".join(m.text or "" for m in msgs) == AGENT_CLIPS["greeting"].text


async def test_wrong_or_missing_key_is_1007(server_factory) -> None:
    server = await server_factory(api_key="right-key")
    with pytest.raises(errors.APIError) as err:
        async with client(server, key="wrong-key").aio.live.connect(model=MODEL):
            pass
    assert err.value.code == 1007 and "API key not valid" in str(err.value)
    async with ws_connect(server.ws_url, ssl=server.client_ssl_context()) as ws:
        await ws.send(json.dumps({"setup": {"model": f"models/{MODEL}"}}))
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1007
    assert [s.setup_completed for s in server.sessions] == [False, False]
    assert server.sessions[1].has_api_key is False


async def test_unknown_path_is_404(server_factory) -> None:
    server = await server_factory()
    url = server.ws_url.replace("GenerativeService.", "OtherService.")
    with pytest.raises(InvalidStatus) as err:
        async with ws_connect(url, ssl=server.client_ssl_context()):
            pass
    assert err.value.response.status_code == 404


# ---- tolerance and strictness of the wire format ----------------------------------------------


async def test_raw_client_camelcase_urlsafe_unpadded(server_factory) -> None:
    server = await server_factory()
    headers = {"x-goog-api-key": "k"}
    async with ws_connect(
        server.ws_url, ssl=server.client_ssl_context(), additional_headers=headers
    ) as ws:
        await ws.send(json.dumps({"setup": {
            "model": f"models/{MODEL}",
            "generationConfig": {"responseModalities": ["AUDIO"]},
            "inputAudioTranscription": {},
            "realtimeInputConfig": {"automaticActivityDetection": {"silenceDurationMs": 200}},
        }}))  # fmt: skip
        first = await ws.recv()
        assert isinstance(first, bytes) and json.loads(first) == {"setupComplete": {}}
        pcm = utterance("hours")
        for i in range(0, len(pcm), 960):
            b64 = base64.urlsafe_b64encode(pcm[i : i + 960]).rstrip(b"=").decode()
            await ws.send(json.dumps(
                {"realtimeInput": {"audio": {"data": b64, "mimeType": "audio/pcm;rate=16000"}}}
            ))  # fmt: skip
        got, audio = [], 0
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            got.append(msg)
            for part in msg.get("serverContent", {}).get("modelTurn", {}).get("parts", []):
                audio += len(base64.b64decode(part["inlineData"]["data"]))
            if msg.get("serverContent", {}).get("turnComplete"):
                break
    texts = [m["serverContent"]["inputTranscription"]["text"] for m in got
             if "inputTranscription" in m.get("serverContent", {})]  # fmt: skip
    assert "".join(texts) == CALLER_CLIPS["hours"].text
    assert audio == agent_bytes("hours_reply")
    assert server.sessions[0].received_audio == pcm


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ({"realtimeInput": {}, "bogusField": 1}, "bogusField"),
        ({"realtime_input": {"audio": {"data": "AAAA", "mime_type": "audio/pcm"}}}, "even"),
        ({"realtime_input": {"audio": {"data": "AAAA", "mimeType": "audio/x-mulaw"}}}, "MIME"),
        ({"realtime_input": {"audio": {"data": "!!", "mime_type": "audio/pcm"}}}, "base64"),
        ({"realtime_input": {"activityStart": {}}}, "activity"),
        ({"setup": {"model": f"models/{MODEL}"}}, "setup"),
        ("{not json", "Invalid JSON"),
    ],
)
async def test_invalid_frames_close_1007(server_factory, frame, reason: str) -> None:
    server = await server_factory()
    async with ws_connect(
        server.ws_url, ssl=server.client_ssl_context(), additional_headers={"x-goog-api-key": "k"}
    ) as ws:
        await ws.send(json.dumps({"setup": {"model": f"models/{MODEL}"}}))
        assert json.loads(await ws.recv()) == {"setupComplete": {}}
        await ws.send(frame if isinstance(frame, str) else json.dumps(frame))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1007 and reason in ws.close_reason


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ({"model": MODEL, "voice": "Kore"}, 1007),
        ({"model": MODEL, "generationConfig": {"voiceName": "Kore"}}, 1007),
        ({"model": MODEL, "generation_config": {"response_modalities": ["AUDIO", "TEXT"]}}, 1007),
        ({"generationConfig": {}}, 1007),
        ({"model": "models/gemini-1.0-pro"}, 1008),
        ({"model": MODEL, "session_resumption": {"handle": "forged"}}, 1008),
        ({"model": MODEL, "generation_config": {"response_modalities": [3]},
          "realtime_input_config": {"automatic_activity_detection": {
              "silence_duration_ms": "300", "start_of_speech_sensitivity": "START_SENSITIVITY_LOW"},
              "activity_handling": "NO_INTERRUPTION"}}, None),
    ],
)  # fmt: skip
async def test_setup_validation(server_factory, setup: dict, code: int | None) -> None:
    server = await server_factory()
    async with ws_connect(
        server.ws_url, ssl=server.client_ssl_context(), additional_headers={"x-goog-api-key": "k"}
    ) as ws:
        await ws.send(json.dumps({"setup": setup}))
        if code is None:
            assert json.loads(await ws.recv()) == {"setupComplete": {}}
            return
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == code


async def test_first_frame_must_be_setup_and_text_frames_option(server_factory) -> None:
    server = await server_factory(scenario=Scenario(binary_frames=False, **FAST))
    ssl = server.client_ssl_context()
    hdr = {"x-goog-api-key": "k"}
    async with ws_connect(server.ws_url, ssl=ssl, additional_headers=hdr) as ws:
        await ws.send(json.dumps({"realtime_input": {"text": "hi"}}))
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1007
    async with ws_connect(server.ws_url, ssl=ssl, additional_headers=hdr) as ws:
        await ws.send(json.dumps({"setup": {"model": "sim-anything"}}))
        assert isinstance(await ws.recv(), str)


# ---- barge-in -----------------------------------------------------------------------------------


async def test_interruption(server_factory) -> None:
    scenario = Scenario(slow=[SlowFault(rate=1.0, reply=1)], **FAST)  # real time, reply 1 only
    server = await server_factory(scenario=scenario)
    async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
        await send_pcm(session, utterance("book"))
        msgs = []
        async for msg in session.receive():
            msgs.append(msg)
            if audio_of([msg]):
                break  # the agent is talking: the caller talks over it
        await send_pcm(session, utterance("yes", lead_ms=0))
        async for msg in session.receive():
            msgs.append(msg)
        reply = await one_turn(session)

    sc = [m.server_content for m in msgs if m.server_content]
    flags = [("i" if c.interrupted else "") + ("t" if c.turn_complete else "") for c in sc]
    assert flags.index("i") == flags.index("t") - 1 == len(flags) - 2
    assert not any(c.generation_complete for c in sc)
    assert 0 < len(audio_of(msgs)) < agent_bytes("book_reply") // 2
    assert len(audio_of(reply)) == agent_bytes("goodbye")
    assert text_of(reply, "input_transcription") == CALLER_CLIPS["yes"].text
    rec = server.sessions[0]
    assert rec.turns[0].interrupted and not rec.turns[0].completed
    assert rec.turns[1].completed and rec.turns[1].caller_turn == 2


async def test_manual_activity_signals(server_factory) -> None:
    server = await server_factory()
    cfg = types.LiveConnectConfig(
        response_modalities=["AUDIO"],
        realtime_input_config=types.RealtimeInputConfig(
            automatic_activity_detection=types.AutomaticActivityDetection(disabled=True)
        ),
    )
    async with client(server).aio.live.connect(model=MODEL, config=cfg) as session:
        await session.send_realtime_input(activity_start=types.ActivityStart())
        await send_pcm(session, phone_pcm16k("time"))
        await session.send_realtime_input(activity_end=types.ActivityEnd())
        msgs = await one_turn(session)
    assert len(audio_of(msgs)) == agent_bytes("time_reply")
    assert server.sessions[0].turns[0].trigger == "activity"


# ---- echo ----------------------------------------------------------------------------------------


async def test_echo_mode_returns_audio_promptly(server_factory) -> None:
    server = await server_factory(scenario=Scenario(mode="echo"), keep_audio=False)
    async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
        receiver = session.receive()
        await anext(receiver)  # the resumption handle
        loop = asyncio.get_running_loop()
        tone = (np.sin(np.arange(320) * 0.3) * 8000).astype("<i2").tobytes()
        delays = []
        for _ in range(5):
            t0 = loop.time()
            await session.send_realtime_input(
                audio=types.Blob(data=tone, mime_type="audio/pcm;rate=16000")
            )
            msg = await asyncio.wait_for(anext(receiver), 2)
            delays.append(loop.time() - t0)
            assert len(audio_of([msg])) == 960  # 20 ms at 24 kHz
    assert sorted(delays)[2] < 0.1
    assert server.sessions[0].received_audio == bytearray()
    assert server.sessions[0].audio_chunks_received == 5


# ---- tools ---------------------------------------------------------------------------------------


async def test_tool_call_round_trip(server_factory) -> None:
    fault = ToolCallFault(
        after_caller_turn=1, name="check_availability", args={"party": 4},
        say_first="one_moment", reply="time_reply",
    )  # fmt: skip
    server = await server_factory(scenario=Scenario(tool_calls=[fault], **FAST))
    async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
        await send_pcm(session, utterance("book"))
        msgs = []
        async for msg in session.receive():
            msgs.append(msg)
            if msg.tool_call:
                call = msg.tool_call.function_calls[0]
                assert (call.name, call.args) == ("check_availability", {"party": 4})
                await session.send_tool_response(
                    function_responses=[types.FunctionResponse(
                        id=call.id, name=call.name, response={"available": True}
                    )]
                )  # fmt: skip
    assert len(audio_of(msgs)) == agent_bytes("one_moment") + agent_bytes("time_reply")
    rec = server.sessions[0]
    (resp,) = rec.tool_responses
    assert resp.id == call.id and resp.response == {"available": True}
    assert resp.latency is not None and 0 <= resp.latency < 2


async def test_tool_call_cancelled_by_barge_in(server_factory) -> None:
    scenario = Scenario(tool_calls=[ToolCallFault(after_caller_turn=1)], **FAST)
    server = await server_factory(scenario=scenario)
    async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
        await send_pcm(session, utterance("book"))
        async for msg in session.receive():
            if msg.tool_call:
                call_id = msg.tool_call.function_calls[0].id
                break
        await send_pcm(session, utterance("yes", lead_ms=0))
        msgs = await one_turn(session)
    cancel = next(m.tool_call_cancellation for m in msgs if m.tool_call_cancellation)
    assert cancel.ids == [call_id]
    assert server.sessions[0].tool_cancellations == [call_id]


# ---- connection lifecycle faults ----------------------------------------------------------------


async def test_go_away_then_close(server_factory) -> None:
    scenario = Scenario(go_aways=[GoAwayFault(after=0.1, time_left=0.2)], **FAST)
    server = await server_factory(scenario=scenario)
    got = []
    with pytest.raises(errors.APIError) as err:
        async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
            async with asyncio.timeout(5):
                while True:
                    got.append(await anext(session.receive()))
    assert err.value.code == 1000
    go_away = next(m.go_away for m in got if m.go_away)
    assert go_away.time_left == "0.200s"
    rec = server.sessions[0]
    t_go = rec.events_of("go_away")[0].t
    assert rec.events_of("close")[0].t - t_go >= 0.19 and rec.close_code == 1000


async def test_scripted_1011_mid_reply(server_factory) -> None:
    fault = CloseFault(code=1011, during_reply=1, after_audio=0.3)
    server = await server_factory(scenario=Scenario(closes=[fault], **FAST))
    msgs = []
    with pytest.raises(errors.APIError) as err:
        async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
            await send_pcm(session, utterance("book"))
            async with asyncio.timeout(5):
                while True:
                    msgs.append(await anext(session.receive()))
    assert err.value.code == 1011
    assert 0 < len(audio_of(msgs)) < agent_bytes("book_reply")
    assert server.sessions[0].closed_by == "server"


async def test_scripted_close_at_a_time(server_factory) -> None:
    fault = CloseFault(code=1008, reason="Quota exceeded.", at=0.1)
    server = await server_factory(scenario=Scenario(closes=[fault], **FAST))
    with pytest.raises(errors.APIError) as err:
        async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
            async with asyncio.timeout(5):
                while True:
                    await anext(session.receive())
    assert err.value.code == 1008 and "Quota" in str(err.value)


async def test_slow_reply_is_slower_than_real_time(server_factory) -> None:
    scenario = Scenario(
        slow=[SlowFault(rate=0.8)], text_replies={"go": "one_moment"}, first_audio_delay=0.0,
        burst_s=(0.0, 0.0), pause_prob=0.0,
    )  # fmt: skip
    server = await server_factory(scenario=scenario)
    async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
        await session.send_realtime_input(text="go")
        loop = asyncio.get_running_loop()
        stamps = [loop.time() async for m in session.receive() if audio_of([m])]
    # the last chunk goes out when 1/0.8 of the audio before it would have played
    assert stamps[-1] - stamps[0] > clip_duration("one_moment") * 0.9


async def test_stall_keeps_socket_open(server_factory) -> None:
    server = await server_factory(scenario=Scenario(stalls=[StallFault(reply=1)], **FAST))
    async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
        await send_pcm(session, utterance("book"))
        rec = await server.wait_for(lambda: server.sessions and server.sessions[0].stalled)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                async for msg in session.receive():
                    assert not audio_of([msg])
        await send_pcm(session, bytes(FRAME))  # the socket still takes input
        await server.wait_for(lambda: server.sessions[0].audio_chunks_received > 100)
    assert rec and server.sessions[0].turns[0].audio_bytes_sent == 0


# ---- session resumption -------------------------------------------------------------------------


async def test_resume_keeps_the_conversation(server_factory) -> None:
    server = await server_factory()
    cli = client(server)
    async with cli.aio.live.connect(model=MODEL, config=live_config()) as session:
        await send_pcm(session, utterance("book"))
        await one_turn(session)
        handle = (await anext(session.receive())).session_resumption_update.new_handle
    resume = types.SessionResumptionConfig(handle=handle)
    cfg = live_config(session_resumption=resume)
    async with cli.aio.live.connect(model=MODEL, config=cfg) as session:
        await send_pcm(session, utterance("time"))
        msgs = await one_turn(session)
    assert len(audio_of(msgs)) == agent_bytes("time_reply")
    first, second = server.sessions
    assert second.resumed and second.chain == first.chain
    assert second.turns[0].caller_turn == 2 and second.turns[0].number == 2
    prompt = [t.usage["promptTokenCount"] for t in (first.turns[0], second.turns[0])]
    assert prompt[1] > prompt[0]

    server.revoke_handle(handle)
    with pytest.raises(errors.APIError) as err:
        async with cli.aio.live.connect(model=MODEL, config=cfg):
            pass
    assert err.value.code == 1008


async def test_unknown_or_expired_handle_is_1008(server_factory) -> None:
    server = await server_factory(scenario=Scenario(handle_ttl=0.0, **FAST))
    cli = client(server)
    cfg = live_config(session_resumption=types.SessionResumptionConfig(handle="no-such-handle"))
    with pytest.raises(errors.APIError) as err:
        async with cli.aio.live.connect(model=MODEL, config=cfg):
            pass
    assert err.value.code == 1008
    async with cli.aio.live.connect(model=MODEL, config=live_config()) as session:
        handle = (await anext(session.receive())).session_resumption_update.new_handle
    cfg = live_config(session_resumption=types.SessionResumptionConfig(handle=handle))
    with pytest.raises(errors.APIError) as err:
        async with cli.aio.live.connect(model=MODEL, config=cfg):
            pass
    assert err.value.code == 1008 and "expired" in str(err.value)


async def test_exclusive_resume_refuses_a_second_live_session(server_factory) -> None:
    server = await server_factory(scenario=Scenario(exclusive_resume=True, **FAST))
    cli = client(server)
    async with cli.aio.live.connect(model=MODEL, config=live_config()) as session:
        handle = (await anext(session.receive())).session_resumption_update.new_handle
        cfg = live_config(session_resumption=types.SessionResumptionConfig(handle=handle))
        with pytest.raises(errors.APIError) as err:
            async with cli.aio.live.connect(model=MODEL, config=cfg):
                pass
        assert err.value.code == 1008
    async with cli.aio.live.connect(model=MODEL, config=cfg):
        pass  # once the first one is gone, the handle works


# ---- text input (DTMF) and isolation ------------------------------------------------------------


async def test_realtime_text_is_recorded_and_answered(server_factory) -> None:
    scenario = Scenario(text_replies={"pressed": "one_moment"}, **FAST)
    server = await server_factory(scenario=scenario)
    async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
        await session.send_realtime_input(text="caller pressed 5")
        msgs = await one_turn(session)
    assert server.sessions[0].texts == ["caller pressed 5"]
    assert len(audio_of(msgs)) == agent_bytes("one_moment")


async def test_bad_session_does_not_disturb_a_good_one(server_factory) -> None:
    server = await server_factory()
    async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
        await send_pcm(session, utterance("book")[: len(utterance("book")) // 2])
        async with ws_connect(
            server.ws_url, ssl=server.client_ssl_context(),
            additional_headers={"x-goog-api-key": "k"},
        ) as bad:  # fmt: skip
            await bad.send(json.dumps({"setup": {"model": MODEL}}))
            await bad.recv()
            await bad.send(b"\xff\xfe garbage")
            with pytest.raises(ConnectionClosed):
                await bad.recv()
        assert bad.close_code == 1007
        await send_pcm(session, utterance("book")[len(utterance("book")) // 2 :])
        msgs = await one_turn(session)
    assert len(audio_of(msgs)) == agent_bytes("book_reply")


async def test_unrecognized_speech_gets_sorry(server_factory) -> None:
    server = await server_factory()
    noise = (np.random.default_rng(5).normal(0, 4000, 24000)).astype("<i2").tobytes()
    async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
        await send_pcm(session, noise + bytes(32 * 400))
        msgs = await one_turn(session)
    assert text_of(msgs, "input_transcription") == INAUDIBLE
    assert len(audio_of(msgs)) == agent_bytes("sorry")


# ---- standalone ----------------------------------------------------------------------------------


def test_cli_prints_url_and_ca_then_stops_on_sigterm(tmp_path) -> None:
    ca_file = tmp_path / "ca.pem"
    proc = subprocess.Popen(
        [sys.executable, "-m", "livecall.sim.gemini", "--port", "0", "--ca-file", str(ca_file)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        url = proc.stdout.readline().strip()
        ca = proc.stdout.readline().strip()
        assert url.startswith("GEMINI_BASE_URL=https://127.0.0.1:")
        assert ca == f"SSL_CERT_FILE={ca_file}" and b"BEGIN CERTIFICATE" in ca_file.read_bytes()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# ---- turn ends: failure reasons, waiting, interaction status, interim transcripts ---------------


async def test_failed_turn_ends_unanswered_with_its_reason(server_factory) -> None:
    scenario = Scenario(
        turn_ends=[TurnEndFault(reply=1, reason="MALFORMED_FUNCTION_CALL")],
        interaction_status="IDLE",
        interim_transcripts=True,
        **FAST,
    )
    server = await server_factory(scenario=scenario)
    async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
        await send_pcm(session, utterance("hours"))
        failed = await one_turn(session)
        await send_pcm(session, utterance("hours"))
        answered = await one_turn(session)
    # the SDK parses every field the fake sends (it raises on keys it does not know)
    assert audio_of(failed) == b""
    done = failed[-1].server_content
    assert done.turn_complete
    assert done.turn_complete_reason == types.TurnCompleteReason.MALFORMED_FUNCTION_CALL
    assert done.interaction_status == types.InteractionStatus.IDLE
    assert not any(m.server_content and m.server_content.generation_complete for m in failed)
    interim = [
        m.server_content.interim_input_transcription.text
        for m in failed
        if m.server_content and m.server_content.interim_input_transcription
    ]
    words = CALLER_CLIPS["hours"].text
    assert interim and interim[-1] == "what time do you open on sundays"
    assert all(interim[-1].startswith(g) for g in interim)
    assert text_of(failed, "input_transcription") == words
    # the next reply is as usual, its end says IDLE and nothing else
    assert len(audio_of(answered)) == agent_bytes("hours_reply")
    last = answered[-1].server_content
    assert last.turn_complete_reason is None and last.interaction_status == "IDLE"
    rec = server.sessions[0]
    assert [(t.reply_clip, t.completed) for t in rec.turns] == [(None, True), ("hours_reply", True)]


async def test_waiting_and_in_progress_then_the_rest(server_factory) -> None:
    scenario = Scenario(
        turn_ends=[
            TurnEndFault(reply=1, reason="NEED_MORE_INPUT", waiting_for_input=True),
            TurnEndFault(
                reply=2, reason=None, speak=True, interaction_status="IN_PROGRESS",
                then="one_moment", then_after=0.1,
            ),
        ],
        **FAST,
    )  # fmt: skip
    server = await server_factory(scenario=scenario)
    async with client(server).aio.live.connect(model=MODEL, config=live_config()) as session:
        await send_pcm(session, utterance("hours"))
        waiting = await one_turn(session)
        await send_pcm(session, utterance("hours"))
        # the SDK's own receive() reads on past a turnComplete that says IN_PROGRESS
        working = await one_turn(session)
    done = waiting[-1].server_content
    assert audio_of(waiting) == b"" and done.waiting_for_input is True
    assert done.turn_complete_reason == types.TurnCompleteReason.NEED_MORE_INPUT
    ends = [i for i, m in enumerate(working) if m.server_content and m.server_content.turn_complete]
    assert len(ends) == 2, ends
    first, rest = working[: ends[0] + 1], working[ends[0] + 1 :]
    assert len(audio_of(first)) == agent_bytes("hours_reply")
    assert first[-1].server_content.interaction_status == types.InteractionStatus.IN_PROGRESS
    assert len(audio_of(rest)) == agent_bytes("one_moment")
    assert rest[-1].server_content.interaction_status == types.InteractionStatus.IDLE
