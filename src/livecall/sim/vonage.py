"""A simulated Vonage Voice API edge: one phone caller, faithful to Vonage's side of the wire.

`SimulatedVonageCaller` does what Vonage does for an inbound call to an application whose
answer webhook returns a `connect` NCCO with a `websocket` endpoint: it requests the answer
webhook (GET with `to`, `from`, `uuid`, `conversation_uuid`, `region_url` as query parameters,
or POST with the same as JSON), signed like Vonage's signed webhooks (an HS256 JWT with
`payload_hash`), runs the NCCO (`talk` is recorded, `connect` opens the socket), opens the
WebSocket to the endpoint's `uri`, sends the text `websocket:connected` with the endpoint's
`content-type` and its `headers` at the top level, then one BINARY 20 ms L16 frame every
20 ms on an absolute clock (silence between utterances), and `websocket:dtmf` for key
presses. What the app sends back is played at real time from a queue: binary frames must be
exactly one 20 ms frame; `{"action":"clear"}` empties the queue and is answered with
`websocket:cleared`; `{"action":"notify","payload":{…}}` is echoed as `websocket:notify` once
the audio queued before it has played. Vonage queues at most `max_buffered_frames`. A frame
Vonage would not take is recorded in `protocol_errors` and dropped, never a crash. The caller
hangs up by closing the socket (Vonage has no stop message); when the app closes it, the
NCCO goes on with the actions after `connect` and then ends. When the `connect` action names
an `eventUrl`, the websocket leg's statuses are POSTed there, signed (`answered`, then
`completed` when the caller hangs up, `disconnected` when the app closed the socket, `failed`
when it could not be opened); with `eventType: synchronous` the answer to `disconnected` or
`failed` may be a fallback NCCO, which then runs instead of the rest of the original one.

The script actions and the result's shape are those of `livecall.sim.twilio` (imported), so a
suite written for `SimulatedCaller` can drive this one; `Probe` is not simulated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import numpy as np
import numpy.typing as npt
import orjson
import soxr
import websockets
from websockets.asyncio.client import ClientConnection, connect

from livecall.audio.g711 import ulaw_decode
from livecall.carriers.vonage.answer import MAX_HEADERS_BYTES
from livecall.carriers.vonage.signatures import VonageSignature
from livecall.carriers.vonage.wire import MAX_BUFFERED_FRAMES, SUPPORTED_RATES
from livecall.sim.twilio import (
    HangUp,
    Pause,
    PressDigit,
    Probe,
    Say,
    ScriptAction,
    SendRaw,
    TimedName,
    TimelineEvent,
    Utterance,
    WaitForAgentAudio,
    WaitForAgentSilence,
)

__all__ = ["SimulatedVonageCaller", "VonageCallResult"]

FRAME_MS = 20
_LOUD_THRESHOLD = 300  # |sample| at or above this counts as audible (about -40 dBFS)
_DTMF_DIGITS = frozenset("0123456789*#")
_ALLOWED_ACTION_KEYS = {"clear": frozenset(("action",)), "notify": frozenset(("action", "payload"))}
_F_SPEECH_START = 1
_F_SPEECH_END = 2


@dataclass
class VonageCallResult:
    """Everything one simulated Vonage call sent, heard and measured (loop monotonic seconds)."""

    call_uuid: str
    conversation_uuid: str
    ncco: list[Any] = field(default_factory=list)
    webhook_status: int | None = None
    said: list[str] = field(default_factory=list)  # NCCO `talk` texts
    events_posted: list[str] = field(default_factory=list)  # websocket leg statuses sent
    fallback_ncco: list[Any] | None = None  # what a synchronous event webhook answered
    parameters: dict[str, Any] = field(default_factory=dict)  # the endpoint's headers
    stream_url: str | None = None
    content_type: str | None = None
    sample_rate: int = 16000
    started: float = 0.0
    stream_started: float | None = None
    ended: float = 0.0
    ended_by: Literal["caller", "server"] | None = None
    close_code: int | None = None
    close_reason: str = ""
    frames_sent: int = 0
    frames_dropped: int = 0
    clock_late_ticks: int = 0
    clock_late_max_ms: float = 0.0
    heard: bytes = b""  # the playout timeline, L16 little-endian at sample_rate
    received_media_bytes: int = 0
    marks_received: list[TimedName] = field(default_factory=list)  # notify commands
    marks_echoed: list[TimedName] = field(default_factory=list)  # websocket:notify sent back
    clears: list[float] = field(default_factory=list)
    digits_sent: list[TimedName] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)
    timeline: list[TimelineEvent] = field(default_factory=list)
    utterances: list[Utterance] = field(default_factory=list)
    agent_stretches: list[tuple[float, float]] = field(default_factory=list)

    def heard_pcm(self) -> npt.NDArray[np.int16]:
        return np.frombuffer(self.heard, dtype="<i2").astype(np.int16)

    @property
    def heard_ms(self) -> float:
        return len(self.heard) / 2 / self.sample_rate * 1000.0

    @property
    def response_latencies_ms(self) -> list[float]:
        return [u.response_latency_ms for u in self.utterances if u.response_latency_ms is not None]

    @property
    def barge_in_stop_ms(self) -> list[float]:
        return [u.barge_in_stop_ms for u in self.utterances if u.barge_in_stop_ms is not None]

    @property
    def duration_s(self) -> float:
        return self.ended - self.started


def _clip_pcm(say: Say, rate: int) -> bytes:
    """A Say clip as L16 little-endian bytes at `rate` (resampled once, up front)."""
    if isinstance(say.audio, bytes | bytearray | memoryview):
        pcm = ulaw_decode(bytes(say.audio))  # bytes clips are μ-law, as in sim.twilio
    else:
        pcm = np.asarray(say.audio)
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise TypeError("Say audio must be mono int16 PCM or μ-law bytes")
    if say.rate != rate:
        pcm = soxr.resample(pcm, say.rate, rate)
    return np.ascontiguousarray(pcm, dtype="<i2").tobytes()


def _loud_span(pcm: bytes, fb: int) -> tuple[int, int] | None:
    loud = np.flatnonzero(np.abs(np.frombuffer(pcm, dtype="<i2").astype(np.int32)) >= 300)
    if loud.size == 0:
        return None
    return int(loud[0]) * 2 // fb, int(loud[-1]) * 2 // fb


def _is_loud(frame: bytes) -> bool:
    samples = np.frombuffer(frame, dtype="<i2")
    return int(np.count_nonzero(np.abs(samples.astype(np.int32)) >= _LOUD_THRESHOLD)) >= 4


class SimulatedVonageCaller:
    """One simulated inbound Vonage call to an app that answers with a websocket NCCO."""

    def __init__(
        self,
        base_url: str,
        *,
        signature_secret: str,
        from_: str = "15550001111",
        to: str = "15550002222",
        call_uuid: str | None = None,
        conversation_uuid: str | None = None,
        script: Sequence[ScriptAction] = (),
        answer_path: str = "/vonage/answer",
        answer_method: Literal["GET", "POST"] = "GET",
        sign: bool = True,
        api_key: str = "abcd1234",
        application_id: str | None = None,
        region_url: str = "https://api-us-3.vonage.com",
        drop_frames: Iterable[int] = (),
        jitter_ms: float = 0.0,
        seed: int | None = None,
        timeout: float = 60.0,
        on_script_end: Literal["hangup", "wait"] = "hangup",
        agent_gap_ms: float = 250.0,
        agent_reply_gap_ms: float = 1000.0,
        require_wss: bool = False,
        strict_fields: bool = True,
        max_buffered_frames: int = MAX_BUFFERED_FRAMES,
        notify_after_clear: Literal["drop", "send"] = "drop",
        webhook_timeout: float = 15.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        for action in script:
            if isinstance(action, PressDigit) and action.digit not in _DTMF_DIGITS:
                raise ValueError(f"not a Vonage DTMF digit: {action.digit!r}")
            if isinstance(action, Probe):
                raise ValueError("Probe is not simulated on the Vonage edge")
        self.base_url = base_url.rstrip("/")
        self.answer_url = self.base_url + "/" + answer_path.lstrip("/")
        self.answer_method = answer_method
        self.application_id = application_id or str(uuid.uuid4())
        self._signer = VonageSignature(
            signature_secret, api_key=api_key, application_id=self.application_id
        )
        self.from_ = from_
        self.to = to
        self.call_uuid = call_uuid or str(uuid.uuid4())
        self.conversation_uuid = conversation_uuid or "CON-" + str(uuid.uuid4())
        self.region_url = region_url
        self.script = list(script)
        self.sign = sign
        self.drop_frames = frozenset(drop_frames)
        self.jitter_ms = jitter_ms
        self.timeout = timeout
        self.on_script_end = on_script_end
        self.require_wss = require_wss
        self.strict_fields = strict_fields
        self.max_buffered_frames = max_buffered_frames
        self.notify_after_clear = notify_after_clear
        self.webhook_timeout = webhook_timeout
        self._http = http_client
        self._rng = random.Random(seed)
        self._gap_s = agent_gap_ms / 1000.0
        self._reply_gap_s = agent_reply_gap_ms / 1000.0

        self.result = VonageCallResult(self.call_uuid, self.conversation_uuid)
        self._ran = False
        self._ws: ClientConnection | None = None
        self._after_connect: list[Any] = []
        self._ws_auth: str | None = None  # endpoint authorization {"type":"custom"} value
        self._event_url: str | None = None
        self._sync_events = False
        self._leg_uuid = str(uuid.uuid4())  # the websocket leg's own uuid
        self._client: httpx.AsyncClient | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._ended = False
        self._hangup_action: HangUp | None = None
        self._deadline = float("inf")
        # set when the NCCO names the rate
        self._rate = 16000
        self._fb = 640
        self._silence = bytes(640)
        self._clips: dict[int, bytes] = {}
        # outbound (caller audio)
        self._actions = iter(self.script)
        self._say: tuple[bytes, int, int, int, Utterance] | None = None  # data, i, start, end
        self._say_frame = 0
        self._pause_frames = 0
        self._wait: tuple[WaitForAgentAudio | WaitForAgentSilence, float, float] | None = None
        self._script_done = False
        self._pending: deque[tuple[float, bytes, int, Utterance | None]] = deque()
        self._last_due = 0.0
        self._n = 0
        # playout queue (what Vonage plays to the caller): frames and notify positions
        self._queue: deque[bytes] = deque()
        self._enqueued = 0
        self._played = 0
        self._notifies: deque[tuple[int, Any, str]] = deque()
        self._heard = bytearray()
        # agent stretches and utterances
        self._stretch_open = False
        self._stretch_start = 0.0
        self._last_loud_end: float | None = None
        self._last_speech_end: float | None = None
        self._reply_heard_ms = 0.0
        self._awaiting_response: list[Utterance] = []
        self._awaiting_barge_stop: list[Utterance] = []

    # ------------------------------------------------------------------ entry point

    async def run(self) -> VonageCallResult:
        """Run the whole call (answer webhook, NCCO, stream, script) and return what happened."""
        if self._ran:
            raise RuntimeError("a SimulatedVonageCaller runs one call; make a new one")
        self._ran = True
        loop = asyncio.get_running_loop()
        r = self.result
        r.started = loop.time()
        self._deadline = r.started + self.timeout
        client = self._http or httpx.AsyncClient(timeout=self.webhook_timeout, trust_env=False)
        try:
            async with asyncio.timeout(self.timeout + 15.0):
                await self._run(client)
        except TimeoutError:
            r.script_errors.append(f"call did not finish within {self.timeout:.0f} s")
            r.ended_by = r.ended_by or "caller"
        finally:
            if self._ws is not None and self._ws.close_code is None:
                self._ws.transport.abort()
            if self._http is None:
                await client.aclose()
            r.heard = bytes(self._heard)
            if self._stretch_open and self._last_loud_end is not None:
                r.agent_stretches.append((self._stretch_start, self._last_loud_end))
            r.timeline.sort(key=lambda e: e.t)
            r.ended = loop.time()
        return r

    async def _run(self, client: httpx.AsyncClient) -> None:
        self._client = client
        try:
            if not await self._answer(client):
                return
            if not await self._open_stream():
                await self._leg_event("failed", then=self._after_connect)
                return
            self._leg_event_soon("answered")
            await self._stream()
            if self.result.ended_by == "server":
                await self._leg_event("disconnected", then=self._after_connect)
            else:
                self._leg_event_soon("completed")
        finally:
            if self._bg:
                await asyncio.gather(*self._bg, return_exceptions=True)

    # ------------------------------------------------------------------ leg events (eventUrl)

    def _event_body(self, status: str) -> bytes:
        r = self.result
        return orjson.dumps(
            {
                "from": self.from_,
                "to": r.stream_url,
                "uuid": self._leg_uuid,
                "conversation_uuid": self.conversation_uuid,
                "status": status,
                "direction": "outbound",
                "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                "headers": r.parameters,
            }
        )

    async def _post_event(self, status: str) -> httpx.Response | None:
        """POST one signed event for the websocket leg to the connect action's eventUrl."""
        url = self._event_url
        assert url is not None and self._client is not None
        body = self._event_body(status)
        headers = {"Content-Type": "application/json", "User-Agent": "Vonage-Voice/1.0"}
        if self.sign:
            headers["Authorization"] = self._signer.sign(method="POST", url=url, body=body)
        self.result.events_posted.append(status)
        try:
            return await self._client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            self.result.protocol_errors.append(f"event webhook failed: {type(exc).__name__}")
            return None

    def _leg_event_soon(self, status: str) -> None:
        if self._event_url is None:
            return
        task = asyncio.get_running_loop().create_task(self._post_event(status))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _leg_event(self, status: str, *, then: list[Any]) -> None:
        """A leg ended: with eventType synchronous the event's answer may replace the NCCO."""
        actions = then
        if self._event_url is not None:
            resp = await self._post_event(status)
            if self._sync_events and resp is not None and resp.status_code == 200:
                with contextlib.suppress(orjson.JSONDecodeError):
                    fallback = orjson.loads(resp.content) if resp.content else None
                    if type(fallback) is list:
                        self.result.fallback_ncco = fallback
                        actions = fallback
        self._run_actions(actions)

    # ------------------------------------------------------------------ answer webhook + NCCO

    def _fail(self, text: str) -> bool:
        self.result.protocol_errors.append(text)
        self.result.ended_by = "server"
        return False

    async def _answer(self, client: httpx.AsyncClient) -> bool:
        r = self.result
        fields = {
            "to": self.to,
            "from": self.from_,
            "endpoint_type": "phone",
            "conversation_uuid": self.conversation_uuid,
            "uuid": self.call_uuid,
            "region_url": self.region_url,
        }
        headers = {"User-Agent": "Vonage-Voice/1.0", "Accept": "application/json"}
        try:
            if self.answer_method == "GET":
                url = self.answer_url + "?" + urlencode(fields)
                if self.sign:
                    headers["Authorization"] = self._signer.sign(method="GET", url=url)
                resp = await client.get(url, headers=headers)
            else:
                body = orjson.dumps(fields)
                headers["Content-Type"] = "application/json"
                if self.sign:
                    headers["Authorization"] = self._signer.sign(
                        method="POST", url=self.answer_url, body=body
                    )
                resp = await client.post(self.answer_url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return self._fail(f"answer webhook failed: {type(exc).__name__}")
        r.webhook_status = resp.status_code
        if resp.status_code != 200:
            return self._fail(f"answer webhook returned status {resp.status_code}")
        try:
            ncco = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            return self._fail("answer webhook did not return JSON (an NCCO)")
        if type(ncco) is not list:
            return self._fail("an NCCO must be a JSON array of actions")
        r.ncco = ncco
        for i, action in enumerate(ncco):
            if type(action) is not dict or type(action.get("action")) is not str:
                return self._fail(f"NCCO action {i} is not an object with an 'action'")
            if action["action"] == "connect":
                self._after_connect = ncco[i + 1 :]
                return self._read_connect(action)
            if self._run_action(action):
                return False
        r.ended_by = "server"  # the NCCO ran out: the call ends
        return False

    def _run_actions(self, actions: list[Any]) -> None:
        for action in actions:
            if type(action) is not dict or self._run_action(action):
                return

    def _run_action(self, action: dict[str, Any]) -> bool:
        """Run a non-connect action; True if it ends the call."""
        r = self.result
        now = asyncio.get_running_loop().time()
        kind = action.get("action")
        if kind == "talk":
            text = action.get("text")
            if type(text) is not str or not text:
                r.protocol_errors.append("talk action needs a non-empty text")
                r.ended_by = "server"
                return True
            r.said.append(text)
            r.timeline.append(TimelineEvent(now, "ncco_talk", text))
            return False
        r.script_errors.append(f"NCCO action {str(kind)[:40]!r} is not simulated; the call ends")
        r.ended_by = "server"
        return True

    def _read_connect(self, action: dict[str, Any]) -> bool:
        r = self.result
        endpoints = action.get("endpoint")
        if type(endpoints) is not list or len(endpoints) != 1 or type(endpoints[0]) is not dict:
            return self._fail("connect needs an 'endpoint' array with one endpoint")
        ep = endpoints[0]
        if ep.get("type") != "websocket":
            return self._fail(f"connect endpoint type {str(ep.get('type'))[:30]!r} not simulated")
        uri = ep.get("uri")
        parts = urlsplit(uri) if type(uri) is str else None
        if parts is None or parts.scheme not in ("ws", "wss") or not parts.netloc:
            return self._fail(f"websocket uri must be an absolute ws(s):// URL: {uri!r}")
        if self.require_wss and parts.scheme != "wss":
            return self._fail(f"websocket uri must use wss://: {uri!r}")
        ctype = ep.get("content-type")
        rates = {f"audio/l16;rate={n}": n for n in SUPPORTED_RATES}
        if ctype not in rates:
            return self._fail(f"websocket content-type must be one of {sorted(rates)}: {ctype!r}")
        headers = ep.get("headers", {})
        if type(headers) is not dict:
            return self._fail("websocket headers must be a JSON object")
        if len(orjson.dumps(headers)) > MAX_HEADERS_BYTES:
            return self._fail(f"websocket headers exceed {MAX_HEADERS_BYTES} bytes")
        if self.strict_fields:
            extra = set(ep) - {"type", "uri", "content-type", "headers", "authorization"}
            if extra:
                return self._fail(f"unexpected websocket endpoint fields {sorted(extra)}")
        r.stream_url = uri
        event_url = action.get("eventUrl")
        if event_url is not None:
            if type(event_url) is not list or len(event_url) != 1 or type(event_url[0]) is not str:
                return self._fail("connect eventUrl must be an array with one URL")
            self._event_url = urljoin(self.answer_url, event_url[0])
        self._sync_events = action.get("eventType") == "synchronous"
        r.content_type = ctype
        r.parameters = dict(headers)
        self._rate = rates[ctype]
        r.sample_rate = self._rate
        self._fb = self._rate // 50 * 2
        self._silence = bytes(self._fb)
        self._clips = {id(a): _clip_pcm(a, self._rate) for a in self.script if isinstance(a, Say)}
        auth = ep.get("authorization")
        self._ws_auth = (
            auth.get("value")
            if type(auth) is dict
            and auth.get("type") == "custom"
            and type(auth.get("value")) is str
            else None
        )
        return True

    # ------------------------------------------------------------------ stream

    async def _open_stream(self) -> bool:
        r = self.result
        assert r.stream_url is not None
        extra = {"Authorization": self._ws_auth} if self._ws_auth else {}
        try:
            self._ws = await connect(
                r.stream_url,
                additional_headers=extra,
                user_agent_header="Vonage-Voice-WebSocket/1.0",
                compression=None,
                proxy=None,
                ping_interval=None,
                open_timeout=10,
                close_timeout=2,
                max_size=1 << 20,
            )
        except websockets.InvalidStatus as exc:
            return self._fail(f"websocket handshake refused: status {exc.response.status_code}")
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            return self._fail(f"websocket connection failed: {type(exc).__name__}")
        return True

    async def _stream(self) -> None:
        ws = self._ws
        assert ws is not None
        r = self.result
        loop = asyncio.get_running_loop()
        reader: asyncio.Task[None] | None = None
        try:
            hello = {"event": "websocket:connected", "content-type": r.content_type}
            hello.update(r.parameters)
            await ws.send(orjson.dumps(hello).decode())
            r.stream_started = loop.time()
            reader = loop.create_task(self._reader())
            await self._clock(r.stream_started)
        except websockets.ConnectionClosed:
            self._server_ended()
        finally:
            if reader is not None:
                if r.ended_by == "caller":
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(reader), 2.5)
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            r.close_code = ws.close_code
            r.close_reason = ws.close_reason or ""

    def _server_ended(self) -> None:
        if not self._ended:
            self._ended = True
            self.result.ended_by = "server"
            now = asyncio.get_running_loop().time()
            self.result.timeline.append(TimelineEvent(now, "server_closed"))

    async def _clock(self, t0: float) -> None:
        """Every 20 ms on an absolute clock: play one queued frame, send one caller frame."""
        loop = asyncio.get_running_loop()
        frame_s = FRAME_MS / 1000.0
        n = 0
        while not self._ended:
            delay = t0 + n * frame_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                if self._ended:
                    break
            now = loop.time()
            late = now - (t0 + n * frame_s)
            if late > 0.010:
                self.result.clock_late_ticks += 1
                self.result.clock_late_max_ms = max(self.result.clock_late_max_ms, late * 1000)
            n += 1
            await self._playout(now)
            if now >= self._deadline:
                self.result.script_errors.append(f"call reached its {self.timeout:.0f} s timeout")
                await self._hang_up(HangUp(), now)
                return
            step = await self._script_step(now)
            if self._ended:
                return
            if step is None:
                await self._hang_up(self._hangup_action or HangUp(), now)
                return
            frame, flags, utt = step
            self._n += 1
            if self._n in self.drop_frames:
                self.result.frames_dropped += 1
                if flags:
                    self._frame_sent(now, flags, utt)
                continue
            due = now
            if self.jitter_ms:
                due = max(self._last_due, now + self._rng.uniform(0, self.jitter_ms) / 1000)
                self._last_due = due
            self._pending.append((due, frame, flags, utt))
            await self._flush(now)

    async def _flush(self, now: float, *, everything: bool = False) -> None:
        ws = self._ws
        assert ws is not None
        while self._pending and (everything or self._pending[0][0] <= now):
            _, frame, flags, utt = self._pending.popleft()
            await ws.send(frame)
            self.result.frames_sent += 1
            if flags:
                self._frame_sent(asyncio.get_running_loop().time(), flags, utt)

    def _frame_sent(self, t: float, flags: int, utt: Utterance | None) -> None:
        r = self.result
        if utt is None:
            return
        if flags & _F_SPEECH_START:
            utt.start = t
            r.timeline.append(TimelineEvent(t, "utterance_start", utt.label))
            if self._stretch_open:
                utt.barged_in = True
                self._awaiting_barge_stop.append(utt)
        if flags & _F_SPEECH_END:
            utt.end = t
            self._last_speech_end = t
            self._awaiting_response.append(utt)
            r.timeline.append(TimelineEvent(t, "utterance_end", utt.label))

    async def _script_step(self, now: float) -> tuple[bytes, int, Utterance | None] | None:
        """The frame to send this tick (running instant actions first); None = hang up."""
        fb = self._fb
        while True:
            if self._say is not None:
                data, nframes, start, end, utt = self._say
                i = self._say_frame
                self._say_frame += 1
                frame = data[i * fb : (i + 1) * fb]
                if len(frame) < fb:
                    frame += self._silence[len(frame) :]
                flags = (_F_SPEECH_START if i == start else 0) | (_F_SPEECH_END if i == end else 0)
                if self._say_frame >= nframes:
                    self._say = None
                return frame, flags, utt
            if self._pause_frames > 0:
                self._pause_frames -= 1
                return self._silence, 0, None
            if self._wait is not None:
                waiting, deadline, since = self._wait
                if self._wait_satisfied(waiting, since, now):
                    self._wait = None
                    continue
                if now >= deadline:
                    self._wait = None
                    name = type(waiting).__name__
                    self.result.script_errors.append(
                        f"{name} timed out after {waiting.timeout:g} s"
                    )
                    continue
                return self._silence, 0, None
            if self._script_done:
                return None if self.on_script_end == "hangup" else (self._silence, 0, None)
            action = next(self._actions, None)
            if action is None:
                self._script_done = True
                continue
            if isinstance(action, Say):
                utt = Utterance(action.label)
                self.result.utterances.append(utt)
                data = self._clips[id(action)]
                nframes = max(1, -(-len(data) // fb))
                span = _loud_span(data, fb) or (0, nframes - 1)
                self._say = (data, nframes, span[0], span[1], utt)
                self._say_frame = 0
            elif isinstance(action, Pause):
                self._pause_frames = max(0, round(action.ms / FRAME_MS))
            elif isinstance(action, WaitForAgentAudio | WaitForAgentSilence):
                ref = self._last_speech_end
                if ref is None:
                    ref = self.result.stream_started or now
                self._wait = (action, now + action.timeout, ref)
            elif isinstance(action, PressDigit):
                msg = {"event": "websocket:dtmf", "digit": action.digit, "duration": 260}
                await self._send_now(orjson.dumps(msg).decode())
                self.result.digits_sent.append(TimedName(action.digit, now))
                self.result.timeline.append(TimelineEvent(now, "dtmf", action.digit))
            elif isinstance(action, SendRaw):
                await self._send_now(action.data)
                self.result.timeline.append(TimelineEvent(now, "raw_sent"))
            elif isinstance(action, HangUp):
                self._hangup_action = action
                return None
            else:
                raise TypeError(f"unknown script action {action!r}")

    async def _send_now(self, data: str | bytes) -> None:
        await self._flush(0.0, everything=True)
        assert self._ws is not None
        await self._ws.send(data)

    def _wait_satisfied(
        self, action: WaitForAgentAudio | WaitForAgentSilence, ref: float, now: float
    ) -> bool:
        if isinstance(action, WaitForAgentAudio):
            return self._stretch_open and self._reply_heard_ms >= action.min_heard_ms
        last = self._last_loud_end
        return last is not None and last > ref and now - last >= action.silence_ms / 1000

    async def _hang_up(self, action: HangUp, now: float) -> None:
        """The caller hangs up: Vonage closes the socket (it sends no stop message)."""
        ws = self._ws
        assert ws is not None
        self._ended = True
        self.result.ended_by = "caller"
        self.result.timeline.append(TimelineEvent(now, "hangup"))
        try:
            await self._flush(now, everything=True)
            if action.abrupt:
                ws.transport.abort()
                return
            await ws.close(1000)
        except websockets.ConnectionClosed:
            pass

    # ------------------------------------------------------------------ playout

    async def _playout(self, now: float) -> None:
        """Play one frame from Vonage's queue; echo the notifies that are now due."""
        await self._echo_due(now)
        if self._queue:
            frame = self._queue.popleft()
            self._played += 1
            self._heard += frame
            loud = _is_loud(frame)
        else:
            self._heard += self._silence
            loud = False
        self._agent_audio(now, loud)
        await self._echo_due(now)

    async def _echo_due(self, now: float) -> None:
        while self._notifies and self._notifies[0][0] <= self._played:
            _, payload, name = self._notifies.popleft()
            await self._send_notify(payload, name, now)

    async def _send_notify(self, payload: Any, name: str, now: float) -> None:
        assert self._ws is not None
        await self._ws.send(
            orjson.dumps({"event": "websocket:notify", "payload": payload}).decode()
        )
        self.result.marks_echoed.append(TimedName(name, now))
        self.result.timeline.append(TimelineEvent(now, "notify_echoed", name))

    def _agent_audio(self, now: float, loud: bool) -> None:
        r = self.result
        if loud:
            if not self._stretch_open:
                self._stretch_open = True
                self._stretch_start = now
                r.timeline.append(TimelineEvent(now, "agent_audio_start"))
            if self._last_loud_end is None or now - self._last_loud_end >= self._reply_gap_s:
                self._reply_heard_ms = 0.0
            self._reply_heard_ms += FRAME_MS
            self._last_loud_end = now + FRAME_MS / 1000.0
            for utt in self._awaiting_response:
                if utt.end is not None and utt.end <= now:
                    utt.response_latency_ms = (now - utt.end) * 1000.0
            self._awaiting_response = [
                u for u in self._awaiting_response if u.response_latency_ms is None
            ]
        elif self._stretch_open:
            last = self._last_loud_end
            assert last is not None
            if now - last >= self._gap_s:
                self._stretch_open = False
                r.agent_stretches.append((self._stretch_start, last))
                r.timeline.append(TimelineEvent(last, "agent_audio_stop"))
                for utt in self._awaiting_barge_stop:
                    assert utt.start is not None
                    utt.barge_in_stop_ms = max(0.0, last - utt.start) * 1000.0
                self._awaiting_barge_stop.clear()

    # ------------------------------------------------------------------ reader

    async def _reader(self) -> None:
        ws = self._ws
        assert ws is not None
        loop = asyncio.get_running_loop()
        try:
            async for data in ws:
                if self._ended:
                    continue
                try:
                    await self._on_message(data, loop.time())
                except websockets.ConnectionClosed:
                    raise
                except Exception as exc:  # the simulator records, never crashes
                    self._error(f"simulator could not handle a message: {exc!r}")
        except websockets.ConnectionClosed:
            pass
        self._server_ended()

    def _error(self, text: str) -> None:
        r = self.result
        r.protocol_errors.append(text)
        r.timeline.append(TimelineEvent(asyncio.get_running_loop().time(), "protocol_error", text))

    async def _on_message(self, data: str | bytes, now: float) -> None:
        if isinstance(data, bytes):
            if len(data) != self._fb:
                self._error(
                    f"audio message of {len(data)} bytes dropped: must be one 20 ms frame "
                    f"({self._fb} bytes at {self._rate} Hz)"
                )
                return
            if len(self._queue) >= self.max_buffered_frames:
                self._error(f"audio dropped: more than {self.max_buffered_frames} frames queued")
                return
            self._queue.append(data)
            self._enqueued += 1
            self.result.received_media_bytes += len(data)
            return
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._error("text message is not valid JSON")
            return
        if type(msg) is not dict:
            self._error("text message is not a JSON object")
            return
        action = msg.get("action")
        allowed = _ALLOWED_ACTION_KEYS.get(action) if type(action) is str else None
        if allowed is None:
            self._error(f"unsupported action {str(action)[:40]!r}")
            return
        if self.strict_fields and not allowed.issuperset(msg):
            self._error(f"unexpected fields {sorted(set(msg) - allowed)} in {action}")
            return
        if action == "clear":
            self.result.clears.append(now)
            self.result.timeline.append(TimelineEvent(now, "clear"))
            self._queue.clear()
            self._enqueued = self._played
            dropped = list(self._notifies)
            self._notifies.clear()
            assert self._ws is not None
            await self._ws.send('{"event":"websocket:cleared"}')
            if self.notify_after_clear == "send":
                for _, payload, name in dropped:
                    await self._send_notify(payload, name, now)
            return
        payload = msg.get("payload")
        if type(payload) is not dict:
            self._error("notify needs a 'payload' object")
            return
        given = payload.get("name")
        label = given if isinstance(given, str) else orjson.dumps(payload).decode()[:40]
        self.result.marks_received.append(TimedName(label, now))
        self._notifies.append((self._enqueued, payload, label))
