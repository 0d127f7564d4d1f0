"""A simulated Vonage Voice API edge: one phone caller, faithful to Vonage's side of the wire.

`SimulatedVonageCaller` does what Vonage does for an inbound call to an application whose
answer webhook returns a `connect` NCCO with a `websocket` endpoint: it requests the answer
webhook (GET with `to`, `from`, `uuid`, `conversation_uuid`, `region_url` as query parameters,
or POST with the same as JSON), signed like Vonage's signed webhooks (an HS256 JWT with
`payload_hash`), runs the NCCO (`talk` is recorded, `connect` opens the socket), opens the
WebSocket to the endpoint's `uri` (with the `Authorization` its `authorization` asks for:
type "vonage", a freshly signed JWT like the webhooks'; "custom", its value; a malformed
one fails the call), sends the text `websocket:connected` with the endpoint's
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
`completed` when the caller hangs up or a REST hang-up or transfer took the call off the
stream (`end_from_carrier`), `disconnected` when the app closed the socket, `failed` when it
could not be opened); with `eventType: synchronous` the answer to `disconnected` or `failed`
may be a fallback NCCO, which then runs instead of the rest of the original one. An event
webhook answering other than 2xx is a protocol error (Vonage would retry it).

The script, clock, playout and measurements are `livecall.sim.edge.SimulatedEdge`'s (same
actions, `Probe` included; a `CallResult`): this module holds only Vonage's side of the wire
(answer webhook and NCCO, leg events, binary L16 frames, notify and clear). As on a phone
line, the caller's side is μ-law 8 kHz inside: its audio is brought to L16 at the stream's
rate on the way out, and `heard` is the agent's audio brought back to μ-law 8 kHz, so
`heard_pcm()` and the suite's audio checks work as for Twilio.
`CallResult.call_sid` is the call's `uuid`, `account_sid` the api key, `twiml` the NCCO text.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import numpy as np
import orjson
from websockets.asyncio.client import ClientConnection

from livecall.audio.g711 import ulaw_decode, ulaw_encode
from livecall.audio.resample import StreamResampler
from livecall.carriers.vonage.answer import MAX_HEADERS_BYTES
from livecall.carriers.vonage.signatures import VonageSignature
from livecall.carriers.vonage.wire import MAX_BUFFERED_FRAMES, SUPPORTED_RATES
from livecall.sim.edge_parts import FrameMediaEdge, OneSocketEdge
from livecall.sim.script import SAMPLE_RATE, CallResult, PressDigit, TimelineEvent

__all__ = ["SimulatedVonageCaller", "VonageCallResult"]

_DTMF_DIGITS = frozenset("0123456789*#")
_ALLOWED_ACTION_KEYS = {"clear": frozenset(("action",)), "notify": frozenset(("action", "payload"))}
_ENDPOINT_KEYS = frozenset(("type", "uri", "content-type", "headers", "authorization"))
_AUTH_KEYS = frozenset(("type", "value"))
_RATES = {f"audio/l16;rate={n}": n for n in SUPPORTED_RATES}


@dataclass
class VonageCallResult(CallResult):
    """`CallResult` plus what is Vonage's own: the NCCO, the leg events, the stream's rate."""

    conversation_uuid: str = ""
    ncco: list[Any] = field(default_factory=list)
    events_posted: list[str] = field(default_factory=list)  # websocket leg statuses sent
    event_statuses: list[int] = field(default_factory=list)  # what the event webhook answered
    fallback_ncco: list[Any] | None = None  # what a synchronous event webhook answered
    content_type: str | None = None
    sample_rate: int = 16000
    ws_authorization: str | None = None  # the Authorization sent on the stream's handshake


class SimulatedVonageCaller(OneSocketEdge, FrameMediaEdge):
    """One simulated inbound Vonage call to an app that answers with a websocket NCCO.

    Takes `SimulatedEdge`'s arguments (script, frame drops, jitter, timeouts…);
    `signature_secret` signs the webhooks (HS256 JWTs). `answer_method` is how the answer
    webhook is requested; `max_buffered_frames` is Vonage's playout queue;
    `notify_after_clear="send"` still echoes the notifies a clear dropped (undocumented
    either way).
    """

    WS_REFUSED = "websocket handshake refused: status {status}"
    WS_FAILED = "websocket connection failed: {exc.__class__.__name__}"
    STREAM_USER_AGENT = "Vonage-Voice-WebSocket/1.0"

    def __init__(
        self,
        base_url: str,
        *,
        signature_secret: str,
        call_uuid: str | None = None,
        conversation_uuid: str | None = None,
        answer_path: str = "/vonage/answer",
        answer_method: Literal["GET", "POST"] = "GET",
        api_key: str = "abcd1234",
        application_id: str | None = None,
        region_url: str = "https://api-us-3.vonage.com",
        max_buffered_frames: int = MAX_BUFFERED_FRAMES,
        notify_after_clear: Literal["drop", "send"] = "drop",
        **kwargs: Any,
    ) -> None:
        for action in kwargs.get("script", ()):
            if isinstance(action, PressDigit) and action.digit not in _DTMF_DIGITS:
                raise ValueError(f"not a Vonage DTMF digit: {action.digit!r}")
        kwargs.setdefault("from_", "15550001111")  # Vonage numbers have no leading "+"
        kwargs.setdefault("to", "15550002222")
        super().__init__(
            base_url,
            call_sid=call_uuid or str(uuid.uuid4()),
            account_sid=api_key,
            webhook_path=answer_path,
            **kwargs,
        )
        self.answer_method = answer_method
        self.application_id = application_id or str(uuid.uuid4())
        self._jwt = VonageSignature(
            signature_secret, api_key=api_key, application_id=self.application_id
        )
        self.conversation_uuid = conversation_uuid or "CON-" + str(uuid.uuid4())
        self.region_url = region_url
        self.max_buffered_frames = max_buffered_frames
        self.notify_after_clear = notify_after_clear
        self.result: VonageCallResult = VonageCallResult(
            call_sid=self.call_sid,
            account_sid=self.account_sid,
            conversation_uuid=self.conversation_uuid,
        )
        self._after_ncco: list[Any] = []
        self._ws_auth: str | None = None  # "vonage" (sign the handshake), or a custom value
        self._event_url: str | None = None
        self._sync_events = False
        self._leg_uuid = str(uuid.uuid4())  # the websocket leg's own uuid
        self._rate = 16000
        self._wire_fb = 640  # bytes of one 20 ms L16 frame at the stream's rate
        self._wire = bytearray()  # caller audio at the stream's rate, not yet sent
        self._up: StreamResampler | None = None
        self._down: StreamResampler | None = None
        self._payloads: deque[Any] = deque()  # notify payloads, in step with self._marks

    # ------------------------------------------------------------------ the call

    async def run(self) -> VonageCallResult:
        """Run the whole call (answer webhook, NCCO, stream, script) and return what happened."""
        await super().run()
        return self.result

    # ------------------------------------------------------------------ leg events (eventUrl)

    def _stream_status(self, event: str, error: str | None = None) -> None:
        """The websocket leg's statuses as the stream goes: `answered` once it is up,
        `completed` when the caller hung up or a REST hang-up or transfer took the call off
        the stream. (The app's close is `disconnected`, posted by `_after_stream`, and a
        failed open `failed`, by `_open_stream`: their answers may replace the NCCO.)"""
        r = self.result
        if event == "stream-started":
            self._leg_event_soon("answered")
        elif event == "stream-stopped" and (r.carrier_action is not None or r.ended_by != "server"):
            self._leg_event_soon("completed")

    async def _after_stream(self) -> None:
        """The app closed the socket: `disconnected`, then the rest of the NCCO (or a
        synchronous event webhook's fallback NCCO)."""
        await self._leg_event("disconnected", then=self._after_ncco)

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
            headers["Authorization"] = self._jwt.sign(method="POST", url=url, body=body)
        r = self.result
        r.events_posted.append(status)
        try:
            resp = await self._client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            r.protocol_errors.append(f"event webhook failed: {type(exc).__name__}")
            return None
        r.event_statuses.append(resp.status_code)
        if not 200 <= resp.status_code < 300:
            r.protocol_errors.append(f"event webhook returned status {resp.status_code}")
        return resp

    def _leg_event_soon(self, status: str) -> None:
        if self._event_url is None:
            return

        async def post() -> None:
            await self._post_event(status)

        task = asyncio.get_running_loop().create_task(post())
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
        for action in actions:
            if type(action) is not dict or self._run_action(action):
                return

    # ------------------------------------------------------------------ answer webhook + NCCO

    async def _webhook(self) -> bool:
        r = self.result
        client = self._client
        assert client is not None
        fields = {
            "to": self.to,
            "from": self.from_,
            "endpoint_type": "phone",
            "conversation_uuid": self.conversation_uuid,
            "uuid": self.call_sid,
            "region_url": self.region_url,
            **self.extra_params,
        }
        headers = {"User-Agent": "Vonage-Voice/1.0", "Accept": "application/json"}
        try:
            if self.answer_method == "GET":
                # an answer_url with a query of its own (an outbound call's) keeps it
                joiner = "&" if "?" in self.webhook_url else "?"
                url = self.webhook_url + joiner + urlencode(fields)
                if self.sign:
                    headers["Authorization"] = self._jwt.sign(method="GET", url=url)
                resp = await client.get(url, headers=headers)
            else:
                body = orjson.dumps(fields)
                headers["Content-Type"] = "application/json"
                if self.sign:
                    headers["Authorization"] = self._jwt.sign(
                        method="POST", url=self.webhook_url, body=body
                    )
                resp = await client.post(self.webhook_url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return self._fail(f"answer webhook failed: {type(exc).__name__}")
        r.webhook_status = resp.status_code
        r.twiml = resp.text
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
                self._after_ncco = ncco[i + 1 :]
                return self._read_connect_action(action)
            if self._run_action(action):
                return False
        r.ended_by = "server"  # the NCCO ran out: the call ends
        return False

    def _run_action(self, action: dict[str, Any]) -> bool:
        """Run a non-connect action; True if it ends the call."""
        r = self.result
        now = asyncio.get_running_loop().time()
        kind = action.get("action")
        if kind == "talk":
            text = action.get("text")
            if type(text) is not str or not text:
                return not self._fail("talk action needs a non-empty text")
            r.said.append(text)
            r.timeline.append(TimelineEvent(now, "ncco_talk", text))
            return False
        r.script_errors.append(f"NCCO action {str(kind)[:40]!r} is not simulated; the call ends")
        r.ended_by = "server"
        return True

    def _read_connect_action(self, action: dict[str, Any]) -> bool:
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
        if ctype not in _RATES:
            return self._fail(f"websocket content-type must be one of {sorted(_RATES)}: {ctype!r}")
        headers = ep.get("headers", {})
        if type(headers) is not dict:
            return self._fail("websocket headers must be a JSON object")
        if len(orjson.dumps(headers)) > MAX_HEADERS_BYTES:
            return self._fail(f"websocket headers exceed {MAX_HEADERS_BYTES} bytes")
        if self.strict_fields and not _ENDPOINT_KEYS.issuperset(ep):
            extra = sorted(set(ep) - _ENDPOINT_KEYS)
            return self._fail(f"unexpected websocket endpoint fields {extra}")
        event_url = action.get("eventUrl")
        if event_url is not None:
            if type(event_url) is not list or len(event_url) != 1 or type(event_url[0]) is not str:
                return self._fail("connect eventUrl must be an array with one URL")
            self._event_url = urljoin(self.webhook_url, event_url[0])
        self._sync_events = action.get("eventType") == "synchronous"
        r.stream_url = uri
        r.content_type = ctype
        r.parameters = dict(headers)
        self._rate = r.sample_rate = _RATES[ctype]
        self._wire_fb = self._rate // 50 * 2
        if "authorization" in ep:
            problem = self._read_authorization(ep["authorization"])
            if problem is not None:
                return self._fail(problem)
        return True

    def _read_authorization(self, auth: Any) -> str | None:
        """The endpoint's `authorization` (@vonage/voice `WebsocketAuthorization`): `type`
        "vonage" (a value, if any, is ignored) or "custom" with the header `value`; what is
        wrong with it, else None."""
        if type(auth) is not dict:
            return "websocket authorization must be a JSON object"
        if not _AUTH_KEYS.issuperset(auth):
            return f"unexpected websocket authorization fields {sorted(set(auth) - _AUTH_KEYS)}"
        kind, value = auth.get("type"), auth.get("value")
        if kind == "vonage":
            if value is not None and type(value) is not str:
                return "websocket authorization value must be a string"
            self._ws_auth = "vonage"
            return None
        if kind == "custom":
            if type(value) is not str or not value.strip():
                return "websocket authorization type custom needs a non-empty string value"
            if any(c in value for c in "\r\n\0"):
                return "websocket authorization value must be a single header line"
            self._ws_auth = value
            return None
        return f"websocket authorization type must be 'vonage' or 'custom': {str(kind)[:30]!r}"

    # ------------------------------------------------------------------ stream

    def _new_stream_sid(self) -> str:
        return self._leg_uuid  # Vonage names the stream by its websocket leg

    def _stream_headers(self, url: str) -> dict[str, str]:
        """The handshake's `Authorization`, as the endpoint asked: for "vonage", a fresh JWT
        signed as the webhooks are (HS256 over the signature secret; `iat`, a new `jti`,
        `iss`, `api_key`, `application_id`, `payload_hash` of the GET's query as JSON)."""
        if self._ws_auth is None:
            return {}
        value = (
            self._jwt.sign(method="GET", url=url) if self._ws_auth == "vonage" else self._ws_auth
        )
        self.result.ws_authorization = value
        return {"Authorization": value}

    async def _open_stream(self) -> bool:
        if await super()._open_stream():
            return True
        await self._leg_event("failed", then=self._after_ncco)
        return False

    def _stream_opened(self) -> None:
        if self._rate != SAMPLE_RATE:
            self._up = StreamResampler(SAMPLE_RATE, self._rate)
            self._down = StreamResampler(self._rate, SAMPLE_RATE)

    def _dtmf_message(self, digit: str) -> str:
        """`websocket:dtmf`: the caller's key press (Vonage's only message with a digit)."""
        msg = {"event": "websocket:dtmf", "digit": digit, "duration": 260}
        return orjson.dumps(msg).decode()

    async def _hello(self, ws: ClientConnection) -> None:
        """`websocket:connected`: the content type, and the endpoint's headers at top level."""
        r = self.result
        hello: dict[str, Any] = {"event": "websocket:connected", "content-type": r.content_type}
        hello.update(r.parameters)
        await ws.send(orjson.dumps(hello).decode())

    def _media_message(self, n: int, frame: bytes) -> bytes:
        """One binary frame of exactly 20 ms of L16 at the stream's rate."""
        pcm = ulaw_decode(frame)
        if self._up is not None:
            pcm = self._up.process(pcm)
        wire = self._wire
        wire += np.ascontiguousarray(pcm, dtype="<i2").tobytes()
        fb = self._wire_fb
        if len(wire) < fb:  # the resampler's first output is short: lead with silence
            wire[:0] = bytes(fb - len(wire))
        out = bytes(wire[:fb])
        del wire[:fb]
        return out

    def _mark_echo(self, name: str) -> str:
        """A notify's payload comes back as `websocket:notify` once what preceded it played."""
        return orjson.dumps(
            {"event": "websocket:notify", "payload": self._payloads.popleft()}
        ).decode()

    def _stop_frame(self) -> str | None:
        return None  # Vonage has no stop message: the caller's hang-up closes the socket

    # ------------------------------------------------------------------ what the app sends

    async def _on_frame(self, data: str | bytes, now: float) -> None:
        if isinstance(data, bytes):
            self._on_audio(data, now)
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
            await self._clear(now)
            return
        payload = msg.get("payload")
        if type(payload) is not dict:
            self._error("notify needs a 'payload' object")
            return
        given = payload.get("name")
        label = given if isinstance(given, str) else orjson.dumps(payload).decode()[:40]
        self._queue_mark(label, now)
        self._payloads.append(payload)

    async def _clear(self, now: float) -> None:
        """Empty the queue and say so; the notifies it held are dropped (or sent, if asked)."""
        names = [name for _, name in self._marks]
        await self._clear_queue(now, echo_marks=False)
        if self._down is not None:
            self._down.reset()
        assert self._ws is not None
        await self._ws.send('{"event":"websocket:cleared"}')
        if self.notify_after_clear == "send":
            await self._echo_marks(names, now)
        else:
            self._payloads.clear()

    def _on_audio(self, data: bytes, now: float) -> None:
        fb = self._wire_fb
        if len(data) != fb:
            self._error(
                f"audio message of {len(data)} bytes dropped: must be one 20 ms frame "
                f"({fb} bytes at {self._rate} Hz)"
            )
            return
        queued = -(-len(self._playbuf) // self._fb)  # 20 ms frames waiting to play
        if queued >= self.max_buffered_frames:
            self._error(f"audio dropped: more than {self.max_buffered_frames} frames queued")
            return
        pcm = np.frombuffer(data, dtype="<i2")
        if self._down is not None:
            pcm = self._down.process(pcm)
        ulaw = ulaw_encode(np.ascontiguousarray(pcm, dtype=np.int16)).tobytes()
        self._queue_audio(ulaw, now, wire_bytes=len(data))
