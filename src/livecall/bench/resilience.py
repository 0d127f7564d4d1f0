"""Resilience benchmark: what a caller hears when Gemini sessions come and go, and what hostile
input costs.

Everything runs in this process on loopback: the real server (`LocalStack`), the real
`google-genai` SDK against the simulated Gemini Live, simulated Twilio callers. Four figures,
each from its own scripted scenario:

* **gap at each rotation** (ms). A call of short exchanges in which the fake model sends
  `goAway` a few seconds into every session (a 10-minute Gemini connection in compressed time).
  For every rotation: the bridge's `gap_ms` (from the goAway switch starting to the new session
  taking caller audio; the caller's audio is buffered meanwhile), and what the caller heard
  around it: whether agent audio was playing at that moment and, if it was, the longest
  silence in what they heard within ±1 s of it (else the rotation fell in a pause: nothing to
  hear). And once, a rotation forced mid-answer (goAway with 1 s left, no turn boundary in
  time): how much of the answer the caller never heard.
* **caller frames lost** (must be 0): frames the simulated caller sent against frames the
  bridge took in and caller audio the model sessions received, summed (replays at each switch
  make the model side larger, never smaller).
* **time to recover from a 1011**: the fake closes the session with 1011 in the middle of the
  call, a few times. Per close: until the new (resumed) session is set up, until the first
  caller audio reaches it (the "audio flowing again" point), and the bridge's own `gap_ms`.
  Target ≤ 1 s.
* **fuzz frames per second survived**: a clean call runs while another stream (signed, after
  a valid `start`) is fed `hostile_frames()` as fast as the server takes them; the rate the
  server absorbed, and whether the clean call still heard its answers and the fuzzed call
  still answered afterwards.

`hostile_frames()` is also the generator of the stream-handler fuzz test
(tests/test_hostile_input.py): same mix, same seed, same frames.

Run: ``python bench/resilience.py [--fuzz-frames N]`` (or ``python -m livecall.bench.resilience``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import statistics
import string
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "HUGE_NUMBERS",
    "FrameMix",
    "hostile_frames",
    "run_resilience_benchmark",
]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
PCM16K_FRAME_BYTES = 640  # one 20 ms caller frame as Gemini gets it

# Counters no real stream reaches. Kept at 2**40 and above on purpose: a timestamp that is
# large but not absurd (hours, days) makes a recording of that length (see the hostile-input
# tests), so the fuzz stays with values that fail fast wherever they are trusted.
HUGE_NUMBERS: tuple[int | float | str, ...] = (
    2**40,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    10**20,
    2**70,
    -(2**63),
    1e300,
    "99999999999999999999999999",
    "1" * 400,
    "-1",
    "1e9",
    " 7",
    "0x10",
)
_WRONG_TYPES: tuple[Any, ...] = (None, True, 3.5, [], [1, 2], {}, {"a": 1}, "", "x" * 300)


@dataclass(frozen=True, slots=True)
class FrameMix:
    """How often each kind of hostile frame is drawn (relative weights)."""

    binary: float = 6  # random bytes in a binary frame
    text_noise: float = 6  # random text: not JSON
    truncated: float = 10  # a well-formed message cut short
    not_an_object: float = 4  # JSON that is no object: arrays, scalars, deep nesting
    wrong_types: float = 14  # known events whose fields have the wrong types
    huge_numbers: float = 8  # counters far out of range (some on this stream's media)
    unknown_event: float = 7  # events Twilio does not send, with junk bodies
    wrong_stream: float = 10  # every event, for another (or a malformed) streamSid
    oversized: float = 0.3  # text frames above the per-message size limit
    bad_base64: float = 10  # this stream's media with payloads that are not base64
    valid_audio: float = 3  # this stream's media, valid base64 of random bytes
    late_media: float = 3  # this stream's media, chunk numbers going backwards
    this_stream_misc: float = 5  # marks never sent, DTMF that is no key (or is one)
    out_of_place: float = 2  # connected / start again

    def kinds(self) -> tuple[list[str], list[float]]:
        names = [f for f in self.__dataclass_fields__]
        return names, [getattr(self, n) for n in names]


def _json(obj: Any) -> str:
    try:
        return orjson.dumps(obj).decode()
    except TypeError:  # integers beyond 64 bits: the stdlib writes them
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = string.printable + 'ÄéΩ€𝄞\u200b\ufeff{}[]":,\\'
    return "".join(rng.choice(alphabet) for _ in range(n))


def _sid(rng: random.Random) -> str:
    return "MZ" + "".join(rng.choice("0123456789abcdef") for _ in range(32))


class _Gen:
    """Draws frames for one stream (`stream_sid`) from a seeded `random.Random`."""

    def __init__(self, rng: random.Random, stream_sid: str, limit: int) -> None:
        self.rng = rng
        self.sid = stream_sid
        self.limit = limit
        self.chunk = 1000  # plausible counters for this stream's media
        self.seq = 10

    # --- building blocks
    def _counter(self) -> Any:
        r = self.rng.random()
        if r < 0.6:
            return str(self.rng.randrange(0, 10**6))
        if r < 0.8:
            return self.rng.choice(HUGE_NUMBERS)
        return self.rng.choice(_WRONG_TYPES)

    def _foreign_sid(self) -> Any:
        """A streamSid that is not this stream's and is no empty value (an absent or null
        streamSid means "this stream" to the parser: see `this_stream_misc`)."""
        r = self.rng.random()
        if r < 0.6:
            return _sid(self.rng)
        if r < 0.8:
            return self.sid + "x"
        return self.rng.choice([1, 2.5, [self.sid], {"sid": self.sid}, True, "MZ"])

    def _message(self, event: str, sid: Any) -> dict[str, Any]:
        rng = self.rng
        msg: dict[str, Any] = {"event": event, "sequenceNumber": str(rng.randrange(1, 10**6))}
        if sid is not None:
            msg["streamSid"] = sid
        if event == "media":
            msg["media"] = {
                "track": "inbound",
                "chunk": str(rng.randrange(1, 10**6)),
                "timestamp": str(rng.randrange(0, 10**8)),
                "payload": base64.b64encode(rng.randbytes(rng.choice([0, 1, 160, 161]))).decode(),
            }
        elif event == "dtmf":
            msg["dtmf"] = {"track": "inbound_track", "digit": rng.choice("0123456789*#")}
        elif event == "mark":
            msg["mark"] = {"name": f"a{rng.randrange(10**6)}"}
        elif event == "stop":
            msg["stop"] = {"accountSid": "AC" + "0" * 32, "callSid": "CA" + "0" * 32}
        elif event == "start":
            msg["start"] = {
                "streamSid": sid,
                "callSid": "CA" + "1" * 32,
                "accountSid": "AC" + "1" * 32,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            }
        elif event == "connected":
            msg = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        return msg

    def _next_media(self, payload: str) -> str:
        self.chunk += 1
        self.seq += 1
        return _json(
            {
                "event": "media",
                "sequenceNumber": str(self.seq),
                "streamSid": self.sid,
                "media": {
                    "track": "inbound",
                    "chunk": str(self.chunk),
                    "timestamp": str(self.chunk * 20),
                    "payload": payload,
                },
            }
        )

    # --- the kinds
    def binary(self) -> bytes:
        return self.rng.randbytes(self.rng.randrange(0, 400))

    def text_noise(self) -> str:
        return _random_text(self.rng, self.rng.randrange(0, 300))

    def truncated(self) -> str:
        event = self.rng.choice(["media", "dtmf", "mark", "stop", "start"])
        whole = _json(self._message(event, self.rng.choice([self.sid, None])))
        return whole[: self.rng.randrange(0, len(whole))]  # never the whole message

    def not_an_object(self) -> str:
        rng = self.rng
        return rng.choice(
            [
                "[]",
                "null",
                "true",
                "42",
                '"media"',
                _json([self._message("media", self.sid)]),
                "[" * rng.randrange(100, 5000) + "]" * rng.randrange(0, 10),
                '{"a":' * rng.randrange(100, 2000) + "1" + "}" * rng.randrange(0, 2000),
                "1e99999",
                "NaN",
            ]
        )

    def wrong_types(self) -> str:
        rng = self.rng
        event = rng.choice(["media", "dtmf", "mark", "start", "connected", "stop"])
        msg = self._message(event, self.sid)
        body = msg.get(event)
        target = body if isinstance(body, dict) and rng.random() < 0.7 else msg
        target[rng.choice([*target.keys(), "event"])] = rng.choice(_WRONG_TYPES)
        if msg.get("event") == "stop":  # never a stop this stream would take
            msg["streamSid"] = self._foreign_sid()
        return _json(msg)

    def huge_numbers(self) -> str:
        rng = self.rng
        this_stream = rng.random() < 0.5
        event = "media" if this_stream else rng.choice(["media", "dtmf", "mark", "stop"])
        msg = self._message(event, self.sid if this_stream else self._foreign_sid())
        field_ = rng.choice(["sequenceNumber", "chunk", "timestamp"])
        value = rng.choice(HUGE_NUMBERS)
        if field_ == "sequenceNumber" or event != "media":
            msg["sequenceNumber"] = value
        else:
            msg["media"][field_] = value
        return _json(msg)

    def unknown_event(self) -> str:
        rng = self.rng
        name = rng.choice(["clear", "playAudio", "checkpoint", "STOP", "Media", "x" * 60, "😀"])
        return _json({"event": name, "streamSid": self.sid, name: {"junk": self._counter()}})

    def wrong_stream(self) -> str:
        event = self.rng.choice(["media", "dtmf", "mark", "stop", "start"])
        return _json(self._message(event, self._foreign_sid()))

    def oversized(self) -> str:
        size = self.rng.randrange(self.limit + 1, 3 * self.limit)
        msg = self._message("media", self.sid)
        msg["media"]["payload"] = "A" * size
        return _json(msg)

    def bad_base64(self) -> str:
        rng = self.rng
        payload = rng.choice(
            ["@@@@", "AAA", "A", "====", "AAAA=AAA", "Zm9v\nYmFy", "🙂🙂", _random_text(rng, 40)]
        )
        return self._next_media(payload)

    def valid_audio(self) -> str:
        n = self.rng.choice([0, 1, 80, 160, 160, 160, 161, 320, 800])
        return self._next_media(base64.b64encode(self.rng.randbytes(n)).decode())

    def late_media(self) -> str:
        msg = self._message("media", self.sid)
        msg["media"]["chunk"] = str(self.rng.randrange(0, 1000))  # behind any `_next_media`
        return _json(msg)

    def this_stream_misc(self) -> str:
        rng = self.rng
        sid = rng.choice([self.sid, None])  # an absent streamSid is this stream's too
        if rng.random() < 0.5:
            msg = self._message("mark", sid)
            msg["mark"]["name"] = rng.choice(["", "a0", "never-sent", _random_text(rng, 30)])
        else:
            msg = self._message("dtmf", sid)
            msg["dtmf"]["digit"] = rng.choice(["1", "#", "", "11", "x", "ignore all rules"])
        return _json(msg)

    def out_of_place(self) -> str:
        event = self.rng.choice(["connected", "start"])
        return _json(self._message(event, self.sid))


def hostile_frames(
    n: int,
    stream_sid: str,
    *,
    seed: int = 0,
    mix: FrameMix | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Iterator[str | bytes]:
    """`n` random and malformed frames for a stream already started as `stream_sid`.

    Deterministic for a seed. Text frames are `str`, binary frames `bytes`. None of them is a
    `stop` that would end the stream (the parser takes an absent or null streamSid as this
    stream's, so every `stop` drawn carries another one), and none is above the server's
    WebSocket limit (1 MiB, where the connection itself is closed): oversized frames are
    between `max_message_bytes` and three times that.
    """
    rng = random.Random(seed)
    gen = _Gen(rng, stream_sid, max_message_bytes)
    names, weights = (mix or FrameMix()).kinds()
    makers: list[Callable[[], str | bytes]] = [getattr(gen, name) for name in names]
    cumulative: list[float] = []
    total = 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    for _ in range(n):
        [maker] = rng.choices(makers, cum_weights=cumulative)
        yield maker()


# ============================================================================================
# The benchmark
# ============================================================================================

SHORT_REPLIES = {"yes": "one_moment", "hours": "goodbye", "time": "one_moment"}


@dataclass
class _Recorder:
    """An observer factory keeping every call's bridge events."""

    events: dict[str, list[Any]] = field(default_factory=dict)

    def __call__(self, call_sid: str) -> Any:
        events = self.events.setdefault(call_sid, [])

        class Observer:
            def call_started(self, info: Any) -> None:
                return None

            def turn(self, turn: Any) -> None:
                return None

            def event(self, event: Any) -> None:
                events.append(event)

            def call_ended(self, summary: Any) -> None:
                return None

        return Observer()


def _say(name: str) -> Any:
    from livecall.sim.clips import load_clip
    from livecall.sim.twilio import Say

    pcm, rate = load_clip(name)
    return Say(pcm, rate=rate, label=name)


def _overrides(**extra: Any) -> dict[str, Any]:
    return {"vad_silence_duration_ms": 300, "recording_enabled": False, **extra}


def _hole_around_ms(heard: Any, at: int, span: int = 8000) -> float | None:
    """The silence the caller heard in the agent's speech around sample `at` (8 kHz PCM).

    None when no agent audio was heard within 60 ms of `at` (the moment fell in a pause:
    nothing to interrupt). Else the longest run of silent 20 ms frames within ±`span`
    samples that has agent audio on both sides: a hole in the speech, 0 when there is none.
    """
    import numpy as np

    lo = max(0, at - span)
    seg = np.abs(np.asarray(heard[lo : max(lo, at + span)], dtype=np.int32))
    n = len(seg) // 160
    if n == 0:
        return None
    loud = ((seg[: n * 160].reshape(n, 160) >= 300).sum(axis=1) >= 4).tolist()
    center = (at - lo) // 160
    if not any(loud[max(0, center - 3) : center + 4]):
        return None
    best = run = 0
    seen_loud = False
    for flag in loud:
        if flag:
            if seen_loud:
                best = max(best, run)
            seen_loud, run = True, 0
        else:
            run += 1
    return best * 20.0


async def _rotations(seed: int) -> dict[str, Any]:
    """Gap at each rotation and caller frames lost, over a call with goAway every few seconds."""
    from livecall.sim.gemini import GoAwayFault, Scenario
    from livecall.sim.stack import LocalStack
    from livecall.sim.twilio import HangUp, Pause, WaitForAgentSilence

    scenario = Scenario(
        seed=seed,
        greeting=None,
        replies=SHORT_REPLIES,
        pause_prob=0.0,
        first_audio_delay=0.2,
        go_aways=[GoAwayFault(after=3.5, time_left=2.5)],
    )
    recorder = _Recorder()
    utterances = ["yes", "hours", "yes", "time", "yes", "hours", "yes", "yes"]
    script: list[Any] = [Pause(300)]
    for i, name in enumerate(utterances):
        script += [_say(name), WaitForAgentSilence(silence_ms=500, timeout=20)]
        script.append(Pause(200 + 200 * (i % 3)))
    script.append(HangUp())
    async with LocalStack(
        scenario=scenario, settings_overrides=_overrides(), observer_factory=recorder
    ) as stack:
        gemini = stack.gemini
        assert gemini is not None and stack.app is not None
        result = await stack.caller(script, seed=seed, timeout=90).run()
        state = stack.app.state.livecall
        await state.registry.wait_idle(20)
        await gemini.wait_for(lambda: all(s.closed for s in gemini.sessions), 20)
        await state.store.flush()
        call = await state.store.repo.get_call(result.call_sid)
        sessions = list(gemini.sessions)
    events = recorder.events.get(result.call_sid, [])
    switches = [
        e for e in events if e.kind == "session_resumed" and e.data.get("reason") == "go_away"
    ]
    heard = result.heard_pcm()
    assert result.stream_started is not None
    rows = []
    for i, new in enumerate(sessions[1:], start=1):
        ready = next((e.t for e in new.events if e.kind == "setup_complete"), new.opened_at)
        hole = _hole_around_ms(heard, round((ready - result.stream_started) * 8000))
        gap = switches[i - 1].data.get("gap_ms") if i - 1 < len(switches) else None
        rows.append(
            {
                "rotation": i,
                "at_s": round(ready - result.stream_started, 2),
                "bridge_gap_ms": gap,
                "agent_audio_playing": hole is not None,
                "heard_gap_ms": hole,
                "resumed": new.resumed,
            }
        )
    received = sum(s.audio_bytes_received for s in sessions) // PCM16K_FRAME_BYTES
    frames_in = call.frames_in if call is not None else None
    answered = sum(u.response_latency_ms is not None for u in result.utterances)
    latencies = result.response_latencies_ms
    return {
        "rotations": rows,
        "call_s": round(result.duration_s, 1),
        "frames_sent": result.frames_sent,
        "frames_in_bridge": frames_in,
        "frames_to_gemini": received,
        "frames_lost": max(0, result.frames_sent - (frames_in or 0))
        + max(0, result.frames_sent - received),
        "utterances": len(utterances),
        "answered": answered,
        "latency_ms_median": round(statistics.median(latencies), 1) if latencies else None,
        "protocol_errors": len(result.protocol_errors),
    }


async def _forced_rotation(seed: int) -> dict[str, Any]:
    """A rotation that cannot wait for a turn boundary: goAway with 1 s left, mid-answer.

    (A real goAway leaves ~60 s, so livecall always finds a boundary first; in compressed
    time it may not. This shows what the caller hears then.)
    """
    from livecall.sim.clips import clip_duration
    from livecall.sim.gemini import GoAwayFault, Scenario
    from livecall.sim.stack import LocalStack
    from livecall.sim.twilio import HangUp, Pause, WaitForAgentSilence

    scenario = Scenario(
        seed=seed,
        greeting=None,
        replies={"yes": "book_reply", "hours": "hours_reply"},
        pause_prob=0.0,
        first_audio_delay=0.2,
        go_aways=[GoAwayFault(after=4.0, time_left=1.0, max_fires=1)],
    )
    script: list[Any] = [
        Pause(300),
        _say("yes"),
        WaitForAgentSilence(silence_ms=1500, timeout=25),
        _say("hours"),
        WaitForAgentSilence(silence_ms=500, timeout=20),
        HangUp(),
    ]
    async with LocalStack(scenario=scenario, settings_overrides=_overrides()) as stack:
        assert stack.gemini is not None
        result = await stack.caller(script, seed=seed, timeout=60).run()
        await stack.registry.wait_idle(20)
        sessions = list(stack.gemini.sessions)
    assert result.stream_started is not None
    t0 = result.stream_started
    second = result.utterances[1].start if len(result.utterances) > 1 else None
    switch = None
    if len(sessions) > 1:
        switch = next((e.t for e in sessions[1].events if e.kind == "setup_complete"), None)
    first_answer = [(a, b) for a, b in result.agent_stretches if second is None or a < second]
    heard_ms = sum(b - a for a, b in first_answer) * 1000.0
    clip_ms = clip_duration("book_reply") * 1000.0
    after_switch_ms = None
    if switch is not None and first_answer:
        after_switch_ms = round(max(0.0, first_answer[-1][1] - switch) * 1000.0)
    return {
        "switch_at_s": round(switch - t0, 2) if switch is not None else None,
        "answer_ms": round(clip_ms),
        "answer_heard_ms": round(heard_ms),
        "answer_cut_ms": round(max(0.0, clip_ms - heard_ms)),
        "answer_heard_twice_ms": round(max(0.0, heard_ms - clip_ms)),
        # the new session got the question again (replayed: it was after the last resumable
        # snapshot) and answered it from the start
        "answered_again": len(sessions) > 1
        and any(t.caller_clip == "yes" for t in sessions[1].turns),
        "audio_after_switch_ms": after_switch_ms,
        "next_answer_latency_ms": (
            round(result.utterances[1].response_latency_ms)
            if len(result.utterances) > 1 and result.utterances[1].response_latency_ms
            else None
        ),
        "sessions": len(sessions),
    }


async def _recover_1011(seed: int, closes: int = 4) -> dict[str, Any]:
    """Time to recover from 1011s: the fake closes each session 2.5 s in, `closes` times."""
    from livecall.sim.gemini import CloseFault, Scenario
    from livecall.sim.stack import LocalStack
    from livecall.sim.twilio import HangUp, Pause, WaitForAgentSilence

    scenario = Scenario(
        seed=seed,
        greeting=None,
        replies=SHORT_REPLIES,
        pause_prob=0.0,
        first_audio_delay=0.2,
        closes=[CloseFault(code=1011, at=2.5, max_fires=closes)],
    )
    recorder = _Recorder()
    script: list[Any] = [Pause(300)]
    for _ in range(closes + 1):
        script += [_say("yes"), WaitForAgentSilence(silence_ms=500, timeout=20), Pause(800)]
    script.append(HangUp())
    async with LocalStack(
        scenario=scenario, settings_overrides=_overrides(), observer_factory=recorder
    ) as stack:
        gemini = stack.gemini
        assert gemini is not None
        flowing: dict[int, float] = {}

        async def watch() -> None:
            # when did caller audio first reach each session (re-checked on every change)
            while True:
                await gemini.wait_for(
                    lambda: any(
                        s.index not in flowing and s.audio_chunks_received for s in gemini.sessions
                    ),
                    timeout=120,
                )
                now = time.monotonic()
                for s in gemini.sessions:
                    if s.index not in flowing and s.audio_chunks_received:
                        flowing[s.index] = now

        watcher = asyncio.create_task(watch())
        try:
            result = await stack.caller(script, seed=seed, timeout=90).run()
        finally:
            watcher.cancel()
        assert stack.app is not None
        state = stack.app.state.livecall
        await state.registry.wait_idle(20)
        sessions = list(gemini.sessions)
    events = recorder.events.get(result.call_sid, [])
    resumed = [e for e in events if e.kind in ("session_resumed", "session_started")][1:]
    rows: list[dict[str, Any]] = []
    for i, old in enumerate(sessions[:-1]):
        if old.close_code != 1011 or old.closed_at is None:
            continue
        new = sessions[i + 1]
        ready = next((e.t for e in new.events if e.kind == "setup_complete"), None)
        first_audio = flowing.get(new.index)
        gap = resumed[i].data.get("gap_ms") if i < len(resumed) else None
        # the moment the fake decided to close (its close frame goes out right after)
        closed = next((e.t for e in old.events if e.kind == "close"), old.closed_at)
        rows.append(
            {
                "close": len(rows) + 1,
                "session_ready_ms": round((ready - closed) * 1000, 1) if ready else None,
                "audio_flowing_ms": (
                    round((first_audio - closed) * 1000, 1) if first_audio else None
                ),
                "bridge_gap_ms": gap,
                "resumed": new.resumed,
            }
        )
    return {
        "recoveries": rows,
        "answered": sum(u.response_latency_ms is not None for u in result.utterances),
        "utterances": closes + 1,
        "ended_by": result.ended_by,
    }


async def _fuzz_rate(seed: int, frames: int) -> dict[str, Any]:
    """Hostile frames per second the server absorbs on one stream while a clean call runs."""
    import websockets

    from livecall.sim.gemini import Scenario
    from livecall.sim.stack import TEST_AUTH_TOKEN, LocalStack
    from livecall.sim.twilio import HangUp, Pause, WaitForAgentSilence
    from livecall.telephony.twilio import TwilioSignature

    scenario = Scenario(
        seed=seed, greeting=None, replies=SHORT_REPLIES, pause_prob=0.0, first_audio_delay=0.2
    )
    async with LocalStack(scenario=scenario, settings_overrides=_overrides()) as stack:
        url = stack.base_url.replace("http://", "ws://") + "/ws/twilio"
        headers = {"X-Twilio-Signature": TwilioSignature(TEST_AUTH_TOKEN).sign(url)}
        sid = "MZ" + "f" * 32
        call_sid = "CA" + "f" * 32
        ws = await websockets.connect(url, additional_headers=headers, proxy=None, max_size=None)
        await ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        await ws.send(
            _json(
                {
                    "event": "start",
                    "sequenceNumber": "1",
                    "streamSid": sid,
                    "start": {
                        "streamSid": sid,
                        "callSid": call_sid,
                        "accountSid": "AC" + "f" * 32,
                        "tracks": ["inbound"],
                        "customParameters": {
                            "lc_token": stack.stream_token(call_sid, "AC" + "f" * 32)
                        },
                        "mediaFormat": {
                            "encoding": "audio/x-mulaw",
                            "sampleRate": 8000,
                            "channels": 1,
                        },
                    },
                }
            )
        )

        async def drain() -> None:
            async for _ in ws:
                pass

        reader = asyncio.create_task(drain())
        clean = stack.caller(
            [
                Pause(300),
                _say("hours"),
                WaitForAgentSilence(silence_ms=500, timeout=30),
                _say("yes"),
                WaitForAgentSilence(silence_ms=500, timeout=30),
                HangUp(),
            ],
            seed=seed,
            timeout=90,
        )
        clean_task = asyncio.create_task(clean.run())
        started = time.perf_counter()
        sent = 0
        for frame in hostile_frames(frames, sid, seed=seed):
            await ws.send(frame)
            sent += 1
        # the server has taken every frame once it answers a ping sent after them
        pong = await ws.ping()
        await asyncio.wait_for(pong, 60)
        elapsed = time.perf_counter() - started
        clean_result = await clean_task
        alive = not ws.close_code
        await ws.send(_json({"event": "stop", "streamSid": sid}))
        await ws.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        assert stack.app is not None
        state = stack.app.state.livecall
        idle = await state.registry.wait_idle(20)
    return {
        "frames": sent,
        "seconds": round(elapsed, 2),
        "frames_per_s": round(sent / elapsed),
        "fuzzed_stream_alive": alive,
        "clean_call_answers": len(clean_result.response_latencies_ms),
        "clean_call_protocol_errors": len(clean_result.protocol_errors),
        "clean_latency_ms": [round(x) for x in clean_result.response_latencies_ms],
        "no_call_left": idle,
    }


def run_resilience_benchmark(
    console: Any = None, *, fuzz_frames: int = 100_000, seed: int = 1
) -> dict[str, Any]:
    """Run the three scenarios, print the tables, return the figures."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()

    async def run_all() -> dict[str, Any]:
        rotations = await _rotations(seed)
        forced = await _forced_rotation(seed + 3)
        recovery = await _recover_1011(seed + 1)
        fuzz = await _fuzz_rate(seed + 2, fuzz_frames)
        return {
            "rotations": rotations,
            "forced_rotation": forced,
            "recovery_1011": recovery,
            "fuzz": fuzz,
        }

    report = asyncio.run(run_all())

    rot = report["rotations"]
    table = Table(title="Gap heard by the caller at each goAway rotation")
    for col in ("#", "at (s)", "bridge gap (ms)", "agent talking", "heard gap (ms)", "resumed"):
        table.add_column(col, justify="right")
    for row in rot["rotations"]:
        table.add_row(
            str(row["rotation"]),
            f"{row['at_s']:.2f}",
            "-" if row["bridge_gap_ms"] is None else f"{row['bridge_gap_ms']:.0f}",
            "yes" if row["agent_audio_playing"] else "no (pause)",
            "-" if row["heard_gap_ms"] is None else f"{row['heard_gap_ms']:.0f}",
            "yes" if row["resumed"] else "NO",
        )
    console.print(table)
    console.print(
        f"call {rot['call_s']} s, {len(rot['rotations'])} rotations; caller frames sent "
        f"{rot['frames_sent']}, taken by the bridge {rot['frames_in_bridge']}, caller audio "
        f"received by Gemini {rot['frames_to_gemini']} frames (replays count twice); "
        f"[bold]frames lost: {rot['frames_lost']}[/bold]; utterances answered "
        f"{rot['answered']}/{rot['utterances']}, median response {rot['latency_ms_median']} ms"
    )

    fr = report["forced_rotation"]
    restarted = "the new session answered the question again from the start; " * bool(
        fr["answered_again"]
    )
    console.print(
        f"Forced rotation mid-answer (goAway with 1 s left, at {fr['switch_at_s']} s): "
        f"{restarted}the caller heard {fr['answer_heard_ms']} ms for a {fr['answer_ms']} ms "
        f"answer ([bold]{fr['answer_cut_ms']} ms never heard, "
        f"{fr['answer_heard_twice_ms']} ms heard twice[/bold]); agent audio went on "
        f"{fr['audio_after_switch_ms']} ms after the switch; the next question was answered "
        f"in {fr['next_answer_latency_ms']} ms"
    )

    rec = report["recovery_1011"]
    table = Table(title="Recovery from a 1011 (target ≤ 1000 ms)")
    for col in ("#", "new session ready (ms)", "caller audio flowing (ms)", "bridge gap (ms)"):
        table.add_column(col, justify="right")
    for row in rec["recoveries"]:
        table.add_row(
            str(row["close"]),
            str(row["session_ready_ms"]),
            str(row["audio_flowing_ms"]),
            str(row["bridge_gap_ms"]),
        )
    console.print(table)
    worst = max(
        (r["audio_flowing_ms"] for r in rec["recoveries"] if r["audio_flowing_ms"] is not None),
        default=None,
    )
    rec["worst_ms"] = worst
    rec["meets_target"] = worst is not None and worst <= 1000.0
    console.print(
        f"worst {worst} ms ({'meets' if rec['meets_target'] else 'MISSES'} the 1 s target); "
        f"utterances answered {rec['answered']}/{rec['utterances']}"
    )

    fz = report["fuzz"]
    console.print(
        f"[bold]Fuzz[/bold]: {fz['frames']} hostile frames in {fz['seconds']} s = "
        f"[bold]{fz['frames_per_s']} frames/s survived[/bold]; fuzzed stream still open: "
        f"{fz['fuzzed_stream_alive']}; clean call answered {fz['clean_call_answers']}/2 "
        f"({fz['clean_latency_ms']} ms), protocol errors {fz['clean_call_protocol_errors']}; "
        f"no call left: {fz['no_call_left']}"
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m livecall.bench.resilience")
    p.add_argument("--fuzz-frames", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    run_resilience_benchmark(fuzz_frames=args.fuzz_frames, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
