"""The caller's side of a call misbehaving: what Twilio really does, and what a slow edge does.

A stream that ends without `stop`, a second stream for a call already in progress, frames
missing from the numbering, a Twilio edge that stops reading what livecall sends, a call
that reaches its maximum duration, and more calls than the server takes. Each through the
real server, the real SDK against the simulated Gemini Live, and a simulated Twilio edge
(`SimulatedCaller`, or `RawTwilioSocket` where the edge has to misbehave at the socket level).
"""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from livecall.audio.g711 import ulaw_encode
from livecall.records import CallEventRecord, CallInfo, CallSummary, TurnRecord
from livecall.sim.clips import AGENT_CLIPS, CALLER_CLIPS, load_clip
from livecall.sim.gemini import Scenario
from livecall.sim.stack import TEST_AUTH_TOKEN, LocalStack
from livecall.sim.twilio import HangUp, Pause, Say, WaitForAgentAudio, WaitForAgentSilence
from livecall.telephony.twilio import TwilioSignature

FAST = {"vad_silence_duration_ms": 300}
RATE = 8000


def model(seed: int, **kw: Any) -> Scenario:
    """A quick fake model without greeting or hiccups (as in test_call_e2e)."""
    kw.setdefault("first_audio_delay", 0.2)
    return Scenario(seed=seed, greeting=None, pause_prob=0.0, **kw)


def say(name: str, seconds: float | None = None) -> Say:
    pcm, rate = load_clip(name)
    if seconds is not None:
        pcm = pcm[: int(rate * seconds)]
    return Say(pcm, rate=rate, label=name)


def rss_mb() -> float:
    """This process's resident memory (the server, both simulators and the test share it)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Summaries:
    """An observer factory that keeps every bridge's records, one list per stream."""

    def __init__(self) -> None:
        self.ended: list[CallSummary] = []
        self.events: list[list[CallEventRecord]] = []

    def __call__(self, call_sid: str) -> Any:
        outer = self
        events: list[CallEventRecord] = []
        self.events.append(events)

        class Observer:
            def call_started(self, info: CallInfo) -> None:
                return None

            def turn(self, turn: TurnRecord) -> None:
                return None

            def event(self, event: CallEventRecord) -> None:
                events.append(event)

            def call_ended(self, summary: CallSummary) -> None:
                outer.ended.append(summary)

        return Observer()


# --------------------------------------------------------------------------- a raw edge


