"""Hostile input at the stream socket and the webhook: nothing crashes, leaks, or reaches
another call, and no secret is ever written out.

The parser and the state machine are fuzzed on their own in tests/test_twilio_protocol.py;
here the whole stream handler is, over a real WebSocket to the running server: 100,000
random and malformed frames (`livecall.bench.resilience.hostile_frames`, seeded) on one
signed stream after a valid `start`, while a clean call runs beside it. Then the sockets
that say nothing (or never `start`), the upgrades and webhooks that are not signed, frames
that only the connection can refuse, counters no real stream sends, and a search of every
log line and every answer for the deployment's secrets.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
import wave
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import soxr
import structlog
import websockets

import livecall.log
from livecall.audio.g711 import ulaw_encode
from livecall.bench.resilience import hostile_frames
from livecall.sim.clips import load_clip
from livecall.sim.gemini import CloseFault, Scenario, ToolCallFault
from livecall.sim.stack import TEST_AUTH_TOKEN, LocalStack
from livecall.sim.twilio import (
    HangUp,
    Pause,
    WaitForAgentAudio,
    WaitForAgentSilence,
)
from livecall.sim.twilio_rest import serve_fake_twilio_rest
from livecall.telephony.twilio import TwilioSignature
from support import say

FAST = {"vad_silence_duration_ms": 300}
FUZZ_FRAMES = 100_000
ACCOUNT = "AC" + "4" * 32
START_OK = '{"event":"connected","protocol":"Call","version":"1.0.0"}'


def model(seed: int, **kw: Any) -> Scenario:
    kw.setdefault("first_audio_delay", 0.2)
    return Scenario(seed=seed, greeting=None, pause_prob=0.0, **kw)


def start_message(stream_sid: str, call_sid: str, stack: LocalStack) -> str:
    """A `start` as Twilio sends it, carrying the stream token the server's TwiML would give."""
    token = stack.stream_token(call_sid, ACCOUNT)
    return orjson.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": stream_sid,
            "start": {
                "accountSid": ACCOUNT,
                "streamSid": stream_sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "customParameters": {"lc_token": token},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
    ).decode()


def stream_url(stack: LocalStack) -> str:
    return stack.base_url.replace("http://", "ws://") + "/ws/twilio"


def signed(stack: LocalStack) -> dict[str, str]:
    return {"X-Twilio-Signature": TwilioSignature(TEST_AUTH_TOKEN).sign(stream_url(stack))}


async def connect(stack: LocalStack, **kw: Any) -> websockets.ClientConnection:
    kw.setdefault("additional_headers", signed(stack))
    return await websockets.connect(stream_url(stack), proxy=None, max_size=None, **kw)


