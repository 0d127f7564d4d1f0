"""A simulated Exotel edge: one phone caller reaching a Voicebot applet, faithful to Exotel's wire.

`SimulatedExotelCaller` does what Exotel does when a call reaches a Voicebot applet whose URL
is an `https://` endpoint: it GETs that endpoint (the call's details as query parameters,
the applet URL's secret as HTTP Basic credentials or `?key=`), reads `{"url": "wss://..."}`,
checks the URL as Exotel would (ws/wss, `sample-rate` 8000/16000/24000, at most 3 custom
parameters in 256 characters, at most 600 characters in all), opens the WebSocket (a failed
handshake is retried once, as Exotel does), sends `connected` and `start` (custom
parameters echoed from the query string), then the caller's
audio as 16-bit little-endian PCM at the stream's rate, one `media` frame per ~100 ms on an
absolute 20 ms clock, `dtmf` on key presses and `stop` (reason `callended`) on hang-up.

What the app sends back is played on a real-time timeline: `media` is queued and played
20 ms at a time, `mark` is echoed when everything before it has played, `clear` empties the
queue (and echoes the pending marks, like the Twilio protocol Exotel's mirrors; turn that
off with `echo_marks_on_clear=False` to check the app copes without). Exotel's chunk rules
are checked: a chunk that is not a multiple of 320 bytes is a protocol error and plays with
the 20 ms gap Exotel leaves, one over 100 kB is an error (Exotel times out) and is dropped,
one under 3.2 kB is recorded in `chunk_warnings` (Exotel advises against, it plays).

The clock, the playout and the measurements are `livecall.sim.edge.SimulatedEdge`'s and the
script actions and result `livecall.sim.script`'s (`Say`, `PressDigit`, `HangUp`, `Probe`...;
a `CallResult`), so a suite written for one carrier drives this one;
this module holds only Exotel's side: the applet URL, the stream URL's rules, its frames, its
100 ms media batching and its chunk rules. The caller's side is kept as μ-law 8 kHz
internally (what a phone line carries); `heard` is the agent audio brought to μ-law 8 kHz, so
`heard_pcm()` works as for Twilio.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import numpy as np
import orjson
import websockets
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from websockets.asyncio.client import ClientConnection

from livecall.audio.g711 import ulaw_decode, ulaw_encode
from livecall.audio.resample import StreamResampler
from livecall.carriers.exotel.answer import (
    MAX_CUSTOM_PARAMETERS,
    MAX_PARAMETER_CHARS,
    MAX_STREAM_URL_CHARS,
    SAMPLE_RATE_PARAM,
)
from livecall.carriers.exotel.signatures import URL_KEY_PARAM, ExotelUrlAuth
from livecall.carriers.exotel.wire import (
    CHUNK_UNIT_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    SAMPLE_RATES,
)
from livecall.sim.edge import _F_SPEECH_END
from livecall.sim.edge_parts import JsonEnvelopeEdge
from livecall.sim.script import CallResult, HangUp, ScriptAction, TimelineEvent
from livecall.sim.serve import serve_app

__all__ = [
    "ExotelCallResult",
    "FakeExotelCall",
    "FakeExotelState",
    "SimulatedExotelCaller",
    "build_fake_exotel_rest",
    "serve_fake_exotel_rest",
]

_ALLOWED_KEYS = {
    "media": frozenset(("event", "stream_sid", "streamSid", "media")),
    "mark": frozenset(("event", "stream_sid", "streamSid", "mark")),
    "clear": frozenset(("event", "stream_sid", "streamSid")),
}
_MEDIA_KEYS = frozenset(("payload", "chunk"))  # Exotel's own samples send media.chunk too


@dataclass
class ExotelCallResult(CallResult):
    """`CallResult` plus what is Exotel's own: the applet's answer, the rate, chunk advice."""

    answer: str = ""
    sample_rate: int = 8000
    chunk_warnings: list[str] = field(default_factory=list)
    stream_request_headers: dict[str, str] = field(default_factory=dict)


def _sid() -> str:
    return secrets.token_hex(16)


class SimulatedExotelCaller(JsonEnvelopeEdge):
    """One simulated inbound call through an Exotel flow to a Voicebot applet.

    `base_url + answer_path` is the applet's dynamic URL; with `stream_url` there is no
    applet and the stream goes straight there (an outbound "Connect Voice AI" call). `auth`
    says how the flow's URL carries `url_secret`: "basic" (credentials in the URL, sent as
    `Authorization: Basic`), "key" (a `?key=` query parameter) or None. `numeric_counters`
    sends sequence numbers and chunks as numbers (one page of Exotel's docs) instead of
    strings (the other). The stream runs at the stream URL's `sample-rate` (8000 without
    one), as documented; `account_rate` makes it run at that rate whatever the URL asks, its
    `start` saying so (an account without the wideband rates). The other arguments are
    `SimulatedEdge`'s (script, drops, jitter, timeouts…); Exotel's clock runs at 20 ms and it
    signs nothing.
    """

    SID_KEYS = ("stream_sid", "streamSid")
    BINARY_REFUSED = "binary frames are not part of Exotel's stream protocol"
    NOT_OBJECT = "a message must be a JSON object"
    STREAM_USER_AGENT = "Exotel-AgentStream"

    def __init__(
        self,
        base_url: str,
        *,
        url_secret: str | None = None,
        auth: Literal["basic", "key"] | None = "basic",
        call_sid: str | None = None,
        account_sid: str | None = None,
        answer_path: str = "/exotel/voicebot",
        stream_url: str | None = None,
        media_every_ms: int = 100,
        echo_marks_on_clear: bool = True,
        numeric_counters: bool = False,
        account_rate: int | None = None,
        **kwargs: Any,
    ) -> None:
        if media_every_ms <= 0 or media_every_ms % 20:
            raise ValueError("media_every_ms must be a positive multiple of 20")
        if account_rate is not None and account_rate not in SAMPLE_RATES:
            raise ValueError(f"account_rate must be one of {SAMPLE_RATES}")
        if auth is not None and not url_secret and stream_url is None:
            raise ValueError(f"auth={auth!r} needs the url_secret")
        kwargs.setdefault("from_", "+919876543210")
        kwargs.setdefault("to", "+918047491899")
        kwargs.setdefault("webhook_timeout", 10.0)
        super().__init__(
            base_url,
            call_sid=call_sid or _sid(),
            account_sid=account_sid or "livecall" + secrets.token_hex(4),
            webhook_path=answer_path,
            sign=False,
            frame_ms=20,
            **kwargs,
        )
        self._url_secret = url_secret
        self.direct_stream_url = stream_url  # Connect Voice AI: no applet URL request
        self._url_auth = ExotelUrlAuth(url_secret) if url_secret else None
        self.auth = auth
        self.echo_marks_on_clear = echo_marks_on_clear
        self.numeric_counters = numeric_counters
        self.account_rate = account_rate
        self._batch_ticks = media_every_ms // 20
        self._ticks = 0
        self._batch: list[tuple[int, bytes, int, Any]] = []  # 20 ms frames gathered
        self._unsent: list[tuple[int, bytes, int, Any]] = []  # in _wire, not yet sent
        self._chunk = 0
        self._wire = bytearray()  # caller PCM at the stream's rate, not yet sent
        self._stamp = 0  # where the audio sent so far ends, in ms
        self._rate = 8000
        self._up: StreamResampler | None = None
        self._down: StreamResampler | None = None
        self.result: ExotelCallResult = ExotelCallResult(
            call_sid=self.call_sid, account_sid=self.account_sid
        )

    async def run(self) -> ExotelCallResult:
        """Run the whole call (applet URL, stream, script) and return what happened."""
        await super().run()
        return self.result

    # ------------------------------------------------------------------ flow: applet URL

    async def _after_stream(self) -> None:
        """The app closed the socket: the flow goes on to its next applet."""
        now = asyncio.get_running_loop().time()
        self.result.timeline.append(TimelineEvent(now, "next_applet"))

    def _query(self) -> dict[str, str]:
        """The call's details as Exotel's dynamic-URL applets send them."""
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        params = {
            "CallSid": self.call_sid,
            "CallFrom": self.from_,
            "CallTo": self.to,
            "From": self.from_,
            "To": self.to,
            "Direction": "incoming",
            "Created": stamp,
            "CurrentTime": stamp,
            "CallType": "call-attempt",
            "DialWhomNumber": "",
        }
        params.update(self.extra_params)
        return params

    async def _webhook(self) -> bool:
        """GET the applet's URL for `{"url": ...}` (or take the Connect Voice AI stream URL)."""
        if self.direct_stream_url is not None:
            return self._check_stream_url(self.direct_stream_url)
        r = self.result
        params = self._query()
        headers = {"Accept": "*/*", "User-Agent": "Exotel"}
        if self._url_auth is not None and self.auth == "basic":
            headers["Authorization"] = self._url_auth.basic_header()
        elif self._url_secret and self.auth == "key":
            params[URL_KEY_PARAM] = self._url_secret
        assert self._client is not None
        try:
            resp = await self._client.get(self.webhook_url, params=params, headers=headers)
        except httpx.HTTPError as exc:
            return self._fail(f"applet URL request failed: {type(exc).__name__}")
        r.webhook_status = resp.status_code
        r.answer = resp.text
        if resp.status_code != 200:
            return self._fail(f"applet URL answered {resp.status_code}")
        try:
            body = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            return self._fail("applet URL answer is not JSON")
        url = body.get("url") if type(body) is dict else None
        if type(url) is not str:
            return self._fail('applet URL answer needs a string "url"')
        return self._check_stream_url(url)

    def _check_stream_url(self, url: str) -> bool:
        r = self.result
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            return self._fail(f"stream URL must be ws:// or wss://: {url[:80]!r}")
        if self.require_wss and parts.scheme != "wss":
            return self._fail("stream URL must use wss://")
        if len(url) > MAX_STREAM_URL_CHARS:
            return self._fail(f"stream URL is over {MAX_STREAM_URL_CHARS} characters")
        query = parse_qsl(parts.query, keep_blank_values=True)
        rate_values = [v for k, v in query if k == SAMPLE_RATE_PARAM]
        custom = [(k, v) for k, v in query if k != SAMPLE_RATE_PARAM]
        if len(rate_values) > 1 or (rate_values and rate_values[0] not in map(str, SAMPLE_RATES)):
            return self._fail(f"sample-rate must be one of {SAMPLE_RATES}: {rate_values}")
        if len(custom) > MAX_CUSTOM_PARAMETERS:
            return self._fail(f"{len(custom)} custom parameters (at most 3)")
        if len(urlencode(custom)) > MAX_PARAMETER_CHARS:
            return self._fail(f"custom parameters over {MAX_PARAMETER_CHARS} characters")
        self._rate = int(rate_values[0]) if rate_values else 8000  # Exotel's default
        if self.account_rate is not None:
            self._rate = self.account_rate
        r.sample_rate = self._rate
        r.parameters = dict(custom)
        r.stream_url = url
        return True

    # ------------------------------------------------------------------ stream

    async def _open_stream(self) -> bool:
        r = self.result
        assert r.stream_url is not None
        parts = urlsplit(r.stream_url)
        headers: dict[str, str] = {}
        netloc = parts.netloc
        if parts.username is not None:  # credentials in the URL go as Basic auth
            raw = f"{parts.username}:{parts.password or ''}".encode()
            headers["Authorization"] = "Basic " + binascii.b2a_base64(raw, newline=False).decode()
            netloc = netloc.rpartition("@")[2]
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        r.stream_request_headers = dict(headers)
        for attempt in (1, 2):  # Exotel retries a failed handshake once
            try:
                self._ws = await self._connect(url, headers)
                break
            except websockets.InvalidStatus as exc:
                why = f"stream handshake refused: {exc.response.status_code}"
            except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
                why = f"stream connection failed: {type(exc).__name__}"
            r.protocol_errors.append(why)
            r.timeline.append(TimelineEvent(asyncio.get_running_loop().time(), "ws_failed", why))
            if attempt == 2:
                r.ended_by = "server"
                return False
        self._stream_sid = "MZ" + secrets.token_hex(16)
        r.stream_sid = self._stream_sid
        if self._rate != 8000:
            self._up = StreamResampler(8000, self._rate)
            self._down = StreamResampler(self._rate, 8000)
        return True

    def _counter(self, n: int) -> int | str:
        return n if self.numeric_counters else str(n)

    def _envelope(self, event: str, body: dict[str, Any] | None = None) -> str:
        if event == "dtmf" and body is not None:
            body = {"digit": body["digit"], "duration": self._counter(100)}
        elif event == "stop":
            reason = "stopped" if body and body.get("reason") == "stopped" else "callended"
            body = {"call_sid": self.call_sid, "account_sid": self.account_sid, "reason": reason}
        msg: dict[str, Any] = {
            "event": event,
            "sequence_number": self._counter(self._next_seq()),
            "stream_sid": self._stream_sid,
        }
        if body is not None:
            msg[event] = body
        return orjson.dumps(msg).decode()

    async def _hello(self, ws: ClientConnection) -> None:
        await ws.send('{"event":"connected"}')
        start = {
            "stream_sid": self._stream_sid,
            "call_sid": self.call_sid,
            "account_sid": self.account_sid,
            "from": self.from_,
            "to": self.to,
            "custom_parameters": self.result.parameters,
            "media_format": {
                "encoding": "audio/x-raw",
                "sample_rate": str(self._rate),
                "bit_rate": "16",
            },
        }
        await ws.send(self._envelope("start", start))

    def _to_wire(self, ulaw: bytes) -> bytes:
        pcm = ulaw_decode(ulaw)
        if self._up is not None:
            pcm = self._up.process(pcm)
        return np.ascontiguousarray(pcm, dtype="<i2").tobytes()

    async def _flush(self, now: float, *, everything: bool = False) -> None:
        """Gather the clock's 20 ms frames; one `media` frame per `media_every_ms`."""
        ws = self._ws
        assert ws is not None
        pending = self._pending
        while pending and (everything or pending[0][0] <= now):
            _, n, frame, flags, utt = pending.popleft()
            self._batch.append((n, frame, flags, utt))
            if flags & _F_SPEECH_END:
                # the caller has stopped speaking now, though the frame waits for its batch:
                # a wait the script starts next tick measures the agent from here, not from
                # the previous utterance (`_frame_sent` moves it to the send time later)
                self._last_speech_end = now
        if not everything:
            self._ticks += 1
            if self._ticks < self._batch_ticks:
                return
        self._ticks = 0
        batch, self._batch = self._batch, []
        if batch:
            self._wire += self._to_wire(b"".join(frame for _, frame, _, _ in batch))
            self._unsent += batch  # their audio is in _wire; sent (and timed) below
        wire = self._wire
        # a resampler holds back a few samples: send whole 20 ms units, the rest next time
        unit = self._rate // 50 * 2
        cut = len(wire) if everything else len(wire) - len(wire) % unit
        if not cut:
            return
        audio = bytes(wire[:cut])
        del wire[:cut]
        frames, self._unsent = self._unsent, []
        self._chunk += 1
        payload = binascii.b2a_base64(audio, newline=False).decode()
        # ms since the stream began: where the previous chunk ended, or later after a loss
        stamp = self._stamp
        if frames:
            stamp = max(stamp, (frames[0][0] - 1) * self.frame_ms)
        self._stamp = stamp + len(audio) * 1000 // (self._rate * 2)
        media = {
            "chunk": self._counter(self._chunk),
            "timestamp": self._counter(stamp),
            "payload": payload,
        }
        await ws.send(self._envelope("media", media))
        self.result.frames_sent += len(frames)
        t = asyncio.get_running_loop().time()
        for _, _, flags, utt in frames:
            if flags:
                self._frame_sent(t, flags, utt)

    # ------------------------------------------------------------------ what the app sends

    async def _on_frame(self, data: str | bytes, now: float) -> None:
        read = await self._read_json(data, _ALLOWED_KEYS)
        if read is None:
            return
        event, msg = read
        if event == "media":
            await self._on_media(msg, now)
        elif event == "mark":
            name = await self._mark_name(msg)
            if name is not None:
                self._queue_mark(name, now)
        else:  # clear
            await self._clear_queue(now, echo_marks=self.echo_marks_on_clear)

    async def _on_media(self, msg: dict[str, Any], now: float) -> None:
        """Exotel's chunk rules: 16-bit PCM at the stream's rate, in 320-byte units, ≤ 100 kB."""
        audio = await self._media_payload(msg, _MEDIA_KEYS)
        if audio is None:
            return
        size = len(audio)
        if not size:
            self._error("media.payload is empty")
            return
        if size > MAX_CHUNK_BYTES:
            self._error(f"media chunk of {size} bytes is over Exotel's 100 kB (dropped)")
            return
        if size % CHUNK_UNIT_BYTES:
            self._error(f"media chunk of {size} bytes is not a multiple of 320 (20 ms gap)")
            audio += bytes(CHUNK_UNIT_BYTES - size % CHUNK_UNIT_BYTES)  # Exotel's gap
        if size < MIN_CHUNK_BYTES:
            self.result.chunk_warnings.append(f"media chunk of {size} bytes is under 3.2 kB")
        pcm = np.frombuffer(audio, dtype="<i2")
        if self._down is not None:
            pcm = self._down.process(pcm)
        ulaw = ulaw_encode(np.ascontiguousarray(pcm, dtype=np.int16)).tobytes()
        self._queue_audio(ulaw, now, wire_bytes=size)