class RawTwilioSocket:
    """The stream socket driven by hand: websockets' sans-I/O protocol over a plain TCP stream.

    It writes exactly what it is told and reads only when asked, so it can play a Twilio edge
    that stops reading. `rcvbuf`/`sndbuf` set the kernel's socket buffers (on loopback they
    otherwise autotune to tens of MB, and filling them would take most of a test's time).
    """

    def __init__(
        self, stack: LocalStack, *, rcvbuf: int | None = None, sndbuf: int | None = None
    ) -> None:
        self.url = stack.base_url.replace("http://", "ws://") + "/ws/twilio"
        self.signature = TwilioSignature(TEST_AUTH_TOKEN).sign(self.url)
        self.rcvbuf = rcvbuf
        self.sndbuf = sndbuf
        self.stream_sid = "MZ" + "5" * 32
        self.stack = stack
        self.seq = 0
        self.messages: list[dict[str, Any]] = []
        self.closed = False

    async def open(self) -> None:
        uri = parse_uri(self.url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        if self.sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (uri.host, uri.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=16384)
        self.protocol = ClientProtocol(uri, max_size=None)
        request = self.protocol.connect()
        request.headers["X-Twilio-Signature"] = self.signature
        self.protocol.send_request(request)
        self._flush()
        async with asyncio.timeout(10):
            while not any(isinstance(e, Response) for e in await self._read()):
                pass
        assert self.protocol.handshake_exc is None, self.protocol.handshake_exc

    def _flush(self) -> None:
        self.writer.write(b"".join(self.protocol.data_to_send()))

    async def _read(self) -> list[Any]:
        data = await self.reader.read(65536)
        if not data:
            self.protocol.receive_eof()
            self.closed = True
        else:
            self.protocol.receive_data(data)
        events = self.protocol.events_received()
        for event in events:
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self.messages.append(orjson.loads(event.data))
            elif isinstance(event, Frame) and event.opcode is Opcode.CLOSE:
                self.closed = True
        self._flush()  # pongs, close replies
        return events

    async def read_some(self) -> None:
        """Read once from the socket (whatever the kernel holds, up to 64 KiB)."""
        await self._read()

    def send(self, message: str | dict[str, Any]) -> None:
        text = message if isinstance(message, str) else orjson.dumps(message).decode()
        self.protocol.send_text(text.encode())
        self._flush()

    async def drain(self) -> None:
        await self.writer.drain()

    def start(self, call_sid: str) -> None:
        self.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        self.seq = 1
        self.send(
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": self.stream_sid,
                "start": {
                    "accountSid": "AC" + "6" * 32,
                    "streamSid": self.stream_sid,
                    "callSid": call_sid,
                    "tracks": ["inbound"],
                    "customParameters": {
                        "lc_token": self.stack.stream_token(call_sid, "AC" + "6" * 32)
                    },
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )

    def media(self, chunk: int, payload_b64: str, ms_per_chunk: int) -> None:
        self.seq += 1
        self.send(
            f'{{"event":"media","sequenceNumber":"{self.seq}","streamSid":"{self.stream_sid}",'
            f'"media":{{"track":"inbound","chunk":"{chunk}",'
            f'"timestamp":"{(chunk - 1) * ms_per_chunk}","payload":"{payload_b64}"}}}}'
        )

    def stop(self) -> None:
        self.seq += 1
        self.send(
            {
                "event": "stop",
                "sequenceNumber": str(self.seq),
                "streamSid": self.stream_sid,
                "stop": {},
            }
        )

    def abort(self) -> None:
        self.writer.transport.abort()


# --------------------------------------------------------------------------- socket closed


CLOSES: dict[str, list[Any]] = {
    # the socket closes cleanly but without `stop`, while the caller is still talking
    "close-without-stop-mid-utterance": [say("book", seconds=1.5), HangUp(send_stop=False)],
    # the TCP connection just drops, while the line is quiet and the agent has nothing to say
    "tcp-drop-in-silence": [
        say("yes"),
        WaitForAgentSilence(silence_ms=400, timeout=10),
        Pause(400),
        HangUp(abrupt=True),
    ],
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", list(CLOSES))
async def test_socket_closed_without_stop_ends_the_call(
    make_stack, call_over, leftover_tasks, how
) -> None:
    stack = await make_stack(model(31, replies={"yes": "one_moment"}), **FAST)
    result = await stack.caller([Pause(200), *CLOSES[how]], seed=31).run()
    assert result.ended_by == "caller" and result.script_errors == []
    hangup = next(e.t for e in result.timeline if e.kind == "hangup")
    await call_over(stack)

    [session] = stack.gemini.sessions
    assert session.closed and session.closed_by == "client"
    assert session.closed_at is not None and session.closed_at - hangup < 3.0
    assert stack.registry.active == {} and stack.registry.load == 0
    assert leftover_tasks(result.call_sid) == []
    call = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
    assert call is not None
    assert (call.status, call.end_reason) == ("completed", "caller_closed")
    assert call.frames_in == result.frames_sent


# --------------------------------------------------------------------------- a second stream


@pytest.mark.timeout(40)
async def test_a_second_stream_for_the_same_call_replaces_the_first(
    make_stack, call_over, leftover_tasks, audio
) -> None:
    """Twilio has been seen to open a second socket for a call in progress: the newer one is
    the live one. The old stream is ended (`replaced_by_new_stream`) and closed by livecall,
    its Gemini session closed; the new stream gets a session of its own and is answered;
    the call's record holds what was said on both."""
    summaries = Summaries()
    scenario = model(33, replies={"yes": "one_moment", "hours": "hours_reply"})
    stack = await make_stack(scenario, observer_factory=summaries, **FAST)
    call_sid = "CA" + "7" * 32
    first = stack.caller(
        [Pause(200), say("yes"), WaitForAgentSilence(silence_ms=400, timeout=10), Pause(30_000)],
        call_sid=call_sid,
        seed=33,
        timeout=30,
    )
    first_run = asyncio.create_task(first.run())
    gemini = stack.gemini
    await gemini.wait_for(lambda: any(t.completed for s in gemini.sessions for t in s.turns), 15)

    second = stack.caller(
        [Pause(200), say("hours"), WaitForAgentSilence(silence_ms=500, timeout=15), HangUp()],
        call_sid=call_sid,
        seed=34,
    )
    second_result = await second.run()
    first_result = await first_run
    await call_over(stack)

    # the first stream was ended by livecall, cleanly, when the second one started
    assert first_result.ended_by == "server", first_result.timeline[-5:]
    assert first_result.close_code == 1000
    assert first_result.protocol_errors == []
    assert first_result.stream_sid != second_result.stream_sid
    # the second one is the call now, and it works
    assert second_result.protocol_errors == [] and second_result.script_errors == []
    assert second_result.ended_by == "caller"
    assert len(second_result.response_latencies_ms) == 1
    assert audio.heard_share(second_result.heard_pcm(), "hours_reply") > 0.9

    old, new = gemini.sessions
    assert old.closed_by == "client" and new.closed_by == "client"
    assert old.closed_at is not None and new.setup_completed
    assert [t.caller_clip for t in new.turns] == ["hours"]
    assert [s.end_reason for s in summaries.ended] == ["replaced_by_new_stream", "caller_stop"]
    assert stack.registry.active == {} and stack.registry.load == 0
    assert leftover_tasks(call_sid) == []

    # one record for the call, ended by the caller on the second stream, and the transcript
    # of both streams in it
    call = await stack.app.state.livecall.store.repo.get_call(call_sid)
    assert call is not None
    assert (call.status, call.end_reason) == ("completed", "caller_stop")
    said = [t.text for t in call.turns]
    assert CALLER_CLIPS["yes"].text in said and CALLER_CLIPS["hours"].text in said, said
    assert AGENT_CLIPS["one_moment"].text in said and AGENT_CLIPS["hours_reply"].text in said
    # and the events of both streams (each stream's bridge started a Gemini session)
    started = [e for e in call.events if e.kind == "session_started"]
    assert len(started) == 2, [(e.seq, e.kind) for e in call.events]


# --------------------------------------------------------------------------- gaps


@pytest.mark.timeout(30)
async def test_gaps_in_chunk_and_timestamp_are_counted_and_the_call_goes_on(
    make_stack, call_over, audio
) -> None:
    """Frames lost before Twilio (chunk and timestamp skip) are no protocol error: the call
    goes on, the model still understands the caller, the gaps are counted in the record."""
    stack = await make_stack(model(35, replies={"hours": "hours_reply"}), **FAST)
    # 20 ms frames: 5-9 in the opening pause, 25 and 40-41 in the caller's question,
    # 150-154 after it
    dropped = {5, 6, 7, 8, 9, 25, 40, 41, 150, 151, 152, 153, 154}
    caller = stack.caller(
        [Pause(300), say("hours"), WaitForAgentSilence(silence_ms=500, timeout=15), HangUp()],
        seed=35,
        drop_frames=dropped,
    )
    result = await caller.run()
    await call_over(stack)

    assert result.frames_dropped == len(dropped)
    assert result.protocol_errors == [] and result.script_errors == []
    assert len(result.response_latencies_ms) == 1
    assert audio.heard_share(result.heard_pcm(), "hours_reply") > 0.9
    [session] = stack.gemini.sessions
    assert [t.caller_clip for t in session.turns] == ["hours"]
    call = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
    assert call is not None
    assert (call.status, call.end_reason) == ("completed", "caller_stop")
    assert call.frames_missing == len(dropped)
    assert call.frames_in == result.frames_sent


# --------------------------------------------------------------------------- a slow edge

FLOOD_FRAME_MS = 250  # media frames of 250 ms: the edge talks far faster than real time


def _loud_payload(ms: int) -> str:
    noise = np.random.default_rng(7).standard_normal(RATE * ms // 1000) * 6000
    return base64.b64encode(ulaw_encode(noise.astype(np.int16)).tobytes()).decode()


def _server_socket(stack: LocalStack) -> WebSocketsSansIOProtocol:
    """The server's end of the (only) stream socket, as uvicorn holds it."""
    server = stack._server
    assert server is not None
    [conn] = [c for c in server.server_state.connections if isinstance(c, WebSocketsSansIOProtocol)]
    return conn


async def _steady(value: Callable[[], int], quiet_s: float, timeout: float) -> int:  # noqa: ASYNC109
    """`value()` once it has not changed for `quiet_s` (a measurement window, not a wait
    for an event: a plateau is only seen by watching it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, since = value(), loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(0.05)
        now = value()
        if now != last:
            last, since = now, loop.time()
        elif loop.time() - since >= quiet_s:
            return now
    raise TimeoutError(f"still changing after {timeout} s (last {last})")


async def _flooded_call(
    stack: LocalStack, call_sid: str
) -> tuple[RawTwilioSocket, Any, WebSocketsSansIOProtocol, int]:
    """A call whose edge writes caller audio as fast as the socket takes it and reads nothing,
    until it is pushed back: (edge, bridge, the server's socket, frames the edge wrote).

    The stack's fake model echoes every caller frame as agent audio, so the agent has far
    more to say than the edge takes. Socket buffers are kept small on both ends (on loopback
    they would autotune to tens of MB, and filling them would take most of the test)."""
    edge = RawTwilioSocket(stack, rcvbuf=128 * 1024, sndbuf=64 * 1024)
    await edge.open()
    server_ws = _server_socket(stack)
    server_ws.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024
    )
    edge.start(call_sid)
    gemini = stack.gemini
    await gemini.wait_for(lambda: gemini.sessions and gemini.sessions[0].setup_completed, 10)
    bridge = stack.registry.active[call_sid].bridge
    payload = _loud_payload(FLOOD_FRAME_MS)
    pushed = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        pushed += 1
        edge.media(pushed, payload, FLOOD_FRAME_MS)
        try:
            await asyncio.wait_for(edge.drain(), 1.0)
        except TimeoutError:
            return edge, bridge, server_ws, pushed
    pytest.fail(f"the edge was never pushed back ({pushed} frames of {FLOOD_FRAME_MS} ms sent)")


@pytest.mark.timeout(45)
async def test_a_twilio_edge_that_stops_reading_is_pushed_back_not_buffered(
    make_stack, call_over, leftover_tasks
) -> None:
    """Agent audio for an edge that does not read waits in bounded buffers, not in memory.

    livecall must not queue what it cannot send: once the kernel's socket buffers and the
    transport's 64 KiB are full, its sends wait, so the agent audio in flight stops growing,
    the process's memory stays flat, and the push-back reaches the edge itself (it can no
    longer write). Then the edge reads again, slowly: the call picks up where it was.
    """
    stack = await make_stack(Scenario(mode="echo", greeting=None, seed=37), **FAST)
    call_sid = "CA" + "8" * 32
    edge, bridge, server_ws, pushed = await _flooded_call(stack, call_sid)

    # Held: agent audio livecall has sent that the edge has not read (it read nothing).
    sent_out = await _steady(lambda: bridge.frames_out, quiet_s=1.0, timeout=10)
    rss_before = rss_mb()
    await _steady(lambda: bridge.frames_out + bridge.frames_in, quiet_s=1.0, timeout=10)
    grew_mb = rss_mb() - rss_before
    held_bytes = sent_out * (FLOOD_FRAME_MS * RATE // 1000)
    buffered = server_ws.transport.get_write_buffer_size()
    assert not server_ws.writable.is_set()  # uvicorn's sends are waiting: the push-back
    assert buffered <= 64 * 1024 + 16 * 1024, buffered  # the transport's high-water mark + 1
    # kernel buffers: ~256 KiB at the edge, ~128 KiB at the server, plus the transport's
    assert held_bytes < 2 * 1024 * 1024, (sent_out, held_bytes)
    assert grew_mb < 10, grew_mb
    assert pushed * FLOOD_FRAME_MS / 1000 > 60  # the edge did try to send far more than that

    # the edge reads again, slowly (a 64 KiB read every 20 ms): agent audio flows again
    received_before = len(edge.messages)
    async with asyncio.timeout(15):
        while bridge.frames_out < sent_out + 20:
            await edge.read_some()
            await asyncio.sleep(0.02)
    assert len(edge.messages) > received_before
    media = [m for m in edge.messages if m.get("event") == "media"]
    assert media and all(m["streamSid"] == edge.stream_sid for m in media)

    edge.stop()
    async with asyncio.timeout(20):  # the backlog the edge pushed is worked off first
        while not edge.closed:
            await edge.read_some()
    await call_over(stack, timeout=20)
    call = await stack.app.state.livecall.store.repo.get_call(call_sid)
    assert call is not None and call.end_reason == "caller_stop"
    assert leftover_tasks(call_sid) == []


@pytest.mark.timeout(45)
async def test_the_caller_is_let_go_at_once_even_when_gemini_is_slow_to_close(
    make_stack, call_over, leftover_tasks
) -> None:
    """When a call ends, the caller's stream is closed at once, whatever Gemini does.

    Here the model is still pushing audio at the moment the call ends (the flooded call of
    the test above), so its side of the WebSocket closing handshake comes late: a Gemini
    connection that does not answer a close (a hung backend, a network partition) looks the
    same. The caller must not wait for it: Twilio's stream, the call's record and its place
    in the registry are let go within a moment of the end, not after the SDK socket's
    close timeout (10 s).
    """
    stack = await make_stack(Scenario(mode="echo", greeting=None, seed=38), **FAST)
    call_sid = "CA" + "9" * 32
    edge, bridge, _, _ = await _flooded_call(stack, call_sid)
    edge.stop()
    loop = asyncio.get_running_loop()
    ended_at = None
    async with asyncio.timeout(30):
        while not edge.closed:  # read everything, so the stop gets through the backlog
            await edge.read_some()
            if ended_at is None and bridge.end_reason is not None:
                ended_at = loop.time()
    closed_at = loop.time()
    assert bridge.end_reason == "caller_stop"
    assert ended_at is not None
    assert closed_at - ended_at < 3.0, (
        f"the caller's stream was closed {closed_at - ended_at:.1f} s after the call ended"
    )
    await call_over(stack, timeout=20)
    assert leftover_tasks(call_sid) == []


# --------------------------------------------------------------------------- max duration


@pytest.mark.timeout(40)
async def test_the_maximum_call_duration_ends_the_call_with_a_goodbye(
    make_stack, call_over, leftover_tasks, audio
) -> None:
    """MAX_CALL_DURATION reached: the agent says goodbye (a client turn to the model), the
    caller hears it, then livecall closes the stream; the record says `max_duration`."""
    scenario = model(39, replies={"yes": "one_moment"}, default_text_reply="goodbye")
    stack = await make_stack(scenario, max_call_duration_s=4.0, **FAST)
    caller = stack.caller(
        [Pause(200), say("yes"), WaitForAgentSilence(silence_ms=400, timeout=10)],
        seed=39,
        on_script_end="wait",  # the caller would stay on the line for ever
        timeout=30,
    )
    result = await caller.run()
    await call_over(stack)

    assert result.ended_by == "server" and result.close_code == 1000
    assert result.protocol_errors == [] and result.script_errors == []
    assert 4.0 <= result.duration_s < 4.0 + 10.0, result.duration_s
    call = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
    assert call is not None
    assert (call.status, call.end_reason) == ("completed", "max_duration")
    assert stack.registry.active == {} and leftover_tasks(result.call_sid) == []

    [session] = stack.gemini.sessions
    goodbye_asked = [c for c in session.client_contents if "goodbye" in str(c).lower()]
    assert goodbye_asked, session.client_contents  # the lead's goodbye: asked of the model
    # ... and heard, all of it, before the stream closed
    heard = result.heard_pcm()
    assert audio.heard_share(heard, "goodbye") > 0.9
    _, end = audio.span_of(heard, "goodbye")
    closed_at = audio.at(result, next(e.t for e in result.timeline if e.kind == "server_closed"))
    assert end <= closed_at + 2 * 160, (end, closed_at)


# --------------------------------------------------------------------------- admission


@pytest.mark.timeout(40)
async def test_over_the_call_limit_the_webhook_says_busy_and_opens_no_session(
    make_stack, call_over, leftover_tasks
) -> None:
    """MAX_CONCURRENT_CALLS=2: a third call hears the polite busy answer (`<Say>` then
    `<Hangup/>`, or `<Reject reason="busy"/>` when configured), no stream and no Gemini
    session is opened for it; once a place is free, the next call gets in."""
    stack = await make_stack(model(41, replies={"yes": "one_moment"}), max_concurrent_calls=2)
    gemini = stack.gemini
    holding = [
        asyncio.create_task(
            stack.caller([Pause(200), say("yes"), Pause(60_000)], seed=41 + i, timeout=30).run()
        )
        for i in range(2)
    ]
    await gemini.wait_for(lambda: sum(s.setup_completed for s in gemini.sessions) == 2, 15)

    third = await stack.caller([Pause(200), say("yes"), HangUp()], seed=43).run()
    assert third.webhook_status == 200
    assert third.said and "busy" in third.said[0].lower(), third.twiml
    assert "<Hangup" in third.twiml and third.stream_url is None and third.stream_sid is None
    assert third.ended_by == "server" and not third.rejected

    state = stack.app.state.livecall
    # the other form: refuse before answering (no <Say>, no billing)
    state.settings.busy_answer = "reject"
    fourth = await stack.caller([Pause(100), HangUp()], seed=44).run()
    assert fourth.rejected and fourth.reject_reason == "busy" and fourth.stream_url is None

    assert len(gemini.sessions) == 2  # nothing was opened for the calls turned away
    assert len(stack.registry.active) == 2

    # the two calls end; the next one is let in
    for call in list(stack.registry.active.values()):
        call.bridge.end("test_done")
    await asyncio.gather(*holding)
    await call_over(stack)
    state.settings.busy_answer = "say"
    fifth = await stack.caller(
        [Pause(200), say("yes"), WaitForAgentAudio(min_heard_ms=300), HangUp()], seed=45
    ).run()
    assert fifth.stream_sid is not None and len(fifth.response_latencies_ms) == 1
    await call_over(stack)
    assert len(gemini.sessions) == 3
    assert stack.registry.load == 0
    for result in (third, fourth, fifth):
        assert leftover_tasks(result.call_sid) == []


async def test_the_gemini_session_quota_is_an_admission_limit_too(make_stack) -> None:
    """MAX_GEMINI_SESSIONS=1: a second call while one session is open gets the busy answer;
    BUSY_ANSWER=reject answers with a <Reject reason="busy"/>."""
    stack = await make_stack(
        Scenario(seed=11, replies={"hours": "hours_reply"}),
        max_gemini_sessions=1,
        busy_answer="reject",
    )
    hours, rate = load_clip("hours")
    first = asyncio.create_task(
        stack.caller([Pause(200), Say(hours, rate=rate), Pause(3000), HangUp()], seed=11).run()
    )
    await stack.gemini.wait_for(lambda: stack.gemini.active_sessions, timeout=20)
    second = await stack.caller([Pause(100), HangUp()], seed=12).run()
    assert second.rejected and "busy" in second.twiml
    assert len(stack.gemini.sessions) == 1
    result = await first
    assert len(result.response_latencies_ms) == 1
