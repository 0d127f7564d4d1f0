"""The load benchmark's caller: it times each probe at the ear, not at its socket.

Twilio plays what it receives in real time, 20 ms per tick, from a queue. Audio that arrives
in a burst after a stall waits in that queue, so a probe's echo can reach the socket early
and still be heard late. `EarCaller` is a `SimulatedCaller` whose probe clock stops when the
probe's echo is *played* (the tick that takes it from the queue), and which counts playout
underruns inside a reply: each probe is followed by `REPLY_FRAMES` of a loud tone, echoed as
one continuous reply, and a tick that finds less than a frame queued before the whole reply
was heard is a hole in the agent's voice.

Arrival times are kept too (`socket_rtts_ms`), so the queue's share of the delay shows.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from livecall.audio.g711 import ulaw_decode, ulaw_encode
from livecall.sim import edge as sim
from livecall.sim.twilio import Pause, Probe, Say, SimulatedCaller

__all__ = ["REPLY_FRAMES", "EarCaller", "ear_script"]

FRAME_MS = 20
REPLY_FRAMES = 4
"""Loud frames after each probe: the reply whose continuity is checked at the ear."""
REPLY_HZ = 500  # far from the probe's 1.8 kHz: never taken for a probe onset
REPLY_GIVE_UP_TICKS = 100  # 2 s: a reply that never completes is not waited for further


def _reply_clip() -> bytes:
    n = sim.SAMPLE_RATE * FRAME_MS * REPLY_FRAMES // 1000
    t = np.arange(n) / sim.SAMPLE_RATE
    pcm = (8000 * np.sin(2 * np.pi * REPLY_HZ * t)).astype(np.int16)
    return ulaw_encode(pcm).tobytes()


_REPLY = _reply_clip()


def ear_script(
    duration_s: float, probe_ms: int, phase_frames: int, *, first_at_start: bool = True
) -> list[Any]:
    """A probe + reply every `probe_ms` over `duration_s`, then a quiet tail. The first one
    goes at once (`first_at_start`): webhook -> first agent audio includes the call's setup."""
    if probe_ms < FRAME_MS * (REPLY_FRAMES + 2):
        raise ValueError(f"probe_ms must leave room for the reply ({REPLY_FRAMES} frames)")
    burst_ms = FRAME_MS * (1 + REPLY_FRAMES)
    script: list[Any] = []
    if first_at_start:
        script += [Probe(), Say(_REPLY, rate=sim.SAMPLE_RATE, label="reply")]
        script.append(Pause(probe_ms - burst_ms + FRAME_MS * phase_frames))
    else:
        script.append(Pause(FRAME_MS * phase_frames))
    for _ in range(max(1, int(duration_s * 1000 // probe_ms))):
        script += [Probe(), Say(_REPLY, rate=sim.SAMPLE_RATE, label="reply")]
        script.append(Pause(probe_ms - burst_ms))
    script.append(Pause(600))
    return script


class EarCaller(SimulatedCaller):
    """`SimulatedCaller` with probes timed when played; see the module docstring."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._ear = sim.ToneDetector()
        self._sock_probes: deque[float] = deque()
        self.socket_rtts_ms: list[tuple[float, float]] = []  # (arrival time, ms)
        self.ear_probes: list[tuple[float, float, float]] = []  # (sent, heard, ms)
        self.underruns: list[float] = []  # tick times a reply ran dry
        self.replies_heard = 0
        self.first_audio_at: float | None = None
        self._reply_left = 0
        self._reply_ticks = 0

    # probes sent: both clocks start
    def _frame_sent(self, t: float, flags: int, utt: Any) -> None:
        if flags & sim._F_PROBE:
            if not self._probes:
                self._ear.reset()
            self._sock_probes.append(t)
        super()._frame_sent(t, flags, utt)

    # arrival on the socket: the old measure, kept for comparison
    def _probe_heard(self, now: float) -> None:
        q = self._sock_probes
        while q and now - q[0] > self.probe_timeout:
            q.popleft()
        if q:
            self.socket_rtts_ms.append((now, (now - q.popleft()) * 1000.0))

    # the ear: what this tick takes from the playout queue
    async def _playout(self, now: float) -> None:
        fb = self._fb
        chunk = bytes(self._playbuf[:fb])
        await super()._playout(now)
        if self._reply_left > 0:
            self._reply_ticks += 1
            if len(chunk) < fb:
                self.underruns.append(now)
            if self._reply_ticks > REPLY_GIVE_UP_TICKS:
                self._reply_left = 0
        if not chunk:
            return
        if self.first_audio_at is None and len(chunk.translate(None, sim._QUIET_CODES)) >= 4:
            self.first_audio_at = now
        onsets = self._ear.feed(ulaw_decode(chunk))
        if self._reply_left > 0 and len(chunk) == fb and onsets == 0:
            self._reply_left -= 1
            if self._reply_left == 0:
                self.replies_heard += 1
        for _ in range(onsets):
            self._ear_heard(now)

    def _ear_heard(self, now: float) -> None:
        probes = self._probes
        r = self.result
        while probes and now - probes[0] > self.probe_timeout:
            probes.popleft()
            r.probes_lost += 1
        if probes:
            sent = probes.popleft()
            ms = (now - sent) * 1000.0
            r.probe_rtts_ms.append(ms)
            r.timeline.append(sim.TimelineEvent(now, "probe_heard"))
            self.ear_probes.append((sent, now, ms))
            self._reply_left = REPLY_FRAMES
            self._reply_ticks = 0


def ear_summary(caller: EarCaller) -> dict[str, Any]:
    """What the benchmark keeps of one call (times: the loop's monotonic clock)."""
    return {
        "ear": [[round(s, 4), round(h, 4), round(ms, 2)] for s, h, ms in caller.ear_probes],
        "socket": [[round(t, 4), round(ms, 2)] for t, ms in caller.socket_rtts_ms],
        "underruns": [round(t, 4) for t in caller.underruns],
        "replies_heard": caller.replies_heard,
        "webhook_at": caller.result.started,
        "first_audio_at": caller.first_audio_at,
    }
