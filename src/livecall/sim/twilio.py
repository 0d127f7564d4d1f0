"""A simulated Twilio media edge: one phone caller, faithful to Twilio's side of the wire.

`SimulatedCaller` does what Twilio does for an inbound call to a `<Connect><Stream>` app:
POSTs the signed voice webhook, reads the TwiML, opens the signed WebSocket to the
`<Stream>` URL, sends `connected`, `start` and then one `media` frame every 20 ms on an
absolute clock (silence between utterances, as a real line never goes quiet), and plays
what the app sends back through a real-time playout buffer that honours `mark` and `clear`
like Twilio. It is strict where Twilio is strict: a frame Twilio would reject (binary,
bad JSON, unknown event, wrong streamSid, bad base64, missing or extra fields) is recorded
as a protocol error (31950/31951) and ignored, never a crash.

A script of small actions (`Say`, `Pause`, `WaitForAgentAudio`, `WaitForAgentSilence`,
`PressDigit`, `SendRaw`, `HangUp`, `Probe`) drives the call; `CallResult` holds what was
sent, heard and measured (response latency, barge-in stop time, echo round trips).

Cost: one clock task and one reader task per call, frame JSON built from precomputed
templates, so a process can drive well over a hundred calls at once.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import random
import secrets
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

import httpx
import numpy as np
import numpy.typing as npt
import orjson
import soxr
import websockets
from websockets.asyncio.client import ClientConnection, connect

from livecall.audio.g711 import ULAW_DECODE_TABLE, ulaw_decode, ulaw_encode
from livecall.telephony.twilio import SIGNATURE_SETTINGS_HEADER, TwilioSignature

__all__ = [
    "CallResult",
    "HangUp",
    "Pause",
    "PressDigit",
    "Probe",
    "Say",
    "ScriptAction",
    "SendRaw",
    "SimulatedCaller",
    "TimedName",
    "TimelineEvent",
    "Utterance",
    "WaitForAgentAudio",
    "WaitForAgentSilence",
]

SAMPLE_RATE = 8000
SILENCE = 0xFF  # μ-law code for 0
PROBE_TONE_HZ = 1800  # a whole number of cycles in every 10 ms analysis window
PROBE_AMPLITUDE = 12000
_LOUD_THRESHOLD = 300  # |sample| at or above this counts as audible (about -40 dBFS)
_LOUD_SAMPLES_PER_FRAME = 4  # a frame with fewer audible samples counts as silence
_QUIET_CODES = bytes(c for c in range(256) if abs(int(ULAW_DECODE_TABLE[c])) < _LOUD_THRESHOLD)
_LOUD_LUT = np.abs(ULAW_DECODE_TABLE.astype(np.int32)) >= _LOUD_THRESHOLD
_DTMF_DIGITS = frozenset("0123456789*#ABCD")

# Flags on an outbound frame: things to record at the moment it is sent.
_F_SPEECH_START = 1
_F_SPEECH_END = 2
_F_PROBE = 4


# --------------------------------------------------------------------------- script


@dataclass(slots=True)
class Say:
    """Speak a clip: int16 PCM at `rate`, or μ-law bytes at `rate` (8 kHz normally)."""

    audio: npt.NDArray[np.int16] | bytes
    rate: int = SAMPLE_RATE
    label: str = ""


@dataclass(slots=True)
class Pause:
    """Stay silent (silence frames keep flowing) for `ms`."""

    ms: int


@dataclass(slots=True)
class WaitForAgentAudio:
    """Wait until this much agent audio was heard in the current reply, while it plays.

    A reply is agent audio without a silence of `agent_reply_gap_ms` (1 s); the wait ends
    while audio is actually playing, so the next `Say` interrupts the agent mid-reply.
    """

    min_heard_ms: int = 300
    timeout: float = 10.0


@dataclass(slots=True)
class WaitForAgentSilence:
    """Wait until the agent was heard after the caller's last words, then silent this long."""

    silence_ms: int = 600
    timeout: float = 15.0


@dataclass(slots=True)
class PressDigit:
    """Send a `dtmf` event (track inbound_track)."""

    digit: str


@dataclass(slots=True)
class SendRaw:
    """Send this exactly (str -> text frame, bytes -> binary frame): for malformed-frame tests."""

    data: str | bytes


@dataclass(slots=True)
class HangUp:
    """The caller hangs up: `stop` then close, or just close (or drop TCP with `abrupt`)."""

    send_stop: bool = True
    abrupt: bool = False


@dataclass(slots=True)
class Probe:
    """Send one frame of a loud 1.8 kHz tone and time its echo in the incoming media."""


ScriptAction = (
    Say | Pause | WaitForAgentAudio | WaitForAgentSilence | PressDigit | SendRaw | HangUp | Probe
)


# --------------------------------------------------------------------------- result


@dataclass(slots=True)
class TimedName:
    """A named thing (mark, digit) and when it happened (monotonic seconds)."""

    name: str
    t: float


@dataclass(slots=True)
class TimelineEvent:
    """One entry of the call's timeline (monotonic seconds)."""

    t: float
    kind: str
    detail: str = ""


