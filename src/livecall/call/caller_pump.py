"""The caller's side of the call: carrier frames in, caller audio to Gemini, in order.

Reads the carrier's socket through its sans-I/O `CarrierStream`, turns the caller's audio
(μ-law, A-law or L16) into 16 kHz PCM for Gemini (held in order while no session is usable:
the caller's first words are never dropped), tells the turn tracker when the caller is loud,
records the caller's channel, and hands mark echoes to the agent output and keys to Gemini.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from livecall.audio.g711 import ALAW_DECODE_TABLE, ULAW_DECODE_TABLE
from livecall.audio.resample import StreamResampler
from livecall.audio.transcode import InboundTranscoder, encoding_of, pcm_of
from livecall.call.carrier_socket import CarrierClosed
from livecall.carriers.base import (
    CallerAudio,
    CallStopped,
    CarrierProtocolError,
    Dtmf,
    MediaFormat,
    PlayedUpTo,
)
from livecall.privacy import keypad

if TYPE_CHECKING:
    from livecall.call.agent_output import AgentOutput
    from livecall.call.core import CallCore
    from livecall.call.gemini_sessions import GeminiSessions

__all__ = ["DTMF_KEYS", "MAX_MEDIA_MS", "VOICE_PEAK", "CallerPump"]

DTMF_KEYS = frozenset("0123456789*#ABCD")
VOICE_PEAK = 700  # int16 peak above which a caller frame counts as speech (~ -33 dBFS)
# b"\x01" for the G.711 codes louder than VOICE_PEAK, b"\x00" for the others: a frame's
# loudness without decoding it twice, as `bytes.translate` + a byte search (0.3 µs a frame,
# where numpy's take + any cost 2.2 µs in call overhead alone)
_LOUD_CODES = (np.abs(ULAW_DECODE_TABLE.astype(np.int32)) > VOICE_PEAK).astype(np.uint8).tobytes()
_LOUD_ALAW = (np.abs(ALAW_DECODE_TABLE.astype(np.int32)) > VOICE_PEAK).astype(np.uint8).tobytes()
MAX_MEDIA_MS = 1000  # one second of audio in one frame: no carrier sends frames that long


class CallerPump:
    """Carrier frames -> caller audio to Gemini, mark echoes, keys, the caller's recording."""

    def __init__(self, bridge: CallCore, output: AgentOutput, gemini: GeminiSessions) -> None:
        self.output = output
        self.gemini = gemini
        # the call's shared parts, bound once
        self.socket = bridge.socket
        self.stream = bridge.stream
        self.options = bridge.options
        self.turns = bridge.turns
        self.playout = output.playout
        self.recorder = bridge.recorder
        self.log = bridge.log
        self.now_ms = bridge.now_ms
        self._event = bridge.event
        self._end = bridge.finish

        # the caller's audio (the start's format; what we play may differ: `AgentOutput`)
        inbound: MediaFormat = bridge.start.media_format
        self._in_encoding = encoding_of(inbound.encoding)
        self.inbound = InboundTranscoder(16000, self._in_encoding, inbound.sample_rate)
        self._max_media_bytes = inbound.bytes_per_20ms * (MAX_MEDIA_MS // 20)
        self._loud_table = {"mulaw": _LOUD_CODES, "alaw": _LOUD_ALAW}.get(inbound.encoding)
        self._caller_rec_rs = (  # a higher-rate caller, resampled for the 8 kHz recording
            StreamResampler(inbound.sample_rate, 8000) if inbound.sample_rate != 8000 else None
        )
        self._stream_t0_ms: float | None = None  # call clock when Twilio's timestamp 0 was
        metrics = self.options.metrics
        self._meter_in = metrics.frame_meter("in") if metrics is not None else None
        self.frames_in = 0
        self.protocol_errors = 0

    async def run(self) -> None:
        """Until the caller's side ends: its socket closes or the carrier says stop."""
        stream = self.stream
        try:
            while True:
                data = await self.socket.receive()
                if data is None:
                    stream.closed(None)
                    self._end("caller_closed")
                    return
                try:
                    event = stream.receive(data)
                except CarrierProtocolError as exc:
                    self.protocol_errors += 1
                    if self._should_log_error():
                        self.log.warning(
                            "carrier.bad_frame", error=str(exc), count=self.protocol_errors
                        )
                    continue
                if type(event) is CallerAudio:
                    await self._caller_audio(event)
                elif type(event) is PlayedUpTo:
                    if self.playout.mark_echoed(self.now_ms(), event.name) is not None:
                        self.output.record_played(self.playout.just_played)
                    await self.output.notify_heard()
                elif type(event) is Dtmf:
                    if event.digit not in DTMF_KEYS:  # only keys reach the model, never text
                        self.protocol_errors += 1
                        if self._should_log_error():
                            self.log.warning("carrier.bad_dtmf", digit=event.digit[:16])
                        continue
                    shown = keypad(event.digit, self.options.context.log_dtmf)
                    self.log.info("call.dtmf", digit=shown)
                    self._event("dtmf", digit=shown)
                    await self.gemini.to_gemini(
                        "text", f"The caller pressed {event.digit} on the keypad."
                    )
                elif type(event) is CallStopped:
                    self._end("caller_stop")
                    return
        except CarrierClosed:
            self._end("caller_closed")

    async def _caller_audio(self, media: CallerAudio) -> None:
        meter = self._meter_in
        t0 = meter.begin() if meter is not None else 0
        audio = media.audio
        try:
            if len(audio) > self._max_media_bytes:  # refused before it reaches the resampler
                raise ValueError(f"{len(audio)}-byte media frame")
            pcm = self.inbound.decode(audio)
        except ValueError as exc:
            self.protocol_errors += 1
            if self._should_log_error():
                self.log.warning("carrier.bad_audio", error=str(exc), count=self.protocol_errors)
            return
        self.frames_in += 1
        if self.recorder is not None:
            self._record_caller(media, audio)
        table = self._loud_table
        if table is not None:
            voiced = b"\x01" in audio.translate(table)
        else:  # L16: any sample past the peak either way
            samples = np.frombuffer(audio, dtype="<i2")
            voiced = (bool(samples.size) and int(samples.max()) > VOICE_PEAK) or (
                bool(samples.size) and int(samples.min()) < -VOICE_PEAK
            )
        self.turns.caller_frame(self.now_ms(), voiced)
        if meter is not None:
            meter.end(t0)
        await self.gemini.to_gemini("audio", pcm)

    def _should_log_error(self) -> bool:
        """The first 20 protocol errors of a call are logged, then one in a thousand."""
        return self.protocol_errors <= 20 or self.protocol_errors % 1000 == 0

    def _record_caller(self, media: CallerAudio, audio: bytes) -> None:
        assert self.recorder is not None
        now = self.now_ms()
        if media.timestamp_ms is None:
            at = now
        else:
            if self._stream_t0_ms is None:
                self._stream_t0_ms = now - media.timestamp_ms
            at = self._stream_t0_ms + media.timestamp_ms  # gaps stay gaps
            if at > now + 2000.0:  # a stamp the call's own clock cannot have reached
                at = now
        pcm = pcm_of(audio, self._in_encoding)
        if self._caller_rec_rs is not None:
            pcm = self._caller_rec_rs.process(pcm)
        self.recorder.add_caller(at, pcm)