# --------------------------------------------------------------------------- the REST API


@dataclass
class FakeExotelCall:
    """One call placed through the fake v1 Calls API, and the simulated callee's result."""

    sid: str
    form: dict[str, list[str]]
    status: str = "in-progress"
    direction: str = "outbound-api"
    result: ExotelCallResult | None = None
    task: asyncio.Task[ExotelCallResult] | None = None

    def resource(self) -> dict[str, Any]:
        first = {k: v[0] for k, v in self.form.items() if v}
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        return {
            "Sid": self.sid,
            "Status": self.status,
            "From": first.get("From"),
            "To": first.get("CallerId"),
            "PhoneNumberSid": first.get("CallerId"),
            "Direction": self.direction,
            "DateCreated": stamp,
            "RecordingUrl": None,
        }


class FakeExotelState:
    """What the fake saw; `script` is what each dialled party does once its stream is up."""

    def __init__(self, account_sid: str, api_key: str, api_token: str) -> None:
        self.account_sid = account_sid
        self._basic = "Basic " + base64.b64encode(f"{api_key}:{api_token}".encode()).decode()
        self.calls: dict[str, FakeExotelCall] = {}
        self.script: Sequence[ScriptAction] = (HangUp(),)
        self.caller_options: dict[str, Any] = {"timeout": 30.0}
        self.created = asyncio.Event()
        self.requests: list[dict[str, list[str]]] = []  # authorized connect forms, in order
        self.fail_status: int | None = None  # every authorized connect fails so (an outage)

    def authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), self._basic.encode())

    def last_call(self) -> FakeExotelCall:
        return list(self.calls.values())[-1]

    async def results(self) -> list[ExotelCallResult]:
        """Wait for every simulated callee to finish; their results, in order."""
        tasks = [c.task for c in self.calls.values() if c.task is not None]
        return list(await asyncio.gather(*tasks))

    async def aclose(self) -> None:
        for call in self.calls.values():
            if call.task is not None and not call.task.done():
                call.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await call.task


