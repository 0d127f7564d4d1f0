"""What every carrier's media stream shares, as livecall's call core sees it.

A carrier (Twilio, Telnyx, Plivo, Vonage, Exotel…) answers a voice webhook with a document
that points a media WebSocket at livecall, then streams the caller's audio to it and plays
what livecall sends back. The wire differs (JSON or binary frames, μ-law, A-law or linear PCM,
marks or checkpoints or nothing), the shape does not. This module names the shape:

- **Inbound events** (`CallStarted`, `CallerAudio`, `Dtmf`, `PlayedUpTo`, `CallStopped`,
  `Ignored`): what a carrier's frames mean, already checked.
- **`CarrierStream`**: one call's stream, sans I/O. Feed it each frame (`receive`), ask it
  for the frames that play audio, mark a position, clear the queue, and so on. It never
  touches a socket, so each carrier's protocol is unit-tested and fuzzed on its own.
- **`Capabilities`**: what the carrier can and cannot do. Where it has no marks, the core
  estimates playout from pacing (and the transcript says the heard part is estimated); where
  it has no clear, barge-in stops sending and lets the queue run out.
- **`Carrier`**: the per-carrier factory and HTTP side (answer document, signature check).

Audio crosses this boundary as raw bytes in the stream's `MediaFormat` (never base64): the
adapter decodes and encodes the wire's framing, the core owns the codecs. **L16 is always
little-endian signed 16-bit at this boundary**, whatever the wire's byte order (an adapter for
a big-endian wire swaps both ways).

Marks settle in order: `PlayedUpTo(name)` means every mark sent before `name` has been settled
too (played or cleared). A carrier whose `clear` settles pending marks reports that as one
`PlayedUpTo(last pending)` (Plivo, Vonage, Exotel), as Twilio echoes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = [
    "ULAW_8K",
    "CallStarted",
    "CallStopped",
    "CallerAudio",
    "Capabilities",
    "Carrier",
    "CarrierEvent",
    "CarrierProtocolError",
    "CarrierStream",
    "Dtmf",
    "Frame",
    "Ignored",
    "MediaFormat",
    "PlayedUpTo",
]

Frame = str | bytes  # one WebSocket message: text (JSON) or binary
Encoding = Literal["mulaw", "alaw", "l16"]


class CarrierProtocolError(ValueError):
    """A frame broke a rule of the carrier's protocol; the message names the rule.

    The stream stays usable: a bad frame is logged and skipped, it does not end the call.
    """


@dataclass(frozen=True, slots=True)
class MediaFormat:
    """How the audio on the wire is coded: G.711 μ-law / A-law, or 16-bit linear PCM."""

    encoding: Encoding
    sample_rate: int
    channels: int = 1

    @property
    def bytes_per_20ms(self) -> int:
        width = 2 if self.encoding == "l16" else 1
        return self.sample_rate // 50 * width * self.channels


ULAW_8K = MediaFormat("mulaw", 8000)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a carrier's media stream can do; the core falls back where it cannot.

    Without `marks` the core estimates playout from pacing (the transcript says "estimated");
    without `clear` a barge-in stops sending and lets the carrier's queue run out; without
    `send_dtmf_on_stream` keypad tones are played in-band as audio.
    """

    marks: bool  # it tells us when what we sent has been played (marks, checkpoints)
    clear: bool  # it can drop what is queued for playout (barge-in)
    dtmf_in: bool  # keypad presses arrive on the stream
    send_dtmf_on_stream: bool = False  # it can play DTMF to the far end on request
    hangup_on_stream: bool = False  # closing or a message ends the call (no REST needed)
    # `play` plays whole multiples of this many ms and holds the rest back until more comes or
    # a mark pads it with silence: the core hands it aligned audio so no mark mid-turn pads
    # (0: any length plays as sent, as on Twilio and Plivo)
    frame_ms: int = 0


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class CallStarted:
    """The stream is live: who is calling whom, in what format, with which parameters.

    `custom_parameters` are the values livecall put in its answer document (Twilio
    `<Parameter>`, Plivo `extraHeaders`, Vonage `headers`, …): the per-call token, profile…
    """

    call_id: str
    stream_id: str | None
    media_format: MediaFormat
    custom_parameters: Mapping[str, str] = field(default_factory=dict)
    account_id: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    direction: str | None = None


@dataclass(frozen=True, slots=True)
class CallerAudio:
    """One chunk of the caller's audio, raw bytes in the stream's media format."""

    audio: bytes
    sequence: int | None = None  # the carrier's frame number, when it sends one
    timestamp_ms: int | None = None  # since the stream started, when the carrier says


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A key the caller pressed (0-9, *, #, A-D)."""

    digit: str


@dataclass(frozen=True, slots=True)
class PlayedUpTo:
    """Everything sent before the mark `name` has been played (or was cleared)."""

    name: str


@dataclass(frozen=True, slots=True)
class CallStopped:
    """The stream is over: the caller hung up or the call moved on."""

    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Ignored:
    """A frame that means nothing to the call (a `connected` hello, an unknown new event)."""

    what: str


CarrierEvent = CallStarted | CallerAudio | Dtmf | PlayedUpTo | CallStopped | Ignored


# ----------------------------------------------------------------------------- streams


class CarrierStream(Protocol):
    """One call's media stream, sans I/O: frames in, events out; commands in, frames out.

    `receive` raises `CarrierProtocolError` for a frame that breaks the protocol and leaves
    the stream as it was. The builders return the frames to send (possibly none: a carrier
    without marks returns no frame for `mark`, and says so in `capabilities`).
    """

    capabilities: Capabilities
    # what `play` takes (the playback format); known after `CallStarted`. It may differ from
    # `CallStarted.media_format` (the caller's audio) where the carrier allows it (Telnyx).
    media_format: MediaFormat
    started: CallStarted | None

    def receive(self, frame: Frame) -> CarrierEvent: ...

    def closed(self, code: int | None = None) -> CallStopped:
        """The socket closed (`code` its close code): the stream is over. For carriers with no
        stop message (Vonage) this is the only end; for the others it ends a stream whose stop
        never came."""
        ...

    def play(self, audio: bytes) -> list[Frame]: ...

    def flush(self) -> list[Frame]:
        """End of an agent turn: frames for audio `play` held back (a remainder shorter than
        the carrier's minimum frame, padded with silence); none if nothing is held."""
        ...

    def mark(self, name: str) -> list[Frame]: ...

    def clear(self) -> list[Frame]: ...

    def send_dtmf(self, digits: str) -> list[Frame]: ...

    def hangup(self) -> list[Frame]: ...


class Carrier(Protocol):
    """One carrier: its name, a new stream per call, and its HTTP side."""

    name: str
    capabilities: Capabilities

    def new_stream(self, *, max_frame_bytes: int) -> CarrierStream: ...

    # (a carrier whose playback format differs from its inbound one says so in the stream's
    # `media_format` vs `CallStarted.media_format`; see `CarrierStream`)

    def answer_document(self, stream_url: str, parameters: Mapping[str, str]) -> tuple[str, str]:
        """The webhook's answer (body, content type) that connects the call to `stream_url`."""
        ...

    def verify_webhook(self, url: str, headers: Mapping[str, str], body: bytes) -> bool:
        """Whether a webhook request really comes from this carrier (its signature scheme)."""
        ...
