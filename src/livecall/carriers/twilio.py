"""Twilio Media Streams behind `carriers.base.CarrierStream`, byte for byte as before.

The protocol itself (parsing, strict checks, builders, TwiML, signatures) stays in
`livecall.telephony.twilio`; this adapter only translates its events into the carrier-neutral
ones and its commands into its frames, so Twilio's wire is exactly what it was: one `media`
message per `play`, `mark` and `clear` as built there.
"""

from __future__ import annotations

import binascii

from livecall.carriers.base import (
    ULAW_8K,
    CallerAudio,
    CallStarted,
    CallStopped,
    Capabilities,
    CarrierEvent,
    CarrierProtocolError,
    Dtmf,
    Encoding,
    Frame,
    Ignored,
    MediaFormat,
    PlayedUpTo,
)
from livecall.telephony import twilio as tw

__all__ = ["CAPABILITIES", "TwilioCarrierStream", "call_started"]

# Marks, clear and DTMF in ride the socket; DTMF out is in-band tones; hanging up is REST (or
# closing the socket, which ends `<Connect>` and with it the call).
CAPABILITIES = Capabilities(
    marks=True, clear=True, dtmf_in=True, send_dtmf_on_stream=False, hangup_on_stream=True
)
_FORMATS: dict[str, Encoding] = {
    "audio/x-mulaw": "mulaw",
    "audio/x-alaw": "alaw",
    "audio/x-l16": "l16",
}
_INBOUND_TRACKS = ("inbound", "inbound_track")


def media_format_of(start: tw.Start) -> MediaFormat:
    """The caller's audio format a `start` announces (μ-law 8 kHz unless it says otherwise)."""
    encoding = _FORMATS.get(start.encoding or "audio/x-mulaw")
    if encoding is None:
        raise CarrierProtocolError(f"unsupported media encoding {start.encoding[:32]!r}")
    return MediaFormat(encoding, start.sample_rate or 8000, 1)


def call_started(start: tw.Start) -> CallStarted:
    """A Twilio `start` as the carrier-neutral `CallStarted`."""
    return CallStarted(
        call_id=start.call_sid,
        stream_id=start.stream_sid,
        media_format=media_format_of(start),
        custom_parameters=start.custom_parameters,
        account_id=start.account_sid,
    )


class TwilioCarrierStream:
    """One Media Stream as a `CarrierStream`. Wraps a `TwilioStream` (possibly already past
    its `start`, as the routes read it before a call is admitted)."""

    capabilities = CAPABILITIES

    def __init__(
        self,
        stream: tw.TwilioStream | None = None,
        *,
        max_frame_bytes: int = tw.DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.stream = stream or tw.TwilioStream(max_message_bytes=max_frame_bytes)
        self.media_format: MediaFormat = ULAW_8K  # Twilio plays μ-law 8 kHz only
        self.started: CallStarted | None = None
        self._sid = ""
        if self.stream.start is not None:
            self._started(self.stream.start)

    def __repr__(self) -> str:
        return f"<TwilioCarrierStream {self.stream!r}>"

    def __getattr__(self, name: str) -> object:
        """The wrapped stream's counters and state (`frames_missing`, `last_chunk`, `state`…)
        read through, so the call's summary and diagnostics see them unchanged."""
        if name.startswith("_") or name == "stream":
            raise AttributeError(name)
        return getattr(self.stream, name)

    def _started(self, start: tw.Start) -> CallStarted:
        self.started = call_started(start)
        self._sid = start.stream_sid
        return self.started

    def receive(self, frame: Frame) -> CarrierEvent:
        try:
            event = self.stream.receive(frame, binary=isinstance(frame, bytes))
        except tw.ProtocolError as exc:
            raise CarrierProtocolError(str(exc)) from None
        if isinstance(event, tw.Media):
            if event.track not in _INBOUND_TRACKS:
                return Ignored(f"media on track {event.track[:16]}")
            try:
                audio = binascii.a2b_base64(event.payload, strict_mode=True)
            except (binascii.Error, ValueError) as exc:
                self.stream.protocol_errors += 1
                raise CarrierProtocolError(f"media payload is not valid base64: {exc}") from None
            return CallerAudio(audio, event.sequence_number, event.timestamp_ms)
        if isinstance(event, tw.Mark):
            return PlayedUpTo(event.name)
        if isinstance(event, tw.Dtmf):
            return Dtmf(event.digit)
        if isinstance(event, tw.Stop):
            return CallStopped("stop")
        if isinstance(event, tw.Start):
            return self._started(event)
        if isinstance(event, tw.Connected):
            return Ignored("connected")
        return Ignored(event.name[:32])

    def closed(self, code: int | None = None) -> CallStopped:
        self.stream.state = tw.StreamState.STOPPED
        return CallStopped("closed" if code is None else f"closed ({code})")

    def play(self, audio: bytes) -> list[Frame]:
        """One `media` message carrying all of `audio` (Twilio queues any length)."""
        payload = binascii.b2a_base64(audio, newline=False).decode("ascii")
        return [tw.media_message(self._sid, payload)]

    def flush(self) -> list[Frame]:
        return []  # nothing is held back

    def mark(self, name: str) -> list[Frame]:
        return [tw.mark_message(self._sid, name)]

    def clear(self) -> list[Frame]:
        return [tw.clear_message(self._sid)]

    def send_dtmf(self, digits: str) -> list[Frame]:
        return []  # no DTMF message: the core plays the tones in-band

    def hangup(self) -> list[Frame]:
        return []  # no hang-up message: close the socket or use REST