def _rest_error(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"RestException": {"Status": status, "Message": message}}, status_code=status
    )


def build_fake_exotel_rest(
    account_sid: str, api_key: str, api_token: str
) -> tuple[FastAPI, FakeExotelState]:
    """The v1 Calls API as livecall uses it: Connect Voice AI, connect to a flow, details."""
    app = FastAPI()
    state = FakeExotelState(account_sid, api_key, api_token)

    def refused(account: str, request: Request) -> JSONResponse | None:
        if not state.authorized(request):
            return _rest_error(401, "Authentication is required to view this resource.")
        if account != state.account_sid:
            return _rest_error(403, "The account is not yours.")
        return None

    @app.post("/v1/Accounts/{account}/Calls/{action}")
    async def connect_call(account: str, action: str, request: Request) -> Response:
        if action not in ("connect", "connect.json"):
            return _rest_error(404, "No such resource.")
        if (error := refused(account, request)) is not None:
            return error
        form = parse_qs((await request.body()).decode(), keep_blank_values=True)
        state.requests.append(form)
        if state.fail_status is not None:
            return _rest_error(state.fail_status, "An internal error occurred.")
        first = {k: v[0] for k, v in form.items() if v}
        if not first.get("From") or not first.get("CallerId"):
            return _rest_error(400, "From and CallerId are mandatory.")
        stream_url, flow_url = first.get("StreamUrl"), first.get("Url")
        if (stream_url is None) == (flow_url is None):
            return _rest_error(400, "Give either StreamUrl (with StreamType) or Url.")
        if stream_url is not None:
            if first.get("StreamType") != "bidirectional":
                return _rest_error(400, "StreamType must be bidirectional.")
            if not stream_url.startswith(("ws://", "wss://")) or len(stream_url) > 600:
                return _rest_error(400, "StreamUrl must be ws:// or wss://, up to 600 chars.")
        call = FakeExotelCall(secrets.token_hex(16), form)
        state.calls[call.sid] = call
        if stream_url is not None:
            caller = SimulatedExotelCaller(
                "http://unused.invalid",
                auth=None,
                stream_url=stream_url,
                call_sid=call.sid,
                account_sid=state.account_sid,
                from_=first["CallerId"],
                to=first["From"],
                script=state.script,
                **state.caller_options,
            )

            async def run() -> ExotelCallResult:
                try:
                    await caller.run()
                finally:
                    call.status = "completed"
                call.result = caller.result
                return caller.result

            call.task = asyncio.get_running_loop().create_task(run())
        state.created.set()
        return JSONResponse({"Call": call.resource()})

    @app.get("/v1/Accounts/{account}/Calls/{name}")
    async def call_details(account: str, name: str, request: Request) -> Response:
        if (error := refused(account, request)) is not None:
            return error
        call = state.calls.get(name.removesuffix(".json"))
        if call is None:
            return _rest_error(404, "No such call.")
        return JSONResponse({"Call": call.resource()})

    return app, state


@contextlib.asynccontextmanager
async def serve_fake_exotel_rest(
    account_sid: str, api_key: str, api_token: str
) -> AsyncIterator[tuple[FakeExotelState, str]]:
    """Serve the fake on a free loopback port: ``async with ... as (state, base_url)``."""
    app, state = build_fake_exotel_rest(account_sid, api_key, api_token)
    try:
        async with serve_app(app) as base_url:
            yield state, base_url
    finally:
        await state.aclose()