@dataclass(slots=True)
class Utterance:
    """One `Say`: when speech started/ended on the wire and how the agent reacted.

    `start`/`end` are the send times of the frames holding the clip's first and last audible
    sample (so leading/trailing silence in a clip does not skew latency).
    `response_latency_ms`: first agent audio heard after `end`.
    `barge_in_stop_ms`: if agent audio was playing at `start`, how long until it stopped.
    """

    label: str
    start: float | None = None
    end: float | None = None
    barged_in: bool = False
    response_latency_ms: float | None = None
    barge_in_stop_ms: float | None = None


@dataclass
class CallResult:
    """Everything one simulated call sent, heard and measured (times: loop monotonic seconds)."""

    call_sid: str
    account_sid: str
    stream_sid: str | None = None
    twiml: str = ""
    webhook_status: int | None = None
    rejected: bool = False
    reject_reason: str | None = None
    said: list[str] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)
    stream_url: str | None = None
    action_twiml: str | None = None
    started: float = 0.0
    stream_started: float | None = None
    ended: float = 0.0
    ended_by: Literal["caller", "server"] | None = None
    close_code: int | None = None
    close_reason: str = ""
    frames_sent: int = 0
    frames_dropped: int = 0
    clock_late_ticks: int = 0  # ticks run >10 ms late: the simulator's own loop was too busy
    clock_late_max_ms: float = 0.0
    heard: bytes = b""
    received_media_bytes: int = 0
    marks_received: list[TimedName] = field(default_factory=list)
    marks_echoed: list[TimedName] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    digits_sent: list[TimedName] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)
    timeline: list[TimelineEvent] = field(default_factory=list)
    utterances: list[Utterance] = field(default_factory=list)
    agent_stretches: list[tuple[float, float]] = field(default_factory=list)
    probe_rtts_ms: list[float] = field(default_factory=list)
    probes_sent: int = 0
    probes_lost: int = 0

    def heard_pcm(self) -> npt.NDArray[np.int16]:
        """The playout timeline as int16 PCM at 8 kHz."""
        return ulaw_decode(self.heard)

    @property
    def heard_ms(self) -> float:
        return len(self.heard) / 8.0

    @property
    def response_latencies_ms(self) -> list[float]:
        return [u.response_latency_ms for u in self.utterances if u.response_latency_ms is not None]

    @property
    def barge_in_stop_ms(self) -> list[float]:
        return [u.barge_in_stop_ms for u in self.utterances if u.barge_in_stop_ms is not None]

    @property
    def duration_s(self) -> float:
        return self.ended - self.started


# --------------------------------------------------------------------------- helpers


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def _to_ulaw_8k(say: Say) -> bytes:
    """A Say clip as μ-law 8 kHz bytes (resampled once, up front, not in the frame loop)."""
    if isinstance(say.audio, bytes | bytearray | memoryview):
        if say.rate == SAMPLE_RATE:
            return bytes(say.audio)
        pcm = ulaw_decode(bytes(say.audio))
    else:
        pcm = np.asarray(say.audio)
        if pcm.dtype != np.int16:
            raise TypeError(f"Say audio must be int16 PCM or μ-law bytes, got {pcm.dtype}")
        if pcm.ndim != 1:
            raise ValueError("Say audio must be mono (a 1-D array)")
    if say.rate != SAMPLE_RATE:
        pcm = soxr.resample(pcm, say.rate, SAMPLE_RATE)
    return ulaw_encode(np.ascontiguousarray(pcm, dtype=np.int16)).tobytes()


def _tone_frame(n_samples: int) -> bytes:
    t = np.arange(n_samples) / SAMPLE_RATE
    pcm = (PROBE_AMPLITUDE * np.sin(2 * np.pi * PROBE_TONE_HZ * t)).astype(np.int16)
    return ulaw_encode(pcm).tobytes()


class _ToneDetector:
    """Finds onsets of the probe tone in incoming audio, 10 ms windows at a time.

    A window is "tone" when most of its energy sits at the probe frequency and it is loud;
    an onset is a tone window after a non-tone one, so one probe counts once whatever the
    message boundaries.
    """

    __slots__ = ("_basis", "_carry", "_in_tone", "_min_energy", "_win")

    def __init__(self, win: int = 80) -> None:
        n = np.arange(win)
        w = 2 * np.pi * PROBE_TONE_HZ * n / SAMPLE_RATE
        self._basis = np.stack([np.cos(w), np.sin(w)], axis=1).astype(np.float32)
        self._win = win
        min_rms = PROBE_AMPLITUDE / np.sqrt(2) / 4  # tolerate 12 dB of loss on the way back
        self._min_energy = float(min_rms**2 * win)
        self._carry = np.zeros(0, dtype=np.float32)
        self._in_tone = False

    def reset(self) -> None:
        self._carry = np.zeros(0, dtype=np.float32)
        self._in_tone = False

    def feed(self, pcm: npt.NDArray[np.int16]) -> int:
        x = pcm.astype(np.float32)
        if self._carry.size:
            x = np.concatenate((self._carry, x))
        k = x.size // self._win
        self._carry = x[k * self._win :]
        if k == 0:
            return 0
        w = x[: k * self._win].reshape(k, self._win)
        energy = np.einsum("ij,ij->i", w, w)
        proj = w @ self._basis
        tone_energy = (proj * proj).sum(axis=1) * (2.0 / self._win)
        is_tone = (tone_energy >= 0.7 * energy) & (energy >= self._min_energy)
        onsets = 0
        in_tone = self._in_tone
        for flag in is_tone.tolist():
            if flag and not in_tone:
                onsets += 1
            in_tone = flag
        self._in_tone = in_tone
        return onsets