def utterance_frames(name: str, silence_ms: int = 700, lead_ms: int = 0) -> Iterator[bytes]:
    """A caller clip as 20 ms μ-law frames, after `lead_ms` and before `silence_ms` of
    silence (the model's VAD ends an utterance on silence)."""
    pcm, rate = load_clip(name)
    ulaw = ulaw_encode(soxr.resample(pcm, rate, 8000).astype(np.int16)).tobytes()
    ulaw = b"\xff" * (8 * lead_ms) + ulaw + b"\xff" * (8 * silence_ms)
    for i in range(0, len(ulaw) - 159, 160):
        yield ulaw[i : i + 160]


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Listener:
    """Reads a raw stream socket in the background; `media` is set by each agent media."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.messages: list[Any] = []
        self.media = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for data in self.ws:
                msg = orjson.loads(data)
                self.messages.append(msg)
                if msg.get("event") == "media":
                    self.media.set()
        except websockets.ConnectionClosed:
            pass

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


# --------------------------------------------------------------------------- the firehose


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_100k_hostile_frames_on_one_stream_leave_a_concurrent_call_untouched(
    make_stack, call_over, leftover_tasks, audio
) -> None:
    """100,000 random and malformed frames on a started stream: none crashes anything; the
    fuzzed call is still up and still answers its caller afterwards; a clean call running at
    the same time hears exactly its own answers with no protocol error; nothing is left over.

    The mix (see `FrameMix`): random bytes in binary frames, random text, truncated JSON,
    JSON that is no object (and nesting thousands deep), known events with fields of the
    wrong types, counters far out of range, unknown events, every event for another
    streamSid, frames above MAX_MESSAGE_BYTES, this stream's media with payloads that are
    not base64 or with chunk numbers going backwards, marks never sent, DTMF that is no key,
    `connected`/`start` again. Recording is off for this stream: a trusted out-of-range
    timestamp makes a recording of that length (pinned by its own test below).
    """
    stack = await make_stack(
        model(51, replies={"hours": "hours_reply", "yes": "goodbye"}),
        recording_enabled=False,
        **FAST,
    )
    gemini = stack.gemini
    fuzz_sid, fuzz_call = "MZ" + "a" * 32, "CA" + "a" * 32
    ws = await connect(stack)
    await ws.send(START_OK)
    await ws.send(start_message(fuzz_sid, fuzz_call, stack))
    listener = Listener(ws)
    await gemini.wait_for(lambda: gemini.sessions and gemini.sessions[0].setup_completed, 10)
    fuzz_session = gemini.sessions[0]
    bridge = stack.registry.active[fuzz_call].bridge
    rss_before = rss_mb()

    clean = stack.caller(
        [
            Pause(300),
            say("hours"),
            WaitForAgentSilence(silence_ms=500, timeout=40),
            say("yes"),
            WaitForAgentSilence(silence_ms=500, timeout=40),
            HangUp(),
        ],
        seed=52,
        timeout=80,
    )
    clean_run = asyncio.create_task(clean.run())

    started = time.perf_counter()
    sent = 0
    for frame in hostile_frames(FUZZ_FRAMES, fuzz_sid, seed=2024):
        await ws.send(frame)
        sent += 1
    pong = await ws.ping()  # answered once the server has read everything sent before it
    await asyncio.wait_for(pong, 60)
    elapsed = time.perf_counter() - started
    assert sent == FUZZ_FRAMES
    print(f"\n{sent} hostile frames in {elapsed:.1f} s: {sent / elapsed:.0f} frames/s")
    assert ws.close_code is None, (ws.close_code, ws.close_reason)

    # the fuzzed call is still up: its caller speaks (counting on from where the stream is;
    # a second of silence first closes any "utterance" the fuzz's noise opened), and is
    # answered (the noise was not: the fake model leaves what it does not recognize alone)
    listener.media.clear()
    stream = bridge.stream
    chunk = (stream.last_chunk or 0) + 1
    ts = (stream.last_timestamp_ms or 0) + 20
    for i, frame in enumerate(utterance_frames("yes", lead_ms=1000)):
        payload = base64.b64encode(frame).decode()
        await ws.send(
            orjson.dumps(
                {
                    "event": "media",
                    "streamSid": fuzz_sid,
                    "media": {
                        "track": "inbound",
                        "chunk": str(chunk + i),
                        "timestamp": str(ts + 20 * i),
                        "payload": payload,
                    },
                }
            ).decode()
        )
    await asyncio.wait_for(listener.media.wait(), 20)
    assert [t.caller_clip for t in fuzz_session.turns if t.trigger == "speech"] == ["yes"], [
        (t.caller_clip, t.trigger, t.completed) for t in fuzz_session.turns
    ]

    clean_result = await clean_run
    await ws.send(orjson.dumps({"event": "stop", "streamSid": fuzz_sid}).decode())
    await asyncio.wait_for(listener.task, 15)  # the server closes the fuzzed stream
    assert ws.close_code == 1000
    assert await stack.registry.wait_idle(20)
    await gemini.wait_for(lambda: all(s.closed for s in gemini.sessions), 20)

    # the clean call: its own answers, whole, no error of any kind
    assert clean_result.protocol_errors == [] and clean_result.script_errors == []
    assert clean_result.ended_by == "caller"
    assert len(clean_result.response_latencies_ms) == 2
    heard = clean_result.heard_pcm()
    assert audio.heard_share(heard, "hours_reply") > 0.8
    assert audio.heard_share(heard, "goodbye") > 0.8
    clean_session = next(s for s in gemini.sessions if s is not fuzz_session)
    assert [t.caller_clip for t in clean_session.turns] == ["hours", "yes"]
    assert clean_session.texts == []  # no keypress of the fuzzed stream reached it
    assert len(gemini.sessions) == 2

    # the fuzzed stream only ever got well-formed messages for itself
    assert all(m.get("streamSid") == fuzz_sid for m in listener.messages)

    # the server: alive, no call or reservation left, no task, memory where it was
    assert stack._task is not None and not stack._task.done()
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.get(stack.base_url + "/health")).status_code == 200
    assert stack.registry.active == {} and stack.registry.load == 0
    assert leftover_tasks(fuzz_call) == [] and leftover_tasks(clean_result.call_sid) == []
    assert rss_mb() - rss_before < 150
    await listener.close()

    # and both calls' records were written, complete
    store = stack.app.state.livecall.store
    async with asyncio.timeout(15):
        assert await store.flush(), f"call records not written: {store.health()}"
    fuzz_record = await store.repo.get_call(fuzz_call)
    assert fuzz_record is not None
    assert (fuzz_record.status, fuzz_record.end_reason) == ("completed", "caller_stop")
    clean_record = await store.repo.get_call(clean_result.call_sid)
    assert clean_record is not None and clean_record.status == "completed"


# --------------------------------------------------------------------------- out-of-range counters


def _media(sid: str, chunk: int | str, ts: int | str, ulaw: bytes) -> str:
    payload = base64.b64encode(ulaw).decode()
    return orjson.dumps(
        {
            "event": "media",
            "streamSid": sid,
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(ts),
                "payload": payload,
            },
        }
    ).decode()


@pytest.mark.timeout(40)
async def test_one_frame_with_an_absurd_chunk_number_does_not_deafen_the_call(
    make_stack, call_over
) -> None:
    """Chunks only move forward, so a single media frame numbered far ahead (corrupt, or
    hostile) must not become the new reference: if it does, every real frame after it is
    "late" and dropped, and the caller is never heard again. Nor may it count as 10^15
    frames missing (the record could not even be stored in a PostgreSQL INTEGER)."""
    stack = await make_stack(model(53, replies={"yes": "one_moment"}), **FAST)
    ws = await connect(stack)
    sid, call_sid = "MZ" + "b" * 32, "CA" + "b" * 32
    await ws.send(START_OK)
    await ws.send(start_message(sid, call_sid, stack))
    listener = Listener(ws)
    frames = list(utterance_frames("yes"))
    silence = b"\xff" * 160
    for n in range(1, 11):
        await ws.send(_media(sid, n, 20 * (n - 1), silence))
    await ws.send(_media(sid, 10**15, 200, silence))  # the one bad frame
    for i, frame in enumerate(frames, start=11):
        await ws.send(_media(sid, i, 20 * (i - 1), frame))
    try:
        await asyncio.wait_for(listener.media.wait(), 10)
    except TimeoutError:
        bridge = stack.registry.active[call_sid].bridge
        pytest.fail(
            f"the caller was never answered: {bridge.stream.frames_late} of their frames were "
            f"dropped as late after chunk {bridge.stream.last_chunk}"
        )
    await ws.send(orjson.dumps({"event": "stop", "streamSid": sid}).decode())
    await asyncio.wait_for(listener.task, 10)
    await call_over(stack)
    call = await stack.app.state.livecall.store.repo.get_call(call_sid)
    assert call is not None and call.end_reason == "caller_stop"
    assert call.frames_missing < 1000, call.frames_missing


@pytest.mark.timeout(40)
async def test_a_call_with_absurd_counters_does_not_stop_the_records_of_other_calls(
    make_stack, call_over
) -> None:
    """Counters are arbitrary-precision in JSON: a chunk number of 10^30 is parsed, counted
    as 10^30 frames missing, and the call's end record cannot be stored (SQLite's INTEGER,
    like PostgreSQL's, has 64 bits). That record may be refused, but the store must go on
    writing every other call's records: it must not stall on the one it cannot write (nor
    fail to spool it at shutdown)."""
    stack = await make_stack(model(54, replies={"yes": "one_moment"}), **FAST)
    ws = await connect(stack)
    sid, call_sid = "MZ" + "9" * 32, "CA" + "9" * 32
    await ws.send(START_OK)
    await ws.send(start_message(sid, call_sid, stack))
    listener = Listener(ws)
    await stack.gemini.wait_for(lambda: stack.gemini.sessions, 10)
    await ws.send(_media(sid, "1" + "0" * 30, 0, b"\xff" * 160))
    await ws.send(orjson.dumps({"event": "stop", "streamSid": sid}).decode())
    await asyncio.wait_for(listener.task, 10)
    assert await stack.registry.wait_idle(10)

    # an ordinary call after it
    result = await stack.caller(
        [Pause(200), say("yes"), WaitForAgentSilence(silence_ms=400, timeout=10), HangUp()],
        seed=54,
    ).run()
    assert len(result.response_latencies_ms) == 1
    assert await stack.registry.wait_idle(10)
    store = stack.app.state.livecall.store
    async with asyncio.timeout(15):
        assert await store.flush(), f"call records not written: {store.health()}"
    call = await store.repo.get_call(result.call_sid)
    assert call is not None and (call.status, call.end_reason) == ("completed", "caller_stop")
    await listener.close()


@pytest.mark.timeout(40)
async def test_an_out_of_range_timestamp_does_not_blow_up_the_recording(
    make_stack, call_over
) -> None:
    """The recording places caller audio at its stream timestamp (gaps stay gaps). One frame
    stamped 1,000,000 ms (16.7 minutes) into a call of a few seconds must not make a
    16-minute recording, nor make the server allocate the gap: with a stamp of days it would
    allocate gigabytes (and at worst write them to disk), for every call a peer chooses."""
    stack = await make_stack(model(55, replies={"yes": "one_moment"}), **FAST)
    ws = await connect(stack)
    sid, call_sid = "MZ" + "c" * 32, "CA" + "c" * 32
    await ws.send(START_OK)
    await ws.send(start_message(sid, call_sid, stack))
    listener = Listener(ws)
    silence = b"\xff" * 160
    n = 0
    for n in range(1, 51):
        await ws.send(_media(sid, n, 20 * (n - 1), silence))
    await ws.send(_media(sid, n + 1, 1_000_000, silence))  # the one bad frame
    for i, frame in enumerate(utterance_frames("yes"), start=n + 2):
        await ws.send(_media(sid, i, 20 * (i - 1), frame))
    await asyncio.wait_for(listener.media.wait(), 10)
    started = time.monotonic()
    await ws.send(orjson.dumps({"event": "stop", "streamSid": sid}).decode())
    await asyncio.wait_for(listener.task, 20)
    await call_over(stack)
    call = await stack.app.state.livecall.store.repo.get_call(call_sid)
    assert call is not None and call.recording_key
    assert time.monotonic() - started < 5

    def recording_seconds() -> float:
        path = next(Path(stack.settings.recordings_dir).rglob(f"{call_sid}*"))
        with wave.open(str(path)) as rec:
            return rec.getnframes() / rec.getframerate()

    seconds = await asyncio.to_thread(recording_seconds)
    assert seconds < (call.duration_s or 0) + 2.0, (seconds, call.duration_s)


# --------------------------------------------------------------------------- silence and limits


@pytest.mark.timeout(30)
@pytest.mark.parametrize("says", ["nothing", "connected-only", "junk-only"])
async def test_a_socket_that_never_starts_is_closed_after_the_first_message_timeout(
    make_stack, says
) -> None:
    """FIRST_MESSAGE_TIMEOUT: a stream socket that opens and never gets to `start` (says
    nothing, only `connected`, or only junk) is closed, and nothing was opened for it."""
    stack = await make_stack(model(57), first_message_timeout_s=0.5)
    ws = await connect(stack)
    opened = time.monotonic()
    if says == "connected-only":
        await ws.send(START_OK)
    elif says == "junk-only":  # junk, but no `start` (nor a `stop`, which closes at once)
        for frame in hostile_frames(200, "MZ" + "d" * 32, seed=3):
            text = frame.decode("latin-1") if isinstance(frame, bytes) else frame
            if "start" not in text and "stop" not in text:
                await ws.send(frame)
    with pytest.raises(websockets.ConnectionClosed):
        async with asyncio.timeout(5):
            await ws.recv()
    waited = time.monotonic() - opened
    assert 0.4 <= waited < 2.5, waited
    assert ws.close_code == 1008, ws.close_code
    assert stack.gemini.sessions == []
    assert stack.registry.active == {} and stack.registry.load == 0


@pytest.mark.timeout(40)
async def test_a_connection_that_never_finishes_its_upgrade_is_not_held_for_ever(
    make_stack,
) -> None:
    """Handshake timeout: a TCP connection that sends nothing, or half an HTTP upgrade and
    then nothing, is closed by the server within a bounded time (a peer must not be able to
    hold sockets open for ever: slowloris)."""
    stack = await make_stack(model(59))
    host, port = stack.base_url.removeprefix("http://").split(":")
    silent = await asyncio.open_connection(host, int(port))
    partial = await asyncio.open_connection(host, int(port))
    partial[1].write(b"GET /ws/twilio HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
    await partial[1].drain()

    async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                while await reader.read(4096):  # a 4xx answer may come first, then EOF
                    pass
        except TimeoutError:
            return False
        return True

    done = await asyncio.gather(closed_within(silent[0], 15), closed_within(partial[0], 15))
    for _, writer in (silent, partial):
        writer.close()
    assert done == [True, True], f"still open after 15 s (silent, half an upgrade): {done}"
    assert stack.gemini.sessions == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("frame", ["over-1MiB", "invalid-utf8"])
async def test_frames_only_the_connection_can_refuse_end_the_call_cleanly(
    make_stack, call_over, leftover_tasks, frame
) -> None:
    """A frame above the WebSocket limit (1 MiB; frames above MAX_MESSAGE_BYTES but under it
    are read and ignored) or a text frame that is not UTF-8 closes the connection itself:
    the call ends as a caller close, its Gemini session is closed, nothing is left."""
    stack = await make_stack(model(61), **FAST)
    ws = await connect(stack)
    sid, call_sid = "MZ" + "e" * 32, "CA" + "e" * 32
    await ws.send(START_OK)
    await ws.send(start_message(sid, call_sid, stack))
    await stack.gemini.wait_for(lambda: stack.gemini.sessions, 10)
    with pytest.raises(websockets.ConnectionClosed):
        if frame == "over-1MiB":
            await ws.send('{"event":"media","media":{"payload":"' + "A" * (1 << 20) + '"}}')
        else:
            await ws.send(b'{"event":"mark","mark":{"name":"\xff\xfe"}}', text=True)
        async with asyncio.timeout(10):
            await ws.recv()
    assert ws.close_code in (1007, 1009), ws.close_code
    await call_over(stack)
    call = await stack.app.state.livecall.store.repo.get_call(call_sid)
    assert call is not None and call.end_reason == "caller_closed"
    assert leftover_tasks(call_sid) == []


# --------------------------------------------------------------------------- unsigned


@pytest.mark.timeout(30)
async def test_unsigned_traffic_never_opens_a_gemini_session(make_stack) -> None:
    """No Gemini session, no registry place, for anything Twilio did not sign: a webhook
    without or with a wrong signature, a stream upgrade without one (even if it goes on to
    send a perfect `start` and caller audio), a signature made for another URL."""
    stack = await make_stack(model(63))
    url = stack.base_url + "/twiml"
    params = {"CallSid": "CA" + "f" * 32, "From": "+15550001111", "To": "+15550002222"}
    async with httpx.AsyncClient(trust_env=False) as http:
        for headers in (
            {},
            {"X-Twilio-Signature": "AAAA"},
            {"X-Twilio-Signature": TwilioSignature("other-token").sign(url, params)},
            {"X-Twilio-Signature": TwilioSignature(TEST_AUTH_TOKEN).sign(url + "x", params)},
        ):
            resp = await http.post(url, data=params, headers=headers)
            assert resp.status_code == 403 and "<Stream" not in resp.text
    for headers in (
        {},
        {"X-Twilio-Signature": TwilioSignature(TEST_AUTH_TOKEN).sign(url)},  # the http URL
        {"X-Twilio-Signature": TwilioSignature("other-token").sign(stream_url(stack))},
    ):
        with pytest.raises(websockets.InvalidStatus) as refused:
            ws = await connect(stack, additional_headers=headers)
            await ws.send(START_OK)
            await ws.send(start_message("MZ" + "f" * 32, "CA" + "f" * 32, stack))
            for frame in utterance_frames("yes", silence_ms=100):
                await ws.send(_media("MZ" + "f" * 32, 1, 0, frame))
        assert refused.value.response.status_code == 403
    unsigned = await stack.caller([say("yes"), HangUp()], sign=False).run()
    assert unsigned.webhook_status == 403 and unsigned.stream_sid is None
    assert len(stack.gemini.sessions) == 0
    assert stack.registry.active == {} and stack.registry.load == 0


# --------------------------------------------------------------------------- secrets

SECRET_TWILIO = "twilio-TOKEN-7f3c91e2d5a84b06"
SECRET_GEMINI = "gemini-KEY-4b8e1d7a0c2f6935"
SECRET_API = "api-TOKEN-c6a2e9f0b7d41853"
SECRETS = (SECRET_TWILIO, SECRET_GEMINI, SECRET_API)
ACCOUNT_SID = "AC" + "2" * 32


@pytest.fixture
def capture_logs() -> Iterator[Callable[[Sequence[str]], io.StringIO]]:
    """`capture_logs(secrets)`: every log line of the process from then on, rendered as
    `livecall serve` renders it (`configure_logging`, JSON) but at debug level and with the
    websockets library's frame and header dumps on too, into a buffer. Logging is global:
    all of it is restored after the test."""
    saved_config = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    names = ("websockets", "httpx", "uvicorn")
    saved_levels = {name: logging.getLogger(name).level for name in names}
    saved_secrets = set(livecall.log._secrets)

    def capture(secrets: Sequence[str]) -> io.StringIO:
        livecall.log.configure_logging("debug", "json", secrets=secrets)
        buffer = io.StringIO()
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(buffer)
        logging.getLogger("websockets").setLevel(logging.DEBUG)
        return buffer

    try:
        yield capture
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        structlog.configure(**saved_config)
        livecall.log._secrets.clear()
        livecall.log._secrets.update(saved_secrets)


@pytest.fixture
async def secret_stack(tmp_path: Path) -> AsyncIterator[tuple[LocalStack, Any]]:
    """A stack whose Twilio auth token, Gemini API key and API token are distinctive values,
    with REST call control pointed at a fake Twilio API that does not know our token."""
    async with serve_fake_twilio_rest(ACCOUNT_SID, "another-token-0000") as (rest, rest_url):
        scenario = model(
            71,
            replies={"yes": "one_moment", "hours": "hours_reply"},
            tool_calls=[
                ToolCallFault(after_caller_turn=1, name="no_such_tool"),
                ToolCallFault(after_caller_turn=2, name="end_call", args={"reason": "done"}),
            ],
            closes=[CloseFault(code=1011, during_reply=1, after_audio=0.3)],
        )
        stack = LocalStack(
            scenario=scenario,
            settings_overrides={
                "database_url": f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}",
                "recordings_dir": tmp_path / "rec",
                "spool_dir": tmp_path / "spool",
                "twilio_auth_token": SECRET_TWILIO,
                "gemini_api_key": SECRET_GEMINI,
                "api_token": SECRET_API,
                "twilio_account_sid": ACCOUNT_SID,
                "twilio_api_base_url": rest_url,
                **FAST,
            },
        )
        await stack.start()
        try:
            yield stack, rest
        finally:
            await stack.stop()


@pytest.mark.timeout(90)
async def test_no_secret_in_any_log_line_or_answer(capture_logs, secret_stack, call_over) -> None:
    """TWILIO_AUTH_TOKEN, GEMINI_API_KEY and LIVECALL_API_TOKEN never appear in a log line,
    an HTTP answer, a WebSocket close reason or a message to the caller, on the good path or
    any failure path: bad signatures, Gemini closing 1011 mid-reply, a tool that does not
    exist, Twilio's REST API refusing our credentials (401), the API called without, with a
    wrong and with the right token, and Gemini rejecting the API key (1007).

    Logging is set up as `livecall serve` sets it up (the secrets handed to
    `configure_logging`), at debug level, with the websockets library's header dumps on."""
    logs_buffer = capture_logs(SECRETS)
    stack, rest = secret_stack
    gemini = stack.gemini
    seen: list[str] = []  # every answer and message the outside world got

    async with httpx.AsyncClient(trust_env=False) as http:
        # bad signatures
        url = stack.base_url + "/twiml"
        for headers in ({}, {"X-Twilio-Signature": "AAAA"}):
            resp = await http.post(url, data={"CallSid": "CA1"}, headers=headers)
            seen += [resp.text, str(resp.headers)]
        try:
            await websockets.connect(stream_url(stack), proxy=None)
        except websockets.InvalidStatus as exc:
            seen += [exc.response.body.decode("utf-8", "replace"), str(exc.response.headers)]

        # a call through 1011 mid-reply, an unknown tool, and end_call whose REST hang-up is
        # refused by Twilio (401: not our token)
        from livecall.sim.twilio import SimulatedCaller

        caller = SimulatedCaller(
            stack.base_url,
            auth_token=SECRET_TWILIO,
            account_sid=ACCOUNT_SID,
            seed=71,
            timeout=40,
            script=[
                Pause(200),
                say("yes"),
                WaitForAgentSilence(silence_ms=600, timeout=15),
                say("hours"),
                WaitForAgentAudio(min_heard_ms=200, timeout=15),
                Pause(8000),
            ],
        )
        result = await caller.run()
        seen += [result.twiml, result.close_reason, *result.protocol_errors]
        seen += [orjson.dumps(e).decode() for e in result.timeline if e.detail]
        await call_over(stack)
        assert any(s.close_code == 1011 for s in gemini.sessions)
        assert any(not r.authorized and r.status == 401 for r in rest.requests), rest.requests

        # the API: without, with a wrong and with the right token; the dashboard login
        for headers in (
            {},
            {"Authorization": "Bearer nope"},
            {"Authorization": f"Bearer {SECRET_API}"},
        ):
            for path in ("/api/calls", f"/api/calls/{result.call_sid}", "/api/stats", "/api/live"):
                resp = await http.get(stack.base_url + path, headers=headers)
                seen += [resp.text, str(resp.headers)]
        resp = await http.post(stack.base_url + "/login", data={"token": "wrong"})
        seen += [resp.text, str(resp.headers)]
        resp = await http.get(stack.base_url + "/metrics")
        seen += [resp.text]
        resp = await http.get(stack.base_url + "/health")
        seen += [resp.text]

        # Gemini rejects the key: every session closes 1007 and the caller hears the apology
        gemini.api_key = "not-" + SECRET_GEMINI[::-1]
        refused = await SimulatedCaller(
            stack.base_url,
            auth_token=SECRET_TWILIO,
            account_sid=ACCOUNT_SID,
            seed=72,
            timeout=30,
            script=[Pause(200), say("yes"), Pause(15_000)],
        ).run()
        seen += [refused.twiml, refused.close_reason, *refused.protocol_errors]
        await call_over(stack)
        assert any(s.close_code == 1007 for s in gemini.sessions)

    for record in gemini.sessions:  # what the model was told (the fake keeps no key value)
        seen += [str(record.setup), str(record.client_contents), str(record.texts)]
        seen += [str(r.response) for r in record.tool_responses]
        seen += [str(record.close_reason)]
    repo = stack.app.state.livecall.store.repo
    for sid in (result.call_sid, refused.call_sid):
        call = await repo.get_call(sid)
        assert call is not None
        seen += [str([(e.kind, e.data) for e in call.events])]

    logs = logs_buffer.getvalue()
    assert "call.summary" in logs and "gemini" in logs  # the capture did capture
    assert "1011" in logs and "1007" in logs
    for secret in SECRETS:
        assert secret not in logs, _context(logs, secret)
        for text in seen:
            assert secret not in text, _context(text, secret)


