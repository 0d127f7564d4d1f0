"""A fake Gemini Live server (BidiGenerateContent over WebSocket) for tests, demos and benchmarks.

Google cannot be reached from here or from CI, so livecall talks to this instead: the real
`google-genai` SDK connects to it over ``wss://`` (trusting a throwaway `TestCA`) exactly as it
would to ``generativelanguage.googleapis.com``. It is deliberately faithful to the wire protocol
(docs/protocols.md section 2): strict where the service is strict (first frame must be `setup`,
unknown field names and bad payloads close 1007, unknown models and bad resumption handles 1008),
tolerant where it is tolerant (snake_case or camelCase keys, standard or URL-safe base64, padded
or not). It only ever sends keys the SDK knows, since unknown ones make the SDK raise.

Two behaviours (`Scenario.mode`):

* ``"assistant"``: an energy VAD finds the caller's utterances in the 16 kHz input, a fake ASR
  recognizes which library clip (`livecall.sim.clips.CALLER_CLIPS`) was spoken, and the agent
  answers with the scripted clip as bursty 24 kHz audio with transcripts, `generationComplete`,
  `turnComplete` + `usageMetadata` and session resumption handles. Caller speech during a reply
  interrupts it (`interrupted`, then `turnComplete`).
* ``"echo"``: every audio chunk comes straight back as 24 kHz model audio, for latency
  measurement; cheap enough for 100+ concurrent sessions.

Faults for resilience tests (tool calls, `goAway`, scripted closes, stalls, slow replies, refused
or expired handles) are scripted in the `Scenario`. Everything a session did is kept in a
`SessionRecord` (`FakeGeminiServer.sessions`) so tests can assert on it, and
`FakeGeminiServer.wait_for` waits on any condition over those records without sleeping.

The same port answers ``POST /{version}/models/{model}:generateContent`` (post-call analysis):
see `livecall.sim.gemini_text` (`FakeGeminiServer.text`).

Run standalone with ``python -m livecall.sim.gemini --port 8765``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import random
import re
import secrets
import shutil
import signal
import ssl
import tempfile
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

import numpy as np
import numpy.typing as npt
import orjson
import soxr
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from livecall.sim.clips import AGENT_CLIPS, CALLER_CLIPS, Clip, load_clip
from livecall.sim.gemini_text import FakeTextModel, Sniffer
from livecall.sim.tls import TestCA

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_REPLIES",
    "INAUDIBLE",
    "UNKNOWN",
    "ClipRecognizer",
    "CloseFault",
    "EnergyVad",
    "Event",
    "FakeGeminiServer",
    "GoAwayFault",
    "Scenario",
    "SessionRecord",
    "SlowFault",
    "StallFault",
    "ToolCallFault",
    "ToolResponseRecord",
    "TurnEndFault",
    "TurnRecord",
    "main",
]

log = logging.getLogger("livecall.sim.gemini")

INPUT_RATE = 16000
OUTPUT_RATE = 24000
_OUT_BYTES_PER_S = OUTPUT_RATE * 2
OUTPUT_MIME = "audio/pcm;rate=24000"

DEFAULT_MODELS = frozenset(
    {
        "gemini-3.8-live",
        "gemini-3.1-flash-live-preview",
        "gemini-2.5-flash-native-audio-preview-12-2025",
        "gemini-live-2.5-flash-native-audio",  # the Vertex AI name
    }
)
SIM_MODEL_PREFIX = "sim-"

UNKNOWN = "unknown"
"""Key in `Scenario.replies` for an utterance the fake ASR could not place."""
INAUDIBLE = "(inaudible)"
"""Input transcription sent for such an utterance."""

DEFAULT_REPLIES: Mapping[str, str | None] = {
    "book": "book_reply",
    "time": "time_reply",
    "hours": "hours_reply",
    "yes": "goodbye",
    UNKNOWN: "sorry",
}

CLOSE_INVALID = 1007  # INVALID_ARGUMENT
CLOSE_POLICY = 1008  # NOT_FOUND / PERMISSION_DENIED / FAILED_PRECONDITION
CLOSE_INTERNAL = 1011  # INTERNAL / UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED

AUDIO_TOKENS_PER_S = 32  # what the Gemini docs quote for audio input

# --------------------------------------------------------------------------------------------
# Scenario: how the fake model behaves
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolCallFault:
    """Send a `toolCall` after caller turn `after_caller_turn`, wait for its `toolResponse`.

    Turn numbers count the caller's utterances over the whole conversation (1-based, carried
    across session resumption). The reply after the response is `reply`, or the turn's normal
    reply. Caller speech while the call is pending sends `toolCallCancellation {ids}`, then
    `interrupted` and `turnComplete` as for any barge-in.
    """

    after_caller_turn: int
    name: str = "lookup"
    args: Mapping[str, Any] = field(default_factory=dict)
    call_id: str | None = None  # default: a fresh "function-call-<n>"
    say_first: str | None = None  # agent clip spoken before the call ("one_moment")
    reply: str | None = None
    session: int | None = None  # SessionRecord.index it applies to; None: every session


@dataclass(frozen=True, slots=True)
class GoAwayFault:
    """`goAway {timeLeft}` `after` seconds into a session, then close when the time is up."""

    after: float
    time_left: float = 5.0
    close_code: int = 1000
    close_reason: str = ""
    session: int | None = None
    max_fires: int | None = None  # over the server's life; None: unlimited


ClientMessageKind = Literal["setup", "realtimeInput", "clientContent", "toolResponse", "any"]


@dataclass(frozen=True, slots=True)
class CloseFault:
    """Close the connection with `code`: at `at` seconds into a session, during a reply, or
    when the session receives a given client message.

    `during_reply` counts model replies over the conversation (1-based, the greeting included);
    the close comes after `after_audio` seconds of that reply's audio were sent.
    `on_message` closes the session instead of acting on its `nth` client message of that kind
    ("setup": the handshake fails, no `setupComplete`; "any": any kind after the setup).
    `drop` cuts the TCP connection without a close frame (the client sees 1006), as a lost
    network path or a crashed frontend does. By default a fault fires once (else a resumed
    session would meet the same fault again, forever).
    """

    code: int = CLOSE_INTERNAL
    reason: str = "Internal error encountered."
    at: float | None = None
    during_reply: int | None = None
    after_audio: float = 0.5
    session: int | None = None
    max_fires: int | None = 1
    on_message: ClientMessageKind | None = None
    nth: int = 1
    drop: bool = False


@dataclass(frozen=True, slots=True)
class StallFault:
    """Reply `reply` (as in `CloseFault`) never comes, or stops after `after_audio` seconds.

    From then on the session sends nothing at all, but the socket stays open and input is still
    read and recorded: what a hung backend looks like from the client.
    """

    reply: int
    after_audio: float | None = None
    session: int | None = None
    max_fires: int | None = 1


@dataclass(frozen=True, slots=True)
class SlowFault:
    """Send reply audio at `rate` x real time (below 1.0: the caller's playout will starve)."""

    rate: float
    reply: int | None = None  # None: every reply
    session: int | None = None


@dataclass(frozen=True, slots=True)
class TurnEndFault:
    """Reply `reply` (as in `CloseFault`) ends as the service ends a turn it failed or holds:
    `turnComplete` with `turnCompleteReason: reason`, `waitingForInput` and
    `interactionStatus` when set (None: the key is not sent).

    `speak=False` (the default): the reply's audio and any tool call are never sent, as with
    MALFORMED_FUNCTION_CALL or RESPONSE_REJECTED; no `generationComplete` either. `then`: an
    agent clip that follows `then_after` seconds later as a turn of its own, ending IDLE (the
    background work an IN_PROGRESS status announced).
    """

    reply: int
    reason: str | None = "MALFORMED_FUNCTION_CALL"
    speak: bool = False
    waiting_for_input: bool = False
    interaction_status: str | None = None
    then: str | None = None
    then_after: float = 0.5
    session: int | None = None
    max_fires: int | None = 1


@dataclass(slots=True)
class Scenario:
    """What the fake model says and does. Shared by all sessions of a server (swap it freely:
    a new scenario applies to sessions opened afterwards)."""

    mode: Literal["assistant", "echo"] = "assistant"
    echo_min_peak: int = 0
    """Echo mode: a chunk whose peak |sample| is below this is not echoed (0: echo all), so a
    load test's silence never queues ahead of its probes at the caller's ear."""
    # --- what the agent answers
    replies: Mapping[str, str | None] = field(default_factory=lambda: dict(DEFAULT_REPLIES))
    """Caller clip name -> agent clip name (`UNKNOWN` for unrecognized speech; None: no reply)."""
    reply_sequence: Sequence[str | None] | None = None
    """Ordered list mode: caller turn N gets item N-1; past its end `replies` applies."""
    greeting: str | None = "greeting"
    """Clip for the first text turn (clientContent with turnComplete, or realtime text)."""
    text_replies: Mapping[str, str | None] = field(default_factory=dict)
    """Case-insensitive substring of a text input -> clip, e.g. {"pressed": "one_moment"}."""
    default_text_reply: str | None = None
    """Clip for any other text turn after the greeting (None: recorded, not answered)."""
    # --- how the audio comes out
    rate: float | None = 1.3
    """Average send rate of reply audio in x real time; None: as fast as possible."""
    first_audio_delay: float = 0.3
    """Seconds of "thinking" between the end of the caller's turn and the first audio."""
    chunk_ms: tuple[float, float] = (10.0, 120.0)
    burst_s: tuple[float, float] = (0.05, 0.4)
    """How far ahead of the average rate a burst may run before the sender waits."""
    pause_prob: float = 0.03
    pause_s: tuple[float, float] = (0.05, 0.3)
    """Per chunk, the chance of a hiccup of this length; a burst catches up afterwards, so the
    average rate holds but the stream can fall behind real time for a moment."""
    interim_transcripts: bool = False
    """With input transcription on: `interimInputTranscription` guesses (the words so far, a
    few more each time) before the final `inputTranscription` of each utterance. They come
    when the utterance ends, not while it lasts: the fake ASR needs the whole of it."""
    interaction_status: str | None = None
    """`interactionStatus` sent with every `turnComplete` ("IDLE"; None: not sent)."""
    transcript_with_audio: bool = False
    """Output transcription rides in the audio message (newer models) instead of its own."""
    binary_frames: bool = True
    """Send JSON in binary frames as the real service does (False: text frames)."""
    send_session_id: bool = False
    seed: int | None = None
    # --- VAD defaults when the setup does not say
    vad_threshold_db: float = -45.0
    silence_ms: int = 500
    prefix_ms: int = 20
    # --- session resumption
    resumption_updates_during_turn: bool = True
    """Send a non-resumable `sessionResumptionUpdate` ({}) when a reply starts."""
    exclusive_resume: bool = False
    """Refuse (1008) to resume a conversation that another live session is carrying on."""
    refuse_resume: bool = False
    refuse_resume_code: int = CLOSE_POLICY
    """The close code of a refused resumption (gemini-3.8-live after its 58:00 close: 1007)."""
    handle_ttl: float | None = 7200.0
    # --- model behaviour
    hold_after_partial_content: bool = False
    """gemini-3.8-live: after `clientContent` with `turnComplete: false` the model waits for
    follow-up content; replies to caller speech are held until a `clientContent` with
    `turnComplete: true` (or realtime text) arrives."""
    # --- faults
    tool_calls: Sequence[ToolCallFault] = ()
    go_aways: Sequence[GoAwayFault] = ()
    closes: Sequence[CloseFault] = ()
    stalls: Sequence[StallFault] = ()
    slow: Sequence[SlowFault] = ()
    turn_ends: Sequence[TurnEndFault] = ()

    def __post_init__(self) -> None:
        """Fail at construction, not mid-call, on a misspelled clip or mode."""
        if self.mode not in ("assistant", "echo"):
            raise ValueError(f"unknown mode {self.mode!r}")
        named = [
            *self.replies.values(),
            *(self.reply_sequence or ()),
            self.greeting,
            *self.text_replies.values(),
            self.default_text_reply,
            *(c for f in self.tool_calls for c in (f.say_first, f.reply)),
            *(f.then for f in self.turn_ends),
        ]
        unknown = sorted({n for n in named if n is not None and n not in AGENT_CLIPS})
        if unknown:
            raise ValueError(f"unknown agent clip(s) {unknown}; known: {sorted(AGENT_CLIPS)}")


# --------------------------------------------------------------------------------------------
# Records: what happened, for assertions
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Event:
    """One moment of a session's timeline (`t` is `time.monotonic()`)."""

    t: float
    kind: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ToolResponseRecord:
    id: str | None
    name: str | None
    response: Any
    received_at: float
    latency: float | None  # seconds since the matching toolCall was sent
    scheduling: str | None = None  # as sent ("SILENT", "WHEN_IDLE", "INTERRUPT"), None: absent


@dataclass(slots=True)
class TurnRecord:
    """One model reply."""

    number: int  # model replies over the conversation, 1-based (carried across resumption)
    trigger: str  # "speech" | "activity" | "text" | "client_content"
    caller_turn: int | None  # caller utterances over the conversation, 1-based
    caller_clip: str | None  # what the fake ASR recognized (None: unknown)
    transcript: str | None  # input transcription sent for it
    reply_clip: str | None
    started_at: float
    first_audio_at: float | None = None
    ended_at: float | None = None
    audio_bytes_sent: int = 0
    audio_chunks_sent: int = 0
    text_sent: str = ""  # output transcription (or TEXT reply) sent so far
    tool_call_ids: list[str] = field(default_factory=list)
    interrupted: bool = False
    completed: bool = False
    usage: dict[str, Any] | None = None


@dataclass(slots=True)
class SessionRecord:
    """Everything one WebSocket session did. Never holds a key or token value."""

    index: int
    path: str
    api_version: str | None
    method: str  # BidiGenerateContent | BidiGenerateContentConstrained | vertex
    auth: str | None  # "x-goog-api-key" | "key-param" | "token" | "bearer" | None
    has_api_key: bool
    user_agent: str | None
    api_client: str | None  # the x-goog-api-client header (SDK name and version)
    opened_at: float
    setup: dict[str, Any] | None = None  # normalized to camelCase
    model: str | None = None  # without "models/"
    setup_completed: bool = False
    resumption_enabled: bool = False
    resumed: bool = False
    chain: int | None = None  # conversation id, shared by sessions resumed from each other
    context_window_compression: dict[str, Any] | None = None
    messages_received: int = 0
    messages_sent: int = 0
    audio_bytes_received: int = 0  # as sent by the client (any rate)
    audio_chunks_received: int = 0
    received_audio: bytearray = field(default_factory=bytearray)  # PCM16LE 16 kHz
    video_frames_received: int = 0
    audio_stream_ends: int = 0
    texts: list[str] = field(default_factory=list)  # realtimeInput.text, in order
    client_contents: list[dict[str, Any]] = field(default_factory=list)
    input_transcripts: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_responses: list[ToolResponseRecord] = field(default_factory=list)
    tool_cancellations: list[str] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    handles: list[str] = field(default_factory=list)  # resumable handles sent, in order
    audio_bytes_sent: int = 0
    audio_chunks_sent: int = 0
    events: list[Event] = field(default_factory=list)
    events_dropped: int = 0
    stalled: bool = False
    closed: bool = False
    closed_at: float | None = None
    close_code: int | None = None
    close_reason: str | None = None
    closed_by: str | None = None  # "server" | "client"

    def kinds(self) -> list[str]:
        """Event kinds in order, for quick assertions."""
        return [e.kind for e in self.events]

    def events_of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    @property
    def caller_turns(self) -> int:
        """Caller utterances in the conversation so far (including resumed history)."""
        return max((t.caller_turn or 0 for t in self.turns), default=0)

    @property
    def audio_bytes_sent_per_turn(self) -> list[int]:
        return [t.audio_bytes_sent for t in self.turns]

    @property
    def received_seconds(self) -> float:
        return len(self.received_audio) / (2 * INPUT_RATE)


# --------------------------------------------------------------------------------------------
# Audio analysis: VAD and fake ASR
# --------------------------------------------------------------------------------------------

Int16Array = npt.NDArray[np.int16]


def _db_to_power(db: float) -> float:
    return float((32768.0 * 10 ** (db / 20)) ** 2)


class EnergyVad:
    """Energy voice activity detector over 10 ms frames of 16 kHz PCM16.

    Speech starts after `prefix_ms` of consecutive frames above the threshold and ends after
    `silence_ms` of frames below it minus a 5 dB hysteresis. It counts audio time, not wall
    time, so a client may send faster than real time. Each finished utterance comes back with
    up to `preroll_ms` of audio from before the start, capped at `max_utterance_s`.
    """

    FRAME = INPUT_RATE // 100

    def __init__(
        self,
        *,
        threshold_db: float = -45.0,
        end_threshold_db: float | None = None,
        prefix_ms: int = 20,
        silence_ms: int = 500,
        preroll_ms: int = 300,
        max_utterance_s: float = 30.0,
    ) -> None:
        self._start_power = _db_to_power(threshold_db)
        end_db = threshold_db - 5.0 if end_threshold_db is None else end_threshold_db
        self._end_power = _db_to_power(end_db)
        self._prefix = max(1, round(prefix_ms / 10))
        self._silence = max(1, round(silence_ms / 10))
        self._pre: deque[Int16Array] = deque(maxlen=max(1, preroll_ms // 10))
        self._utt: deque[Int16Array] = deque(maxlen=int(max_utterance_s * 100))
        self._rest: Int16Array = np.empty(0, np.int16)
        self._voiced = 0
        self._quiet = 0
        self.in_speech = False
        self.samples_seen = 0

    def feed(self, pcm: Int16Array) -> list[tuple[str, Int16Array | None]]:
        """Consume samples; return ("start", None) / ("end", utterance) events in order."""
        if self._rest.size:
            pcm = np.concatenate((self._rest, pcm))
        f = self.FRAME
        n = len(pcm) // f
        self._rest = pcm[n * f :].copy()
        if n == 0:
            return []
        frames = pcm[: n * f].reshape(n, f)
        flt = frames.astype(np.float32)
        power = np.einsum("ij,ij->i", flt, flt) / f
        loud = (power > self._start_power).tolist()
        quiet = (power < self._end_power).tolist()
        events: list[tuple[str, Int16Array | None]] = []
        for i in range(n):
            self.samples_seen += f
            if not self.in_speech:
                self._pre.append(frames[i])
                self._voiced = self._voiced + 1 if loud[i] else 0
                if self._voiced >= self._prefix:
                    self.in_speech = True
                    self._quiet = 0
                    self._utt.clear()
                    self._utt.extend(self._pre)
                    self._pre.clear()
                    events.append(("start", None))
            else:
                self._utt.append(frames[i])
                self._quiet = self._quiet + 1 if quiet[i] else 0
                if self._quiet >= self._silence:
                    events.append(("end", self._finish()))
        return events

    def end_now(self) -> Int16Array | None:
        """Force the end of the current utterance (audioStreamEnd); None if none is open."""
        return self._finish() if self.in_speech else None

    def _finish(self) -> Int16Array:
        self.in_speech = False
        self._voiced = 0
        self._quiet = 0
        utt = np.concatenate(list(self._utt)) if self._utt else np.empty(0, np.int16)
        self._utt.clear()
        return utt


def _mel_bank(n_fft: int, rate: int, bands: int, lo: float, hi: float) -> npt.NDArray[np.float32]:
    def mel(f: npt.ArrayLike) -> Any:
        return 2595 * np.log10(1 + np.asarray(f) / 700)

    def hz(m: npt.ArrayLike) -> Any:
        return 700 * (10 ** (np.asarray(m) / 2595) - 1)

    edges = hz(np.linspace(mel(lo), mel(hi), bands + 2))
    freqs = np.fft.rfftfreq(n_fft, 1 / rate)
    bank = np.zeros((len(freqs), bands), np.float32)
    for b in range(bands):
        left, mid, right = edges[b : b + 3]
        rise = (freqs - left) / (mid - left)
        fall = (right - freqs) / (right - mid)
        bank[:, b] = np.clip(np.minimum(rise, fall), 0, None)
    return bank


class ClipRecognizer:
    """Fake ASR: which library clip does an utterance sound like?

    Compares log mel-band energies (25 ms frames, 10 ms hop, 100-3800 Hz: what survives a phone
    line), silence-trimmed and mean-normalized per band, by normalized correlation over a small
    range of time offsets. Robust to μ-law, resampling, gain and leading/trailing silence; an
    utterance that matches nothing above `threshold` is unknown. It only tells apart the clips it
    knows, which is all a simulator needs.
    """

    _WIN = 400
    _HOP = 160
    _NFFT = 512

    def __init__(self, clips: Mapping[str, Clip] = CALLER_CLIPS, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self._bank = _mel_bank(self._NFFT, INPUT_RATE, 20, 100.0, 3800.0)
        self._window = np.hanning(self._WIN).astype(np.float32)
        self._library: dict[str, npt.NDArray[np.float32]] = {}
        for name in clips:
            samples, rate = load_clip(name)
            if rate != INPUT_RATE:
                samples = soxr.resample(samples, rate, INPUT_RATE, quality="HQ")
            feats = self.features(samples)
            if feats is not None:
                self._library[name] = feats

    def features(self, pcm: Int16Array) -> npt.NDArray[np.float32] | None:
        """Trimmed, mean-normalized log band energies of 16 kHz audio (None: nothing there)."""
        x = pcm.astype(np.float32) / 32768.0
        n = 1 + (len(x) - self._WIN) // self._HOP
        if n < 5:
            return None
        idx = np.arange(self._WIN)[None, :] + self._HOP * np.arange(n)[:, None]
        frames = x[idx]
        level = 10 * np.log10(np.mean(frames * frames, axis=1) + 1e-10)
        keep = np.nonzero(level > max(float(level.max()) - 35.0, -55.0))[0]
        if len(keep) < 5:
            return None
        frames = frames[keep[0] : keep[-1] + 1]
        spec = np.abs(np.fft.rfft(frames * self._window, n=self._NFFT)) ** 2
        feats = np.log10(spec.astype(np.float32) @ self._bank + 1e-8)
        feats -= feats.mean(axis=0)
        return feats

    @staticmethod
    def similarity(
        a: npt.NDArray[np.float32], b: npt.NDArray[np.float32], max_lag: int = 20
    ) -> float:
        """Best normalized correlation over offsets, scaled down by any length mismatch."""
        longest = max(len(a), len(b))
        if min(len(a), len(b)) < 0.6 * longest:
            return 0.0
        best = 0.0
        for lag in range(-max_lag, max_lag + 1):
            x, y = (a[lag:], b) if lag >= 0 else (a, b[-lag:])
            n = min(len(x), len(y))
            if n < 5:
                continue
            x, y = x[:n], y[:n]
            denom = float(np.sqrt(np.sum(x * x) * np.sum(y * y)))
            if denom <= 0:
                continue
            best = max(best, float(np.sum(x * y)) / denom * n / longest)
        return best

    def scores(self, pcm: Int16Array) -> dict[str, float]:
        feats = self.features(pcm)
        if feats is None:
            return {name: 0.0 for name in self._library}
        return {name: self.similarity(feats, ref) for name, ref in self._library.items()}

    def recognize(self, pcm: Int16Array) -> tuple[str | None, float]:
        """(clip name or None, score) for 16 kHz PCM16 audio."""
        scores = self.scores(pcm)
        if not scores:
            return None, 0.0
        name = max(scores, key=scores.__getitem__)
        score = scores[name]
        return (name if score >= self.threshold else None), score


@functools.cache
def _recognizer() -> ClipRecognizer:
    return ClipRecognizer()


@functools.cache
def _clip_pcm(name: str) -> bytes:
    """Agent clip as PCM16LE bytes at the output rate."""
    samples, rate = load_clip(name)
    if rate != OUTPUT_RATE:
        samples = soxr.resample(samples, rate, OUTPUT_RATE, quality="HQ")
    return samples.astype("<i2").tobytes()


# --------------------------------------------------------------------------------------------
# Wire format helpers
# --------------------------------------------------------------------------------------------


class _Violation(Exception):
    """A client broke the protocol: the session closes with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _invalid(reason: str) -> _Violation:
    return _Violation(CLOSE_INVALID, reason)


@functools.cache
def _camel(key: str) -> str:
    if "_" not in key:
        return key
    head, *rest = key.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _spellings(*camel: str) -> dict[str, str]:
    """Both spellings of each field name -> the camelCase one."""
    out = {}
    for name in camel:
        out[name] = name
        out[re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)] = name
    return out


# Fields whose values are user data (free-form keys): never renamed.
_OPAQUE = frozenset(
    {"args", "response", "labels", "properties", "parametersJsonSchema", "responseJsonSchema"}
)


def _normalize(obj: Any) -> Any:
    """snake_case -> camelCase keys, recursively, leaving user-data fields alone."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            ck = _camel(k) if isinstance(k, str) else k
            out[ck] = v if ck in _OPAQUE else _normalize(v)
        return out
    if isinstance(obj, list):
        return [_normalize(v) for v in obj]
    return obj


_CLIENT_MESSAGES = _spellings("setup", "clientContent", "realtimeInput", "toolResponse")
_REALTIME_FIELDS = _spellings(
    "mediaChunks", "audio", "audioStreamEnd", "video", "text", "activityStart", "activityEnd"
)
_BLOB_FIELDS = _spellings("data", "mimeType", "displayName")
_SETUP_FIELDS = frozenset(
    {
        "model",
        "generationConfig",
        "systemInstruction",
        "tools",
        "realtimeInputConfig",
        "sessionResumption",
        "contextWindowCompression",
        "inputAudioTranscription",
        "outputAudioTranscription",
        "proactivity",
        "explicitVadSignal",
        "historyConfig",
        "avatarConfig",
        "safetySettings",
        "labels",
    }
)
_GENERATION_CONFIG_FIELDS = frozenset(
    {
        "candidateCount",
        "maxOutputTokens",
        "temperature",
        "topP",
        "topK",
        "presencePenalty",
        "frequencyPenalty",
        "stopSequences",
        "seed",
        "responseModalities",
        "speechConfig",
        "mediaResolution",
        "enableAffectiveDialog",
        "thinkingConfig",
        "translationConfig",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "responseLogprobs",
        "logprobs",
        "audioTimestamp",
        "routingConfig",
        "modelSelectionConfig",
        "enableEnhancedCivicAnswers",
        "responseFormat",
        "audioTranscriptionConfig",
    }
)
_REALTIME_CONFIG_FIELDS = frozenset(
    {
        "automaticActivityDetection",
        "activityHandling",
        "turnCoverage",
        "interimTranscriptTimestampEnabled",
    }
)
_VAD_FIELDS = frozenset(
    {
        "disabled",
        "startOfSpeechSensitivity",
        "endOfSpeechSensitivity",
        "prefixPaddingMs",
        "silenceDurationMs",
    }
)
_RESUMPTION_FIELDS = frozenset({"handle", "transparent"})
_CLIENT_CONTENT_FIELDS = frozenset({"turns", "turnComplete"})
_FUNCTION_RESPONSE_FIELDS = frozenset(
    {"id", "name", "response", "willContinue", "scheduling", "parts"}
)
_SCHEDULING = dict(enumerate(["SCHEDULING_UNSPECIFIED", "SILENT", "WHEN_IDLE", "INTERRUPT"]))

_MODALITIES = {0: "MODALITY_UNSPECIFIED", 1: "TEXT", 2: "IMAGE", 3: "AUDIO"}
_START_SENS = dict(
    enumerate(["START_SENSITIVITY_UNSPECIFIED", "START_SENSITIVITY_HIGH", "START_SENSITIVITY_LOW"])
)
_END_SENS = dict(
    enumerate(["END_SENSITIVITY_UNSPECIFIED", "END_SENSITIVITY_HIGH", "END_SENSITIVITY_LOW"])
)
_ACTIVITY = dict(
    enumerate(["ACTIVITY_HANDLING_UNSPECIFIED", "START_OF_ACTIVITY_INTERRUPTS", "NO_INTERRUPTION"])
)


def _unknown_field(name: object, where: str) -> _Violation:
    return _invalid(f'Invalid JSON payload received. Unknown name "{name}" at \'{where}\': '
                    "Cannot find field.")  # fmt: skip


def _check_fields(obj: Any, allowed: Collection[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _invalid(f"Invalid JSON payload received. '{where}' must be an object.")
    for k in obj:
        if k not in allowed:
            raise _unknown_field(k, where)
    return obj


def _enum(value: Any, names: Mapping[int, str], where: str) -> str:
    if isinstance(value, bool):
        raise _invalid(f"Invalid value at '{where}' ({value!r})")
    if isinstance(value, int) and value in names:
        return names[value]
    if isinstance(value, str) and value in names.values():
        return value
    raise _invalid(f"Invalid value at '{where}' ({value!r})")


def _int_field(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise _invalid(f"Invalid value at '{where}' ({value!r})")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    raise _invalid(f"Invalid value at '{where}' ({value!r})")


_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _b64decode(value: Any, where: str) -> bytes:
    """Standard or URL-safe base64, padded or not (proto JSON accepts all four)."""
    if not isinstance(value, str):
        raise _invalid(f"Invalid value at '{where}': expected a base64 string")
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        raise _invalid(f"Invalid value at '{where}': invalid base64") from None
    if b"-" in raw or b"_" in raw:
        raw = raw.translate(_URLSAFE)
    raw = raw.rstrip(b"=")
    if len(raw) % 4 == 1:
        raise _invalid(f"Invalid value at '{where}': invalid base64 length")
    raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, validate=True)
    except binascii.Error:
        raise _invalid(f"Invalid value at '{where}': invalid base64") from None


@functools.lru_cache(maxsize=64)
def _pcm_rate(mime: str) -> int:
    """Sample rate from an `audio/pcm[;rate=N]` MIME type (16 kHz if unsaid)."""
    base, *params = (p.strip() for p in mime.split(";"))
    if base.lower() != "audio/pcm":
        raise _invalid(f"Unsupported audio MIME type {mime!r}: send audio/pcm;rate=16000")
    rate = INPUT_RATE
    for param in params:
        key, _, val = param.partition("=")
        if key.strip().lower() == "rate":
            if not val.strip().isdigit() or not 8000 <= int(val) <= 48000:
                raise _invalid(f"Unsupported audio sample rate in {mime!r}")
            rate = int(val)
    return rate


def _duration(seconds: float) -> str:
    """google.protobuf.Duration in JSON: "5s", "0.500s"."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:.3f}s"


def _close_reason(text: str) -> str:
    """A WebSocket close reason holds at most 123 UTF-8 bytes."""
    raw = text.encode()
    if len(raw) <= 123:
        return text
    return raw[:120].decode(errors="ignore") + "..."


def _interim_guess(text: str) -> str:
    """An interim transcript of `text`: lower case, without punctuation, as such guesses go."""
    return " ".join(re.sub(r"[^\w\s']", "", text).lower().split())


def _split_words(text: str) -> list[str]:
    """Pieces that concatenate back to `text`, each a word with its leading space."""
    return re.findall(r"\s*\S+", text) or [text]


_ROUTE = re.compile(
    r"^/ws/(?:google\.ai\.generativelanguage\.(?P<v>v1|v1beta|v1alpha)\.GenerativeService\."
    r"(?P<m>BidiGenerateContent|BidiGenerateContentConstrained)"
    r"|google\.cloud\.aiplatform\.(?P<vv>v1|v1beta1)\.LlmBidiService/BidiGenerateContent)$"
)


def _route(path: str) -> tuple[str, str] | None:
    """(api version, method) for a served path, else None."""
    m = _ROUTE.match(urlsplit(path).path)
    if m is None:
        return None
    if m["vv"]:
        return m["vv"], "vertex"
    return m["v"], m["m"]


# --------------------------------------------------------------------------------------------
# Conversation state (what a resumption handle restores)
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Conversation:
    chain: int
    caller_turns: int = 0
    model_turns: int = 0
    greeted: bool = False
    context_tokens: int = 0
    history: list[tuple[str, str]] = field(default_factory=list)

    def snapshot(self) -> _Conversation:
        return _Conversation(
            self.chain,
            self.caller_turns,
            self.model_turns,
            self.greeted,
            self.context_tokens,
            list(self.history),
        )

    def remember(self, role: str, text: str) -> None:
        self.history.append((role, text))
        del self.history[:-100]


@dataclass(slots=True)
class _Handle:
    chain: int
    state: _Conversation
    issued_at: float
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class _TurnRequest:
    trigger: str
    reply: str | None
    caller_turn: int | None = None
    caller_clip: str | None = None
    transcript: str | None = None
    status: str | None = None  # `interactionStatus` at its end (None: the scenario's)


@dataclass(slots=True, eq=False)
class _Turn:
    req: _TurnRequest
    rec: TurnRecord
    task: asyncio.Task[None] | None = None
    finishing: bool = False  # past the point where caller speech can interrupt it
    spoke: bool = False
    end: TurnEndFault | None = None  # how it ends, when not as usual
    open_tool_ids: list[str] = field(default_factory=list)


_F = TypeVar("_F", ToolCallFault, GoAwayFault, CloseFault, StallFault, SlowFault, TurnEndFault)
_T = TypeVar("_T")

# Pre-encoded pieces of the hottest message (echo / reply audio).
_AUDIO_HEAD = (
    b'{"serverContent":{"modelTurn":{"parts":[{"inlineData":{"mimeType":"'
    + OUTPUT_MIME.encode()
    + b'","data":"'
)
_AUDIO_TAIL = b'"}}]}}}'


# --------------------------------------------------------------------------------------------
# One WebSocket session
# --------------------------------------------------------------------------------------------


class _Session:
    """Drives one connection: handshake, input parsing, VAD turns, replies, faults."""

    def __init__(self, server: FakeGeminiServer, ws: ServerConnection, rec: SessionRecord) -> None:
        self.server = server
        self.ws = ws
        self.rec = rec
        self.sc = server.scenario
        self.loop = asyncio.get_running_loop()
        seed = None if self.sc.seed is None else self.sc.seed * 1_000_003 + rec.index
        self.rng = random.Random(seed)
        self.echo = self.sc.mode == "echo"
        self.text_binary = not self.sc.binary_frames
        self.conv = _Conversation(chain=-1)
        self.closing = False
        self.stalled = False
        self.resumption = False
        self.transparent = False
        self.input_tx = False
        self.output_tx = False
        self.text_mode = False
        self.auto_vad = True
        self.interrupts = True
        self.vad: EnergyVad | None = None
        self.activity_open = False
        self.activity_audio: deque[Int16Array] = deque(maxlen=1500)
        self.turn: _Turn | None = None
        self.pending: deque[_TurnRequest] = deque()
        self.timers: list[asyncio.Task[None]] = []
        self.tool_waiters: dict[str, asyncio.Future[Any]] = {}
        self.tool_sent_at: dict[str, float] = {}
        self.live_chain = False
        self.debug = log.isEnabledFor(logging.DEBUG)
        self.message_counts: dict[str, int] = {}
        self.closer: asyncio.Task[None] | None = None
        self.holding = False  # 3.8: partial client content, waiting for its follow-up
        self.held: deque[_TurnRequest] = deque()

    # ---- bookkeeping -----------------------------------------------------------------------

    def event(self, kind: str, **data: Any) -> None:
        rec = self.rec
        if len(rec.events) < self.server.max_events or kind == "close":
            rec.events.append(Event(time.monotonic(), kind, data))
        else:
            rec.events_dropped += 1
        if self.debug:
            log.debug("session %d: %s %s", rec.index, kind, data)
        self.server._notify()

    def applies(self, fault: Any) -> bool:
        return fault.session is None or fault.session == self.rec.index

    def fault_for_reply(self, faults: Sequence[_F], number: int) -> _F | None:
        for f in faults:
            if getattr(f, "during_reply", getattr(f, "reply", None)) == number and self.applies(f):
                return f
        return None

    async def send(self, msg: dict[str, Any] | bytes) -> bool:
        """Send one server message; False if the session can no longer talk."""
        if self.closing or self.stalled:
            return False
        data = msg if isinstance(msg, bytes) else orjson.dumps(msg)
        try:
            await self.ws.send(data, text=self.text_binary)
        except ConnectionClosed:
            return False
        self.rec.messages_sent += 1
        if self.debug and len(data) < 400:
            log.debug("session %d >> %s", self.rec.index, data.decode())
        self.server._notify()
        return True

    async def close(self, code: int, reason: str, *, drop: bool = False) -> None:
        """Close with `code`; with `drop` the TCP connection is cut instead (no close frame)."""
        if self.closing:
            return
        self.closing = True
        rec = self.rec
        if drop:
            code, reason = 1006, "connection dropped"
        rec.close_code, rec.close_reason, rec.closed_by = code, reason, "server"
        self.event("close", code=code, reason=reason, by="server")
        current = asyncio.current_task()
        if self.turn and self.turn.task and self.turn.task is not current:
            self.turn.task.cancel()
        log.info("session %d: closing %d %s", rec.index, code, reason)
        if drop:
            self.ws.transport.abort()
            return
        with contextlib.suppress(Exception):
            await self.ws.close(code, _close_reason(reason))

    def close_on_message(self, kind: str) -> CloseFault | None:
        """The `on_message` fault this client message sets off, if any (counted per kind)."""
        count = self.message_counts[kind] = self.message_counts.get(kind, 0) + 1
        total = self.message_counts["*"] = self.message_counts.get("*", 0) + (kind != "setup")
        for f in self.sc.closes:
            if f.on_message is None or not self.applies(f):
                continue
            if f.on_message == "any" and kind != "setup":
                hit = total == f.nth
            else:
                hit = f.on_message == kind and count == f.nth
            if hit and self.server._fire(f):
                self.event("close_fault", on_message=kind, nth=f.nth)
                return f
        return None

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if await self.handshake():
                self.start_timers()
                async for raw in self.ws:
                    self.rec.messages_received += 1
                    if self.closing:
                        continue  # closing: what still arrives is read and dropped
                    if not await self.dispatch(raw):
                        break
        except ConnectionClosed:
            pass
        except _Violation as v:
            await self.close(v.code, v.reason)
        except Exception:
            log.exception("session %d: internal error", self.rec.index)
            await self.close(CLOSE_INTERNAL, "Internal error encountered.")
        finally:
            await self.teardown()

    async def teardown(self) -> None:
        rec = self.rec
        try:
            tasks = [*self.timers]
            if self.closer is not None:
                await asyncio.gather(self.closer, return_exceptions=True)
            if self.turn and self.turn.task:
                tasks.append(self.turn.task)
            for t in tasks:
                t.cancel()
            for fut in self.tool_waiters.values():
                fut.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.ws.wait_closed()
        finally:
            if self.live_chain:
                self.server._chain_left(self.conv.chain)
                self.live_chain = False
            if rec.close_code is None:
                rec.close_code = self.ws.close_code
                rec.close_reason = self.ws.close_reason
                rec.closed_by = "client"
                self.event("close", code=rec.close_code, reason=rec.close_reason, by="client")
            rec.closed = True
            rec.closed_at = time.monotonic()
            self.server._notify()

    def start_timers(self) -> None:
        for g in self.sc.go_aways:
            if self.applies(g):
                self.timers.append(asyncio.create_task(self.go_away(g)))
        for c in self.sc.closes:
            if c.at is not None and self.applies(c):
                self.timers.append(asyncio.create_task(self.close_at(c)))

    async def go_away(self, fault: GoAwayFault) -> None:
        await asyncio.sleep(fault.after)
        if self.closing or self.stalled or not self.server._fire(fault):
            return
        self.event("go_away", time_left=fault.time_left)
        await self.send({"goAway": {"timeLeft": _duration(fault.time_left)}})
        await asyncio.sleep(fault.time_left)
        if not self.stalled:
            await self.close(fault.close_code, fault.close_reason)

    async def close_at(self, fault: CloseFault) -> None:
        assert fault.at is not None
        await asyncio.sleep(fault.at)
        if not self.closing and not self.stalled and self.server._fire(fault):
            await self.close(fault.code, fault.reason, drop=fault.drop)

    # ---- setup -----------------------------------------------------------------------------

    async def handshake(self) -> bool:
        try:
            raw = await asyncio.wait_for(self.ws.recv(), self.server.setup_timeout)
        except TimeoutError:
            await self.close(CLOSE_INTERNAL, "Deadline expired before operation could complete.")
            return False
        self.rec.messages_received += 1
        kind, body = self.decode(raw)
        if kind != "setup":
            raise _invalid("The first message of a session must be a setup message.")
        fault = self.close_on_message(kind)
        if fault is not None:
            await self.close(fault.code, fault.reason, drop=fault.drop)
            return False
        if not self.server._authorized(self.rec, self.ws.request):
            raise _invalid("API key not valid. Please pass a valid API key.")
        setup = _check_fields(_normalize(body), _SETUP_FIELDS, "setup")
        rec = self.rec
        rec.setup = setup
        self.event("setup", model=setup.get("model"))
        model = setup.get("model")
        if not isinstance(model, str) or not model:
            raise _invalid("setup.model is required.")
        name = model.rsplit("/models/", 1)[-1].removeprefix("models/")
        rec.model = name
        if not self.server._known_model(name):
            version = rec.api_version or "v1"
            raise _Violation(
                CLOSE_POLICY,
                f"models/{name} is not found for API version {version}, or is not supported "
                "for bidiGenerateContent.",
            )
        self.configure_generation(setup.get("generationConfig"), name)
        self.configure_vad(setup.get("realtimeInputConfig"))
        self.input_tx = setup.get("inputAudioTranscription") is not None
        self.output_tx = setup.get("outputAudioTranscription") is not None
        rec.context_window_compression = setup.get("contextWindowCompression")
        resumption = setup.get("sessionResumption")
        conv: _Conversation | None = None
        if resumption is not None:
            _check_fields(resumption, _RESUMPTION_FIELDS, "setup.session_resumption")
            self.resumption = rec.resumption_enabled = True
            self.transparent = bool(resumption.get("transparent"))
            handle = resumption.get("handle")
            if handle:
                conv = self.server._resume(str(handle), self.sc)
                rec.resumed = True
        self.conv = conv if conv is not None else self.server._new_conversation()
        rec.chain = self.conv.chain
        self.server._chain_joined(self.conv.chain)
        self.live_chain = True
        complete: dict[str, Any] = {}
        if self.sc.send_session_id:
            complete["sessionId"] = f"sim-{rec.index}-{secrets.token_hex(6)}"
        if not await self.send({"setupComplete": complete}):
            return False
        rec.setup_completed = True
        self.event("setup_complete", resumed=rec.resumed, chain=rec.chain)
        await self.resumable_point()
        return True

    def configure_generation(self, config: Any, model: str) -> None:
        if config is None:
            return
        _check_fields(config, _GENERATION_CONFIG_FIELDS, "setup.generation_config")
        modalities = config.get("responseModalities")
        if modalities is None:
            return
        if not isinstance(modalities, list):
            raise _invalid("Invalid value at 'setup.generation_config.response_modalities'")
        names = [
            _enum(m, _MODALITIES, "setup.generation_config.response_modalities") for m in modalities
        ]
        names = [n for n in names if n != "MODALITY_UNSPECIFIED"]
        if len(names) > 1:
            raise _invalid("Only one response modality is supported in a Live session.")
        if names and names[0] not in ("AUDIO", "TEXT"):
            raise _invalid(f"Response modality {names[0]} is not supported by this model.")
        if names == ["TEXT"]:
            if not self.server._accepts_text(model):
                raise _invalid("Text output is not supported by native audio models: request "
                               "AUDIO and enable output_audio_transcription.")  # fmt: skip
            self.text_mode = True

    def configure_vad(self, config: Any) -> None:
        sc = self.sc
        threshold, prefix, silence = sc.vad_threshold_db, sc.prefix_ms, sc.silence_ms
        end_db: float | None = None
        if config is not None:
            _check_fields(config, _REALTIME_CONFIG_FIELDS, "setup.realtime_input_config")
            handling = config.get("activityHandling")
            if handling is not None:
                where = "setup.realtime_input_config.activity_handling"
                self.interrupts = _enum(handling, _ACTIVITY, where) != "NO_INTERRUPTION"
            aad = config.get("automaticActivityDetection")
            if aad is not None:
                where = "setup.realtime_input_config.automatic_activity_detection"
                _check_fields(aad, _VAD_FIELDS, where)
                self.auto_vad = not aad.get("disabled", False)
                start = _enum(aad.get("startOfSpeechSensitivity", 0), _START_SENS, where)
                end = _enum(aad.get("endOfSpeechSensitivity", 0), _END_SENS, where)
                if start == "START_SENSITIVITY_LOW":
                    threshold += 8.0
                elif start == "START_SENSITIVITY_HIGH":
                    threshold -= 3.0
                if end == "END_SENSITIVITY_HIGH":
                    end_db = threshold - 2.0
                elif end == "END_SENSITIVITY_LOW":
                    end_db = threshold - 10.0
                if "prefixPaddingMs" in aad:
                    prefix = _int_field(aad["prefixPaddingMs"], where + ".prefix_padding_ms")
                if "silenceDurationMs" in aad:
                    silence = _int_field(aad["silenceDurationMs"], where + ".silence_duration_ms")
        if self.auto_vad and not self.echo:
            self.vad = EnergyVad(
                threshold_db=threshold, end_threshold_db=end_db, prefix_ms=prefix,
                silence_ms=silence,
            )  # fmt: skip

    # ---- input -----------------------------------------------------------------------------

    def decode(self, raw: str | bytes) -> tuple[str, Any]:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _invalid("Invalid JSON payload received. Unexpected token.") from None
        if not isinstance(msg, dict) or not msg:
            raise _invalid("Invalid JSON payload received. Expected a message object.")
        kind = None
        for key in msg:
            canon = _CLIENT_MESSAGES.get(key)
            if canon is None:
                raise _unknown_field(key, "")
            if kind is not None:
                raise _invalid("Invalid JSON payload received. Only one of setup, client_content,"
                               " realtime_input, tool_response may be set.")  # fmt: skip
            kind = canon
        assert kind is not None
        body = next(iter(msg.values()))
        if self.debug:
            log.debug("session %d << %s (%d bytes)", self.rec.index, kind, len(raw))
        return kind, body

    async def dispatch(self, raw: str | bytes) -> bool:
        try:
            kind, body = self.decode(raw)
            fault = self.close_on_message(kind)
            if fault is not None:
                # Closed beside the reader, which drains what the client still sends: a reader
                # stuck in the close handshake would leave the client's close frame queued
                # behind its audio, and a real server answers at once.
                self.closer = asyncio.create_task(
                    self.close(fault.code, fault.reason, drop=fault.drop)
                )
                return True
            if kind == "realtimeInput":
                await self.realtime_input(body)
            elif kind == "clientContent":
                await self.client_content(body)
            elif kind == "toolResponse":
                await self.tool_response(body)
            else:
                raise _invalid("setup must be the first message and may be sent only once.")
        except _Violation as v:
            await self.close(v.code, v.reason)
            return False
        return not self.closing

    async def realtime_input(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise _invalid("Invalid JSON payload received. 'realtime_input' must be an object.")
        for key, value in body.items():
            field_ = _REALTIME_FIELDS.get(key)
            if field_ is None:
                raise _unknown_field(key, "realtime_input")
            if field_ == "audio":
                await self.audio(value, "realtime_input.audio")
            elif field_ == "mediaChunks":
                if not isinstance(value, list):
                    raise _invalid("Invalid value at 'realtime_input.media_chunks'")
                for blob in value:
                    await self.media(blob)
            elif field_ == "video":
                self.video(value, "realtime_input.video")
            elif field_ == "text":
                await self.text_input(value)
            elif field_ == "audioStreamEnd":
                if value:
                    await self.audio_stream_end()
            elif field_ == "activityStart":
                await self.activity_start()
            elif field_ == "activityEnd":
                await self.activity_end()

    def blob(self, blob: Any, where: str) -> tuple[bytes, str]:
        if not isinstance(blob, dict):
            raise _invalid(f"Invalid value at '{where}'")
        data = mime = None
        for key, value in blob.items():
            name = _BLOB_FIELDS.get(key)
            if name is None:
                raise _unknown_field(key, where)
            if name == "data":
                data = value
            elif name == "mimeType":
                mime = value
        if not isinstance(mime, str) or not mime:
            raise _invalid(f"'{where}.mime_type' is required.")
        return _b64decode(data if data is not None else "", where + ".data"), mime

    async def media(self, blob: Any) -> None:
        if isinstance(blob, dict):
            mime = blob.get("mimeType", blob.get("mime_type"))
            if isinstance(mime, str) and mime.lower().startswith(("image/", "video/")):
                self.video(blob, "realtime_input.media_chunks")
                return
        await self.audio(blob, "realtime_input.media_chunks")

    def video(self, blob: Any, where: str) -> None:
        _, mime = self.blob(blob, where)
        if not mime.lower().startswith(("image/", "video/")):
            raise _invalid(f"Unsupported video MIME type {mime!r}")
        self.rec.video_frames_received += 1

    async def audio(self, blob: Any, where: str) -> None:
        pcm, mime = self.blob(blob, where)
        rate = _pcm_rate(mime)
        if len(pcm) % 2:
            raise _invalid(f"Invalid audio at '{where}': PCM16 needs an even number of bytes.")
        rec = self.rec
        rec.audio_bytes_received += len(pcm)
        rec.audio_chunks_received += 1
        if not pcm:
            return
        samples = np.frombuffer(pcm, "<i2")
        if self.echo:
            floor = self.sc.echo_min_peak
            if not self.stalled and (
                not floor or max(int(samples.max()), -int(samples.min())) >= floor
            ):
                await self.echo_back(samples, rate)
            if self.server.keep_audio:
                rec.received_audio += self.to_input_rate(samples, rate).tobytes()
            return
        if rate != INPUT_RATE:
            samples = self.to_input_rate(samples, rate)
            pcm = samples.tobytes()
        if self.server.keep_audio:
            rec.received_audio += pcm
        self.server._notify()
        if self.stalled:
            return
        if self.vad is not None:
            for kind, utterance in self.vad.feed(samples):
                if kind == "start":
                    await self.speech_started("speech")
                else:
                    assert utterance is not None
                    await self.speech_ended(utterance, "speech")
        elif self.activity_open:
            self.activity_audio.append(samples)

    @staticmethod
    def to_input_rate(samples: Int16Array, rate: int) -> Int16Array:
        if rate == INPUT_RATE:
            return samples
        return soxr.resample(samples, rate, INPUT_RATE, quality="LQ")

    async def echo_back(self, samples: Int16Array, rate: int) -> None:
        out = soxr.resample(samples, rate, OUTPUT_RATE, quality="LQ")
        payload = out.astype("<i2", copy=False).tobytes()
        if await self.send(_AUDIO_HEAD + base64.b64encode(payload) + _AUDIO_TAIL):
            self.rec.audio_bytes_sent += len(payload)
            self.rec.audio_chunks_sent += 1

    async def text_input(self, text: Any) -> None:
        if not isinstance(text, str):
            raise _invalid("Invalid value at 'realtime_input.text'")
        self.rec.texts.append(text)
        self.event("text", text=text)
        if self.echo or self.stalled:
            return
        self.release_held()
        self.conv.context_tokens += max(1, len(text) // 4)
        self.conv.remember("user", text)
        reply = self.text_reply(text)
        if reply is not None:
            self.enqueue(_TurnRequest("text", reply))

    def text_reply(self, text: str) -> str | None:
        low = text.lower()
        for needle, clip in self.sc.text_replies.items():
            if needle.lower() in low:
                return clip
        if self.sc.greeting and not self.conv.greeted:
            self.conv.greeted = True
            return self.sc.greeting
        return self.sc.default_text_reply

    async def audio_stream_end(self) -> None:
        self.rec.audio_stream_ends += 1
        self.event("audio_stream_end")
        if self.vad is not None and not self.stalled:
            utterance = self.vad.end_now()
            if utterance is not None:
                await self.speech_ended(utterance, "speech")

    async def activity_start(self) -> None:
        if self.auto_vad:
            raise _invalid("Explicit activity control is not supported when automatic activity "
                           "detection is enabled.")  # fmt: skip
        self.activity_open = True
        self.activity_audio.clear()
        if not self.stalled and not self.echo:
            await self.speech_started("activity")

    async def activity_end(self) -> None:
        if self.auto_vad:
            raise _invalid("Explicit activity control is not supported when automatic activity "
                           "detection is enabled.")  # fmt: skip
        was_open, self.activity_open = self.activity_open, False
        if was_open and not self.stalled and not self.echo:
            audio = list(self.activity_audio)
            self.activity_audio.clear()
            utterance = np.concatenate(audio) if audio else np.empty(0, np.int16)
            await self.speech_ended(utterance, "activity")

    async def client_content(self, body: Any) -> None:
        content = _check_fields(_normalize(body), _CLIENT_CONTENT_FIELDS, "client_content")
        turns = content.get("turns") or []
        if not isinstance(turns, list):
            raise _invalid("Invalid value at 'client_content.turns'")
        self.rec.client_contents.append(content)
        texts = [
            p["text"]
            for t in turns
            if isinstance(t, dict)
            for p in (t.get("parts") or [])
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        text = " ".join(texts)
        complete = bool(content.get("turnComplete"))
        self.event("client_content", turns=len(turns), turn_complete=complete)
        if self.echo or self.stalled:
            return
        self.conv.context_tokens += max(1, len(text) // 4) if text else 0
        for t in turns:
            if isinstance(t, dict):
                for p in t.get("parts") or []:
                    if isinstance(p, dict) and isinstance(p.get("text"), str):
                        self.conv.remember(str(t.get("role", "user")), p["text"])
        # "A message here will interrupt any current model generation."
        await self.interrupt()
        if not complete:
            if self.sc.hold_after_partial_content:
                self.holding = True  # 3.8: wait for the follow-up content
            return
        if (self.holding or self.held) and (self.release_held() or not text):
            return  # the turn completed is the caller's held one: answer that
        if text:
            reply = self.text_reply(text)
            if reply is not None:
                self.enqueue(_TurnRequest("client_content", reply))

    def release_held(self) -> bool:
        """Follow-up content arrived: the model answers what it held; True if it held any."""
        self.holding = False
        held = bool(self.held)
        while self.held:
            self.enqueue(self.held.popleft())
        return held

    async def tool_response(self, body: Any) -> None:
        content = _check_fields(_normalize(body), {"functionResponses"}, "tool_response")
        responses = content.get("functionResponses") or []
        if not isinstance(responses, list):
            raise _invalid("Invalid value at 'tool_response.function_responses'")
        now = time.monotonic()
        for fr in responses:
            _check_fields(fr, _FUNCTION_RESPONSE_FIELDS, "tool_response.function_responses")
            scheduling = fr.get("scheduling")
            if scheduling is not None:
                where = "tool_response.function_responses.scheduling"
                scheduling = _enum(scheduling, _SCHEDULING, where)
                fr = {**fr, "scheduling": scheduling}
            call_id = fr.get("id")
            if call_id is None and len(self.tool_waiters) == 1:
                call_id = next(iter(self.tool_waiters))
            sent = self.tool_sent_at.get(call_id) if call_id else None
            latency = None if sent is None else now - sent
            self.rec.tool_responses.append(
                ToolResponseRecord(
                    call_id, fr.get("name"), fr.get("response"), now, latency, scheduling
                )
            )
            self.event("tool_response", id=call_id, name=fr.get("name"), latency=latency)
            waiter = self.tool_waiters.get(call_id) if call_id else None
            if waiter is not None and not waiter.done():
                waiter.set_result(fr)

    # ---- turns -----------------------------------------------------------------------------

    async def speech_started(self, how: str) -> None:
        self.event("speech_start", how=how)
        if self.interrupts:
            await self.interrupt()

    async def speech_ended(self, utterance: Int16Array, how: str) -> None:
        seconds = len(utterance) / INPUT_RATE
        name, score = _recognizer().recognize(utterance) if len(utterance) else (None, 0.0)
        conv = self.conv
        conv.caller_turns += 1
        conv.context_tokens += int(seconds * AUDIO_TOKENS_PER_S)
        transcript = CALLER_CLIPS[name].text if name else INAUDIBLE
        conv.remember("user", transcript)
        self.event(
            "speech_end", how=how, seconds=round(seconds, 3), clip=name,
            score=round(score, 3), caller_turn=conv.caller_turns,
        )  # fmt: skip
        self.rec.input_transcripts.append(transcript)
        if self.input_tx:
            pieces = self.pieces(transcript, 3)
            if self.sc.interim_transcripts:
                for n in range(1, len(pieces) + 1):  # rough: lower case, unpunctuated
                    guess = {"text": _interim_guess("".join(pieces[:n]))}
                    await self.send({"serverContent": {"interimInputTranscription": guess}})
            for piece in pieces:
                await self.send({"serverContent": {"inputTranscription": {"text": piece}}})
        reply = self.choose_reply(conv.caller_turns, name)
        tool = self.tool_fault(conv.caller_turns)
        if reply is not None or tool is not None:
            self.enqueue(_TurnRequest(how, reply, conv.caller_turns, name, transcript))

    def pieces(self, text: str, words_per_piece: int) -> list[str]:
        words = _split_words(text)
        return [
            "".join(words[i : i + words_per_piece]) for i in range(0, len(words), words_per_piece)
        ]

    def choose_reply(self, caller_turn: int, clip: str | None) -> str | None:
        sc = self.sc
        if sc.reply_sequence is not None and caller_turn <= len(sc.reply_sequence):
            return sc.reply_sequence[caller_turn - 1]
        key = clip if clip is not None and clip in sc.replies else UNKNOWN
        return sc.replies.get(key)

    def tool_fault(self, caller_turn: int | None) -> ToolCallFault | None:
        if caller_turn is None:
            return None
        for f in self.sc.tool_calls:
            if f.after_caller_turn == caller_turn and self.applies(f):
                return f
        return None

    def enqueue(self, req: _TurnRequest) -> None:
        if self.closing or self.stalled:
            return
        if self.holding and req.trigger in ("speech", "activity"):
            self.held.append(req)  # 3.8: no reply until the partial content is completed
            self.event("reply_held", caller_turn=req.caller_turn)
            return
        if self.turn is None:
            self.start_turn(req)
        else:
            self.pending.append(req)

    def start_turn(self, req: _TurnRequest) -> None:
        self.conv.model_turns += 1
        rec = TurnRecord(
            number=self.conv.model_turns, trigger=req.trigger, caller_turn=req.caller_turn,
            caller_clip=req.caller_clip, transcript=req.transcript, reply_clip=req.reply,
            started_at=time.monotonic(),
        )  # fmt: skip
        self.rec.turns.append(rec)
        turn = _Turn(req, rec)
        self.turn = turn
        turn.task = asyncio.create_task(self.run_turn(turn))
        self.event("turn_start", number=rec.number, reply=req.reply, caller_turn=req.caller_turn)

    def next_turn(self) -> None:
        self.turn = None
        if self.pending and not self.closing and not self.stalled:
            self.start_turn(self.pending.popleft())

    async def run_turn(self, turn: _Turn) -> None:
        tr = turn.rec
        try:
            if self.resumption and self.sc.resumption_updates_during_turn:
                await self.send({"sessionResumptionUpdate": {}})
            stall = self.fault_for_reply(self.sc.stalls, tr.number)
            if stall is not None and stall.after_audio is None and self.server._fire(stall):
                await self.stall()
                return
            close = self.fault_for_reply(self.sc.closes, tr.number)
            reply = turn.req.reply
            tool = self.tool_fault(turn.req.caller_turn)
            end = self.fault_for_reply(self.sc.turn_ends, tr.number)
            if end is not None and self.server._fire(end):
                turn.end = end
                self.event("turn_end_fault", number=tr.number, reason=end.reason)
                if not end.speak:  # the model failed: nothing of the reply is sent
                    reply = tool = None
                    tr.reply_clip = None
                    await asyncio.sleep(self.sc.first_audio_delay)  # it "thought" first
            if tool is not None:
                if tool.say_first and not await self.speak(turn, tool.say_first, None, None):
                    return
                response = await self.tool_call(turn, tool)
                reply = tool.reply or reply
                if response.get("scheduling") == "SILENT":
                    reply = None  # "the model does not react to the result"
                tr.reply_clip = reply
            if reply is not None and not await self.speak(turn, reply, stall, close):
                return
            turn.finishing = True
            if turn.end is None or turn.end.speak:
                await self.send({"serverContent": {"generationComplete": True}})
                self.event("generation_complete", number=tr.number)
            await self.finish_turn(turn)
            end = turn.end
            if end is not None and end.then is not None:
                self.timers.append(asyncio.create_task(self.continue_later(end)))
        except ConnectionClosed:
            pass
        except Exception:  # a scenario bug must not leave the client hanging silently
            log.exception("session %d: reply %d failed", self.rec.index, tr.number)
            turn.finishing = True
            await self.close(CLOSE_INTERNAL, "Internal error encountered.")

    async def finish_turn(self, turn: _Turn, interrupted: bool = False) -> None:
        tr = turn.rec
        response_tokens = int(tr.audio_bytes_sent / _OUT_BYTES_PER_S * AUDIO_TOKENS_PER_S)
        response_tokens += len(tr.text_sent) // 4 if self.text_mode else 0
        prompt = self.conv.context_tokens
        usage = {
            "promptTokenCount": prompt,
            "responseTokenCount": response_tokens,
            "totalTokenCount": prompt + response_tokens,
            "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": prompt}],
            "responseTokensDetails": [
                {"modality": "TEXT" if self.text_mode else "AUDIO", "tokenCount": response_tokens}
            ],
        }
        if self.rec.method == "vertex":  # Vertex AI names the response side "candidates"
            usage["candidatesTokenCount"] = usage.pop("responseTokenCount")
            usage["candidatesTokensDetails"] = usage.pop("responseTokensDetails")
        tr.usage = usage
        self.conv.context_tokens += response_tokens
        if tr.text_sent:
            self.conv.remember("model", tr.text_sent)
        content: dict[str, Any] = {"turnComplete": True}
        end, status = turn.end, turn.req.status or self.sc.interaction_status
        if end is not None:
            status = end.interaction_status or status
            if end.reason is not None:
                content["turnCompleteReason"] = end.reason
            if end.waiting_for_input:
                content["waitingForInput"] = True
        if status is not None:
            content["interactionStatus"] = status
        await self.send({"serverContent": content, "usageMetadata": usage})
        tr.completed = not interrupted
        tr.ended_at = time.monotonic()
        self.event("turn_complete", number=tr.number, interrupted=interrupted)
        await self.resumable_point()
        if not interrupted:
            self.next_turn()

    async def continue_later(self, end: TurnEndFault) -> None:
        """The output an IN_PROGRESS turn end announced, as a turn of its own, ending IDLE."""
        await asyncio.sleep(end.then_after)
        self.enqueue(_TurnRequest("background", end.then, status="IDLE"))

    async def interrupt(self) -> None:
        """Barge-in: stop the reply in progress, `interrupted` then `turnComplete`."""
        turn = self.turn
        if turn is None or turn.finishing or self.closing or self.stalled:
            return
        turn.finishing = True
        self.pending.clear()
        open_ids = [i for i in turn.open_tool_ids if i in self.tool_waiters]
        if turn.task is not None:
            turn.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await turn.task
        tr = turn.rec
        tr.interrupted = True
        if open_ids:
            self.rec.tool_cancellations.extend(open_ids)
            await self.send({"toolCallCancellation": {"ids": open_ids}})
            self.event("tool_call_cancellation", ids=open_ids)
        await self.send({"serverContent": {"interrupted": True}})
        self.event("interrupted", number=tr.number, audio_bytes=tr.audio_bytes_sent)
        self.turn = None
        await self.finish_turn(turn, interrupted=True)

    async def stall(self) -> None:
        self.stalled = self.rec.stalled = True
        if self.turn is not None:
            self.turn.finishing = True
        self.pending.clear()
        self.event("stall")

    async def tool_call(self, turn: _Turn, fault: ToolCallFault) -> dict[str, Any]:
        """Send the call, wait for its response (scheduling normalized to its enum name)."""
        call_id = fault.call_id or f"function-call-{self.rng.getrandbits(62)}"
        call = {"id": call_id, "name": fault.name, "args": dict(fault.args)}
        waiter: asyncio.Future[Any] = self.loop.create_future()
        self.tool_waiters[call_id] = waiter
        turn.open_tool_ids.append(call_id)
        turn.rec.tool_call_ids.append(call_id)
        self.tool_sent_at[call_id] = time.monotonic()
        self.rec.tool_calls.append(call)
        self.event("tool_call", id=call_id, name=fault.name)
        try:
            if await self.send({"toolCall": {"functionCalls": [call]}}):
                return dict(await waiter)
            return {}
        finally:
            self.tool_waiters.pop(call_id, None)

    async def speak(
        self, turn: _Turn, clip_name: str, stall: StallFault | None, close: CloseFault | None
    ) -> bool:
        """Stream one agent clip; False if a fault ended the session's output."""
        sc, rng, tr = self.sc, self.rng, turn.rec
        clip = AGENT_CLIPS.get(clip_name)
        if clip is None:
            raise KeyError(f"scenario names unknown agent clip {clip_name!r}")
        if not turn.spoke and sc.first_audio_delay > 0:
            await asyncio.sleep(sc.first_audio_delay * rng.uniform(0.8, 1.2))
        turn.spoke = True
        if self.text_mode:
            return await self.speak_text(turn, clip.text)
        pcm = _clip_pcm(clip_name)
        total = len(pcm)
        words = _split_words(clip.text)
        starts, acc = [], 0
        for w in words:
            starts.append(acc / max(1, len(clip.text)))
            acc += len(w)
        next_word = 0
        rate = sc.rate
        for slow in sc.slow:
            if (slow.reply is None or slow.reply == tr.number) and self.applies(slow):
                rate = slow.rate
        loop = self.loop
        t0 = loop.time()
        ahead = rng.uniform(*sc.burst_s)
        pos = 0
        with_audio = sc.transcript_with_audio and self.output_tx
        while pos < total:
            n = max(2, int(rng.uniform(*sc.chunk_ms) * _OUT_BYTES_PER_S / 1000) & ~1)
            if rate:
                wait = t0 + pos / _OUT_BYTES_PER_S / rate - loop.time()
                if wait > ahead:
                    await asyncio.sleep(wait)
                    ahead = rng.uniform(*sc.burst_s)
                if rng.random() < sc.pause_prob:  # a hiccup, then a catch-up burst
                    await asyncio.sleep(rng.uniform(*sc.pause_s))
            else:
                await asyncio.sleep(0)
            chunk = pcm[pos : pos + n]
            end = pos + len(chunk)
            piece = ""
            while next_word < len(words) and starts[next_word] <= end / total:
                piece += words[next_word]
                next_word += 1
            if piece and self.output_tx:
                tr.text_sent += piece
            data = base64.b64encode(chunk)
            if piece and with_audio:
                msg: dict[str, Any] | bytes = {
                    "serverContent": {
                        "modelTurn": {
                            "parts": [
                                {"inlineData": {"mimeType": OUTPUT_MIME, "data": data.decode()}}
                            ]
                        },
                        "outputTranscription": {"text": piece},
                    }
                }
            else:
                msg = _AUDIO_HEAD + data + _AUDIO_TAIL
            if not await self.send(msg):
                return False
            if tr.first_audio_at is None:
                tr.first_audio_at = time.monotonic()
                self.event("first_audio", number=tr.number)
            pos = end
            tr.audio_bytes_sent += len(chunk)
            tr.audio_chunks_sent += 1
            self.rec.audio_bytes_sent += len(chunk)
            self.rec.audio_chunks_sent += 1
            if piece and self.output_tx and not with_audio:
                await self.send({"serverContent": {"outputTranscription": {"text": piece}}})
            sent_s = pos / _OUT_BYTES_PER_S
            if close is not None and sent_s >= close.after_audio and self.server._fire(close):
                await self.close(close.code, close.reason, drop=close.drop)
                return False
            if stall is not None and stall.after_audio is not None and sent_s >= stall.after_audio:
                if self.server._fire(stall):
                    await self.stall()
                    return False
                stall = None
        rest = "".join(words[next_word:])
        if rest and self.output_tx:
            tr.text_sent += rest
            await self.send({"serverContent": {"outputTranscription": {"text": rest}}})
        return True

    async def speak_text(self, turn: _Turn, text: str) -> bool:
        """TEXT modality: the reply's words as text parts, a few at a time."""
        for piece in self.pieces(text, 4):
            if self.sc.rate:
                await asyncio.sleep(0.05 / self.sc.rate)
            if not await self.send({"serverContent": {"modelTurn": {"parts": [{"text": piece}]}}}):
                return False
            turn.rec.text_sent += piece
        return True

    async def resumable_point(self) -> None:
        """After setup and after each turn: a fresh handle for the state reached so far."""
        if not self.resumption or self.closing or self.stalled:
            return
        handle = self.server._issue_handle(self.conv)
        update: dict[str, Any] = {"newHandle": handle, "resumable": True}
        if self.transparent:
            update["lastConsumedClientMessageIndex"] = str(self.rec.messages_received - 1)
        if await self.send({"sessionResumptionUpdate": update}):
            self.rec.handles.append(handle)
            self.event("resumption_update", resumable=True)


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class FakeGeminiServer:
    """Fake Gemini Live endpoint on a local port (TLS by default, with its own test CA).

    Point the real SDK at it with ``HttpOptions(base_url=server.base_url,
    async_client_args={"ssl": server.client_ssl_context()})`` or ``GEMINI_BASE_URL`` +
    ``SSL_CERT_FILE=server.ca_file``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: bool = True,
        scenario: Scenario | None = None,
        api_key: str | None = None,
        tokens: Collection[str] | None = None,
        models: Collection[str] | None = None,
        keep_audio: bool = True,
        compression: bool = False,
        ca: TestCA | None = None,
        ca_file: Path | str | None = None,
        setup_timeout: float = 60.0,
        max_events: int = 10_000,
        max_handles: int = 100_000,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.scenario = scenario if scenario is not None else Scenario()
        self.api_key = api_key
        self.tokens = None if tokens is None else frozenset(tokens)
        self.models = (
            DEFAULT_MODELS
            if models is None
            else frozenset(m.removeprefix("models/") for m in models)
        )
        self.keep_audio = keep_audio
        self.compression = compression
        self.ca = ca if ca is not None else (TestCA() if tls else None)
        self._ca_file_arg = Path(ca_file) if ca_file is not None else None
        self._ca_dir: str | None = None
        self.ca_file: Path | None = None
        self.setup_timeout = setup_timeout
        self.max_events = max_events
        self.max_handles = max_handles
        self.sessions: list[SessionRecord] = []
        self._server: Server | None = None
        self._changed = asyncio.Event()
        self._waiters = 0
        self._handles: dict[str, _Handle] = {}
        self._live_chains: dict[int, int] = {}
        self._next_chain = 0
        self._fires: dict[int, tuple[Any, int]] = {}
        # generateContent on the same port (post-call analysis): see `livecall.sim.gemini_text`
        self.text = FakeTextModel(api_key=api_key)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> FakeGeminiServer:
        ssl_ctx = None
        if self.tls:
            assert self.ca is not None
            ssl_ctx = self.ca.server_ssl_context()
            if self._ca_file_arg is not None:
                self.ca_file = self.ca.write_ca_pem(self._ca_file_arg)
            else:
                self._ca_dir = tempfile.mkdtemp(prefix="livecall-sim-ca-")
                self.ca_file = self.ca.write_ca_pem(Path(self._ca_dir) / "ca.pem")
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            ssl=ssl_ctx,
            process_request=self._process_request,
            # typed as a ServerConnection class, but websockets only calls it: a factory of
            # the Sniffer (HTTP or WebSocket, decided by the first bytes) serves as well
            create_connection=self._connection,  # type: ignore[arg-type]
            compression="deflate" if self.compression else None,
            max_size=16 * 2**20,
            logger=logging.getLogger("livecall.sim.gemini.ws"),
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        log.info("fake Gemini Live listening on %s", self.base_url)
        return self

    def _connection(self, *args: Any, **kwargs: Any) -> Sniffer:
        """Each connection: an HTTP generateContent request, or the Live WebSocket."""
        return Sniffer(ServerConnection(*args, **kwargs), self.text)

    async def stop(self) -> None:
        self.text.close()
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
            self._server = None
        if self._ca_dir is not None:
            shutil.rmtree(self._ca_dir, ignore_errors=True)
            self._ca_dir = None
        self._notify(force=True)

    async def __aenter__(self) -> FakeGeminiServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """What `HttpOptions(base_url=...)` / GEMINI_BASE_URL take."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """Full v1 endpoint URL, for raw WebSocket clients."""
        scheme = "wss" if self.tls else "ws"
        return (
            f"{scheme}{self.base_url[self.base_url.index(':') :]}/ws/"
            "google.ai.generativelanguage.v1.GenerativeService.BidiGenerateContent"
        )

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """A client context that trusts this server (None without TLS)."""
        return self.ca.client_ssl_context() if self.ca is not None else None

    @property
    def active_sessions(self) -> int:
        return sum(1 for s in self.sessions if not s.closed)

    # ---- observation -----------------------------------------------------------------------

    async def wait_for(
        self,
        predicate: Callable[[], _T],
        timeout: float = 5.0,  # noqa: ASYNC109 (a deadline is the point of this helper)
    ) -> _T:
        """Return `predicate()`'s first truthy value, re-checked whenever the server's state
        changes; raise TimeoutError after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._waiters += 1
        try:
            while True:
                result = predicate()
                if result:
                    return result
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"condition not met within {timeout} s")
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), remaining)
        finally:
            self._waiters -= 1

    def _notify(self, force: bool = False) -> None:
        if self._waiters or force:
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    # ---- resumption handles ----------------------------------------------------------------

    def revoke_handle(self, handle: str) -> None:
        """Make `handle` unusable (resuming with it then closes 1008)."""
        if handle in self._handles:
            self._handles[handle].revoked = True

    def revoke_all_handles(self) -> None:
        for info in self._handles.values():
            info.revoked = True

    def _new_conversation(self) -> _Conversation:
        self._next_chain += 1
        return _Conversation(chain=self._next_chain)

    def _issue_handle(self, conv: _Conversation) -> str:
        handle = secrets.token_urlsafe(24)
        self._handles[handle] = _Handle(conv.chain, conv.snapshot(), time.monotonic())
        while len(self._handles) > self.max_handles:
            del self._handles[next(iter(self._handles))]
        return handle

    def _resume(self, handle: str, sc: Scenario) -> _Conversation:
        info = self._handles.get(handle)
        if info is None or info.revoked:
            raise _Violation(CLOSE_POLICY, "Session resumption handle is invalid or was revoked.")
        if sc.handle_ttl is not None and time.monotonic() - info.issued_at > sc.handle_ttl:
            raise _Violation(CLOSE_POLICY, "Session resumption handle has expired.")
        if sc.refuse_resume:
            raise _Violation(sc.refuse_resume_code, "Session resumption is not available.")
        if sc.exclusive_resume and self._live_chains.get(info.chain):
            raise _Violation(CLOSE_POLICY, "The session to resume is still in use.")
        return info.state.snapshot()

    def _chain_joined(self, chain: int) -> None:
        self._live_chains[chain] = self._live_chains.get(chain, 0) + 1

    def _chain_left(self, chain: int) -> None:
        left = self._live_chains.get(chain, 0) - 1
        if left > 0:
            self._live_chains[chain] = left
        else:
            self._live_chains.pop(chain, None)

    # ---- policy ----------------------------------------------------------------------------

    def _fire(self, fault: Any) -> bool:
        """Count one firing of `fault`; False once its `max_fires` is used up."""
        limit = getattr(fault, "max_fires", None)
        _, fired = self._fires.get(id(fault), (fault, 0))
        if limit is not None and fired >= limit:
            return False
        self._fires[id(fault)] = (fault, fired + 1)  # holding `fault` keeps its id unique
        return True

    def _known_model(self, name: str) -> bool:
        return name in self.models or name.startswith(SIM_MODEL_PREFIX)

    def _accepts_text(self, name: str) -> bool:
        """Native-audio models refuse TEXT output; only `sim-` models without "native-audio"
        in the name accept it."""
        return name.startswith(SIM_MODEL_PREFIX) and "native-audio" not in name

    def _authorized(self, rec: SessionRecord, request: Request | None) -> bool:
        if request is None:
            return False
        headers = request.headers
        query = parse_qs(urlsplit(request.path).query)
        if rec.method == "vertex":  # OAuth bearer token, or an API key in express mode
            auth = headers.get("authorization", "")
            bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            return bool(bearer or headers.get("x-goog-api-key"))
        if rec.method == "BidiGenerateContentConstrained":
            auth = headers.get("authorization", "")
            token = auth[6:].strip() if auth.lower().startswith("token ") else ""
            token = token or (query.get("access_token") or [""])[0]
            if not token:
                return False
            return token in self.tokens if self.tokens is not None else True
        key = headers.get("x-goog-api-key") or (query.get("key") or [""])[0]
        if not key:
            return False
        return self.api_key is None or secrets.compare_digest(key, self.api_key)

    # ---- WebSocket plumbing ----------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if _route(request.path) is None:
            log.debug("404 for %s", urlsplit(request.path).path)
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        version, method = _route(request.path) or (None, "")
        headers = request.headers
        query = parse_qs(urlsplit(request.path).query)
        scheme = headers.get("authorization", "").partition(" ")[0].lower()
        auth: str | None
        if method == "BidiGenerateContentConstrained" and (
            scheme == "token" or "access_token" in query
        ):
            auth = "token"
        elif method == "vertex" and scheme == "bearer":
            auth = "bearer"
        elif headers.get("x-goog-api-key"):
            auth = "x-goog-api-key"
        elif query.get("key"):
            auth = "key-param"
        else:
            auth = None
        rec = SessionRecord(
            index=len(self.sessions),
            path=urlsplit(request.path).path,
            api_version=version,
            method=method,
            auth=auth,
            has_api_key=auth in ("x-goog-api-key", "key-param"),
            user_agent=headers.get("user-agent"),
            api_client=headers.get("x-goog-api-client"),
            opened_at=time.monotonic(),
        )
        self.sessions.append(rec)
        session = _Session(self, ws, rec)
        session.event("connected", path=rec.path, auth=auth)
        try:
            await session.run()
        except Exception:  # never let one session take the server down
            log.exception("session %d crashed", rec.index)


# --------------------------------------------------------------------------------------------
# Standalone
# --------------------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    scenario = Scenario(mode=args.mode, rate=args.rate or None, seed=args.seed)
    server = FakeGeminiServer(
        args.host, args.port, tls=not args.no_tls, scenario=scenario, api_key=args.api_key,
        keep_audio=False, ca_file=args.ca_file,
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with server:
        print(f"GEMINI_BASE_URL={server.base_url}", flush=True)
        if server.ca_file is not None:
            print(f"SSL_CERT_FILE={server.ca_file}", flush=True)
        print(f"# fake Gemini Live ({args.mode}) ready; Ctrl-C to stop", flush=True)
        await stop.wait()
    print(f"# stopped after {len(server.sessions)} session(s)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m livecall.sim.gemini``: run the fake until Ctrl-C / SIGTERM."""
    p = argparse.ArgumentParser(
        prog="python -m livecall.sim.gemini",
        description="Fake Gemini Live server. Prints GEMINI_BASE_URL and SSL_CERT_FILE lines.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: pick a free port")
    p.add_argument("--mode", choices=("assistant", "echo"), default="assistant")
    p.add_argument(
        "--rate", type=float, default=1.3, help="reply audio speed x real time (0: unpaced)"
    )
    p.add_argument("--api-key", default=None, help="require this key (default: any non-empty)")
    p.add_argument("--ca-file", default=None, help="write the test CA's PEM here")
    p.add_argument("--no-tls", action="store_true", help="plain ws:// (the SDK will not connect)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