def _first_last_loud(ulaw: bytes) -> tuple[int, int] | None:
    loud = np.flatnonzero(_LOUD_LUT[np.frombuffer(ulaw, dtype=np.uint8)])
    if loud.size == 0:
        return None
    return int(loud[0]), int(loud[-1])


class _SayState:
    __slots__ = ("data", "end_frame", "frame", "nframes", "start_frame", "utt")

    def __init__(self, data: bytes, fb: int, utt: Utterance) -> None:
        self.data = data
        self.frame = 0
        self.nframes = max(1, -(-len(data) // fb))
        loud = _first_last_loud(data)
        if loud is None:
            self.start_frame, self.end_frame = 0, self.nframes - 1
        else:
            self.start_frame, self.end_frame = loud[0] // fb, loud[1] // fb
        self.utt = utt


class _Wait:
    __slots__ = ("action", "deadline", "ref")

    def __init__(
        self, action: WaitForAgentAudio | WaitForAgentSilence, deadline: float, ref: float
    ):
        self.action = action
        self.deadline = deadline
        self.ref = ref


_ALLOWED_KEYS = {
    "media": frozenset(("event", "streamSid", "media")),
    "mark": frozenset(("event", "streamSid", "mark")),
    "clear": frozenset(("event", "streamSid")),
}


# --------------------------------------------------------------------------- the caller


class SimulatedCaller:
    """One simulated inbound call through Twilio to a `<Connect><Stream>` app.

    `base_url` is the app's HTTP base; the voice webhook goes to `base_url + webhook_path`
    and the stream goes to whatever `<Stream url>` the TwiML names. `drop_frames` lists
    chunk numbers (from 1) never sent (chunk and timestamp skip, like upstream loss);
    `jitter_ms` delays each frame by up to that much, in order, so frames bunch at the
    20 ms ticks as they do after network jitter. After the script ends the caller hangs up
    (`on_script_end="hangup"`) or stays on the line until the app ends the call ("wait").

    Agent audio is what the caller hears from the app that is audible; a *stretch* is such
    audio with no gap of `agent_gap_ms` (it ends when the agent stops: barge-in timing), a
    *reply* allows gaps up to `agent_reply_gap_ms` (what `WaitForAgentAudio` counts).
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth_token: str,
        from_: str = "+15550001111",
        to: str = "+15550002222",
        call_sid: str | None = None,
        account_sid: str | None = None,
        script: Sequence[ScriptAction] = (),
        webhook_path: str = "/twiml",
        extra_params: Mapping[str, str] | None = None,
        sign: bool = True,
        frame_ms: int = 20,
        drop_frames: Iterable[int] = (),
        jitter_ms: float = 0.0,
        seed: int | None = None,
        timeout: float = 60.0,
        on_script_end: Literal["hangup", "wait"] = "hangup",
        agent_gap_ms: float = 250.0,
        agent_reply_gap_ms: float = 1000.0,
        probe_timeout: float = 5.0,
        require_wss: bool = False,
        strict_fields: bool = True,
        max_message_bytes: int = 1 << 20,
        webhook_timeout: float = 15.0,
        http_client: httpx.AsyncClient | None = None,
        shared_key: str | None = None,
    ) -> None:
        if frame_ms <= 0 or (SAMPLE_RATE * frame_ms) % 1000:
            raise ValueError(f"frame_ms must give a whole number of samples, got {frame_ms}")
        for action in script:
            if isinstance(action, PressDigit) and action.digit not in _DTMF_DIGITS:
                raise ValueError(f"not a DTMF digit: {action.digit!r}")
        self.base_url = base_url.rstrip("/")
        self.webhook_url = self.base_url + "/" + webhook_path.lstrip("/")
        # A Webhook Rule's SharedKey: Twilio then signs with it, HMAC-SHA256, and says so in
        # X-Twilio-Webhooks-Signature-Settings (webhooks and the stream upgrade alike).
        self._signer = TwilioSignature(shared_key or auth_token)
        self._algorithm = "HMAC_SHA256" if shared_key else None
        self.from_ = from_
        self.to = to
        self.call_sid = call_sid or _sid("CA")
        self.account_sid = account_sid or _sid("AC")
        self.script = list(script)
        self.extra_params = dict(extra_params or {})
        self.sign = sign
        self.frame_ms = frame_ms
        self.drop_frames = frozenset(drop_frames)
        self.jitter_ms = jitter_ms
        self.timeout = timeout
        self.on_script_end = on_script_end
        self.agent_gap_ms = agent_gap_ms
        self.probe_timeout = probe_timeout
        self.require_wss = require_wss
        self.strict_fields = strict_fields
        self.max_message_bytes = max_message_bytes
        self.webhook_timeout = webhook_timeout
        self._http = http_client
        self._rng = random.Random(seed)

        self._fb = SAMPLE_RATE * frame_ms // 1000  # bytes (= samples) per frame
        self._frame_s = frame_ms / 1000.0
        self._silence = bytes([SILENCE]) * self._fb
        self._silence_b64 = binascii.b2a_base64(self._silence, newline=False).decode()
        self._probe_frame = _tone_frame(self._fb)
        self._clips = {id(a): _to_ulaw_8k(a) for a in self.script if isinstance(a, Say)}

        self.result = CallResult(call_sid=self.call_sid, account_sid=self.account_sid)
        self._ran = False
        self._deadline = float("inf")
        self._ws: ClientConnection | None = None
        self._stream_sid = ""
        self._seq = 0
        self._ended = False
        self._hangup_action: HangUp | None = None
        self._after_connect: list[ET.Element] = []
        self._connect_action: str | None = None
        self._status_callback: str | None = None
        self._stream_name: str | None = None
        self._bg: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        # outbound
        self._media_pre = ""
        self._media_mid = ""
        self._pending: deque[tuple[float, int, bytes, int, Utterance | None]] = deque()
        self._last_due = 0.0
        self._actions = iter(self.script)
        self._say: _SayState | None = None
        self._pause_frames = 0
        self._wait: _Wait | None = None
        self._script_done = False
        # playout (what Twilio plays to the caller)
        self._playbuf = bytearray()
        self._enqueued = 0  # bytes ever queued (positions for marks)
        self._played = 0  # bytes taken from the queue
        self._marks: deque[tuple[int, str]] = deque()
        self._heard = bytearray()
        # agent stretches, utterances, probes
        self._gap_s = agent_gap_ms / 1000.0
        self._reply_gap_s = agent_reply_gap_ms / 1000.0
        self._reply_heard_ms = 0.0
        self._stretch_open = False
        self._stretch_start = 0.0
        self._last_loud_end: float | None = None
        self._last_speech_end: float | None = None
        self._awaiting_response: list[Utterance] = []
        self._awaiting_barge_stop: list[Utterance] = []
        self._probes: deque[float] = deque()
        self._detector = _ToneDetector()

    # ------------------------------------------------------------------ entry point

    async def run(self) -> CallResult:
        """Run the whole call (webhook, stream, script) and return what happened."""
        if self._ran:
            raise RuntimeError("a SimulatedCaller runs one call; make a new one for the next")
        self._ran = True
        loop = asyncio.get_running_loop()
        r = self.result
        r.started = loop.time()
        self._deadline = r.started + self.timeout
        client = self._http or httpx.AsyncClient(timeout=self.webhook_timeout, trust_env=False)
        self._client = client
        try:
            async with asyncio.timeout(self.timeout + 15.0):  # backstop; the clock enforces timeout
                await self._run()
        except TimeoutError:
            r.script_errors.append(f"call did not finish within {self.timeout:.0f} s")
            if r.ended_by is None:
                r.ended_by = "caller"
        finally:
            if self._ws is not None and self._ws.close_code is None:
                self._ws.transport.abort()
            if self._bg:
                await asyncio.gather(*self._bg, return_exceptions=True)
            if self._http is None:
                await client.aclose()
            r.heard = bytes(self._heard)
            r.probes_lost += len(self._probes)
            self._probes.clear()
            if self._stretch_open and self._last_loud_end is not None:
                r.agent_stretches.append((self._stretch_start, self._last_loud_end))
            r.timeline.sort(key=lambda e: e.t)
            r.ended = loop.time()
        return r

    async def _run(self) -> None:
        if not await self._webhook():
            return
        if self.result.stream_url is None:
            return
        if not await self._open_stream():
            return
        await self._stream()
        if self.result.ended_by == "server":
            await self._after_stream()

    # ------------------------------------------------------------------ webhook + TwiML

    def _call_params(self, status: str) -> dict[str, str]:
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": self.call_sid,
            "CallStatus": status,
            "Called": self.to,
            "Caller": self.from_,
            "Direction": "inbound",
            "From": self.from_,
            "To": self.to,
        }
        params.update(self.extra_params)
        return params

    async def _post(self, url: str, params: dict[str, str]) -> httpx.Response:
        headers = {
            "Content-Type": "application/x-www-form-urlencoded; charset=UTF-8",
            "User-Agent": "TwilioProxy/1.1",
            "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
            "Accept": "*/*",
        }
        if self.sign:
            headers.update(self._signature_headers(url, params))
        assert self._client is not None
        return await self._client.post(url, data=params, headers=headers)

    def _signature_headers(self, url: str, params: dict[str, str]) -> dict[str, str]:
        headers = {"X-Twilio-Signature": self._signer.sign(url, params, algorithm=self._algorithm)}
        if self._algorithm is not None:
            headers[SIGNATURE_SETTINGS_HEADER] = (
                f"key=webhooks_sharedkey_sim,algorithm={self._algorithm}"
            )
        return headers

    async def _webhook(self) -> bool:
        r = self.result
        try:
            resp = await self._post(self.webhook_url, self._call_params("ringing"))
        except httpx.HTTPError as exc:
            r.protocol_errors.append(f"11200 HTTP retrieval failure: {type(exc).__name__}")
            r.ended_by = "server"
            return False
        r.webhook_status = resp.status_code
        r.twiml = resp.text
        if resp.status_code != 200:
            r.protocol_errors.append(f"11200 HTTP retrieval failure: status {resp.status_code}")
            r.ended_by = "server"
            return False
        ctype = resp.headers.get("content-type", "")
        if "xml" not in ctype and "html" not in ctype:
            r.protocol_errors.append(f"12300 Invalid Content-Type: {ctype!r}")
            r.ended_by = "server"
            return False
        return self._read_twiml(resp.content)

    def _read_twiml(self, body: bytes) -> bool:
        r = self.result
        try:
            root = ET.fromstring(body)
        except ET.ParseError as exc:
            r.protocol_errors.append(f"12100 Document parse failure: {exc}")
            r.ended_by = "server"
            return False
        if root.tag != "Response":
            r.protocol_errors.append(f"12100 Document parse failure: root is <{root.tag}>")
            r.ended_by = "server"
            return False
        verbs = list(root)
        for i, verb in enumerate(verbs):
            if verb.tag == "Connect":
                return self._read_connect(verb, verbs[i + 1 :])
            if self._run_verb(verb):
                return False
        r.ended_by = "server"  # the document ran out: Twilio hangs up
        return False

    def _run_verb(self, verb: ET.Element) -> bool:
        """Run a non-stream verb; True if it ends the call."""
        r = self.result
        now = asyncio.get_running_loop().time()
        if verb.tag == "Say":
            r.said.append((verb.text or "").strip())
            r.timeline.append(TimelineEvent(now, "twiml_say", r.said[-1]))
            return False
        if verb.tag in ("Pause", "Play"):
            r.timeline.append(TimelineEvent(now, f"twiml_{verb.tag.lower()}"))
            return False
        if verb.tag == "Hangup":
            r.timeline.append(TimelineEvent(now, "twiml_hangup"))
            r.ended_by = "server"
            return True
        if verb.tag == "Reject":
            r.rejected = True
            r.reject_reason = verb.get("reason", "rejected")
            r.timeline.append(TimelineEvent(now, "twiml_reject", r.reject_reason))
            r.ended_by = "server"
            return True
        r.script_errors.append(f"TwiML verb <{verb.tag}> is not simulated; the call ends")
        r.ended_by = "server"
        return True

    def _read_connect(self, connect_el: ET.Element, after: list[ET.Element]) -> bool:
        r = self.result
        stream = connect_el.find("Stream")
        if stream is None:
            r.script_errors.append("<Connect> without <Stream> is not simulated")
            r.ended_by = "server"
            return False
        url = stream.get("url", "")
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            r.protocol_errors.append(f"31920 Stream url is not an absolute wss:// URL: {url!r}")
            r.ended_by = "server"
            return False
        if self.require_wss and parts.scheme != "wss":
            r.protocol_errors.append(f"31910 Stream url must use wss://: {url!r}")
            r.ended_by = "server"
            return False
        if "?" in url:
            r.protocol_errors.append(f"31920 Stream url must not carry a query string: {url!r}")
            r.ended_by = "server"
            return False
        r.stream_url = url
        r.parameters = {
            p.get("name", ""): p.get("value", "")
            for p in stream.findall("Parameter")
            if p.get("name")
        }
        self._status_callback = stream.get("statusCallback")
        self._stream_name = stream.get("name")
        self._connect_action = connect_el.get("action")
        self._after_connect = after
        return True

    async def _after_stream(self) -> None:
        """The app closed the socket: Twilio goes on with <Connect action> or the next verbs."""
        r = self.result
        if self._connect_action:
            url = urljoin(self.webhook_url, self._connect_action)
            try:
                resp = await self._post(url, self._call_params("in-progress"))
                r.action_twiml = resp.text
            except httpx.HTTPError as exc:
                r.protocol_errors.append(f"11200 HTTP retrieval failure (action): {exc!r}")
            return
        for verb in self._after_connect:
            if self._run_verb(verb):
                return

    def _stream_status(self, event: str, error: str | None = None) -> None:
        """Twilio's <Stream statusCallback>: stream-started / stream-stopped / stream-error."""
        if not self._status_callback:
            return
        params = {
            "AccountSid": self.account_sid,
            "CallSid": self.call_sid,
            "StreamSid": self._stream_sid,
            "StreamName": self._stream_name or self._stream_sid,
            "StreamEvent": event,
            "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        if error:
            params["StreamError"] = error
        url = urljoin(self.webhook_url, self._status_callback)

        async def post() -> None:
            try:
                await self._post(url, params)
            except httpx.HTTPError as exc:
                self.result.protocol_errors.append(f"stream status callback failed: {exc!r}")

        task = asyncio.get_running_loop().create_task(post())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # ------------------------------------------------------------------ stream

    async def _open_stream(self) -> bool:
        r = self.result
        url = r.stream_url
        assert url is not None
        self._stream_sid = _sid("MZ")
        headers = self._signature_headers(url, {}) if self.sign else {}
        try:
            self._ws = await connect(
                url,
                additional_headers=headers,
                user_agent_header="Twilio.TmeWs/1.0",
                compression=None,
                proxy=None,
                ping_interval=None,
                open_timeout=10,
                close_timeout=2,
                max_size=self.max_message_bytes,
            )
        except websockets.InvalidStatus as exc:
            r.protocol_errors.append(
                f"31920 Stream - WebSocket - Handshake Error: status {exc.response.status_code}"
            )
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            r.protocol_errors.append(f"31901 Stream - WebSocket - Connection failed: {exc!r}")
        if self._ws is None:
            self._stream_status("stream-error", r.protocol_errors[-1])
            r.ended_by = "server"
            return False
        r.stream_sid = self._stream_sid
        sid_json = orjson.dumps(self._stream_sid).decode()
        self._media_pre = '{"event":"media","sequenceNumber":"'
        self._media_mid = f'","streamSid":{sid_json},"media":{{"track":"inbound","chunk":"'
        return True

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _envelope(self, event: str, body: dict[str, Any] | None = None) -> str:
        msg: dict[str, Any] = {
            "event": event,
            "sequenceNumber": str(self._next_seq()),
            "streamSid": self._stream_sid,
        }
        if body is not None:
            msg[event] = body
        return orjson.dumps(msg).decode()

    async def _stream(self) -> None:
        ws = self._ws
        assert ws is not None
        r = self.result
        loop = asyncio.get_running_loop()
        reader: asyncio.Task[None] | None = None
        try:
            await ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
            await ws.send(
                self._envelope(
                    "start",
                    {
                        "accountSid": self.account_sid,
                        "streamSid": self._stream_sid,
                        "callSid": self.call_sid,
                        "tracks": ["inbound"],
                        "mediaFormat": {
                            "encoding": "audio/x-mulaw",
                            "sampleRate": SAMPLE_RATE,
                            "channels": 1,
                        },
                        "customParameters": r.parameters,
                    },
                )
            )
            r.stream_started = loop.time()
            self._stream_status("stream-started")
            reader = loop.create_task(self._reader())
            await self._clock(r.stream_started)
        except websockets.ConnectionClosed:
            self._server_ended()
        finally:
            if reader is not None:
                if self.result.ended_by == "caller":
                    # give the server's close reply a moment, then stop reading
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(reader), 2.5)
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            r.close_code = ws.close_code
            r.close_reason = ws.close_reason or ""
            self._stream_status("stream-stopped")

    def _server_ended(self) -> None:
        if not self._ended:
            self._ended = True
            self.result.ended_by = "server"
            now = asyncio.get_running_loop().time()
            self.result.timeline.append(TimelineEvent(now, "server_closed"))

    async def _clock(self, t0: float) -> None:
        """Tick every frame on an absolute clock: play one frame, send one frame."""
        loop = asyncio.get_running_loop()
        frame_s = self._frame_s
        n = 0
        while not self._ended:
            delay = t0 + n * frame_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                if self._ended:
                    break
            now = loop.time()
            late = now - (t0 + n * frame_s)
            if late > 0.010:  # the simulator itself fell behind (an overloaded event loop)
                self.result.clock_late_ticks += 1
                if late * 1000.0 > self.result.clock_late_max_ms:
                    self.result.clock_late_max_ms = late * 1000.0
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
            n += 1
            frame, flags, utt = step
            if n in self.drop_frames:
                self.result.frames_dropped += 1
                if flags:
                    self._frame_sent(now, flags, utt)
            else:
                due = now
                if self.jitter_ms:
                    due = max(self._last_due, now + self._rng.uniform(0, self.jitter_ms) / 1000)
                    self._last_due = due
                self._pending.append((due, n, frame, flags, utt))
            await self._flush(now)

    async def _flush(self, now: float, *, everything: bool = False) -> None:
        ws = self._ws
        assert ws is not None
        pending = self._pending
        pre, mid = self._media_pre, self._media_mid
        ms = self.frame_ms
        while pending and (everything or pending[0][0] <= now):
            _, n, frame, flags, utt = pending.popleft()
            payload = (
                self._silence_b64
                if frame is self._silence
                else binascii.b2a_base64(frame, newline=False).decode()
            )
            self._seq += 1
            await ws.send(
                f'{pre}{self._seq}{mid}{n}","timestamp":"{(n - 1) * ms}","payload":"{payload}"}}}}'
            )
            self.result.frames_sent += 1
            if flags:
                self._frame_sent(_now(), flags, utt)

    def _frame_sent(self, t: float, flags: int, utt: Utterance | None) -> None:
        r = self.result
        if flags & _F_PROBE:
            if not self._probes:
                self._detector.reset()
            self._probes.append(t)
            r.probes_sent += 1
            r.timeline.append(TimelineEvent(t, "probe_sent"))
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

    # ------------------------------------------------------------------ script

    async def _script_step(self, now: float) -> tuple[bytes, int, Utterance | None] | None:
        """The frame to send this tick (running instant actions first); None = hang up."""
        while True:
            say = self._say
            if say is not None:
                i = say.frame
                say.frame += 1
                fb = self._fb
                frame = say.data[i * fb : (i + 1) * fb]
                if len(frame) < fb:
                    frame += self._silence[len(frame) :]
                flags = (_F_SPEECH_START if i == say.start_frame else 0) | (
                    _F_SPEECH_END if i == say.end_frame else 0
                )
                if say.frame >= say.nframes:
                    self._say = None
                return frame, flags, say.utt
            if self._pause_frames > 0:
                self._pause_frames -= 1
                return self._silence, 0, None
            wait = self._wait
            if wait is not None:
                if self._wait_satisfied(wait, now):
                    self._wait = None
                    continue
                if now >= wait.deadline:
                    self._wait = None
                    name = type(wait.action).__name__
                    self.result.script_errors.append(
                        f"{name} timed out after {wait.action.timeout:g} s"
                    )
                    self.result.timeline.append(TimelineEvent(now, "wait_timeout", name))
                    continue
                return self._silence, 0, None
            if self._script_done:
                if self.on_script_end == "hangup":
                    return None
                return self._silence, 0, None
            action = next(self._actions, None)
            if action is None:
                self._script_done = True
                continue
            if isinstance(action, Say):
                utt = Utterance(action.label)
                self.result.utterances.append(utt)
                self._say = _SayState(self._clips[id(action)], self._fb, utt)
            elif isinstance(action, Pause):
                self._pause_frames = max(0, round(action.ms / self.frame_ms))
            elif isinstance(action, WaitForAgentAudio | WaitForAgentSilence):
                ref = self._last_speech_end
                if ref is None:
                    ref = self.result.stream_started or now
                self._wait = _Wait(action, now + action.timeout, ref)
            elif isinstance(action, PressDigit):
                await self._send_now(
                    self._envelope("dtmf", {"track": "inbound_track", "digit": action.digit})
                )
                self.result.digits_sent.append(TimedName(action.digit, now))
                self.result.timeline.append(TimelineEvent(now, "dtmf", action.digit))
            elif isinstance(action, SendRaw):
                await self._send_now(action.data)
                self.result.timeline.append(TimelineEvent(now, "raw_sent"))
            elif isinstance(action, HangUp):
                self._hangup_action = action
                return None
            elif isinstance(action, Probe):
                return self._probe_frame, _F_PROBE, None
            else:
                raise TypeError(f"unknown script action {action!r}")

    async def _send_now(self, data: str | bytes) -> None:
        """Send out of band (dtmf, raw): flush queued media first so order stays true."""
        await self._flush(0.0, everything=True)
        assert self._ws is not None
        await self._ws.send(data)

    def _wait_satisfied(self, wait: _Wait, now: float) -> bool:
        action = wait.action
        if isinstance(action, WaitForAgentAudio):
            return self._stretch_open and self._reply_heard_ms >= action.min_heard_ms
        last = self._last_loud_end
        return last is not None and last > wait.ref and now - last >= action.silence_ms / 1000

    async def _hang_up(self, action: HangUp, now: float) -> None:
        ws = self._ws
        assert ws is not None
        r = self.result
        self._ended = True
        r.ended_by = "caller"
        r.timeline.append(TimelineEvent(now, "hangup"))
        try:
            await self._flush(now, everything=True)
            if action.abrupt:
                ws.transport.abort()
                return
            if action.send_stop:
                stop = {"accountSid": self.account_sid, "callSid": self.call_sid}
                await ws.send(self._envelope("stop", stop))
            await ws.close(1000)
        except websockets.ConnectionClosed:
            pass

    # ------------------------------------------------------------------ playout

    async def _playout(self, now: float) -> None:
        """Play one frame from Twilio's queue into what the caller hears; echo due marks."""
        marks = self._marks
        if marks and marks[0][0] <= self._played:
            due = []
            while marks and marks[0][0] <= self._played:
                due.append(marks.popleft()[1])
            await self._echo_marks(due, now)
        fb = self._fb
        buf = self._playbuf
        if buf:
            chunk = bytes(buf[:fb])
            del buf[:fb]
            n = len(chunk)
            self._played += n
            self._heard += chunk
            if n < fb:
                self._heard += self._silence[n:]
            loud = len(chunk.translate(None, _QUIET_CODES)) >= _LOUD_SAMPLES_PER_FRAME
        else:
            self._heard += self._silence
            loud = False
        self._agent_audio(now, loud)

    def _agent_audio(self, now: float, loud: bool) -> None:
        """Track agent stretches (audible audio with gaps < agent_gap_ms) for the metrics."""
        r = self.result
        if loud:
            if not self._stretch_open:
                self._stretch_open = True
                self._stretch_start = now
                r.timeline.append(TimelineEvent(now, "agent_audio_start"))
            if self._last_loud_end is None or now - self._last_loud_end >= self._reply_gap_s:
                self._reply_heard_ms = 0.0
            self._reply_heard_ms += self.frame_ms
            self._last_loud_end = now + self._frame_s
            if self._awaiting_response:
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

    async def _echo_marks(self, names: list[str], now: float) -> None:
        ws = self._ws
        assert ws is not None
        r = self.result
        for name in names:
            await ws.send(self._envelope("mark", {"name": name}))
            r.marks_echoed.append(TimedName(name, now))
            r.timeline.append(TimelineEvent(now, "mark_echoed", name))

    # ------------------------------------------------------------------ reader

    async def _reader(self) -> None:
        ws = self._ws
        assert ws is not None
        loop = asyncio.get_running_loop()
        try:
            async for data in ws:
                if self._ended:
                    continue  # after the caller's stop: the stream is over for Twilio
                try:
                    await self._on_frame(data, loop.time())
                except websockets.ConnectionClosed:
                    raise
                except Exception as exc:  # the simulator must record, never crash
                    self._error(f"simulator could not handle a frame: {exc!r}")
        except websockets.ConnectionClosed:
            pass
        self._server_ended()

    def _error(self, text: str) -> None:
        r = self.result
        r.protocol_errors.append(text)
        r.timeline.append(TimelineEvent(asyncio.get_running_loop().time(), "protocol_error", text))

    async def _on_frame(self, data: str | bytes, now: float) -> None:
        if not isinstance(data, str):
            self._error("31950 Malformed Message: binary frames are not accepted")
            return
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._error("31951 Invalid Message: not valid JSON")
            return
        if type(msg) is not dict:
            self._error("31951 Invalid Message: not a JSON object")
            return
        event = msg.get("event")
        allowed = _ALLOWED_KEYS.get(event) if type(event) is str else None
        if allowed is None:
            self._error(f"31951 Invalid Message: unsupported event {str(event)[:40]!r}")
            return
        if msg.get("streamSid") != self._stream_sid:
            sid = str(msg.get("streamSid"))[:40]
            self._error(
                f"31951 Invalid Message: streamSid {sid!r} does not match {self._stream_sid}"
            )
            return
        if self.strict_fields and not allowed.issuperset(msg):
            extra = sorted(set(msg) - allowed)
            self._error(f"31951 Invalid Message: unexpected fields {extra} in {event}")
            return
        if event == "media":
            self._on_media(msg, now)
        elif event == "mark":
            body = msg.get("mark")
            name = body.get("name") if type(body) is dict else None
            if type(body) is not dict or type(name) is not str or not name:
                self._error("31951 Invalid Message: mark needs a non-empty mark.name")
                return
            if self.strict_fields and len(body) != 1:
                self._error("31951 Invalid Message: unexpected fields in mark")
                return
            self.result.marks_received.append(TimedName(name, now))
            self._marks.append((self._enqueued, name))
        else:  # clear
            self.result.clears.append(now)
            self.result.timeline.append(TimelineEvent(now, "clear"))
            self._playbuf.clear()
            self._enqueued = self._played
            if self._marks:
                names = [name for _, name in self._marks]
                self._marks.clear()
                await self._echo_marks(names, now)

    def _on_media(self, msg: dict[str, Any], now: float) -> None:
        body = msg.get("media")
        payload = body.get("payload") if type(body) is dict else None
        if type(body) is not dict or type(payload) is not str:
            self._error("31951 Invalid Message: media needs a string media.payload")
            return
        if self.strict_fields and len(body) != 1:
            self._error(f"31951 Invalid Message: unexpected fields {sorted(body)} in media")
            return
        try:
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError):
            self._error("31951 Invalid Message: media.payload is not valid base64")
            return
        if not audio:
            self._error("31951 Invalid Message: media.payload is empty")
            return
        self._playbuf += audio
        self._enqueued += len(audio)
        self.result.received_media_bytes += len(audio)
        if self._probes:
            onsets = self._detector.feed(ulaw_decode(audio))
            for _ in range(onsets):
                self._probe_heard(now)

    def _probe_heard(self, now: float) -> None:
        probes = self._probes
        r = self.result
        while probes and now - probes[0] > self.probe_timeout:
            probes.popleft()
            r.probes_lost += 1
        if probes:
            r.probe_rtts_ms.append((now - probes.popleft()) * 1000.0)
            r.timeline.append(TimelineEvent(now, "probe_heard"))


def _now() -> float:
    """The running loop's clock (monotonic seconds), the time base of every CallResult."""
    return asyncio.get_running_loop().time()