def _context(text: str, secret: str) -> str:
    i = text.index(secret)
    return text[max(0, i - 300) : i + len(secret) + 100]


@pytest.mark.timeout(30)
async def test_the_app_registers_its_own_secrets_for_redaction(capture_logs, tmp_path) -> None:
    """The redaction processor only scrubs the values it was given. `livecall serve` passes
    the secrets to `configure_logging`; an app made by `create_app()` (tests, LocalStack,
    an embedding ASGI server) must register them itself, so that a secret that strays into
    a log line (an exception quoting a header, a URL) is scrubbed whoever started the app.
    (With the websockets library's debug dumps on, the SDK's `x-goog-api-key` request
    header is such a line.)"""
    logs_buffer = capture_logs(())  # logging set up without the secrets: the app's job
    stack = LocalStack(
        scenario=model(73),
        settings_overrides={
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}",
            "recordings_dir": tmp_path / "rec",
            "spool_dir": tmp_path / "spool",
            "twilio_auth_token": SECRET_TWILIO,
            "gemini_api_key": SECRET_GEMINI,
            "api_token": SECRET_API,
        },
    )
    await stack.start()
    try:
        stray = structlog.get_logger("livecall.test")
        for secret in SECRETS:
            stray.warning("stray.secret", detail=f"header was {secret!r}")
            logging.getLogger("livecall.test.stdlib").warning("stdlib stray %s", secret)
    finally:
        await stack.stop()
    logs = logs_buffer.getvalue()
    assert "stray.secret" in logs and "stdlib stray" in logs
    leaked = [
        name for name, s in zip(("twilio", "gemini", "api"), SECRETS, strict=True) if s in logs
    ]
    assert leaked == [], f"not redacted: {leaked}"
