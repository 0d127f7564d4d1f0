"""The agent's side of the carrier: what the caller hears, sent, marked and accounted for.

Agent audio (the model's, or a recorded line) is coded to the stream's playback format and
sent the moment it exists, the carrier queueing it; a mark follows every ~100 ms so the
`PlayoutTracker` learns what has actually been played. A carrier without marks gets its marks
settled by pacing ("estimated" echoes). A barge-in clears the carrier's queue before anything
else. Played audio is placed in the recording where the caller heard it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from livecall.agent import live_protocol as lp
from livecall.audio.resample import StreamResampler
from livecall.audio.transcode import OutboundTranscoder, encoding_of, from_ulaw, pcm_of
from livecall.call.carrier_socket import CarrierClosed
from livecall.call.playout import PlayoutTracker
from livecall.carriers.base import Frame, MediaFormat

if TYPE_CHECKING:
    from livecall.call.core import CallCore

__all__ = ["MARK_EVERY_SAMPLES", "AgentOutput"]

MARK_EVERY_SAMPLES = 800  # a mark per ~100 ms of agent audio (and at every turn's end)


class AgentOutput:
    """Agent audio to carrier frames, its marks and echoes, `clear`, and waits for "heard".

    Playout counts agent audio in 8 kHz samples whatever the carrier's rate, so the
    transcript's "heard" cut and the recording (8 kHz) need no rate of their own.
    """

    def __init__(self, bridge: CallCore) -> None:
        self.bridge = bridge
        # the call's shared parts, bound once
        self.socket = bridge.socket
        self.stream = stream = bridge.stream
        self.turns = bridge.turns
        self.supervisor = bridge.supervisor
        self.recorder = bridge.recorder
        self.log = bridge.log
        self.now_ms = bridge.now_ms
        self._event = bridge.event
        self._end = bridge.finish
        self._ended = bridge.ended

        playback: MediaFormat = stream.media_format
        self.playback_format = playback
        self._out_encoding = encoding_of(playback.encoding)
        self._out_rate = playback.sample_rate
        # bytes per 8 kHz sample of agent audio (1 for G.711; 2, 4, 6 for L16 at 8/16/24 kHz)
        self._unit = (2 if playback.encoding == "l16" else 1) * playback.sample_rate // 8000
        # a carrier that plays whole frames only gets aligned audio (the rest waits in _held),
        # so a mark mid-turn never makes it pad a partial frame with silence
        self._align = playback.bytes_per_20ms * stream.capabilities.frame_ms // 20
        self._held = b""
        self._marks = stream.capabilities.marks
        self._can_clear = stream.capabilities.clear
        self._agent_rate = 24000
        self.outbound = OutboundTranscoder(24000, self._out_encoding, self._out_rate)
        self.playout = PlayoutTracker(rate=8000)
        self.discarding_turn = False  # after `interrupted`, until the turn completes
        self.heard = asyncio.Condition()  # notified whenever playout or the turns move on
        self._unmarked_samples = 0
        self._background: set[asyncio.Task[None]] = set()  # estimated mark echoes
        metrics = bridge.options.metrics
        self._meter_out = metrics.frame_meter("out") if metrics is not None else None
        self.frames_out = 0

    # ------------------------------------------------------------------ public controls
    async def play_ulaw(self, ulaw: bytes) -> str | None:
        """Plays μ-law 8 kHz audio that is not the model's (tones, an apology, a recorded
        line), coded to the stream's playback format; returns its mark."""
        if self._out_encoding != "audio/x-mulaw" and ulaw:
            ulaw = from_ulaw(ulaw, self._out_encoding, self._out_rate)
        return await self.send_agent_audio(ulaw, in_turn=False, mark_now=True)

    async def send_dtmf(self, digits: str) -> bool | None:
        """Keys to the far end as the carrier's own DTMF message, where it has one (Plivo's
        `sendDTMF`): True once sent, False if the call has ended, None where the carrier
        cannot (the caller then plays the tones in-band with `play_ulaw`)."""
        if not self.stream.capabilities.send_dtmf_on_stream:
            return None
        try:
            frames = self.stream.send_dtmf(digits)
        except ValueError:
            return None  # keys the carrier's message cannot carry (A-D): tones instead
        return await self._send(frames)

    async def wait_heard(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Waits until everything sent so far has been played to the caller (mark echo)."""
        await self._send_mark()  # audio sent since the last mark needs one to be confirmed
        try:
            async with asyncio.timeout(timeout):
                async with self.heard:
                    await self.heard.wait_for(lambda: not self.playout.has_pending())
        except TimeoutError:
            return False
        return True

    async def wait_agent_done(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Waits for the agent's current turn to end and be heard (e.g. a goodbye). A turn
        that ended with `interactionStatus` IN_PROGRESS is not the end: more output follows."""
        deadline = time.monotonic() + timeout
        sup = self.supervisor
        try:
            async with asyncio.timeout(timeout):
                async with self.heard:
                    await self.heard.wait_for(
                        lambda: not self.turns.agent_turn_open and not sup.in_progress
                    )
        except TimeoutError:
            return False
        return await self.wait_heard(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ agent audio -> carrier
    async def agent_audio(self, audio: lp.AgentAudio) -> None:
        """One chunk of the model's audio, coded to the playback format and sent."""
        if audio.rate != self._agent_rate:  # the model changed its output rate: follow it
            self._agent_rate = audio.rate
            self.outbound = OutboundTranscoder(audio.rate, self._out_encoding, self._out_rate)
        meter = self._meter_out
        t0 = meter.begin() if meter is not None else 0
        coded = self.outbound.encode(audio.pcm)
        if meter is not None:
            meter.end(t0)
        await self.send_agent_audio(coded)

    async def _send(self, frames: list[Frame]) -> bool:
        """Sends a stream builder's frames in order; False (and the call ends) once closed."""
        try:
            for frame in frames:
                await self.socket.send(frame)
        except CarrierClosed:
            self._end("caller_closed")
            return False
        return True

    async def send_agent_audio(
        self, audio: bytes, *, in_turn: bool = True, mark_now: bool = False
    ) -> str | None:
        """Sends agent audio (in the playback format) at once, the carrier queues it; a mark
        follows every ~100 ms. Returns the mark when one was sent after this chunk.
        """
        if not audio:
            if self._held and mark_now:  # the end of a turn: what was held back goes now
                held, self._held = self._held, b""
                if not await self._send(self.stream.play(held)):
                    return None
            return await self._send_mark() if mark_now else None
        now = self.now_ms()
        samples = len(audio) // self._unit  # in 8 kHz samples
        if in_turn:
            if self.bridge.giving_up:
                return None  # the apology is playing: the model is not heard over it
            sup = self.supervisor
            sup.expect_reply_at = None
            sup.nudged = False
            sup.seed_open = False  # the model speaks: it is not waiting for more content
            turn = self.turns.agent_audio(now, samples)
            turn_end = self.turns.agent_samples
        else:
            turn, turn_end = -1, samples
        self.playout.sent(
            now, turn, samples, turn_end, None, audio if self.recorder is not None else None
        )
        if self._align and not mark_now:  # whole frames now, the rest with the next chunk
            if self._held:
                audio = self._held + audio
            cut = len(audio) - len(audio) % self._align
            audio, self._held = audio[:cut], audio[cut:]
        elif self._held:  # a turn's end: everything, the carrier pads the last frame
            audio, self._held = self._held + audio, b""
        frames = self.stream.play(audio) if audio else None
        if frames and not await self._send(frames):
            return None
        self.frames_out += 1
        self._unmarked_samples += samples
        if mark_now or self._unmarked_samples >= MARK_EVERY_SAMPLES:
            return await self._send_mark()
        return None

    async def _send_mark(self) -> str | None:
        """Asks the carrier to tell us when everything sent so far has been played.

        A carrier without marks gets none: the mark settles itself when the modelled playout
        (pacing from what was sent) says it has played, and heard parts are "estimated".
        """
        mark = self.playout.next_mark()
        if not self.playout.attach_mark(mark):
            return None
        self._unmarked_samples = 0
        if not self._marks:
            if not await self._send(self.stream.flush()):
                return None
            delay_s = max(0.0, self.playout.busy_until_ms() - self.now_ms()) / 1000.0
            asyncio.get_running_loop().call_later(delay_s, self._estimated_echo, mark)
            return mark
        if not await self._send(self.stream.mark(mark)):
            return None
        return mark

    def _estimated_echo(self, mark: str) -> None:
        """A mark of a carrier without marks, settled by pacing (see `_send_mark`)."""
        if self._ended.is_set():
            return
        if self.playout.mark_echoed(self.now_ms(), mark) is not None:
            self.record_played(self.playout.just_played)
        task = asyncio.get_running_loop().create_task(self.notify_heard())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def barge_in(self) -> None:
        """The caller spoke over the agent: silence it at the carrier before anything else.

        Without `clear` nothing more is sent and what the carrier has queued runs out: the
        caller hears all of the turn sent so far, and the audio stops once the queue is dry
        (`plays_for_ms` from now, by the pacing model). Without marks the heard part is the
        pacing model's ("estimated").
        """
        if self._can_clear and not await self._send(self.stream.clear()):
            return
        now = self.now_ms()
        self.outbound.reset()
        self._held = b""
        turn = self.turns.agent_turn_index
        fallback: dict[str, Any] = {} if self._marks else {"heard": "estimated"}
        if turn is None:
            heard, stops_ms = 0, now
        elif self._can_clear:
            heard, stops_ms = self.playout.heard_in_turn(turn, now), now
        else:  # nothing is dropped: everything of the turn sent so far still plays
            heard, stops_ms = self.turns.agent_samples, max(now, self.playout.busy_until_ms())
            fallback["plays_for_ms"] = round(stops_ms - now)
        if self._can_clear:
            self.record_played(self.playout.clear(now), until_ms=now)
        self._unmarked_samples = 0
        self.turns.interrupted(stops_ms, heard, estimated=not self._marks)
        self.discarding_turn = True
        await self.notify_heard()
        self.log.info("call.barge_in", heard_ms=round(heard / 8.0), **fallback)
        self._event("interrupted", heard_ms=round(heard / 8.0), **fallback)

    # ------------------------------------------------------------------ heard & recorded
    async def notify_heard(self) -> None:
        """Wakes whoever waits on `heard` (playout or the turns moved on)."""
        async with self.heard:
            self.heard.notify_all()

    def record_played(self, chunks: list[Any], until_ms: float | None = None) -> None:
        """Places agent audio in the recording where the caller heard it.

        Confirmed chunks sit where their mark echo says they played; with `until_ms` (a clear,
        or the end of the call) only the part modelled as played before that moment is kept.
        """
        if self.recorder is None:
            return
        for chunk in chunks:
            audio, chunk.audio = chunk.audio, None
            if not audio:
                continue
            if until_ms is not None and not chunk.played:
                if chunk.start_ms >= until_ms:
                    continue
                audio = audio[: int((until_ms - chunk.start_ms) * 8) * self._unit]
            if audio:
                self.recorder.add_agent(chunk.start_ms, self._agent_pcm8k(audio))

    def _agent_pcm8k(self, audio: bytes) -> Any:
        """Agent audio as sent (the playback format) -> 8 kHz int16 for the recording."""
        pcm = pcm_of(audio, self._out_encoding)
        if self._out_rate == 8000:
            return pcm
        rs = StreamResampler(self._out_rate, 8000)
        return np.concatenate((rs.process(pcm), rs.flush()))
