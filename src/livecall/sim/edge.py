"""The simulated media edge every carrier's simulator shares: script, clock, playout, metrics.

A carrier's edge (Twilio, Telnyx, Plivo, Exotel…) does the same things around a call whatever
its wire: it fetches the answer document, opens the WebSocket the document names, sends the
caller's audio one frame per tick on an absolute clock (silence between utterances, as a real
line never goes quiet), plays what the app sends back through a real-time playout queue that
honours marks and clears, and hangs up. `SimulatedEdge` is that engine; a carrier's simulator
subclasses it and supplies its side of the wire. What every carrier must say its own way is
abstract here:

- answer: `_webhook` (ask the app, run the answer up to its stream: `result.stream_url`),
  `_after_stream` (what the carrier does once the app closes the socket); `_fail` records a
  refusal, `_stream_status` hears stream-started / -stopped / -error (nothing by default);
- stream: `_open_stream` (`_connect` opens a socket with `STREAM_USER_AGENT`), `_hello`
  (what it sends first: connected, start);
- frames out: `_flush` (the caller's due frames in the carrier's format), `_dtmf_message`,
  `_mark_echo(name)`, `_stop_frame()` (None: just close);
- frames in: `_on_frame(data, now)`, built from `_read_json` (binary, JSON, event, stream id
  and strict-field checks), `_media_payload`, `_mark_name`, and the playout helpers
  `_queue_audio`, `_queue_mark`, `_clear_queue`; refusals go through `_refuse`, which a
  carrier turns into its error codes (or an error frame back, as Telnyx does).

Where several carriers do one of these the same way (a signed form webhook and an XML answer,
a socket opened in one attempt, one message per frame, JSON envelopes), that way is a part in
`sim.edge_parts` that a simulator mixes in, with the narrower hooks it needs.

Everything is measured the same way for every carrier (`CallResult`, see `sim.script`).
Cost: one clock task and one reader task per call, frame JSON built from precomputed
templates, so a process can drive well over a hundred calls at once.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import random
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import httpx
import numpy as np
import numpy.typing as npt
import orjson
import soxr
import websockets
from websockets.asyncio.client import ClientConnection, connect

from livecall.audio.g711 import ULAW_DECODE_TABLE, ulaw_decode, ulaw_encode
from livecall.sim.script import (
    SAMPLE_RATE,
    CallResult,
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

__all__ = ["SAMPLE_RATE", "RefusalKind", "SimulatedEdge", "ToneDetector"]

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

# What kind of rule a refused frame broke, for carriers whose error codes tell them apart.
RefusalKind = Literal["binary", "invalid", "media"]


# --------------------------------------------------------------------------- helpers


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


class ToneDetector:
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


def _now() -> float:
    """The running loop's clock (monotonic seconds), the time base of every CallResult."""
    return asyncio.get_running_loop().time()


# --------------------------------------------------------------------------- the edge


class SimulatedEdge(ABC):
    """One simulated inbound call through a carrier's media edge (see the module docstring).

    `base_url` is the app's HTTP base; the answer webhook goes to `base_url + webhook_path`.
    `drop_frames` lists chunk numbers (from 1) never sent (chunk and timestamp skip, like
    upstream loss); `jitter_ms` delays each frame by up to that much, in order, so frames
    bunch at the ticks as they do after network jitter. After the script ends the caller hangs
    up (`on_script_end="hangup"`) or stays on the line until the app ends the call ("wait").

    Agent audio is what the caller hears from the app that is audible; a *stretch* is such
    audio with no gap of `agent_gap_ms` (it ends when the agent stops: barge-in timing), a
    *reply* allows gaps up to `agent_reply_gap_ms` (what `WaitForAgentAudio` counts).
    """

    STREAM_USER_AGENT: ClassVar[str | None] = None  # None: the websockets library's own
    # Frames in: the stream id's key(s), the events whose frames must carry it, the refusals'
    # texts (`{event}`, `{key}`, `{sid}`, `{ours}` are filled in).
    SID_KEYS: ClassVar[tuple[str, ...]] = ("streamSid",)
    SID_REQUIRED: ClassVar[frozenset[str]] = frozenset()
    SID_MISMATCH: ClassVar[str] = "{key} {sid!r} does not match {ours}"
    SID_MISSING: ClassVar[str] = "{event} needs the {key}"
    BINARY_REFUSED: ClassVar[str] = "binary frames are not accepted"
    NOT_OBJECT: ClassVar[str] = "not a JSON object"

    def __init__(
        self,
        base_url: str,
        *,
        call_sid: str,
        account_sid: str,
        from_: str = "+15550001111",
        to: str = "+15550002222",
        script: Sequence[ScriptAction] = (),
        webhook_path: str = "/",
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
    ) -> None:
        if frame_ms <= 0 or (SAMPLE_RATE * frame_ms) % 1000:
            raise ValueError(f"frame_ms must give a whole number of samples, got {frame_ms}")
        for action in script:
            if isinstance(action, PressDigit) and action.digit not in _DTMF_DIGITS:
                raise ValueError(f"not a DTMF digit: {action.digit!r}")
        self.base_url = base_url.rstrip("/")
        self.webhook_url = self.base_url + "/" + webhook_path.lstrip("/")
        self.from_ = from_
        self.to = to
        self.call_sid = call_sid
        self.account_sid = account_sid
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
        self._carrier_ends = False
        self._hangup_action: HangUp | None = None
        self._bg: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        # outbound
        self._pending: deque[tuple[float, int, bytes, int, Utterance | None]] = deque()
        self._last_due = 0.0
        self._actions = iter(self.script)
        self._say: _SayState | None = None
        self._pause_frames = 0
        self._wait: _Wait | None = None
        self._script_done = False
        # playout (what the carrier plays to the caller)
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
        self._detector = ToneDetector()

    # ------------------------------------------------------------------ entry point

    async def run(self) -> CallResult:
        """Run the whole call (webhook, stream, script) and return what happened."""
        if self._ran:
            raise RuntimeError("a simulated caller runs one call; make a new one for the next")
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
        if self.result.ended_by == "server" and self.result.carrier_action is None:
            await self._after_stream()  # (a call the carrier moved on runs no more verbs)

    # ------------------------------------------------------------------ answer

    @abstractmethod
    async def _webhook(self) -> bool:
        """Ask the app how to answer, as the carrier does, and run the answer up to its
        stream: its URL in `result.stream_url` (None: the call ended without one) and what
        follows it kept for `_after_stream`. False once the call is over (`_fail` says why)."""

    @abstractmethod
    async def _after_stream(self) -> None:
        """The app closed the socket: the carrier goes on with what follows the stream."""

    def _fail(self, text: str) -> bool:
        """The carrier refuses to go on: record why; the call is over (False, for returns)."""
        self.result.protocol_errors.append(text)
        self.result.ended_by = "server"
        return False

    def _stream_status(self, event: str, error: str | None = None) -> None:
        """The stream's status callbacks (stream-started / -stopped / -error), for a carrier
        whose answer asks for them; a carrier without any (Exotel) keeps this: nothing."""
        return None

    # ------------------------------------------------------------------ stream

    @abstractmethod
    async def _open_stream(self) -> bool:
        """Open the WebSocket `result.stream_url` names, as the carrier does: `_ws`,
        `_stream_sid` and `result.stream_sid` set; False (recorded, the call over) if not."""

    @abstractmethod
    async def _hello(self, ws: ClientConnection) -> None:
        """What the carrier sends before the caller's audio (connected, start)."""

    async def _connect(self, url: str, headers: Mapping[str, str]) -> ClientConnection:
        """The stream's WebSocket as a carrier opens it: its User-Agent, no compression, proxy
        or pings, this caller's message size limit (a carrier that retries calls it again)."""
        options: dict[str, Any] = {}
        if self.STREAM_USER_AGENT is not None:
            options["user_agent_header"] = self.STREAM_USER_AGENT
        return await connect(
            url,
            additional_headers=headers,
            compression=None,
            proxy=None,
            ping_interval=None,
            open_timeout=10,
            close_timeout=2,
            max_size=self.max_message_bytes,
            **options,
        )

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    @abstractmethod
    def _dtmf_message(self, digit: str) -> str:
        """The carrier's message for the caller's key press `digit`."""

    @abstractmethod
    def _mark_echo(self, name: str) -> str:
        """What the carrier sends back once a mark has played."""

    @abstractmethod
    def _stop_frame(self) -> str | None:
        """What the carrier sends when the caller hangs up (None: it just closes)."""

    async def _stream(self) -> None:
        ws = self._ws
        assert ws is not None
        r = self.result
        loop = asyncio.get_running_loop()
        reader: asyncio.Task[None] | None = None
        try:
            await self._hello(ws)
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
            self.result.timeline.append(TimelineEvent(_now(), "server_closed"))

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
            if self._carrier_ends:
                await self._carrier_stop(now)
                return
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

    @abstractmethod
    async def _flush(self, now: float, *, everything: bool = False) -> None:
        """Send the caller's frames in `_pending` due by `now` (all with `everything`), in
        order, as the carrier carries them: count `result.frames_sent`, and pass each frame's
        flags to `_frame_sent` with the time it went."""

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
                await self._send_now(self._dtmf_message(action.digit))
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

    def end_from_carrier(self, action: str, target: str | None = None) -> None:
        """The carrier took the call off the stream (`action` "hangup", or "transfer" to
        `target`) through its REST API: at the next tick the stream ends with the carrier's
        `stop`, as the carrier ends it. Kept in `CallResult.carrier_action`/`transferred_to`
        even when the stream was already over."""
        r = self.result
        if r.carrier_action is None:
            r.carrier_action, r.transferred_to = action, target
        self._carrier_ends = True

    async def _carrier_stop(self, now: float) -> None:
        """The carrier's end of the stream: its stop frame and a close (no caller hang-up)."""
        await self._hang_up(HangUp(), now)
        self.result.ended_by = "server"  # not the caller: the call left the stream
        action = self.result.carrier_action or "hangup"
        self.result.timeline.append(TimelineEvent(now, f"carrier_{action}"))

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
                stop = self._stop_frame()
                if stop is not None:
                    await ws.send(stop)
            await ws.close(1000)
        except websockets.ConnectionClosed:
            pass

    # ------------------------------------------------------------------ playout

    async def _playout(self, now: float) -> None:
        """Play one frame from the carrier's queue into what the caller hears; echo due marks."""
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
            await ws.send(self._mark_echo(name))
            r.marks_echoed.append(TimedName(name, now))
            r.timeline.append(TimelineEvent(now, "mark_echoed", name))

    def _queue_audio(self, ulaw: bytes, now: float, *, wire_bytes: int | None = None) -> None:
        """Queue the app's audio (μ-law 8 kHz) for playout; `wire_bytes`: its size as sent."""
        self._playbuf += ulaw
        self._enqueued += len(ulaw)
        self.result.received_media_bytes += len(ulaw) if wire_bytes is None else wire_bytes
        if self._probes:
            for _ in range(self._detector.feed(ulaw_decode(ulaw))):
                self._probe_heard(now)

    def _queue_mark(self, name: str, now: float) -> None:
        """A mark after what is queued: echoed once that has played (at once if nothing is)."""
        self.result.marks_received.append(TimedName(name, now))
        self._marks.append((self._enqueued, name))

    async def _clear_queue(self, now: float, *, echo_marks: bool = True) -> None:
        """Barge-in: drop what is queued; its marks come back at once, or never (`echo_marks`)."""
        self.result.clears.append(now)
        self.result.timeline.append(TimelineEvent(now, "clear"))
        self._playbuf.clear()
        self._enqueued = self._played
        if self._marks:
            names = [name for _, name in self._marks]
            self._marks.clear()
            if echo_marks:
                await self._echo_marks(names, now)

    # ------------------------------------------------------------------ reader

    async def _reader(self) -> None:
        ws = self._ws
        assert ws is not None
        loop = asyncio.get_running_loop()
        try:
            async for data in ws:
                if self._ended:
                    continue  # after the caller's stop: the stream is over for the carrier
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
        r.timeline.append(TimelineEvent(_now(), "protocol_error", text))

    async def _refuse(self, detail: str, kind: RefusalKind = "invalid") -> None:
        """A frame the carrier would not take: recorded; a carrier adds its code or answers."""
        self._error(detail)

    @abstractmethod
    async def _on_frame(self, data: str | bytes, now: float) -> None:
        """One frame from the app: check it as the carrier would, then act on it."""

    async def _read_json(
        self, data: str | bytes, allowed_keys: Mapping[str, frozenset[str]]
    ) -> tuple[str, dict[str, Any]] | None:
        """The checks every JSON edge makes, in order: a text frame, a JSON object, an event it
        knows (`allowed_keys` maps each to the fields it may carry), this stream's id, no
        unknown fields (`strict_fields`). (event, message), or None once refused."""
        if not isinstance(data, str):
            await self._refuse(self.BINARY_REFUSED, "binary")
            return None
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            await self._refuse("not valid JSON")
            return None
        if type(msg) is not dict:
            await self._refuse(self.NOT_OBJECT)
            return None
        event = msg.get("event")
        allowed = allowed_keys.get(event) if type(event) is str else None
        if allowed is None:
            await self._refuse(f"unsupported event {str(event)[:40]!r}")
            return None
        assert type(event) is str
        key = self.SID_KEYS[0]
        sid = None
        for name in self.SID_KEYS:
            if name in msg:
                key, sid = name, msg[name]
                break
        if sid is None and event in self.SID_REQUIRED:
            await self._refuse(self.SID_MISSING.format(event=event, key=key))
            return None
        if sid is not None and sid != self._stream_sid:
            text = self.SID_MISMATCH.format(
                event=event, key=key, sid=str(sid)[:40], ours=self._stream_sid
            )
            await self._refuse(text)
            return None
        if self.strict_fields and not allowed.issuperset(msg):
            await self._refuse(f"unexpected fields {sorted(set(msg) - allowed)} in {event}")
            return None
        return event, msg

    async def _mark_name(self, msg: Mapping[str, Any]) -> str | None:
        """A `mark` frame's `mark.name` (None once refused: missing, empty, extra fields)."""
        body = msg.get("mark")
        name = body.get("name") if type(body) is dict else None
        if type(name) is not str or not name:
            await self._refuse("mark needs a non-empty mark.name")
            return None
        return name

    async def _media_payload(
        self, msg: Mapping[str, Any], body_keys: frozenset[str]
    ) -> bytes | None:
        """A `media` frame's decoded `media.payload` (None once refused); `body_keys`: the
        fields `media` may carry."""
        body = msg.get("media")
        payload = body.get("payload") if type(body) is dict else None
        if type(payload) is not str:
            await self._refuse("media needs a string media.payload")
            return None
        assert type(body) is dict
        if self.strict_fields and not body_keys.issuperset(body):
            await self._refuse(f"unexpected fields {sorted(body)} in media")
            return None
        try:
            return binascii.a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError):
            await self._refuse("media.payload is not valid base64", "media")
            return None

    def _probe_heard(self, now: float) -> None:
        probes = self._probes
        r = self.result
        while probes and now - probes[0] > self.probe_timeout:
            probes.popleft()
            r.probes_lost += 1
        if probes:
            r.probe_rtts_ms.append((now - probes.popleft()) * 1000.0)
            r.timeline.append(TimelineEvent(now, "probe_heard"))
